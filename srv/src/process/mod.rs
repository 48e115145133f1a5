//! Child processes: spawning instances and exec probes in their own process
//! group, reaping every child, stopping a group with escalation to SIGKILL,
//! and copying output to a size-bounded log file.
//!
//! deployd reaps with `waitpid(-1)` on SIGCHLD and is a child subreaper, so
//! grandchildren that outlive their parent are reaped too: no zombies. Who
//! waits for which pid is kept in [`Children`]; an exit that arrives before
//! its spawner registered the pid is held until it does. Nothing else in
//! deployd may wait for children (no `tokio::process`).
//!
//! A child gets `PR_SET_PDEATHSIG`, so a deployd killed with SIGKILL takes its
//! instances down with it, and [`guard`] the rest of their process groups;
//! the pid file written by the engine lets the next deployd kill whatever
//! survived (see [`kill_leftovers`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deployd_lib::host::Account;
use deployd_lib::rollout::Exit;
use deployd_lib::stamp;
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

pub mod cgroup;
pub mod guard;
mod launch;

pub use launch::is_executable_file;

/// How long an exit nobody claimed is kept before it is dropped (an
/// orphaned grandchild's, reaped as subreaper).
const UNCLAIMED_TTL: Duration = Duration::from_secs(10);

/// Who is told when a child exits.
pub enum Waiter {
    /// A callback, run on the reaper task with the exit.
    Notify(Box<dyn FnOnce(Exit) + Send>),
    /// A one-shot channel.
    Channel(oneshot::Sender<Exit>),
}

/// The table of children being waited for.
#[derive(Clone, Default)]
pub struct Children {
    inner: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, Waiter>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

impl Children {
    /// Registers who waits for `pid`; delivers at once if it already exited.
    pub fn watch(&self, pid: u32, waiter: Waiter) {
        let pid = pid as i32;
        let early = {
            let mut t = self.inner.lock();
            match t.unclaimed.remove(&pid) {
                Some((exit, _)) => Some(exit),
                None => {
                    t.waiting.insert(pid, waiter);
                    return;
                }
            }
        };
        if let Some(exit) = early {
            deliver(waiter, exit);
        }
    }

