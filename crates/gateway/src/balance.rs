//! Which endpoint of a service a try goes to.
//!
//! - [`BalanceKind::PeakEwma`] (default): power of two choices, the lower of peak-EWMA
//!   latency x (outstanding + 1) wins (linkerd, finagle).
//! - [`BalanceKind::RoundRobin`]: each request starts one endpoint further along.
//! - [`BalanceKind::Random`]: uniformly random.
//!
//! Every kind skips ejected endpoints, and never picks an endpoint this request already
//! tried while another exists. An ejected endpoint whose time is up is picked first, as
//! its one probe. If every endpoint is ejected, the balancer picks among all of them
//! (Envoy's panic mode): some chance beats none. Allocation-free.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;

use crate::policy::BalanceKind;
use crate::upstream::{Endpoint, EndpointSet, ProbeClaim, Upstream};

/// The endpoints one request has tried, as a bit per index of its endpoint set
/// (indices past 63 share the last bit, which only makes a huge set's avoidance
/// approximate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    fn bit(index: usize) -> u64 {
        1 << index.min(63)
    }

    /// Marks `index` as tried.
    pub fn add(&mut self, index: usize) {
        self.0 |= Self::bit(index);
    }

    /// Whether `index` was tried.
    pub fn contains(self, index: usize) -> bool {
        self.0 & Self::bit(index) != 0
    }
}

/// The endpoint chosen for one try.
#[derive(Debug)]
pub struct Pick {
    /// Its index in the set.
    pub index: usize,
    /// The endpoint.
    pub endpoint: Arc<Endpoint>,
    /// Set when this try is the probe of a half-ejected endpoint.
    pub probe: Option<ProbeClaim>,
}

/// Whether the endpoint at an index may be picked, at one widening step.
type Eligible<'a> = dyn Fn(usize, &Endpoint) -> bool + 'a;

