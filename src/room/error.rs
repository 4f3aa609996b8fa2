//! What can go wrong in a use case of the room, as the caller may learn
//! it. The transport maps each kind to its own status (`server/status.rs`).
//!
//! Messages are fixed texts that name the rule or field; they never carry a
//! data value, a fingerprint, a secret or a library's own message. Details
//! of our own faults stay in the server log.

/// What went wrong in a call, as the caller may learn it.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
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
    /// INVALID_ARGUMENT: a request field is malformed; its rule is
    /// `request.<field>`.
    #[error("{field}: {detail}")]
    InvalidArgument { field: &'static str, detail: String },
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

impl RoomError {
    /// A malformed `field`: refused by rule `request.<field>`.
    pub fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        RoomError::InvalidArgument {
            field,
            detail: detail.into(),
        }
    }

    /// The rule this refusal names, as the audit log, the metrics and the
    /// caller's error details carry it: one of [`crate::rules::RULES`].
    pub fn rule(&self) -> &'static str {
        match self {
            RoomError::NoClientCertificate | RoomError::NoOrganisation => "auth.certificate",
            RoomError::AgreementNotFound(_) => "agreement.party",
            RoomError::InvalidArgument { field, .. } => request_rule(field),
            RoomError::PermissionDenied { rule, .. } => rule,
            RoomError::NotInForce { .. } => "agreement.dates",
            RoomError::PolicyChanged(_) => "policy.hash",
            RoomError::NoData(_) => "dataset.uploaded",
            RoomError::NotBlinded { .. } => "dataset.blinding",
            RoomError::Blinding { rule, .. } => rule,
            RoomError::UploadRejected(r) => r.rule,
            RoomError::QueryRefused(v) => v.rule,
            RoomError::BudgetExhausted { .. } => "privacy.budget",
            RoomError::LimitExceeded { rule, .. } => rule,
            RoomError::Superseded(_) => "dataset.changed",
            RoomError::NeedsUpload(_) => "dataset.reupload",
            RoomError::DatasetDamaged(_) => "dataset.damaged",
            RoomError::Unavailable(_) => "storage.unavailable",
            RoomError::Stopping => "server.stopping",
            RoomError::DataLoss(_) => "storage.damaged",
            RoomError::Internal(_) => "internal",
        }
    }
}

/// The rule `request.<field>` as the table of rules names it; every field a
/// request can get wrong has its row there (a test of `rules` checks it).
fn request_rule(field: &str) -> &'static str {
    crate::rules::RULES
        .iter()
        .map(|r| r.name)
        .find(|name| name.strip_prefix("request.") == Some(field))
        .unwrap_or("request")
}

impl From<crate::audit::AuditError> for RoomError {
    fn from(e: crate::audit::AuditError) -> Self {
        match e.is_unavailable() {
            true => RoomError::Unavailable(e.to_string()),
            false => RoomError::Internal(e.to_string()),
        }
    }
}

impl From<crate::storage::StorageError> for RoomError {
    fn from(e: crate::storage::StorageError) -> Self {
        if let crate::storage::StorageError::Superseded { dataset } = e {
            RoomError::Superseded(dataset)
        } else if let crate::storage::StorageError::VersionDamaged { dataset, .. } = e {
            RoomError::DatasetDamaged(dataset)
        } else if e.is_unavailable() {
            RoomError::Unavailable(e.to_string())
        } else if e.is_damage() {
            RoomError::DataLoss(e.to_string())
        } else {
            RoomError::Internal(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_read_only_store_is_unavailable_and_damage_is_data_loss() {
        use crate::storage::StorageError;
        let io = |kind| StorageError::Io {
            path: "/data/x".into(),
            source: std::io::Error::from(kind),
        };
        let full = RoomError::from(io(std::io::ErrorKind::StorageFull));
        assert!(matches!(full, RoomError::Unavailable(_)));
        let ro = RoomError::from(io(std::io::ErrorKind::ReadOnlyFilesystem));
        assert!(matches!(ro, RoomError::Unavailable(_)));
        let db = RoomError::from(StorageError::Db(
            "I/O error: No space left on device (os error 28)".into(),
        ));
        assert!(matches!(db, RoomError::Unavailable(_)));
        let damaged = RoomError::from(StorageError::Damaged {
            path: "/data/x".into(),
        });
        assert!(matches!(damaged, RoomError::DataLoss(_)));
        let denied = RoomError::from(io(std::io::ErrorKind::PermissionDenied));
        assert!(matches!(denied, RoomError::Internal(_)));
    }
}