    /// Reaps every child that has exited. Returns how many.
    pub fn reap(&self) -> usize {
        let mut n = 0;
        // Not while an instance starts: the guard hears of it first.
        let _spawning = SPAWNING.lock();
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("waitpid: {e}");
                    break;
                }
                Ok(s) => s,
            };
            let (pid, exit) = match status {
                WaitStatus::Exited(pid, code) => (pid, Exit::Code(code)),
                WaitStatus::Signaled(pid, sig, _) => (pid, Exit::Signal(sig as i32)),
                _ => continue,
            };
            n += 1;
            // The group may still hold processes the leader left behind,
            // and its cgroup those that left the group.
            let _ = killpg(pid, Signal::SIGKILL);
            cgroup::ended(pid.as_raw() as u32);
            guard::forget(pid.as_raw() as u32);
            let waiter = {
                let mut t = self.inner.lock();
                match t.waiting.remove(&pid.as_raw()) {
                    Some(w) => Some(w),
                    None => {
                        let now = Instant::now();
                        t.unclaimed
                            .retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
                        t.unclaimed.insert(pid.as_raw(), (exit.clone(), now));
                        None
                    }
                }
            };
            if let Some(w) = waiter {
                deliver(w, exit);
            }
        }
        n
    }

    /// Reaps on every SIGCHLD, and every second in case one was coalesced.
    pub async fn run_reaper(self) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot watch SIGCHLD: {e}; reaping every 100ms");
                loop {
                    self.reap();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        loop {
            self.reap();
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn deliver(w: Waiter, exit: Exit) {
    match w {
        Waiter::Notify(f) => f(exit),
        Waiter::Channel(tx) => {
            let _ = tx.send(exit);
        }
    }
}

/// Makes deployd the reaper of its descendants' orphans.
pub fn become_subreaper() {
    // SAFETY: prctl with an integer argument has no memory effects.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            "PR_SET_CHILD_SUBREAPER: {}; orphaned grandchildren go to init",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether `signal` is ignored (SIG_IGN) in this process, as `nohup`
/// leaves SIGHUP for what it starts.
pub fn ignored(signal: i32) -> bool {
    // SAFETY: with a null new action, sigaction only writes `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Raises the soft limit on open files to the hard limit: every instance
/// holds a pipe and a log file open in deployd.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to / read from the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Starts processes on deployd's main thread, so that the engine never
/// waits for an exec (about 0.7 ms each).
///
/// One thread, and that one: `PR_SET_PDEATHSIG` fires when the *thread*
/// that started a child ends, and `execve` ends every thread but the one
/// that calls it. The main thread lives as long as deployd and is the one
/// that replaces deployd (`reexec`), so its children, every instance, keep
/// running through it. (A second spawner thread gained nothing measurable:
/// batches of ten at 13.3-18.6 ms per batch with one, 14.7-18.5 with two.)
#[derive(Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

/// The jobs a [`Spawner`] queues, for the thread that runs them.
pub struct Jobs {
    rx: std::sync::mpsc::Receiver<Box<dyn FnOnce() + Send>>,
}

impl Spawner {
    /// A spawner whose jobs run where [`Jobs::serve`] is called.
    pub fn channel() -> (Spawner, Jobs) {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        (Spawner { jobs: tx }, Jobs { rx })
    }

    /// Runs `job` on the spawning thread.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(e) = self.jobs.send(Box::new(job)) {
            // Only when the spawning thread is gone: run it here.
            (e.0)();
        }
    }
}

impl Jobs {
    /// Runs jobs until every [`Spawner`] is dropped.
    pub fn serve(self) {
        while let Ok(job) = self.rx.recv() {
            job();
        }
    }
}

/// What to run.
pub struct Spawn<'a> {
    /// Passed to `/bin/sh -c`.
    pub command: &'a str,
    /// Working directory.
    pub dir: &'a Path,
    /// Added to deployd's environment.
    pub env: Vec<(String, String)>,
    /// Where stdout and stderr go; `None`: /dev/null.
    pub output: Option<OwnedFd>,
    /// The account to run as (`user`, looked up by the caller); `None`:
    /// deployd's own.
    pub account: Option<&'a Account>,
}

/// The words of a command line that means the same with or without a
/// shell: only plain words (letters, digits and `_ . / : = @ % + , -`), an
/// optional leading `exec`. Anything else (`$`, quotes, globs, operators,
/// an empty line) needs `/bin/sh`.
pub fn plain_words(command: &str) -> Option<Vec<&str>> {
    let plain = |w: &str| {
        w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b))
    };
    let mut words: Vec<&str> = command
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    if words.first() != Some(&"exec") {
        return None;
    }
    while words.first() == Some(&"exec") {
        words.remove(0);
    }
    // `A=b cmd` sets a variable for the shell: leave that to the shell.
    let ok = !words.is_empty() && words.iter().all(|w| plain(w)) && !words[0].contains('=');
    ok.then_some(words)
}

/// Starts COMMAND as the leader of a new process group: through
/// `/bin/sh -c`, or directly when the shell would only have exec'd it
/// ([`plain_words`]: one exec saved per instance start). Returns its pid;
/// the caller must [`Children::watch`] it at once.
pub fn spawn(s: Spawn<'_>) -> std::io::Result<u32> {
    spawn_in(s, None)
}

