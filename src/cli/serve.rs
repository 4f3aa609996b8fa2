//! `cleanroom serve`: flags over an optional config file over defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::clock::SystemClock;
use crate::query::QueryLimits;
use crate::server::{Deletion, Scrub, ServerOptions, TlsFiles};
use crate::upload::Limits;

const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
const DEFAULT_DATA_DIR: &str = "cleanroom-data";
const DEFAULT_POLICIES_DIR: &str = "policies";
const DEFAULT_SHUTDOWN_GRACE_SECONDS: f64 = 2.0;
const DEFAULT_DRAIN_TIMEOUT_SECONDS: f64 = 30.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub(super) struct ServeArgs {
    /// TOML config file; flags given here override it.
    #[arg(long, env = "CLEANROOM_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory [default: ./cleanroom-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Folder of policy files [default: ./policies].
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Folder with ca.pem, server.pem and server-key.pem [default: DATA_DIR/certs].
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// Master key file [default: DATA_DIR/master.key, created on first start].
    #[arg(long, env = "CLEANROOM_MASTER_KEY")]
    master_key: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds health reports NOT_SERVING before draining [default: 2].
    #[arg(long)]
    shutdown_grace: Option<f64>,
    /// Serve Prometheus metrics on this address, plain HTTP at /metrics
    /// [default: off]; keep it on a private interface.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
}

/// The config file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    policies_dir: Option<PathBuf>,
    tls: Option<TlsSection>,
    master_key: Option<PathBuf>,
    max_upload_rows: Option<u64>,
    max_upload_bytes: Option<u64>,
    max_rows_per_identifier: Option<u32>,
    query_timeout_seconds: Option<f64>,
    upload_idle_timeout_seconds: Option<f64>,
    upload_max_seconds: Option<f64>,
    max_query_memory_bytes: Option<usize>,
    max_concurrent_queries: Option<usize>,
    max_concurrent_queries_per_org: Option<usize>,
    table_cache_bytes: Option<u64>,
    log_format: Option<LogFormat>,
    shutdown_grace_seconds: Option<f64>,
    drain_timeout_seconds: Option<f64>,
    policy_poll_seconds: Option<f64>,
    maintenance_interval_seconds: Option<f64>,
    metrics_listen: Option<SocketAddr>,
    max_clock_jump_seconds: Option<f64>,
    deletion_grace_seconds: Option<f64>,
    scrub_interval_seconds: Option<f64>,
    tls_handshake_timeout_seconds: Option<f64>,
    scrub_bytes_per_second: Option<u64>,
    cluster: Option<ClusterSection>,
}

/// Workers of the distributed engine (`cleanroom worker`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    /// `https://HOST:PORT` of each worker.
    workers: Vec<String>,
    /// The CA that signed the workers' certificates, and the certificate
    /// of the worker role the server presents to them.
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    health_interval_seconds: Option<f64>,
}

fn cluster(
    section: Option<ClusterSection>,
) -> anyhow::Result<Option<crate::cluster::ClusterConfig>> {
    let Some(s) = section else {
        return Ok(None);
    };
    if s.workers.is_empty() {
        anyhow::bail!("cluster.workers: must list at least one worker");
    }
    let mut workers = Vec::new();
    for (i, w) in s.workers.iter().enumerate() {
        match url::Url::parse(w) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() && u.port().is_some() => {
                workers.push(u)
            }
            _ => anyhow::bail!("cluster.workers[{i}]: must be https://HOST:PORT"),
        }
    }
    Ok(Some(crate::cluster::ClusterConfig {
        workers,
        tls: crate::cluster::WorkerTls {
            ca: s.ca,
            cert: s.cert,
            key: s.key,
        },
        health_interval: positive_seconds(
            "cluster.health_interval_seconds",
            s.health_interval_seconds,
            Duration::from_secs(2),
        )?,
    }))
}

/// Certificates from an existing CA, file by file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn read_config(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))
}

fn seconds(field: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| anyhow::anyhow!("{field}: must be a non-negative number of seconds"))
}

fn positive_seconds(
    field: &str,
    value: Option<f64>,
    default: Duration,
) -> anyhow::Result<Duration> {
    match value {
        Some(s) if s > 0.0 => seconds(field, s),
        Some(_) => anyhow::bail!("{field}: must be more than 0"),
        None => Ok(default),
    }
}

