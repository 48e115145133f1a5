//! The manifest parser: never panics, and what it accepts round-trips
//! through its canonical text to the same manifest and version.
#![no_main]

use deployd_lib::manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = manifest::parse(data) else {
        return;
    };
    let text = m.canonical();
    let again = manifest::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("canonical text does not parse: {e:?}\n{text}"));
    assert_eq!(again, m, "{text}");
    assert_eq!(again.version(), m.version());
    assert_eq!(again.canonical(), text);
});