/// [`spawn`], the child starting in the cgroup `cgroup` (or moving
/// itself in before it calls `execve`).
fn spawn_in(s: Spawn<'_>, cgroup: Option<&cgroup::Place>) -> std::io::Result<u32> {
    let shell = [
        OsStr::new("/bin/sh"),
        OsStr::new("-c"),
        OsStr::new(s.command),
    ];
    let words: Vec<&OsStr> = match plain_words(s.command) {
        Some(words) => words.into_iter().map(OsStr::new).collect(),
        None => shell.to_vec(),
    };
    // Socket activation and the handoff were deployd's, not the instance's,
    // and so is the journal's stream: an instance's output is deployd's pipe.
    let [pid, fds, names] = crate::proxy::activation::VARS;
    let remove = [
        pid,
        fds,
        names,
        crate::handoff::ENV,
        guard::ENV,
        "JOURNAL_STREAM",
    ];
    let Some(account) = s.account else {
        return launch::launch(&words, s.dir, &s.env, &remove, s.output, None, cgroup);
    };
    // HOME, USER and LOGNAME are the account's, unless the manifest sets
    // them; without a login name, deployd's USER and LOGNAME would lie.
    let mut env = account.environment();
    env.extend(s.env);
    let mut remove = remove.to_vec();
    if account.name.is_none() {
        remove.extend(["USER", "LOGNAME"]);
    }
    launch::launch(
        &words,
        s.dir,
        &env,
        &remove,
        s.output,
        Some(account),
        cgroup,
    )
}

/// Held while an instance starts and while children are reaped, so that
/// the guard hears of a group before it can hear of its end.
static SPAWNING: Mutex<()> = Mutex::new(());

/// [`spawn`], for an instance: in a cgroup of its own if there is cgroup
/// v2 ([`cgroup`]), and the guard kills what is left of its group if
/// deployd dies without stopping it.
pub fn spawn_guarded(s: Spawn<'_>) -> std::io::Result<u32> {
    let _spawning = SPAWNING.lock();
    let place = cgroup::take();
    let pid = spawn_in(s, place.as_ref());
    if let Some(place) = place {
        cgroup::placed(place, pid.as_ref().ok().copied());
    }
    let pid = pid?;
    guard::watch(pid);
    Ok(pid)
}

/// Sends `signal` to the process group led by `pid`. A group already gone is
/// not an error.
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(sig) = Signal::try_from(signal) else {
        return;
    };
    match killpg(Pid::from_raw(pid as i32), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!("kill -{signal} -{pid}: {e}"),
    }
}

/// A pipe whose write end goes to a child and whose read end deployd copies
/// to a log file.
pub fn log_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

/// What a log pump does besides copying; by default nothing (an access
/// log's pump).
#[derive(Default)]
pub struct PumpOptions {
    /// Each line that begins is preceded by the time deployd read it (a
    /// [`stamp`] and a space): a child's output; the lines of an access
    /// log come with their own.
    pub stamped: bool,
    /// Bytes a second it reads at most (the manifest's `log_rate`), after
    /// a burst of as much; 0: no limit. Past it the pump waits, the pipe
    /// fills and the writer's writes wait: nothing is lost, and a process
    /// printing as fast as it can costs deployd no more than that.
    pub rate: u64,
    /// Called the first time the pump waits.
    pub throttled: Option<Box<dyn FnOnce() + Send>>,
    /// Called when what it copies cannot be written (a full disk), with
    /// the error, and again with `Ok(bytes dropped meanwhile)` once it can.
    pub unwritable: Option<Unwritable>,
}

/// What a pump says when its log cannot be written (`Err`: why), and when
/// it can again (`Ok`: the bytes dropped meanwhile).
pub type Unwritable = Box<dyn Fn(Result<u64, String>) + Send>;

/// The read buffer of a pump held to its rate: a pipe's capacity. Only
/// those get it; the many quiet instances keep 4 KiB.
const THROTTLED_BUF: usize = 64 * 1024;

/// Reads allowed by a [`PumpOptions::rate`]: a token bucket of a second.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            tokens: rate as f64,
            at: Instant::now(),
        }
    }

    /// Takes `n` bytes; how long to wait before reading again, if at all.
    fn take(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate) - n as f64;
        self.at = now;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

