//! The contract's enums and instants in the product's own words, for
//! people reading a command's output, and back from the words the domain
//! stores (the audit log keeps its actions as text).

use super::*;

/// An instant in Unix seconds, as the contract carries time.
pub fn timestamp(unix: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: unix,
        nanos: 0,
    }
}

/// An instant as RFC 3339 (`2026-12-01T00:00:00Z`); `absent` when there is
/// none.
pub fn when(t: Option<&prost_types::Timestamp>, absent: &str) -> String {
    let Some(t) = t else {
        return absent.to_string();
    };
    time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.seconds.to_string())
}

impl AgreementState {
    pub fn word(self) -> &'static str {
        match self {
            AgreementState::Unspecified => "unknown",
            AgreementState::Pending => "pending",
            AgreementState::Active => "active",
            AgreementState::Expired => "expired",
            AgreementState::Suspended => "suspended",
        }
    }
}

impl Right {
    pub fn word(self) -> &'static str {
        match self {
            Right::Unspecified => "unknown",
            Right::Upload => "upload",
            Right::Query => "query",
            Right::ReceiveResults => "receive_results",
            Right::SeeOverlap => "see_overlap",
            Right::Admin => "admin",
        }
    }
}

/// Rights as a message carries them, in words: `upload, query`.
pub fn rights(rights: &[i32]) -> String {
    rights
        .iter()
        .map(|r| Right::try_from(*r).unwrap_or(Right::Unspecified).word())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An agreement's state as a message carries it, in words.
pub fn state(state: i32) -> &'static str {
    AgreementState::try_from(state)
        .unwrap_or(AgreementState::Unspecified)
        .word()
}

/// A dataset's state as people read it.
pub fn dataset_state(d: &DatasetVersion) -> String {
    match DatasetState::try_from(d.state) {
        Ok(DatasetState::Waiting) => format!(
            "uploaded, waiting for {}'s blinding (they run `cleanroom match`)",
            d.waiting_for
        ),
        Ok(DatasetState::Damaged) => "damaged on the server: upload it again".into(),
        Ok(DatasetState::NeedsUpload) => "made under identity settings the policy no longer has (salt, normalisation or column types changed): upload it again".into(),
        _ => "matched".into(),
    }
}

impl AuditAction {
    const WORDS: [(AuditAction, &'static str); 9] = [
        (AuditAction::Upload, "upload"),
        (AuditAction::Erase, "erase"),
        (AuditAction::Blinding, "blinding"),
        (AuditAction::Overlap, "overlap"),
        (AuditAction::Query, "query"),
        (AuditAction::PolicyReload, "policy_reload"),
        (AuditAction::Retention, "retention"),
        (AuditAction::Scrub, "scrub"),
        (AuditAction::Recover, "recover"),
    ];

    pub fn word(self) -> &'static str {
        Self::WORDS
            .iter()
            .find(|(a, _)| *a == self)
            .map_or("unknown", |(_, w)| w)
    }

    /// The action an audit entry names; unspecified for a word the contract
    /// does not know.
    pub fn of(word: &str) -> Self {
        Self::WORDS
            .iter()
            .find(|(_, w)| *w == word)
            .map_or(AuditAction::Unspecified, |(a, _)| *a)
    }
}

impl AuditDecision {
    pub fn word(self) -> &'static str {
        match self {
            AuditDecision::Unspecified => "unknown",
            AuditDecision::Accepted => "accepted",
            AuditDecision::Rejected => "rejected",
            AuditDecision::Interrupted => "interrupted",
        }
    }

    pub fn of(word: &str) -> Self {
        match word {
            "accepted" => AuditDecision::Accepted,
            "rejected" => AuditDecision::Rejected,
            "interrupted" => AuditDecision::Interrupted,
            _ => AuditDecision::Unspecified,
        }
    }
}

impl IdentityProfile {
    pub fn word(self) -> &'static str {
        match self {
            IdentityProfile::Unspecified => "unknown",
            IdentityProfile::Email => "email",
            IdentityProfile::Phone => "phone",
            IdentityProfile::Text => "text",
        }
    }
}

impl IdentityStandard {
    pub fn word(self) -> &'static str {
        match self {
            IdentityStandard::Unspecified => "unknown",
            IdentityStandard::Cleanroom => "cleanroom",
            IdentityStandard::Google => "google",
            IdentityStandard::Meta => "meta",
            IdentityStandard::Uid2 => "uid2",
        }
    }
}

impl Aggregate {
    pub fn word(self) -> &'static str {
        match self {
            Aggregate::Unspecified => "unknown",
            Aggregate::Count => "count",
            Aggregate::CountDistinct => "count_distinct",
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
        }
    }
}

impl QueryMode {
    pub fn word(self) -> &'static str {
        match self {
            QueryMode::Unspecified => "unknown",
            QueryMode::Any => "any",
            QueryMode::Templates => "templates",
        }
    }
}

impl ParamType {
    pub fn word(self) -> &'static str {
        match self {
            ParamType::Unspecified => "unknown",
            ParamType::Value => "value",
            ParamType::Values => "values",
            ParamType::Integer => "integer",
            ParamType::Date => "date",
        }
    }
}

impl BudgetRefresh {
    pub fn word(self) -> &'static str {
        match self {
            BudgetRefresh::Unspecified => "unknown",
            BudgetRefresh::Never => "none",
            BudgetRefresh::Monthly => "monthly",
        }
    }
}

impl NoiseMechanism {
    pub fn word(self) -> &'static str {
        match self {
            NoiseMechanism::Unspecified => "unknown",
            NoiseMechanism::DiscreteLaplace => crate::privacy::mechanism::MECHANISM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_the_audit_log_records_has_its_value() {
        // The actions the room and the command line write, from the source:
        // a new one without a value would reach parties as "unspecified".
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut words = std::collections::BTreeSet::new();
        let mut stack = vec![src];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (at, _) in text.match_indices("action: \"") {
                        let rest = &text[at + 9..];
                        words.insert(rest.split('"').next().unwrap().to_string());
                    }
                }
            }
        }
        assert!(words.len() >= 9, "{words:?}");
        for word in &words {
            let action = AuditAction::of(word);
            assert_ne!(action, AuditAction::Unspecified, "{word}");
            assert_eq!(action.word(), word);
        }
        assert_eq!(AuditAction::of("made up"), AuditAction::Unspecified);
    }

    #[test]
    fn decisions_and_instants_read_back() {
        for d in ["accepted", "rejected", "interrupted"] {
            assert_eq!(AuditDecision::of(d).word(), d);
        }
        assert_eq!(
            when(Some(&timestamp(1_796_083_200)), "never"),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(when(None, "never"), "never");
    }
}
