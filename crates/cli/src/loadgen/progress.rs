//! The progress bar on stderr while a run goes: elapsed against the duration (or
//! requests against the amount) and the request rate so far. Hidden when stderr is not
//! a terminal or with `--no-progress`, so piped output stays clean.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::client::Shared;
use super::plan::Plan;

/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(200);

/// A running progress display; finishing or dropping it clears it.
#[derive(Debug)]
pub(super) struct Progress {
    bar: ProgressBar,
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts the display for `plan`, reading counts from `shared`.
    pub fn start(plan: &Plan, shared: Arc<Shared>) -> Self {
        if !plan.progress || !std::io::stderr().is_terminal() {
            return Self {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        // With a duration the bar fills with time (in ms); with only an amount, with
        // finished attempts.
        let by_time = plan.duration;
        let length = match (by_time, plan.amount) {
            (Some(d), _) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            (None, Some(n)) => n,
            (None, None) => 0,
        };
        let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{bar:40.cyan/blue} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        let total = by_time.map(|d| humantime::format_duration(d).to_string());
        let amount = plan.amount;
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                let mut every = tokio::time::interval(TICK);
                loop {
                    every.tick().await;
                    let elapsed = Instant::now().saturating_duration_since(shared.start);
                    let finished = shared.finished.load(Ordering::Relaxed);
                    let rate = if elapsed.is_zero() {
                        0.0
                    } else {
                        finished as f64 / elapsed.as_secs_f64()
                    };
                    match &total {
                        Some(total) => {
                            bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(0));
                            bar.set_message(format!(
                                "{:.1}s / {total}  {finished} requests  {rate:.0} req/s",
                                elapsed.as_secs_f64()
                            ));
                        }
                        None => {
                            bar.set_position(finished);
                            bar.set_message(format!(
                                "{finished}/{}  {:.1}s  {rate:.0} req/s",
                                amount.unwrap_or(0),
                                elapsed.as_secs_f64()
                            ));
                        }
                    }
                }
            }
        });
        Self {
            bar,
            ticker: Some(ticker),
        }
    }

    /// Stops the display and clears its line.
    pub fn finish(self) {
        drop(self);
    }
}

/// Also on an early return, so the ticker never outlives the run.
impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        self.bar.finish_and_clear();
    }
}
