//! The validated policy. Fields are private: a value of these types can only
//! come out of validation, so its invariants always hold.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use time::Date;

use crate::identity::{Profile, Standard};

/// A validated data-sharing agreement.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub(super) id: String,
    pub(super) purpose: String,
    pub(super) starts_on: Option<Date>,
    pub(super) expires_on: Date,
    pub(super) retention_days: u32,
    pub(super) salt: Salt,
    pub(super) matching: Matching,
    pub(super) identities: BTreeMap<String, IdentityKind>,
    pub(super) parties: Vec<Party>,
    pub(super) datasets: Vec<Dataset>,
    pub(super) query: QueryRules,
    pub(super) privacy: Option<Privacy>,
    pub(super) templates: Vec<super::Template>,
    pub(super) hash: PolicyHash,
}

impl Policy {
    /// The agreement's identifier, also the policy file's stem.
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn purpose(&self) -> &str {
        &self.purpose
    }
    /// First day the agreement is in force, if it does not start at once.
    pub fn starts_on(&self) -> Option<Date> {
        self.starts_on
    }
    /// Last day the agreement is in force (inclusive).
    pub fn expires_on(&self) -> Date {
        self.expires_on
    }
    /// How long an uploaded dataset version may be kept, in days.
    pub fn retention_days(&self) -> u32 {
        self.retention_days
    }
    pub fn salt(&self) -> &Salt {
        &self.salt
    }
    /// How the parties' identifiers are made comparable.
    pub fn matching(&self) -> Matching {
        self.matching
    }
    /// Identity kinds by name, each with its normalisation profile.
    pub fn identities(&self) -> &BTreeMap<String, IdentityKind> {
        &self.identities
    }
    pub fn parties(&self) -> &[Party] {
        &self.parties
    }
    pub fn datasets(&self) -> &[Dataset] {
        &self.datasets
    }
    pub fn query(&self) -> &QueryRules {
        &self.query
    }
    pub fn privacy(&self) -> Option<&Privacy> {
        self.privacy.as_ref()
    }
    /// Approved query templates, in file order.
    pub fn templates(&self) -> &[super::Template] {
        &self.templates
    }
    pub fn template(&self, name: &str) -> Option<&super::Template> {
        self.templates.iter().find(|t| t.name() == name)
    }
    /// BLAKE3 of the policy file's bytes.
    pub fn hash(&self) -> &PolicyHash {
        &self.hash
    }

    /// The party entry for an organisation, if it is a party at all.
    pub fn party(&self, org: &str) -> Option<&Party> {
        self.parties.iter().find(|p| p.org == org)
    }

    pub fn dataset(&self, name: &str) -> Option<&Dataset> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// Whether `org` is a party holding `right`.
    pub fn allows(&self, org: &str, right: Right) -> bool {
        self.party(org).is_some_and(|p| p.has(right))
    }

    /// How a dataset's stored rows were made, as a digest: the salt, the
    /// matching mode, and each uploaded column with its identity kind's
    /// normalisation or its value type. A version whose form differs from
    /// the policy's now was fingerprinted or typed under other settings:
    /// its rows cannot be compared with rows made now, and its owner
    /// uploads it again.
    pub fn data_form(&self, dataset: &Dataset) -> String {
        let mut text = format!(
            "salt {}\nmatching {}\n",
            self.salt.to_hex(),
            self.matching.as_str()
        );
        let mut columns: Vec<&Column> = dataset.uploaded_columns().collect();
        columns.sort_by(|a, b| a.name.cmp(&b.name));
        for c in columns {
            let described = match &c.role {
                ColumnRole::Identifier { kind } => {
                    let profile = match self.identities.get(kind).map(|k| &k.profile) {
                        // Ours as before, so that versions made then stay.
                        Some(Profile::Email {
                            gmail_canonical,
                            standard: Standard::Cleanroom,
                        }) => format!("email gmail_canonical={gmail_canonical}"),
                        Some(Profile::Email { standard, .. }) => {
                            format!("email standard={}", standard.as_str())
                        }
                        Some(Profile::Phone {
                            default_country,
                            standard,
                        }) => format!(
                            "phone default_country={default_country} standard={} metadata={}",
                            standard.as_str(),
                            crate::identity::PHONE_METADATA
                        ),
                        Some(Profile::Text) => "text".to_string(),
                        None => "unknown".to_string(),
                    };
                    format!("identifier {kind} {profile}")
                }
                ColumnRole::Dimension { value_type, .. }
                | ColumnRole::Metric { value_type, .. } => {
                    format!("{} {}", c.role.name(), value_type.as_str())
                }
                ColumnRole::Sensitive => continue,
            };
            text.push_str(&format!("column {} {described}\n", c.name));
        }
        blake3::hash(text.as_bytes()).to_hex()[..32].to_string()
    }

    /// Whether rows stored with `form` were made as `dataset`'s rows are
    /// made now. A version stored before forms were recorded (empty) is
    /// taken as made now.
    pub fn made_now(&self, dataset: &Dataset, form: &str) -> bool {
        form.is_empty() || form == self.data_form(dataset)
    }

