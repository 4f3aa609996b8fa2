//! TLS for the server's port: the handshake is ours (rustls, ring), so
//! that a failed one is logged for the operator (peer address and reason,
//! at info, at most a few a minute) instead of vanishing, and a stalled
//! one ends at its deadline. Accepted sessions go on to tonic with their
//! peer certificates, as `auth` reads them.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures::Stream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tonic::transport::server::TcpIncoming;

use super::{ServerError, TlsFiles};

/// Handshake failures logged one by one in a minute; the rest are counted
/// and reported in one line when the next minute starts.
const LOGGED_PER_MINUTE: u32 = 20;

/// The server's TLS settings: its certificate, client certificates
/// requested and verified against the CA when presented (a session without
/// one gets through TLS, so that health checks work and other calls are
/// refused with a clear UNAUTHENTICATED status), HTTP/2 only.
pub(super) fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    config(files, true)
}

/// A worker's TLS settings: as the server's, but a session without a
/// client certificate signed by the CA is refused in the handshake.
pub(super) fn worker_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    config(files, false)
}

fn config(
    files: &TlsFiles,
    without_client_certificate: bool,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    for path in [&files.ca, &files.cert, &files.key] {
        if !path.exists() {
            return Err(ServerError::Tls(format!(
                "{} does not exist; create development certificates with `cleanroom certs init --dir {}`, or point --certs-dir or the config file's [tls] at yours",
                path.display(),
                path.parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
    }
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, ServerError> {
        let pem = super::read(path)?;
        let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|_| ServerError::Tls(format!("{}: not a PEM certificate", path.display())))?;
        match certs.is_empty() {
            true => Err(ServerError::Tls(format!(
                "{}: holds no certificate",
                path.display()
            ))),
            false => Ok(certs),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&files.ca)? {
        roots
            .add(ca)
            .map_err(|e| ServerError::Tls(format!("{}: {e}", files.ca.display())))?;
    }
    let chain = certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&super::read(&files.key)?)
        .map_err(|_| ServerError::Tls(format!("{}: not a PEM private key", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
    if without_client_certificate {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| ServerError::Tls(format!("{}: {e}", files.ca.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Counts failed handshakes and decides which to log.
#[derive(Debug)]
struct FailureLog {
    /// Start of the current minute, failures logged in it, failures not.
    window: Mutex<(Instant, u32, u64)>,
}

impl FailureLog {
    fn new() -> Self {
        FailureLog {
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    fn failed(&self, peer: SocketAddr, reason: &str) {
        let mut w = self.window.lock();
        if w.0.elapsed() >= Duration::from_secs(60) {
            if w.2 > 0 {
                tracing::info!(
                    not_logged = w.2,
                    "more TLS handshakes failed in the last minute than are logged one by one"
                );
            }
            *w = (Instant::now(), 0, 0);
        }
        if w.1 < LOGGED_PER_MINUTE {
            w.1 += 1;
            tracing::info!(peer = %peer, reason, "TLS handshake failed");
        } else {
            w.2 += 1;
        }
    }
}

/// Why a handshake failed, in the operator's words.
fn reason(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    use rustls::CertificateError as E;
    let date = |t: &rustls::pki_types::UnixTime| {
        time::OffsetDateTime::from_unix_timestamp(t.as_secs() as i64)
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| "an unreadable date".into())
    };
    match inner {
        Some(rustls::Error::InvalidCertificate(E::ExpiredContext { not_after, .. })) => format!(
            "the client's certificate expired on {} (Expired)",
            date(not_after)
        ),
        Some(rustls::Error::InvalidCertificate(E::NotValidYetContext { not_before, .. })) => {
            format!(
                "the client's certificate is not valid until {} (NotValidYet)",
                date(not_before)
            )
        }
        Some(rustls::Error::InvalidCertificate(E::UnknownIssuer)) => {
            "the client's certificate is not from this server's CA (UnknownIssuer)".into()
        }
        Some(rustls::Error::InvalidCertificate(c)) => {
            format!("the client's certificate was refused: {c:?}")
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            format!(
                "the client ended the handshake ({alert:?}); it may not trust this server's certificate"
            )
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// The sessions whose handshakes succeed on `incoming`, each within
/// `timeout`; the rest are logged and closed. Ends when the server stops
/// taking sessions.
pub(super) fn accept(
    incoming: TcpIncoming,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    accept_from(incoming, config, timeout)
}

/// A connection whose peer address is known, for the failure log.
pub(super) trait Peer {
    fn peer(&self) -> std::io::Result<SocketAddr>;
}

impl Peer for TcpStream {
    fn peer(&self) -> std::io::Result<SocketAddr> {
        self.peer_addr()
    }
}

/// As [`accept`], over connections of any kind.
pub(super) fn accept_from<S>(
    incoming: impl Stream<Item = Result<S, std::io::Error>> + Send + 'static,
    config: Arc<rustls::ServerConfig>,
    timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<S>, std::io::Error>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Peer + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let log = Arc::new(FailureLog::new());
    tokio::spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let stream = tokio::select! {
                next = incoming.next() => next,
                () = tx.closed() => None,
            };
            let stream = match stream {
                Some(Ok(s)) => s,
                // A connection that failed before it was accepted.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "accepting a connection failed");
                    continue;
                }
                None => break,
            };
            let (acceptor, tx, log) = (acceptor.clone(), tx.clone(), Arc::clone(&log));
            tokio::spawn(async move {
                let peer = stream
                    .peer()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(session)) => {
                        let _ = tx.send(Ok(session)).await;
                    }
                    Ok(Err(e)) => log.failed(peer, &reason(&e)),
                    Err(_) => log.failed(
                        peer,
                        &format!(
                            "no handshake within {} s (tls_handshake_timeout_seconds)",
                            timeout.as_secs_f64()
                        ),
                    ),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
