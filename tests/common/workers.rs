//! Workers of the distributed engine for tests: real `cleanroom worker`
//! processes on 127.0.0.1 under mutual TLS. With `CLEANROOM_TEST_WORKERS=N`
//! set, every test server and every in-process governed query of the
//! suites that use [`run`] go through N shared workers.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cleanroom::cluster::{Cluster, ClusterConfig, WorkerTls};
use cleanroom::policy::Policy;
use cleanroom::query::{QueryError, QueryOutcome, TableData};
use url::Url;

use super::Pki;
use super::worker_process::spawn_worker;

/// Worker processes; killed when dropped (and they stop by themselves
/// when this process ends: their standard input closes).
pub struct Workers {
    pub urls: Vec<Url>,
    pub children: Vec<Child>,
    pub certs: PathBuf,
}

impl Workers {
    /// `n` workers with certificates of the worker role from the CA in
    /// `certs` (`w0`, `w1`, ... and `server` for the coordinator).
    pub fn spawn(certs: &Path, n: usize) -> Self {
        if !cleanroom::certs::worker_files(certs, "server")
            .cert
            .exists()
        {
            cleanroom::certs::issue_worker(certs, "server", &[], false).unwrap();
        }
        let (children, urls) = (0..n)
            .map(|i| spawn_worker(certs, &format!("w{i}")))
            .unzip();
        Workers {
            urls,
            children,
            certs: certs.to_path_buf(),
        }
    }

    /// What a server needs to use them.
    pub fn config(&self) -> ClusterConfig {
        ClusterConfig {
            workers: self.urls.clone(),
            tls: WorkerTls::in_dir(&self.certs, "server"),
            health_interval: Duration::from_millis(300),
        }
    }

    /// Kills worker `i` at once (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many shared workers the suites run through (0: none).
pub fn wanted() -> usize {
    std::env::var("CLEANROOM_TEST_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The workers this test process shares, if `CLEANROOM_TEST_WORKERS` asks
/// for some.
pub fn shared() -> Option<&'static (Pki, std::sync::Mutex<Workers>)> {
    static SHARED: OnceLock<Option<(Pki, std::sync::Mutex<Workers>)>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let n = wanted();
            (n > 0).then(|| {
                let pki = Pki::new();
                let workers = Workers::spawn(pki.path(), n);
                (pki, std::sync::Mutex::new(workers))
            })
        })
        .as_ref()
}

/// The shared workers' cluster configuration, if any.
pub fn shared_config() -> Option<ClusterConfig> {
    shared().map(|(_, w)| w.lock().unwrap().config())
}

/// A governed query as `cleanroom::query::run` asks it, through the shared
/// workers when there are some: the tables placed on them under a name of
/// their own, dropped again after.
pub async fn run(
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
) -> Result<QueryOutcome, QueryError> {
    match shared_config() {
        None => cleanroom::query::run(policy, org, tables, sql).await,
        Some(config) => {
            let cluster = Cluster::start(config).await.unwrap();
            let out = placed_run(&cluster, policy, org, tables, sql).await;
            ran_on_workers();
            out
        }
    }
}

/// Under shared workers, checks that no stage so far fell back to the
/// server: a suite run through workers that quietly ran on the server
/// would test nothing.
pub fn ran_on_workers() {
    if wanted() > 0 {
        assert_eq!(
            cleanroom::query::reruns_on_server(),
            0,
            "a stage failed on the workers and ran on the server"
        );
    }
}

/// [`run`] on `cluster`'s workers.
pub async fn placed_run(
    cluster: &Arc<Cluster>,
    policy: &Policy,
    org: &str,
    tables: &[TableData],
    sql: &str,
) -> Result<QueryOutcome, QueryError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let label = format!(
        "test-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let placement = cluster
        .place(&label, std::slice::from_ref(&label), tables)
        .await
        .expect("placing the tables on the workers");
    let out = cleanroom::query::run_with(policy, org, tables, sql, Some(placement.as_ref())).await;
    cluster.forget(&label, None);
    out
}