fn at_least_one<T: PartialOrd + From<u8>>(
    field: &str,
    value: Option<T>,
    default: T,
) -> anyhow::Result<T> {
    match value {
        Some(v) if v < T::from(1) => Err(anyhow::anyhow!("{field}: must be at least 1")),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn query_limits(file: &ConfigFile) -> anyhow::Result<QueryLimits> {
    let default = QueryLimits::default();
    let timeout = positive_seconds(
        "query_timeout_seconds",
        file.query_timeout_seconds,
        default.timeout,
    )?;
    Ok(QueryLimits {
        timeout,
        memory_bytes: at_least_one(
            "max_query_memory_bytes",
            file.max_query_memory_bytes,
            default.memory_bytes,
        )?,
        max_concurrent: at_least_one(
            "max_concurrent_queries",
            file.max_concurrent_queries,
            default.max_concurrent,
        )?,
        max_concurrent_per_org: at_least_one(
            "max_concurrent_queries_per_org",
            file.max_concurrent_queries_per_org,
            default.max_concurrent_per_org,
        )?,
        table_cache_bytes: file.table_cache_bytes.unwrap_or(default.table_cache_bytes),
    })
}

/// Resolved settings: flag, else config file, else default.
#[derive(Debug)]
struct Settings {
    listen: SocketAddr,
    log_format: LogFormat,
    options: ServerOptions,
}

fn settings(args: ServeArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => ConfigFile::default(),
    };
    let query_limits = query_limits(&file)?;
    let cluster = cluster(file.cluster)?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let tls = match (args.certs_dir, file.tls) {
        (Some(dir), _) => TlsFiles::in_dir(&dir),
        (None, Some(t)) => TlsFiles {
            ca: t.ca,
            cert: t.cert,
            key: t.key,
        },
        (None, None) => TlsFiles::in_dir(&data_dir.join("certs")),
    };
    let listen = match args.listen.or(file.listen) {
        Some(addr) => addr,
        None => DEFAULT_LISTEN.parse()?,
    };
    let grace = args
        .shutdown_grace
        .or(file.shutdown_grace_seconds)
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECONDS);
    let drain = file
        .drain_timeout_seconds
        .unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECONDS);
    Ok(Settings {
        listen,
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
        options: ServerOptions {
            tls,
            policies_dir: args
                .policies
                .or(file.policies_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_POLICIES_DIR)),
            data_dir,
            master_key: args.master_key.or(file.master_key),
            limits: Limits {
                max_rows: file.max_upload_rows.unwrap_or(Limits::default().max_rows),
                max_bytes: file.max_upload_bytes.unwrap_or(Limits::default().max_bytes),
                max_rows_per_identifier: at_least_one(
                    "max_rows_per_identifier",
                    file.max_rows_per_identifier,
                    Limits::default().max_rows_per_identifier,
                )?,
                idle_timeout: positive_seconds(
                    "upload_idle_timeout_seconds",
                    file.upload_idle_timeout_seconds,
                    Limits::default().idle_timeout,
                )?,
                max_duration: positive_seconds(
                    "upload_max_seconds",
                    file.upload_max_seconds,
                    Limits::default().max_duration,
                )?,
            },
            query_limits,
            shutdown_grace: seconds("shutdown_grace_seconds", grace)?,
            drain_timeout: seconds("drain_timeout_seconds", drain)?,
            clock: Arc::new(SystemClock),
            policy_poll: seconds(
                "policy_poll_seconds",
                file.policy_poll_seconds.unwrap_or(2.0),
            )?,
            maintenance_interval: seconds(
                "maintenance_interval_seconds",
                file.maintenance_interval_seconds.unwrap_or(60.0),
            )?,
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            deletion: Deletion {
                max_clock_jump: positive_seconds(
                    "max_clock_jump_seconds",
                    file.max_clock_jump_seconds,
                    Deletion::default().max_clock_jump,
                )?,
                grace: match file.deletion_grace_seconds {
                    Some(s) => seconds("deletion_grace_seconds", s)?,
                    None => Deletion::default().grace,
                },
            },
            tls_handshake_timeout: positive_seconds(
                "tls_handshake_timeout_seconds",
                file.tls_handshake_timeout_seconds,
                Duration::from_secs(10),
            )?,
            cluster,
            scrub: Scrub {
                every: positive_seconds(
                    "scrub_interval_seconds",
                    file.scrub_interval_seconds,
                    Scrub::default().every,
                )?,
                bytes_per_second: at_least_one(
                    "scrub_bytes_per_second",
                    file.scrub_bytes_per_second,
                    Scrub::default().bytes_per_second,
                )?,
            },
        },
    })
}