    /// The agreement's state on a given day.
    pub fn state_on(&self, today: Date) -> AgreementState {
        if self.starts_on.is_some_and(|s| today < s) {
            AgreementState::Pending
        } else if today > self.expires_on {
            AgreementState::Expired
        } else {
            AgreementState::Active
        }
    }
}

/// Where an agreement stands on a given day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgreementState {
    Pending,
    Active,
    Expired,
    /// Its policy file was removed from the server's folder: no uploads or
    /// queries, data kept, until the file returns.
    Suspended,
}

impl AgreementState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgreementState::Pending => "pending",
            AgreementState::Active => "active",
            AgreementState::Expired => "expired",
            AgreementState::Suspended => "suspended",
        }
    }
}

/// The agreement's salt: 32 random bytes mixed into every fingerprint key.
#[derive(Clone, PartialEq, Eq)]
pub struct Salt(pub(super) [u8; 32]);

impl Salt {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Salt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Salt(..)")
    }
}

/// BLAKE3 hash of a policy file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyHash(pub(super) [u8; 32]);

impl PolicyHash {
    pub fn of(bytes: &[u8]) -> Self {
        PolicyHash(*blake3::hash(bytes).as_bytes())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The first 12 hex digits, for summaries.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

/// What a party may do under an agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Right {
    /// Upload its own datasets.
    Upload,
    /// Run aggregate queries.
    Query,
    /// Receive query results.
    ReceiveResults,
    /// Learn the size of the overlap between the parties' datasets.
    SeeOverlap,
    /// See the agreement's operational state.
    Admin,
}

impl Right {
    pub const ALL: [Right; 5] = [
        Right::Upload,
        Right::Query,
        Right::ReceiveResults,
        Right::SeeOverlap,
        Right::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Right::Upload => "upload",
            Right::Query => "query",
            Right::ReceiveResults => "receive_results",
            Right::SeeOverlap => "see_overlap",
            Right::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Right> {
        Right::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One organisation's place in an agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    pub(super) org: String,
    pub(super) rights: BTreeSet<Right>,
}

impl Party {
    pub fn org(&self) -> &str {
        &self.org
    }
    pub fn rights(&self) -> &BTreeSet<Right> {
        &self.rights
    }
    pub fn has(&self, right: Right) -> bool {
        self.rights.contains(&right)
    }
}

/// A named kind of identifier (for example `email`) and its profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKind {
    pub(super) name: String,
    pub(super) profile: Profile,
}

impl IdentityKind {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn profile(&self) -> &Profile {
        &self.profile
    }
}

/// A party's dataset: the only columns it may upload, each with one role.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub(super) name: String,
    pub(super) owner: String,
    pub(super) columns: Vec<Column>,
}

impl Dataset {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn owner(&self) -> &str {
        &self.owner
    }
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
    /// Identifier columns as (column name, identity kind).
    pub fn identifier_columns(&self) -> Vec<(&str, &str)> {
        self.uploaded_columns()
            .filter_map(|c| match &c.role {
                ColumnRole::Identifier { kind } => Some((c.name.as_str(), kind.as_str())),
                _ => None,
            })
            .collect()
    }

    /// Columns that are uploaded: everything but sensitive ones.
    pub fn uploaded_columns(&self) -> impl Iterator<Item = &Column> {
        self.columns
            .iter()
            .filter(|c| !matches!(c.role, ColumnRole::Sensitive))
    }
}

/// A dataset column and its one role.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub(super) name: String,
    pub(super) role: ColumnRole,
}

impl Column {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn role(&self) -> &ColumnRole {
        &self.role
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ColumnRole {
    /// A keyed fingerprint of a normalised identifier of this identity kind.
    Identifier { kind: String },
    /// A categorical attribute for GROUP BY and filters.
    Dimension {
        value_type: ValueType,
        domain: Domain,
    },
    /// A numeric, date or timestamp attribute within inclusive bounds:
    /// inside aggregates, and (when `compare` holds, or under differential
    /// privacy) in filters and derived dimensions. Dates are bounded in
    /// days and timestamps in microseconds since 1970-01-01.
    Metric {
        value_type: ValueType,
        min: f64,
        max: f64,
        compare: bool,
    },
    /// Barred from upload and from analysis.
    Sensitive,
}

impl ColumnRole {
    pub fn name(&self) -> &'static str {
        match self {
            ColumnRole::Identifier { .. } => "identifier",
            ColumnRole::Dimension { .. } => "dimension",
            ColumnRole::Metric { .. } => "metric",
            ColumnRole::Sensitive => "sensitive",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    String,
    Integer,
    Float,
    /// A calendar day (Arrow Date32).
    Date,
    /// An instant in UTC, to the microsecond (Arrow Timestamp(µs)).
    Timestamp,
}

impl ValueType {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::String => "string",
            ValueType::Integer => "integer",
            ValueType::Float => "float",
            ValueType::Date => "date",
            ValueType::Timestamp => "timestamp",
        }
    }

