//! Helpers shared by the benchmarks.

#![allow(dead_code, unreachable_pub)]

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A stand-in fingerprint for person `person` and identity kind `kind`.
pub fn fingerprint(person: u64, kind: u8) -> [u8; 32] {
    let mut input = [0u8; 9];
    input[..8].copy_from_slice(&person.to_le_bytes());
    input[8] = kind;
    *blake3::hash(&input).as_bytes()
}
