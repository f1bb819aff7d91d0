//! The `breakwater` binary: parses the command line and calls the libraries.
//!
//! Parts: `cli` (flags), `component` (`registry`, `gateway` and `service` as single
//! processes), `up` (the supervisor that runs the whole system on one machine),
//! `loadgen` (`breakwater bench`, the load generator) and `scenario` (`breakwater
//! scenario`, guided scenarios that drive a system and check what it does).

mod cli;
mod component;
mod loadgen;
mod scenario;
mod up;

use std::process::ExitCode;

use clap::Parser;

/// Exit code for a usage or configuration error (BSD `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    breakwater_runtime::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let log_format = cli.log_format;
    let result = runtime.block_on(async move {
        match cli.command {
            cli::Command::Up(args) => up::run(args, log_format).await,
            cli::Command::Registry(args) => component::registry(args).await,
            cli::Command::Gateway(args) => component::gateway(args).await,
            cli::Command::Service(args) => component::service(args).await,
            cli::Command::Bench(args) => loadgen::run(args).await,
            cli::Command::Scenario(args) => scenario::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<component::UsageError>().is_some() {
                EXIT_USAGE
            } else {
                1
            };
            tracing::error!("{e:#}");
            ExitCode::from(code)
        }
    }
}