pub(super) fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("CLEANROOM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stop requested"),
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "stop requested"),
    }
}

pub(super) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let settings = settings(args)?;
    init_logging(settings.log_format);
    let rt = super::runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("listening on {}", settings.listen))?;
        crate::server::serve(listener, settings.options, shutdown_signal())
            .await
            .context("the server could not start")
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn deploy(file: &str) -> (PathBuf, String) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    /// The serve command line a deployment file runs, with its config file
    /// read from the repository's `deploy/` instead of `/etc/cleanroom`.
    fn settings_of(argv: Vec<String>) -> Settings {
        let cli = crate::cli::Cli::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{argv:?} is refused: {e}"));
        let crate::cli::Command::Serve(mut args) = cli.command else {
            panic!("{argv:?} does not run the server");
        };
        assert_eq!(
            args.config.as_deref(),
            Some(Path::new("/etc/cleanroom/config.toml"))
        );
        args.config = Some(deploy("deploy/config.toml").0);
        settings(args).unwrap()
    }

    #[test]
    fn the_systemd_unit_runs_flags_the_binary_accepts() {
        let (_, unit) = deploy("deploy/cleanroom.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart line");
        let mut argv: Vec<String> = line.split_whitespace().map(String::from).collect();
        assert_eq!(argv[0], "/usr/local/bin/cleanroom");
        argv[0] = "cleanroom".into();
        let settings = settings_of(argv);
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(
            settings.options.data_dir,
            Path::new("/var/lib/cleanroom"),
            "the unit's StateDirectory"
        );
        assert!(unit.contains("StateDirectory=cleanroom"));
        assert!(unit.contains("ReadWritePaths=/var/lib/cleanroom"));
    }

    #[test]
    fn the_docker_image_runs_flags_the_binary_accepts() {
        let (_, dockerfile) = deploy("Dockerfile");
        let json_args = |key: &str| -> Vec<String> {
            let line = dockerfile
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} line"));
            serde_json::from_str(line.trim()).unwrap()
        };
        let mut argv = vec!["cleanroom".to_string()];
        assert_eq!(json_args("ENTRYPOINT"), ["/usr/local/bin/cleanroom"]);
        argv.extend(json_args("CMD"));
        let settings = settings_of(argv);
        assert_eq!(settings.listen.to_string(), "0.0.0.0:50051");
        assert!(dockerfile.contains("VOLUME [\"/var/lib/cleanroom\"]"));
        assert!(
            dockerfile.contains("\nUSER cleanroom\n"),
            "runs as non-root"
        );
    }

    #[test]
    fn a_broken_cluster_section_names_its_field() {
        let section = |workers: &str| -> anyhow::Result<Option<crate::cluster::ClusterConfig>> {
            let text = format!(
                "[cluster]\nworkers = {workers}\nca = \"ca.pem\"\ncert = \"w.pem\"\nkey = \"w-key.pem\"\n"
            );
            let file: ConfigFile = toml::from_str(&text).unwrap();
            cluster(file.cluster)
        };
        let err = |w: &str| section(w).unwrap_err().to_string();
        assert_eq!(err("[]"), "cluster.workers: must list at least one worker");
        assert_eq!(
            err("[\"https://127.0.0.1:50061\", \"http://127.0.0.1:50062\"]"),
            "cluster.workers[1]: must be https://HOST:PORT"
        );
        assert_eq!(
            err("[\"https://worker1.internal\"]"),
            "cluster.workers[0]: must be https://HOST:PORT"
        );
        let ok = section("[\"https://worker1.internal:50061\"]")
            .unwrap()
            .unwrap();
        assert_eq!(ok.workers.len(), 1);
        assert_eq!(ok.health_interval, Duration::from_secs(2));
        let unknown: Result<ConfigFile, _> = toml::from_str(
            "[cluster]\nworkers = []\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nport = 1\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("port"));
    }
}
