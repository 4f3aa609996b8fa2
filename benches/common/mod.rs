//! Helpers shared by the benchmarks.

#![allow(dead_code, unreachable_pub)]

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    text_arg(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value after `--name` on the command line, as text.
pub fn text_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// A stand-in fingerprint for person `person` and identity kind `kind`.
pub fn fingerprint(person: u64, kind: u8) -> [u8; 32] {
    let mut input = [0u8; 9];
    input[..8].copy_from_slice(&person.to_le_bytes());
    input[8] = kind;
    *blake3::hash(&input).as_bytes()
}

/// The Python of a virtual environment under `~/.cache` holding
/// `packages` (pinned), created on first use.
pub fn python_with(venv_name: &str, packages: &[&str]) -> Result<std::path::PathBuf, String> {
    let home = std::env::var("HOME").map_err(|_| "HOME is not set".to_string())?;
    let venv = std::path::PathBuf::from(home)
        .join(".cache")
        .join(venv_name);
    let python = venv.join("bin/python");
    if !python.exists() {
        run(std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv))?;
    }
    run(std::process::Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(packages))?;
    Ok(python)
}

/// Runs a command; its standard output, or its standard error as the error.
/// Writes the generated files in `dir`, and every other file page not yet
/// on disk (the bench binaries `cargo bench` just linked, say), to disk
/// before anything is timed: a partner's export is long written when it is
/// uploaded, and the kernel writing back fresh file pages during the upload
/// (it starts on pages 30 s old) would be timed with it.
pub fn flush_files(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    // Everything else: the system's sync command, where there is one.
    let _ = std::process::Command::new("sync").status();
    Ok(())
}

pub fn run(cmd: &mut std::process::Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Upload options for `input` to `agreement`/`dataset`, no progress bar.
pub fn upload_options(
    agreement: &str,
    dataset: &str,
    input: &std::path::Path,
) -> cleanroom::prepare::UploadOptions {
    cleanroom::prepare::UploadOptions {
        agreement: agreement.into(),
        dataset: dataset.into(),
        input: input.to_path_buf(),
        format: None,
        csv: cleanroom::prepare::CsvOptions::default(),
        mapping: Default::default(),
        upload_id: None,
        progress: false,
    }
}

/// A development CA, server certificate and client certificates for the
/// demo parties, in `dir/certs`; returns that folder.
pub fn pki(dir: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let certs = dir.join("certs");
    cleanroom::certs::init(&certs, &[], false)?;
    for org in ["acme", "globex"] {
        cleanroom::certs::issue_client(&certs, org, false)?;
    }
    Ok(certs)
}

/// A server in this process on 127.0.0.1:0.
pub struct InProcess {
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<Result<(), cleanroom::server::ServerError>>,
}

impl InProcess {
    pub async fn start(
        certs: &std::path::Path,
        policies: &std::path::Path,
        data: &std::path::Path,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cleanroom::server::serve(
            listener,
            cleanroom::server::ServerOptions {
                shutdown_grace: std::time::Duration::from_millis(10),
                ..cleanroom::server::ServerOptions::new(certs, policies, data)
            },
            async {
                let _ = stopped.await;
            },
        ));
        Ok(InProcess { url, stop, task })
    }

    /// Stops the server and waits until it has.
    pub async fn stop(self) -> Result<(), Box<dyn std::error::Error>> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// A client of the server at `url` as `org`, with the certificates in
/// `certs`.
pub async fn connect(
    url: &str,
    certs: &std::path::Path,
    org: &str,
) -> Result<cleanroom::client::Client, Box<dyn std::error::Error>> {
    let config = cleanroom::client::ClientConfig::new(url.to_string(), certs.join("ca.pem"))
        .with_identity(
            certs.join(format!("{org}.pem")),
            certs.join(format!("{org}-key.pem")),
        );
    Ok(cleanroom::client::Client::connect(&config).await?)
}

use std::sync::Arc;

use arrow::array::{FixedSizeBinaryBuilder, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;

const REGIONS: [&str; 4] = ["north", "south", "east", "west"];
const AGES: [&str; 6] = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
const SEGMENTS: [&str; 6] = ["sports", "travel", "home", "tech", "fashion", "food"];

/// Batches of 65,536 rows of one side of the demo agreement: `customers`
/// (acme) or `audience` (globex), people `ids`.
pub fn side(ids: &[u64], customers: bool) -> Vec<RecordBatch> {
    ids.chunks(65_536)
        .map(|chunk| {
            let mut email = FixedSizeBinaryBuilder::new(32);
            let mut phone = FixedSizeBinaryBuilder::new(32);
            for p in chunk {
                email.append_value(fingerprint(*p, 0)).expect("32 bytes");
                if p % 10 < 7 {
                    phone.append_value(fingerprint(*p, 1)).expect("32 bytes");
                } else {
                    phone.append_null();
                }
            }
            let (dim, dim_values, metric_name): (&str, &[&str], &str) = if customers {
                ("age_band", &AGES, "region")
            } else {
                ("interest_segment", &SEGMENTS, "ad_exposures")
            };
            let mut fields = vec![
                Field::new("email", DataType::FixedSizeBinary(32), true),
                Field::new("phone", DataType::FixedSizeBinary(32), true),
                Field::new(dim, DataType::Utf8, true),
            ];
            let mut columns: Vec<arrow::array::ArrayRef> = vec![
                Arc::new(email.finish()),
                Arc::new(phone.finish()),
                Arc::new(StringArray::from_iter_values(
                    chunk
                        .iter()
                        .map(|p| dim_values[(p * 7 % dim_values.len() as u64) as usize]),
                )),
            ];
            if customers {
                fields.push(Field::new(metric_name, DataType::Utf8, true));
                fields.push(Field::new("lifetime_value", DataType::Float64, true));
                columns.push(Arc::new(StringArray::from_iter_values(
                    chunk.iter().map(|p| REGIONS[(p * 13 % 4) as usize]),
                )));
                columns.push(Arc::new(Float64Array::from_iter_values(
                    chunk.iter().map(|p| (p * 37 % 5000) as f64),
                )));
            } else {
                fields.push(Field::new(metric_name, DataType::Int64, true));
                fields.push(Field::new("spend", DataType::Float64, true));
                columns.push(Arc::new(Int64Array::from_iter_values(
                    chunk.iter().map(|p| (p % 50) as i64),
                )));
                columns.push(Arc::new(Float64Array::from_iter_values(
                    chunk.iter().map(|p| (p * 11 % 2000) as f64),
                )));
            }
            RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).expect("valid batch")
        })
        .collect()
}
