//! The real binary stops cleanly on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use cleanroom::client::Client;
use common::RealServer;

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let pki = common::Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut server = RealServer::spawn(&pki, &data.path().join("data"), "0.3");

    let mut client = Client::connect(&server.config(&pki, "acme")).await.unwrap();
    assert_eq!(client.who_am_i().await.unwrap().organisation, "acme");

    server.signal(libc::SIGTERM);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = server.child.kill();
            panic!("server did not exit within 10 s of SIGTERM");
        }
        // Keep the client's connection serviced while the server drains.
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut log = server.early_log.clone();
    log.extend(server.log.try_iter());
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
