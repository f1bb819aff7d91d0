//! The plan: `bench`'s flags checked once and turned into what the connection loops use.
//!
//! Every bad value becomes a [`UsageError`] that names the flag, so `main` exits 64.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::Full;

use super::BenchArgs;
use crate::component::UsageError;

/// autocannon's default run length, used when neither `-d` nor `-a` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(30);

/// Longest `-d` or `--timeout` taken: far past any useful run, and it keeps every
/// deadline computed from them well inside what `Instant` can hold.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

/// Most connections: each is one task and one ephemeral port.
const MAX_CONNECTIONS: usize = 10_000;

/// Highest `-R`: far above what one machine can send, and it keeps the per-connection
/// interval at least a nanosecond.
const MAX_RATE: f64 = 100_000_000.0;

/// The body of a request a connection sends.
pub(super) type RequestBody = Full<Bytes>;

/// Where the requests go.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The URL as given, for the report.
    pub url: String,
    /// Host name or address to resolve (IPv6 without brackets).
    pub host: String,
    /// TCP port (80 when the URL names none).
    pub port: u16,
}

/// A validated `bench` run.
#[derive(Debug)]
pub(super) struct Plan {
    pub target: Target,
    pub connections: usize,
    /// Run length; `None` when only `-a` bounds the run.
    pub duration: Option<Duration>,
    /// Total request attempts; `None` when only the duration bounds the run.
    pub amount: Option<u64>,
    /// Target requests per second over all connections (open loop); `None` is closed loop.
    pub rate: Option<f64>,
    pub timeout: Duration,
    /// The request every connection clones: method, origin-form URI, headers, body.
    pub request: Request<RequestBody>,
    pub json: bool,
    pub progress: bool,
}

impl Plan {
    /// Checks every flag and builds the plan; reads the `-b @file` body.
    pub async fn from_args(args: BenchArgs) -> Result<Self, UsageError> {
        let body = match args.body.as_deref() {
            None => Bytes::new(),
            Some(spec) => match spec.strip_prefix('@') {
                Some(path) => tokio::fs::read(path)
                    .await
                    .map(Bytes::from)
                    .map_err(|e| UsageError(format!("-b @{path}: cannot read the file: {e}")))?,
                None => Bytes::from(spec.to_owned()),
            },
        };
        Self::with_body(args, body)
    }

    /// Checks every flag, with the body already in hand.
    fn with_body(args: BenchArgs, body: Bytes) -> Result<Self, UsageError> {
        let (target, uri, authority) = parse_url(&args.url)?;
        if args.connections == 0 || args.connections > MAX_CONNECTIONS {
            return Err(UsageError(format!(
                "-c {}: connections must be between 1 and {MAX_CONNECTIONS}",
                args.connections
            )));
        }
        let duration = match (args.duration.as_deref(), args.amount) {
            (Some(d), _) => Some(parse_span("-d", d)?),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_DURATION),
        };
        if args.amount == Some(0) {
            return Err(UsageError("-a 0: the amount must be at least 1".into()));
        }
        if let Some(rate) = args.rate
            && !(rate > 0.0 && rate <= MAX_RATE)
        {
            return Err(UsageError(format!(
                "-R {rate}: the rate must be above 0 and at most {MAX_RATE} requests/s"
            )));
        }
        let timeout = parse_span("--timeout", &args.timeout)?;
        let method = parse_method(&args.method)?;

        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        for raw in &args.headers {
            let (name, value) = parse_header(raw)?;
            headers.append(name, value);
        }
        // hyper's low-level client sends only the headers it is given, and HTTP/1.1
        // requires Host.
        if !headers.contains_key(HOST) {
            headers.insert(HOST, authority);
        }

        Ok(Self {
            target,
            connections: args.connections,
            duration,
            amount: args.amount,
            rate: args.rate,
            timeout,
            request,
            json: args.json,
            progress: !args.no_progress,
        })
    }
}

