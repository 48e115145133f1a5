//! Starting processes: the spawning thread (deployd's main thread, the one
//! that replaces deployd on `reexec`) and what it runs, directly or
//! through `/bin/sh -c`.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use deployd_lib::host::Account;

use super::cgroup;
use super::launch;

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
    /// The kernel's limits on what it starts (instances only).
    pub limits: super::limits::Limits,
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
pub(super) fn spawn_in(s: Spawn<'_>, cgroup: Option<&cgroup::Place>) -> std::io::Result<u32> {
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
    let remove = crate::inherit::NOT_INHERITED;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
