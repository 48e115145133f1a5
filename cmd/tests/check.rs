//! `deploy check` as a user runs it: the real binary on real files.

use std::path::Path;
use std::process::Command;

fn deploy(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deploy"))
        .args(args)
        .output()
        .expect("run deploy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn three_mistakes_are_all_reported_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.manifest");
    std::fs::write(
        &file,
        "exec ./app\nreplicas 0\nupdate_bach 1\n\nstop_signal TREM\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, _, err) = deploy(&["check", f]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        format!("{f}:2:10: replicas must be between 1 and 1000, got 0")
    );
    assert_eq!(
        lines[1],
        format!("{f}:3:1: unknown directive 'update_bach' (did you mean 'update_batch'?)")
    );
    assert!(
        lines[2].starts_with(&format!(
            "{f}:5:13: unknown stop_signal 'TREM' (did you mean 'TERM'?)"
        )),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "deploy: 1 of 1 manifest invalid");
}

#[test]
fn an_account_this_machine_lacks_is_an_error_unless_syntax_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web.manifest");
    std::fs::write(&file, "exec ./app\nuser no-such-user-deployd\n").unwrap();
    let f = file.to_str().unwrap();
    let (code, _, err) = deploy(&["check", f]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.lines().next(),
        Some(format!("{f}:2:6: no user 'no-such-user-deployd' on this machine").as_str())
    );
    let (code, out, err) = deploy(&["check", "--syntax", f]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("{f}: ok (web ")), "{out}");
}

#[test]
fn the_bundled_examples_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "manifest"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(files.iter().any(|f| f.ends_with("web.manifest")));
    let args: Vec<&str> = std::iter::once("check")
        .chain(files.iter().map(|s| s.as_str()))
        .collect();
    let (code, out, err) = deploy(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), files.len(), "{out}");
    // web.manifest is the walk-through's: 3 replicas, a port, http health, rolling batch 1 with a pause.
    let web = std::fs::read_to_string(dir.join("web.manifest")).unwrap();
    let m = deployd_lib::manifest::parse(web.as_bytes()).unwrap();
    assert_eq!(m.replicas, 3);
    assert!(m.port.is_some());
    assert!(matches!(
        m.health,
        deployd_lib::manifest::Health::Http { .. }
    ));
    assert_eq!(m.update, deployd_lib::manifest::Strategy::Rolling);
    assert_eq!(m.update_batch, 1);
    assert!(!m.update_pause.is_zero());
}

#[test]
fn a_missing_file_or_a_bad_name_fails_and_the_others_are_still_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("ok.manifest");
    std::fs::write(&good, "exec true\n").unwrap();
    let bad_name = dir.path().join("Bad.manifest");
    std::fs::write(&bad_name, "exec true\n").unwrap();
    let missing = dir.path().join("missing.manifest");
    let (code, out, err) = deploy(&[
        "check",
        missing.to_str().unwrap(),
        bad_name.to_str().unwrap(),
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("missing.manifest: No such file or directory"),
        "{err}"
    );
    assert!(err.contains("'Bad' is not a service name"), "{err}");
    assert!(out.contains("ok.manifest: ok (ok "), "{out}");
    assert!(err.contains("deploy: 2 of 3 manifests invalid"), "{err}");
}

#[test]
fn no_files_is_a_usage_error() {
    let (code, _, err) = deploy(&["check"]);
    assert_eq!(code, 2, "{err}");
}

/// Whoever reads the output may stop early (`| head -1`): deploy then
/// ends quietly with 0, on standard output and standard error alike,
/// rather than panicking (exit 101) at its next write.
#[test]
fn a_closed_pipe_is_a_quiet_exit() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("many.manifest");
    // Far more output than a pipe holds, so that deploy writes after
    // head has gone.
    let lines: String = (0..6000).map(|i| format!("bogus{i} x\n")).collect();
    std::fs::write(&bad, format!("exec a\n{lines}")).unwrap();
    let mut good = Vec::new();
    for i in 0..3000 {
        let f = dir.path().join(format!("s{i}.manifest"));
        std::fs::write(&f, "exec a\n").unwrap();
        good.push(f.to_str().unwrap().to_string());
    }
    let bin = env!("CARGO_BIN_EXE_deploy");
    for script in [
        format!(
            "{bin} check {} 2>&1 | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            bad.display()
        ),
        format!(
            "{bin} check {} | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}",
            good.join(" ")
        ),
    ] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "0",
            "{}: {err}",
            &script[..80]
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
