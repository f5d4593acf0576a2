//! Signal handling, installed before anything listens (README "Operating"): from then on
//! SIGHUP, SIGTERM and SIGINT are queued for the process, never its default death.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGHUP: reload the configuration.
#[derive(Debug)]
pub struct Hangups(Signal);

/// SIGTERM and SIGINT: stop gracefully.
#[derive(Debug)]
pub struct Stops {
    term: Signal,
    int: Signal,
}

/// Installs the handlers (inside a Tokio runtime). A signal that arrives before anyone
/// waits for it is kept and delivered to the first wait.
pub fn install() -> std::io::Result<(Hangups, Stops)> {
    let hup = signal(SignalKind::hangup())?;
    let term = signal(SignalKind::terminate())?;
    let int = signal(SignalKind::interrupt())?;
    Ok((Hangups(hup), Stops { term, int }))
}

impl Hangups {
    /// Waits for the next SIGHUP; `None` if signals can no longer be received.
    pub async fn next(&mut self) -> Option<()> {
        self.0.recv().await
    }
}

impl Stops {
    /// Waits for SIGTERM or SIGINT.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
