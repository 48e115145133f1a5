//! `deployd`: runs the instances of services on one host, rolls out new
//! versions with health checks, and serves it all as a file namespace.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration.
//! - [`runtime`]: the one loop around the decision core
//!   (`deployd_lib::core`, which owns every service's state machine and
//!   what is decided across services): it reads what decisions need and
//!   carries out the effects the core returns.
//! - [`cluster`]: this host's link to etcd in a cluster (`[cluster]` in
//!   the configuration): membership and lease, the watch that keeps the
//!   host's copy of the keys, its writes, commands to the leader, and the
//!   leader's task when this host leads. `runtime::cluster` applies what
//!   the keys say to this host.
//! - [`process`]: spawning, reaping and signalling child processes, and
//!   tracking what they start (the guard, cgroups).
//! - [`logfile`]: instances' output and access logs, copied to files.
//! - [`probe`]: health probes (http, tcp, exec).
//! - [`proxy`]: the public ports: routing requests and connections to
//!   ready instances, draining the ones routed out.
//! - [`short`]: telling deployd's own shortages (descriptors, memory,
//!   disk) from an instance's failures.
//! - [`store`]: the state directory: atomic records, history, event logs.
//! - [`view`]: the snapshots the engine publishes for the namespace.
//! - [`fs`]: the namespace, served through FUSE.
//! - [`logging`]: deployd's own log, fit for a terminal or the journal.
//! - [`handoff`]: what deployd passes to itself across `execve` when it
//!   replaces itself (`reexec`), keeping every instance.
//! - [`inherit`]: what crosses an `execve`: deployd's own variables, which
//!   instances do not inherit, and descriptors passed to the next deployd.
//!
//! Threads: the main thread starts every instance (and is the one that
//! calls `execve` for `reexec`); the runtime, the namespace and the probes
//! run on a tokio runtime on other threads, the public ports on their own.
//!
//! No process-wide mutable state but what the C library and the kernel
//! keep (the signal dispositions, the open-file limit): what was global
//! (the guard's pipe, the cgroups, the passed sockets, the handoff, the
//! proxies' runtime) is made here and handed to what uses it.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT or SIGHUP), 1 when it
//! cannot run (bad configuration, mount failed, state directory locked).

mod cluster;
mod config;
mod fs;
mod handoff;
mod inherit;
mod logfile;
mod logging;
mod metrics;
mod notify;
mod probe;
mod process;
mod proxy;
mod runtime;
mod short;
mod store;
mod systemd;
mod view;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::fs::{Fs, Waiters};
use crate::handoff::Handoff;
use crate::process::{Children, Tracking};
use crate::proxy::Proxies;
use crate::runtime::{Hooks, Outcome, Parts, Runtime};
use crate::store::Store;
use crate::view::Views;

#[derive(Parser)]
#[command(
    name = "deployd",
    version,
    about = "Deployment server with a file namespace"
)]
struct Args {
    /// Configuration file
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Tells the deployd of this configuration to replace itself with the
    /// binary now installed, keeping every instance (`reexec` on its root
    /// ctl, wherever it is mounted), and waits for it to be back: the
    /// systemd unit's `ExecReload`.
    Reexec,
    /// Writes deployd's manual page (deployd.8) into DIR
    Man {
        /// Where to write it (made if missing)
        dir: PathBuf,
    },
}

