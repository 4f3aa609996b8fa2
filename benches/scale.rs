//! How cost grows with size on one machine: the demo shape at several
//! sizes through the real server, beside DuckDB on the same data.
//!
//! ```text
//! cargo bench --bench scale                                   # 1M and 10M per side
//! cargo bench --bench scale -- --rows 1000000,10000000,100000000
//! cargo bench --bench scale -- --rows 10000000 --baseline OLD/cleanroom
//! cargo bench --bench scale -- --duckdb 0                     # without DuckDB
//! ```
//!
//! For each size N (rows per side, 30% shared) it runs, in order:
//!
//! - **generate**: both partners' CSV files, written row by row
//!   (`cleanroom synth`'s generator; nothing is held but a bit per row);
//! - **upload**: both files through the `cleanroom upload` binary, each in
//!   a process of its own, to a `cleanroom serve` process (loopback mutual
//!   TLS, the thresholds-only demo agreement). With `--baseline PATH`, the
//!   first file is uploaded first with that other build of `cleanroom`,
//!   client and server, into a data directory of its own: an A/B of the
//!   upload in the same run (up to `--ab-up-to`, 10M by default);
//! - **first query**: the governed query right after the second commit;
//! - **match**: the server's own figures for reading and matching the
//!   versions (the background matching that query waited for);
//! - **warm query**: the median of 3;
//! - **overlap**: its first call after those queries and the median of 3;
//! - **second agreement** (up to `--second-up-to`, 10M by default): the
//!   same files into the demo agreement as shipped (differential privacy)
//!   and one query, so both agreements' tables are loaded;
//! - **restart**: SIGTERM, start again, the first query after it.
//!
//! Each stage prints its time, the server's peak resident memory during
//! the stage (the kernel's peak, reset before each stage through
//! `/proc/PID/clear_refs`) and, where it means something, rows per second.
//! The store's bytes per stored row are read off the data directory.
//! Then DuckDB (`duckdb==2.0.1`, the same two threads, a database file and
//! a 12 GB memory limit by default, `--duckdb-memory GB`) loads what the
//! server stores and runs the same overlap and query shapes; the bench says
//! whether it spilled. Last, a table of every stage's time per size and
//! the growth exponent between sizes (1.0 is linear; an n log n stage has
//! exponent 1 + ln(ln n2 / ln n1) / ln(n2 / n1), printed beside it).
//!
//! `--config FILE` gives the server a config file (`CLEANROOM_CONFIG`):
//! past about 90M rows per side the tables outgrow the default 8 GiB
//! `table_cache_bytes`, and every query would read them back.
//!
//! Disk: the CSVs take about 90 bytes per row per side and are deleted
//! once uploaded and written to Parquet; the work directory is under
//! `$TMPDIR` (or `--dir DIR`) and is removed after each size.

mod common;
#[path = "common/real.rs"]
mod real;
#[path = "../tests/common/mod.rs"]
mod support;

use common::{arg, text_arg};
use real::{PRIVATE, Running, THRESHOLDS, median, timed_overlap, timed_query};

use std::path::{Path, PathBuf};
use std::time::Instant;

/// One stage's figures at one size.
#[derive(Debug, Clone, Default)]
struct Stage {
    name: &'static str,
    seconds: f64,
    /// The server's peak resident memory during the stage, MiB.
    peak_mib: Option<f64>,
    /// Rows processed per second, where it means something.
    rows_per_s: Option<f64>,
}

/// What one size gave.
#[derive(Debug, Default)]
struct SizeRun {
    rows: u64,
    stages: Vec<Stage>,
}

impl SizeRun {
    fn add(&mut self, name: &'static str, seconds: f64, peak: Option<f64>, rows: Option<u64>) {
        let stage = Stage {
            name,
            seconds,
            peak_mib: peak,
            rows_per_s: rows.map(|r| r as f64 / seconds),
        };
        println!(
            "  {:<26} {:>9.3} s  {:>12}  {}",
            stage.name,
            stage.seconds,
            stage
                .peak_mib
                .map(|p| format!("{p:>7.0} MiB"))
                .unwrap_or_default(),
            stage
                .rows_per_s
                .map(|r| format!("{:>6.2}M rows/s", r / 1e6))
                .unwrap_or_default()
        );
        self.stages.push(stage);
    }

    fn seconds(&self, name: &str) -> Option<f64> {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.seconds)
    }
}

/// The sizes from `--rows A,B,C`.
fn sizes() -> Vec<u64> {
    text_arg("--rows")
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000])
}

