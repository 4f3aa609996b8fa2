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
    #[serde(default)]
    pub(crate) template: Vec<RawTemplate>,
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
    pub(crate) matching: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    pub(crate) profile: String,
    pub(crate) gmail_canonical: Option<bool>,
    pub(crate) default_country: Option<String>,
    pub(crate) standard: Option<String>,
    pub(crate) metadata: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawParty {
    pub(crate) org: String,
    pub(crate) rights: Vec<String>,
    /// The standard each identity kind's uploads of this party follow.
    #[serde(default)]
    pub(crate) standards: std::collections::BTreeMap<String, String>,
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
    /// A number, or a date or date-time for temporal metrics.
    pub(crate) min: Option<toml::Value>,
    pub(crate) max: Option<toml::Value>,
    pub(crate) compare: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQuery {
    pub(crate) aggregates: Vec<String>,
    pub(crate) min_group_size: i64,
    #[serde(default)]
    pub(crate) column_pairs: Vec<Vec<String>>,
    pub(crate) mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTemplate {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) sql: String,
    pub(crate) parties: Vec<String>,
    #[serde(default)]
    pub(crate) param: Vec<RawParam>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawParam {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) param_type: String,
    pub(crate) column: Option<String>,
    pub(crate) min: Option<toml::Value>,
    pub(crate) max: Option<toml::Value>,
    pub(crate) max_items: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrivacy {
    pub(crate) epsilon_total: f64,
    pub(crate) epsilon_per_query_max: f64,
    pub(crate) epsilon_per_query_min: Option<f64>,
    pub(crate) delta: Option<f64>,
    pub(crate) delta_total: Option<f64>,
    pub(crate) refresh: Option<String>,
    pub(crate) max_groups_per_person: Option<i64>,
    pub(crate) max_rows_per_person: Option<i64>,
}
