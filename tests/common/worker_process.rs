//! One `cleanroom worker` process on 127.0.0.1:0, for tests and benches
//! (`benches/distributed.rs` includes this file).

#![allow(unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use url::Url;

/// Starts worker `name` with its certificate of the worker role from the
/// CA in `certs` (issued first if missing), and reads the address it
/// prints. It stops by itself when this process ends (its standard input
/// closes).
pub fn spawn_worker(certs: &Path, name: &str) -> (Child, Url) {
    if !cleanroom::certs::worker_files(certs, name).cert.exists() {
        cleanroom::certs::issue_worker(certs, name, &[], false).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "worker",
            "--listen",
            "127.0.0.1:0",
            "--stop-on-stdin-close",
            "--name",
            name,
        ])
        .arg("--certs-dir")
        .arg(certs)
        .env("CLEANROOM_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("worker listening on ")
        .unwrap_or_else(|| panic!("worker printed {line:?}"));
    (child, Url::parse(url).unwrap())
}
