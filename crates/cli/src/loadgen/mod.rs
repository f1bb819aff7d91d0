//! `breakwater bench`: an autocannon-style HTTP/1.1 load generator.
//!
//! Parts:
//! - [`plan`]: the flags checked once and turned into a [`plan::Plan`] (bad values are
//!   [`UsageError`]s naming the flag, so the binary exits 64).
//! - [`client`]: one task per connection, each owning one keep-alive connection made
//!   with hyper's low-level client; closed loop, or paced on a fixed grid with `-R`
//!   (a connection behind its schedule counts latency from the scheduled send time,
//!   correcting coordinated omission as wrk2 does).
//! - [`tally`]: per-connection counts (HDR latency histogram, status codes, errors,
//!   bytes), merged at the end.
//! - [`report`]: the merged tally as text (seed 001's `Number of requests` and
//!   `Duration (seconds)` lines, a latency table) or one JSON object.
//! - [`progress`]: the progress bar on stderr.

mod client;
mod plan;
mod progress;
mod report;
mod tally;

use std::io::Write as _;
use std::sync::Arc;

use anyhow::Context as _;

#[cfg(doc)]
use crate::component::UsageError;
use client::Shared;
use plan::Plan;
use progress::Progress;
use report::Summary;

/// `breakwater bench <url>`: flags as autocannon names them.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Target URL; http:// only (e.g. http://127.0.0.1:3000/stress-test).
    pub url: String,
    /// Connections, each one keep-alive HTTP/1.1 connection.
    #[arg(short = 'c', long, default_value_t = 10)]
    pub connections: usize,
    /// How long to run (30s, 1m, 500ms; a bare number is seconds). Default 30s, or no
    /// time limit when only -a is given.
    #[arg(short = 'd', long)]
    pub duration: Option<String>,
    /// Total requests to send; with -d the run stops at whichever comes first.
    #[arg(short = 'a', long)]
    pub amount: Option<u64>,
    /// Target rate in requests/s over all connections: requests are sent on a fixed
    /// schedule, and a request sent late because the server was slow counts its latency
    /// from the scheduled time (without -R, each connection sends its next request as
    /// soon as the last response is read).
    #[arg(short = 'R', long)]
    pub rate: Option<f64>,
    /// HTTP method.
    #[arg(short = 'm', long, default_value = "GET")]
    pub method: String,
    /// Request body: a string, or @file for a file's contents.
    #[arg(short = 'b', long)]
    pub body: Option<String>,
    /// Request header 'name: value'; repeat for more.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Longest wait for a connection or a complete response.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl BenchArgs {
    /// A closed-loop GET load on `url` for `duration` over `connections`, with the
    /// flags' defaults otherwise and no progress bar: the load the scenarios run
    /// in-process through [`measure_quietly`].
    pub fn quiet_get(url: String, connections: usize, duration: std::time::Duration) -> Self {
        Self {
            url,
            connections,
            duration: Some(format!("{}ms", duration.as_millis())),
            amount: None,
            rate: None,
            method: "GET".into(),
            body: None,
            headers: Vec::new(),
            json: true,
            timeout: "10s".into(),
            no_progress: true,
        }
    }
}

/// Runs the benchmark and prints the report on stdout.
///
/// Bad flags return a [`UsageError`]; an unresolvable host or a failed write of the
/// report returns another error. Connection failures during the run are not errors:
/// they are counted and reported.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let plan = Plan::from_args(args).await?;
    let summary = measure(&plan).await?;
    let text = if plan.json {
        summary.to_json().context("encoding the JSON report")?
    } else {
        summary.to_text()
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .context("writing the report")
}

/// Runs a load without printing anything and returns the `--json` report's object, for
/// callers that judge the outcome themselves (`breakwater scenario`).
pub(crate) async fn measure_quietly(mut args: BenchArgs) -> anyhow::Result<serde_json::Value> {
    args.no_progress = true;
    let plan = Plan::from_args(args).await?;
    let summary = measure(&plan).await?;
    serde_json::to_value(&summary).context("encoding the load's figures")
}

/// Resolves the target, runs every connection, and sums up.
async fn measure(plan: &Plan) -> anyhow::Result<Summary> {
    let addrs = client::resolve(&plan.target.host, plan.target.port).await?;
    let shared = Arc::new(Shared::new(plan));
    let progress = Progress::start(plan, Arc::clone(&shared));
    let tally = client::execute(plan, addrs, Arc::clone(&shared)).await?;
    let elapsed = shared.start.elapsed();
    progress.finish();
    Ok(Summary::new(plan, &tally, elapsed))
}

