//! A real server on 127.0.0.1:0 with real mutual TLS, for integration tests.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod differential;
pub mod people;
pub mod worker_process;
pub mod workers;

use arrow::record_batch::RecordBatch;
use cleanroom::client::{Client, ClientConfig};
use cleanroom::clock::{Clock, SystemClock};
use cleanroom::proto;
use cleanroom::proto::datasets_service_client::DatasetsServiceClient;
use cleanroom::proto::upload_request::Part;
use cleanroom::server::{ServerError, ServerOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The shipped demo agreement, `policies/retail-media-demo.toml`.
pub fn demo_policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml")
}

/// A policies folder holding the shipped demo agreement and nothing else:
/// agreements a user adds to `policies/` (as the docs invite) never change
/// what the suite's servers load. Written afresh by each test binary
/// (write, then rename over, so concurrent binaries agree).
pub fn policies_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-policies");
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!(".demo.{}.tmp", std::process::id()));
        std::fs::copy(demo_policy_file(), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("retail-media-demo.toml")).unwrap();
        dir
    })
    .clone()
}

/// A CA, a server certificate and client certificates for the demo parties
/// and for `initech`, which is party to nothing.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        cleanroom::certs::init(dir.path(), &[], false).unwrap();
        for org in ["acme", "globex", "initech"] {
            cleanroom::certs::issue_client(dir.path(), org, false).unwrap();
        }
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub pki: Pki,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<Result<(), ServerError>>>,
}

pub struct Setup {
    pub policies: PathBuf,
    pub clock: Arc<dyn Clock>,
    pub shutdown_grace: Duration,
    pub limits: cleanroom::upload::Limits,
    pub query_limits: cleanroom::query::QueryLimits,
    pub policy_poll: Duration,
    pub maintenance_interval: Duration,
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub deletion: cleanroom::server::Deletion,
    pub scrub: cleanroom::server::Scrub,
    pub drain_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// Workers the private stage runs on: the shared ones when
    /// `CLEANROOM_TEST_WORKERS` asks for some.
    pub cluster: Option<cleanroom::cluster::ClusterConfig>,
}

