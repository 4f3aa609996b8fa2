//! Past one machine: the private stage of a governed query on workers of
//! an existing distributed engine (datafusion-distributed), the release on
//! the server (`docs/distributed.md`).
//!
//! - **Placement.** An agreement's query tables are cut into person
//!   partitions (`person % partitions`, two per worker) and streamed to the
//!   live workers, worker `i` holding partitions `p % workers == i`, in
//!   memory only. A placement is named by a fresh random id and made once
//!   per version of the tables and set of workers; it is dropped from the
//!   workers whenever the server's table cache lets the tables go (an
//!   erasure, a new version, a retention run, a reload, the memory budget).
//! - **Queries.** The coordinating session plans the checked plan once on
//!   the server; the engine cuts it into stages, and stages that scan placed
//!   tables run on the workers holding them ([`scan`]). The partial
//!   aggregates come back to the server, which applies the minimum group
//!   size, bounding, noise, charging and audit exactly as on one machine.
//! - **Failures.** A stage the placement cannot serve, a worker that dies
//!   mid-query, a placement that failed: the stage runs again on the server
//!   over the same tables (never a partial answer), and a dead worker is
//!   dropped by the health check, so the next placement leaves it out.

mod channels;
mod scan;
mod store;
pub mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::UInt32Array;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion_distributed::{DistributedExt, SessionStateBuilderExt, WorkerResolver};
use parking_lot::RwLock;
use url::Url;

pub use channels::Channels;
pub use channels::WorkerTls;
use scan::{LocalTable, Placed, PlacedScanCodec, PlacedTable};
pub use store::{Held, HeldError, HeldPlacement};

use crate::query::{PERSON_COLUMN, TableData};
use wire::partition_service_client::PartitionServiceClient;

/// Why the workers could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("worker TLS: {0}")]
    Tls(String),
    #[error("worker address {0:?} is not an https:// URL")]
    Address(String),
    #[error("{0} worker(s) live: the engine keeps a plan on the server unless at least two are")]
    TooFewWorkers(usize),
    #[error("placing tables on {worker}: {detail}")]
    Place { worker: String, detail: String },
    #[error("encoding a partition: {0}")]
    Encode(String),
}

/// The workers the server may use.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `https://HOST:PORT` of every worker.
    pub workers: Vec<Url>,
    /// The certificate the server presents to them.
    pub tls: WorkerTls,
    /// How often each worker's health is checked.
    pub health_interval: Duration,
}

/// Largest partition message sent to a worker, in bytes of Arrow IPC.
const MESSAGE_BYTES: usize = 8 << 20;

/// Engine partitions each worker holds of a placed table.
const PARTITIONS_PER_WORKER: u32 = 2;

/// The workers that answered their last health check, in a fixed order.
#[derive(Debug, Clone, Default)]
struct Live(Arc<RwLock<Vec<(Url, String)>>>);

impl Live {
    fn urls(&self) -> Vec<Url> {
        self.0.read().iter().map(|(u, _)| u.clone()).collect()
    }

    fn instances(&self) -> Vec<(Url, String)> {
        self.0.read().clone()
    }
}

impl WorkerResolver for Live {
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        Ok(self.urls())
    }
}

/// One agreement's tables as placed.
#[derive(Debug)]
struct Current {
    key: String,
    workers: Vec<(Url, String)>,
    placement: Arc<Placement>,
}

/// The server's view of its workers: who is live, what is placed where.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    channels: Channels,
    live: Live,
    current: tokio::sync::Mutex<HashMap<String, Current>>,
    /// Agreements (and the tables' key) whose placement is to be dropped.
    forgotten: parking_lot::Mutex<Vec<(String, Option<String>)>>,
    placed_bytes: AtomicU64,
}

/// Figures of what the cluster did, for metrics and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterFigures {
    pub live_workers: usize,
    /// Arrow IPC bytes sent to workers by placements.
    pub placed_bytes: u64,
}

