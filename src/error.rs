//! Errors at the gRPC boundary and the status each becomes.
//!
//! Messages are fixed texts that name the rule or field; they never carry a
//! data value, a fingerprint, a secret or a library's own message. Details
//! of our own faults stay in the server log.

use tonic::{Code, Status};

/// What went wrong in a call, as the caller may learn it.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// UNAUTHENTICATED: the TLS session carries no client certificate.
    #[error("a client certificate is required")]
    NoClientCertificate,
    /// UNAUTHENTICATED: the certificate's subject names no valid organisation.
    #[error("the client certificate does not name an organisation")]
    NoOrganisation,
    /// NOT_FOUND: the agreement does not exist or the caller is not a party.
    /// The two are indistinguishable on purpose.
    #[error("agreement {0:?} not found")]
    AgreementNotFound(String),
    /// INVALID_ARGUMENT: a request field is malformed.
    #[error("{field}: {rule}")]
    InvalidArgument { field: &'static str, rule: String },
    /// PERMISSION_DENIED: the policy forbids this; `rule` names the rule.
    #[error("rule {rule}: {detail}")]
    PermissionDenied { rule: &'static str, detail: String },
    /// FAILED_PRECONDITION: the agreement is not in force (pending or expired).
    #[error("agreement {id:?} is {state}, not in force")]
    NotInForce { id: String, state: &'static str },
    /// FAILED_PRECONDITION: a dataset the request needs has no upload yet.
    #[error("dataset {0:?} has no upload yet")]
    NoData(String),
    /// FAILED_PRECONDITION: under matching = "ecdh", the partner has not yet
    /// blinded the dataset's current version.
    #[error(
        "rule dataset.blinding: dataset {dataset:?} waits for {partner}'s blinding of its points ({partner} runs `cleanroom match`)"
    )]
    NotBlinded { dataset: String, partner: String },
    /// FAILED_PRECONDITION: a blinding step cannot go on as asked; `rule`
    /// names why.
    #[error("rule {rule}: {detail}")]
    Blinding { rule: &'static str, detail: String },
    /// FAILED_PRECONDITION: the client prepared data under another policy version.
    #[error(
        "rule policy.hash: the policy of agreement {0:?} changed since your client read it; fetch it again"
    )]
    PolicyChanged(String),
    /// INVALID_ARGUMENT or RESOURCE_EXHAUSTED (by kind): an upload broke a rule.
    #[error("upload refused, nothing stored: {0}")]
    UploadRejected(crate::upload::Rejection),
    /// PERMISSION_DENIED (policy) or INVALID_ARGUMENT (malformed SQL): a
    /// query refused by its rule.
    #[error("{0}")]
    QueryRefused(crate::query::Violation),
    /// RESOURCE_EXHAUSTED: the caller's privacy budget does not cover the query.
    #[error(
        "rule privacy.budget: agreement {agreement:?}: this query needs {measure} {needed} but {remaining} of {total} remains in window {window}; the budget refreshes {next_refresh}"
    )]
    BudgetExhausted {
        agreement: String,
        /// "epsilon" or "delta": the total that does not cover the query.
        measure: &'static str,
        needed: f64,
        remaining: f64,
        total: f64,
        window: String,
        /// "at 2026-12-01T00:00:00Z", or "never".
        next_refresh: String,
    },
    /// RESOURCE_EXHAUSTED: a limit of the server's (time, memory, queries
    /// at once); `rule` names it.
    #[error("rule {rule}: {detail}")]
    LimitExceeded { rule: &'static str, detail: String },
    /// UNAVAILABLE: the server passed its drain deadline while this call
    /// ran.
    #[error("the server is stopping; nothing was stored, send it again")]
    Stopping,
    /// UNAVAILABLE: the server's storage could not take a write (full or
    /// read-only). Nothing was changed; the detail, with the path, is
    /// logged for the operator.
    #[error("the server's storage is full or read-only; nothing was changed, try again later")]
    Unavailable(String),
    /// DATA_LOSS: stored data did not read back as written. The detail is
    /// logged for the operator.
    #[error("stored data needed for this request is damaged; the operator has been told")]
    DataLoss(String),
    /// FAILED_PRECONDITION: the dataset's current version was made under
    /// identity settings the policy no longer has.
    #[error(
        "rule dataset.reupload: dataset {0:?} was made under identity settings the policy no longer has (its salt, an identity kind's normalisation, the matching mode or a column's type changed); its owner uploads it again before it is matched, queried or erased from"
    )]
    NeedsUpload(String),
    /// DATA_LOSS: the dataset's current version is damaged on the server.
    #[error(
        "rule dataset.damaged: dataset {0:?} is damaged on the server; its owner uploads it again (the operator has the details)"
    )]
    DatasetDamaged(String),
    /// ABORTED: the dataset changed while this upload or erasure ran; it
    /// stored nothing and may be sent again.
    #[error(
        "rule dataset.changed: dataset {0:?} changed while this request ran (another upload or erasure committed first); nothing was stored, send it again"
    )]
    Superseded(String),
    /// INTERNAL: our own fault; the detail is logged, never returned.
    #[error("internal error")]
    Internal(String),
}

