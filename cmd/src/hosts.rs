//! `deploy hosts`, `deploy drain`, `deploy undrain`: a cluster's hosts, as
//! `/deploy/hosts/HOST/{state,address,instances,ctl}` and `/deploy/cluster`
//! show them.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::ns::{self, NOT_FOUND, Ns};
use crate::{Exit, Fail};

/// One host, as `deploy hosts --json` prints it.
#[derive(Serialize)]
struct Host {
    host: String,
    state: String,
    address: String,
    leader: bool,
    /// `SERVICE N` of each instance it runs.
    instances: Vec<String>,
}

fn not_a_cluster(root: &Path) -> Fail {
    Fail::new(
        NOT_FOUND,
        format!(
            "{}: deployd is not a cluster here (no [cluster] in its configuration): there are no hosts",
            root.display()
        ),
    )
}

/// Every host: name, state, address, the instances it runs; the leader
/// marked.
pub fn list(root: &Path, json: bool) -> Result<Exit, Fail> {
    Ns::open(root)?;
    let dir = root.join("hosts");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|_| not_a_cluster(root))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let leader = std::fs::read_to_string(root.join("cluster"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("leader ").map(str::to_string))
        .unwrap_or_default();
    let hosts: Vec<Host> = names
        .into_iter()
        .map(|h| {
            let d = dir.join(&h);
            Host {
                leader: h == leader,
                state: ns::read_field(&d, "state"),
                address: ns::read_field(&d, "address"),
                instances: ns::read_field(&d, "instances")
                    .lines()
                    .map(str::to_string)
                    .collect(),
                host: h,
            }
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &hosts).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(Exit::Ok);
    }
    let mut rows = vec![vec![
        "HOST".to_string(),
        "STATE".into(),
        "ADDRESS".into(),
        "INSTANCES".into(),
    ]];
    for h in &hosts {
        let name = match h.leader {
            true => format!("{} (leader)", h.host),
            false => h.host.clone(),
        };
        let address = if h.address.is_empty() {
            "-".into()
        } else {
            h.address.clone()
        };
        rows.push(vec![
            name,
            h.state.clone(),
            address,
            h.instances.len().to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(Exit::Ok)
}

/// `drain` (or `undrain`) written to the host's ctl file.
pub fn drain(root: &Path, host: &str, on: bool) -> Result<Exit, Fail> {
    Ns::open(root)?;
    if !root.join("hosts").is_dir() {
        return Err(not_a_cluster(root));
    }
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !host.starts_with('.');
    let dir = root.join("hosts").join(host);
    if !valid || !dir.is_dir() {
        return Err(Fail::new(
            NOT_FOUND,
            format!("no host named {host} (deploy hosts lists them)"),
        ));
    }
    let verb = if on { "drain" } else { "undrain" };
    let msg =
        ns::ctl(&dir.join("ctl"), &format!("{verb}\n")).map_err(|f| crate::refused(host, f))?;
    say!("{msg}");
    Ok(Exit::Ok)
}