impl Cluster {
    /// Reads the certificate and starts checking the workers' health
    /// (within the current tokio runtime). The first check runs before this
    /// returns, so a started cluster knows who is live.
    pub async fn start(config: ClusterConfig) -> Result<Arc<Self>, ClusterError> {
        let channels = Channels::new(&config.tls)?;
        let cluster = Arc::new(Cluster {
            config,
            channels,
            live: Live::default(),
            current: tokio::sync::Mutex::new(HashMap::new()),
            forgotten: parking_lot::Mutex::new(Vec::new()),
            placed_bytes: AtomicU64::new(0),
        });
        cluster.check_health().await;
        let weak = Arc::downgrade(&cluster);
        let every = cluster.config.health_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(c) => c.check_health().await,
                    None => return,
                }
            }
        });
        Ok(cluster)
    }

    /// Asks every configured worker who it is; those that answer in time
    /// are live.
    pub async fn check_health(&self) {
        let asks = self.config.workers.iter().map(|url| async move {
            let answer = async {
                let mut client = PartitionServiceClient::new(self.channels.channel(url).ok()?);
                let reply = client
                    .describe_worker(wire::DescribeWorkerRequest {})
                    .await
                    .ok()?;
                Some(reply.into_inner().instance)
            };
            match tokio::time::timeout(Duration::from_secs(2), answer).await {
                Ok(Some(instance)) => Some((url.clone(), instance)),
                _ => {
                    self.channels.reset(url);
                    None
                }
            }
        });
        let live: Vec<(Url, String)> = futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let before = self.live.urls();
        if before != live.iter().map(|(u, _)| u.clone()).collect::<Vec<_>>() {
            tracing::info!(
                live = live.len(),
                configured = self.config.workers.len(),
                "live workers changed"
            );
        }
        *self.live.0.write() = live;
    }

    /// What the cluster did so far.
    pub fn figures(&self) -> ClusterFigures {
        ClusterFigures {
            live_workers: self.live.urls().len(),
            placed_bytes: self.placed_bytes.load(Ordering::Relaxed),
        }
    }

    /// The agreement's tables placed on the live workers: the placement in
    /// use if the tables (`key`) and the workers are the same, else a new
    /// one, the old one dropped.
    pub async fn place(
        &self,
        agreement: &str,
        key: &[String],
        tables: &[TableData],
    ) -> Result<Arc<Placement>, ClusterError> {
        let key = blake3::hash(key.join("\n").as_bytes()).to_hex().to_string();
        let mut current = self.current.lock().await;
        self.sweep(&mut current).await;
        let workers = self.live.instances();
        // With one task per stage the engine runs the stage here: placing
        // the tables on a single worker would only cost a transfer.
        if workers.len() < 2 {
            return Err(ClusterError::TooFewWorkers(workers.len()));
        }
        if let Some(c) = current.get(agreement)
            && c.key == key
            && c.workers == workers
        {
            return Ok(Arc::clone(&c.placement));
        }
        if let Some(old) = current.remove(agreement) {
            self.forget_placement(&old).await;
        }
        let placement = self.new_placement(agreement, tables, &workers).await?;
        current.insert(
            agreement.to_string(),
            Current {
                key,
                workers,
                placement: Arc::clone(&placement),
            },
        );
        Ok(placement)
    }

    /// Drops the agreement's placement from the workers if it was made of
    /// the tables `key` (of any tables, when `key` is `None`). Returns at
    /// once; the workers are told in the background, after any placement
    /// under way.
    pub fn forget(self: &Arc<Self>, agreement: &str, key: Option<&[String]>) {
        let key = key.map(|k| blake3::hash(k.join("\n").as_bytes()).to_hex().to_string());
        self.forgotten.lock().push((agreement.to_string(), key));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let this = Arc::clone(self);
            runtime.spawn(async move {
                let mut current = this.current.lock().await;
                this.sweep(&mut current).await;
            });
        }
    }

    /// Drops the placements asked to be forgotten.
    async fn sweep(&self, current: &mut HashMap<String, Current>) {
        let asked = std::mem::take(&mut *self.forgotten.lock());
        for (agreement, key) in asked {
            let matches = current
                .get(&agreement)
                .is_some_and(|c| key.as_ref().is_none_or(|k| *k == c.key));
            if matches && let Some(old) = current.remove(&agreement) {
                self.forget_placement(&old).await;
            }
        }
    }

    async fn forget_placement(&self, c: &Current) {
        let workers: Vec<Url> = c.workers.iter().map(|(u, _)| u.clone()).collect();
        self.send_forget(&c.placement.id, &workers).await;
    }

    async fn send_forget(&self, placement: &str, workers: &[Url]) {
        for url in workers {
            let Ok(channel) = self.channels.channel(url) else {
                continue;
            };
            let mut client = PartitionServiceClient::new(channel);
            let ask = client.forget_placement(wire::ForgetPlacementRequest {
                placement: placement.to_string(),
            });
            // A worker that does not answer is not live; when it is back it
            // is a new process holding nothing.
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), ask).await,
                Ok(Ok(_))
            ) {
                tracing::warn!(worker = %url, "a worker did not confirm dropping a placement");
            }
        }
    }

    async fn new_placement(
        &self,
        agreement: &str,
        tables: &[TableData],
        workers: &[(Url, String)],
    ) -> Result<Arc<Placement>, ClusterError> {
        let started = std::time::Instant::now();
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| ClusterError::Encode("the system random source failed".into()))?;
        let id = hex::encode(id);
        let urls: Vec<Url> = workers.iter().map(|(u, _)| u.clone()).collect();
        let w = urls.len() as u32;
        let partitions = PARTITIONS_PER_WORKER * w;
        let mut placed_tables = HashMap::new();
        // Per worker: the messages to send it.
        let mut messages: Vec<Vec<wire::PutPartitionsRequest>> = vec![Vec::new(); urls.len()];
        for m in &mut messages {
            m.push(header(&id, agreement));
        }
        for t in tables {
            let local = Arc::new(local_table(t, partitions).map_err(encode_error)?);
            let placed = Placed {
                placement: id.clone(),
                dataset: t.dataset.name().to_string(),
                workers: urls.clone(),
                partitions,
            };
            for p in 0..partitions {
                let batches = local.partition(p as usize).map_err(encode_error)?;
                for ipc in ipc_messages(&batches, &local.schema)? {
                    messages[(p % w) as usize].push(wire::PutPartitionsRequest {
                        part: Some(wire::put_partitions_request::Part::Partition(
                            wire::Partition {
                                dataset: placed.dataset.clone(),
                                index: p,
                                ipc,
                            },
                        )),
                    });
                }
            }
            placed_tables.insert(
                placed.dataset.clone(),
                Arc::new(PlacedTable { placed, local }),
            );
        }
        let sends = urls.iter().zip(messages).map(|(url, msgs)| async move {
            let bytes: u64 = msgs.iter().map(message_bytes).sum();
            let channel = self.channels.channel(url)?;
            let mut client = PartitionServiceClient::new(channel)
                .max_encoding_message_size(2 * MESSAGE_BYTES + (1 << 20));
            client
                .put_partitions(futures::stream::iter(msgs))
                .await
                .map_err(|s| ClusterError::Place {
                    worker: url.to_string(),
                    detail: s.message().to_string(),
                })?;
            Ok::<u64, ClusterError>(bytes)
        });
        let results = futures::future::join_all(sends).await;
        let mut sent = 0;
        let mut failed = None;
        for r in results {
            match r {
                Ok(b) => sent += b,
                Err(e) => failed = Some(e),
            }
        }
        self.placed_bytes.fetch_add(sent, Ordering::Relaxed);
        if let Some(e) = failed {
            // Whatever was kept is of no use.
            self.send_forget(&id, &urls).await;
            return Err(e);
        }
        tracing::info!(
            agreement,
            workers = urls.len(),
            partitions,
            bytes = sent,
            place_ms = started.elapsed().as_millis() as u64,
            "tables placed on workers"
        );
        Ok(Arc::new(Placement {
            id,
            tables: placed_tables,
            live: self.live.clone(),
            channels: self.channels.clone(),
        }))
    }
}