impl ServiceError {
    /// The rule an audit entry records for this refusal.
    pub fn rule(&self) -> String {
        match self {
            ServiceError::NoClientCertificate | ServiceError::NoOrganisation => {
                "auth.certificate".into()
            }
            ServiceError::AgreementNotFound(_) => "agreement.party".into(),
            ServiceError::InvalidArgument { field, .. } => format!("request.{field}"),
            ServiceError::PermissionDenied { rule, .. } => (*rule).into(),
            ServiceError::NotInForce { .. } => "agreement.dates".into(),
            ServiceError::PolicyChanged(_) => "policy.hash".into(),
            ServiceError::NoData(_) => "dataset.uploaded".into(),
            ServiceError::NotBlinded { .. } => "dataset.blinding".into(),
            ServiceError::Blinding { rule, .. } => (*rule).into(),
            ServiceError::UploadRejected(r) => r.rule.into(),
            ServiceError::QueryRefused(v) => v.rule.into(),
            ServiceError::BudgetExhausted { .. } => "privacy.budget".into(),
            ServiceError::LimitExceeded { rule, .. } => (*rule).into(),
            ServiceError::Superseded(_) => "dataset.changed".into(),
            ServiceError::NeedsUpload(_) => "dataset.reupload".into(),
            ServiceError::DatasetDamaged(_) => "dataset.damaged".into(),
            ServiceError::Unavailable(_) => "storage.unavailable".into(),
            ServiceError::Stopping => "server.stopping".into(),
            ServiceError::DataLoss(_) => "storage.damaged".into(),
            ServiceError::Internal(_) => "internal".into(),
        }
    }
}

impl From<crate::audit::AuditError> for ServiceError {
    fn from(e: crate::audit::AuditError) -> Self {
        match e.is_unavailable() {
            true => ServiceError::Unavailable(e.to_string()),
            false => ServiceError::Internal(e.to_string()),
        }
    }
}

