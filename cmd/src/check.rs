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
pub fn run(files: &[PathBuf], syntax: bool) -> Result<Exit, Fail> {
    let load = if syntax { manifest::load } else { host::load };
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    let mut loaded = Vec::new();
    for file in files {
        match load(file) {
            Ok(l) => loaded.push((file, l)),
            Err(e) => {
                failed += 1;
                tell!("{e}");
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
                tell!("{}:{line}:{col}: {message}", file.display());
            }
            (None, Some((_, port, other))) => {
                failed += 1;
                let whose = format!("also the port of {other}");
                let error = manifest::shared_port_error(&l.text, *port, &whose);
                tell!("{}:{error}", file.display());
            }
            (None, None) => writeln!(
                out,
                "{}: ok ({} {})",
                file.display(),
                l.service,
                l.manifest.version()
            )?,
        }
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