fn header(id: &str, agreement: &str) -> wire::PutPartitionsRequest {
    wire::PutPartitionsRequest {
        part: Some(wire::put_partitions_request::Part::Header(
            wire::PlacementHeader {
                placement: id.to_string(),
                agreement: agreement.to_string(),
            },
        )),
    }
}

fn message_bytes(m: &wire::PutPartitionsRequest) -> u64 {
    match &m.part {
        Some(wire::put_partitions_request::Part::Partition(p)) => p.ipc.len() as u64,
        _ => 0,
    }
}

fn encode_error(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Encode(e.to_string())
}

/// A query table with the rows of each person partition.
fn local_table(t: &TableData, partitions: u32) -> Result<LocalTable, DataFusionError> {
    let (schema, batches) = crate::query::table_batches(t)?;
    let person = schema.index_of(PERSON_COLUMN)?;
    let mut rows: Vec<Vec<UInt32Array>> =
        vec![Vec::with_capacity(batches.len()); partitions as usize];
    for b in &batches {
        let people = b
            .column(person)
            .as_any()
            .downcast_ref::<UInt32Array>()
            .ok_or_else(|| DataFusionError::Internal("person numbers of another type".into()))?;
        let mut of_part: Vec<Vec<u32>> = vec![Vec::new(); partitions as usize];
        for (i, p) in people.values().iter().enumerate() {
            of_part[(p % partitions) as usize].push(i as u32);
        }
        for (p, r) in of_part.into_iter().enumerate() {
            rows[p].push(UInt32Array::from(r));
        }
    }
    Ok(LocalTable {
        schema,
        batches,
        rows,
    })
}

