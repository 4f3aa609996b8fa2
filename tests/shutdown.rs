//! The real binary stops cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cleanroom::client::{Client, ClientConfig};

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let pki = common::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--shutdown-grace",
            "0.3",
        ])
        .arg("--data-dir")
        .arg(data.path().join("data"))
        .arg("--policies")
        .arg(common::policies_dir())
        .arg("--certs-dir")
        .arg(pki.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // The bound address is in the "listening" log line.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut log = Vec::new();
    while addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server logs its address");
        if line.contains("\"listening\"") {
            let start = line.find("\"addr\":\"").unwrap() + 8;
            let end = start + line[start..].find('"').unwrap();
            addr = Some(line[start..end].to_string());
        }
        log.push(line);
    }
    let addr = addr.unwrap();

    let config = ClientConfig::new(format!("https://{addr}"), pki.path().join("ca.pem"))
        .with_identity(pki.path().join("acme.pem"), pki.path().join("acme-key.pem"));
    let mut client = Client::connect(&config).await.unwrap();
    assert_eq!(client.who_am_i().await.unwrap().organisation, "acme");

    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0);

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("server did not exit within 10 s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    log.extend(rx.try_iter());
    let log = log.join("\n");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("\"stopped\""), "{log}");
    // Logs carry no secret material from the policy.
    let demo =
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap();
    let salt = demo
        .lines()
        .find(|l| l.starts_with("salt"))
        .unwrap()
        .split('"')
        .nth(1)
        .unwrap();
    assert!(!log.contains(salt));
}
