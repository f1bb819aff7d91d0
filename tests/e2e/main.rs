//! End-to-end tests: the real `breakwater` binary, run as users run it, on free ports.
//! One test binary (DESIGN.md); each module is one behaviour.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stderr,
    reason = "a test: failing loudly is the point"
)]

mod bad_flags_exit_64;
mod dashboards_in_a_browser;
mod gateway_controls_processes_and_chaos;
mod scenarios_pass;
mod system;
mod traces_reach_an_otlp_collector;
mod up_on_redis_and_postgres;
mod up_survives_instance_crash;