/// Batches as Arrow IPC streams of at most about [`MESSAGE_BYTES`] each
/// (one at least, so an empty partition is placed too).
fn ipc_messages(
    batches: &[RecordBatch],
    schema: &arrow::datatypes::SchemaRef,
) -> Result<Vec<Vec<u8>>, ClusterError> {
    let mut out = Vec::new();
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema).map_err(encode_error)?;
    let mut empty = true;
    for b in batches {
        // Large batches in slices, so that no message is far over the size.
        let per_row = (b.get_array_memory_size() / b.num_rows().max(1)).max(1);
        let step = (MESSAGE_BYTES / per_row).max(1);
        let mut at = 0;
        while at < b.num_rows() {
            let n = step.min(b.num_rows() - at);
            writer.write(&b.slice(at, n)).map_err(encode_error)?;
            empty = false;
            at += n;
            if writer.get_ref().len() >= MESSAGE_BYTES {
                writer.finish().map_err(encode_error)?;
                out.push(writer.into_inner().map_err(encode_error)?);
                writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), schema)
                    .map_err(encode_error)?;
                empty = true;
            }
        }
    }
    if !empty || out.is_empty() {
        writer.finish().map_err(encode_error)?;
        out.push(writer.into_inner().map_err(encode_error)?);
    }
    Ok(out)
}

/// Batches back from one partition message.
pub fn read_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?.collect()
}

/// An agreement's tables as placed on workers: the tables of the
/// coordinating session, and the engine's hooks to reach them.
#[derive(Debug)]
pub struct Placement {
    id: String,
    tables: HashMap<String, Arc<PlacedTable>>,
    live: Live,
    channels: Channels,
}

datafusion::common::extensions_options! {
    /// What the server passes on to the workers with every plan: the
    /// memory one query's operators may hold (`max_query_memory_bytes`).
    pub struct QueryBudget {
        pub memory_bytes: usize, default = crate::query::QueryLimits::default().memory_bytes
    }
}

impl datafusion::config::ConfigExtension for QueryBudget {
    const PREFIX: &'static str = "cleanroom";
}

impl crate::query::Placement for Placement {
    fn session(&self, builder: SessionStateBuilder, memory_bytes: usize) -> SessionStateBuilder {
        builder
            .with_distributed_option_extension(QueryBudget { memory_bytes })
            .with_distributed_worker_resolver(self.live.clone())
            .with_distributed_channel_resolver(self.channels.clone())
            .with_distributed_planner()
            .with_distributed_user_codec(PlacedScanCodec)
            .with_distributed_desired_task_count_handler(scan::desired_tasks)
            .with_distributed_scale_up_leaf_node_handler(scan::scale_up)
            .with_distributed_route_tasks_handler(scan::route)
    }

    fn table(&self, dataset: &str) -> Option<Arc<dyn TableProvider>> {
        self.tables
            .get(dataset)
            .map(|t| Arc::clone(t) as Arc<dyn TableProvider>)
    }
}

/// A worker's session for each plan it runs: the engine's functions, the
/// placed scan's codec reading `held`, connections to other workers, and
/// the server's per-query memory limit (`QueryBudget`, from the call's
/// headers), within `memory_bytes`, the worker's own.
pub fn worker_session(
    builder: SessionStateBuilder,
    headers: &http::HeaderMap,
    held: &Arc<Held>,
    channels: &Channels,
    memory_bytes: usize,
) -> Result<datafusion::execution::SessionState, DataFusionError> {
    // Every function the engine has: a worker runs plans the server
    // checked and planned, whose rewrites may use functions analysts may
    // not (NULLIF, say); what analysts may use is the server's checker's
    // decision, not the worker's.
    let mut builder = builder
        .with_scalar_functions(datafusion::functions::all_default_functions())
        .with_aggregate_functions(
            datafusion::functions_aggregate::all_default_aggregate_functions(),
        )
        .with_distributed_channel_resolver(channels.clone())
        .with_distributed_user_codec(PlacedScanCodec)
        .with_distributed_option_extension_from_headers::<QueryBudget>(headers)?;
    let config = builder.config().get_or_insert_default();
    config.set_extension(Arc::clone(held));
    let asked = config
        .options()
        .extensions
        .get::<QueryBudget>()
        .map_or(memory_bytes, |b| b.memory_bytes);
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(asked.min(memory_bytes), 1.0)
        .build_arc()?;
    Ok(builder.with_runtime_env(runtime).build())
}

/// Channels for a worker's own calls to other workers.
pub fn worker_channels(tls: &WorkerTls) -> Result<Channels, ClusterError> {
    Channels::new(tls)
}
