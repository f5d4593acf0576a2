//! Reload orchestration: re-read the config off the request workers, swap the table,
//! and bring the rest of the proxy in line (README "Check, then reload").

use std::sync::Arc;

use crate::config::{ConfigError, ConfigErrors};
use crate::proxy::Proxy;
use crate::server::CREDENTIALS_FIRST_WAIT;
use crate::sign::credentials::Keys;
use crate::signals::Hangups;
use crate::table::{Reloaded, Upstream};

/// Reloads the config, counts the result, and forgets what the new table makes stale.
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
            let after = proxy.tables().current();
            if let Some(cert) = &after.server_cert {
                // New handshakes get it from the table; connections already open keep theirs.
                proxy.metrics().set_certificate_expiry(cert.not_after);
            }
            if !before.primary.same_place(&after.primary) {
                // Facts were learned from the old primary; they say nothing of the new one.
                proxy.facts().clear();
            }
            let trusts = |t: &crate::table::RoutingTable| {
                [Upstream::Primary, Upstream::Replica].iter().any(|u| t.target(*u).ca_file.is_some())
            };
            if trusts(&before) || trusts(&after) {
                // The CA files were read anew: connections verified under the old ones
                // must not be reused (README "HTTPS upstreams").
                proxy.upstreams().renew_pools();
            }
            for u in [Upstream::Primary, Upstream::Replica] {
                let (old, new) = (before.target(u), after.target(u));
                if old.scheme != new.scheme || old.authority != new.authority {
                    // What was learned about the old address says nothing about the new one.
                    proxy.upstreams().health(u).reset();
                }
            }
            if let Some(source) = r.credentials.clone() {
                reload_credentials(proxy, source).await;
            }
            tracing::info!(generation = r.generation, path = %proxy.tables().path().display(), "configuration reloaded");
            for w in &r.warnings {
                tracing::warn!("{w}");
            }
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

/// Re-reads mediaroute's own credentials (README "Authentication"): a failure keeps the
/// old ones until they expire; the credentials module logs and counts it.
async fn reload_credentials(proxy: &Proxy, source: crate::config::CredentialsSource) {
    match proxy.keys() {
        Some(keys) => {
            let _ = keys.reload(source).await;
        }
        None => {
            let keys = Keys::start(source, Arc::clone(proxy.metrics()), CREDENTIALS_FIRST_WAIT).await;
            proxy.set_keys(keys);
        }
    }
}

/// Reloads on every SIGHUP until signals end; `around` is told before (`true`) and after.
pub async fn on_hangups(mut hangups: Hangups, proxy: Arc<Proxy>, around: impl Fn(bool) + Send + 'static) {
    while hangups.next().await.is_some() {
        around(true);
        let _ = reload(&proxy).await;
        around(false);
    }
}
