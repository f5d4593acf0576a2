//! The `mediaroute` command: parse the CLI, set up logging, hand off to the server.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mediaroute::access_line::AccessLayer;
use mediaroute::config::{self, Config};
use mediaroute::log_writer::{self, LogGuard};
use mediaroute::route::ReplicationStatus;
use mediaroute::signals::{self, Stops};
use mediaroute::{demo, duration, explain, server};
use sd_notify::NotifyState;

// glibc malloc showed up at ~6% of CPU per small request, and fragments under many
// concurrent downloads; mimalloc is faster and returns memory more readily.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streaming reverse proxy that serves studio media from the S3 replica region when allowed.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (for the default `run` command).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default command).
    Run,
    /// Validate the config and users file; exit 0, or print every error and exit 1.
    Check,
    /// Print where a request would go and why, without serving.
    Explain {
        /// User name; leave out for an anonymous request.
        #[arg(long)]
        user: Option<String>,
        /// Client address.
        #[arg(long)]
        ip: IpAddr,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request path, with an optional ?query (default: an object in the primary bucket).
        #[arg(long)]
        path: Option<String>,
        /// Object age, e.g. 10m or 2d; leave out to assume older than the delay.
        #[arg(long, value_parser = parse_age)]
        age: Option<Duration>,
        /// The object's x-amz-replication-status as the primary would send it.
        #[arg(long, value_parser = parse_status)]
        status: Option<ReplicationStatus>,
        /// Pretend the replica is marked down.
        #[arg(long)]
        replica_down: bool,
    },
    /// Start two local upstreams with sample media and the proxy on the example config.
    Demo,
}

fn parse_status(s: &str) -> Result<ReplicationStatus, String> {
    ReplicationStatus::parse(&s.to_ascii_uppercase())
        .ok_or_else(|| format!("{s:?} is not a replication status: PENDING, COMPLETED or FAILED"))
}

fn parse_age(s: &str) -> Result<Duration, String> {
    duration::parse_duration(s).ok_or_else(|| format!("{s:?} is not a duration (e.g. 10m, 2h, 3d)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config.as_deref()),
        Command::Check => return check(cli.config.as_deref()),
        Command::Explain { user, ip, method, path, age, status, replica_down } => with_config(cli.config.as_deref())
            .map(|cfg| {
                let q = explain::Question { user, ip, method, path, age, status, replica_down };
                print!("{}", explain::explain(&cfg, &q));
            }),
        Command::Demo => run_demo(cli.config.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mediaroute: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn with_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let path = path.context("--config PATH is required")?;
    config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))
}

fn check(path: Option<&Path>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("mediaroute: --config PATH is required");
        return ExitCode::FAILURE;
    };
    match config::load(path) {
        Ok(cfg) => {
            for u in &cfg.overridden_users {
                println!("warning: user {u:?} is listed in both users_file and [users]; [users] wins");
            }
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            println!(
                "{}: ok ({} users, {} replica networks, delay {})",
                path.display(),
                cfg.users.len(),
                cfg.replication.networks.len(),
                duration::format_duration(cfg.replication.delay)
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.0.len());
            ExitCode::FAILURE
        }
    }
}

/// Installs the log: lines go through the buffered writer (README "Access log"), which
/// writes everything logged so far when the returned guard is dropped.
fn init_logging(cfg: &Config) -> anyhow::Result<LogGuard> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::filter_fn;
    use tracing_subscriber::prelude::*;
    // rustls warns once per handshake about what clients send (an IP address as SNI, from
    // wrk, curl to an IP and the like): handshake trouble is counted instead (README "TLS").
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{},rustls=error", cfg.log.level)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let settings = log_writer::Settings { capacity: cfg.log.buffer_size as usize, interval: LOG_FLUSH_EVERY };
    let (writer, guard) =
        log_writer::start(Box::new(std::io::stderr()), settings).context("cannot start the log writer thread")?;
    // Access lines have their own formatter; every other line is tracing_subscriber's.
    let is_access = |m: &tracing::Metadata<'_>| m.target() == log_writer::ACCESS_TARGET;
    let access = AccessLayer::new(writer.clone(), cfg.log.json).with_filter(filter_fn(is_access));
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer);
    let fmt = if cfg.log.json { fmt.json().flatten_event(true).boxed() } else { fmt.boxed() };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(filter_fn(move |m| !is_access(m))))
        .with(access)
        .try_init()
        .context("cannot install the log")?;
    Ok(guard)
}

