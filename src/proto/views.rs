//! The wire form of the room's answers and of an agreement as a party may
//! see it: one conversion per message, used by the server to answer and by
//! the command line to print a view it built locally.

use super::timestamp;
use super::*;
use crate::audit::Entry;
use crate::policy::{
    AgreementState as State, Column as PolicyColumn, ColumnRole as Role, Dataset as PolicyDataset,
    Domain, Policy, Profile, Right as PolicyRight, ValueType as Type,
};
use crate::room::governance as views;
use crate::room::{Blinded, Erased, Held, HeldState, Overlap, Spent, Uploaded, Work};

fn right(r: PolicyRight) -> i32 {
    let r = match r {
        PolicyRight::Upload => Right::Upload,
        PolicyRight::Query => Right::Query,
        PolicyRight::ReceiveResults => Right::ReceiveResults,
        PolicyRight::SeeOverlap => Right::SeeOverlap,
        PolicyRight::Admin => Right::Admin,
    };
    r as i32
}

fn state(s: State) -> i32 {
    let s = match s {
        State::Pending => AgreementState::Pending,
        State::Active => AgreementState::Active,
        State::Expired => AgreementState::Expired,
        State::Suspended => AgreementState::Suspended,
    };
    s as i32
}

pub fn summary(policy: &Policy, org: &str, now: State) -> AgreementSummary {
    let my_rights = policy
        .party(org)
        .map(|p| p.rights().iter().copied().map(right).collect())
        .unwrap_or_default();
    AgreementSummary {
        id: policy.id().to_string(),
        purpose: policy.purpose().to_string(),
        state: state(now),
        starts_on: policy
            .starts_on()
            .map(|d| d.to_string())
            .unwrap_or_default(),
        expires_on: policy.expires_on().to_string(),
        my_rights,
        policy_hash: policy.hash().to_hex(),
    }
}

fn value_type(t: Type) -> i32 {
    let t = match t {
        Type::String => ValueType::String,
        Type::Integer => ValueType::Integer,
        Type::Float => ValueType::Float,
        Type::Date => ValueType::Date,
        Type::Timestamp => ValueType::Timestamp,
    };
    t as i32
}

fn column(c: &PolicyColumn) -> Column {
    let mut out = Column {
        name: c.name().to_string(),
        ..Default::default()
    };
    match c.role() {
        Role::Identifier { kind } => {
            out.role = ColumnRole::Identifier as i32;
            out.identity_kind = kind.clone();
        }
        Role::Dimension {
            value_type: t,
            domain,
        } => {
            out.role = ColumnRole::Dimension as i32;
            out.value_type = value_type(*t);
            match domain {
                Domain::Values(values) => out.allowed_values = values.clone(),
                Domain::MaxCardinality(n) => out.max_cardinality = Some(*n),
            }
        }
        Role::Metric {
            value_type: t,
            min,
            max,
            compare,
        } => {
            out.role = ColumnRole::Metric as i32;
            out.value_type = value_type(*t);
            out.min = Some(*min);
            out.max = Some(*max);
            out.compare = *compare;
        }
        Role::Sensitive => out.role = ColumnRole::Sensitive as i32,
    }
    out
}

fn dataset(d: &PolicyDataset, own: bool) -> Dataset {
    Dataset {
        name: d.name().to_string(),
        owner: d.owner().to_string(),
        columns: d
            .columns()
            .iter()
            .filter(|c| own || !matches!(c.role(), Role::Sensitive))
            .map(column)
            .collect(),
    }
}

fn profile(p: &Profile) -> IdentityProfile {
    match p {
        Profile::Email { .. } => IdentityProfile::Email,
        Profile::Phone { .. } => IdentityProfile::Phone,
        Profile::Text => IdentityProfile::Text,
    }
}

fn standard(s: crate::identity::Standard) -> IdentityStandard {
    use crate::identity::Standard as S;
    match s {
        S::Cleanroom => IdentityStandard::Cleanroom,
        S::Google => IdentityStandard::Google,
        S::Meta => IdentityStandard::Meta,
        S::Uid2 => IdentityStandard::Uid2,
    }
}

fn aggregate(a: crate::policy::Aggregate) -> Aggregate {
    use crate::policy::Aggregate as A;
    match a {
        A::Count => Aggregate::Count,
        A::CountDistinct => Aggregate::CountDistinct,
        A::Sum => Aggregate::Sum,
        A::Avg => Aggregate::Avg,
    }
}

