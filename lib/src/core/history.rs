//! A service's history: the manifests of its last versions, newest last,
//! which `rollback` and `history/` read, and the record that survives a
//! restart of deployd ([`Saved`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::manifest::{self, Version, VersionPrefix};
use crate::name::ServiceName;
use crate::rollout::{Record, Refusal, RefusalKind, Service, Spec};

/// Manifests kept per service.
pub const HISTORY: usize = 10;

/// A service's manifests by version, oldest first.
pub type History = Vec<(Version, Arc<str>)>;

/// What is saved of a service: its machine's record and its history's
/// versions (the manifests themselves are saved apart, once each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The state machine's record.
    pub record: Record,
    /// Versions in `history/`, oldest first.
    pub history: Vec<Version>,
}

/// What is saved of a service with this machine and history.
pub fn saved(machine: &Service, history: &[(Version, Arc<str>)]) -> Saved {
    Saved {
        record: machine.record(),
        history: history.iter().map(|(v, _)| *v).collect(),
    }
}

/// The history once `machine` has taken a command: its target and
/// previous manifests added or moved up (the target newest, the previous
/// version just before it), trimmed to [`HISTORY`] but never dropping a
/// version still running.
pub fn next(machine: &Service, history: &[(Version, Arc<str>)]) -> History {
    let mut next = history.to_vec();
    let mut specs = vec![machine.target().clone()];
    specs.extend(machine.previous().cloned());
    for spec in specs {
        match next.iter().position(|(v, _)| *v == spec.version) {
            Some(pos) => {
                let item = next.remove(pos);
                next.push(item);
            }
            None => next.push((spec.version, spec.text.clone())),
        }
    }
    let target = machine.version();
    if let Some(pos) = next.iter().position(|(v, _)| *v == target) {
        let item = next.remove(pos);
        next.push(item);
    }
    let mut in_use = machine.versions_in_use();
    in_use.push(target);
    in_use.extend(machine.previous().map(|p| p.version));
    while next.len() > HISTORY {
        match next.iter().position(|(v, _)| !in_use.contains(v)) {
            Some(pos) => {
                next.remove(pos);
            }
            None => break,
        }
    }
    next
}

/// The one version of a service's history that `prefix` names, with its
/// manifest text: none is ENOENT, several EINVAL naming them.
pub fn find<'h>(
    history: &'h [(Version, Arc<str>)],
    prefix: &VersionPrefix,
    service: &ServiceName,
) -> Result<(Version, &'h Arc<str>), Refusal> {
    let mut found = history.iter().filter(|(v, _)| prefix.matches(*v));
    match (found.next(), found.next()) {
        (Some((v, text)), None) => Ok((*v, text)),
        (None, _) => Err(Refusal {
            kind: RefusalKind::NotFound,
            message: format!(
                "version {prefix} is not in the history of {service} (see its history/ directory)"
            ),
        }),
        (Some((a, _)), Some((b, _))) => {
            let mut all = vec![a.to_string(), b.to_string()];
            all.extend(found.map(|(v, _)| v.to_string()));
            Err(Refusal {
                kind: RefusalKind::Invalid,
                message: format!(
                    "version {prefix} is ambiguous in the history of {service}: {}; give more digits",
                    all.join(", ")
                ),
            })
        }
    }
}

/// The manifest of version `v`, from a service's history.
pub fn resolve(history: &[(Version, Arc<str>)], v: Version) -> Option<Spec> {
    let (_, text) = history.iter().find(|(hv, _)| *hv == v)?;
    let m = manifest::parse(text.as_bytes()).ok()?;
    Some(Spec::new(m, text.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_prefix_names_one_version_of_the_history() {
        let history: Vec<(Version, Arc<str>)> = ["0123456789ab", "0123ffffffff", "abcdef012345"]
            .iter()
            .map(|v| (v.parse().unwrap(), Arc::from(format!("exec {v}\n"))))
            .collect();
        let web = ServiceName::new("web").unwrap();
        let find = |p: &str| find(&history, &p.parse().unwrap(), &web);
        let (v, text) = find("abcd").unwrap();
        assert_eq!(
            (v.to_string(), &**text),
            ("abcdef012345".into(), "exec abcdef012345\n")
        );
        assert_eq!(find("01234").unwrap().0.to_string(), "0123456789ab");
        assert_eq!(find("0123ffffffff").unwrap().0.to_string(), "0123ffffffff");
        let err = find("0123").unwrap_err();
        assert!(matches!(err.kind, RefusalKind::Invalid));
        assert_eq!(
            err.message,
            "version 0123 is ambiguous in the history of web: 0123456789ab, 0123ffffffff; give more digits"
        );
        let err = find("fff0").unwrap_err();
        assert!(matches!(err.kind, RefusalKind::NotFound));
        assert!(
            err.message
                .starts_with("version fff0 is not in the history of web")
        );
    }
}