/// Deletion as the tests that move a manual clock by months need it: the
/// moves stand for time that passed, and an expired agreement's data goes
/// at once. `tests/faults.rs` checks the server's own defaults.
pub fn deletion_for_moved_clocks() -> cleanroom::server::Deletion {
    cleanroom::server::Deletion {
        max_clock_jump: Duration::from_secs(10 * 366 * 86_400),
        grace: Duration::ZERO,
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            policies: policies_dir(),
            clock: Arc::new(SystemClock),
            shutdown_grace: Duration::from_millis(50),
            limits: cleanroom::upload::Limits::default(),
            query_limits: cleanroom::query::QueryLimits::default(),
            policy_poll: Duration::from_millis(100),
            maintenance_interval: Duration::from_millis(100),
            metrics_listen: None,
            deletion: deletion_for_moved_clocks(),
            scrub: cleanroom::server::Scrub::default(),
            drain_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            cluster: workers::shared_config(),
        }
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Self {
        Self::start_in(Pki::new(), tempfile::tempdir().unwrap(), setup).await
    }

    /// Stops the server and hands over its data directory (the parent of
    /// `data`), which would otherwise be deleted with the server.
    pub async fn stop_keeping_data(mut self) -> tempfile::TempDir {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap().unwrap();
        self.data_dir
    }

    /// Stops the server and starts another on the same data and certificates.
    pub async fn restart(mut self, setup: Setup) -> Self {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap().unwrap();
        let (pki, data_dir) = (self.pki, self.data_dir);
        Self::start_in(pki, data_dir, setup).await
    }

    /// Stops the server and hands over its certificates and data directory.
    pub async fn stop_keeping_all(mut self) -> (Pki, tempfile::TempDir) {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap().unwrap();
        (self.pki, self.data_dir)
    }

    /// Starts a server on existing certificates and data (`data_dir`'s
    /// `data` folder).
    pub async fn start_in(pki: Pki, data_dir: tempfile::TempDir, setup: Setup) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServerOptions {
            limits: setup.limits,
            query_limits: setup.query_limits,
            shutdown_grace: setup.shutdown_grace,
            drain_timeout: setup.drain_timeout,
            tls_handshake_timeout: setup.tls_handshake_timeout,
            clock: setup.clock,
            policy_poll: setup.policy_poll,
            maintenance_interval: setup.maintenance_interval,
            metrics_listen: setup.metrics_listen,
            deletion: setup.deletion,
            scrub: setup.scrub,
            cluster: setup.cluster,
            ..ServerOptions::new(pki.path(), &setup.policies, &data_dir.path().join("data"))
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(cleanroom::server::serve(listener, options, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            pki,
            data_dir,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn config(&self, org: Option<&str>) -> ClientConfig {
        let config = ClientConfig::new(self.url(), self.pki.path().join("ca.pem"));
        match org {
            Some(org) => config.with_identity(
                self.pki.path().join(format!("{org}.pem")),
                self.pki.path().join(format!("{org}-key.pem")),
            ),
            None => config,
        }
    }

    pub async fn client(&self, org: &str) -> Client {
        workers::ran_on_workers();
        Client::connect(&self.config(Some(org))).await.unwrap()
    }

    /// Asks the server to stop, as a signal would.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        self.task.take().unwrap().await.unwrap()
    }
}

/// A shared secret both demo parties use.
pub fn secret() -> cleanroom::identity::Secret {
    cleanroom::identity::Secret::from_hex(&"5a".repeat(32), "test").unwrap()
}

/// Synthetic partner files in a fresh folder.
pub fn synth(rows: u64, overlap: f64) -> (tempfile::TempDir, cleanroom::synth::SynthTruth) {
    let dir = tempfile::tempdir().unwrap();
    let truth = cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows,
        overlap,
        seed: 11,
        out: dir.path().to_path_buf(),
    })
    .unwrap();
    (dir, truth)
}

pub fn upload_options(dataset: &str, input: &Path) -> cleanroom::prepare::UploadOptions {
    cleanroom::prepare::UploadOptions {
        agreement: "retail-media-demo".into(),
        dataset: dataset.into(),
        input: input.to_path_buf(),
        format: None,
        csv: cleanroom::prepare::CsvOptions::default(),
        mapping: Default::default(),
        upload_id: None,
        progress: false,
    }
}

/// The real `cleanroom` binary serving on 127.0.0.1:0.
pub struct RealServer {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::mpsc::Receiver<String>,
    /// Log lines read before the address showed up.
    pub early_log: Vec<String>,
}

impl RealServer {
    pub fn spawn(pki: &Pki, data_dir: &Path, grace_seconds: &str) -> Self {
        Self::spawn_with(pki, data_dir, grace_seconds, &policies_dir())
    }

    pub fn spawn_with(pki: &Pki, data_dir: &Path, grace_seconds: &str, policies: &Path) -> Self {
        Self::spawn_env(pki, data_dir, grace_seconds, policies, &[])
    }

    /// As [`RealServer::spawn_with`], with extra environment variables.
    pub fn spawn_env(
        pki: &Pki,
        data_dir: &Path,
        grace_seconds: &str,
        policies: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_program(
            Path::new(env!("CARGO_BIN_EXE_cleanroom")),
            pki,
            data_dir,
            grace_seconds,
            policies,
            env,
        )
    }