/// Bytes of every file under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The sum of a numeric field over log lines' fields (`"read_ms":12`).
fn field_sum(lines: &[String], marker: &str, field: &str) -> Option<f64> {
    let mut found = None;
    for line in lines.iter().filter(|l| l.contains(marker)) {
        let key = format!("\"{field}\":");
        let Some(at) = line.find(&key) else {
            continue;
        };
        let rest = &line[at + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        if let Ok(v) = rest[..end].parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes = sizes();
    let baseline = text_arg("--baseline").map(PathBuf::from);
    let ab_up_to = arg("--ab-up-to", 10_000_000);
    let second_up_to = arg("--second-up-to", 10_000_000);
    let with_duckdb = arg("--duckdb", 1) == 1;
    let duck_memory = arg("--duckdb-memory", 12);
    let root = text_arg("--dir").map(PathBuf::from);
    let config = text_arg("--config");
    println!(
        "demo shape, 30% shared, 2 cores; sizes {:?} rows per side",
        sizes
    );
    let mut runs = Vec::new();
    for &rows in &sizes {
        let work = match &root {
            Some(dir) => tempfile::tempdir_in(dir)?,
            None => tempfile::tempdir()?,
        };
        let options = Options {
            baseline: baseline.as_deref().filter(|_| rows <= ab_up_to),
            second: rows <= second_up_to,
            duckdb: with_duckdb.then_some(duck_memory),
            config: config.as_deref(),
        };
        let mut run = SizeRun {
            rows,
            ..Default::default()
        };
        // A size that fails (the server killed for memory, say) is shown
        // as far as it got; the summary still prints.
        if let Err(e) = one_size(&mut run, work.path(), &options).await {
            println!("  stopped at this size: {e}");
        }
        runs.push(run);
    }
    summary(&runs);
    Ok(())
}

struct Options<'a> {
    baseline: Option<&'a Path>,
    second: bool,
    /// DuckDB's memory limit in GB, if DuckDB runs.
    duckdb: Option<u64>,
    /// The server's config file.
    config: Option<&'a str>,
}

async fn one_size(
    run: &mut SizeRun,
    work: &Path,
    options: &Options<'_>,
) -> Result<(), Box<dyn std::error::Error>> {
    let rows = run.rows;
    println!("\n{rows} x {rows} rows");
    let pki = support::Pki::new();
    let certs = pki.path().to_path_buf();
    let policies = work.join("policies");
    real::demo_policies(&policies)?;
    let program = Path::new(env!("CARGO_BIN_EXE_cleanroom"));

    let t = Instant::now();
    let synth = work.join("synth");
    let truth = cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows,
        overlap: 0.3,
        seed: 1,
        out: synth.clone(),
    })?;
    let (acme_file, globex_file) = (
        synth.join(cleanroom::synth::ACME_FILE),
        synth.join(cleanroom::synth::GLOBEX_FILE),
    );
    // The generator's answer key is not needed here; its disk is.
    for entry in std::fs::read_dir(&synth)? {
        let path = entry?.path();
        if path != acme_file && path != globex_file {
            std::fs::remove_file(&path)?;
        }
    }
    common::flush_files(&synth)?;
    run.add("generate", t.elapsed().as_secs_f64(), None, Some(2 * rows));
    println!(
        "    {:.0} MiB of CSV, {} people in both",
        (bytes_under(&synth) as f64) / 1048576.0,
        truth.overlap
    );
    let secret = cleanroom::identity::Secret::generate();

    if let Some(old) = options.baseline {
        let data = work.join("data-baseline");
        let server = Running::start_program(old, &pki, &policies, &data);
        let before = real::upload_with(
            old,
            &server.url,
            &certs,
            "acme",
            &secret,
            (THRESHOLDS, "customers"),
            &acme_file,
        )?;
        server.stop()?;
        std::fs::remove_dir_all(&data)?;
        run.add(
            "upload, baseline build",
            before.seconds,
            None,
            Some(before.rows),
        );
    }

    let data = work.join("data");
    let env: Vec<(&str, &str)> = options
        .config
        .map(|c| ("CLEANROOM_CONFIG", c))
        .into_iter()
        .collect();
    let server = Running::start_env(program, &pki, &policies, &data, &env);
    server.reset_peak();
    let mut seconds = 0.0;
    let mut sent = 0;
    for (org, dataset, file) in [
        ("acme", "customers", &acme_file),
        ("globex", "audience", &globex_file),
    ] {
        let up = real::upload_with(
            program,
            &server.url,
            &certs,
            org,
            &secret,
            (THRESHOLDS, dataset),
            file,
        )?;
        seconds += up.seconds;
        sent += up.rows;
        if let Some(own) = up.own {
            println!("    {org}: {own}");
        }
    }
    run.add("upload", seconds, Some(server.memory().1), Some(sent));
    let stored = bytes_under(&data);
    println!(
        "    store: {:.0} MiB, {:.1} bytes per stored row",
        stored as f64 / 1048576.0,
        stored as f64 / sent as f64
    );

    let acme = common::connect(&server.url, &certs, "acme").await?;
    server.reset_peak();
    let first = timed_query(&acme, THRESHOLDS).await;
    let peak = server.memory().1;
    let lines = server.table_lines();
    let first = match first {
        Ok(first) => {
            run.add("first query", first, Some(peak), None);
            first
        }
        Err(e) => {
            // The matching's figures still say what it took.
            println!("  first query refused: {e}; server peak {peak:.0} MiB");
            f64::NAN
        }
    };
    if let (Some(read), Some(matching)) = (
        field_sum(&lines, "query tables matched", "read_ms"),
        field_sum(&lines, "query tables matched", "match_ms"),
    ) {
        run.add("match", (read + matching) / 1000.0, None, Some(2 * rows));
        println!(
            "    of which reading the versions {:.3} s, linking and keying {:.3} s",
            read / 1000.0,
            matching / 1000.0
        );
    }
    // The background matcher stores the tables once no query runs; warm
    // queries are timed after that, not beside it.
    let mut stored_lines = Vec::new();
    if first.is_finite() {
        let waited = Instant::now();
        while !stored_lines
            .iter()
            .any(|l: &String| l.contains("matched tables stored"))
            && waited.elapsed() < std::time::Duration::from_secs(300)
        {
            stored_lines.extend(server.table_lines());
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        println!(
            "    the matched tables stored {:.1} s after the first answer",
            waited.elapsed().as_secs_f64()
        );
    }
    server.reset_peak();
    let mut warm = Vec::new();
    if first.is_finite() {
        for _ in 0..3 {
            warm.push(timed_query(&acme, THRESHOLDS).await?);
        }
    }
    let warm = if warm.is_empty() {
        f64::NAN
    } else {
        median(warm)
    };
    if warm.is_finite() {
        run.add("warm query", warm, Some(server.memory().1), Some(2 * rows));
    }
    server.reset_peak();
    let (first_overlap, shown) = timed_overlap(&acme, THRESHOLDS).await?;
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(timed_overlap(&acme, THRESHOLDS).await?.0);
    }
    run.add("overlap, first", first_overlap, None, None);
    run.add(
        "overlap, warm",
        median(again),
        Some(server.memory().1),
        None,
    );
    println!(
        "    overlap {} (truth {})",
        shown.unwrap_or_default(),
        truth.overlap
    );
    let (one_loaded, _) = server.memory();
    let agreement = {
        let mut c = acme.clone();
        c.get_agreement(THRESHOLDS).await?
    };

    if options.second {
        server.reset_peak();
        let globex = common::connect(&server.url, &certs, "globex").await?;
        let t = Instant::now();
        for (client, dataset, file) in [
            (&acme, "customers", &acme_file),
            (&globex, "audience", &globex_file),
        ] {
            cleanroom::prepare::upload(
                client,
                &secret,
                &common::upload_options(PRIVATE, dataset, file),
            )
            .await?;
        }
        timed_query(&acme, PRIVATE).await?;
        let (both_loaded, peak) = server.memory();
        run.add(
            "second agreement",
            t.elapsed().as_secs_f64(),
            Some(peak),
            None,
        );
        println!(
            "    resident {one_loaded:.0} MiB with one agreement loaded, {both_loaded:.0} MiB with both ({:+.0} MiB), peak {peak:.0} MiB",
            both_loaded - one_loaded
        );
    }

    drop(acme);
    stored_lines.extend(server.stop()?);
    let wrote = field_sum(&stored_lines, "matched tables stored", "write_ms");
    let t = Instant::now();
    let server = Running::start_env(program, &pki, &policies, &data, &env);
    let started = t.elapsed().as_secs_f64();
    let acme = common::connect(&server.url, &certs, "acme").await?;
    let (before_load, _) = server.memory();
    let after_restart = timed_query(&acme, THRESHOLDS).await;
    let (after_load, peak) = server.memory();
    run.add("restart", started, None, None);
    match after_restart {
        Ok(t) => run.add("first query after restart", t, Some(peak), None),
        Err(e) => println!("  first query after restart refused: {e}; server peak {peak:.0} MiB"),
    }
    println!(
        "    matched tables: stored in {:.3} s, read back: {:.0} MiB resident once loaded ({:.1} bytes per stored row)",
        wrote.unwrap_or(f64::NAN) / 1000.0,
        after_load - before_load,
        (after_load - before_load) * 1048576.0 / (2 * rows) as f64
    );
    drop(acme);
    server.stop()?;

    if let Some(memory) = options.duckdb {
        std::fs::remove_dir_all(&data)?;
        let t = Instant::now();
        let customers = real::prepare_parquet(&agreement, "customers", &acme_file, &secret, work)?;
        std::fs::remove_file(&acme_file)?;
        let audience = real::prepare_parquet(&agreement, "audience", &globex_file, &secret, work)?;
        std::fs::remove_file(&globex_file)?;
        println!(
            "    duckdb's input written as Parquet in {:.1} s (not timed as a stage)",
            t.elapsed().as_secs_f64()
        );
        let db = work.join("duckdb.db");
        let limit = format!("{memory}GB");
        match real::duckdb(
            "duckdb_scale.py",
            &[
                customers.as_os_str(),
                audience.as_os_str(),
                db.as_os_str(),
                "2".as_ref(),
                limit.as_ref(),
            ],
        ) {
            Ok(d) => {
                let f = |k: &str| d[k].as_f64().unwrap_or(f64::NAN);
                let mib = |k: &str| f(k) / 1048576.0;
                println!(
                    "  duckdb {} (2 threads, memory limit {limit}, database file): load {:.3} s, peak {:.0} MiB",
                    d["version"].as_str().unwrap_or("?"),
                    f("load_s"),
                    mib("peak_bytes")
                );
                for (name, ours) in [
                    ("overlap", run.seconds("overlap, warm")),
                    ("governed", Some(warm)),
                ] {
                    println!(
                        "  duckdb {name:<9} first {:.3} s, best of 3 {:.3} s, spilled {:.0} MiB; cleanroom warm / duckdb = {:.3}",
                        f(&format!("{name}_first_s")),
                        f(&format!("{name}_s")),
                        mib(&format!("{name}_spilled_bytes")),
                        ours.unwrap_or(f64::NAN) / f(&format!("{name}_s"))
                    );
                }
                run.stages.push(Stage {
                    name: "duckdb query",
                    seconds: f("governed_s"),
                    peak_mib: Some(mib("peak_bytes")),
                    rows_per_s: None,
                });
            }
            Err(e) => println!("  DuckDB not run: {e}"),
        }
    }
    if warm > 0.0 {
        println!(
            "    first query after the commit: {:.2}x a warm one",
            first / warm
        );
    }
    Ok(())
}

