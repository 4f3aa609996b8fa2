//! The policy file as written: a direct serde image of the TOML, with no
//! invariants. [`super::Policy`] is built from it by validation.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub(crate) agreement: RawAgreement,
    #[serde(default)]
    pub(crate) identity: BTreeMap<String, RawIdentity>,
    #[serde(default)]
    pub(crate) party: Vec<RawParty>,
    #[serde(default)]
    pub(crate) dataset: Vec<RawDataset>,
    pub(crate) query: RawQuery,
    pub(crate) privacy: Option<RawPrivacy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAgreement {
    pub(crate) id: String,
    pub(crate) purpose: String,
    pub(crate) starts: Option<toml::value::Datetime>,
    pub(crate) expires: toml::value::Datetime,
    pub(crate) retention_days: i64,
    pub(crate) salt: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    pub(crate) profile: String,
    pub(crate) gmail_canonical: Option<bool>,
    pub(crate) default_country: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawParty {
    pub(crate) org: String,
    pub(crate) rights: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDataset {
    pub(crate) name: String,
    pub(crate) owner: String,
    #[serde(default)]
    pub(crate) column: Vec<RawColumn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawColumn {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) kind: Option<String>,
    #[serde(rename = "type")]
    pub(crate) value_type: Option<String>,
    pub(crate) values: Option<Vec<String>>,
    pub(crate) max_cardinality: Option<i64>,
    pub(crate) min: Option<f64>,
    pub(crate) max: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuery {
    pub(crate) aggregates: Vec<String>,
    pub(crate) min_group_size: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrivacy {
    pub(crate) epsilon_total: f64,
    pub(crate) epsilon_per_query_max: f64,
    pub(crate) delta: Option<f64>,
    pub(crate) refresh: Option<String>,
    pub(crate) max_groups_per_person: Option<i64>,
    pub(crate) max_rows_per_person: Option<i64>,
}