impl From<crate::storage::StorageError> for ServiceError {
    fn from(e: crate::storage::StorageError) -> Self {
        if let crate::storage::StorageError::Superseded { dataset } = e {
            ServiceError::Superseded(dataset)
        } else if let crate::storage::StorageError::VersionDamaged { dataset, .. } = e {
            ServiceError::DatasetDamaged(dataset)
        } else if e.is_unavailable() {
            ServiceError::Unavailable(e.to_string())
        } else if e.is_damage() {
            ServiceError::DataLoss(e.to_string())
        } else {
            ServiceError::Internal(e.to_string())
        }
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        let code = match &err {
            ServiceError::NoClientCertificate | ServiceError::NoOrganisation => {
                Code::Unauthenticated
            }
            ServiceError::AgreementNotFound(_) => Code::NotFound,
            ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
            ServiceError::PermissionDenied { .. } => Code::PermissionDenied,
            ServiceError::NotInForce { .. }
            | ServiceError::PolicyChanged(_)
            | ServiceError::NoData(_)
            | ServiceError::NotBlinded { .. }
            | ServiceError::Blinding { .. }
            | ServiceError::NeedsUpload(_) => Code::FailedPrecondition,
            ServiceError::UploadRejected(r) => match r.kind {
                crate::upload::RejectionKind::Invalid => Code::InvalidArgument,
                crate::upload::RejectionKind::TooLarge => Code::ResourceExhausted,
            },
            ServiceError::QueryRefused(v) if v.policy => Code::PermissionDenied,
            ServiceError::QueryRefused(_) => Code::InvalidArgument,
            ServiceError::BudgetExhausted { .. } | ServiceError::LimitExceeded { .. } => {
                Code::ResourceExhausted
            }
            ServiceError::Superseded(_) => Code::Aborted,
            ServiceError::Stopping => Code::Unavailable,
            ServiceError::DatasetDamaged(_) => Code::DataLoss,
            ServiceError::Unavailable(detail) => {
                tracing::error!(%detail, "storage refused a write");
                Code::Unavailable
            }
            ServiceError::DataLoss(detail) => {
                tracing::error!(%detail, "stored data is damaged");
                Code::DataLoss
            }
            ServiceError::Internal(detail) => {
                tracing::warn!(%detail, "internal error");
                Code::Internal
            }
        };
        if !matches!(code, Code::Internal | Code::Unavailable | Code::DataLoss) {
            tracing::info!(code = ?code, reason = %err, "request refused");
        }
        use tonic_types::StatusExt;
        let details = err.details();
        Status::with_error_details(code, err.to_string(), details)
    }
}