/// Every stage's time per size, and the growth exponents between sizes.
fn summary(runs: &[SizeRun]) {
    println!("\nseconds per stage, and growth exponents between sizes:");
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        for s in &r.stages {
            if !names.contains(&s.name) {
                names.push(s.name);
            }
        }
    }
    let header: Vec<String> = runs.iter().map(|r| format!("{:>11}", r.rows)).collect();
    let steps: Vec<String> = runs
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0].rows as f64, w[1].rows as f64);
            let nlogn = 1.0 + (b.ln() / a.ln()).ln() / (b / a).ln();
            format!("  exp (n log n = {nlogn:.3})")
        })
        .collect();
    println!("  {:<26} {}{}", "stage", header.join(""), steps.join(""));
    for name in names {
        let times: Vec<Option<f64>> = runs.iter().map(|r| r.seconds(name)).collect();
        let cells: Vec<String> = times
            .iter()
            .map(|t| t.map_or(format!("{:>11}", "-"), |t| format!("{t:>11.3}")))
            .collect();
        let exps: Vec<String> = runs
            .windows(2)
            .zip(times.windows(2))
            .map(|(r, t)| match (t[0], t[1]) {
                (Some(a), Some(b)) if a > 0.0 && b > 0.0 => format!(
                    "{:>24.3}",
                    (b / a).ln() / (r[1].rows as f64 / r[0].rows as f64).ln()
                ),
                _ => format!("{:>24}", "-"),
            })
            .collect();
        println!("  {:<26} {}{}", name, cells.join(""), exps.join(""));
    }
}