/// The longest a log line waits in the buffer (nginx's `flush=1s`).
const LOG_FLUSH_EVERY: Duration = Duration::from_secs(1);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // One CPU (e.g. pinned with taskset or a CPU quota of 1): a single-threaded runtime
    // skips the cross-thread wake-ups of the multi-threaded one (~10% more requests/s).
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build().context("cannot start the async runtime")
}

fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let mut log = None;
    let served = runtime.block_on(async {
        // First of all, even before the config is read: from here on a SIGHUP (a
        // `systemctl reload` right after start) is a reload, and a SIGTERM a clean stop.
        let (hangups, mut stops) = signals::install().context("cannot install signal handlers")?;
        let cfg = with_config(path)?;
        log = Some(init_logging(&cfg)?);
        raise_file_limit();
        let running = server::start(cfg).await?;
        tokio::spawn(server::reload::on_hangups(hangups, Arc::clone(&running.proxy), notify_reload));
        notify(&[NotifyState::Ready]);
        stop(&mut stops, running).await;
        Ok(())
    });
    finish(runtime, log);
    served
}

/// Drops the runtime, then the log's guard: connections that the shutdown grace cut end
/// with the runtime and log their lines then; the guard writes every line out
/// (README "Access log").
fn finish(runtime: tokio::runtime::Runtime, log: Option<LogGuard>) {
    drop(runtime);
    drop(log);
}

/// Raises the soft limit of open files to the hard one: every download holds two
/// descriptors, and the soft default (often 1024) is far below what the hard limit allows.
fn raise_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), hard) = (limit.current, limit.maximum) else {
        return;
    };
    // `None` for the hard limit means unlimited; the kernel still caps at fs.nr_open.
    let target = hard.unwrap_or(1 << 20);
    if target <= current {
        tracing::info!(soft = current, "open file limit");
        return;
    }
    match setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(target), maximum: hard }) {
        Ok(()) => tracing::info!(from = current, to = target, "open file limit raised to the hard limit"),
        Err(e) => tracing::warn!(soft = current, error = %e, "cannot raise the open file limit"),
    }
}

/// Waits for SIGTERM/SIGINT, then drains and stops the server.
async fn stop(stops: &mut Stops, running: server::Running) {
    stops.wait().await;
    notify(&[NotifyState::Stopping]);
    tracing::info!("stopping: finishing in-flight requests");
    running.shutdown().await;
    tracing::info!("stopped");
}

/// Tells systemd (`Type=notify`) about state changes; a no-op outside systemd.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// RELOADING=1 before a reload, READY=1 after it.
fn notify_reload(starting: bool) {
    if starting {
        // systemd requires MONOTONIC_USEC with RELOADING=1.
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(e) => tracing::debug!(error = %e, "cannot read the monotonic clock"),
        }
    } else {
        notify(&[NotifyState::Ready]);
    }
}

fn run_demo(path: Option<&Path>) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let mut log = None;
    let served = runtime.block_on(async {
        let (mut hangups, mut stops) = signals::install().context("cannot install signal handlers")?;
        let cfg = demo::demo_config(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
        log = Some(init_logging(&cfg)?);
        let d = demo::start(cfg).await?;
        // The demo's upstreams and ports are made at start: there is no file to re-read.
        tokio::spawn(async move {
            while hangups.next().await.is_some() {
                tracing::warn!("the demo does not reload: copy conf/mediaroute.toml and use `mediaroute run` for that");
            }
        });
        println!("mediaroute demo: proxy on http://{}", d.proxy.addr);
        if let Some(tls) = d.proxy.tls_addr {
            println!(
                "  TLS on https://{tls} (the demo certificate is for localhost: curl --cacert conf/tls/demo-ca.pem)"
            );
        }
        print!("{}", d.upstream_lines());
        if let Some(admin) = d.proxy.admin_addr {
            println!("  admin on http://{admin} (/metrics /healthz /readyz /config)");
        }
        for moved in &d.moved {
            println!("  ({moved})");
        }
        println!();
        println!("Try these (answers below each were just fetched):\n");
        print!("{}", d.tour().await);
        println!("Press Ctrl-C to stop.");
        let demo::Demo { proxy, primary, replica, .. } = d;
        stop(&mut stops, proxy).await;
        drop((primary, replica));
        Ok(())
    });
    finish(runtime, log);
    served
}
