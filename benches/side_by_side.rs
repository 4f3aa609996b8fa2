//! The demo shape end to end through the real server, beside DuckDB doing
//! the same work on the same stored data.
//!
//! ```text
//! cargo bench --bench side_by_side                       # 1M x 1M rows
//! cargo bench --bench side_by_side -- --rows 10000000    # 10M x 10M
//! cargo bench --bench side_by_side -- --duckdb 0         # without DuckDB
//! ```
//!
//! Generates both demo partners' files (`cleanroom synth`, 30% shared),
//! uploads them over loopback mutual TLS to a thresholds-only copy of the
//! demo agreement and to the demo as shipped (differential privacy); the
//! first upload, which is timed, runs the `cleanroom upload` binary. Then it
//! times, as a client sees them: a governed query (first right after the
//! commit, warm, first after a restart; thresholds and privacy) and the
//! overlap (first call after that query, warm, first after a restart). The server
//! is the real `cleanroom serve` binary in its own process, whose resident
//! memory is read from /proc. Then it writes what the
//! server stores (fingerprints and allowed columns, prepared exactly as the
//! upload prepares them) to Parquet and has DuckDB (`duckdb==2.0.1` in a
//! virtual environment under ~/.cache, the same thread count) run the same
//! overlap and query shapes, and prints each ratio.

mod common;
#[path = "../tests/common/mod.rs"]
mod support;

use common::arg;

use std::path::{Path, PathBuf};
use std::time::Instant;

use cleanroom::client::Client;
use cleanroom::prepare::{CsvOptions, InputFormat, InputReader, Plan, Preparer, upload};

const PRIVATE: &str = "retail-media-demo";
const THRESHOLDS: &str = "retail-media-thresholds";
const SQL: &str = "SELECT c.region, COUNT(*) AS n, AVG(c.lifetime_value) AS ltv \
                   FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

/// The real `cleanroom serve` binary, so its memory is its own.
struct Running {
    server: support::RealServer,
    url: String,
}

impl Running {
    fn start(pki: &support::Pki, policies: &Path, data: &Path) -> Self {
        let server = support::RealServer::spawn_with(pki, data, "0", policies);
        Running {
            url: format!("https://{}", server.addr),
            server,
        }
    }

    /// Stops the server gracefully (SIGTERM) and waits for it, then shows
    /// how long its matchings, reads and writes of tables took.
    fn stop(mut self) -> Result<(), Box<dyn std::error::Error>> {
        self.server.signal(libc::SIGTERM);
        self.server.child.wait()?;
        // Every line, to the end of its log (the reader ends at its EOF).
        for line in self.server.log.iter() {
            if line.contains(" tables ")
                && let Some(start) = line.find("\"fields\":{")
                && let Some(end) = line[start..].find('}')
            {
                println!("  server: {}", &line[start + 10..start + end]);
            }
        }
        Ok(())
    }

    /// Resident and peak resident memory of the server process, MiB.
    fn memory(&self) -> (f64, f64) {
        memory_of(&format!("/proc/{}/status", self.server.child.id()))
    }
}