/// Copies what comes down a pipe to the log at `path`, moving the file to
/// `path.1` when it would pass `max` bytes (the manifest's `log_max`), as
/// `opts` says. Ends at end of file (every writer closed).
pub async fn pump_log(read: OwnedFd, path: PathBuf, max: u64, opts: PumpOptions) {
    let PumpOptions {
        stamped,
        rate,
        mut throttled,
        unwritable,
    } = opts;
    // Bytes dropped since writes began to fail, while they fail.
    let mut dropping: Option<u64> = None;
    let mut bucket = (rate > 0).then(|| Bucket::new(rate));
    let rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
        Ok(rx) => rx,
        Err(e) => {
            tracing::warn!("log pipe for {}: {e}", path.display());
            return;
        }
    };
    let mut rx = rx;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let mut file = open_log(&path);
    let mut size = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .map_or(0, |m| m.len());
    // A log taken over mid-line (by a re-executed deployd) goes on with it.
    let mut at_start = file
        .as_ref()
        .is_none_or(|f| deployd_lib::tail::ends_a_line(f, size));
    // Whether the file's last byte ends a line (it is not the same as
    // `at_start` for output that is not stamped).
    let mut ends_line = at_start;
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = match stamped {
            true => {
                out.clear();
                stamp_lines(&buf[..n], SystemTime::now(), &mut at_start, &mut out);
                &out[..]
            }
            false => &buf[..n],
        };
        let mut data = data;
        if size + data.len() as u64 > max {
            // The line under way ends in the old file if its end is in
            // this read, so that each file begins with a line of its own
            // (a line longer than a read is cut, as before).
            let head = match ends_line {
                true => 0,
                false => data.iter().position(|&b| b == b'\n').map_or(0, |p| p + 1),
            };
            if head > 0 {
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(&data[..head]);
                }
                ends_line = true;
            }
            data = &data[head..];
            let mut old = path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&path, &old);
            file = open_log(&path);
            size = 0;
        }
        let written = match file.as_mut() {
            Some(f) => f.write_all(data).map_err(|e| e.to_string()),
            None => Err("cannot open the log".to_string()),
        };
        match (written, dropping.as_mut()) {
            (Ok(()), _) => {
                size += data.len() as u64;
                if let (Some(dropped), Some(say)) = (dropping.take(), unwritable.as_ref()) {
                    say(Ok(dropped));
                }
            }
            (Err(_), Some(dropped)) => *dropped += data.len() as u64,
            (Err(e), None) => {
                tracing::warn!("log {}: {e}", path.display());
                dropping = Some(data.len() as u64);
                if let Some(say) = unwritable.as_ref() {
                    say(Err(e));
                }
            }
        }
        if let Some(&last) = data.last() {
            ends_line = last == b'\n';
        }
        if let Some(wait) = bucket.as_mut().and_then(|b| b.take(n)) {
            if let Some(say) = throttled.take() {
                say();
            }
            // The pipe fills meanwhile: take a pipe's worth at each
            // wake-up rather than 4 KiB (16 times fewer of them).
            if buf.len() < THROTTLED_BUF {
                buf.resize(THROTTLED_BUF, 0);
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Appends `chunk` to `out` with the stamp of `at` before each line that
/// begins in it. `at_start` says whether the chunk begins a line, and is
/// left saying whether the next one does.
fn stamp_lines(chunk: &[u8], at: SystemTime, at_start: &mut bool, out: &mut Vec<u8>) {
    // Formatted once, where it is first written; copied from there after.
    let mut stamp: Option<std::ops::Range<usize>> = None;
    let mut rest = chunk;
    while !rest.is_empty() {
        if *at_start {
            match stamp.clone() {
                Some(written) => out.extend_from_within(written),
                None => {
                    let from = out.len();
                    stamp::utc(out, at);
                    out.push(b' ');
                    stamp = Some(from..out.len());
                }
            }
        }
        let line = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |nl| nl + 1);
        out.extend_from_slice(&rest[..line]);
        *at_start = rest[line - 1] == b'\n';
        rest = &rest[line..];
    }
}

/// [`pump_log`] of a child's output on its own task; the receiver hears
/// when it has copied everything (the pipe's last writer closed), or is
/// dropped.
pub fn spawn_pump(
    read: OwnedFd,
    path: PathBuf,
    max: u64,
    opts: PumpOptions,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, pumped) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        pump_log(read, path, max, opts).await;
        let _ = done.send(());
    });
    pumped
}

/// Lines of output shown in the events after an exit or a failure, as
/// `systemctl status` shows a unit's last lines.
pub const SHOWN_LINES: usize = 10;
/// How much of a log's end is read for them.
const TAIL_BYTES: u64 = 4096;
/// Characters kept of each line.
const LINE_WIDTH: usize = 200;

