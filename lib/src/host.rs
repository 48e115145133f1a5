//! What a manifest needs of the machine it runs on: the account its `user`
//! directive names, looked up in the machine's user database (through the
//! C library, so `/etc/passwd` and whatever NSS adds: LDAP, systemd's
//! dynamic users), its working directory, and the files its `env_file`
//! lines name.
//!
//! [`parse`](crate::manifest::parse) only checks that these are well
//! formed; [`load`] also checks that this machine has the account and that
//! each env file reads and parses, so that `deploy check` and an `apply`
//! refuse a misspelt account or a broken env file with its line and column,
//! before any instance fails to start. deployd reads them again each time
//! it starts a process ([`lookup`], [`env_files`]): a change since the
//! apply takes effect at the next start, as with systemd's `User=` and
//! `EnvironmentFile=`.

use std::ffi::CString;
use std::path::Path;

use crate::envfile;
use crate::manifest::{self, Diagnostic, LoadError, Loaded, Manifest, User};

/// A resolved `user`: the credentials a process is given, and what its
/// environment says about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The user id (real, effective and saved).
    pub uid: u32,
    /// The group id (real, effective and saved).
    pub gid: u32,
    /// The supplementary groups: the user's groups in the group database,
    /// `gid` included; just `gid` for a uid with no entry.
    pub groups: Vec<u32>,
    /// The login name, when the user database has the uid.
    pub name: Option<String>,
    /// The home directory, when the user database has the uid.
    pub home: Option<String>,
}

impl Account {
    /// The variables a login as this account would set: `HOME`, `USER` and
    /// `LOGNAME` (`HOME=/` for a uid the database does not have, as Docker
    /// does), so that a program does not look for its files in root's home.
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut env = vec![(
            "HOME".to_string(),
            self.home.clone().unwrap_or_else(|| "/".to_string()),
        )];
        if let Some(name) = &self.name {
            env.push(("USER".to_string(), name.clone()));
            env.push(("LOGNAME".to_string(), name.clone()));
        }
        env
    }
}

/// Looks `user` up in this machine's user and group databases.
///
/// A user given by name must exist. A numeric uid need not (containers and
/// sandboxes use bare ids), but then its group must be given too: a
/// process without a primary group would otherwise get gid 0, root's.
pub fn lookup(user: &User) -> Result<Account, String> {
    let entry = if is_id(&user.user) {
        let uid = parse_id(&user.user)?;
        passwd_by_uid(uid)?.unwrap_or(Passwd {
            uid,
            gid: None,
            name: None,
            home: None,
        })
    } else {
        passwd_by_name(&user.user)?
            .ok_or_else(|| format!("no user '{}' on this machine", user.user))?
    };
    let gid = match &user.group {
        Some(g) if is_id(g) => parse_id(g)?,
        Some(g) => group_by_name(g)?.ok_or_else(|| format!("no group '{g}' on this machine"))?,
        None => entry.gid.ok_or_else(|| {
            format!(
                "uid {} has no entry in the user database, so no primary group: \
                 name one (user {}:GID)",
                entry.uid, entry.uid
            )
        })?,
    };
    let groups = match &entry.name {
        Some(name) => group_list(name, gid)?,
        None => vec![gid],
    };
    Ok(Account {
        uid: entry.uid,
        gid,
        groups,
        name: entry.name,
        home: entry.home,
    })
}

/// The variables of a manifest's env files, read now from `dir` (the
/// manifest's folder) in order, a later file's value winning; an error
/// names the file, and for a bad line its line and column.
pub fn env_files(dir: &Path, m: &Manifest) -> Result<Vec<(String, String)>, String> {
    let mut vars: Vec<(String, String)> = Vec::new();
    for f in &m.env_files {
        for (k, v) in env_file(dir, f)? {
            vars.retain(|(o, _)| *o != k);
            vars.push((k, v));
        }
    }
    Ok(vars)
}

