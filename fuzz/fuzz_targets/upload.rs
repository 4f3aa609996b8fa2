//! Any bytes as one upload message for the demo's customers dataset:
//! decoded, validated and restated, or refused; never a panic.
#![no_main]

use std::sync::OnceLock;

use cleanroom::policy::Policy;
use cleanroom::upload::{Limits, Validator, decode_batches};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/retail-media-demo.toml");
        cleanroom::agreements::parse_policy(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut validator = Validator::new(&policy().datasets()[0], Limits::default());
    if let Ok(batches) = decode_batches(data) {
        for b in &batches {
            if validator.check(b, data.len()).is_ok() {
                let _ = validator.restate(b);
            }
        }
    }
});
