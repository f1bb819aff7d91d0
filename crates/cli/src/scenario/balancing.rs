//! Load: seed 003's load-balancing scenario (#10) and seed 001's stress test, run with
//! the `bench` load generator in this process.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::{Ctx, probe};
use crate::loadgen::{self, BenchArgs};

/// Sends `total` GETs of `path` through the gateway, `parallel` at a time, with the
/// decision trace on; how many each instance answered. A request that fails or
/// answers no trace is an error.
pub(crate) async fn spread(
    cx: &Ctx,
    path: &str,
    total: usize,
    parallel: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let url = cx.gw(path);
    let worker = |n: usize| {
        let url = url.clone();
        async move {
            let mut seen = Vec::with_capacity(n);
            for _ in 0..n {
                let r = cx
                    .send(cx.http.get(&url).header("x-breakwater-trace", "1"))
                    .await?;
                anyhow::ensure!(r.status == 200, "GET {url}: {}", r.brief());
                let trace = r.header("x-breakwater-trace");
                let instance = probe::answering_instance(trace).ok_or_else(|| {
                    anyhow::anyhow!("GET {url}: no try in the trace header {trace:?}")
                })?;
                seen.push(instance);
            }
            anyhow::Ok(seen)
        }
    };
    let parallel = parallel.clamp(1, total.max(1));
    let mut work = Vec::new();
    for i in 0..parallel {
        work.push(worker(total / parallel + usize::from(i < total % parallel)));
    }
    let mut counts = BTreeMap::new();
    for seen in join_all(work).await {
        for instance in seen? {
            *counts.entry(instance).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// The figures of a `bench` run that the scenarios judge.
pub(crate) struct Load {
    pub(crate) requests: u64,
    /// Answers with a 2xx status.
    pub(crate) ok: u64,
    /// Connection errors and timeouts.
    pub(crate) errors_total: u64,
    pub(crate) status_codes: Value,
    pub(crate) errors: Value,
    /// Seed 001's lines and the latency, for the narration.
    pub(crate) figures: String,
}

impl From<Value> for Load {
    fn from(report: Value) -> Self {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        Self {
            requests: n(&report["requests"]),
            ok: n(&report["status_classes"]["2xx"]),
            errors_total: n(&report["errors_total"]),
            status_codes: report["status_codes"].clone(),
            errors: report["errors"].clone(),
            figures: format!(
                "Number of requests: {}, Duration (seconds): {:.2}, {:.0} req/s, latency p50 {} us, p99 {} us",
                report["requests"],
                report["duration_seconds"].as_f64().unwrap_or(0.0),
                report["requests_per_second"].as_f64().unwrap_or(0.0),
                report["latency_us"]["p50"],
                report["latency_us"]["p99"]
            ),
        }
    }
}

/// Runs `futures` concurrently and returns their outputs in order.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|task| {
        let mut pending = false;
        for (fut, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(task) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// #10: requests are spread over every users instance, none starved.
pub(crate) async fn load_balancing(cx: &Ctx) -> anyhow::Result<()> {
    let instances = probe::registry_ports(cx, "user-service").await?.len();
    let total = 60;
    cx.step(format!(
        "Send {total} requests for /users/1 through the gateway, 4 at a time ({instances} users instances registered)"
    ));
    cx.look(format!(
        "{}/ -> \"Services\": user-service's instances, their outstanding requests and latency; \
         \"Traffic\" for the request rate",
        cx.gateway
    ));
    let counts = spread(cx, "/users/1", total, 4).await?;
    for (instance, n) in &counts {
        cx.note(format!("{instance}: {n} answers"));
    }
    cx.check(
        counts.len() == instances,
        format!(
            "every users instance answered ({} of {instances})",
            counts.len()
        ),
    );
    // The balancer favours the faster instance of two random ones, so the split is not
    // even; a third of an even share is the floor that still says "spread".
    let floor = total / instances.max(1) / 3;
    let least = counts.values().copied().min().unwrap_or(0);
    cx.check(
        least >= floor,
        format!("each got a fair share: the least loaded answered {least} (at least {floor})"),
    );
    Ok(())
}

/// Seed 001: a load on `/stress-test` (unstable's CPU-bound work) through the gateway,
/// with the `bench` load generator.
pub(crate) async fn stress_test(cx: &Ctx) -> anyhow::Result<()> {
    let seconds = cx.pace(Duration::from_secs(10), Duration::from_secs(3));
    // A small loop per request: the point is many requests through the whole path,
    // not minutes of CPU in a debug build.
    let url = cx.gw("/stress-test?n=100000");
    cx.step(format!(
        "Run `breakwater bench {url} -c 4 -d {}s` (seed 001's autocannon run, shorter)",
        seconds.as_secs()
    ));
    cx.look(format!(
        "{}/ -> \"Traffic\": the /stress-test route's requests per second and latency",
        cx.gateway
    ));
    let args = BenchArgs::quiet_get(url, 4, seconds);
    let load = Load::from(loadgen::measure_quietly(args).await?);
    cx.note(&load.figures);
    cx.check(
        load.requests > 0,
        format!("{} requests answered", load.requests),
    );
    cx.check(
        load.ok == load.requests,
        format!(
            "every answer was a 2xx ({} of {}; status codes {})",
            load.ok, load.requests, load.status_codes
        ),
    );
    cx.check(
        load.errors_total == 0,
        format!("no connection error or timeout ({})", load.errors),
    );
    Ok(())
}