/// Splits an `http://` URL into the target, the origin-form URI sent on the wire and the
/// Host header value.
fn parse_url(raw: &str) -> Result<(Target, Uri, HeaderValue), UsageError> {
    let bad = |why: &str| UsageError(format!("<url> {raw:?}: {why}"));
    let uri: Uri = raw
        .parse()
        .map_err(|e| bad(&format!("not a valid URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported (bench speaks plain HTTP/1.1); use an http:// URL",
            ));
        }
        Some(other) => {
            return Err(bad(&format!(
                "scheme {other:?} is not supported; use http://"
            )));
        }
        None => return Err(bad("the URL needs a scheme, e.g. http://127.0.0.1:3000/")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("the URL has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; pass -H 'authorization: ...'",
        ));
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(bad("the URL has no host"));
    }
    // `Authority::port_u16` says None both for no port and for one out of range, and
    // the latter must not quietly become 80.
    let port_text = authority
        .as_str()
        .strip_prefix(host)
        .and_then(|rest| rest.strip_prefix(':'));
    let port = match port_text {
        None | Some("") => 80,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad(&format!("port {text:?} is not a port between 1 and 65535")))?,
    };
    let host_header = HeaderValue::from_str(authority.as_str())
        .map_err(|_| bad("the host is not a valid Host header"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let origin_form: Uri = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    }
    .parse()
    .map_err(|e| bad(&format!("the path is not valid ({e})")))?;
    let target = Target {
        url: raw.to_owned(),
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    };
    Ok((target, origin_form, host_header))
}

/// A duration flag: humantime (`30s`, `1m30s`, `500ms`) or bare seconds as autocannon takes.
fn parse_span(flag: &str, raw: &str) -> Result<Duration, UsageError> {
    let span = match raw.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(raw.trim()).map_err(|e| {
            UsageError(format!(
                "{flag} {raw:?}: {e} (examples: 30s, 500ms, 1m, 10)"
            ))
        })?,
    };
    if span.is_zero() {
        return Err(UsageError(format!("{flag} {raw:?}: must be longer than 0")));
    }
    if span > LONGEST {
        return Err(UsageError(format!(
            "{flag} {raw:?}: must be at most 365 days"
        )));
    }
    Ok(span)
}

/// `-m`: an HTTP method token, upper-cased so `-m post` means POST.
fn parse_method(raw: &str) -> Result<Method, UsageError> {
    Method::from_bytes(raw.trim().to_ascii_uppercase().as_bytes())
        .map_err(|_| UsageError(format!("-m {raw:?}: not a valid HTTP method")))
}

