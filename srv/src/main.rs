//! `deployd`: runs the instances of services on one host, rolls out new
//! versions with health checks, and serves it all as a file namespace.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration.
//! - [`engine`]: the one loop that owns every service's state machine and
//!   turns its actions into effects.
//! - [`process`]: spawning, reaping, signalling and logging child processes.
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
//!
//! Threads: the main thread starts every instance (and is the one that
//! calls `execve` for `reexec`); the engine, the namespace and the probes
//! run on a tokio runtime on other threads, the public ports on their own.
//!
//! Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT or SIGHUP), 1 when it
//! cannot run (bad configuration, mount failed, state directory locked).

mod config;
mod engine;
mod fs;
mod handoff;
mod logging;
mod probe;
mod process;
mod proxy;
mod short;
mod store;
mod view;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::engine::{Engine, Hooks, Outcome};
use crate::fs::{Fs, Waiters};
use crate::process::Children;
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
}

fn main() -> ExitCode {
    let args = Args::parse();
    match try_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deployd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main(args: &Args) -> Result<(), String> {
    // While deployd has one thread: the guard is forked.
    let guard_problem = process::guard::start();
    // Before anything could start a process that would inherit them.
    let (handed, handoff_problem) = handoff::receive();
    let (passed, problems) = proxy::activation::adopt(&handed);
    // Where this binary is now: an upgrade puts the next one there.
    let exe = std::env::current_exe().ok();
    let config = Config::load(&args.config)?;
    logging::init(config.log_level);
    if let Some(p) = guard_problem {
        tracing::warn!("{}: {p}", process::guard::NAME);
    }
    if let Some(p) = handoff_problem {
        tracing::warn!("handoff: {p}; starting as after a restart");
    }
    for p in problems {
        tracing::warn!("socket activation: {p}; left alone");
    }
    if !passed.is_empty() && handed.is_empty() {
        tracing::info!("socket activation: ports {passed:?} passed; kept across restarts");
    } else if !passed.is_empty() {
        tracing::info!("ports {passed:?} handed on by the deployd this one replaced");
    }
    process::raise_fd_limit();
    process::become_subreaper();
    // After `reexec`, the instances handed on are in the tree: kept.
    let keep = std::env::var_os(handoff::ENV).is_some();
    match process::cgroup::init(keep) {
        Ok(tree) => tracing::debug!("instances' cgroups under {}", tree.display()),
        Err(e) => tracing::info!(
            "cgroup v2: {e}; what an instance starts is tracked by its process group only"
        ),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    // Instances are started on this thread, the one that also replaces
    // deployd on `reexec` (see process::Spawner); the rest runs on another.
    let (spawner, jobs) = process::Spawner::channel();
    let config = Arc::new(config);
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .spawn({
            let (config, exe) = (config.clone(), exe.clone());
            move || rt.block_on(run(config, spawner, exe))
        })
        .map_err(|e| format!("cannot start the engine thread: {e}"))?;
    jobs.serve();
    let handoff = engine
        .join()
        .map_err(|_| "the engine thread panicked".to_string())??;
    match (handoff, exe) {
        (Some(path), Some(exe)) => Err(reexec(&exe, &path)),
        _ => Ok(()),
    }
}

/// Replaces deployd with `exe`, same arguments, same pid, telling it where
/// the handoff is. Returns only if execve failed: deployd then exits, and
/// its instances with it (a later start restores them).
fn reexec(exe: &Path, handoff: &Path) -> String {
    use std::os::unix::process::CommandExt;
    tracing::info!("replacing deployd with {}", exe.display());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1));
    // The sockets systemd passed are in the handoff now, at other numbers.
    for var in proxy::activation::VARS {
        cmd.env_remove(var);
    }
    cmd.env(handoff::ENV, handoff);
    if let Some(fd) = process::guard::pass() {
        cmd.env(process::guard::ENV, fd);
    }
    let e = cmd.exec();
    format!("cannot run {}: {e}", exe.display())
}

/// Runs deployd until it is told to stop (`Ok(None)`) or to replace itself
/// (`Ok(Some(handoff file))`: the namespace is unmounted, the instances run
/// on).
async fn run(
    config: Arc<Config>,
    spawner: process::Spawner,
    exe: Option<PathBuf>,
) -> Result<Option<PathBuf>, String> {
    let store = Store::open(&config.state)?;
    prepare_mountpoint(&config.mountpoint)?;

    let views = Views::default();
    let waiters = Arc::new(Waiters::default());
    let children = Children::default();
    tokio::spawn(children.clone().run_reaper());
    let (tx, rx) = mpsc::unbounded_channel();

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
        .map_err(|e| format!("cannot mount {}: {e}", config.mountpoint.display()))?;
    tracing::info!("namespace mounted at {}", config.mountpoint.display());

    let w = waiters.clone();
    let published = Box::new(move |v: &view::ServiceView| w.release(v));
    let notifier = session.notifier();
    let removed = Box::new(move |name: &deployd_lib::name::ServiceName| {
        let active = fuser::INodeNo(fs::Node::Active.ino());
        // ENOENT: the kernel did not have the name cached.
        let _ = notifier.inval_entry(active, std::ffi::OsStr::new(name.as_str()));
    });
    let mut engine = Engine::new(
        config.clone(),
        store,
        views.clone(),
        Hooks { published, removed },
        children,
        spawner,
        tx,
    );
    if let Some(exe) = exe {
        engine.set_exe(exe);
    }
    engine.start(handoff::take());
    let untaken = proxy::activation::untaken();
    if !untaken.is_empty() {
        tracing::warn!(
            "socket activation: no service has port {untaken:?}; its connections wait unanswered"
        );
    }

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
    let outcome = engine.run(rx, counted).await;
    sweeper.abort();
    waiters.shutdown();
    let released = release_mount(&config.mountpoint).await;
    match session.umount_and_join() {
        // Its own unmount finds nothing left to unmount.
        Err(_) if released => {}
        r => r.map_err(|e| format!("cannot unmount {}: {e}", config.mountpoint.display()))?,
    }
    match outcome {
        Outcome::Stopped => {
            process::cgroup::release();
            tracing::info!("unmounted; bye");
            Ok(None)
        }
        Outcome::ReExec(h) => handoff::write(&config.state, &h)
            .map(Some)
            .map_err(|e| format!("cannot write the handoff: {e}")),
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
fn prepare_mountpoint(path: &Path) -> Result<(), String> {
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            if mounted(path) {
                return Err(format!(
                    "{shown} is already mounted (is another deployd running?)"
                ));
            }
            Ok(())
        }
        Ok(_) => Err(format!("{shown} is not a directory")),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::info!("{shown}: detaching the mount of a deployd that died");
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| format!("cannot detach the dead mount on {shown}: {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| format!("cannot create {shown}: {e}"))
        }
        Err(e) => Err(format!("{shown}: {e}")),
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
