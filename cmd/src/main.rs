//! `deploy`: the command-line client of deployd.
//!
//! Everything it does goes through files of the namespace (`--root`,
//! `$DEPLOY_ROOT`, default `/deploy`), so a shell script can do the same with
//! `cat` and `echo`. `deploy check` works offline.
//!
//! Exit codes: 0 success; 1 the operation failed (invalid manifest, failed
//! paused or canary-held rollout); 2 usage error; 3 deployd is not running; 4 no such
//! service; 5 deployd refused the command. `deploy diff`: 0 no difference, 1
//! differences, 2 a file does not parse.

/// `println!`, but a closed standard output (`deploy … | head -1`) ends
/// deploy quietly with 0 rather than a panic.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::print_line(false, format_args!($($arg)*))
    };
}

/// `eprintln!`, the same for standard error (`2>&1 | head -1`).
macro_rules! tell {
    ($($arg:tt)*) => {
        $crate::print_line(true, format_args!($($arg)*))
    };
}

mod check;
mod diff;
mod follow;
mod hosts;
mod ns;
mod status;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use deployd_lib::name::ServiceName;

use crate::follow::{Until, What};
use crate::ns::Ns;

#[derive(Parser)]
#[command(
    name = "deploy",
    version,
    about = "Drive deployd through its /deploy namespace"
)]
struct Args {
    /// Where deployd's namespace is mounted
    #[arg(long, global = true, env = "DEPLOY_ROOT", default_value = "/deploy")]
    root: PathBuf,
    /// Print JSON (status, events, logs, history, diff, plan, check, hosts):
    /// an object or array, or with events and logs an object per line
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Roll the service out to its manifest and follow the rollout to its end;
    /// without a service, every manifest of deployd's manifests directory
    Apply {
        /// The service (its manifest is SERVICE.manifest in deployd's manifests directory)
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: Option<String>,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Every service as a table, or one service with its instances and its last 10 events
    Status {
        /// One service
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: Option<String>,
    },
    /// Hold the rollout after the batch in flight
    Pause {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
    },
    /// Go on with a paused rollout and follow it
    Resume {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Go on with a rollout held at its canary (`update_canary`) and follow it
    Promote {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Roll back to the previous version (or to VERSION from history) and follow it
    Rollback {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        /// A version from the service's history/: its 12 hex digits, or its first 4 or more
        version: Option<String>,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Replace every instance with a fresh process, one batch at a time; or
    /// only INSTANCE (its number, as in `deploy status SERVICE`)
    Restart {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        /// One instance: its replacement serves before it is stopped
        instance: Option<u32>,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Stop every instance and wait until they are all gone; the service
    /// stays, stopped
    Stop {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Start a stopped service and wait until every instance is ready
    Start {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Stop every instance and forget the service; waits until it is gone
    Remove {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        #[command(flatten)]
        wait: Waiting,
    },
    /// Send a signal (HUP, USR1, ...) to the processes of every running
    /// instance, or of one: to reload a configuration, reopen files
    Signal {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        /// TERM, INT, QUIT, HUP, USR1, USR2 or KILL (SIG prefix and lower
        /// case accepted)
        signal: String,
        /// One instance (its number, as in `deploy status SERVICE`)
        instance: Option<u32>,
    },
    /// Print the service's event log
    Events {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        /// Keep printing new events
        #[arg(short, long)]
        follow: bool,
        /// Only events since a time ago (500ms, 30s, 10m, 2h, 1d) or a UTC time
        /// (2026-12-02T01:30)
        #[arg(long, value_name = "WHEN", value_parser = tail::parse_since)]
        since: Option<String>,
        /// Begin with the last N events
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Print the output of the service's instances (or of one), or its
    /// access log
    Logs {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
        /// One instance (its number, as in `deploy status SERVICE`)
        #[arg(conflicts_with = "access")]
        instance: Option<u32>,
        /// Keep printing new output, also of the instances a rollout or a
        /// restart starts (from their first line)
        #[arg(short, long)]
        follow: bool,
        /// The access log of its port (`access_log on`): a line per request
        /// (http) or connection (tcp)
        #[arg(long)]
        access: bool,
        /// The whole output of the last instance that failed (exited
        /// unexpectedly, missed its health deadline, turned unhealthy): what
        /// the events showed the last lines of
        #[arg(long, conflicts_with_all = ["access", "instance"])]
        failed: bool,
        /// What the rollout hooks (before_deploy, after_deploy) printed, each
        /// run after a `== TIME HOOK of VERSION: COMMAND` line
        #[arg(long, conflicts_with_all = ["access", "instance", "failed", "timestamps", "since"])]
        hooks: bool,
        /// Show the time deployd read each line of output (UTC); access
        /// log lines always begin with theirs
        #[arg(short, long, conflicts_with = "access")]
        timestamps: bool,
        /// Only lines since a time ago (500ms, 30s, 10m, 2h, 1d) or a UTC time
        /// (2026-12-02T01:30)
        #[arg(long, value_name = "WHEN", value_parser = tail::parse_since)]
        since: Option<String>,
        /// Begin with the last N lines of each log
        #[arg(short = 'n', long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Replace deployd with its binary (after an upgrade) keeping every
    /// instance and port; wait until it serves again
    Reexec,
    /// In a cluster: every host, its state, address and instances
    Hosts,
    /// In a cluster: move a host's instances to the others (as a rolling
    /// restart does, health-gated) and place nothing more on it
    Drain {
        /// The host, as in /deploy/hosts/HOST
        host: String,
    },
    /// In a cluster: let new instances go on a drained host again
    Undrain {
        /// The host, as in /deploy/hosts/HOST
        host: String,
    },
    /// What apply would do, step by step, doing nothing: batches, the instances
    /// each starts and stops, pauses, and the least time it takes
    Plan {
        /// The service, as in /deploy/active/SERVICE (its manifest in the manifests directory)
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
    },
    /// The versions kept for rollback (the last 10), newest first: which is
    /// running, which is the previous one
    History {
        /// The service, as in /deploy/active/SERVICE
        #[arg(value_parser = service_arg, add = ArgValueCandidates::new(services))]
        service: String,
    },
    /// What apply would change: each manifest file against the one its service runs
    Diff {
        /// Manifest files, named SERVICE.manifest
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the shell's completion script: commands, options and the
    /// services deployd runs (`source <(deploy completions bash)`, or save
    /// it where the shell loads completions from)
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Write the manual pages (deploy.1, one per command) into DIR
    Man {
        /// Where to write them (made if missing)
        dir: PathBuf,
    },
    /// Validate manifests offline; print every error with file:line:col
    Check {
        /// Check the language only, not what a manifest needs of this
        /// machine (its user): for a build machine that is not the server
        #[arg(long)]
        syntax: bool,
        /// Manifest files, named SERVICE.manifest
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// How long a command that follows what it started may wait.
#[derive(clap::Args, Clone, Copy)]
struct Waiting {
    /// Return once deployd has accepted the command
    #[arg(long)]
    no_wait: bool,
    /// Stop following after DUR (500ms, 90s, 10m, 1h, 1d) and exit 1; deployd goes on
    /// with it (as kubectl rollout status --timeout)
    #[arg(long, value_name = "DUR", value_parser = timeout, conflicts_with = "no_wait")]
    timeout: Option<Duration>,
    /// Return once the new version is in place, not after its update_watch
    #[arg(long, conflicts_with = "no_wait")]
    no_watch: bool,
}

fn timeout(text: &str) -> Result<Duration, String> {
    deployd_lib::manifest::parse_duration("--timeout", text)
}

/// How `deploy` ends when nothing went wrong on its side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It worked.
    Ok = 0,
    /// The operation failed: an invalid manifest, a failed rollout.
    Failed = 1,
}

/// An error that ends `deploy`, with its exit code.
#[derive(Debug)]
pub struct Fail {
    code: u8,
    message: String,
    /// Its output was closed under it: deploy ends with 0, saying nothing.
    quiet: bool,
}

impl Fail {
    fn new(code: u8, message: String) -> Fail {
        Fail {
            code,
            message,
            quiet: false,
        }
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail {
            code: 1,
            message: e.to_string(),
            // Whoever read the output has all they wanted (`| head`).
            quiet: e.kind() == std::io::ErrorKind::BrokenPipe,
        }
    }
}

/// Writes one line to standard output (or error); a closed pipe ends
/// deploy with 0, quietly: its reader has what it wanted.
pub fn print_line(to_stderr: bool, args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let written = match to_stderr {
        false => writeln!(std::io::stdout().lock(), "{args}"),
        true => writeln!(std::io::stderr().lock(), "{args}"),
    };
    if written.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
        quiet_exit();
    }
}

/// Ends deploy with 0 at once: its output was closed (`deploy … | head`).
fn quiet_exit() -> ! {
    std::process::exit(0)
}

/// A SERVICE argument: refused as usage (exit 2) unless it is a service
/// name, so `deploy apply 'my svc'` or `deploy stop ../x` never reaches a
/// ctl file or a path.
fn service_arg(name: &str) -> Result<String, String> {
    ServiceName::new(name).map(|_| name.to_string())
}

/// The services deployd runs, for a shell's completion (from
/// `$DEPLOY_ROOT` or `/deploy`: the command line is not parsed yet).
fn services() -> Vec<CompletionCandidate> {
    let root = std::env::var_os("DEPLOY_ROOT").unwrap_or_else(|| "/deploy".into());
    let mut names: Vec<String> = std::fs::read_dir(std::path::Path::new(&root).join("active"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().map(CompletionCandidate::new).collect()
}

/// `deploy completions SHELL`: the script that has the shell ask deploy
/// (with `COMPLETE=SHELL` in its environment) what completes a word.
fn completions(shell: &str) -> Result<Exit, Fail> {
    use std::os::unix::process::CommandExt;
    // Named `deploy`, the script has the shell run the `deploy` on its
    // PATH: the one installed, not the file that wrote the script.
    let exe = std::env::current_exe()?;
    let status = std::process::Command::new(&exe)
        .arg0("deploy")
        .env("COMPLETE", shell)
        .status()?;
    match status.success() {
        true => Ok(Exit::Ok),
        false => Err(Fail::new(1, format!("no completions for {shell}"))),
    }
}

/// `deploy man DIR`: deploy.1 and a page per command (deploy-apply.1, ...).
fn man(dir: &std::path::Path) -> Result<Exit, Fail> {
    std::fs::create_dir_all(dir).map_err(|e| ns::io_fail(dir, e))?;
    let cmd = Args::command();
    clap_mangen::generate_to(cmd, dir).map_err(|e| ns::io_fail(dir, e))?;
    say!("manual pages written to {}", dir.display());
    Ok(Exit::Ok)
}

fn try_main(args: Args) -> Result<Exit, Fail> {
    match &args.command {
        Cmd::Check { files, syntax } => return check::run(files, *syntax, args.json),
        Cmd::Completions { shell } => return completions(shell),
        Cmd::Man { dir } => return man(dir),
        _ => {}
    }
    let ns = Ns::open(&args.root)?;
    match args.command {
        Cmd::Check { .. } | Cmd::Completions { .. } | Cmd::Man { .. } => {
            unreachable!("handled above")
        }
        Cmd::Diff { files } => diff::run(&ns, &files, args.json),
        Cmd::Plan { service } => {
            let (_, _, plan) = send(&ns, &service, "plan")?;
            match args.json {
                true => say!(
                    "{}",
                    serde_json::json!({"service": service, "steps": plan.trim_end().lines().collect::<Vec<_>>()})
                ),
                false => say!("{}", plan.trim_end()),
            }
            Ok(Exit::Ok)
        }
        Cmd::History { service } => status::history(&ns, &service, args.json),
        Cmd::Reexec => reexec(&ns, &args.root),
        Cmd::Hosts => hosts::list(&args.root, args.json),
        Cmd::Drain { host } => hosts::drain(&args.root, &host, true),
        Cmd::Undrain { host } => hosts::drain(&args.root, &host, false),
        Cmd::Apply {
            service: None,
            wait,
        } => follow::apply_all(&ns, wait.no_wait, wait.timeout),
        Cmd::Apply {
            service: Some(service),
            wait,
        } => {
            let dir = ns.service_path(&service);
            let start = follow::Start::now(&dir)
                .limit(wait.timeout)
                .no_watch(wait.no_watch);
            let msg = ns
                .ctl_root(&format!("apply {service}\n"))
                .map_err(|f| refused(&service, f))?;
            if wait.no_wait || msg.starts_with("unchanged") {
                say!("{service}: {msg}");
                return Ok(Exit::Ok);
            }
            follow::follow(&service, &dir, start, What::Deploy)
        }
        Cmd::Resume { service, wait } => command(&ns, &service, "resume", wait, What::Deploy),
        Cmd::Promote { service, wait } => command(&ns, &service, "promote", wait, What::Deploy),
        Cmd::Restart {
            service,
            instance,
            wait,
        } => {
            let cmd = with_arg("restart", instance);
            let what = instance.map_or(What::Restart, What::RestartInstance);
            command(&ns, &service, &cmd, wait, what)
        }
        Cmd::Rollback {
            service,
            version,
            wait,
        } => command(
            &ns,
            &service,
            &with_arg("rollback", version),
            wait,
            What::Rollback,
        ),
        Cmd::Pause { service } => command(&ns, &service, "pause", NO_WAIT, What::Deploy),
        Cmd::Stop { service, wait } => settle(&ns, &service, Until::Stopped, wait),
        Cmd::Start { service, wait } => settle(&ns, &service, Until::Started, wait),
        Cmd::Remove { service, wait } => settle(&ns, &service, Until::Removed, wait),
        Cmd::Signal {
            service,
            signal,
            instance,
        } => {
            let cmd = with_arg(&format!("signal {signal}"), instance);
            command(&ns, &service, &cmd, NO_WAIT, What::Deploy)
        }
        Cmd::Status { service: None } => status::all(&ns, args.json),
        Cmd::Status { service: Some(s) } => status::one(&ns, &s, args.json),
        Cmd::Events {
            service,
            follow,
            since,
            tail,
        } => {
            let dir = ns.service(&service)?;
            let filter = tail::Filter {
                since,
                unstamped: false,
                tail,
                json: args.json,
            };
            tail::run(&dir, "events", follow, &filter)
        }
        Cmd::Logs {
            service,
            instance,
            follow,
            access,
            failed,
            hooks,
            timestamps,
            since,
            tail,
        } => {
            let dir = ns.service(&service)?;
            let filter = tail::Filter {
                since,
                unstamped: !access && !timestamps,
                tail,
                json: args.json,
            };
            if hooks {
                // Its lines carry no time stamp of their own.
                let filter = tail::Filter {
                    unstamped: false,
                    ..filter
                };
                return tail::run(&dir, "hooks_log", follow, &filter);
            }
            match (access, failed) {
                (true, _) => tail::run(&dir, "access", follow, &filter),
                (_, true) => tail::run(&dir, "failed_log", follow, &filter),
                _ => tail::logs(&dir, instance, follow, &filter),
            }
        }
    }
}

/// `VERB`, or `VERB ARG` when there is an argument.
fn with_arg(verb: &str, arg: Option<impl std::fmt::Display>) -> String {
    match arg {
        Some(a) => format!("{verb} {a}"),
        None => verb.to_string(),
    }
}

/// For the commands that do not follow anything.
const NO_WAIT: Waiting = Waiting {
    no_wait: true,
    timeout: None,
    no_watch: false,
};

/// Writes a command to the service's ctl file; follows the rollout it
/// starts unless `wait` says not to.
fn command(ns: &Ns, service: &str, cmd: &str, wait: Waiting, what: What) -> Result<Exit, Fail> {
    let (dir, start, msg) = send(ns, service, cmd)?;
    if wait.no_wait {
        say!("{service}: {msg}");
        return Ok(Exit::Ok);
    }
    let start = start.limit(wait.timeout).no_watch(wait.no_watch);
    follow::follow(service, &dir, start, what)
}

/// Writes `cmd` to the service's ctl file: the service's directory, where
/// its events and traffic stood just before, and deployd's answer.
fn send(ns: &Ns, service: &str, cmd: &str) -> Result<(PathBuf, follow::Start, String), Fail> {
    let dir = ns.service(service)?;
    let start = follow::Start::now(&dir);
    let msg = ns::ctl(&dir.join("ctl"), &format!("{cmd}\n")).map_err(|f| refused(service, f))?;
    Ok((dir, start, msg))
}

/// `stop`, `start` or `remove`, then (unless `no_wait`) its events until
/// it is done: as `systemctl stop` returns once the unit is down, so that
/// what a script does next (`pg_upgrade`, a restore) never meets an
/// instance still running.
fn settle(ns: &Ns, service: &str, until: Until, wait: Waiting) -> Result<Exit, Fail> {
    let (dir, start, msg) = send(ns, service, until.command())?;
    if wait.no_wait {
        say!("{service}: {msg}");
        return Ok(Exit::Ok);
    }
    // The answer is the first event, which the following prints.
    follow::until(service, &dir, start.limit(wait.timeout), until, &msg)
}

/// `reexec` on the root ctl, then waits (up to a minute) for the new
/// deployd's namespace.
fn reexec(ns: &Ns, root: &std::path::Path) -> Result<Exit, Fail> {
    // The root ctl's mtime is when its deployd started: how the new
    // namespace is told from the old one (the gap between them can be
    // shorter than any poll, and a mount's device number is reused).
    let started_at = |p: &std::path::Path| {
        std::fs::metadata(p.join("ctl"))
            .and_then(|m| m.modified())
            .ok()
    };
    // Its ctl appears once it has taken every service back: nothing more
    // to wait for.
    let old = started_at(root);
    let msg = ns
        .ctl_root("reexec\n")
        .map_err(|f| crate::refused("reexec", f))?;
    say!("deployd: {msg}");
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(60) {
        let now = started_at(root);
        let back = now.is_some() && now != old && Ns::open(root).is_ok();
        if back {
            say!("deployd: back in {:.2}s", started.elapsed().as_secs_f64());
            return Ok(Exit::Ok);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Fail::new(
        ns::NOT_RUNNING,
        format!("deployd is not back at {} after 60s", root.display()),
    ))
}

/// Prefixes a refusal with the service (or the command) and what happened.
fn refused(service: &str, f: Fail) -> Fail {
    let what = match f.code {
        ns::REFUSED => "refused: ",
        _ => "",
    };
    Fail::new(f.code, format!("{service}: {what}{}", f.message))
}

fn main() -> ExitCode {
    // Asked by a shell (`COMPLETE=bash`) what completes a word: answers
    // and exits.
    clap_complete::CompleteEnv::with_factory(Args::command).complete();
    let args = Args::parse();
    match try_main(args) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(f) if f.quiet => ExitCode::SUCCESS,
        Err(f) => {
            tell!("deploy: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