/// `-H 'name: value'`.
fn parse_header(raw: &str) -> Result<(HeaderName, HeaderValue), UsageError> {
    let Some((name, value)) = raw.split_once(':') else {
        return Err(UsageError(format!(
            "-H {raw:?}: expected 'name: value', e.g. -H 'accept: application/json'"
        )));
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        UsageError(format!(
            "-H {raw:?}: {:?} is not a valid header name",
            name.trim()
        ))
    })?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|_| UsageError(format!("-H {raw:?}: the value is not a valid header value")))?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn args(argv: &[&str]) -> BenchArgs {
        super::super::parse_args(argv)
    }

    fn plan(argv: &[&str]) -> Result<Plan, String> {
        Plan::with_body(args(argv), Bytes::new()).map_err(|e| e.0)
    }

    fn error(argv: &[&str]) -> String {
        plan(argv).unwrap_err()
    }

    #[test]
    fn defaults_are_autocannons() {
        let p = plan(&["http://127.0.0.1:3000/stress-test?x=1"]).unwrap();
        assert_eq!(p.connections, 10);
        assert_eq!(p.duration, Some(Duration::from_secs(30)));
        assert_eq!(p.amount, None);
        assert_eq!(p.rate, None);
        assert_eq!(p.timeout, Duration::from_secs(10));
        assert_eq!(p.request.method(), Method::GET);
        assert_eq!(p.request.uri(), "/stress-test?x=1");
        assert_eq!(p.request.headers()[HOST], "127.0.0.1:3000");
        assert_eq!(p.target.host, "127.0.0.1");
        assert_eq!(p.target.port, 3000);
        assert!(p.progress);
        assert!(!p.json);
    }

    #[test]
    fn amount_alone_has_no_time_limit_and_both_keep_both() {
        assert_eq!(plan(&["-a", "5", "http://h/"]).unwrap().duration, None);
        let both = plan(&["-a", "5", "-d", "2s", "http://h/"]).unwrap();
        assert_eq!(
            (both.amount, both.duration),
            (Some(5), Some(Duration::from_secs(2)))
        );
    }

    #[test]
    fn url_forms() {
        let p = plan(&["http://example.test"]).unwrap();
        assert_eq!(
            (p.target.port, p.request.uri().to_string()),
            (80, "/".to_owned())
        );
        let p = plan(&["http://[::1]:8080/a"]).unwrap();
        assert_eq!(p.target.host, "::1");
        assert_eq!(p.request.headers()[HOST], "[::1]:8080");
    }

    #[test]
    fn bad_urls_are_named() {
        assert!(error(&["https://h/"]).contains("https is not supported"));
        assert!(error(&["ftp://h/"]).contains("scheme \"ftp\""));
        assert!(error(&["localhost:3000"]).contains("<url>"));
        assert!(error(&["/just/a/path"]).contains("needs a scheme"));
        assert!(error(&["http://u:p@h/"]).contains("credentials"));
        assert!(error(&["http://h:99999/"]).contains("port \"99999\""));
        assert!(error(&["http://h:0/"]).contains("port \"0\""));
    }

    #[test]
    fn bad_numbers_name_their_flag() {
        assert!(error(&["-c", "0", "http://h/"]).starts_with("-c 0:"));
        assert!(error(&["-c", "20000", "http://h/"]).starts_with("-c 20000:"));
        assert!(error(&["-a", "0", "http://h/"]).starts_with("-a 0:"));
        assert!(error(&["-R", "0", "http://h/"]).starts_with("-R 0:"));
        assert!(error(&["-R", "NaN", "http://h/"]).starts_with("-R NaN:"));
        assert!(error(&["-R=-5", "http://h/"]).starts_with("-R -5:"));
        assert!(error(&["-d", "soon", "http://h/"]).starts_with("-d \"soon\":"));
        assert!(error(&["-d", "0s", "http://h/"]).contains("longer than 0"));
        assert!(error(&["-d", "400days", "http://h/"]).contains("at most 365 days"));
        assert!(error(&["--timeout", "x", "http://h/"]).starts_with("--timeout \"x\":"));
    }

    #[test]
    fn durations_take_bare_seconds() {
        let p = plan(&["-d", "3", "--timeout", "250ms", "http://h/"]).unwrap();
        assert_eq!(p.duration, Some(Duration::from_secs(3)));
        assert_eq!(p.timeout, Duration::from_millis(250));
    }

    #[test]
    fn methods_and_headers() {
        let p = plan(&[
            "-m",
            "post",
            "-H",
            "x-a: 1",
            "-H",
            "x-a:2",
            "-H",
            "Host: other",
            "http://h/",
        ])
        .unwrap();
        assert_eq!(p.request.method(), Method::POST);
        let values: Vec<_> = p.request.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(p.request.headers()[HOST], "other");
        assert_eq!(p.request.headers().get_all(HOST).iter().count(), 1);
        assert!(error(&["-m", "G T", "http://h/"]).starts_with("-m \"G T\":"));
        assert!(error(&["-H", "nocolon", "http://h/"]).starts_with("-H \"nocolon\": expected"));
        assert!(error(&["-H", "bad name: v", "http://h/"]).contains("not a valid header name"));
        assert!(error(&["-H", "x: a\u{1}b", "http://h/"]).contains("not a valid header value"));
    }

    async fn body_of(plan: &Plan) -> Bytes {
        plan.request
            .body()
            .clone()
            .collect()
            .await
            .unwrap()
            .to_bytes()
    }

    #[tokio::test]
    async fn body_comes_from_a_string_or_a_file() {
        let inline = Plan::from_args(args(&["-b", "hello", "http://h/"]))
            .await
            .unwrap();
        assert_eq!(body_of(&inline).await, "hello");

        let path = std::env::temp_dir().join(format!("bw-bench-body-{}", std::process::id()));
        tokio::fs::write(&path, b"{\"a\":1}").await.unwrap();
        let spec = format!("@{}", path.display());
        let from_file = Plan::from_args(args(&["-b", &spec, "http://h/"])).await;
        tokio::fs::remove_file(&path).await.unwrap();
        assert_eq!(body_of(&from_file.unwrap()).await, "{\"a\":1}");

        let missing = Plan::from_args(args(&["-b", "@/nonexistent/bw-body", "http://h/"])).await;
        assert!(
            missing
                .unwrap_err()
                .0
                .starts_with("-b @/nonexistent/bw-body: cannot read")
        );
    }
}