    /// As [`RealServer::spawn_env`], running `program` (another build of
    /// `cleanroom`, for a bench's A/B) instead of this one.
    pub fn spawn_program(
        program: &Path,
        pki: &Pki,
        data_dir: &Path,
        grace_seconds: &str,
        policies: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(program)
            .envs(env.iter().copied())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--shutdown-grace",
                grace_seconds,
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--policies")
            .arg(policies)
            .arg("--certs-dir")
            .arg(pki.path())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut early_log = Vec::new();
        loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not log its address: {early_log:?}");
            };
            early_log.push(line.clone());
            if line.contains("\"listening\"") {
                let start = line.find("\"addr\":\"").unwrap() + 8;
                let end = start + line[start..].find('"').unwrap();
                let addr = line[start..end].to_string();
                return RealServer {
                    child,
                    addr,
                    log: rx,
                    early_log,
                };
            }
        }
    }

    pub fn config(&self, pki: &Pki, org: &str) -> ClientConfig {
        ClientConfig::new(format!("https://{}", self.addr), pki.path().join("ca.pem"))
            .with_identity(
                pki.path().join(format!("{org}.pem")),
                pki.path().join(format!("{org}-key.pem")),
            )
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sends a signal to our own child process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0);
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Uploads a demo party's synthetic file: acme's customers or globex's audience.
pub async fn upload_demo(
    server: &TestServer,
    org: &str,
    dir: &Path,
) -> cleanroom::prepare::UploadReport {
    let (dataset, file) = match org {
        "acme" => ("customers", cleanroom::synth::ACME_FILE),
        _ => ("audience", cleanroom::synth::GLOBEX_FILE),
    };
    let client = server.client(org).await;
    cleanroom::prepare::upload(
        &client,
        &secret(),
        &upload_options(dataset, &dir.join(file)),
    )
    .await
    .unwrap()
}

/// The CSV `text` with cell `column` of data rows `rows` (1-based) set to `value`.
pub fn with_cells(
    text: &str,
    rows: std::ops::RangeInclusive<usize>,
    column: usize,
    value: &str,
) -> String {
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for row in rows {
        let mut cells: Vec<&str> = lines[row].split(',').collect();
        cells[column] = value;
        lines[row] = cells.join(",");
    }
    lines.join("\n") + "\n"
}

/// Sends raw upload messages, bypassing the partner-side preparation.
pub async fn raw_upload(
    client: &Client,
    messages: Vec<proto::UploadRequest>,
) -> Result<proto::UploadResponse, tonic::Status> {
    DatasetsServiceClient::new(client.channel())
        .upload(tokio_stream::iter(messages))
        .await
        .map(tonic::Response::into_inner)
}

/// Uploads one batch that the server must refuse; its status.
pub async fn refused_batch(
    client: &Client,
    hash: &str,
    dataset: &str,
    id: &str,
    batch: &RecordBatch,
) -> tonic::Status {
    let rows = batch.num_rows() as u64;
    raw_upload(
        client,
        vec![header(hash, dataset, id), batch_msg(batch), commit(rows, 1)],
    )
    .await
    .unwrap_err()
}

pub fn header(client_hash: &str, dataset: &str, id: &str) -> proto::UploadRequest {
    proto::UploadRequest {
        part: Some(Part::Header(proto::UploadHeader {
            agreement_id: "retail-media-demo".into(),
            dataset: dataset.into(),
            upload_id: id.into(),
            policy_hash: client_hash.into(),
            key_id: Vec::new(),
        })),
    }
}

pub fn batch_msg(batch: &RecordBatch) -> proto::UploadRequest {
    proto::UploadRequest {
        part: Some(Part::Batch(cleanroom::upload::encode_batch(batch).unwrap())),
    }
}

pub fn commit(rows: u64, batches: u64) -> proto::UploadRequest {
    proto::UploadRequest {
        part: Some(Part::Commit(proto::UploadCommit { rows, batches })),
    }
}

/// A policies folder holding the demo agreement with `privacy` as its
/// `[privacy]` section (None: thresholds only).
pub fn demo_policies(privacy: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    let text = match privacy {
        None => head.to_string(),
        Some(p) => format!("{head}[privacy]\n{p}\n"),
    };
    std::fs::write(dir.path().join("retail-media-demo.toml"), text).unwrap();
    dir
}

/// The demo agreement's policy hash, as acme's client reads it.
pub async fn policy_hash(server: &TestServer) -> String {
    server
        .client("acme")
        .await
        .get_agreement("retail-media-demo")
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash
}