/// Picks an endpoint of `set` for a try of `upstream`, or `None` when the set is empty.
pub fn pick(
    upstream: &Upstream,
    set: &EndpointSet,
    kind: BalanceKind,
    tried: Tried,
    now_ns: u64,
    rng: &mut impl Rng,
) -> Option<Pick> {
    let endpoints = &set.endpoints;
    if endpoints.is_empty() {
        return None;
    }
    let all_healthy = endpoints.iter().all(|e| e.is_healthy());
    if !all_healthy {
        for (index, endpoint) in endpoints.iter().enumerate() {
            if tried.contains(index) {
                continue;
            }
            if let Some(claim) = endpoint.claim_probe(now_ns) {
                return Some(Pick {
                    index,
                    endpoint: Arc::clone(endpoint),
                    probe: Some(claim),
                });
            }
        }
    }
    // Widen step by step: healthy and untried, then healthy, then untried, then any.
    let filters: [&Eligible<'_>; 4] = [
        &|i, e| !tried.contains(i) && (all_healthy || e.is_healthy()),
        &|_, e| all_healthy || e.is_healthy(),
        &|i, _| !tried.contains(i),
        &|_, _| true,
    ];
    for eligible in filters {
        let count = endpoints
            .iter()
            .enumerate()
            .filter(|(i, e)| eligible(*i, e))
            .count();
        if count == 0 {
            continue;
        }
        let nth = |n: usize| {
            endpoints
                .iter()
                .enumerate()
                .filter(|(i, e)| eligible(*i, e))
                .nth(n)
                .map(|(i, _)| i)
        };
        let index = match kind {
            BalanceKind::Random => nth(rng.random_range(0..count)),
            BalanceKind::RoundRobin => {
                let start = upstream.cursor().fetch_add(1, Ordering::Relaxed) % endpoints.len();
                // The first eligible endpoint at or after the cursor.
                (0..endpoints.len())
                    .map(|step| (start + step) % endpoints.len())
                    .find(|&i| endpoints.get(i).is_some_and(|e| eligible(i, e)))
            }
            BalanceKind::PeakEwma => {
                if count == 1 {
                    nth(0)
                } else {
                    let a = rng.random_range(0..count);
                    let mut b = rng.random_range(0..count - 1);
                    if b >= a {
                        b += 1;
                    }
                    match (nth(a), nth(b)) {
                        (Some(a), Some(b)) => {
                            let (ea, eb) = (&endpoints[a], &endpoints[b]);
                            Some(if eb.load(now_ns) < ea.load(now_ns) {
                                b
                            } else {
                                a
                            })
                        }
                        (a, b) => a.or(b),
                    }
                }
            }
        };
        if let Some(index) = index {
            return endpoints.get(index).map(|endpoint| Pick {
                index,
                endpoint: Arc::clone(endpoint),
                probe: None,
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BudgetSettings, OutlierSettings, ServicePolicy};
    use breakwater_registry::wire::Instance;
    use std::time::Duration;

    fn upstream(n: u16) -> (Upstream, Arc<EndpointSet>) {
        let policy = ServicePolicy {
            breaker: None,
            budget: BudgetSettings {
                ratio: 0.2,
                min_per_sec: 10,
                ttl: Duration::from_secs(10),
            },
            outlier: OutlierSettings {
                consecutive_5xx: 5,
                consecutive_connect_failures: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_time: Duration::from_secs(300),
                max_ejection_percent: 100,
            },
        };
        let up = Upstream::standalone("svc", &policy);
        let instances: Arc<[Instance]> = (1..=n)
            .map(|port| Instance {
                id: format!("svc-127.0.0.1-{port}"),
                name: "svc".into(),
                host: "127.0.0.1".into(),
                port,
                heartbeat_interval: 30,
                registered_at: 0,
                last_heartbeat: 0,
                status: "healthy".into(),
                metadata: serde_json::Map::new(),
            })
            .collect();
        let set = up.endpoints_for(&instances);
        (up, set)
    }

    fn one(up: &Upstream, set: &EndpointSet, kind: BalanceKind, tried: Tried) -> usize {
        pick(up, set, kind, tried, 0, &mut rand::rng())
            .unwrap()
            .index
    }

    #[test]
    fn round_robin_rotates_and_random_spreads() {
        let (up, set) = upstream(3);
        let firsts: Vec<usize> = (0..6)
            .map(|_| one(&up, &set, BalanceKind::RoundRobin, Tried::default()))
            .collect();
        assert_eq!(firsts, [0, 1, 2, 0, 1, 2]);
        let mut seen = [0_usize; 3];
        for _ in 0..300 {
            seen[one(&up, &set, BalanceKind::Random, Tried::default())] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn p2c_prefers_the_less_loaded_endpoint() {
        let (up, set) = upstream(2);
        let _busy: Vec<_> = (0..5).map(|_| set.endpoints[0].start()).collect();
        for _ in 0..50 {
            assert_eq!(one(&up, &set, BalanceKind::PeakEwma, Tried::default()), 1);
        }
        let (up, set) = upstream(3);
        let _busy: Vec<_> = (0..5).map(|_| set.endpoints[2].start()).collect();
        let mut seen = [0_usize; 3];
        for _ in 0..300 {
            seen[one(&up, &set, BalanceKind::PeakEwma, Tried::default())] += 1;
        }
        assert_eq!(
            seen[2], 0,
            "the busy one loses every pair it is in: {seen:?}"
        );
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn a_request_never_repeats_an_endpoint_while_another_exists() {
        for kind in [
            BalanceKind::PeakEwma,
            BalanceKind::RoundRobin,
            BalanceKind::Random,
        ] {
            let (up, set) = upstream(3);
            for _ in 0..30 {
                let mut tried = Tried::default();
                let mut order = Vec::new();
                for _ in 0..3 {
                    let i = one(&up, &set, kind, tried);
                    tried.add(i);
                    order.push(i);
                }
                order.sort_unstable();
                assert_eq!(order, [0, 1, 2], "{kind:?}");
                // All tried: a fourth try may go anywhere rather than nowhere.
                assert!(one(&up, &set, kind, tried) < 3);
            }
        }
        let (up, set) = upstream(0);
        assert!(
            pick(
                &up,
                &set,
                BalanceKind::PeakEwma,
                Tried::default(),
                0,
                &mut rand::rng()
            )
            .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_still_picks_something() {
        let (up, set) = upstream(2);
        let failure = crate::classify::failure(
            crate::classify::AttemptKind::ConnectError,
            crate::classify::Replay::Any,
        );
        for e in &set.endpoints {
            for _ in 0..3 {
                up.observe(
                    &set,
                    e,
                    &failure,
                    false,
                    Duration::ZERO,
                    tokio::time::Instant::now(),
                );
            }
        }
        assert_eq!(set.ejected_count(), 2);
        let now = up.nanos(tokio::time::Instant::now());
        let p = pick(
            &up,
            &set,
            BalanceKind::PeakEwma,
            Tried::default(),
            now,
            &mut rand::rng(),
        );
        assert!(
            p.is_some_and(|p| p.probe.is_none()),
            "panic mode: some chance beats none"
        );
    }
}
