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
#[path = "common/real.rs"]
mod real;
#[path = "../tests/common/mod.rs"]
mod support;

use common::arg;
use real::{PRIVATE, Running, THRESHOLDS, median, timed_overlap, timed_query};

use std::path::Path;
use std::time::Instant;

use cleanroom::prepare::upload;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg("--rows", 1_000_000);
    let work = tempfile::tempdir()?;
    let pki = support::Pki::new();
    let certs = pki.path().to_path_buf();
    let policies = work.path().join("policies");
    real::demo_policies(&policies)?;

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
    let run = real::upload_with(
        Path::new(env!("CARGO_BIN_EXE_cleanroom")),
        &server.url,
        &certs,
        "acme",
        &secret,
        (THRESHOLDS, "customers"),
        &acme_file,
    )?;
    println!(
        "upload, end to end:           {:>8.2} s  {:>10.0} rows/s ({} rows, cleanroom upload)",
        run.seconds,
        run.rows as f64 / run.seconds,
        run.rows
    );
    // The command's own timing, from its start of reading to the server's
    // answer.
    if let Some(own) = &run.own {
        println!("  as the command reports it: {own}");
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
    print_lines(server.stop()?);
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
    print_lines(server.stop()?);

    if arg("--duckdb", 1) == 1 {
        let agreement = {
            let run = Running::start(&pki, &policies, &work.path().join("data2"));
            let mut c = common::connect(&run.url, &certs, "acme").await?;
            let a = c.get_agreement(THRESHOLDS).await?;
            drop(c);
            run.stop()?;
            a
        };
        let customers =
            real::prepare_parquet(&agreement, "customers", &acme_file, &secret, work.path())?;
        let audience =
            real::prepare_parquet(&agreement, "audience", &globex_file, &secret, work.path())?;
        match real::duckdb(
            "duckdb_side_by_side.py",
            &[customers.as_os_str(), audience.as_os_str(), "2".as_ref()],
        ) {
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

fn print_lines(lines: Vec<String>) {
    for line in lines {
        println!("  server: {line}");
    }
}
