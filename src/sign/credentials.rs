//! mediaroute's own AWS credentials, loaded off the request path and refreshed before
//! they expire (README "Authentication").
//!
//! A download signed for the replica is signed with mediaroute's own credentials, so they
//! must be at hand on every request without waiting: [`Keys::current`] reads them without a
//! lock, and a background task reloads temporary credentials (web identity, ECS, EC2
//! instance metadata) well before they expire. The sources are AWS's own: aws-config's
//! standard chain, or a shared-credentials file, over a ring-based rustls client. A source
//! that fails leaves the credentials in use until they expire, and is tried again with
//! backoff. Secret keys and session tokens never reach a log line, an error or `Debug`.

use std::error::Error as StdError;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_config::BehaviorVersion;
use aws_config::default_provider::credentials::DefaultCredentialsChain;
use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
#[allow(deprecated)] // aws-config's names for aws-runtime's EnvConfigFiles, not a dependency here.
use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::CredentialsSource;
use crate::metrics::Metrics;

/// Longest a load after the first may take (aws-config's own timeouts are shorter).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Temporary credentials are refreshed this long before they expire, or at half their
/// lifetime when that is shorter.
const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// The first retry after a failed load; each further one waits twice as long, up to
/// [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two failed loads.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Why credentials could not be loaded. The texts name the source and aws-config's
/// reasons, never a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// The source answered with an error.
    #[error("loading AWS credentials from {from} failed: {reason}")]
    Failed {
        /// The source (file and profile, or the standard chain).
        from: String,
        /// aws-config's error and its causes.
        reason: String,
    },
    /// The source did not answer in time.
    #[error("loading AWS credentials from {from} took longer than {after:?}")]
    TimedOut {
        /// The source.
        from: String,
        /// How long mediaroute waited.
        after: Duration,
    },
    /// The source answered with credentials that have expired already.
    #[error("the AWS credentials from {from} have expired already")]
    Expired {
        /// The source.
        from: String,
    },
    /// A refresh brought back the credentials in use (or older ones) instead of new ones.
    #[error("{from} gave no newer AWS credentials than those in use")]
    NotNewer {
        /// The source.
        from: String,
    },
}

/// mediaroute's own AWS credentials: shared, read on every signed request.
///
/// Dropping the last `Arc<Keys>` stops the background refresh.
pub struct Keys {
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

struct Inner {
    current: ArcSwapOption<Credentials>,
    /// When the credentials in `current` should be refreshed (`None`: never, except on reload).
    refresh_at: Mutex<Option<Instant>>,
    /// The source in use; locked by each load so that a refresh never lands after a reload.
    source: tokio::sync::Mutex<Source>,
    /// A reload installed new credentials: the background task reschedules.
    reloaded: Notify,
    /// Counts reloads, so that a refresh that waited for one does not load again.
    generation: AtomicU64,
    metrics: Arc<Metrics>,
}

/// A credentials source and its provider, built on first use.
struct Source {
    config: CredentialsSource,
    from: String,
    provider: Option<SharedCredentialsProvider>,
}

impl Keys {
    /// Loads once (waiting at most `first_wait`, e.g. 5 s; if that fails, start anyway with
    /// no credentials and keep trying in the background), then spawns a background task
    /// that refreshes temporary credentials before they expire.
    pub async fn start(source: CredentialsSource, metrics: Arc<Metrics>, first_wait: Duration) -> Arc<Keys> {
        let inner = Arc::new(Inner {
            current: ArcSwapOption::empty(),
            refresh_at: Mutex::new(None),
            source: tokio::sync::Mutex::new(Source::new(source)),
            reloaded: Notify::new(),
            generation: AtomicU64::new(0),
            metrics,
        });
        inner.metrics.set_credentials_expiry(None);
        let failures = u32::from(inner.refresh(first_wait, 0).await.is_err());
        let task = tokio::spawn(run(Arc::clone(&inner), failures));
        Arc::new(Keys { inner, task })
    }

    /// The current credentials, or None when none were ever loaded or the last ones have
    /// expired. Lock-free (arc-swap), no allocation beyond an Arc clone.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        let guard = self.inner.current.load();
        let creds = guard.as_ref()?;
        match creds.expiry() {
            Some(expiry) if expiry <= SystemTime::now() => None,
            _ => Some(Arc::clone(creds)),
        }
    }

