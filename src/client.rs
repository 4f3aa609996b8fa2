//! A Rust client for a Cleanroom server over mutual TLS.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cleanroom::client::ClientError> {
//! use cleanroom::client::{Client, ClientConfig};
//! let config = ClientConfig::new("https://127.0.0.1:50051", "certs/ca.pem")
//!     .with_identity("certs/acme.pem", "certs/acme-key.pem");
//! let mut client = Client::connect(&config).await?;
//! println!("I am {}", client.who_am_i().await?.organisation);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::proto;
use crate::proto::agreements_service_client::AgreementsServiceClient;
use crate::proto::audit_service_client::AuditServiceClient;
use crate::proto::datasets_service_client::DatasetsServiceClient;
use crate::proto::governance_service_client::GovernanceServiceClient;
use crate::proto::matching_service_client::MatchingServiceClient;
use crate::proto::queries_service_client::QueriesServiceClient;

/// Where the server is and which certificates to use.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://host:port`; a bare `host:port` is read as https.
    pub server: String,
    /// CA certificate that signed the server's certificate.
    pub ca: PathBuf,
    /// Client certificate and key naming the caller's organisation.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, ca: impl Into<PathBuf>) -> Self {
        ClientConfig {
            server: server.into(),
            ca: ca.into(),
            identity: None,
        }
    }

    pub fn with_identity(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }
}

/// Why a call could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("server address {0:?} is not a valid https URL")]
    BadServer(String),
    #[error("cannot connect to {server}: {detail}")]
    Connect { server: String, detail: String },
    /// The caller's own certificate would be refused: expired, not yet
    /// valid, or not from the CA the server trusts.
    #[error("{0}")]
    Certificate(String),
    /// The server's refusal. Not a `source`: its text is the message
    /// shown, once, without tonic's own rendering of the status.
    #[error("{}: {}", crate::proto::code_name(.0.code()), .0.message())]
    Status(tonic::Status),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status(status)
    }
}

impl ClientError {
    /// The gRPC status code, if the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }

    /// The server's status, if it answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// Checks the caller's certificate as the server will, before connecting:
/// within its dates and issued by the CA in `ca_pem` (the one the server's
/// certificate is checked against, and that signs client certificates).
/// Says what to do when it would be refused.
fn check_own_certificate(
    cert_pem: &[u8],
    cert_path: &Path,
    ca_pem: &[u8],
    ca_path: &Path,
) -> Result<(), ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .ok()
        .filter(|c: &Vec<_>| !c.is_empty())
        .ok_or_else(|| {
            ClientError::Certificate(format!("{}: not a PEM certificate", cert_path.display()))
        })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem).flatten() {
        let _ = roots.add(ca);
    }
    if roots.is_empty() {
        // The TLS layer reports an unusable CA file itself.
        return Ok(());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider).build()
    else {
        return Ok(());
    };
    let org = crate::certs::organisation_of(chain[0].as_ref()).unwrap_or_else(|| "NAME".into());
    let reissue = format!("ask the operator for a new one (`cleanroom certs issue --org {org}`)");
    let dates = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .ok()
        .map(|(_, c)| {
            let day = |t: x509_parser::time::ASN1Time| {
                t.to_datetime()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| "an unreadable date".into())
            };
            (day(c.validity().not_before), day(c.validity().not_after))
        });
    let (from, until) = dates.unwrap_or_else(|| ("?".into(), "?".into()));
    use rustls::CertificateError as E;
    match verifier.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(E::Expired | E::ExpiredContext { .. })) => {
            Err(ClientError::Certificate(format!(
                "your certificate {} expired on {until}; {reissue}",
                cert_path.display()
            )))
        }
        Err(rustls::Error::InvalidCertificate(E::NotValidYet | E::NotValidYetContext { .. })) => {
            Err(ClientError::Certificate(format!(
                "your certificate {} is not valid until {from}; check this machine's clock, or {reissue}",
                cert_path.display()
            )))
        }
        Err(rustls::Error::InvalidCertificate(
            E::UnknownIssuer | E::BadSignature | E::UnhandledCriticalExtension,
        )) => Err(ClientError::Certificate(format!(
            "your certificate {} was not issued by the CA in {}, so the server will refuse it; {reissue} from this server's CA, or point --ca at the CA that issued yours",
            cert_path.display(),
            ca_path.display()
        ))),
        Err(e) => Err(ClientError::Certificate(format!(
            "your certificate {} will be refused: {e}; {reissue}",
            cert_path.display()
        ))),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// An open connection to a server.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects and completes the TLS handshake.
    pub async fn connect(config: &ClientConfig) -> Result<Self, ClientError> {
        let url = if config.server.contains("://") {
            config.server.clone()
        } else {
            format!("https://{}", config.server)
        };
        if !url.starts_with("https://") {
            return Err(ClientError::BadServer(config.server.clone()));
        }
        let ca = read(&config.ca)?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
        if let Some((cert, key)) = &config.identity {
            let pem = read(cert)?;
            check_own_certificate(&pem, cert, &ca, &config.ca)?;
            tls = tls.identity(Identity::from_pem(pem, read(key)?));
        }
        let connect_err = |e: tonic::transport::Error| ClientError::Connect {
            server: config.server.clone(),
            detail: error_chain(&e),
        };
        let channel = Channel::from_shared(url)
            .map_err(|_| ClientError::BadServer(config.server.clone()))?
            .tls_config(tls)
            .map_err(connect_err)?
            .connect()
            .await
            .map_err(connect_err)?;
        Ok(Client { channel })
    }

    /// The underlying channel, for the generated clients of other services.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    fn agreements(&self) -> AgreementsServiceClient<Channel> {
        AgreementsServiceClient::new(self.channel.clone())
    }

    pub async fn who_am_i(&mut self) -> Result<proto::WhoAmIResponse, ClientError> {
        Ok(self
            .agreements()
            .who_am_i(proto::WhoAmIRequest {})
            .await?
            .into_inner())
    }

    pub async fn list_agreements(&mut self) -> Result<Vec<proto::AgreementSummary>, ClientError> {
        Ok(self
            .agreements()
            .list_agreements(proto::ListAgreementsRequest {})
            .await?
            .into_inner()
            .agreements)
    }

    pub async fn get_agreement(&mut self, id: &str) -> Result<proto::Agreement, ClientError> {
        self.agreements()
            .get_agreement(proto::GetAgreementRequest {
                agreement_id: id.to_string(),
            })
            .await?
            .into_inner()
            .agreement
            .ok_or_else(|| ClientError::Status(tonic::Status::internal("server sent no agreement")))
    }
}

