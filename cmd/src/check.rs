//! `deploy check FILE...`: validates manifests offline, without a server:
//! the language, what a manifest needs of this machine (its `user`), and
//! that the files checked together make no `after` cycle and share no
//! public port.

use std::io::Write;
use std::path::PathBuf;

use deployd_lib::order::{self, Graph};
use deployd_lib::{host, manifest};

use crate::{Exit, Fail};

/// Checks every file; prints each error as `file:line:col: message` on
/// stderr and one `file: ok` line per valid file on stdout. With `syntax`,
/// only the language is checked, not this machine's accounts.
pub fn run(files: &[PathBuf], syntax: bool, json: bool) -> Result<Exit, Fail> {
    // Beyond the language: what the manifest needs of this machine, its
    // accounts and its cgroup controllers.
    let have = host::controllers();
    let on_host = |f: &std::path::Path| host::check_limits(f, host::load(f)?, &have);
    let load = |f: &std::path::Path| match syntax {
        true => manifest::load(f),
        false => on_host(f),
    };
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    // With --json: each file, its service and version or its errors.
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let error = |rows: &mut Vec<serde_json::Value>, file: &PathBuf, e: String| match json {
        true => rows.push(serde_json::json!({"file": file.display().to_string(), "error": e})),
        false => tell!("{e}"),
    };
    let mut loaded = Vec::new();
    for file in files {
        match load(file) {
            Ok(l) => loaded.push((file, l)),
            Err(e) => {
                failed += 1;
                error(&mut rows, file, e.to_string());
            }
        }
    }
    // Services named by no file may be deployed already: only cycles
    // among the files are errors here.
    let graph: Graph = loaded
        .iter()
        .map(|(_, l)| (l.service.clone(), l.manifest.after.clone()))
        .collect();
    // Nor can two of them share a public port.
    let shared = manifest::shared_ports(loaded.iter().map(|(_, l)| (&l.service, l.manifest.port)));
    for (file, l) in &loaded {
        let port = shared.iter().find(|(name, _, _)| **name == l.service);
        match (order::cycle_error(&graph, &l.service), port) {
            (Some((first, message)), _) => {
                failed += 1;
                let (line, col) =
                    manifest::position_of_after(&l.text, first.as_str()).unwrap_or((1, 1));
                error(
                    &mut rows,
                    file,
                    format!("{}:{line}:{col}: {message}", file.display()),
                );
            }
            (None, Some((_, port, other))) => {
                failed += 1;
                let whose = format!("also the port of {other}");
                let why = manifest::shared_port_error(&l.text, *port, &whose);
                error(&mut rows, file, format!("{}:{why}", file.display()));
            }
            (None, None) if json => rows.push(serde_json::json!({
                "file": file.display().to_string(),
                "service": l.service.as_str(),
                "version": l.manifest.version().to_string(),
            })),
            (None, None) => writeln!(
                out,
                "{}: ok ({} {})",
                file.display(),
                l.service,
                l.manifest.version()
            )?,
        }
    }
    if json {
        serde_json::to_writer_pretty(&mut out, &rows).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(if failed > 0 { Exit::Failed } else { Exit::Ok });
    }
    if failed > 0 {
        tell!(
            "deploy: {failed} of {} manifest{} invalid",
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        );
        return Ok(Exit::Failed);
    }
    Ok(Exit::Ok)
}
