//! The one mapping from the room's errors to gRPC statuses: a code, the
//! error's fixed text, and `google.rpc` details naming the rule.

use tonic::{Code, Status};

use crate::room::RoomError;

impl From<RoomError> for Status {
    fn from(err: RoomError) -> Self {
        let code = match &err {
            RoomError::NoClientCertificate | RoomError::NoOrganisation => Code::Unauthenticated,
            RoomError::AgreementNotFound(_) => Code::NotFound,
            RoomError::InvalidArgument { .. } => Code::InvalidArgument,
            RoomError::PermissionDenied { .. } => Code::PermissionDenied,
            RoomError::NotInForce { .. }
            | RoomError::PolicyChanged(_)
            | RoomError::NoData(_)
            | RoomError::NotBlinded { .. }
            | RoomError::Blinding { .. }
            | RoomError::NeedsUpload(_) => Code::FailedPrecondition,
            RoomError::UploadRejected(r) => match r.kind {
                crate::upload::RejectionKind::Invalid => Code::InvalidArgument,
                crate::upload::RejectionKind::TooLarge => Code::ResourceExhausted,
            },
            RoomError::QueryRefused(v) if v.policy => Code::PermissionDenied,
            RoomError::QueryRefused(_) => Code::InvalidArgument,
            RoomError::BudgetExhausted { .. } | RoomError::LimitExceeded { .. } => {
                Code::ResourceExhausted
            }
            RoomError::Superseded(_) => Code::Aborted,
            RoomError::Stopping => Code::Unavailable,
            RoomError::DatasetDamaged(_) => Code::DataLoss,
            RoomError::Unavailable(detail) => {
                tracing::error!(%detail, "storage refused a write");
                Code::Unavailable
            }
            RoomError::DataLoss(detail) => {
                tracing::error!(%detail, "stored data is damaged");
                Code::DataLoss
            }
            RoomError::Internal(detail) => {
                tracing::warn!(%detail, "internal error");
                Code::Internal
            }
        };
        if !matches!(code, Code::Internal | Code::Unavailable | Code::DataLoss) {
            tracing::info!(code = ?code, reason = %err, "request refused");
        }
        use tonic_types::StatusExt;
        let details = details(&err);
        Status::with_error_details(code, err.to_string(), details)
    }
}

/// Machine-readable details of a refusal.
/// Machine-readable details: a `google.rpc.ErrorInfo` whose reason is
/// the rule and whose metadata names the fields involved, and for a
/// malformed field or a place in the SQL a `google.rpc.BadRequest`
/// field violation. Like the message, they hold names the caller gave
/// or may see, never a data value.
pub(super) fn details(err: &RoomError) -> tonic_types::ErrorDetails {
    let mut metadata = std::collections::HashMap::new();
    let mut put = |key: &str, value: String| {
        metadata.insert(key.to_string(), value);
    };
    let mut violation = None;
    match err {
        RoomError::AgreementNotFound(id)
        | RoomError::NotInForce { id, .. }
        | RoomError::PolicyChanged(id) => put("agreement", id.clone()),
        RoomError::InvalidArgument { field, detail } => {
            put("field", (*field).to_string());
            violation = Some(((*field).to_string(), detail.clone()));
        }
        RoomError::NoData(dataset)
        | RoomError::NeedsUpload(dataset)
        | RoomError::DatasetDamaged(dataset)
        | RoomError::Superseded(dataset) => put("dataset", dataset.clone()),
        RoomError::NotBlinded { dataset, partner } => {
            put("dataset", dataset.clone());
            put("partner", partner.clone());
        }
        RoomError::UploadRejected(r) => {
            if let Some(row) = r.row {
                put("row", row.to_string());
            }
            if let Some(column) = &r.column {
                put("column", column.clone());
                violation = Some((column.clone(), r.detail.clone()));
            }
        }
        RoomError::QueryRefused(v) => {
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
        RoomError::BudgetExhausted {
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
        tonic_types::ErrorDetails::with_error_info(err.rule(), crate::rules::DOMAIN, metadata);
    if let Some((field, description)) = violation {
        details.add_bad_request_violation(field, description);
    }
    details
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_its_code_and_fixed_text() {
        let cases: Vec<(RoomError, Code, &str)> = vec![
            (
                RoomError::NoClientCertificate,
                Code::Unauthenticated,
                "a client certificate is required",
            ),
            (
                RoomError::NoOrganisation,
                Code::Unauthenticated,
                "the client certificate does not name an organisation",
            ),
            (
                RoomError::AgreementNotFound("x".into()),
                Code::NotFound,
                "agreement \"x\" not found",
            ),
            (
                RoomError::invalid("agreement_id", "must not be empty"),
                Code::InvalidArgument,
                "agreement_id: must not be empty",
            ),
            (
                RoomError::PermissionDenied {
                    rule: "party.rights",
                    detail: "acme lacks \"query\"".into(),
                },
                Code::PermissionDenied,
                "rule party.rights: acme lacks \"query\"",
            ),
            (
                RoomError::NotInForce {
                    id: "a".into(),
                    state: "expired",
                },
                Code::FailedPrecondition,
                "agreement \"a\" is expired, not in force",
            ),
            (
                RoomError::BudgetExhausted {
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
                RoomError::BudgetExhausted {
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
                RoomError::LimitExceeded {
                    rule: "query.timeout",
                    detail: "the query ran longer than 1 s (query_timeout_seconds)".into(),
                },
                Code::ResourceExhausted,
                "rule query.timeout: the query ran longer than 1 s (query_timeout_seconds)",
            ),
            (
                RoomError::Internal("disk full at /secret/path".into()),
                Code::Internal,
                "internal error",
            ),
            (
                RoomError::Unavailable("/data/audit.log: no space left".into()),
                Code::Unavailable,
                "the server's storage is full or read-only; nothing was changed, try again later",
            ),
            (
                RoomError::DataLoss("/data/datasets/a/b/3.cds: damaged".into()),
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
}