impl Client {
    /// The caller's own datasets in an agreement, with their current versions.
    pub async fn list_datasets(
        &mut self,
        agreement_id: &str,
    ) -> Result<Vec<proto::DatasetVersion>, ClientError> {
        Ok(DatasetsServiceClient::new(self.channel.clone())
            .list_datasets(proto::ListDatasetsRequest {
                agreement_id: agreement_id.to_string(),
            })
            .await?
            .into_inner()
            .datasets)
    }
}

impl Client {
    /// Every audit entry of an agreement, following the pages.
    pub async fn audit_entries(
        &mut self,
        agreement_id: &str,
    ) -> Result<Vec<proto::AuditEntry>, ClientError> {
        let mut entries = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self.audit_page(agreement_id, 0, &page_token).await?;
            entries.extend(page.entries);
            if page.next_page_token.is_empty() {
                return Ok(entries);
            }
            page_token = page.next_page_token;
        }
    }

    /// One page of an agreement's audit entries.
    pub async fn audit_page(
        &mut self,
        agreement_id: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<proto::ListAuditEntriesResponse, ClientError> {
        Ok(AuditServiceClient::new(self.channel.clone())
            .list_audit_entries(proto::ListAuditEntriesRequest {
                agreement_id: agreement_id.to_string(),
                page_size,
                page_token: page_token.to_string(),
            })
            .await?
            .into_inner())
    }
}

impl Client {
    /// How many people two datasets of an agreement share (suppressed under
    /// the minimum group size; noised under differential privacy, at the
    /// agreement's largest per-query epsilon). `datasets` may be empty for
    /// a two-dataset agreement.
    pub async fn overlap(
        &mut self,
        agreement_id: &str,
        datasets: &[String],
    ) -> Result<proto::OverlapResponse, ClientError> {
        self.overlap_with_epsilon(agreement_id, datasets, None)
            .await
    }

