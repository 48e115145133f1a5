//! The ctl language: never panics, and every command it accepts is the
//! one its own rendering parses to (what `deploy` writes is what deployd
//! reads).
#![no_main]

use deployd_lib::ctl::{self, RootCommand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = ctl::parse_service(data) {
        assert_eq!(ctl::parse_service(v.to_string().as_bytes()).ok(), Some(v));
    }
    if let Ok(v) = ctl::parse_instance(data, 3) {
        // An instance's command is its service's, for that instance:
        // `restart` on instances/3/ctl is the service's `restart 3`.
        assert_eq!(ctl::parse_service(v.to_string().as_bytes()).ok(), Some(v));
    }
    if let Ok(RootCommand::One(service, v)) = ctl::parse_root(data) {
        let text = format!("{} {service}{}", v.name(), {
            let shown = v.to_string();
            shown.strip_prefix(v.name()).unwrap_or("").to_string()
        });
        match ctl::parse_root(text.as_bytes()) {
            Ok(RootCommand::One(s2, v2)) => assert_eq!((s2, v2), (service, v)),
            other => panic!("{text:?}: {other:?}"),
        }
    }
});