    /// Re-reads from `source` (SIGHUP): a new source replaces the provider; a failure keeps
    /// the old credentials (until they expire), logs and counts. Returns Err with a message
    /// that never contains a secret. Waits at most 30 s for the source.
    pub async fn reload(&self, source: CredentialsSource) -> Result<(), CredentialsError> {
        let mut fresh = Source::new(source);
        let loaded = fresh.load(LOAD_TIMEOUT).await;
        let inner = &self.inner;
        inner.metrics.credential_refresh(loaded.is_ok());
        let (creds, obtained) = loaded.inspect_err(|e| {
            tracing::warn!(error = %e, "reloading AWS credentials failed; keeping those in use until they expire");
        })?;
        // Waits for a refresh in progress, so that its result cannot replace these.
        let mut in_use = inner.source.lock().await;
        *in_use = fresh;
        inner.generation.fetch_add(1, Ordering::SeqCst);
        inner.install(creds, obtained, &in_use.from);
        drop(in_use);
        inner.reloaded.notify_one();
        Ok(())
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let guard = self.inner.current.load();
        let creds = guard.as_deref();
        f.debug_struct("Keys")
            .field("access_key_id", &creds.map(Credentials::access_key_id))
            .field("expiry", &creds.and_then(Credentials::expiry))
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// One load from the source in use, waiting at most `wait`; counted, logged, and
    /// installed when it brought usable credentials. Nothing to do when a reload has
    /// loaded since `generation`.
    async fn refresh(&self, wait: Duration, generation: u64) -> Result<(), CredentialsError> {
        let mut source = self.source.lock().await;
        if self.generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        let loaded = source.load(wait).await.and_then(|(creds, obtained)| {
            // aws-config's IMDS provider answers a failure with the last credentials it had.
            let old = self.current.load();
            match (old.as_ref().and_then(|c| c.expiry()), creds.expiry()) {
                (Some(old), Some(new)) if new <= old => Err(CredentialsError::NotNewer { from: source.from.clone() }),
                _ => Ok((creds, obtained)),
            }
        });
        self.metrics.credential_refresh(loaded.is_ok());
        if loaded.is_err() {
            // Built again for the next attempt: aws-config's providers keep what they read
            // (files, environment, the last answer) for as long as they live.
            source.provider = None;
        }
        match loaded {
            Ok((creds, obtained)) => {
                self.install(creds, obtained, &source.from);
                Ok(())
            }
            Err(e) => {
                if self.current.load().is_some() {
                    tracing::warn!(error = %e, "refreshing AWS credentials failed; keeping those in use until they expire");
                } else {
                    tracing::warn!(error = %e, "loading AWS credentials failed; requests to the replica cannot be signed yet");
                }
                Err(e)
            }
        }
    }

    /// Puts `creds` in use and schedules their refresh.
    fn install(&self, creds: Credentials, obtained: SystemTime, from: &str) {
        let refresh_at = creds.expiry().map(|expiry| {
            let lifetime = expiry.duration_since(obtained).unwrap_or_default();
            let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
            Instant::now() + left.saturating_sub(REFRESH_AHEAD.min(lifetime / 2))
        });
        let expires = creds.expiry().map_or_else(|| "never".to_string(), httpdate::fmt_http_date);
        tracing::info!(from, access_key_id = creds.access_key_id(), expires, "AWS credentials loaded");
        self.metrics.set_credentials_expiry(creds.expiry());
        self.current.store(Some(Arc::new(creds)));
        *self.refresh_at.lock().unwrap_or_else(PoisonError::into_inner) = refresh_at;
    }

    /// When the credentials in use expire, if they do.
    fn expires_at(&self) -> Option<Instant> {
        let expiry = self.current.load().as_ref()?.expiry()?;
        Some(Instant::now() + expiry.duration_since(SystemTime::now()).unwrap_or_default())
    }

    /// Drops credentials that have expired.
    fn forget_expired(&self) {
        let expired = self.current.load().as_ref().and_then(|c| c.expiry()).is_some_and(|e| e <= SystemTime::now());
        if expired {
            tracing::warn!("the AWS credentials in use have expired; requests to the replica cannot be signed");
            self.current.store(None);
            self.metrics.set_credentials_expiry(None);
            *self.refresh_at.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

/// The background task: refreshes when due, retries failures with backoff (never past the
/// expiry of the credentials in use), and starts over after a reload.
async fn run(inner: Arc<Inner>, mut failures: u32) {
    loop {
        let generation = inner.generation.load(Ordering::SeqCst);
        let wake = if failures == 0 {
            *inner.refresh_at.lock().unwrap_or_else(PoisonError::into_inner)
        } else {
            let backoff = BACKOFF_FIRST.saturating_mul(1 << (failures - 1).min(6)).min(BACKOFF_MAX);
            let retry = Instant::now() + backoff;
            Some(inner.expires_at().map_or(retry, |expiry| retry.min(expiry)))
        };
        tokio::select! {
            () = inner.reloaded.notified() => {
                failures = 0;
                continue;
            }
            () = sleep_until(wake) => {}
        }
        inner.forget_expired();
        match inner.refresh(LOAD_TIMEOUT, generation).await {
            Ok(()) => failures = 0,
            Err(_) => {
                failures = failures.saturating_add(1);
                inner.forget_expired();
            }
        }
    }
}

/// Sleeps until `when`, or for ever.
async fn sleep_until(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

impl Source {
    fn new(config: CredentialsSource) -> Source {
        let from = match (&config.file, &config.profile) {
            (Some(file), profile) => {
                format!("credentials file {} (profile {})", file.display(), profile.as_deref().unwrap_or("default"))
            }
            (None, Some(profile)) => format!("the standard AWS chain (profile {profile})"),
            (None, None) => "the standard AWS chain".to_string(),
        };
        Source { config, from, provider: None }
    }

    /// Asks the provider (built on first use) for credentials, waiting at most `wait`;
    /// the credentials and when they were obtained.
    async fn load(&mut self, wait: Duration) -> Result<(Credentials, SystemTime), CredentialsError> {
        let from = &self.from;
        let config = &self.config;
        let provider = &mut self.provider;
        let attempt = async move {
            let provider = match provider {
                Some(p) => p.clone(),
                None => provider.insert(build(config).await).clone(),
            };
            provider.provide_credentials().await
        };
        let obtained = SystemTime::now();
        let creds = match tokio::time::timeout(wait, attempt).await {
            Err(_) => return Err(CredentialsError::TimedOut { from: from.clone(), after: wait }),
            Ok(Err(e)) => return Err(CredentialsError::Failed { from: from.clone(), reason: error_chain(&e) }),
            Ok(Ok(creds)) => creds,
        };
        if creds.expiry().is_some_and(|e| e <= SystemTime::now()) {
            return Err(CredentialsError::Expired { from: from.clone() });
        }
        Ok((creds, obtained))
    }
}

/// aws-config's provider for `source`, over a ring-based rustls client.
async fn build(source: &CredentialsSource) -> SharedCredentialsProvider {
    let http =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::Ring)).build_https();
    let conf = ProviderConfig::default().with_http_client(http).with_behavior_version(Some(BehaviorVersion::latest()));
    let Some(file) = &source.file else {
        let mut chain = DefaultCredentialsChain::builder();
        if let Some(profile) = &source.profile {
            chain = chain.profile_name(profile);
        }
        return SharedCredentialsProvider::new(chain.configure(conf).build().await);
    };
    let profile = source.profile.as_deref().unwrap_or("default");
    #[allow(deprecated)]
    let files = ProfileFiles::builder().with_file(ProfileFileKind::Credentials, file).build();
    // A profile that assumes a role calls STS, which needs a region.
    let region = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::builder().profile_files(files.clone()).profile_name(profile).build())
        .region()
        .await;
    let conf = conf.with_region(region);
    SharedCredentialsProvider::new(
        ProfileFileCredentialsProvider::builder().configure(&conf).profile_files(files).profile_name(profile).build(),
    )
}

/// An error and its causes on one line, each cause once.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let text = crate::upstream::error_chain(error);
    // One log line: aws-config lists what each source of the chain said on lines of their own.
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}
