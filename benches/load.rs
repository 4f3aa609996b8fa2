//! Load: many concurrent clients of several organisations against one
//! server on loopback with mutual TLS, mixing uploads, overlaps, queries
//! and audit reads. Prints throughput, latency per call, errors (anything
//! but the designed refusals) and the process's peak memory.
//!
//! ```text
//! cargo bench --bench load                                   # 64 clients, 60 s
//! cargo bench --bench load -- --clients 16 --seconds 10
//! ```
//!
//! Client and server share one process, so the peak memory covers both.

mod common;
#[path = "../tests/common/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::arg;
use support::people::{Row, audience, customers, demo_policy};
use support::{Setup, TestServer};
use tonic::Code;

const ID: &str = "retail-media-demo";

/// Latencies and outcomes per call kind.
#[derive(Default)]
struct Stats {
    latencies: BTreeMap<&'static str, Vec<Duration>>,
    refused: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
}

fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

#[tokio::main]
async fn main() {
    let clients = arg("--clients", 64) as usize;
    let seconds = arg("--seconds", 60);
    let people = arg("--people", 20_000);
    let policies = tempfile::tempdir().unwrap();
    let text =
        std::fs::read_to_string(support::policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    std::fs::write(policies.path().join("retail-media-demo.toml"), head).unwrap();
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        maintenance_interval: Duration::from_secs(3600),
        ..Setup::default()
    })
    .await;
    let policy = demo_policy(None, 50);
    let hash = support::policy_hash(&server).await;
    let rows = |offset: u64| -> Vec<Row> {
        (offset..offset + people)
            .map(|id| Row {
                phone: id % 3 == 0,
                region: Some(["north", "south", "east", "west"][(id % 4) as usize]),
                segment: Some(["sports", "travel", "home"][(id % 3) as usize]),
                ..Row::new(id)
            })
            .collect()
    };
    let batches = Arc::new([
        support::batch_msg(&customers(&policy, &rows(0))),
        support::batch_msg(&audience(&policy, &rows(people / 3))),
    ]);
    for (org, dataset, i) in [("acme", "customers", 0), ("globex", "audience", 1)] {
        support::raw_upload(
            &server.client(org).await,
            vec![
                support::header(&hash, dataset, &format!("seed-{org}")),
                batches[i].clone(),
                support::commit(people, 1),
            ],
        )
        .await
        .unwrap();
    }

    let stats = Arc::new(Mutex::new(Stats::default()));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let org = ["acme", "globex", "initech"][c % 3];
        let client = server.client(org).await;
        let (stats, hash, batches) = (Arc::clone(&stats), hash.clone(), Arc::clone(&batches));
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                // acme queries and reads; globex uploads and reads; initech
                // (party to nothing) is refused everywhere.
                let kind: &'static str = match (org, n % 10) {
                    ("acme", 0) => "overlap",
                    ("acme", 1..=6) => "query",
                    ("globex", 0) => "upload",
                    ("globex", 1..=3) => "overlap",
                    ("initech", _) => ["query", "overlap", "audit"][(n % 3) as usize],
                    _ => "audit",
                };
                let t = Instant::now();
                let outcome: Result<(), tonic::Status> = match kind {
                    "query" => client
                        .query(ID, "SELECT c.region, a.interest_segment, COUNT(*), AVG(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region, a.interest_segment")
                        .await
                        .map(|_| ())
                        .map_err(|e| e.status().cloned().unwrap_or_else(|| tonic::Status::unknown(e.to_string()))),
                    "overlap" => client
                        .overlap(ID, &[])
                        .await
                        .map(|_| ())
                        .map_err(|e| e.status().cloned().unwrap_or_else(|| tonic::Status::unknown(e.to_string()))),
                    "upload" => support::raw_upload(
                        &client,
                        vec![
                            support::header(&hash, "audience", &format!("load-{c}-{n}")),
                            batches[1].clone(),
                            support::commit(people, 1),
                        ],
                    )
                    .await
                    .map(|_| ()),
                    _ => client
                        .audit_page(ID, 100, "")
                        .await
                        .map(|_| ())
                        .map_err(|e| e.status().cloned().unwrap_or_else(|| tonic::Status::unknown(e.to_string()))),
                };
                let elapsed = t.elapsed();
                let mut s = stats.lock().unwrap();
                match outcome {
                    Ok(()) => s.latencies.entry(kind).or_default().push(elapsed),
                    // Designed refusals: the outsider, and the query gate.
                    Err(e) if org == "initech" && e.code() == Code::NotFound => {
                        *s.refused.entry("outsider NOT_FOUND").or_default() += 1
                    }
                    Err(e) if e.code() == Code::ResourceExhausted && e.message().starts_with("rule query.concurrency") => {
                        *s.refused.entry("query.concurrency").or_default() += 1
                    }
                    Err(e) => *s.errors.entry(format!("{kind}: {:?} {}", e.code(), e.message())).or_default() += 1,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wall = started.elapsed().as_secs_f64();
    let s = std::mem::take(&mut *stats.lock().unwrap());
    let total: usize = s.latencies.values().map(Vec::len).sum();
    println!(
        "load: {clients} clients (acme, globex, initech in turn), {seconds} s, {people} rows per dataset, debug or release as built"
    );
    println!("  answered calls: {total} ({:.1}/s)", total as f64 / wall);
    for (kind, l) in &s.latencies {
        let mut l = l.clone();
        l.sort();
        let q = |p: f64| l[((l.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
        println!(
            "  {kind:>8}: {:>6} calls, {:>7.1}/s, p50 {:>8.1} ms, p99 {:>8.1} ms",
            l.len(),
            l.len() as f64 / wall,
            q(0.5),
            q(0.99)
        );
    }
    for (what, n) in &s.refused {
        println!("  designed refusals, {what}: {n}");
    }
    let errors: u64 = s.errors.values().sum();
    println!("  errors: {errors}");
    for (what, n) in &s.errors {
        println!("    {n} x {what}");
    }
    if let Some(kib) = peak_memory_kib() {
        println!(
            "  peak memory of the process: {:.0} MiB",
            kib as f64 / 1024.0
        );
    }
    server.stop().await.unwrap();
    if errors > 0 {
        std::process::exit(1);
    }
}
