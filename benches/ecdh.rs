//! Matching without a shared secret (`matching = "ecdh"`), the whole
//! protocol for both parties on loopback mutual TLS, beside OpenMined PSI.
//!
//! ```text
//! cargo bench --bench ecdh                        # 1M x 1M, 30% shared
//! cargo bench --bench ecdh -- --rows 100000       # smaller
//! cargo bench --bench ecdh -- --openmined 0       # skip OpenMined PSI
//! ```
//!
//! Both parties' clients and the server run in this process, one after the
//! other as they would on a two-core machine: acme uploads (normalise, hash
//! to the group, blind, send), globex uploads, globex blinds acme's relayed
//! points, acme blinds globex's, and acme asks for the overlap, which must
//! equal the generated truth. Every row has one email; the other columns
//! of the demo do not change the cryptography.
//!
//! Then, unless `--openmined 0`, it installs `openmined-psi==2.0.6` into a
//! virtual environment under `~/.cache` (once) and times its cardinality
//! mode on the same items (`benches/python/openmined_psi.py`), and prints
//! the ratio.

mod common;

use common::arg;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cleanroom::identity::BlindingKey;
use cleanroom::prepare::{match_pending, upload};

const AGREEMENT: &str = "psi-bench";

/// Two datasets of one email column each, matched under `ecdh`.
fn policy() -> String {
    let dataset = |name: &str, owner: &str| {
        format!(
            "[[dataset]]\nname = \"{name}\"\nowner = \"{owner}\"\n\n\
             [[dataset.column]]\nname = \"email\"\nrole = \"identifier\"\nkind = \"email\"\n\n"
        )
    };
    format!(
        "[agreement]\nid = \"{AGREEMENT}\"\npurpose = \"Benchmark of matching without a shared secret.\"\n\
         starts = 2026-01-01\nexpires = 2036-12-31\nretention_days = 30\nmatching = \"ecdh\"\n\
         salt = \"{}\"\n\n[identity.email]\nprofile = \"email\"\n\n\
         [[party]]\norg = \"acme\"\nrights = [\"upload\", \"query\", \"receive_results\", \"see_overlap\"]\n\n\
         [[party]]\norg = \"globex\"\nrights = [\"upload\", \"see_overlap\"]\n\n{}{}\
         [query]\naggregates = [\"count\"]\nmin_group_size = 50\n",
        blake3::hash(b"cleanroom psi-bench salt").to_hex(),
        dataset("customers", "acme"),
        dataset("audience", "globex"),
    )
}

/// The items OpenMined's script makes: acme holds u0..u(n-1), globex the
/// first `shared` of those and n - shared others.
fn write_sides(dir: &Path, n: u64, shared: u64) -> std::io::Result<(PathBuf, PathBuf)> {
    let acme = dir.join("acme.csv");
    let globex = dir.join("globex.csv");
    let mut a = std::io::BufWriter::new(std::fs::File::create(&acme)?);
    writeln!(a, "id,email")?;
    for i in 0..n {
        writeln!(a, "{i},u{i}@example.com")?;
    }
    a.flush()?;
    let mut g = std::io::BufWriter::new(std::fs::File::create(&globex)?);
    writeln!(g, "id,email")?;
    for i in 0..shared {
        writeln!(g, "{i},u{i}@example.com")?;
    }
    for i in 0..n - shared {
        writeln!(g, "{},c{i}@example.com", shared + i)?;
    }
    g.flush()?;
    Ok((acme, globex))
}