impl ServiceError {
    /// Machine-readable details: a `google.rpc.ErrorInfo` whose reason is
    /// the rule and whose metadata names the fields involved, and for a
    /// malformed field or a place in the SQL a `google.rpc.BadRequest`
    /// field violation. Like the message, they hold names the caller gave
    /// or may see, never a data value.
    pub fn details(&self) -> tonic_types::ErrorDetails {
        let mut metadata = std::collections::HashMap::new();
        let mut put = |key: &str, value: String| {
            metadata.insert(key.to_string(), value);
        };
        let mut violation = None;
        match self {
            ServiceError::AgreementNotFound(id)
            | ServiceError::NotInForce { id, .. }
            | ServiceError::PolicyChanged(id) => put("agreement", id.clone()),
            ServiceError::InvalidArgument { field, rule } => {
                put("field", (*field).to_string());
                violation = Some(((*field).to_string(), rule.clone()));
            }
            ServiceError::NoData(dataset)
            | ServiceError::NeedsUpload(dataset)
            | ServiceError::DatasetDamaged(dataset)
            | ServiceError::Superseded(dataset) => put("dataset", dataset.clone()),
            ServiceError::NotBlinded { dataset, partner } => {
                put("dataset", dataset.clone());
                put("partner", partner.clone());
            }
            ServiceError::UploadRejected(r) => {
                if let Some(row) = r.row {
                    put("row", row.to_string());
                }
                if let Some(column) = &r.column {
                    put("column", column.clone());
                    violation = Some((column.clone(), r.detail.clone()));
                }
            }
            ServiceError::QueryRefused(v) => {
                if let Some(name) = &v.name {
                    put("name", name.clone());
                }
                if let Some(suggestion) = &v.suggestion {
                    put("suggestion", suggestion.clone());
                }
                if let Some(at) = v.at {
                    put("line", at.line.to_string());
                    put("column", at.column.to_string());
                    violation = Some(("sql".to_string(), format!("{at}: {}", v.detail)));
                }
            }
            ServiceError::BudgetExhausted {
                agreement,
                measure,
                needed,
                remaining,
                total,
                window,
                next_refresh,
            } => {
                put("agreement", agreement.clone());
                put("measure", (*measure).to_string());
                put("needed", needed.to_string());
                put("remaining", remaining.to_string());
                put("total", total.to_string());
                put("window", window.clone());
                put("next_refresh", next_refresh.clone());
            }
            _ => {}
        }
        let mut details =
            tonic_types::ErrorDetails::with_error_info(self.rule(), crate::rules::DOMAIN, metadata);
        if let Some((field, description)) = violation {
            details.add_bad_request_violation(field, description);
        }
        details
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_code_and_fixed_text() {
        let cases: Vec<(ServiceError, Code, &str)> = vec![
            (
                ServiceError::NoClientCertificate,
                Code::Unauthenticated,
                "a client certificate is required",
            ),
            (
                ServiceError::NoOrganisation,
                Code::Unauthenticated,
                "the client certificate does not name an organisation",
            ),
            (
                ServiceError::AgreementNotFound("x".into()),
                Code::NotFound,
                "agreement \"x\" not found",
            ),
            (
                ServiceError::InvalidArgument {
                    field: "agreement_id",
                    rule: "must not be empty".into(),
                },
                Code::InvalidArgument,
                "agreement_id: must not be empty",
            ),
            (
                ServiceError::PermissionDenied {
                    rule: "party.rights",
                    detail: "acme lacks \"query\"".into(),
                },
                Code::PermissionDenied,
                "rule party.rights: acme lacks \"query\"",
            ),
            (
                ServiceError::NotInForce {
                    id: "a".into(),
                    state: "expired",
                },
                Code::FailedPrecondition,
                "agreement \"a\" is expired, not in force",
            ),
            (
                ServiceError::BudgetExhausted {
                    agreement: "a".into(),
                    measure: "epsilon",
                    needed: 1.0,
                    remaining: 0.5,
                    total: 10.0,
                    window: "2026-11".into(),
                    next_refresh: "at 2026-12-01T00:00:00Z".into(),
                },
                Code::ResourceExhausted,
                "rule privacy.budget: agreement \"a\": this query needs epsilon 1 but 0.5 of 10 remains in window 2026-11; the budget refreshes at 2026-12-01T00:00:00Z",
            ),
            (
                ServiceError::BudgetExhausted {
                    agreement: "a".into(),
                    measure: "delta",
                    needed: 1e-7,
                    remaining: 0.0,
                    total: 1e-5,
                    window: "all".into(),
                    next_refresh: "never".into(),
                },
                Code::ResourceExhausted,
                "rule privacy.budget: agreement \"a\": this query needs delta 0.0000001 but 0 of 0.00001 remains in window all; the budget refreshes never",
            ),
            (
                ServiceError::LimitExceeded {
                    rule: "query.timeout",
                    detail: "the query ran longer than 1 s (query_timeout_seconds)".into(),
                },
                Code::ResourceExhausted,
                "rule query.timeout: the query ran longer than 1 s (query_timeout_seconds)",
            ),
            (
                ServiceError::Internal("disk full at /secret/path".into()),
                Code::Internal,
                "internal error",
            ),
            (
                ServiceError::Unavailable("/data/audit.log: no space left".into()),
                Code::Unavailable,
                "the server's storage is full or read-only; nothing was changed, try again later",
            ),
            (
                ServiceError::DataLoss("/data/datasets/a/b/3.cds: damaged".into()),
                Code::DataLoss,
                "stored data needed for this request is damaged; the operator has been told",
            ),
        ];
        for (err, code, text) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn a_full_or_read_only_store_is_unavailable_and_damage_is_data_loss() {
        use crate::storage::StorageError;
        let io = |kind| StorageError::Io {
            path: "/data/x".into(),
            source: std::io::Error::from(kind),
        };
        let full = ServiceError::from(io(std::io::ErrorKind::StorageFull));
        assert!(matches!(full, ServiceError::Unavailable(_)));
        let ro = ServiceError::from(io(std::io::ErrorKind::ReadOnlyFilesystem));
        assert!(matches!(ro, ServiceError::Unavailable(_)));
        let db = ServiceError::from(StorageError::Db(
            "I/O error: No space left on device (os error 28)".into(),
        ));
        assert!(matches!(db, ServiceError::Unavailable(_)));
        let damaged = ServiceError::from(StorageError::Damaged {
            path: "/data/x".into(),
        });
        assert!(matches!(damaged, ServiceError::DataLoss(_)));
        let denied = ServiceError::from(io(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(denied, ServiceError::Internal(_)));
    }
}