/// The last `n` non-blank lines of a log (from its last 4 KiB), fit for an
/// event line: without their time stamps, terminal escape sequences
/// removed, other control characters as spaces, what a carriage return
/// overwrote dropped, each cut at 200 characters. Nothing if the file
/// cannot be read.
pub fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let lines = deployd_lib::tail::last_lines(path, TAIL_BYTES);
    let mut shown: Vec<String> = lines
        .iter()
        .rev()
        .filter_map(|l| shown_line(stamp::strip(l)))
        .take(n)
        .collect();
    shown.reverse();
    shown
}

fn shown_line(line: &str) -> Option<String> {
    // A progress bar redrawn with \r, or a \r\n ending: what is visible.
    let line = line.rsplit('\r').find(|s| !s.trim().is_empty())?;
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters final byte; others: ESC and one more.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            c if deployd_lib::printable::is_unsafe(c) => out.push(' '),
            c => out.push(c),
        }
    }
    let trimmed = out.trim_end();
    if trimmed.trim_start().is_empty() {
        return None;
    }
    Some(match trimmed.char_indices().nth(LINE_WIDTH) {
        Some((cut, _)) => format!("{}...", &trimmed[..cut]),
        None => trimmed.to_string(),
    })
}

fn open_log(path: &Path) -> Option<File> {
    // Read too: whether it ends mid-line.
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("log {}: {e}", path.display());
            None
        }
    }
}

/// The start time of a process in clock ticks since boot, from
/// `/proc/PID/stat`: with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// What an instance's processes use, as `instances/N/usage` shows it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    /// The leader and its descendants still running.
    pub processes: u32,
    /// Their resident memory, summed (pages they share count once each).
    pub rss: u64,
    /// Their CPU time, user and system, including the children they waited for.
    pub cpu: Duration,
}

impl Usage {
    /// The `usage` file.
    pub fn render(&self) -> String {
        format!(
            "processes {}\nrss {}\ncpu {:.2}\n",
            self.processes,
            self.rss,
            self.cpu.as_secs_f64()
        )
    }
}

/// How often an instance with `memory_max` has its memory sampled.
pub const MEMORY_INTERVAL: Duration = Duration::from_secs(1);

/// Samples the resident memory of the process tree led by `leader` every
/// [`MEMORY_INTERVAL`] (as [`usage`] reads it) and calls `over` with each
/// sample above `limit`. Runs until aborted; an exited leader reads as 0.
pub async fn watch_memory(leader: u32, limit: u64, over: impl Fn(u64)) {
    let mut tick = tokio::time::interval(MEMORY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rss = usage(leader).rss;
        if rss > limit {
            over(rss);
        }
    }
}

/// Most processes one instance's usage walks (a fork bomb stays cheap to read).
const USAGE_MAX_PROCESSES: usize = 4096;

/// The usage of the process tree led by `leader`, from `/proc`: the leader
/// and its descendants (through `/proc/PID/task/TID/children`). Zero if
/// `leader` no longer leads its own process group (it exited).
pub fn usage(leader: u32) -> Usage {
    // SAFETY: sysconf only reads configuration values.
    let (tick, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (tick, page) = (tick.max(1) as f64, page.max(0) as u64);
    let mut total = Usage::default();
    let mut ticks = 0u64;
    let mut todo = vec![leader];
    let mut seen = 0usize;
    while let Some(pid) = todo.pop() {
        seen += 1;
        if seen > USAGE_MAX_PROCESSES {
            break;
        }
        let Some(st) = proc_stat(pid) else { continue };
        if pid == leader && st.pgrp != leader {
            return Usage::default();
        }
        if st.state == 'Z' {
            continue;
        }
        total.processes += 1;
        total.rss += st.rss_pages * page;
        ticks += st.ticks;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.filter_map(|t| t.ok()) {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    total.cpu = Duration::from_secs_f64(ticks as f64 / tick);
    total
}

/// The fields of `/proc/PID/stat` that [`usage`] needs.
struct ProcStat {
    state: char,
    pgrp: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    ticks: u64,
    rss_pages: u64,
}

/// The process group `pid` is in, while it runs.
fn group_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|st| st.pgrp)
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        ticks: num(11)? + num(12)? + num(13)? + num(14)?,
        rss_pages: num(21)?,
    })
}

