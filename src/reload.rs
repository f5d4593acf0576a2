//! The routing-table holder and the SIGHUP reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::config::{self, Config, ConfigError, ConfigErrors};
use crate::proxy::Proxy;
use crate::table::{RoutingTable, Upstream};

/// Holds the current routing table; requests load it once, reloads swap it whole.
#[derive(Debug)]
pub struct Tables {
    current: ArcSwap<RoutingTable>,
    path: PathBuf,
    generation: AtomicU64,
    started_with: Config,
}

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The new table's generation.
    pub generation: u64,
    /// Settings that changed in the file but need a restart to take effect.
    pub needs_restart: Vec<&'static str>,
}

impl Tables {
    /// Starts with the table built from `cfg` (generation 1).
    pub fn new(cfg: Config) -> Tables {
        Tables {
            current: ArcSwap::from_pointee(RoutingTable::build(&cfg, 1)),
            path: cfg.path.clone(),
            generation: AtomicU64::new(1),
            started_with: cfg,
        }
    }

    /// The table for one request; keep it for the whole request.
    pub fn current(&self) -> Arc<RoutingTable> {
        self.current.load_full()
    }

    /// The config file reloads read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the config file and swaps in a new table; on error the old one stays.
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let cfg = config::load(&self.path)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let table = RoutingTable::build(&cfg, generation);
        self.current.store(Arc::new(table));
        Ok(Reloaded { generation, needs_restart: restart_only_changes(&self.started_with, &cfg) })
    }
}

/// Settings read only at start-up that differ between two configs.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.limits != new.limits {
        changed.push("limits");
    }
    if old.health != new.health {
        changed.push("health");
    }
    if old.log != new.log {
        changed.push("log");
    }
    changed
}

/// Reloads the config off the request workers, counts the result, forgets cached ages.
pub async fn reload(proxy: &Proxy) -> Result<Reloaded, ConfigErrors> {
    let tables = Arc::clone(proxy.tables());
    let before = tables.current();
    // Building a large table is CPU work: keep it off the request workers.
    let result = match tokio::task::spawn_blocking(move || tables.reload()).await {
        Ok(r) => r,
        Err(e) => {
            let error = ConfigError {
                file: proxy.tables().path().to_path_buf(),
                pos: None,
                key: None,
                message: format!("reload task failed: {e}"),
            };
            Err(ConfigErrors(vec![error]))
        }
    };
    match &result {
        Ok(r) => {
            proxy.metrics().reload(Some(r.generation));
            proxy.ages().clear();
            let after = proxy.tables().current();
            for u in [Upstream::Primary, Upstream::Replica] {
                let (old, new) = (before.target(u), after.target(u));
                if old.scheme != new.scheme || old.authority != new.authority {
                    // What was learned about the old address says nothing about the new one.
                    proxy.upstreams().health(u).reset();
                }
            }
            tracing::info!(generation = r.generation, path = %proxy.tables().path().display(), "configuration reloaded");
            if !r.needs_restart.is_empty() {
                tracing::warn!(sections = ?r.needs_restart, "changed settings need a restart to take effect");
            }
        }
        Err(errors) => {
            proxy.metrics().reload(None);
            for e in &errors.0 {
                tracing::error!(error = %e, "reload rejected; still serving the previous configuration");
            }
        }
    }
    result
}

/// Reloads on every SIGHUP until the process ends; `around` is told before and after.
#[cfg(unix)]
pub async fn sighup_loop(proxy: Arc<Proxy>, around: impl Fn(bool) + Send + 'static) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload is disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        around(true);
        let _ = reload(&proxy).await;
        around(false);
    }
}
