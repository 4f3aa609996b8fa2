//! `cleanroom worker`: an execution worker of the distributed engine, in
//! the operator's trust domain. It serves two things on one port, both
//! only to certificates of the worker role (the server and other workers):
//! the engine's own worker service, which runs stages of checked plans,
//! and the placement service, which takes and drops partitions of matched
//! tables. It serves nothing a partner can call, and writes nothing to disk.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use datafusion_distributed::{Worker, WorkerQueryContext};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

use super::{ServerError, TlsFiles, tls};
use crate::cluster::wire::partition_service_server::{PartitionService, PartitionServiceServer};
use crate::cluster::wire::{self, put_partitions_request::Part};
use crate::cluster::{Held, HeldError, WorkerTls};

/// Largest message the placement service takes.
const MAX_MESSAGE: usize = 32 << 20;

/// Everything a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The CA, and this worker's certificate of the worker role and key.
    pub tls: TlsFiles,
    /// Memory the partitions held may take, in all.
    pub max_memory_bytes: u64,
    /// Memory one plan's operators may take (as the server's
    /// `max_query_memory_bytes`).
    pub query_memory_bytes: usize,
    /// Longest a connection may take to finish its TLS handshake.
    pub tls_handshake_timeout: Duration,
}

/// Serves a worker on `listener` until `shutdown` completes.
pub async fn serve_worker(
    listener: TcpListener,
    options: WorkerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let cert = super::read(&options.tls.cert)?;
    if !crate::certs::pem_is_worker(&cert) {
        return Err(ServerError::Tls(format!(
            "{}: not a certificate of the worker role; issue one with `cleanroom certs issue --worker NAME`",
            options.tls.cert.display()
        )));
    }
    let config = tls::worker_config(&options.tls)?;
    let held = Held::new(options.max_memory_bytes);
    let channels = crate::cluster::worker_channels(&WorkerTls {
        ca: options.tls.ca.clone(),
        cert: options.tls.cert.clone(),
        key: options.tls.key.clone(),
    })
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let (for_plans, for_places) = (Arc::clone(&held), Arc::clone(&held));
    let memory = options.query_memory_bytes;
    let worker = Worker::from_session_builder(move |ctx: WorkerQueryContext| {
        let state = crate::cluster::worker_session(
            ctx.builder,
            &ctx.headers,
            &for_plans,
            &channels,
            memory,
        );
        async move { state }
    });
    let addr = listener.local_addr().map_err(|source| ServerError::Io {
        path: "(worker listener)".into(),
        source,
    })?;
    tracing::info!(addr = %addr, instance = held.instance(), "worker serving");
    let traffic = Arc::new(Traffic::default());
    let counting = Arc::clone(&traffic);
    let incoming = tls::accept_from(
        tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(move |c| {
                c.map(|inner| Counted {
                    inner,
                    traffic: Arc::clone(&counting),
                })
            }),
        config,
        options.tls_handshake_timeout,
    );
    Server::builder()
        .add_service(InterceptedService::new(
            worker.into_worker_server(),
            only_workers,
        ))
        .add_service(InterceptedService::new(
            PartitionServiceServer::new(Places {
                held: for_places,
                traffic,
            })
            .max_decoding_message_size(MAX_MESSAGE),
            only_workers,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Refuses any caller whose certificate is not of the worker role: a
/// partner's certificate, though signed by the same CA, gets nothing here.
#[allow(clippy::result_large_err)]
fn only_workers(request: Request<()>) -> Result<Request<()>, Status> {
    let is_worker = request
        .peer_certs()
        .and_then(|c| c.first().map(|c| crate::certs::is_worker(c.as_ref())))
        .unwrap_or(false);
    match is_worker {
        true => Ok(request),
        false => Err(Status::permission_denied(
            "rule worker.role: a worker serves only certificates of the worker role",
        )),
    }
}

/// The placement service over this worker's [`Held`].
#[derive(Debug)]
struct Places {
    held: Arc<Held>,
    traffic: Arc<Traffic>,
}

#[tonic::async_trait]
impl PartitionService for Places {
    async fn put_partitions(
        &self,
        request: Request<Streaming<wire::PutPartitionsRequest>>,
    ) -> Result<Response<wire::PutPartitionsResponse>, Status> {
        let mut stream = request.into_inner();
        let header = match stream.next().await {
            Some(Ok(wire::PutPartitionsRequest {
                part: Some(Part::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "header: the first message must name the placement",
                ));
            }
        };
        if header.placement.is_empty() || header.placement.len() > 64 {
            return Err(Status::invalid_argument(
                "header.placement: must be 1-64 characters",
            ));
        }
        let mut partitions: HashMap<(String, u32), Vec<arrow::record_batch::RecordBatch>> =
            HashMap::new();
        let mut bytes = 0u64;
        while let Some(message) = stream.next().await {
            let part = match message?.part {
                Some(Part::Partition(p)) => p,
                _ => {
                    return Err(Status::invalid_argument(
                        "partition: every message after the header carries one",
                    ));
                }
            };
            bytes += part.ipc.len() as u64;
            let batches = crate::cluster::read_ipc(&part.ipc)
                .map_err(|_| Status::invalid_argument("partition.ipc: not an Arrow IPC stream"))?;
            partitions
                .entry((part.dataset, part.index))
                .or_default()
                .extend(batches);
        }
        match self
            .held
            .put(&header.placement, &header.agreement, partitions, bytes)
        {
            Ok((rows, bytes)) => Ok(Response::new(wire::PutPartitionsResponse { rows, bytes })),
            Err(e @ HeldError::Full { .. }) => Err(Status::resource_exhausted(e.to_string())),
            Err(e @ HeldError::Exists(_)) => Err(Status::already_exists(e.to_string())),
        }
    }

    async fn forget_placement(
        &self,
        request: Request<wire::ForgetPlacementRequest>,
    ) -> Result<Response<wire::ForgetPlacementResponse>, Status> {
        let partitions = self.held.forget(&request.into_inner().placement);
        Ok(Response::new(wire::ForgetPlacementResponse { partitions }))
    }

    async fn describe_worker(
        &self,
        _request: Request<wire::DescribeWorkerRequest>,
    ) -> Result<Response<wire::DescribeWorkerResponse>, Status> {
        let (placements, bytes) = self.held.describe();
        Ok(Response::new(wire::DescribeWorkerResponse {
            instance: self.held.instance().to_string(),
            placements: placements
                .into_iter()
                .map(|p| wire::HeldPlacement {
                    placement: p.placement,
                    agreement: p.agreement,
                    partitions: p.partitions,
                    rows: p.rows,
                })
                .collect(),
            bytes,
            partitions_read: self.held.reads(),
            bytes_received: self
                .traffic
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes_sent: self.traffic.sent.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }
}

/// The address a worker listens on by default.
pub const DEFAULT_WORKER_LISTEN: &str = "127.0.0.1:50061";

/// A worker's address as the server's config names it.
pub fn worker_url(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// Bytes a worker received and sent on its port, TLS included: what the
/// network carries.
#[derive(Debug, Default)]
struct Traffic {
    received: std::sync::atomic::AtomicU64,
    sent: std::sync::atomic::AtomicU64,
}

/// A connection that counts its bytes into [`Traffic`].
#[derive(Debug)]
struct Counted {
    inner: tokio::net::TcpStream,
    traffic: Arc<Traffic>,
}

impl tls::Peer for Counted {
    fn peer(&self) -> std::io::Result<SocketAddr> {
        self.inner.peer_addr()
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.traffic
            .received
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        poll
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.traffic
                .sent
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
