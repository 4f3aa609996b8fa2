//! Any bytes as a policy file: parsed or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = cleanroom::agreements::parse_policy(&text, std::path::Path::new("fuzz.toml"));
});
