//! `deploy diff FILE...`: what `deploy apply` would change, before it does,
//! like `kubectl diff`: each manifest file against the manifest its service
//! runs (`/deploy/active/SERVICE/manifest`), as a unified diff.

use std::io::Write;
use std::path::{Path, PathBuf};

use deployd_lib::host;
use similar::TextDiff;

use crate::ns::{self, Ns};
use crate::{Exit, Fail};

/// Exit code when a file does not parse (as with a usage error: the input
/// is wrong, and 1 already means "differs").
const INVALID: u8 = 2;

/// What one file is, against what runs.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// No such service yet: `apply` would deploy it.
    New,
    /// Same version: `apply` would do nothing. `true` if the text differs
    /// (comments, layout, defaults written out).
    Unchanged(bool),
    /// Another version: `apply` would roll it out.
    Changed,
}

/// Prints, for each file, `SERVICE: …` and a unified diff against the
/// running manifest. Exit 0 when no file would change anything, 1 when one
/// would, 2 when one does not parse.
pub fn run(ns: &Ns, files: &[PathBuf], json: bool) -> Result<Exit, Fail> {
    let mut out = std::io::stdout().lock();
    let mut differs = false;
    let mut invalid = 0;
    // With --json: one object per file.
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for file in files {
        let loaded = match host::load(file) {
            Ok(l) => l,
            Err(e) => {
                invalid += 1;
                match json {
                    true => rows.push(serde_json::json!({
                        "file": file.display().to_string(),
                        "error": e.to_string(),
                    })),
                    false => tell!("{e}"),
                }
                continue;
            }
        };
        let service = loaded.service.as_str();
        let new_version = loaded.manifest.version();
        let dir = ns.service_path(service);
        let running = if dir.is_dir() {
            let text = ns::read(&dir.join("manifest"))?;
            Some((ns::read_field(&dir, "version"), text))
        } else {
            None
        };
        let old_text = running.as_ref().map_or("", |(_, t)| t.as_str());
        let change = classify(
            running.as_ref().map(|(v, t)| (v.as_str(), t.as_str())),
            &new_version.to_string(),
            &loaded.text,
        );
        differs |= matches!(change, Change::New | Change::Changed);
        if json {
            let mut text = Vec::new();
            if change != Change::Unchanged(false) {
                write_diff(&mut text, service, file, old_text, &loaded.text)?;
            }
            rows.push(serde_json::json!({
                "file": file.display().to_string(),
                "service": service,
                "change": match change {
                    Change::New => "new",
                    Change::Unchanged(_) => "unchanged",
                    Change::Changed => "changed",
                },
                "running_version": running.as_ref().map(|(v, _)| v.clone()),
                "version": new_version.to_string(),
                "diff": String::from_utf8_lossy(&text),
            }));
            continue;
        }
        match &change {
            Change::New => writeln!(out, "{service}: new service ({new_version})")?,
            Change::Unchanged(false) => writeln!(out, "{service}: unchanged ({new_version})")?,
            Change::Unchanged(true) => writeln!(
                out,
                "{service}: unchanged ({new_version}): the text differs only in what the version leaves out (comments, layout, defaults)"
            )?,
            Change::Changed => {
                let old = running.as_ref().map_or("", |(v, _)| v.as_str());
                writeln!(out, "{service}: {old} → {new_version}")?;
            }
        }
        if change != Change::Unchanged(false) {
            write_diff(&mut out, service, file, old_text, &loaded.text)?;
        }
    }
    if json {
        serde_json::to_writer_pretty(&mut out, &rows).map_err(std::io::Error::other)?;
        writeln!(out)?;
    }
    if invalid > 0 {
        return Err(Fail::new(
            INVALID,
            format!(
                "{invalid} of {} manifest{} invalid",
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        ));
    }
    Ok(if differs { Exit::Failed } else { Exit::Ok })
}

fn classify(running: Option<(&str, &str)>, new_version: &str, new_text: &str) -> Change {
    match running {
        None => Change::New,
        Some((v, text)) if v == new_version => Change::Unchanged(text != new_text),
        Some(_) => Change::Changed,
    }
}

fn write_diff(
    out: &mut impl Write,
    service: &str,
    file: &Path,
    old: &str,
    new: &str,
) -> std::io::Result<()> {
    let diff = TextDiff::from_lines(old, new);
    let running = format!("active/{service}/manifest");
    let shown = file.display().to_string();
    write!(
        out,
        "{}",
        diff.unified_diff()
            .context_radius(3)
            .missing_newline_hint(false)
            .header(&running, &shown)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_version_not_by_text() {
        assert_eq!(classify(None, "b", "x"), Change::New);
        assert_eq!(
            classify(Some(("a", "x")), "a", "x"),
            Change::Unchanged(false)
        );
        assert_eq!(
            classify(Some(("a", "x")), "a", "# note\nx"),
            Change::Unchanged(true)
        );
        assert_eq!(classify(Some(("a", "x")), "b", "y"), Change::Changed);
    }

    #[test]
    fn writes_a_unified_diff() {
        let mut out = Vec::new();
        write_diff(
            &mut out,
            "web",
            Path::new("m/web.manifest"),
            "exec a\nreplicas 2\n",
            "exec a\nreplicas 3\n",
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "--- active/web/manifest\n+++ m/web.manifest\n@@ -1,2 +1,2 @@\n exec a\n-replicas 2\n+replicas 3\n"
        );
    }
}
