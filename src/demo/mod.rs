//! `mediaroute demo`: two local upstreams with sample media, the proxy in front of them
//! on the example config, and curl lines that show each routing outcome.

pub mod store;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::config::{self, Config, ConfigErrors};
use crate::server::{self, Running};
use store::{Store, StoreServer};

/// The example config, also shipped as `conf/mediaroute.toml`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../conf/mediaroute.toml");
/// The example users file, also shipped as `conf/users.toml`.
pub const EXAMPLE_USERS: &str = include_str!("../../conf/users.toml");

/// Errors starting the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The example config does not parse.
    #[error("the example config is invalid:\n{0}")]
    Config(#[from] ConfigErrors),
    /// A demo listener could not bind, even on a free port.
    #[error("cannot start the demo {name} on {addr}: {source}")]
    Bind {
        /// `primary`, `replica`, `proxy` or `admin`.
        name: &'static str,
        /// The address from the config.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config's upstream URL is not a local `host:port`.
    #[error("the demo needs {0}.url to be a local http://host:port address")]
    NotLocal(&'static str),
    /// The proxy could not start.
    #[error(transparent)]
    Server(#[from] server::ServerError),
}

/// The sample objects: (path, on the replica too, age).
const SAMPLES: [(&str, bool, Duration); 3] = [
    ("shots/sh010/plate.mov", true, Duration::from_secs(3 * 86_400)),
    ("shots/sh020/edit_v3.mov", true, Duration::from_secs(120)),
    ("archive/pilot/final.mov", false, Duration::from_secs(400 * 86_400)),
];

/// Everything the demo started; dropping it stops the upstreams.
#[derive(Debug)]
pub struct Demo {
    /// The proxy.
    pub proxy: Running,
    /// The demo primary.
    pub primary: StoreServer,
    /// The demo replica.
    pub replica: StoreServer,
    /// The config the proxy runs on.
    pub config: Config,
    /// Configured ports that were taken, and the free ports used instead.
    pub moved: Vec<String>,
}

/// Loads the demo config: the file at `path` if given, else the embedded example.
pub fn demo_config(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    match path {
        Some(p) => config::load(p),
        None => {
            let name = PathBuf::from("conf/mediaroute.toml");
            config::parse(&name, EXAMPLE_CONFIG, &|_| Ok(EXAMPLE_USERS.to_string()))
        }
    }
}

/// Starts both sample upstreams and the proxy. A configured port that is taken is
/// replaced by a free one (listed in [`Demo::moved`]), so the demo runs on a busy machine.
pub async fn start(mut cfg: Config) -> Result<Demo, DemoError> {
    let mut moved = Vec::new();
    let primary = start_store(&cfg, "primary", &mut moved).await?;
    let replica = start_store(&cfg, "replica", &mut moved).await?;
    for (url, addr) in [(&mut cfg.primary.url, primary.addr), (&mut cfg.replica.url, replica.addr)] {
        if let Ok(u) = format!("http://{addr}").parse() {
            *url = u;
        }
    }
    let now = SystemTime::now();
    let pb = cfg.primary.bucket.clone().unwrap_or_else(|| "media".into());
    let rb = cfg.replica.bucket.clone().unwrap_or_else(|| pb.clone());
    for (key, replicated, age) in SAMPLES {
        let at = now - age;
        primary.store.put(&format!("/{pb}/{key}"), format!("{key} from the PRIMARY region\n"), at);
        if replicated {
            replica.store.put(&format!("/{rb}/{key}"), format!("{key} from the REPLICA region\n"), at);
        }
    }
    let mut bind = async |addr: Option<SocketAddr>, name| match addr {
        Some(a) => bind_or_free(a, name, &mut moved).await.map(Some),
        None => Ok(None),
    };
    let bound = server::Bound {
        proxy: bind(cfg.listen.addr, "proxy").await?,
        tls: bind(cfg.listen.tls_addr, "TLS proxy").await?,
        admin: bind(cfg.listen.admin_addr, "admin").await?,
    };
    let proxy = server::start_on(cfg.clone(), bound).await?;
    Ok(Demo { proxy, primary, replica, config: cfg, moved })
}

/// Binds `addr`, or a free port on the same host when `addr` is taken.
async fn bind_or_free(addr: SocketAddr, name: &'static str, moved: &mut Vec<String>) -> Result<TcpListener, DemoError> {
    let failed = |source| DemoError::Bind { name, addr: addr.to_string(), source };
    match TcpListener::bind(addr).await {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && addr.port() != 0 => {
            let l = TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await.map_err(failed)?;
            let now = l.local_addr().map_err(failed)?;
            moved.push(format!("{name}: port {} is taken, using {} instead", addr.port(), now.port()));
            Ok(l)
        }
        Err(e) => Err(failed(e)),
    }
}

async fn start_store(cfg: &Config, name: &'static str, moved: &mut Vec<String>) -> Result<StoreServer, DemoError> {
    let url = if name == "primary" { &cfg.primary.url } else { &cfg.replica.url };
    let authority = url.authority().ok_or(DemoError::NotLocal(name))?;
    let addr: SocketAddr = authority.as_str().parse().map_err(|_| DemoError::NotLocal(name))?;
    if url.scheme_str() != Some("http") || !addr.ip().is_loopback() {
        return Err(DemoError::NotLocal(name));
    }
    let listener = bind_or_free(addr, name, moved).await?;
    store::serve_on(listener, Store::new(name)).map_err(|source| DemoError::Bind {
        name,
        addr: addr.to_string(),
        source,
    })
}

/// One curl line of the tour: what it shows and the request it makes.
struct Step {
    what: &'static str,
    user: Option<&'static str>,
    forwarded_for: Option<&'static str>,
    method: &'static str,
    path: String,
}

impl Demo {
    fn steps(&self) -> Vec<Step> {
        let b = self.config.primary.bucket.clone().unwrap_or_else(|| "media".into());
        let [old, young, never] = SAMPLES.map(|(k, _, _)| format!("/{b}/{k}"));
        let step = |what, user, xff, method, path: &str| Step {
            what,
            user,
            forwarded_for: xff,
            method,
            path: path.to_string(),
        };
        let mut steps = vec![
            step("alice (yes): replicated media comes from the replica", Some("alice"), None, "GET", &old),
            step("alice (yes): media younger than the delay stays on the primary", Some("alice"), None, "GET", &young),
            step(
                "alice (yes): never replicated: the replica misses, the primary answers",
                Some("alice"),
                None,
                "GET",
                &never,
            ),
            step("bob (auto) inside replication.networks: replica", Some("bob"), Some("10.20.3.4"), "GET", &old),
            step("bob (auto) outside replication.networks: primary", Some("bob"), Some("198.51.100.7"), "GET", &old),
            step("carol (no): always the primary", Some("carol"), None, "GET", &old),
            step("anonymous: default_mode", None, None, "GET", &old),
            step("uploads always go to the primary", Some("alice"), None, "PUT", &format!("/{b}/uploads/new.mov")),
        ];
        if self.config.primary.bucket.is_some() {
            steps.push(step("another bucket is refused", Some("alice"), None, "GET", "/other-bucket/file.mov"));
        }
        steps
    }

    /// One line per upstream: where it listens and what it holds.
    pub fn upstream_lines(&self) -> String {
        let holds = |bucket: &Option<String>| match bucket {
            Some(b) => format!("bucket {b}"),
            None => "bucket-bound: the path is the key".to_string(),
        };
        format!(
            "  primary upstream on http://{} ({})\n  replica upstream on http://{} ({})\n",
            self.primary.addr,
            holds(&self.config.primary.bucket),
            self.replica.addr,
            holds(&self.config.replica.bucket)
        )
    }

    /// The tour as curl lines, with what the proxy answered to each.
    pub async fn tour(&self) -> String {
        let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let base = format!("http://{}", self.proxy.addr);
        let mut out = String::new();
        for s in self.steps() {
            let mut curl = String::from("curl -s");
            if s.method == "PUT" {
                curl.push_str(" -X PUT --data-binary 'new media'");
            }
            if let Some(u) = s.user {
                curl.push_str(&format!(" -H 'X-Forwarded-User: {u}'"));
            }
            if let Some(x) = s.forwarded_for {
                curl.push_str(&format!(" -H 'X-Forwarded-For: {x}'"));
            }
            curl.push_str(&format!(" -D - {base}{}", s.path));
            let answer = self.ask(&client, &base, &s).await;
            out.push_str(&format!("# {}\n{curl}\n#   -> {answer}\n\n", s.what));
        }
        out
    }

    async fn ask(
        &self,
        client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<bytes::Bytes>>,
        base: &str,
        s: &Step,
    ) -> String {
        let mut req = http::Request::builder().method(s.method).uri(format!("{base}{}", s.path));
        if let Some(u) = s.user {
            req = req.header("x-forwarded-user", u);
        }
        if let Some(x) = s.forwarded_for {
            req = req.header("x-forwarded-for", x);
        }
        let Ok(req) = req.body(Empty::new()) else {
            return "bad request".into();
        };
        match client.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                let (up, why) = (h("x-mediaroute-upstream"), h("x-mediaroute-reason"));
                let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let text = String::from_utf8_lossy(&body);
                let first = text.lines().find(|l| !l.starts_with("<?xml")).unwrap_or("").trim();
                format!("{status} from {up} (reason {why}) {first}")
            }
            Err(e) => format!("failed: {e}"),
        }
    }
}
