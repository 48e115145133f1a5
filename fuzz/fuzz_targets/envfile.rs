//! The env file parser: never panics, and what it accepts can go into a
//! process's environment (no NUL, no `=` in a key, no key deployd sets).
#![no_main]

use deployd_lib::{envfile, manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(vars) = envfile::parse(data) else {
        return;
    };
    for (k, v) in &vars {
        assert!(!k.is_empty() && !k.contains(['=', '\0']), "{k:?}");
        assert!(!v.contains('\0'), "{k}={v:?}");
        assert!(!manifest::RESERVED_ENV.contains(&k.as_str()), "{k}");
    }
    let mut keys: Vec<&String> = vars.iter().map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), vars.len(), "a key twice");
});