/// Resident and peak resident memory from a /proc status file, MiB.
fn memory_of(status: &str) -> (f64, f64) {
    let status = std::fs::read_to_string(status).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Seconds an overlap takes as the client sees it, and the count shown.
async fn timed_overlap(
    client: &Client,
    agreement: &str,
) -> Result<(f64, Option<u64>), Box<dyn std::error::Error>> {
    let mut c = client.clone();
    let t = Instant::now();
    let r = c.overlap(agreement, &[]).await?;
    Ok((t.elapsed().as_secs_f64(), r.overlap))
}

/// Seconds a governed query takes as the client sees it.
async fn timed_query(client: &Client, agreement: &str) -> Result<f64, Box<dyn std::error::Error>> {
    let mut c = client.clone();
    let t = Instant::now();
    c.query(agreement, SQL).await?;
    Ok(t.elapsed().as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg("--rows", 1_000_000);
    let work = tempfile::tempdir()?;
    let pki = support::Pki::new();
    let certs = pki.path().to_path_buf();
    let policies = work.path().join("policies");
    std::fs::create_dir_all(&policies)?;
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml"),
    )?;
    std::fs::write(policies.join(format!("{PRIVATE}.toml")), &shipped)?;
    let (head, _) = shipped
        .split_once("[privacy]")
        .ok_or("the demo has a [privacy] section")?;
    std::fs::write(
        policies.join(format!("{THRESHOLDS}.toml")),
        head.replace(
            &format!("id = \"{PRIVATE}\""),
            &format!("id = \"{THRESHOLDS}\""),
        ),
    )?;

    let t = Instant::now();
    let synth = work.path().join("synth");
    let truth = cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows,
        overlap: 0.3,
        seed: 1,
        out: synth.clone(),
    })?;
    common::flush_files(&synth)?;
    let (acme_file, globex_file) = (
        synth.join(cleanroom::synth::ACME_FILE),
        synth.join(cleanroom::synth::GLOBEX_FILE),
    );
    println!(
        "demo shape, {rows} x {rows} rows, {} people in both, 2 cores; generated in {:.1} s",
        truth.overlap,
        t.elapsed().as_secs_f64()
    );
    let data = work.path().join("data");
    let server = Running::start(&pki, &policies, &data);
    let acme = common::connect(&server.url, &certs, "acme").await?;
    let globex = common::connect(&server.url, &certs, "globex").await?;
    let secret = cleanroom::identity::Secret::generate();

    // Uploads, end to end: acme's through the `cleanroom upload` binary, in
    // a process of its own, as a partner runs it.
    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "upload",
            "--agreement",
            THRESHOLDS,
            "--dataset",
            "customers",
        ])
        .arg("--input")
        .arg(&acme_file)
        .arg("--no-progress")
        .env("CLEANROOM_SERVER", &server.url)
        .env("CLEANROOM_CA", certs.join("ca.pem"))
        .env("CLEANROOM_CERT", certs.join("acme.pem"))
        .env("CLEANROOM_KEY", certs.join("acme-key.pem"))
        .env("CLEANROOM_SECRET", secret.to_hex())
        .output()?;
    let up = t.elapsed().as_secs_f64();
    let said = String::from_utf8_lossy(&out.stdout);
    // "uploaded SENT of READ rows to ..."
    let sent: u64 = said
        .split_once("uploaded ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "cleanroom upload failed: {}{}",
                said,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    println!(
        "upload, end to end:           {:>8.2} s  {:>10.0} rows/s ({} rows, cleanroom upload)",
        up,
        sent as f64 / up,
        sent
    );
    // "  N batches, M MiB, S s, R rows/s": the command's own timing, from
    // its start of reading to the server's answer.
    if let Some(own) = said.lines().find(|l| l.trim_end().ends_with("rows/s")) {
        println!("  as the command reports it: {}", own.trim());
    }
    upload(
        &globex,
        &secret,
        &common::upload_options(THRESHOLDS, "audience", &globex_file),
    )
    .await?;
    // The query first, right after the commit, while the background
    // matching may still run; then the overlap, which that matching gave.
    let first_query = timed_query(&acme, THRESHOLDS).await?;
    let mut warm = Vec::new();
    for _ in 0..5 {
        warm.push(timed_query(&acme, THRESHOLDS).await?);
    }
    let warm_query = median(warm);
    let (first_overlap, shown) = timed_overlap(&acme, THRESHOLDS).await?;
    let overlap = shown.unwrap_or_default();
    let mut warm = Vec::new();
    for _ in 0..5 {
        warm.push(timed_overlap(&acme, THRESHOLDS).await?.0);
    }
    let warm_overlap = median(warm);
    let (rss_loaded, peak_one) = server.memory();

    upload(
        &acme,
        &secret,
        &common::upload_options(PRIVATE, "customers", &acme_file),
    )
    .await?;
    upload(
        &globex,
        &secret,
        &common::upload_options(PRIVATE, "audience", &globex_file),
    )
    .await?;
    let first_private = timed_query(&acme, PRIVATE).await?;
    let mut warm = Vec::new();
    for _ in 0..5 {
        warm.push(timed_query(&acme, PRIVATE).await?);
    }
    let warm_private = median(warm);

    let (_, peak_both) = server.memory();

    // A restart: what is recorded is read back, the rest loaded again.
    drop(acme);
    drop(globex);
    server.stop()?;
    let server = Running::start(&pki, &policies, &data);
    let acme = common::connect(&server.url, &certs, "acme").await?;
    let (restart_overlap, _) = timed_overlap(&acme, THRESHOLDS).await?;
    let (before_load, _) = server.memory();
    let restart_query = timed_query(&acme, THRESHOLDS).await?;
    let (after_load, peak) = server.memory();

    println!("overlap {overlap} (truth {}):", truth.overlap);
    println!("  first call after the query   {:>8.3} s", first_overlap);
    println!("  warm (median of 5)           {:>8.3} s", warm_overlap);
    println!("  first call after a restart   {:>8.3} s", restart_overlap);
    println!("governed query, thresholds:");
    println!("  first call after the commit  {:>8.3} s", first_query);
    println!("  warm (median of 5)           {:>8.3} s", warm_query);
    println!("  first call after a restart   {:>8.3} s", restart_query);
    println!("governed query, differential privacy:");
    println!("  first call after the commit  {:>8.3} s", first_private);
    println!("  warm (median of 5)           {:>8.3} s", warm_private);
    println!(
        "server memory: {:.0} MiB resident with the thresholds agreement loaded (peak {:.0} MiB by then, its matching included), peak {:.0} MiB with both agreements; after a restart {:.0} MiB, {:.0} MiB once the thresholds agreement is loaded ({:.0} bytes per stored row), peak {:.0} MiB",
        rss_loaded,
        peak_one,
        peak_both,
        before_load,
        after_load,
        (after_load - before_load) * 1048576.0 / (2 * rows) as f64,
        peak
    );
    server.stop()?;

    if arg("--duckdb", 1) == 1 {
        let agreement = {
            let run = Running::start(&pki, &policies, &work.path().join("data2"));
            let mut c = common::connect(&run.url, &certs, "acme").await?;
            let a = c.get_agreement(THRESHOLDS).await?;
            drop(c);
            run.stop()?;
            a
        };
        let customers = prepare_parquet(&agreement, "customers", &acme_file, &secret, work.path())?;
        let audience = prepare_parquet(&agreement, "audience", &globex_file, &secret, work.path())?;
        match duckdb(&customers, &audience) {
            Ok(d) => {
                let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "duckdb {} (2 threads, tables in memory, best of 3): overlap {} in {:.3} s, governed {:.3} s, plain {:.3} s",
                    d["version"].as_str().unwrap_or("?"),
                    d["overlap"],
                    f("overlap_s"),
                    f("governed_s"),
                    f("plain_s")
                );
                println!("ratios (cleanroom / duckdb, under 1 is faster):");
                println!(
                    "  overlap warm                 {:>6.3}",
                    warm_overlap / f("overlap_s")
                );
                println!(
                    "  overlap after a restart      {:>6.3}",
                    restart_overlap / f("overlap_s")
                );
                println!(
                    "  query warm, thresholds       {:>6.3}",
                    warm_query / f("governed_s")
                );
                println!(
                    "  query warm, privacy          {:>6.3}",
                    warm_private / f("governed_s")
                );
                println!(
                    "  query first after commit     {:>6.3} of warm (thresholds), {:.3} (privacy)",
                    first_query / warm_query,
                    first_private / warm_private
                );
            }
            Err(e) => println!("DuckDB not run: {e}"),
        }
    }
    Ok(())
}