/// Parses `bench`'s flags as the binary would (tests only).
#[cfg(test)]
fn parse_args(argv: &[&str]) -> BenchArgs {
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        args: BenchArgs,
    }

    let mut full = vec!["bench"];
    full.extend_from_slice(argv);
    match Command::try_parse_from(full) {
        Ok(command) => command.args,
        Err(e) => panic!("{argv:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http::header::CONNECTION;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::component::UsageError;

    /// An in-test HTTP/1.1 server: `/` answers 200, `/fail` 500, `/slow` after 10 s,
    /// `/pause` after 50 ms, `/close` 200 and closes the connection. It counts requests and body bytes.
    struct Target {
        addr: SocketAddr,
        hits: Arc<AtomicU64>,
        body_bytes: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl Drop for Target {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Target {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicU64::new(0));
            let body_bytes = Arc::new(AtomicU64::new(0));
            let (h, b) = (Arc::clone(&hits), Arc::clone(&body_bytes));
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (h, b) = (Arc::clone(&h), Arc::clone(&b));
                    tokio::spawn(async move {
                        let service = service_fn(move |req: Request<Incoming>| {
                            let (h, b) = (Arc::clone(&h), Arc::clone(&b));
                            async move { Ok::<_, Infallible>(answer(req, &h, &b).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Self {
                addr,
                hits,
                body_bytes,
                task,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn hits(&self) -> u64 {
            self.hits.load(Ordering::Relaxed)
        }
    }

    async fn answer(
        req: Request<Incoming>,
        hits: &AtomicU64,
        body_bytes: &AtomicU64,
    ) -> Response<Full<Bytes>> {
        hits.fetch_add(1, Ordering::Relaxed);
        let path = req.uri().path().to_owned();
        if let Ok(body) = req.into_body().collect().await {
            body_bytes.fetch_add(body.to_bytes().len() as u64, Ordering::Relaxed);
        }
        let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
        match path.as_str() {
            "/fail" => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            "/slow" => tokio::time::sleep(Duration::from_secs(10)).await,
            "/pause" => tokio::time::sleep(Duration::from_millis(50)).await,
            "/close" => {
                response
                    .headers_mut()
                    .insert(CONNECTION, http::HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }

    async fn bench(argv: &[&str]) -> Summary {
        let mut all = vec!["--no-progress"];
        all.extend_from_slice(argv);
        let plan = Plan::from_args(parse_args(&all)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), measure(&plan))
            .await
            .expect("the run did not end")
            .unwrap()
    }

    fn codes(summary: &Summary) -> Vec<(String, u64)> {
        summary.status_codes.clone().into_iter().collect()
    }

    #[tokio::test]
    async fn an_amount_sends_exactly_that_many_requests() {
        let target = Target::start().await;
        let s = bench(&["-a", "100", "-c", "4", &target.url("/")]).await;
        assert_eq!(target.hits(), 100);
        assert_eq!(s.requests, 100);
        assert_eq!(codes(&s), [("200".to_owned(), 100)]);
        assert_eq!(s.status_classes["2xx"], 100);
        assert_eq!(s.errors_total, 0);
        // Each response is at least a status line, headers and the 5-byte body.
        assert!(s.bytes_read > 100 * 40, "{}", s.bytes_read);
        assert!(s.latency_us.p50 > 0 && s.latency_us.max >= s.latency_us.p99);
    }

    #[tokio::test]
    async fn server_errors_are_counted_as_such() {
        let target = Target::start().await;
        let s = bench(&["-a", "20", "-c", "2", &target.url("/fail")]).await;
        assert_eq!(codes(&s), [("500".to_owned(), 20)]);
        assert_eq!(s.status_classes["5xx"], 20);
        assert_eq!(s.status_classes["2xx"], 0);
        assert_eq!(s.errors_total, 0);
    }

    #[tokio::test]
    async fn a_closed_port_counts_connect_errors_and_ends() {
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let url = format!("http://{closed}/");
        let s = bench(&["-a", "20", "-c", "2", "-d", "3s", &url]).await;
        assert_eq!(s.requests, 0);
        assert_eq!(
            s.errors.clone().into_iter().collect::<Vec<_>>(),
            [("connect".to_owned(), 20)]
        );
        assert!(s.duration_seconds < 2.0, "{}", s.duration_seconds);

        // Without -a, the duration alone ends it.
        let s = bench(&["-c", "2", "-d", "300ms", &url]).await;
        assert!(s.errors["connect"] > 0);
        assert!(s.duration_seconds < 1.0, "{}", s.duration_seconds);
    }

    #[tokio::test]
    async fn a_target_rate_paces_the_requests() {
        let target = Target::start().await;
        let s = bench(&["-d", "1s", "-R", "200", "-c", "4", &target.url("/")]).await;
        assert!((180..=220).contains(&s.requests), "{} requests", s.requests);
        assert_eq!(target.hits(), s.requests);
        assert_eq!(s.target_rate, Some(200.0));
    }

    #[tokio::test]
    async fn a_paced_run_counts_the_wait_a_slow_server_causes() {
        let target = Target::start().await;
        // Closed loop: every response takes ~50 ms, and that is all it sees.
        let closed = bench(&["-d", "500ms", "-c", "1", &target.url("/pause")]).await;
        assert!(closed.latency_us.max < 200_000, "{:?}", closed.latency_us);
        // Paced at 100/s on one connection, each request is due 10 ms after the last but
        // waits ~50 ms for it: the backlog grows and the latency from the scheduled time
        // shows it (coordinated omission corrected).
        let paced = bench(&["-d", "500ms", "-R", "100", "-c", "1", &target.url("/pause")]).await;
        assert!(paced.latency_us.max > 250_000, "{:?}", paced.latency_us);
        assert!(
            paced.requests <= closed.requests + 1,
            "{} {}",
            paced.requests,
            closed.requests
        );
    }

    #[tokio::test]
    async fn slow_responses_count_as_timeouts() {
        let target = Target::start().await;
        let s = bench(&[
            "-a",
            "3",
            "-c",
            "1",
            "--timeout",
            "100ms",
            &target.url("/slow"),
        ])
        .await;
        assert_eq!(s.requests, 0);
        assert_eq!(s.errors["timeout"], 3);
    }

    #[tokio::test]
    async fn the_end_of_the_run_drops_requests_in_flight() {
        let target = Target::start().await;
        let s = bench(&["-c", "2", "-d", "200ms", &target.url("/slow")]).await;
        assert_eq!((s.requests, s.errors_total), (0, 0));
        assert!(s.duration_seconds < 1.0, "{}", s.duration_seconds);
    }

    #[tokio::test]
    async fn a_server_closing_connections_is_not_an_error() {
        let target = Target::start().await;
        let s = bench(&["-a", "30", "-c", "2", &target.url("/close")]).await;
        assert_eq!(codes(&s), [("200".to_owned(), 30)]);
        assert_eq!(s.errors_total, 0);
        assert_eq!(target.hits(), 30);
    }

    #[tokio::test]
    async fn the_body_is_sent_with_every_request() {
        let target = Target::start().await;
        let s = bench(&[
            "-a",
            "5",
            "-c",
            "1",
            "-m",
            "post",
            "-b",
            "hello",
            &target.url("/"),
        ])
        .await;
        assert_eq!(s.requests, 5);
        assert_eq!(s.method, "POST");
        assert_eq!(target.body_bytes.load(Ordering::Relaxed), 25);
    }

    #[tokio::test]
    async fn the_json_report_has_every_figure() {
        let target = Target::start().await;
        let s = bench(&["-a", "10", "-c", "2", &target.url("/")]).await;
        let json: serde_json::Value = serde_json::from_str(&s.to_json().unwrap()).unwrap();
        assert_eq!(json["requests"], 10);
        assert!(json["duration_seconds"].as_f64().unwrap() > 0.0);
        assert!(json["requests_per_second"].as_f64().unwrap() > 0.0);
        for key in ["p50", "p90", "p99", "p99_9", "max", "mean", "stdev"] {
            assert!(json["latency_us"][key].is_number(), "latency_us.{key}");
        }
        assert_eq!(json["status_codes"]["200"], 10);
        assert!(json["errors"].as_object().unwrap().is_empty());
        assert_eq!(json["connections"], 2);
        assert!(json["bytes_read"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn the_text_report_has_the_seed_lines() {
        let target = Target::start().await;
        let text = bench(&["-a", "10", "-c", "2", &target.url("/")])
            .await
            .to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"Number of requests: 10"), "{text}");
        let duration = lines
            .iter()
            .find_map(|l| l.strip_prefix("Duration (seconds): "))
            .unwrap_or_else(|| panic!("{text}"));
        let (whole, decimals) = duration.split_once('.').unwrap();
        assert!(
            whole.parse::<u64>().is_ok() && decimals.len() == 2,
            "{duration}"
        );
        assert!(
            text.contains("p99.9") && text.contains("Status codes: 200 x 10"),
            "{text}"
        );
        assert!(text.contains("Errors: none"), "{text}");
    }

    #[tokio::test]
    async fn https_is_refused_as_a_usage_error() {
        let err = run(parse_args(&["https://127.0.0.1:1/"]))
            .await
            .unwrap_err();
        let usage = err.downcast_ref::<UsageError>().expect("a usage error");
        assert!(usage.0.contains("https is not supported"), "{}", usage.0);
    }
}