    /// As [`Client::overlap`], spending `epsilon` of the privacy budget.
    pub async fn overlap_with_epsilon(
        &mut self,
        agreement_id: &str,
        datasets: &[String],
        epsilon: Option<f64>,
    ) -> Result<proto::OverlapResponse, ClientError> {
        Ok(MatchingServiceClient::new(self.channel.clone())
            .overlap(proto::OverlapRequest {
                agreement_id: agreement_id.to_string(),
                datasets: datasets.to_vec(),
                epsilon,
            })
            .await?
            .into_inner())
    }
}

/// A governed query's answer.
#[derive(Debug, Clone)]
pub struct QueryAnswer {
    pub header: proto::QueryHeader,
    pub schema: arrow::datatypes::SchemaRef,
    pub batches: Vec<arrow::record_batch::RecordBatch>,
    pub summary: proto::QuerySummary,
}

impl Client {
    /// Runs governed aggregate SQL under an agreement (under differential
    /// privacy, at the agreement's largest per-query epsilon).
    pub async fn query(
        &mut self,
        agreement_id: &str,
        sql: &str,
    ) -> Result<QueryAnswer, ClientError> {
        self.query_with_epsilon(agreement_id, sql, None).await
    }

    /// As [`Client::query`], spending `epsilon` of the privacy budget.
    pub async fn query_with_epsilon(
        &mut self,
        agreement_id: &str,
        sql: &str,
        epsilon: Option<f64>,
    ) -> Result<QueryAnswer, ClientError> {
        self.send_query(proto::QueryRequest {
            agreement_id: agreement_id.to_string(),
            sql: sql.to_string(),
            epsilon,
            ..Default::default()
        })
        .await
    }

    /// Runs one of the agreement's approved templates with `params`
    /// (name to value, as text), spending `epsilon` under privacy.
    pub async fn run_template(
        &mut self,
        agreement_id: &str,
        template: &str,
        params: &std::collections::BTreeMap<String, String>,
        epsilon: Option<f64>,
    ) -> Result<QueryAnswer, ClientError> {
        self.send_query(proto::QueryRequest {
            agreement_id: agreement_id.to_string(),
            template: template.to_string(),
            params: params.clone().into_iter().collect(),
            epsilon,
            ..Default::default()
        })
        .await
    }

    async fn send_query(
        &mut self,
        request: proto::QueryRequest,
    ) -> Result<QueryAnswer, ClientError> {
        use proto::query_response::Part;
        let mut stream = QueriesServiceClient::new(self.channel.clone())
            .query(request)
            .await?
            .into_inner();
        let (mut header, mut summary, mut batches) = (None, None, Vec::new());
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(Part::Header(h)) => header = Some(h),
                Some(Part::Batch(ipc)) => {
                    batches.extend(crate::upload::decode_batches(&ipc).map_err(|_| {
                        tonic::Status::data_loss("the server sent a malformed batch")
                    })?)
                }
                Some(Part::Summary(s)) => summary = Some(s),
                None => {}
            }
        }
        let (Some(header), Some(summary), Some(first)) = (header, summary, batches.first()) else {
            return Err(tonic::Status::data_loss("the answer ended early").into());
        };
        Ok(QueryAnswer {
            header,
            schema: first.schema(),
            batches,
            summary,
        })
    }
}

impl Client {
    /// What the service holds of the caller's data in an agreement and who
    /// used the agreement.
    pub async fn access_report(
        &mut self,
        agreement_id: &str,
    ) -> Result<proto::AccessReportResponse, ClientError> {
        Ok(GovernanceServiceClient::new(self.channel.clone())
            .access_report(proto::AccessReportRequest {
                agreement_id: agreement_id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// The agreements the caller administers.
    pub async fn admin_status(&mut self) -> Result<proto::AdminStatusResponse, ClientError> {
        Ok(GovernanceServiceClient::new(self.channel.clone())
            .admin_status(proto::AdminStatusRequest {})
            .await?
            .into_inner())
    }

    /// The caller's privacy budget in an agreement.
    pub async fn budget(
        &mut self,
        agreement_id: &str,
    ) -> Result<proto::BudgetResponse, ClientError> {
        Ok(QueriesServiceClient::new(self.channel.clone())
            .budget(proto::BudgetRequest {
                agreement_id: agreement_id.to_string(),
            })
            .await?
            .into_inner())
    }
}

/// An error and its causes on one line, for connection failures whose
/// useful part (a certificate problem, a refused port) is deep in the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