/// Kills the process groups a previous deployd left running. `groups` holds
/// each group leader's pid and start time, as recorded when it was started.
/// Returns how many groups were signalled.
pub fn kill_leftovers(groups: &[(u32, u64)]) -> usize {
    let candidates: Vec<u32> = groups
        .iter()
        // The pid now names another process: the old group is long gone
        // (a pid is not reused while its group exists).
        .filter(|&&(pid, started)| start_time(pid).is_none_or(|t| t == started))
        .map(|&(pid, _)| pid)
        .collect();
    // Only groups with a live process: the guard has usually stopped them
    // already, and zombies waiting for init are not worth a word.
    let killed: Vec<u32> = live_groups(&candidates)
        .into_iter()
        .filter(|&pid| killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok())
        .collect();
    // They are not our children; wait (briefly) until none is running.
    // Zombies don't count: their new parent reaps them when it will.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until && running_in_groups(&killed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed.len()
}

/// Whether a process that is not a zombie belongs to one of these groups.
fn running_in_groups(groups: &[u32]) -> bool {
    !live_groups(groups).is_empty()
}

/// Those of `groups` that hold a process that is not a zombie.
pub(crate) fn live_groups(groups: &[u32]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut live: Vec<u32> = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            // After the command name: state, ppid, pgrp.
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split(' ');
            let state = f.next()?;
            let pgrp = f.nth(1)?.parse::<u32>().ok()?;
            (state != "Z" && groups.contains(&pgrp)).then_some(pgrp)
        })
        .collect();
    live.sort_unstable();
    live.dedup();
    live
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child's output: stamped, no rate.
    fn stamped() -> PumpOptions {
        PumpOptions {
            stamped: true,
            ..PumpOptions::default()
        }
    }

    /// Past its rate the pump reads no faster: the writer waits (its
    /// writes block on a full pipe), nothing is lost, the first wait is
    /// said once. 1.5 MiB at 512 KiB/s, a second's burst first: at least
    /// two seconds.
    #[tokio::test]
    async fn a_pump_reads_no_faster_than_its_rate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        let (r, w) = log_pipe().expect("pipe");
        let said = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = said.clone();
        let opts = PumpOptions {
            stamped: false,
            rate: 512 << 10,
            throttled: Some(Box::new(move || {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            })),
            unwritable: None,
        };
        let pump = tokio::spawn(pump_log(r, path.clone(), 1 << 30, opts));
        let t0 = std::time::Instant::now();
        let writer = std::thread::spawn(move || {
            let mut w = File::from(w);
            for _ in 0..24 {
                w.write_all(&[b'x'; 64 << 10]).expect("write");
            }
        });
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .expect("join")
            .expect("writer");
        pump.await.expect("pump");
        assert!(
            t0.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(std::fs::metadata(&path).expect("log").len(), 24 << 16);
        assert_eq!(said.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// What a pump with `max` made of `chunks`, each one write: the log
    /// moved to `.1`, and the log.
    async fn pumped(max: u64, chunks: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        let (r, w) = log_pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, path.clone(), max, stamped()));
        let mut w = File::from(w);
        for chunk in chunks {
            w.write_all(chunk).expect("write");
            w.flush().expect("flush");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(w);
        pump.await.expect("pump");
        let old = std::fs::read(dir.path().join("0.log.1")).expect("0.log.1");
        (old, std::fs::read(&path).expect("0.log"))
    }

    /// Output that cannot be written (a full disk: /dev/full says ENOSPC
    /// to every write) is said once, not dropped silently.
    #[tokio::test]
    async fn a_log_that_cannot_be_written_is_said_once() {
        let said = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let log = said.clone();
        let opts = PumpOptions {
            unwritable: Some(Box::new(move |r| log.lock().push(r))),
            ..stamped()
        };
        let (r, w) = log_pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, PathBuf::from("/dev/full"), 1 << 20, opts));
        let mut w = File::from(w);
        for _ in 0..3 {
            w.write_all(b"a line\n").expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(w);
        pump.await.expect("pump");
        let said = said.lock().clone();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0]
                .as_ref()
                .unwrap_err()
                .contains("No space left on device"),
            "{said:?}"
        );
    }

    #[tokio::test]
    async fn a_line_under_way_at_the_move_to_dot_one_ends_in_the_old_file() {
        // A line begun in one write and ended in the next, which passes
        // the limit; then a line of its own.
        let chunks = [
            vec![b'a'; 60 << 10],
            [vec![b'a'; 1000], b"\nbbb\n".to_vec(), vec![b'c'; 4000]].concat(),
        ];
        let (old, new) = pumped(64 << 10, &chunks).await;
        assert_eq!(old.last(), Some(&b'\n'), "the old file ends its line");
        assert_eq!(old.len(), stamp::LEN + 1 + (60 << 10) + 1000 + 1);
        // The new one begins with a line of its own, stamped.
        let new = String::from_utf8(new).expect("utf-8");
        assert!(stamp::split(&new).is_some(), "{}", &new[..40]);
        let lines: Vec<&str> = new.lines().map(stamp::strip).collect();
        assert_eq!(lines, ["bbb".to_string(), "c".repeat(4000)]);
    }

    #[tokio::test]
    async fn a_log_past_its_max_moves_to_dot_one() {
        // 40 KiB chunks, each one write: the third would pass 100 KiB.
        let chunks = [b'a', b'b', b'c'].map(|c| vec![c; 40 << 10]);
        let (old, new) = pumped(100 << 10, &chunks).await;
        // One line: one stamp, at its start.
        assert_eq!(old.len() + new.len(), (120 << 10) + stamp::LEN + 1);
        assert!(old.len() <= 100 << 10 && new.len() <= 100 << 10);
        assert_eq!(
            (old[stamp::LEN + 1], new.last().copied()),
            (b'a', Some(b'c'))
        );
    }

    #[test]
    fn each_line_is_stamped_where_it_begins() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_623_765_123);
        let t = "2025-12-01T21:16:05.123Z ";
        let stamped = |chunks: &[&str], mut at_start: bool| {
            let mut out = Vec::new();
            for c in chunks {
                stamp_lines(c.as_bytes(), at, &mut at_start, &mut out);
            }
            (String::from_utf8(out).unwrap(), at_start)
        };
        assert_eq!(
            stamped(&["one\ntwo\n"], true),
            (format!("{t}one\n{t}two\n"), true)
        );
        // A line split across reads has one stamp; an empty line has its own.
        assert_eq!(
            stamped(&["par", "tial\n\nx"], true),
            (format!("{t}partial\n{t}\n{t}x"), false)
        );
        // Carried on from a line begun before: not stamped again.
        assert_eq!(stamped(&["end\n"], false), ("end\n".to_string(), true));
        assert_eq!(stamped(&[""], true), (String::new(), true));
    }

    #[tokio::test]
    async fn a_log_taken_over_mid_line_goes_on_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2025-12-01T21:16:05.123Z half a").unwrap();
        let (r, w) = log_pipe().expect("pipe");
        let pump = tokio::spawn(pump_log(r, path.clone(), 1 << 20, stamped()));
        File::from(w).write_all(b" line\nnext\n").expect("write");
        pump.await.expect("pump");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "2025-12-01T21:16:05.123Z half a line");
        let (t, next) = stamp::split(lines[1]).expect("a stamp");
        assert_eq!((t.len(), next, lines.len()), (stamp::LEN, "next", 2));
        assert!(t > "2026-", "{t}");
        // What the events show of it: the lines, without their stamps.
        assert_eq!(last_lines(&path, 10), ["half a line", "next"]);
    }

    #[test]
    fn the_last_lines_of_a_log_are_shown_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        assert!(last_lines(&path, 10).is_empty(), "no file, no lines");
        std::fs::write(
            &path,
            "starting\n\n  \ndownloading 10%\rdownloading 100%\r\n\x1b[31merror:\x1b[0m no\tconfig\r\nbye\n",
        )
        .unwrap();
        assert_eq!(
            last_lines(&path, 10),
            ["starting", "downloading 100%", "error: no config", "bye"]
        );
        assert_eq!(last_lines(&path, 2), ["error: no config", "bye"]);

        // A long log: from its end, never a cut first line, long lines cut.
        let long = format!("{}\n", "x".repeat(300));
        let mut text = String::new();
        for i in 0..100 {
            text.push_str(&format!("line {i}\n"));
        }
        text.push_str(&long);
        text.push_str("last");
        std::fs::write(&path, &text).unwrap();
        let lines = last_lines(&path, 10);
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert_eq!(lines[8], format!("{}...", "x".repeat(200)));
        assert_eq!(lines[9], "last");
        assert_eq!(lines[0], "line 92");
        // Multibyte characters are cut whole, and invalid bytes shown.
        let mut bytes = "é".repeat(250).into_bytes();
        bytes.extend(b"\n\xff ok");
        std::fs::write(&path, bytes).unwrap();
        let lines = last_lines(&path, 10);
        assert_eq!(lines[0], format!("{}...", "é".repeat(200)));
        assert_eq!(lines[1], "\u{fffd} ok");
    }

    #[test]
    fn only_plain_command_lines_skip_the_shell() {
        assert_eq!(
            plain_words("exec exec ./server --port=80"),
            Some(vec!["./server", "--port=80"])
        );
        assert_eq!(
            plain_words("exec node app.js"),
            Some(vec!["node", "app.js"])
        );
        for shell in [
            "exec ./server --port $PORT",
            "node app.js",
            "exit 3",
            "echo 'a b'",
            "a && b",
            "cd x; ./y",
            "ls *",
            "A=1 ./x",
            "exec",
            "",
            "x > log",
            "echo ~",
        ] {
            assert_eq!(plain_words(shell), None, "{shell}");
        }
    }

    #[test]
    fn usage_counts_the_leader_and_its_descendants() {
        // A group leader whose child burns CPU and holds 32 MiB.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = "python3 -c 'b = bytearray(b\"x\") * (32 << 20)\nimport time\nt = time.time()\n\
                      while time.time() - t < 0.3: pass\nprint(len(b), flush=True)\ntime.sleep(60)' & \
                      wait";
        let (r, w) = log_pipe().expect("pipe");
        let pid = spawn(Spawn {
            command: script,
            dir: dir.path(),
            env: Vec::new(),
            output: Some(w),
            account: None,
        })
        .expect("spawn");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(std::fs::File::from(r)),
            &mut line,
        )
        .expect("read");
        let u = usage(pid);
        signal_group(pid, libc::SIGKILL);
        let _ = waitpid(Pid::from_raw(pid as i32), None);
        assert_eq!(line.trim(), (32u32 << 20).to_string());
        assert_eq!(u.processes, 2, "{u:?}");
        assert!(u.rss >= 32 << 20, "{u:?}");
        assert!(u.cpu >= Duration::from_millis(200), "{u:?}");
        assert!(
            u.render().starts_with("processes 2\nrss "),
            "{}",
            u.render()
        );
        // Gone (reaped here or by another test's reaper): nothing.
        assert_eq!(usage(pid), Usage::default());
    }

    #[test]
    fn leftovers_are_killed_only_when_theirs_and_running() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let started = start_time(pid).expect("start time");
        // Another process's start time: the pid was reused, not ours.
        assert_eq!(kill_leftovers(&[(pid, started + 1)]), 0);
        assert!(running_in_groups(&[pid]));
        // It waits for the group to end (a zombie has ended).
        assert_eq!(kill_leftovers(&[(pid, started)]), 1);
        assert!(!running_in_groups(&[pid]));
        // Ended: nothing to kill, nothing to report.
        assert_eq!(kill_leftovers(&[(pid, started)]), 0);
        // Reaped here, or by another test's reaper (waitpid(-1)).
        let _ = child.wait();
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }
}