fn line(what: &str, d: Duration, items: u64) {
    println!(
        "  {what:<44} {:>7.2} s  {:>6.2} us/item",
        d.as_secs_f64(),
        d.as_secs_f64() * 1e6 / items as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = arg("--rows", 1_000_000);
    let shared = n * 3 / 10;
    let threads = rayon::current_num_threads();
    let work = tempfile::tempdir()?;
    let certs = common::pki(work.path())?;
    let policies = work.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join(format!("{AGREEMENT}.toml")), policy())?;
    let (acme_file, globex_file) = write_sides(work.path(), n, shared)?;

    let server = common::InProcess::start(&certs, &policies, &work.path().join("data")).await?;
    let (mut acme, globex) = match (
        common::connect(&server.url, &certs, "acme").await,
        common::connect(&server.url, &certs, "globex").await,
    ) {
        (Ok(a), Ok(g)) => (a, g),
        (a, g) => {
            if server.task.is_finished() {
                return Err(format!("the server stopped: {:?}", server.task.await?).into());
            }
            return Err(format!("connecting: {:?} {:?}", a.err(), g.err()).into());
        }
    };
    let (acme_key, globex_key) = (BlindingKey::generate(), BlindingKey::generate());

    println!(
        "ecdh matching, {n} x {n} emails, {shared} shared, {threads} thread(s), loopback mutual TLS"
    );
    let start = Instant::now();
    let t = Instant::now();
    let a = upload(
        &acme,
        &acme_key,
        &common::upload_options(AGREEMENT, "customers", &acme_file),
    )
    .await?;
    let acme_upload = t.elapsed();
    let t = Instant::now();
    let g = upload(
        &globex,
        &globex_key,
        &common::upload_options(AGREEMENT, "audience", &globex_file),
    )
    .await?;
    let globex_upload = t.elapsed();
    assert_eq!((a.stats.rows_sent, g.stats.rows_sent), (n, n));
    let t = Instant::now();
    let by_globex = match_pending(&globex, &globex_key, AGREEMENT).await?;
    let globex_blinds = t.elapsed();
    let t = Instant::now();
    let by_acme = match_pending(&acme, &acme_key, AGREEMENT).await?;
    let acme_blinds = t.elapsed();
    let blinded: Vec<u64> = [&by_globex, &by_acme]
        .iter()
        .map(|r| r.done.iter().map(|d| d.points).sum())
        .collect();
    assert_eq!(
        blinded,
        vec![n, n],
        "each party blinds the other's n points"
    );
    let t = Instant::now();
    let overlap = acme.overlap(AGREEMENT, &[]).await?.overlap;
    let first_overlap = t.elapsed();
    let total = start.elapsed();
    assert_eq!(overlap, Some(shared), "the overlap must equal the truth");

    line("acme upload (hash, blind, send, store)", acme_upload, n);
    line("globex upload", globex_upload, n);
    line(
        "globex blinds acme's points (relay both ways)",
        globex_blinds,
        n,
    );
    line("acme blinds globex's points", acme_blinds, n);
    line("first overlap (decrypt, match)", first_overlap, 2 * n);
    println!(
        "  end to end: {:.2} s for {n} x {n}, {:.2} us per item ({} items), overlap {shared}",
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / (2 * n) as f64,
        2 * n
    );

    // What the arithmetic alone costs on this machine, on all cores: the
    // floor under the end-to-end time (each party blinds its own N values
    // and re-blinds the other's N points).
    let sample: Vec<String> = (0..50_000).map(|i| format!("x{i}@example.com")).collect();
    let refs: Vec<&str> = sample.iter().map(String::as_str).collect();
    let t = Instant::now();
    let points = cleanroom::identity::blinding::blind_values(&acme_key, &[7; 32], "email", &refs);
    let blind = t.elapsed().as_secs_f64() / refs.len() as f64;
    let t = Instant::now();
    cleanroom::identity::blinding::reblind(&globex_key, &points)?;
    let reblind = t.elapsed().as_secs_f64() / refs.len() as f64;
    println!(
        "  arithmetic alone on {threads} thread(s): hash + blind {:.2} us/value, decompress + re-blind {:.2} us/point; floor for {n} x {n}: {:.1} s",
        blind * 1e6,
        reblind * 1e6,
        2.0 * n as f64 * (blind + reblind)
    );

    if arg("--openmined", 1) == 1 {
        match openmined(n, shared) {
            Ok((secs, found)) => {
                println!(
                    "openmined-psi 2.0.6 cardinality, same items, in process: {secs:.2} s, overlap {found}"
                );
                println!(
                    "ratio: OpenMined PSI / cleanroom ecdh = {:.2}x",
                    secs / total.as_secs_f64()
                );
            }
            Err(e) => println!("OpenMined PSI not run: {e}"),
        }
    }
    server.stop().await
}

/// Runs `benches/python/openmined_psi.py` in its virtual environment,
/// creating it first if needed; returns the seconds and the overlap found.
fn openmined(n: u64, shared: u64) -> Result<(f64, u64), String> {
    let python = common::python_with("cleanroom-bench-psi-venv", &["openmined-psi==2.0.6"])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/openmined_psi.py");
    let out = common::run(
        Command::new(&python)
            .arg(script)
            .arg(n.to_string())
            .arg(shared.to_string()),
    )?;
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("unexpected output: {e}"))?;
    match (report["total_s"].as_f64(), report["overlap"].as_u64()) {
        (Some(secs), Some(found)) => Ok((secs, found)),
        _ => Err(format!("unexpected output: {out}")),
    }
}
