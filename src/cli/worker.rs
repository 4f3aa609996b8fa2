//! `cleanroom worker`: an execution worker for the server's distributed
//! engine (`docs/distributed.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::serve::{LogFormat, init_logging, shutdown_signal};
use crate::server::{DEFAULT_WORKER_LISTEN, TlsFiles, WorkerOptions};

#[derive(Debug, Args)]
pub(super) struct WorkerArgs {
    /// Address to listen on [default: 127.0.0.1:50061]; port 0 picks a
    /// free one, printed on standard output.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Folder with ca.pem and this worker's worker-NAME.pem and
    /// worker-NAME-key.pem (`cleanroom certs issue --worker NAME`).
    #[arg(long, default_value = "cleanroom-data/certs")]
    certs_dir: PathBuf,
    /// This worker's name, as its certificate was issued.
    #[arg(long)]
    name: String,
    /// Memory the partitions this worker holds may take, in bytes.
    #[arg(long, default_value_t = 8 << 30)]
    max_memory_bytes: u64,
    /// Memory one plan's operators may take, in bytes.
    #[arg(long, default_value_t = crate::query::QueryLimits::default().memory_bytes)]
    max_query_memory_bytes: usize,
    /// Log format [default: text].
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Stop when standard input closes (a supervisor that holds the pipe;
    /// the tests use it so that no worker outlives them).
    #[arg(long, hide = true)]
    stop_on_stdin_close: bool,
}

pub(super) fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let files = crate::certs::worker_files(&args.certs_dir, &args.name);
    let options = WorkerOptions {
        tls: TlsFiles {
            ca: args.certs_dir.join(crate::certs::CA_CERT),
            cert: files.cert,
            key: files.key,
        },
        max_memory_bytes: args.max_memory_bytes,
        query_memory_bytes: args.max_query_memory_bytes,
        tls_handshake_timeout: Duration::from_secs(10),
    };
    init_logging(args.log_format);
    let listen = match args.listen {
        Some(a) => a,
        None => DEFAULT_WORKER_LISTEN.parse()?,
    };
    let rt = super::runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        println!("worker listening on {}", crate::server::worker_url(addr));
        let stdin_closed = async move {
            if !args.stop_on_stdin_close {
                return std::future::pending().await;
            }
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
            tracing::info!("standard input closed; stopping");
        };
        let stop = async move {
            tokio::select! {
                () = shutdown_signal() => {}
                () = stdin_closed => {}
            }
        };
        crate::server::serve_worker(listener, options, stop)
            .await
            .context("the worker could not start")
    })?;
    Ok(ExitCode::SUCCESS)
}