/// Polls `check` for up to 5 seconds.
pub async fn eventually<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether the caller's only agreement reaches `state` within 5 seconds.
pub async fn reaches_state(client: &Client, state: proto::AgreementState) -> bool {
    eventually(|| {
        let mut c = client.clone();
        async move { c.list_agreements().await.unwrap()[0].state == state as i32 }
    })
    .await
}

/// Whether any audit field that could carry a data value holds `value`:
/// the counts, or a whole run of digits in a text field. Times, sequence
/// numbers and hex hashes are data-independent and may contain the digits
/// by chance, so they are left out.
pub fn audit_holds(entries: &[proto::AuditEntry], value: u64) -> bool {
    let digits = value.to_string();
    entries.iter().any(|e| {
        // Action and decision are enums: they hold no text.
        let texts = [
            Some(&e.organisation),
            e.rule.as_ref(),
            e.subject.as_ref(),
            e.template.as_ref(),
        ];
        e.rows == Some(value)
            || e.suppressed == Some(value)
            || texts
                .into_iter()
                .flatten()
                .any(|t| t.split(|c: char| !c.is_ascii_digit()).any(|w| w == digits))
    })
}

pub const KEYED: &str = "retail-media-demo";
pub const ECDH: &str = "retail-media-ecdh";

/// The demo agreement (thresholds only) twice: as shipped, and as an
/// `ecdh` agreement under another id.
pub fn both_matching_modes() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(policies_dir().join("retail-media-demo.toml")).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    std::fs::write(dir.path().join(format!("{KEYED}.toml")), head).unwrap();
    let ecdh = head
        .replace(&format!("id = \"{KEYED}\""), &format!("id = \"{ECDH}\""))
        .replacen("\nsalt = ", "\nmatching = \"ecdh\"\nsalt = ", 1);
    assert!(ecdh.contains("matching = \"ecdh\""));
    std::fs::write(dir.path().join(format!("{ECDH}.toml")), ecdh).unwrap();
    dir
}

/// Erases acme's first `people` customers (the first rows of its synthetic
/// file) from its dataset in `agreement`, with `keys`.
pub async fn erase_first_customers(
    client: &Client,
    keys: impl Into<cleanroom::prepare::Keys<'_>>,
    agreement: &str,
    dir: &Path,
    people: usize,
) -> cleanroom::prepare::EraseReport {
    let text = std::fs::read_to_string(dir.join(cleanroom::synth::ACME_FILE)).unwrap();
    let withdrawn = dir.join(format!("withdrawn-{people}.csv"));
    let lines: Vec<&str> = text.lines().take(people + 1).collect();
    std::fs::write(&withdrawn, lines.join("\n") + "\n").unwrap();
    let options = cleanroom::prepare::EraseOptions {
        agreement: agreement.into(),
        dataset: "customers".into(),
        input: withdrawn,
        format: None,
        csv: cleanroom::prepare::CsvOptions::default(),
        mapping: Default::default(),
    };
    cleanroom::prepare::erase(client, keys, &options)
        .await
        .unwrap()
}

/// Uploads `batch` as one version of the demo dataset `org` owns
/// (`customers` for acme, `audience` for globex), upload id `id`.
pub async fn upload_people(
    server: &TestServer,
    org: &str,
    batch: &arrow::record_batch::RecordBatch,
    id: &str,
) {
    let (dataset, client) = match org {
        "acme" => ("customers", server.client("acme").await),
        _ => ("audience", server.client("globex").await),
    };
    let hash = policy_hash(server).await;
    raw_upload(
        &client,
        vec![
            header(&hash, dataset, id),
            batch_msg(batch),
            commit(batch.num_rows() as u64, 1),
        ],
    )
    .await
    .unwrap();
}

/// What an analyst observes of a library-level run: the rows, or the kind
/// and text of the refusal.
pub fn observed(
    outcome: &Result<cleanroom::query::QueryOutcome, cleanroom::query::QueryError>,
) -> String {
    match outcome {
        Ok(o) => arrow::util::pretty::pretty_format_batches(&o.batches)
            .unwrap()
            .to_string(),
        Err(e) => format!("error: {e}"),
    }
}
