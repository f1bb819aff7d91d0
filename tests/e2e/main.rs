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
mod system;
mod up_survives_instance_crash;