/// The agreement as `org` may see it: its own datasets in full; other
/// parties' datasets only if it may query them, and never their sensitive
/// columns.
pub fn agreement_view(policy: &Policy, org: &str, now: State) -> Agreement {
    let may_query = policy.allows(org, PolicyRight::Query);
    Agreement {
        summary: Some(summary(policy, org, now)),
        retention_days: policy.retention_days(),
        salt: policy.salt().to_hex(),
        matching: match policy.matching() {
            crate::policy::Matching::Keyed => MatchingMode::Keyed,
            crate::policy::Matching::Ecdh => MatchingMode::Ecdh,
        } as i32,
        parties: policy
            .parties()
            .iter()
            .map(|p| Party {
                organisation: p.org().to_string(),
                rights: p.rights().iter().copied().map(right).collect(),
            })
            .collect(),
        identity_kinds: policy
            .identities()
            .values()
            .map(|k| {
                let (gmail_canonical, default_country, phone_metadata) = match k.profile() {
                    Profile::Email {
                        gmail_canonical, ..
                    } => (*gmail_canonical, String::new(), String::new()),
                    Profile::Phone {
                        default_country, ..
                    } => (
                        false,
                        default_country.clone(),
                        crate::identity::PHONE_METADATA.to_string(),
                    ),
                    Profile::Text => (false, String::new(), String::new()),
                };
                IdentityKind {
                    name: k.name().to_string(),
                    profile: profile(k.profile()) as i32,
                    gmail_canonical,
                    default_country,
                    standard: standard(k.profile().standard()) as i32,
                    phone_metadata,
                }
            })
            .collect(),
        datasets: policy
            .datasets()
            .iter()
            .filter(|d| d.owner() == org || may_query)
            .map(|d| dataset(d, d.owner() == org))
            .collect(),
        query: Some(QueryRules {
            aggregates: policy
                .query()
                .aggregates()
                .iter()
                .map(|a| aggregate(*a) as i32)
                .collect(),
            min_group_size: policy.query().min_group_size(),
            column_pairs: policy
                .query()
                .column_pairs()
                .iter()
                .map(|p| {
                    let [a, b] = p.columns();
                    ColumnPair {
                        a: format!("{}.{}", a.0, a.1),
                        b: format!("{}.{}", b.0, b.1),
                    }
                })
                .collect(),
            mode: match policy.query().mode() {
                crate::policy::QueryMode::Any => QueryMode::Any,
                crate::policy::QueryMode::Templates => QueryMode::Templates,
            } as i32,
        }),
        privacy: policy.privacy().map(|p| Privacy {
            epsilon_total: p.epsilon_total(),
            epsilon_per_query_max: p.epsilon_per_query_max(),
            epsilon_per_query_min: p.epsilon_per_query_min(),
            delta: p.delta(),
            delta_total: p.delta_total(),
            refresh: match p.refresh() {
                crate::policy::Refresh::Never => BudgetRefresh::Never,
                crate::policy::Refresh::Monthly => BudgetRefresh::Monthly,
            } as i32,
            max_groups_per_person: p.max_groups_per_person(),
            max_rows_per_person: p.max_rows_per_person(),
        }),
        templates: policy
            .templates()
            .iter()
            .filter(|t| may_query && t.runnable_by(org))
            .map(|t| Template {
                name: t.name().to_string(),
                description: t.description().to_string(),
                sql: t.sql().to_string(),
                params: t
                    .params()
                    .iter()
                    .map(|p| TemplateParam {
                        name: p.name().to_string(),
                        r#type: match p.kind() {
                            crate::policy::ParamKind::Value { .. } => ParamType::Value,
                            crate::policy::ParamKind::Values { .. } => ParamType::Values,
                            crate::policy::ParamKind::Integer { .. } => ParamType::Integer,
                            crate::policy::ParamKind::Date { .. } => ParamType::Date,
                        } as i32,
                        domain: p.kind().domain(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

impl From<views::Budget> for BudgetResponse {
    fn from(b: views::Budget) -> Self {
        BudgetResponse {
            enabled: true,
            epsilon_total: b.epsilon_total,
            epsilon_spent: b.epsilon_spent,
            epsilon_remaining: b.epsilon_remaining,
            epsilon_per_query_max: b.epsilon_per_query_max,
            delta: b.delta,
            window: b.window,
            next_refresh: b.next_refresh.map(timestamp),
            queries: b.queries,
            epsilon_per_query_min: b.epsilon_per_query_min,
            delta_total: b.delta_total,
            delta_spent: b.delta_spent,
            delta_remaining: b.delta_remaining,
        }
    }
}

impl From<views::AgreementStatus> for AgreementStatus {
    fn from(a: views::AgreementStatus) -> Self {
        AgreementStatus {
            agreement_id: a.agreement_id,
            state: state(a.state),
            policy_hash: a.policy_hash,
            datasets: a
                .datasets
                .into_iter()
                .map(|d| DatasetStatus {
                    dataset: d.dataset,
                    owner: d.owner,
                    current_version: d.current_version,
                    rows: d.rows,
                    versions: d.versions,
                    uploaded_at: Some(timestamp(d.uploaded_at)),
                    needs_upload: d.needs_upload,
                    damaged: d.damaged,
                })
                .collect(),
            budgets: a
                .budgets
                .into_iter()
                .map(|b| BudgetUse {
                    organisation: b.organisation,
                    window: b.window,
                    epsilon_spent: b.epsilon_spent,
                    epsilon_total: b.epsilon_total,
                    queries: b.queries,
                    delta_spent: b.delta_spent,
                    delta_total: b.delta_total,
                })
                .collect(),
            data_key: a.data_key,
        }
    }
}

impl From<crate::room::ReloadStatus> for PolicyReloadStatus {
    fn from(r: crate::room::ReloadStatus) -> Self {
        PolicyReloadStatus {
            reloads: r.reloads,
            failures: r.failures,
            last_at: r.last_at.map(timestamp),
            last_errors: r.last_errors,
        }
    }
}

impl From<views::AdminStatus> for AdminStatusResponse {
    fn from(s: views::AdminStatus) -> Self {
        AdminStatusResponse {
            generated_at: Some(timestamp(s.generated_at)),
            agreements: s.agreements.into_iter().map(Into::into).collect(),
            reload: Some(s.reload.into()),
        }
    }
}

impl From<views::AccessReport> for AccessReportResponse {
    fn from(r: views::AccessReport) -> Self {
        AccessReportResponse {
            organisation: r.organisation,
            agreement_id: r.agreement_id,
            purpose: r.purpose,
            generated_at: Some(timestamp(r.generated_at)),
            policy_hash: r.policy_hash,
            state: state(r.state),
            retention_days: r.retention_days,
            expires: r.expires,
            datasets: r
                .datasets
                .into_iter()
                .map(|d| DatasetHolding {
                    dataset: d.dataset,
                    columns: d.columns,
                    versions: d
                        .versions
                        .into_iter()
                        .map(|v| HeldVersion {
                            version: v.version,
                            rows: v.rows,
                            uploaded_at: Some(timestamp(v.uploaded_at)),
                            uploaded_by: v.uploaded_by,
                            current: v.current,
                            delete_by: Some(timestamp(v.delete_by)),
                        })
                        .collect(),
                })
                .collect(),
            access: r
                .access
                .into_iter()
                .map(|a| AccessCount {
                    organisation: a.organisation,
                    action: AuditAction::of(&a.action) as i32,
                    accepted: a.accepted,
                    rejected: a.rejected,
                    epsilon: a.epsilon,
                    last_at: Some(timestamp(a.last_at)),
                })
                .collect(),
            budget: r.budget.map(Into::into),
        }
    }
}

impl From<Spent> for PrivacyReport {
    fn from(s: Spent) -> Self {
        let r = s.report;
        PrivacyReport {
            mechanism: NoiseMechanism::DiscreteLaplace as i32,
            epsilon: r.epsilon,
            delta: r.delta,
            threshold: r.threshold,
            threshold_scale: r.threshold_scale,
            max_groups_per_person: r.max_groups_per_person,
            max_rows_per_person: r.max_rows_per_person,
            columns: r
                .columns
                .into_iter()
                .map(|c| ColumnNoise {
                    aggregate: c.aggregate,
                    epsilon: c.epsilon,
                    scale: c.scale,
                    count_scale: c.count_scale,
                    half_width_95: c.half_width_95,
                })
                .collect(),
            epsilon_remaining: s.epsilon_remaining,
            next_refresh: s.next_refresh.map(timestamp),
        }
    }
}

impl From<Overlap> for OverlapResponse {
    fn from(o: Overlap) -> Self {
        OverlapResponse {
            overlap: o.overlap,
            suppressed: o.overlap.is_none(),
            min_group_size: o.min_group_size,
            datasets: o.datasets,
            matched_on: o.matched_on,
            policy_hash: o.policy_hash,
            privacy: o.privacy.map(Into::into),
        }
    }
}

impl From<Held> for DatasetVersion {
    fn from(h: Held) -> Self {
        let state = match h.state {
            HeldState::Matched => DatasetState::Matched,
            HeldState::Waiting => DatasetState::Waiting,
            HeldState::NeedsUpload => DatasetState::NeedsUpload,
            HeldState::Damaged => DatasetState::Damaged,
        };
        DatasetVersion {
            dataset: h.dataset,
            version: h.version,
            upload_id: h.upload_id,
            rows: h.rows,
            committed_at: Some(timestamp(h.committed_at)),
            policy_hash: h.policy_hash,
            versions: h.versions,
            state: state as i32,
            waiting_for: h.waiting_for,
        }
    }
}

impl From<Uploaded> for UploadResponse {
    fn from(u: Uploaded) -> Self {
        UploadResponse {
            version: u.version,
            rows: u.rows,
            already_committed: u.already_committed,
            committed_at: Some(timestamp(u.committed_at)),
        }
    }
}

impl From<Erased> for EraseResponse {
    fn from(e: Erased) -> Self {
        EraseResponse {
            rows_removed: e.rows_removed,
            rows_kept: e.rows_kept,
            version: e.version,
            versions_deleted: e.versions_deleted,
        }
    }
}

impl From<Blinded> for SubmitBlindingResponse {
    fn from(b: Blinded) -> Self {
        SubmitBlindingResponse {
            dataset: b.dataset,
            version: b.version,
            points: b.points,
        }
    }
}

/// A blinding job as messages: the first names the job, each carries at
/// most [`crate::identity::blinding::POINTS_PER_MESSAGE`] points.
pub fn blinding_chunks(work: Work) -> Vec<BlindingWorkResponse> {
    use crate::identity::blinding::{POINT_LEN, POINTS_PER_MESSAGE};
    let header = BlindingJob {
        job_id: work.job_id,
        dataset: work.dataset,
        owner: work.owner,
        points: (work.points.len() / POINT_LEN) as u64,
    };
    let mut chunks = work.points.chunks(POINTS_PER_MESSAGE * POINT_LEN);
    let mut messages = vec![BlindingWorkResponse {
        job: Some(header),
        points: chunks.next().unwrap_or_default().to_vec(),
    }];
    messages.extend(chunks.map(|c| BlindingWorkResponse {
        job: None,
        points: c.to_vec(),
    }));
    messages
}

impl From<Entry> for AuditEntry {
    fn from(e: Entry) -> Self {
        AuditEntry {
            seq: e.seq,
            time: Some(timestamp(e.time)),
            organisation: e.org,
            agreement_id: e.agreement,
            policy_hash: e.policy_hash,
            action: AuditAction::of(&e.action) as i32,
            decision: AuditDecision::of(&e.decision) as i32,
            rule: e.rule,
            subject: e.subject,
            sql_hash: e.sql_hash,
            rows: e.rows,
            suppressed: e.suppressed,
            epsilon: e.epsilon,
            delta: e.delta,
            query_id: e.query_id,
            template: e.template,
            params_hash: e.params_hash,
            prev: e.prev,
            hash: e.hash,
        }
    }
}

impl From<QueryRequest> for crate::room::Ask {
    fn from(r: QueryRequest) -> Self {
        crate::room::Ask {
            agreement: r.agreement_id,
            sql: r.sql,
            template: r.template,
            params: r.params.into_iter().collect(),
            epsilon: r.epsilon,
        }
    }
}

impl From<crate::room::Ask> for QueryRequest {
    fn from(a: crate::room::Ask) -> Self {
        QueryRequest {
            agreement_id: a.agreement,
            sql: a.sql,
            template: a.template,
            params: a.params.into_iter().collect(),
            epsilon: a.epsilon,
        }
    }
}