/// A fingerprint of the variables [`env_files`] read: deployd keeps the
/// one each instance started with, so that `apply` can tell an env file
/// changed since (and restart the instances) without keeping secrets.
pub fn env_digest(vars: &[(String, String)]) -> u64 {
    use sha2::{Digest, Sha256};
    // An environment has no order: lines moved around are no change.
    let mut sorted: Vec<&(String, String)> = vars.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (k, v) in sorted {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    d[..8].iter().fold(0, |n, b| (n << 8) | u64::from(*b))
}

fn env_file(dir: &Path, f: &str) -> Result<Vec<(String, String)>, String> {
    let path = dir.join(f);
    let shown = path.display();
    // Regular files only, read without waiting (a FIFO) and up to the
    // limit (`/dev/zero`): it is read on deployd's engine thread.
    let bytes = crate::readfile::read_regular(&path, envfile::MAX_SIZE)
        .map_err(|e| format!("env_file {shown}: {e}"))?;
    envfile::parse(&bytes).map_err(|d| {
        d.iter()
            .map(|d| format!("env_file {}", d.display(&shown.to_string())))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// [`manifest::load`], and then the checks that need this machine: its
/// `user` must exist here, its `dir` be a directory, and its env files
/// must read and parse. Each
/// problem is reported like a parse error, at its directive's line.
pub fn load(path: &Path) -> Result<Loaded, LoadError> {
    let loaded = manifest::load(path)?;
    let m = &loaded.manifest;
    let mut diagnostics = Vec::new();
    let mut at = |directive: &str, nth: usize, message: String| {
        let positions = manifest::position_of(&loaded.text, directive);
        let (line, col) = positions.get(nth).copied().unwrap_or((1, 1));
        diagnostics.push(Diagnostic { line, col, message });
    };
    if let Some(user) = &m.user {
        if let Err(message) = lookup(user) {
            at("user", 0, message);
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Some(d) = &m.dir {
        let wd = dir.join(d);
        match std::fs::metadata(&wd) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => at("dir", 0, format!("dir {}: not a directory", wd.display())),
            Err(e) => at("dir", 0, format!("dir {}: {e}", wd.display())),
        }
    }
    for (nth, f) in m.env_files.iter().enumerate() {
        if let Err(message) = env_file(dir, f) {
            at("env_file", nth, message);
        }
    }
    if diagnostics.is_empty() {
        Ok(loaded)
    } else {
        diagnostics.sort_by_key(|d| (d.line, d.col));
        Err(LoadError::Invalid {
            file: path.display().to_string(),
            diagnostics,
        })
    }
}

/// The manifest's limits (`memory_max`, `cpu_max`, `pids_max`) whose
/// controller is not among `available`: an error at each such directive;
/// `loaded` as it was if there is none.
pub fn check_limits(file: &Path, loaded: Loaded, available: &[&str]) -> Result<Loaded, LoadError> {
    let m = &loaded.manifest;
    let asked = [
        ("memory_max", "memory", m.memory_max.is_some()),
        ("cpu_max", "cpu", m.cpu_max.is_some()),
        ("pids_max", "pids", m.pids_max.is_some()),
    ];
    let diagnostics: Vec<Diagnostic> = asked
        .into_iter()
        .filter(|(_, c, asked)| *asked && !available.contains(c))
        .map(|(directive, c, _)| {
            let (line, col) = manifest::position_of(&loaded.text, directive)
                .first()
                .copied()
                .unwrap_or((1, 1));
            Diagnostic {
                line,
                col,
                message: format!(
                    "{directive} needs the cgroup {c} controller, which this host does not give deployd (cgroup v2 with {c} delegated to deployd's cgroup, or a cgroup v1 {c} hierarchy)"
                ),
            }
        })
        .collect();
    match diagnostics.is_empty() {
        true => Ok(loaded),
        false => Err(LoadError::Invalid {
            file: file.display().to_string(),
            diagnostics,
        }),
    }
}

/// The limit controllers this host has at all: those cgroup v2's root
/// offers, and those mounted as cgroup v1 hierarchies. (deployd knows its
/// own: whether they are delegated to its cgroup.)
pub fn controllers() -> Vec<&'static str> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v2 = String::new();
    let mut v1: Vec<String> = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        let (kind, options) = (r.next().unwrap_or(""), r.nth(1).unwrap_or(""));
        let at = left.split(' ').nth(4).unwrap_or("");
        match kind {
            "cgroup2" => {
                v2 = std::fs::read_to_string(Path::new(at).join("cgroup.controllers"))
                    .unwrap_or_default()
            }
            "cgroup" => v1.extend(options.split(',').map(str::to_owned)),
            _ => {}
        }
    }
    ["memory", "cpu", "pids"]
        .into_iter()
        .filter(|c| v2.split_whitespace().any(|w| w == *c) || v1.iter().any(|o| o == c))
        .collect()
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_id(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|n| *n < u32::MAX)
        .ok_or_else(|| format!("'{s}' is not an id below {}", u32::MAX))
}

/// The fields of a passwd entry deployd uses.
struct Passwd {
    uid: u32,
    /// `None` only for a uid the database does not have.
    gid: Option<u32>,
    name: Option<String>,
    home: Option<String>,
}

/// What a lookup of the account databases (NSS, through nix) met, for
/// `what`.
fn lookup_error(what: &str, e: nix::errno::Errno) -> String {
    format!("cannot look up {what}: {}", std::io::Error::from(e))
}

fn passwd_of(u: nix::unistd::User) -> Passwd {
    let home = u.dir.to_string_lossy().into_owned();
    Passwd {
        uid: u.uid.as_raw(),
        gid: Some(u.gid.as_raw()),
        name: Some(u.name),
        home: Some(home).filter(|h| !h.is_empty()),
    }
}

fn passwd_by_name(name: &str) -> Result<Option<Passwd>, String> {
    if name.contains('\0') {
        return Err(format!("user '{name}' contains a NUL byte"));
    }
    nix::unistd::User::from_name(name)
        .map(|u| u.map(passwd_of))
        .map_err(|e| lookup_error(&format!("user '{name}'"), e))
}

fn passwd_by_uid(uid: u32) -> Result<Option<Passwd>, String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map(|u| u.map(passwd_of))
        .map_err(|e| lookup_error(&format!("uid {uid}"), e))
}

fn group_by_name(name: &str) -> Result<Option<u32>, String> {
    if name.contains('\0') {
        return Err(format!("group '{name}' contains a NUL byte"));
    }
    nix::unistd::Group::from_name(name)
        .map(|g| g.map(|g| g.gid.as_raw()))
        .map_err(|e| lookup_error(&format!("group '{name}'"), e))
}

/// The groups `name` belongs to, `gid` first, as initgroups would set them.
fn group_list(name: &str, gid: u32) -> Result<Vec<u32>, String> {
    let c = CString::new(name).map_err(|_| format!("user '{name}' contains a NUL byte"))?;
    nix::unistd::getgrouplist(&c, nix::unistd::Gid::from_raw(gid))
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .map_err(|e| {
            format!(
                "cannot list the groups of '{name}': {}",
                std::io::Error::from(e)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(u: &str, g: Option<&str>) -> User {
        User {
            user: u.into(),
            group: g.map(str::to_string),
        }
    }

    #[test]
    fn root_by_name_and_by_id() {
        let by_name = lookup(&user("root", None)).expect("root");
        assert_eq!((by_name.uid, by_name.gid), (0, 0));
        assert_eq!(by_name.name.as_deref(), Some("root"));
        assert!(by_name.groups.contains(&0), "{:?}", by_name.groups);
        let by_id = lookup(&user("0", None)).expect("uid 0");
        assert_eq!(by_id, by_name, "a known uid reads its entry");
        assert_eq!(
            by_name.environment(),
            [
                (
                    "HOME".to_string(),
                    by_name.home.clone().expect("root's home")
                ),
                ("USER".to_string(), "root".to_string()),
                ("LOGNAME".to_string(), "root".to_string()),
            ]
        );
    }

    #[test]
    fn a_group_overrides_the_primary_one() {
        let a = lookup(&user("root", Some("12345"))).expect("root:12345");
        assert_eq!((a.uid, a.gid), (0, 12345));
        assert_eq!(a.groups.first(), Some(&12345));
    }

    #[test]
    fn unknown_accounts_are_errors_that_say_what_to_do() {
        let e = lookup(&user("no-such-user-deployd", None)).expect_err("unknown");
        assert_eq!(e, "no user 'no-such-user-deployd' on this machine");
        let e = lookup(&user("root", Some("no-such-group-deployd"))).expect_err("group");
        assert_eq!(e, "no group 'no-such-group-deployd' on this machine");
        // A bare uid the database lacks needs its group named.
        let e = lookup(&user("3999999", None)).expect_err("bare uid");
        assert!(e.contains("user 3999999:GID"), "{e}");
        let a = lookup(&user("3999999", Some("3999999"))).expect("bare uid:gid");
        assert_eq!(
            (a.uid, a.gid, a.groups.as_slice()),
            (3999999, 3999999, &[3999999][..])
        );
        assert_eq!(a.environment(), [("HOME".to_string(), "/".to_string())]);
    }

    #[test]
    fn an_env_digest_changes_with_a_value_not_with_the_order() {
        let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let d = env_digest(&vars(&[("A", "1"), ("B", "2")]));
        assert_eq!(d, env_digest(&vars(&[("B", "2"), ("A", "1")])));
        assert_ne!(d, env_digest(&vars(&[("A", "1"), ("B", "3")])));
        assert_ne!(d, env_digest(&vars(&[("A", "1")])));
        // A key and value are not run together: A=1B is not A1=B.
        assert_ne!(
            env_digest(&vars(&[("A", "1B")])),
            env_digest(&vars(&[("A1", "B")]))
        );
    }

    #[test]
    fn env_files_are_read_in_order_and_their_errors_located() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.manifest");
        std::fs::write(dir.path().join("common.env"), "A=1\nB=common\n").expect("write");
        std::fs::write(dir.path().join("secret.env"), "B=secret\nC='c c'\n").expect("write");
        std::fs::write(
            &path,
            "exec ./app\nenv_file common.env\nenv_file secret.env\n",
        )
        .expect("write");
        let loaded = load(&path).expect("valid");
        let vars = env_files(dir.path(), &loaded.manifest).expect("read");
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(vars, [("A", "1"), ("B", "secret"), ("C", "c c")]);

        // A missing file and a bad line, each at its own env_file line.
        std::fs::write(dir.path().join("secret.env"), "OK=1\nPORT=80\n").expect("write");
        std::fs::write(
            &path,
            "exec ./app\nenv_file gone.env\nuser no-such-user-deployd\nenv_file secret.env\n",
        )
        .expect("write");
        let e = load(&path).expect_err("invalid").to_string();
        let (p, d) = (path.display(), dir.path().display());
        assert_eq!(
            e,
            format!(
                "{p}:2:10: env_file {d}/gone.env: No such file or directory (os error 2)\n\
                 {p}:3:6: no user 'no-such-user-deployd' on this machine\n\
                 {p}:4:10: env_file {d}/secret.env:2:1: PORT is set by deployd for each instance"
            )
        );
    }

    #[test]
    fn load_reports_a_dir_that_is_not_there_at_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.manifest");
        std::fs::create_dir(dir.path().join("app")).expect("mkdir");
        std::fs::write(dir.path().join("file"), "").expect("write");
        std::fs::write(&path, "exec ./run\ndir app\n").expect("write");
        load(&path).expect("an existing dir");
        let d = dir.path().display();
        for (wd, why) in [
            ("gone", "No such file or directory (os error 2)"),
            ("file", "not a directory"),
        ] {
            std::fs::write(&path, format!("exec ./run\ndir {wd}\n")).expect("write");
            let e = load(&path).expect_err("invalid").to_string();
            assert_eq!(e, format!("{}:2:5: dir {d}/{wd}: {why}", path.display()));
        }
    }

    #[test]
    fn load_reports_an_unknown_user_at_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.manifest");
        std::fs::write(&path, "exec ./app\n# who\n  user  wbe-x\n").expect("write");
        let e = load(&path).expect_err("unknown user").to_string();
        assert_eq!(
            e,
            format!("{}:3:9: no user 'wbe-x' on this machine", path.display())
        );
        std::fs::write(&path, "exec ./app\nuser root\n").expect("write");
        let loaded = load(&path).expect("root exists");
        assert_eq!(loaded.manifest.user, Some(user("root", None)));
    }
}