/// What the upload would store for `dataset`, as a Parquet file.
fn prepare_parquet(
    agreement: &cleanroom::proto::Agreement,
    dataset: &str,
    input: &Path,
    secret: &cleanroom::identity::Secret,
    dir: &Path,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let mut reader = InputReader::open(input, InputFormat::Csv, CsvOptions::default(), 65_536)?;
    let plan = Plan::new(
        agreement,
        dataset,
        secret.into(),
        reader.header(),
        &Default::default(),
    )?;
    let indices = plan.input_indices();
    let schema = std::sync::Arc::clone(plan.schema());
    let mut preparer = Preparer::new(plan);
    let path = dir.join(format!("{dataset}.parquet"));
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path)?, schema, None)?;
    while let Some(chunk) = reader.next_chunk(65_536, &indices)? {
        writer.write(&preparer.prepare(&chunk)?)?;
    }
    writer.close()?;
    Ok(path)
}

fn duckdb(customers: &Path, audience: &Path) -> Result<serde_json::Value, String> {
    let python = common::python_with("cleanroom-bench-duckdb-venv", &["duckdb==2.0.1"])?;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/duckdb_side_by_side.py");
    let out = common::run(
        std::process::Command::new(python)
            .arg(script)
            .arg(customers)
            .arg(audience)
            .arg("2"),
    )?;
    serde_json::from_str(out.trim()).map_err(|e| format!("unexpected output {out}: {e}"))
}