/// `deployd man DIR`.
fn man(dir: &Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let page = clap_mangen::Man::new(Args::command()).section("8");
    let mut out = Vec::new();
    page.render(&mut out)?;
    std::fs::write(dir.join("deployd.8"), out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Man { dir }) = &args.command {
        return match man(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("deployd: {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Reexec) = args.command {
        return match reexec_running(&args.config) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("deployd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match try_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deployd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(args: &Args) -> Result<(), Error> {
    // While deployd has one thread: the guard is forked.
    let guard = process::guard::start();
    // Before anything could start a process that would inherit them.
    let handoff = handoff::receive();
    let handed: Vec<std::os::fd::RawFd> = match &handoff {
        Ok(Some(h)) => h.listeners.clone(),
        _ => Vec::new(),
    };
    let (passed, ports, problems) = proxy::activation::adopt(&handed);
    // Where this binary is now: an upgrade puts the next one there.
    let exe = std::env::current_exe().ok();
    let config = Config::load(&args.config)?;
    if let Some(problem) = logging::init(config.log_level, config.log_json) {
        tracing::warn!("{problem}");
    }
    let guard = guard
        .inspect_err(|p| tracing::warn!("{}: {p}", process::guard::NAME))
        .ok();
    let handoff = handoff
        .inspect_err(|p| tracing::warn!("handoff: {p}; starting as after a restart"))
        .ok()
        .flatten();
    for p in problems {
        tracing::warn!("socket activation: {p}; left alone");
    }
    if !ports.is_empty() && handed.is_empty() {
        tracing::info!("socket activation: ports {ports:?} passed; kept across restarts");
    } else if !ports.is_empty() {
        tracing::info!("ports {ports:?} handed on by the deployd this one replaced");
    }
    process::raise_fd_limit();
    process::become_subreaper();
    // After `reexec`, the instances handed on are in the tree: kept.
    let keep = handoff.is_some();
    let cgroups = match process::cgroup::init(keep) {
        Ok(c) => {
            tracing::debug!("instances' cgroups under {}", c.tree().display());
            Some(c)
        }
        Err(e) => {
            tracing::info!(
                "cgroup v2: {e}; what an instance starts is tracked by its process group only"
            );
            None
        }
    };
    let tracking = Arc::new(Tracking::new(guard, cgroups));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Thread("the runtime", e))?;
    // Instances are started on this thread, the one that also replaces
    // deployd on `reexec` (see process::Spawner); the rest runs on another.
    let (spawner, jobs) = process::Spawner::channel();
    let config = Arc::new(config);
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .spawn({
            let (config, exe, tracking) = (config.clone(), exe.clone(), tracking.clone());
            move || rt.block_on(run(config, spawner, exe, tracking, passed, handoff))
        })
        .map_err(|e| Error::Thread("the engine thread", e))?;
    jobs.serve();
    let handoff = engine.join().map_err(|_| Error::Panicked)??;
    match (handoff, exe) {
        (Some(path), Some(exe)) => Err(reexec(&exe, &path, &tracking)),
        _ => Ok(()),
    }
}

/// `deployd reexec`: writes `reexec` to the root ctl of the deployd that
/// runs with `config`, then waits (up to a minute) for the namespace of
/// the deployd it becomes: its root ctl's time is when it started.
fn reexec_running(config: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let ctl = config.mountpoint.join("ctl");
    let started_at = || std::fs::metadata(&ctl).and_then(|m| m.modified()).ok();
    let old = started_at();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ctl)
        .map_err(|e| format!("{}: {e} (is deployd running?)", ctl.display()))?;
    let written = (&f).write(b"reexec\n");
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
    drop(f);
    if let Err(e) = written {
        return Err(match answer.strip_prefix("error: ") {
            Some(why) => format!("reexec refused: {why}"),
            None => format!("reexec: {e}"),
        });
    }
    let since = std::time::Instant::now();
    while since.elapsed() < std::time::Duration::from_secs(60) {
        let now = started_at();
        if now.is_some() && now != old {
            return Ok(format!(
                "deployd: {}; back in {:.2}s",
                answer.strip_prefix("ok: ").unwrap_or(&answer),
                since.elapsed().as_secs_f64()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(format!(
        "not back at {} after 60s",
        config.mountpoint.display()
    ))
}

/// Why deployd cannot run (exit 1).
#[derive(Debug)]
enum Error {
    /// The configuration file.
    Config(config::ConfigError),
    /// The state directory.
    Store(store::StoreError),
    /// The mountpoint cannot be used.
    Mountpoint(PathBuf, MountpointError),
    /// The mount failed or could not be undone.
    Mount(&'static str, PathBuf, std::io::Error),
    /// A thread could not start.
    Thread(&'static str, std::io::Error),
    /// The engine thread panicked.
    Panicked,
    /// The handoff could not be written.
    Handoff(std::io::Error),
    /// execve of the new binary failed.
    Exec(PathBuf, std::io::Error),
    Cluster(cluster::JoinError),
    /// The metrics address cannot be listened on.
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// What is wrong with a mountpoint.
#[derive(Debug)]
enum MountpointError {
    /// Another deployd's mount is on it.
    Mounted,
    /// It is a file.
    NotADirectory,
    /// It could not be made.
    Create(std::io::Error),
    /// A dead mount on it could not be detached.
    Detach(std::io::Error),
    /// The OS said so.
    Os(std::io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Store(e) => write!(f, "{e}"),
            Error::Mountpoint(p, MountpointError::Mounted) => write!(
                f,
                "{} is already mounted (is another deployd running?)",
                p.display()
            ),
            Error::Mountpoint(p, MountpointError::NotADirectory) => {
                write!(f, "{} is not a directory", p.display())
            }
            Error::Mountpoint(p, MountpointError::Create(e)) => {
                write!(f, "cannot create {}: {e}", p.display())
            }
            Error::Mountpoint(p, MountpointError::Detach(e)) => {
                write!(f, "cannot detach the dead mount on {}: {e}", p.display())
            }
            Error::Mountpoint(p, MountpointError::Os(e)) => write!(f, "{}: {e}", p.display()),
            Error::Mount(what, p, e) => write!(f, "cannot {what} {}: {e}", p.display()),
            Error::Thread(what, e) => write!(f, "cannot start {what}: {e}"),
            Error::Panicked => f.write_str("the engine thread panicked"),
            Error::Handoff(e) => write!(f, "cannot write the handoff: {e}"),
            Error::Exec(p, e) => write!(f, "cannot run {}: {e}", p.display()),
            Error::Cluster(e) => write!(f, "{e}"),
            Error::Metrics(a, e) => write!(f, "metrics: cannot listen on {a}: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<config::ConfigError> for Error {
    fn from(e: config::ConfigError) -> Error {
        Error::Config(e)
    }
}

impl From<store::StoreError> for Error {
    fn from(e: store::StoreError) -> Error {
        Error::Store(e)
    }
}

/// Replaces deployd with `exe`, same arguments, same pid, telling it where
/// the handoff is. Returns only if execve failed: deployd then exits, and
/// its instances with it (a later start restores them).
fn reexec(exe: &Path, handoff: &Path, tracking: &Tracking) -> Error {
    use std::os::unix::process::CommandExt;
    tracing::info!("replacing deployd with {}", exe.display());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1));
    // The sockets systemd passed are in the handoff now, at other numbers.
    for var in inherit::ACTIVATION {
        cmd.env_remove(var);
    }
    cmd.env(handoff::ENV, handoff);
    if let Some(fd) = tracking.pass_guard() {
        cmd.env(process::guard::ENV, fd);
    }
    let e = cmd.exec();
    Error::Exec(exe.to_path_buf(), e)
}

/// Runs deployd until it is told to stop (`Ok(None)`) or to replace itself
/// (`Ok(Some(handoff file))`: the namespace is unmounted, the instances run
/// on).
async fn run(
    config: Arc<Config>,
    spawner: process::Spawner,
    exe: Option<PathBuf>,
    tracking: Arc<Tracking>,
    passed: proxy::activation::Passed,
    handoff: Option<Handoff>,
) -> Result<Option<PathBuf>, Error> {
    // In a cluster, this host's state is apart from a single host's: the
    // services are etcd's.
    let store = match &config.cluster {
        Some(_) => Store::open(&config.state.join("cluster"))?,
        None => Store::open(&config.state)?,
    };
    prepare_mountpoint(&config.mountpoint)
        .map_err(|e| Error::Mountpoint(config.mountpoint.clone(), e))?;
    let metrics = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Metrics(addr, e))?,
        ),
        None => None,
    };

    let views = Views::default();
    let waiters = Arc::new(Waiters::default());
    let children = Children::new(tracking.clone());
    tokio::spawn(children.clone().run_reaper());
    let (tx, rx) = mpsc::unbounded_channel();
    let link = match &config.cluster {
        Some(c) => Some(
            cluster::join(
                c,
                &config.state.join("cluster"),
                &config.manifests,
                tx.clone(),
            )
            .await
            .map_err(Error::Cluster)?,
        ),
        None => None,
    };

    let fs = Fs::new(views.clone(), tx.clone(), waiters.clone());
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("deployd".into()),
        fuser::MountOption::Subtype("deployd".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
    ];
    // Only the owner can use the mount unless allow_other: then (and only
    // then) the kernel must check the files' modes, at the price of a
    // GETATTR per path component on every open.
    if config.allow_other {
        options
            .mount_options
            .push(fuser::MountOption::DefaultPermissions);
    }
    options.acl = if config.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    // Two per core: reads of many readers overlap (measured on 2 cores:
    // 8 readers at 70-76% of a minimal FUSE file system's rate with 4
    // threads, 62-71% with 2).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    options.n_threads = Some((2 * cores).clamp(2, 16));
    // A /dev/fuse descriptor per thread: they don't contend on one queue.
    options.clone_fd = true;
    let session = fuser::spawn_mount(fs, &config.mountpoint, &options)
        .map_err(|e| Error::Mount("mount", config.mountpoint.clone(), e))?;
    tracing::info!("namespace mounted at {}", config.mountpoint.display());

    if let Some(listener) = metrics {
        tracing::info!(
            "metrics at http://{}/metrics",
            config.metrics.map_or_else(String::new, |a| a.to_string())
        );
        tokio::spawn(metrics::serve(listener, views.clone()));
    }
    let w = waiters.clone();
    let notifier = session.notifier();
    let kernel = session.notifier();
    let published = Box::new(
        move |old: Option<&view::ServiceView>, new: &view::ServiceView| {
            // The kernel keeps what it read of a service's snapshot files:
            // what changed is dropped now, after the new snapshot is in
            // place and before whoever caused the change is answered.
            let changed = fs::changed(old, new);
            let dir = fuser::INodeNo(fs::Node::Service(new.sid).ino());
            // ENOENT: the kernel had nothing of it.
            for name in changed.names {
                let _ = kernel.inval_entry(dir, std::ffi::OsStr::new(name));
            }
            for ino in changed.inodes {
                let _ = kernel.inval_inode(fuser::INodeNo(ino), 0, 0);
            }
            w.release(new)
        },
    );
    let removed = Box::new(move |name: &deployd_lib::name::ServiceName| {
        let active = fuser::INodeNo(fs::Node::Active.ino());
        // ENOENT: the kernel did not have the name cached.
        let _ = notifier.inval_entry(active, std::ffi::OsStr::new(name.as_str()));
        // Nor `/active`'s attributes and listing.
        let _ = notifier.inval_inode(active, 0, 0);
    });
    let mut runtime = Runtime::new(Parts {
        config: config.clone(),
        store,
        views: views.clone(),
        hooks: Hooks { published, removed },
        children,
        spawner,
        proxies: Proxies::start(passed),
        tx,
        exe,
        cluster: link,
    });
    runtime.start(handoff);

    let sweeper = {
        let (waiters, views) = (waiters.clone(), views.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(fs::SWEEP).await;
                waiters.sweep(&views);
            }
        })
    };

    let (signals, counted) = tokio::sync::watch::channel(0);
    tokio::spawn(count_stop_signals(signals));
    let outcome = runtime.run(rx, counted).await;
    sweeper.abort();
    waiters.shutdown();
    views.wake_followers();
    let released = release_mount(&config.mountpoint).await;
    match session.umount_and_join() {
        // Its own unmount finds nothing left to unmount.
        Err(_) if released => {}
        r => r.map_err(|e| Error::Mount("unmount", config.mountpoint.clone(), e))?,
    }
    match outcome {
        Outcome::Stopped => {
            if let Some(c) = tracking.cgroups() {
                c.release();
            }
            tracing::info!("unmounted; bye");
            Ok(None)
        }
        Outcome::ReExec(h) => handoff::write(&config.state, &h)
            .map(Some)
            .map_err(Error::Handoff),
    }
}

/// Counts the SIGTERMs, SIGINTs and SIGHUPs deployd gets into `count`: the
/// first stops it gracefully (traffic in flight finishes, then every
/// instance stops), a second skips the wait for traffic. SIGHUP is what a
/// terminal sends when it closes on a deployd started in it: left to its
/// default, it would kill deployd with the namespace still mounted (every
/// later access ENOTCONN) and instances orphaned. Under `nohup` (SIGHUP
/// ignored from the start) it stays ignored.
async fn count_stop_signals(count: tokio::sync::watch::Sender<u32>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot watch SIGTERM/SIGINT");
        // Keeps `count` open: deployd then runs until killed.
        return std::future::pending().await;
    };
    let mut hup = if process::ignored(libc::SIGHUP) {
        None
    } else {
        signal(SignalKind::hangup())
            .inspect_err(|e| tracing::warn!("cannot watch SIGHUP: {e}"))
            .ok()
    };
    loop {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            Some(()) = async {
                match &mut hup {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
        };
        count.send_modify(|n| *n += 1);
        match *count.borrow() {
            1 => tracing::info!("{which}: stopping; traffic in flight may finish first"),
            _ => tracing::info!("{which} again: stopping every instance now"),
        }
    }
}

/// Unmounts the namespace: a file still open on it (the shell that wrote
/// `reexec` has not closed `ctl` yet, a reader of `events -f`) makes
/// umount fail with EBUSY for as long as it stays open, so this tries for
/// 2 s, then detaches the mount (what is still open gets ENOTCONN).
/// Returns whether the mount is gone.
async fn release_mount(path: &Path) -> bool {
    use nix::errno::Errno;
    use nix::mount::{MntFlags, umount2};
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match umount2(path, MntFlags::empty()) {
            Err(Errno::EBUSY) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(Errno::EBUSY) => {
                tracing::warn!("{}: still in use; detaching it", path.display());
                return match umount2(path, MntFlags::MNT_DETACH) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("{}: {e}", path.display());
                        false
                    }
                };
            }
            Ok(()) => return true,
            // For fuser's own unmount to report.
            Err(_) => return false,
        }
    }
}

/// Makes sure the mountpoint is an empty directory to mount on: creates it,
/// and detaches the dead mount a killed deployd left behind.
fn prepare_mountpoint(path: &Path) -> Result<(), MountpointError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => match mounted(path) {
            true => Err(MountpointError::Mounted),
            false => Ok(()),
        },
        Ok(_) => Err(MountpointError::NotADirectory),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::info!(
                "{}: detaching the mount of a deployd that died",
                path.display()
            );
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| MountpointError::Detach(e.into()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(MountpointError::Create)
        }
        Err(e) => Err(MountpointError::Os(e)),
    }
}

/// Whether something is mounted exactly on `path`.
fn mounted(path: &Path) -> bool {
    let Ok(path) = path.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    // Field 5 is the mount point, with spaces escaped as \040.
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m.replace("\\040", " ") == want)
}