    /// Dates and timestamps: compared and truncated, never summed.
    pub fn is_temporal(self) -> bool {
        matches!(self, ValueType::Date | ValueType::Timestamp)
    }
}

/// The values a dimension column may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// A closed list of allowed values.
    Values(Vec<String>),
    /// Any values, but no more than this many distinct ones.
    MaxCardinality(u32),
}

/// Aggregate functions an agreement can allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aggregate {
    Count,
    CountDistinct,
    Sum,
    Avg,
}

impl Aggregate {
    pub const ALL: [Aggregate; 4] = [
        Aggregate::Count,
        Aggregate::CountDistinct,
        Aggregate::Sum,
        Aggregate::Avg,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::CountDistinct => "count_distinct",
            Aggregate::Sum => "sum",
            Aggregate::Avg => "avg",
        }
    }

    pub fn parse(s: &str) -> Option<Aggregate> {
        Aggregate::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// Rules every query of the agreement obeys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRules {
    pub(super) aggregates: BTreeSet<Aggregate>,
    pub(super) min_group_size: u32,
    pub(super) column_pairs: Vec<ColumnPair>,
    pub(super) mode: QueryMode,
}

/// Two columns (`dataset.column`) an expression may combine: compared with
/// each other, or one offset against the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnPair {
    pub(super) a: (String, String),
    pub(super) b: (String, String),
}

impl ColumnPair {
    pub fn columns(&self) -> [(&str, &str); 2] {
        [
            (self.a.0.as_str(), self.a.1.as_str()),
            (self.b.0.as_str(), self.b.1.as_str()),
        ]
    }
    /// Whether this pair joins the two columns, in either order.
    pub fn joins(&self, x: (&str, &str), y: (&str, &str)) -> bool {
        let [a, b] = self.columns();
        (a == x && b == y) || (a == y && b == x)
    }
}

/// How an agreement's parties make their identifiers comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Keyed fingerprints under a secret the partners share.
    Keyed,
    /// Points blinded by each party's own secret scalar and then by its
    /// partner's (`docs/matching.md`); no shared secret.
    Ecdh,
}

impl Matching {
    pub fn as_str(self) -> &'static str {
        match self {
            Matching::Keyed => "keyed",
            Matching::Ecdh => "ecdh",
        }
    }
}

/// Which queries an agreement admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryMode {
    /// Any SQL the checker accepts, and templates.
    Any,
    /// Only the agreement's approved templates.
    Templates,
}

impl QueryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryMode::Any => "any",
            QueryMode::Templates => "templates",
        }
    }
}

impl QueryRules {
    /// Column pairs expressions may combine.
    pub fn column_pairs(&self) -> &[ColumnPair] {
        &self.column_pairs
    }
    pub fn mode(&self) -> QueryMode {
        self.mode
    }
    pub fn aggregates(&self) -> &BTreeSet<Aggregate> {
        &self.aggregates
    }
    /// Every output row stands for at least this many distinct matched people (at least 2).
    pub fn min_group_size(&self) -> u32 {
        self.min_group_size
    }
}

/// When a querying organisation's privacy budget starts afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    Never,
    Monthly,
}

impl Refresh {
    pub fn as_str(self) -> &'static str {
        match self {
            Refresh::Never => "none",
            Refresh::Monthly => "monthly",
        }
    }
}

/// Differential privacy settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Privacy {
    pub(super) epsilon_total: f64,
    pub(super) epsilon_per_query_max: f64,
    pub(super) epsilon_per_query_min: f64,
    pub(super) delta: f64,
    pub(super) delta_total: f64,
    pub(super) refresh: Refresh,
    pub(super) max_groups_per_person: u32,
    pub(super) max_rows_per_person: u32,
}

impl Privacy {
    /// Budget per querying organisation and refresh window.
    pub fn epsilon_total(&self) -> f64 {
        self.epsilon_total
    }
    pub fn epsilon_per_query_max(&self) -> f64 {
        self.epsilon_per_query_max
    }
    /// No query spends less: a floor on epsilon bounds how many queries a
    /// window holds, and with them the delta they spend together.
    pub fn epsilon_per_query_min(&self) -> f64 {
        self.epsilon_per_query_min
    }
    /// Probability that the threshold lets through a group one person
    /// could reveal, per query; every query and overlap spends it.
    pub fn delta(&self) -> f64 {
        self.delta
    }
    /// Delta per querying organisation and window: the ledger refuses a
    /// query past it as it does past `epsilon_total`.
    pub fn delta_total(&self) -> f64 {
        self.delta_total
    }
    pub fn refresh(&self) -> Refresh {
        self.refresh
    }
    pub fn max_groups_per_person(&self) -> u32 {
        self.max_groups_per_person
    }
    /// Rows one person adds to a COUNT in one group.
    pub fn max_rows_per_person(&self) -> u32 {
        self.max_rows_per_person
    }
}
