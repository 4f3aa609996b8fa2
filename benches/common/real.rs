//! The real `cleanroom serve` binary in a process of its own, timed as a
//! client sees it, and DuckDB on the same stored data: shared by the
//! side-by-side and scale benches. A bench that uses it also declares
//! `#[path = "../tests/common/mod.rs"] mod support;`.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Instant;

use cleanroom::client::Client;
use cleanroom::prepare::{CsvOptions, InputFormat, InputReader, Plan, Preparer};

/// The governed query both benches time, under thresholds and privacy.
pub const SQL: &str = "SELECT c.region, COUNT(*) AS n, AVG(c.lifetime_value) AS ltv \
                       FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";

/// The demo agreement as shipped (differential privacy).
pub const PRIVATE: &str = "retail-media-demo";
/// The demo agreement without its `[privacy]` section.
pub const THRESHOLDS: &str = "retail-media-thresholds";

/// Writes both demo agreements into `dir`: the shipped one and its
/// thresholds-only copy.
pub fn demo_policies(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml"),
    )?;
    std::fs::write(dir.join(format!("{PRIVATE}.toml")), &shipped)?;
    let (head, _) = shipped
        .split_once("[privacy]")
        .ok_or("the demo has a [privacy] section")?;
    std::fs::write(
        dir.join(format!("{THRESHOLDS}.toml")),
        head.replace(
            &format!("id = \"{PRIVATE}\""),
            &format!("id = \"{THRESHOLDS}\""),
        ),
    )?;
    Ok(())
}

/// A `cleanroom serve` process, so its memory is its own.
pub struct Running {
    pub server: crate::support::RealServer,
    pub url: String,
}

impl Running {
    pub fn start(pki: &crate::support::Pki, policies: &Path, data: &Path) -> Self {
        Self::start_program(
            Path::new(env!("CARGO_BIN_EXE_cleanroom")),
            pki,
            policies,
            data,
        )
    }

    /// As [`Running::start`], with another build of `cleanroom`.
    pub fn start_program(
        program: &Path,
        pki: &crate::support::Pki,
        policies: &Path,
        data: &Path,
    ) -> Self {
        Self::start_env(program, pki, policies, data, &[])
    }

    /// As [`Running::start_program`], with extra environment variables
    /// (`CLEANROOM_CONFIG`, say).
    pub fn start_env(
        program: &Path,
        pki: &crate::support::Pki,
        policies: &Path,
        data: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let server =
            crate::support::RealServer::spawn_program(program, pki, data, "0", policies, env);
        Running {
            url: format!("https://{}", server.addr),
            server,
        }
    }

    /// Stops the server gracefully (SIGTERM) and waits for it; the fields
    /// of its log lines about tables (matchings, reads, writes).
    pub fn stop(mut self) -> Result<Vec<String>, Box<dyn std::error::Error>> {
        self.server.signal(libc::SIGTERM);
        self.server.child.wait()?;
        // Every line, to the end of its log (the reader ends at its EOF).
        Ok(self
            .server
            .log
            .iter()
            .filter_map(|l| table_fields(&l))
            .collect())
    }

    /// The fields of the log lines about tables logged so far.
    pub fn table_lines(&self) -> Vec<String> {
        self.server
            .log
            .try_iter()
            .filter_map(|l| table_fields(&l))
            .collect()
    }

    /// Resident and peak resident memory of the server process, MiB.
    pub fn memory(&self) -> (f64, f64) {
        memory_of(&format!("/proc/{}/status", self.server.child.id()))
    }

    /// Starts a new peak: the kernel's peak resident memory of the process
    /// is set to what it holds now (Linux `clear_refs`, value 5).
    pub fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.server.child.id()), "5");
    }
}

/// The fields of a JSON log line about tables.
fn table_fields(line: &str) -> Option<String> {
    if !line.contains(" tables ") {
        return None;
    }
    let start = line.find("\"fields\":{")?;
    let end = line[start..].find('}')?;
    Some(line[start + 10..start + end].to_string())
}

/// Resident and peak resident memory from a /proc status file, MiB.
pub fn memory_of(status: &str) -> (f64, f64) {
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

pub fn median(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Seconds an overlap takes as the client sees it, and the count shown.
pub async fn timed_overlap(
    client: &Client,
    agreement: &str,
) -> Result<(f64, Option<u64>), Box<dyn std::error::Error>> {
    let mut c = client.clone();
    let t = Instant::now();
    let r = c.overlap(agreement, &[]).await?;
    Ok((t.elapsed().as_secs_f64(), r.overlap))
}

/// Seconds a governed query takes as the client sees it.
pub async fn timed_query(
    client: &Client,
    agreement: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut c = client.clone();
    let t = Instant::now();
    c.query(agreement, SQL).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// What one `cleanroom upload` process did.
pub struct UploadRun {
    pub seconds: f64,
    pub rows: u64,
    /// The command's own line "N batches, M MiB, S s, R rows/s".
    pub own: Option<String>,
}

/// Runs `program upload` (a partner's own process) for `input`.
pub fn upload_with(
    program: &Path,
    url: &str,
    certs: &Path,
    org: &str,
    secret: &cleanroom::identity::Secret,
    (agreement, dataset): (&str, &str),
    input: &Path,
) -> Result<UploadRun, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let out = std::process::Command::new(program)
        .args(["upload", "--agreement", agreement, "--dataset", dataset])
        .arg("--input")
        .arg(input)
        .arg("--no-progress")
        .env("CLEANROOM_SERVER", url)
        .env("CLEANROOM_CA", certs.join("ca.pem"))
        .env("CLEANROOM_CERT", certs.join(format!("{org}.pem")))
        .env("CLEANROOM_KEY", certs.join(format!("{org}-key.pem")))
        .env("CLEANROOM_SECRET", secret.to_hex())
        .output()?;
    let seconds = t.elapsed().as_secs_f64();
    let said = String::from_utf8_lossy(&out.stdout);
    // "uploaded SENT of READ rows to ..."
    let rows: u64 = said
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
    let own = said
        .lines()
        .find(|l| l.trim_end().ends_with("rows/s"))
        .map(|l| l.trim().to_string());
    Ok(UploadRun { seconds, rows, own })
}

/// What the upload would store for `dataset`, as a Parquet file in `dir`.
pub fn prepare_parquet(
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

/// Runs one of the DuckDB scripts under `benches/python` in the benches'
/// virtual environment; its one JSON line.
pub fn duckdb(script: &str, args: &[&std::ffi::OsStr]) -> Result<serde_json::Value, String> {
    let python = crate::common::python_with("cleanroom-bench-duckdb-venv", &["duckdb==2.0.1"])?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/python")
        .join(script);
    let out = crate::common::run(std::process::Command::new(python).arg(script).args(args))?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line.trim()).map_err(|e| format!("unexpected output {out}: {e}"))
}
