//! `deploy check FILE...`: validates manifests offline, without a server:
//! the language, and what a manifest needs of this machine (its `user`).

use std::io::Write;
use std::path::PathBuf;

use deployd_lib::{host, manifest};

use crate::{Exit, Fail};

/// Checks every file; prints each error as `file:line:col: message` on
/// stderr and one `file: ok` line per valid file on stdout. With `syntax`,
/// only the language is checked, not this machine's accounts.
pub fn run(files: &[PathBuf], syntax: bool) -> Result<Exit, Fail> {
    let load = if syntax { manifest::load } else { host::load };
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    for file in files {
        match load(file) {
            Ok(loaded) => {
                writeln!(
                    out,
                    "{}: ok ({} {})",
                    file.display(),
                    loaded.service,
                    loaded.manifest.version()
                )?;
            }
            Err(e) => {
                failed += 1;
                eprintln!("{e}");
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "deploy: {failed} of {} manifest{} invalid",
            files.len(),
            if files.len() == 1 { "" } else { "s" }
        );
        return Ok(Exit::Failed);
    }
    Ok(Exit::Ok)
}
