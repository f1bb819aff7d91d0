//! One root cancellation token per process, fired by SIGINT or SIGTERM.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT or SIGTERM.
///
/// Must be called inside a tokio runtime. Child tokens taken from it let each part of a
/// process stop in its own order.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let fire = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            () = fire.cancelled() => {}
        }
        fire.cancel();
    });
    Ok(token)
}

/// Cancels `token` when standard input reaches end-of-file.
///
/// `breakwater up` gives each child a pipe as stdin and never writes to it; if the
/// supervisor dies without a chance to stop its children (SIGKILL, crash), the pipe
/// closes and the child shuts itself down instead of living on as an orphan.
///
/// The read runs on a detached OS thread rather than `tokio::io::stdin`, whose blocking
/// read would keep the runtime (and so the process) from exiting after shutdown.
pub fn cancel_on_stdin_eof(token: CancellationToken) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            tracing::info!("supervisor went away (stdin closed); shutting down");
            token.cancel();
        })?;
    Ok(())
}
