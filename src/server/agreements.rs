//! The `Agreements` service: who am I, which agreements, and one agreement
//! as the calling party may see it.

use tonic::{Request, Response, Status};

use super::AppState;
use super::auth::caller;
use crate::error::ServiceError;
use crate::policy::{
    AgreementState, Column, ColumnRole, Dataset, Domain, Policy, Profile, Right, ValueType,
};
use crate::proto;

/// Implements `cleanroom.v1.Agreements`.
#[derive(Debug, Clone)]
pub struct AgreementsService {
    state: AppState,
}

impl AgreementsService {
    pub fn new(state: AppState) -> Self {
        AgreementsService { state }
    }
}

#[tonic::async_trait]
impl proto::agreements_server::Agreements for AgreementsService {
    #[tracing::instrument(skip_all)]
    async fn who_am_i(
        &self,
        request: Request<proto::WhoAmIRequest>,
    ) -> Result<Response<proto::WhoAmIResponse>, Status> {
        let org = caller(&request)?;
        let count = self.state.policies().for_org(&org).count();
        Ok(Response::new(proto::WhoAmIResponse {
            organisation: org,
            agreement_count: u32::try_from(count).unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_agreements(
        &self,
        request: Request<proto::ListAgreementsRequest>,
    ) -> Result<Response<proto::ListAgreementsResponse>, Status> {
        let org = caller(&request)?;
        let today = self.state.clock().today();
        let policies = self.state.policies();
        let agreements = policies
            .for_org(&org)
            .map(|p| summary(p, &org, policies.state_of(p, today)))
            .collect();
        Ok(Response::new(proto::ListAgreementsResponse { agreements }))
    }

    #[tracing::instrument(skip_all, fields(agreement = %super::short(&request.get_ref().agreement_id)))]
    async fn get_agreement(
        &self,
        request: Request<proto::GetAgreementRequest>,
    ) -> Result<Response<proto::GetAgreementResponse>, Status> {
        let org = caller(&request)?;
        let id = &request.get_ref().agreement_id;
        if id.is_empty() {
            return Err(ServiceError::InvalidArgument {
                field: "agreement_id",
                rule: "must not be empty".into(),
            }
            .into());
        }
        let policy = self.state.agreement_for(&org, id)?;
        let today = self.state.clock().today();
        Ok(Response::new(proto::GetAgreementResponse {
            agreement: Some(agreement_view(
                &policy,
                &org,
                self.state.policies().state_of(&policy, today),
            )),
        }))
    }
}

fn right(r: Right) -> i32 {
    let r = match r {
        Right::Upload => proto::Right::Upload,
        Right::Query => proto::Right::Query,
        Right::ReceiveResults => proto::Right::ReceiveResults,
        Right::SeeOverlap => proto::Right::SeeOverlap,
        Right::Admin => proto::Right::Admin,
    };
    r as i32
}

fn state(s: AgreementState) -> i32 {
    let s = match s {
        AgreementState::Pending => proto::AgreementState::Pending,
        AgreementState::Active => proto::AgreementState::Active,
        AgreementState::Expired => proto::AgreementState::Expired,
        AgreementState::Suspended => proto::AgreementState::Suspended,
    };
    s as i32
}

fn summary(policy: &Policy, org: &str, now: AgreementState) -> proto::AgreementSummary {
    let my_rights = policy
        .party(org)
        .map(|p| p.rights().iter().copied().map(right).collect())
        .unwrap_or_default();
    proto::AgreementSummary {
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

fn value_type(t: ValueType) -> i32 {
    let t = match t {
        ValueType::String => proto::ValueType::String,
        ValueType::Integer => proto::ValueType::Integer,
        ValueType::Float => proto::ValueType::Float,
        ValueType::Date => proto::ValueType::Date,
        ValueType::Timestamp => proto::ValueType::Timestamp,
    };
    t as i32
}

fn column(c: &Column) -> proto::Column {
    let mut out = proto::Column {
        name: c.name().to_string(),
        ..Default::default()
    };
    match c.role() {
        ColumnRole::Identifier { kind } => {
            out.role = proto::ColumnRole::Identifier as i32;
            out.identity_kind = kind.clone();
        }
        ColumnRole::Dimension {
            value_type: t,
            domain,
        } => {
            out.role = proto::ColumnRole::Dimension as i32;
            out.value_type = value_type(*t);
            match domain {
                Domain::Values(values) => out.allowed_values = values.clone(),
                Domain::MaxCardinality(n) => out.max_cardinality = Some(*n),
            }
        }
        ColumnRole::Metric {
            value_type: t,
            min,
            max,
            compare,
        } => {
            out.role = proto::ColumnRole::Metric as i32;
            out.value_type = value_type(*t);
            out.min = Some(*min);
            out.max = Some(*max);
            out.compare = *compare;
        }
        ColumnRole::Sensitive => out.role = proto::ColumnRole::Sensitive as i32,
    }
    out
}

fn dataset(d: &Dataset, own: bool) -> proto::Dataset {
    proto::Dataset {
        name: d.name().to_string(),
        owner: d.owner().to_string(),
        columns: d
            .columns()
            .iter()
            .filter(|c| own || !matches!(c.role(), ColumnRole::Sensitive))
            .map(column)
            .collect(),
    }
}

/// The agreement as `org` may see it: its own datasets in full; other
/// parties' datasets only if it may query them, and never their sensitive
/// columns.
pub(crate) fn agreement_view(policy: &Policy, org: &str, now: AgreementState) -> proto::Agreement {
    let may_query = policy.allows(org, Right::Query);
    proto::Agreement {
        summary: Some(summary(policy, org, now)),
        retention_days: policy.retention_days(),
        salt: policy.salt().to_hex(),
        matching: match policy.matching() {
            crate::policy::Matching::Keyed => proto::MatchingMode::Keyed,
            crate::policy::Matching::Ecdh => proto::MatchingMode::Ecdh,
        } as i32,
        parties: policy
            .parties()
            .iter()
            .map(|p| proto::Party {
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
                proto::IdentityKind {
                    name: k.name().to_string(),
                    profile: k.profile().name().to_string(),
                    gmail_canonical,
                    default_country,
                    standard: k.profile().standard().as_str().to_string(),
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
        query: Some(proto::QueryRules {
            aggregates: policy
                .query()
                .aggregates()
                .iter()
                .map(|a| a.as_str().to_string())
                .collect(),
            min_group_size: policy.query().min_group_size(),
            column_pairs: policy
                .query()
                .column_pairs()
                .iter()
                .map(|p| {
                    let [a, b] = p.columns();
                    proto::ColumnPair {
                        a: format!("{}.{}", a.0, a.1),
                        b: format!("{}.{}", b.0, b.1),
                    }
                })
                .collect(),
            mode: policy.query().mode().as_str().to_string(),
        }),
        privacy: policy.privacy().map(|p| proto::Privacy {
            epsilon_total: p.epsilon_total(),
            epsilon_per_query_max: p.epsilon_per_query_max(),
            epsilon_per_query_min: p.epsilon_per_query_min(),
            delta: p.delta(),
            delta_total: p.delta_total(),
            refresh: p.refresh().as_str().to_string(),
            max_groups_per_person: p.max_groups_per_person(),
            max_rows_per_person: p.max_rows_per_person(),
        }),
        templates: policy
            .templates()
            .iter()
            .filter(|t| may_query && t.runnable_by(org))
            .map(|t| proto::Template {
                name: t.name().to_string(),
                description: t.description().to_string(),
                sql: t.sql().to_string(),
                params: t
                    .params()
                    .iter()
                    .map(|p| proto::TemplateParam {
                        name: p.name().to_string(),
                        r#type: p.kind().type_name().to_string(),
                        domain: p.kind().domain(),
                    })
                    .collect(),
            })
            .collect(),
    }
}
