//! Connections to workers under mutual TLS: the server's and every
//! worker's client side, presenting a certificate of the worker role.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::common::DataFusionError;
use datafusion_distributed::grpc::{BoxCloneSyncChannel, create_worker_client};
use datafusion_distributed::{ChannelResolver, WorkerChannel};
use parking_lot::Mutex;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use url::Url;

use super::ClusterError;

/// Longest wait for a worker to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A certificate of the worker role and the CA that signed every worker's.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl WorkerTls {
    /// `ca.pem`, `worker-NAME.pem` and `worker-NAME-key.pem` in `dir`, as
    /// `cleanroom certs issue --worker NAME` writes them.
    pub fn in_dir(dir: &std::path::Path, name: &str) -> Self {
        let files = crate::certs::worker_files(dir, name);
        WorkerTls {
            ca: dir.join(crate::certs::CA_CERT),
            cert: files.cert,
            key: files.key,
        }
    }

    fn client_config(&self) -> Result<ClientTlsConfig, ClusterError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| ClusterError::Tls(format!("{}: {e}", p.display())))
        };
        let cert = read(&self.cert)?;
        if !crate::certs::pem_is_worker(&cert) {
            return Err(ClusterError::Tls(format!(
                "{}: not a certificate of the worker role; issue one with `cleanroom certs issue --worker NAME`",
                self.cert.display()
            )));
        }
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(cert, read(&self.key)?)))
    }
}

/// Channels to workers by address, made once and reused.
#[derive(Clone)]
pub struct Channels {
    tls: ClientTlsConfig,
    open: Arc<Mutex<HashMap<Url, Channel>>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("open", &self.open.lock().len())
            .finish()
    }
}

impl Channels {
    pub fn new(tls: &WorkerTls) -> Result<Self, ClusterError> {
        Ok(Channels {
            tls: tls.client_config()?,
            open: Arc::default(),
        })
    }

    /// The channel to `url`; connects on first use.
    pub fn channel(&self, url: &Url) -> Result<Channel, ClusterError> {
        if let Some(c) = self.open.lock().get(url) {
            return Ok(c.clone());
        }
        let channel = Endpoint::from_shared(url.to_string())
            .map_err(|_| ClusterError::Address(url.to_string()))?
            .tls_config(self.tls.clone())
            .map_err(|e| ClusterError::Tls(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        self.open.lock().insert(url.clone(), channel.clone());
        Ok(channel)
    }

    /// Forgets the channel to `url`, so that the next use reconnects.
    pub(crate) fn reset(&self, url: &Url) {
        self.open.lock().remove(url);
    }
}

#[async_trait::async_trait]
impl ChannelResolver for Channels {
    async fn get_worker_client_for_url(
        &self,
        url: &Url,
    ) -> Result<Box<dyn WorkerChannel>, DataFusionError> {
        let channel = self
            .channel(url)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(create_worker_client(BoxCloneSyncChannel::new(channel)))
    }
}
