//! Differential testing of the governed query path: random queries over
//! random demo data with known people, each run through the product and
//! through an independent reference computation written here in plain Rust
//! (nested loops over the rows, SQL's three-valued logic, no DataFusion).
//!
//! For every query the product accepts, its answer must equal the
//! reference with groups of fewer than `min_group_size` people removed,
//! evaluated before HAVING, ORDER BY and LIMIT; an error is allowed only
//! where the reference says an expression over a *released* group fails.
//! For every query, refusal or not (and its text) must be the same on two
//! unrelated data sets: a refusal depends on the query alone.

use std::collections::{BTreeMap, BTreeSet};

use super::workers::run;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type};
use arrow::record_batch::RecordBatch;
use cleanroom::policy::Policy;
use cleanroom::query::{QueryError, QueryOutcome, TableData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::people::{self, Row, civil, tables};

const REGIONS: [&str; 4] = ["north", "south", "east", "west"];
const AGES: [&str; 6] = ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
const SEGMENTS: [&str; 6] = ["sports", "travel", "home", "tech", "fashion", "food"];

/// One generated data set: both parties' rows, and the tables built from them.
pub struct Data {
    pub customers: Vec<Row>,
    pub audience: Vec<Row>,
    pub tables: Vec<TableData>,
}

/// Skewed picks, so that some groups are large and some fall under the
/// minimum.
fn skewed<'a>(rng: &mut StdRng, values: &[&'a str]) -> Option<&'a str> {
    if rng.random_bool(0.03) {
        return None;
    }
    let mut i = 0;
    while i + 1 < values.len() && rng.random_bool(0.45) {
        i += 1;
    }
    Some(values[i])
}

/// A value, or NULL 3% of the time.
fn maybe<T>(rng: &mut StdRng, v: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
    let value = v(rng);
    (!rng.random_bool(0.03)).then_some(value)
}

pub fn data(policy: &Policy, seed: u64, people: u64) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut customers = Vec::new();
    let mut audience = Vec::new();
    for id in 0..people {
        let phone = rng.random_bool(0.6);
        if rng.random_bool(0.8) {
            let region = skewed(&mut rng, &REGIONS);
            let age_band = skewed(&mut rng, &AGES);
            // Some customers have two rows.
            let copies = if rng.random_bool(0.1) { 2 } else { 1 };
            for _ in 0..copies {
                customers.push(Row {
                    id,
                    phone,
                    region,
                    age_band,
                    segment: None,
                    ltv: maybe(&mut rng, |r| {
                        f64::from(r.random_range(0..500_000u32)) / 100.0
                    }),
                    exposures: None,
                    spend: None,
                    purchases: maybe(&mut rng, |r| r.random_range(0..=20i64)),
                    last_purchase: maybe(&mut rng, |r| people::MARCH_2026 - r.random_range(0..365)),
                    lead_score: maybe(&mut rng, |r| r.random_range(0..=100i64)),
                    first_exposure: None,
                });
            }
        }
        if rng.random_bool(0.7) {
            audience.push(Row {
                id,
                phone,
                region: None,
                age_band: None,
                segment: skewed(&mut rng, &SEGMENTS),
                ltv: None,
                exposures: maybe(&mut rng, |r| r.random_range(0..=100i64)),
                spend: maybe(&mut rng, |r| f64::from(r.random_range(0..4_000u32)) / 2.0),
                purchases: None,
                last_purchase: None,
                lead_score: None,
                first_exposure: maybe(&mut rng, |r| people::MARCH_2026 - r.random_range(0..180)),
            });
        }
    }
    let tables = tables(policy, &customers, &audience);
    Data {
        customers,
        audience,
        tables,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dim {
    Region,
    Age,
    Segment,
    /// `floor(c.lifetime_value / 1000)`: a bucket of a comparable metric.
    ValueBucket,
    /// `CASE WHEN a.ad_exposures > 0 THEN 'exposed' ELSE 'unexposed' END`.
    Exposed,
    /// `date_part('month', c.last_purchase)`.
    PurchaseMonth,
    /// `COALESCE(a.interest_segment, 'none')`: the unmatched side named.
    SegmentOrNone,
}

impl Dim {
    fn sql(self) -> &'static str {
        match self {
            Dim::Region => "c.region",
            Dim::Age => "c.age_band",
            Dim::Segment => "a.interest_segment",
            Dim::ValueBucket => "floor(c.lifetime_value / 1000)",
            Dim::Exposed => "CASE WHEN a.ad_exposures > 0 THEN 'exposed' ELSE 'unexposed' END",
            Dim::PurchaseMonth => "date_part('month', c.last_purchase)",
            Dim::SegmentOrNone => "COALESCE(a.interest_segment, 'none')",
        }
    }
    /// Whether the product sorts it as text, as the reference does.
    fn sorts_as_text(self) -> bool {
        !matches!(self, Dim::ValueBucket | Dim::PurchaseMonth)
    }
    fn values(self) -> &'static [&'static str] {
        match self {
            Dim::Region => &REGIONS,
            Dim::Age => &AGES,
            _ => &SEGMENTS,
        }
    }
    fn of(self, c: &Row, a: &Row) -> Option<String> {
        match self {
            Dim::Region => c.region.map(String::from),
            Dim::Age => c.age_band.map(String::from),
            Dim::Segment => a.segment.map(String::from),
            Dim::ValueBucket => c.ltv.map(|v| format!("{:?}", (v / 1000.0).floor())),
            Dim::Exposed => Some(
                if a.exposures.is_some_and(|e| e > 0) {
                    "exposed"
                } else {
                    "unexposed"
                }
                .to_string(),
            ),
            Dim::PurchaseMonth => c.last_purchase.map(|d| civil(d).1.to_string()),
            Dim::SegmentOrNone => Some(a.segment.unwrap_or("none").to_string()),
        }
    }
}

fn date_literal(days: i32) -> String {
    let (y, m, d) = civil(days);
    format!("DATE '{y:04}-{m:02}-{d:02}'")
}

#[derive(Debug, Clone)]
enum Pred {
    Eq(Dim, &'static str),
    Ne(Dim, &'static str),
    In(Dim, Vec<&'static str>),
    Between(Dim, &'static str, &'static str),
    IsNull(Dim),
    Not(Box<Pred>),
    And(Box<Pred>, Box<Pred>),
    Or(Box<Pred>, Box<Pred>),
    /// `c.lifetime_value > v` (a comparable metric).
    ValueAbove(f64),
    /// `c.last_purchase BETWEEN DATE lo AND DATE hi`.
    PurchasedBetween(i32, i32),
    /// `c.last_purchase BETWEEN a.first_exposure AND a.first_exposure +
    /// INTERVAL 'n days'` (a listed column pair).
    PurchasedWithin(i32),
}

impl Pred {
    fn sql(&self) -> String {
        match self {
            Pred::Eq(d, v) => format!("{} = '{v}'", d.sql()),
            Pred::Ne(d, v) => format!("{} <> '{v}'", d.sql()),
            Pred::In(d, vs) => format!(
                "{} IN ({})",
                d.sql(),
                vs.iter()
                    .map(|v| format!("'{v}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Pred::Between(d, lo, hi) => format!("{} BETWEEN '{lo}' AND '{hi}'", d.sql()),
            Pred::IsNull(d) => format!("{} IS NULL", d.sql()),
            Pred::Not(p) => format!("NOT ({})", p.sql()),
            Pred::And(a, b) => format!("({}) AND ({})", a.sql(), b.sql()),
            Pred::Or(a, b) => format!("({}) OR ({})", a.sql(), b.sql()),
            Pred::ValueAbove(v) => format!("c.lifetime_value > {v:.1}"),
            Pred::PurchasedBetween(lo, hi) => format!(
                "c.last_purchase BETWEEN {} AND {}",
                date_literal(*lo),
                date_literal(*hi)
            ),
            Pred::PurchasedWithin(n) => format!(
                "c.last_purchase BETWEEN a.first_exposure AND a.first_exposure + INTERVAL '{n} days'"
            ),
        }
    }

    /// SQL's three-valued logic: None is unknown.
    fn eval(&self, c: &Row, a: &Row) -> Option<bool> {
        match self {
            Pred::Eq(d, v) => d.of(c, a).map(|x| x == *v),
            Pred::Ne(d, v) => d.of(c, a).map(|x| x != *v),
            Pred::In(d, vs) => d.of(c, a).map(|x| vs.contains(&x.as_str())),
            Pred::Between(d, lo, hi) => d.of(c, a).map(|x| *lo <= x.as_str() && x.as_str() <= *hi),
            Pred::ValueAbove(v) => c.ltv.map(|x| x > *v),
            Pred::PurchasedBetween(lo, hi) => c.last_purchase.map(|d| *lo <= d && d <= *hi),
            Pred::PurchasedWithin(n) => match (c.last_purchase, a.first_exposure) {
                (Some(p), Some(f)) => Some(f <= p && p <= f + n),
                _ => None,
            },
            Pred::IsNull(d) => Some(d.of(c, a).is_none()),
            Pred::Not(p) => p.eval(c, a).map(|b| !b),
            Pred::And(p, q) => match (p.eval(c, a), q.eval(c, a)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Pred::Or(p, q) => match (p.eval(c, a), q.eval(c, a)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    Ltv,
    Exposures,
    Spend,
}

impl Metric {
    fn sql(self) -> &'static str {
        match self {
            Metric::Ltv => "c.lifetime_value",
            Metric::Exposures => "a.ad_exposures",
            Metric::Spend => "a.spend",
        }
    }
    fn of(self, c: &Row, a: &Row) -> Option<f64> {
        match self {
            Metric::Ltv => c.ltv,
            Metric::Exposures => a.exposures.map(|v| v as f64),
            Metric::Spend => a.spend,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Agg {
    CountStar,
    People,
    Count(Metric),
    Sum(Metric),
    Avg(Metric),
    /// `AVG(CASE WHEN c.lifetime_value > 2500 THEN 1 ELSE 0 END)`.
    ShareAbove,
}

impl Agg {
    fn sql(self) -> String {
        match self {
            Agg::CountStar => "COUNT(*)".into(),
            Agg::People => "COUNT(DISTINCT c.email)".into(),
            Agg::Count(m) => format!("COUNT({})", m.sql()),
            Agg::Sum(m) => format!("SUM({})", m.sql()),
            Agg::Avg(m) => format!("AVG({})", m.sql()),
            Agg::ShareAbove => "AVG(CASE WHEN c.lifetime_value > 2500 THEN 1 ELSE 0 END)".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Join {
    Email,
    Phone,
    Both,
    /// `customers c LEFT JOIN audience a ON c.email = a.email`: every
    /// customer, matched or not.
    LeftEmail,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Having {
    CountAtLeast(i64),
    /// `1 / (COUNT(*) - k) >= 0`: fails where a released group has k rows.
    DivideBy(i64),
    SumAbove(Metric, f64),
}

/// A generated query: either one of the product's shapes, or a construct
/// the checker must refuse with `rule`.
#[derive(Debug, Clone)]
pub struct Query {
    join: Join,
    filter: Option<Pred>,
    group: Vec<Dim>,
    aggs: Vec<Agg>,
    having: Option<Having>,
    limit: Option<usize>,
    refused: Option<(&'static str, String)>,
}

fn pred(rng: &mut StdRng, depth: u32) -> Pred {
    let dims = [Dim::Region, Dim::Age, Dim::Segment];
    let d = dims[rng.random_range(0..3)];
    let v = |rng: &mut StdRng| d.values()[rng.random_range(0..d.values().len())];
    let day = |rng: &mut StdRng| people::MARCH_2026 - rng.random_range(0..365);
    match rng.random_range(0..if depth == 0 { 8 } else { 11 }) {
        0 => Pred::Eq(d, v(rng)),
        1 => Pred::Ne(d, v(rng)),
        2 => Pred::In(d, (0..rng.random_range(1..4)).map(|_| v(rng)).collect()),
        3 => {
            let (x, y) = (v(rng), v(rng));
            Pred::Between(d, x.min(y), x.max(y))
        }
        4 => Pred::IsNull(d),
        5 => Pred::ValueAbove(f64::from(rng.random_range(0..5_000u32))),
        6 => {
            let (x, y) = (day(rng), day(rng));
            Pred::PurchasedBetween(x.min(y), x.max(y))
        }
        7 => Pred::PurchasedWithin(rng.random_range(0..30)),
        8 => Pred::Not(Box::new(pred(rng, depth - 1))),
        9 => Pred::And(
            Box::new(pred(rng, depth - 1)),
            Box::new(pred(rng, depth - 1)),
        ),
        _ => Pred::Or(
            Box::new(pred(rng, depth - 1)),
            Box::new(pred(rng, depth - 1)),
        ),
    }
}

/// Constructs the checker must refuse, whatever the data: (rule, SQL).
const REFUSED: [(&str, &str); 21] = [
    (
        "query.cast",
        "SELECT SUM(CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email",
    ),
    (
        "query.cast",
        "SELECT c.region, SUM(CAST(a.spend AS INT)) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region",
    ),
    (
        "query.cast",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 3",
    ),
    (
        "query.cast",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE CAST(a.interest_segment AS BIGINT) > 2",
    ),
    (
        "query.cast",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON CAST(c.phone AS VARCHAR) = CAST(a.phone AS VARCHAR)",
    ),
    (
        "query.cast",
        "SELECT AVG(TRY_CAST(a.ad_exposures AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email",
    ),
    (
        "query.expression",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'north' AND 7 / 0 = 1",
    ),
    (
        "query.expression",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE (2 << 65) > 1",
    ),
    (
        "query.aggregate_argument",
        "SELECT SUM(a.ad_exposures * 9223372036854775807) FROM customers c JOIN audience a ON c.email = a.email",
    ),
    (
        "query.aggregate_argument",
        "SELECT SUM(a.spend / 0) FROM customers c JOIN audience a ON c.email = a.email",
    ),
    (
        "query.filter",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE a.spend > 100",
    ),
    (
        "query.group_by",
        "SELECT a.spend, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.spend",
    ),
    (
        "query.join",
        "SELECT COUNT(*) FROM audience a LEFT JOIN customers c ON a.email = c.email",
    ),
    (
        "query.group_by",
        "SELECT CASE WHEN c.phone IS NULL THEN 'x' ELSE 'y' END, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY 1",
    ),
    (
        "query.filter",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.phone = a.phone",
    ),
    (
        "query.expression",
        "SELECT CASE WHEN c.region = 'north' THEN a.interest_segment ELSE 'x' END, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY 1",
    ),
    (
        "query.compare",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.lifetime_value > a.ad_exposures",
    ),
    (
        "query.expression",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.last_purchase + INTERVAL '60 years' > a.first_exposure",
    ),
    (
        "query.expression",
        "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email WHERE c.lead_score / c.purchases > 1",
    ),
    (
        "query.functions",
        "SELECT date_trunc('fortnight', c.last_purchase), COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY 1",
    ),
    (
        "query.aggregate",
        "SELECT c.lifetime_value FROM customers c JOIN audience a ON c.email = a.email",
    ),
];

pub fn query(rng: &mut StdRng) -> Query {
    let mut q = Query {
        join: [
            Join::Email,
            Join::Email,
            Join::Phone,
            Join::Both,
            Join::LeftEmail,
        ][rng.random_range(0..5)],
        filter: rng.random_bool(0.5).then(|| pred(rng, 2)),
        group: Vec::new(),
        aggs: Vec::new(),
        having: None,
        limit: None,
        refused: None,
    };
    if rng.random_bool(0.12) {
        let (rule, sql) = REFUSED[rng.random_range(0..REFUSED.len())];
        q.refused = Some((rule, sql.to_string()));
        return q;
    }
    for d in [Dim::Region, Dim::Age, Dim::Segment] {
        if rng.random_bool(0.4) {
            q.group.push(d);
        }
    }
    // At most one derived dimension, so groups stay large enough to show.
    if rng.random_bool(0.4) {
        let derived = [
            Dim::ValueBucket,
            Dim::Exposed,
            Dim::PurchaseMonth,
            Dim::SegmentOrNone,
        ];
        q.group.push(derived[rng.random_range(0..derived.len())]);
    }
    let metrics = [Metric::Ltv, Metric::Exposures, Metric::Spend];
    for _ in 0..rng.random_range(1..4) {
        let m = metrics[rng.random_range(0..3)];
        let agg = match rng.random_range(0..6) {
            0 => Agg::CountStar,
            1 => Agg::People,
            2 => Agg::Count(m),
            3 => Agg::Sum(m),
            4 => Agg::ShareAbove,
            _ => Agg::Avg(m),
        };
        // The SQL planner wants distinct names in the SELECT list.
        if !q.aggs.contains(&agg) {
            q.aggs.push(agg);
        }
    }
    q.having = match rng.random_range(0..6) {
        0 => Some(Having::CountAtLeast(rng.random_range(1..40))),
        1 => Some(Having::DivideBy(rng.random_range(1..12))),
        2 => Some(Having::SumAbove(
            metrics[rng.random_range(0..3)],
            f64::from(rng.random_range(0..50_000u32)),
        )),
        _ => None,
    };
    // With a LIMIT the engine may stop before it reaches the group a
    // division fails on; the reference does not model that.
    // Numbers the product sorts as numbers, the reference as text.
    if rng.random_bool(0.3)
        && !matches!(q.having, Some(Having::DivideBy(_)))
        && q.group.iter().all(|d| d.sorts_as_text())
    {
        q.limit = Some(rng.random_range(0..4));
    }
    q
}

impl Query {
    pub fn sql(&self) -> String {
        if let Some((_, sql)) = &self.refused {
            return sql.clone();
        }
        let mut select: Vec<String> = self.group.iter().map(|d| d.sql().to_string()).collect();
        select.extend(self.aggs.iter().map(|a| a.sql()));
        let (join, on) = match self.join {
            Join::Email => ("JOIN", "c.email = a.email"),
            Join::Phone => ("JOIN", "c.phone = a.phone"),
            Join::Both => ("JOIN", "c.email = a.email AND c.phone = a.phone"),
            Join::LeftEmail => ("LEFT JOIN", "c.email = a.email"),
        };
        let mut sql = format!(
            "SELECT {} FROM customers c {join} audience a ON {on}",
            select.join(", ")
        );
        if let Some(p) = &self.filter {
            sql += &format!(" WHERE {}", p.sql());
        }
        if !self.group.is_empty() {
            let g: Vec<&str> = self.group.iter().map(|d| d.sql()).collect();
            sql += &format!(" GROUP BY {}", g.join(", "));
        }
        match self.having {
            Some(Having::CountAtLeast(k)) => sql += &format!(" HAVING COUNT(*) >= {k}"),
            Some(Having::DivideBy(k)) => sql += &format!(" HAVING 1 / (COUNT(*) - {k}) >= 0"),
            Some(Having::SumAbove(m, v)) => sql += &format!(" HAVING SUM({}) > {v:.1}", m.sql()),
            None => {}
        }
        if let Some(n) = self.limit {
            if !self.group.is_empty() {
                let g: Vec<String> = self
                    .group
                    .iter()
                    .map(|d| format!("{} NULLS FIRST", d.sql()))
                    .collect();
                sql += &format!(" ORDER BY {}", g.join(", "));
            }
            sql += &format!(" LIMIT {n}");
        }
        sql
    }
}

/// One output row: group values, then aggregate values (None is NULL).
type OutRow = (Vec<Option<String>>, Vec<Option<f64>>);

/// What the reference expects: rows, or an error above the boundary.
#[derive(Debug)]
enum Expected {
    Rows(Vec<OutRow>),
    OutputError,
}

#[derive(Default)]
struct Group {
    rows: i64,
    people: BTreeSet<u64>,
    emails: BTreeSet<u64>,
    values: Vec<Vec<f64>>,
    /// Values of the metric HAVING sums, if any.
    having: Vec<f64>,
    /// Who stands behind each atom of the group, by the truth of each of
    /// [`conditions`] on its rows.
    atoms: BTreeMap<Vec<bool>, Behind>,
}

/// The people behind one atom of a group, as docs/queries.md defines them.
#[derive(Default, Clone)]
struct Behind {
    /// acme's people with rows in the atom.
    caller: BTreeSet<u64>,
    /// globex's people with rows in the atom.
    partner: BTreeSet<u64>,
    /// globex's people matched to customers whose rows would fall in the
    /// atom were they unmatched (LEFT JOIN only).
    partner_if_unmatched: BTreeSet<u64>,
    /// acme's people of those customers.
    caller_if_unmatched: BTreeSet<u64>,
}

/// A condition an aggregate reads: which of a group's rows it adds up.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Condition {
    /// The metric is not NULL (COUNT, SUM, AVG of it).
    Present(Metric),
    /// `c.lifetime_value > 2500` holds (the share's CASE).
    Above,
}

impl Condition {
    fn holds(self, c: &Row, a: &Row) -> bool {
        match self {
            Condition::Present(m) => m.of(c, a).is_some(),
            Condition::Above => c.ltv.is_some_and(|v| v > 2500.0),
        }
    }
}

/// The conditions of `q`'s aggregates; their atoms are the cells every
/// one of which must stand for enough people.
fn conditions(q: &Query) -> Vec<Condition> {
    let mut out = Vec::new();
    let mut add = |c: Condition| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for agg in &q.aggs {
        match agg {
            Agg::CountStar | Agg::People => {}
            Agg::Count(m) | Agg::Sum(m) | Agg::Avg(m) => add(Condition::Present(*m)),
            Agg::ShareAbove => add(Condition::Above),
        }
    }
    // HAVING's sum is aggregated beneath the boundary like any other.
    if let Some(Having::SumAbove(m, _)) = q.having {
        add(Condition::Present(m));
    }
    out
}

/// The groups of `q` over `d`, each without the rows of its cells that
/// stand for fewer than `min` people of either party (0: every row).
fn groups(q: &Query, d: &Data, min: usize) -> BTreeMap<Vec<Option<String>>, Group> {
    let mut groups: BTreeMap<Vec<Option<String>>, Group> = BTreeMap::new();
    if q.group.is_empty() {
        groups.insert(Vec::new(), Group::default());
    }
    // The audience side of a customer no audience row matches: all NULL.
    let unmatched = Row {
        id: u64::MAX,
        phone: false,
        region: None,
        age_band: None,
        segment: None,
        ltv: None,
        exposures: None,
        spend: None,
        purchases: None,
        last_purchase: None,
        lead_score: None,
        first_exposure: None,
    };
    let conditions = conditions(q);
    let atom =
        |c: &Row, a: &Row| -> Vec<bool> { conditions.iter().map(|k| k.holds(c, a)).collect() };
    let passes = |c: &Row, a: &Row| q.filter.as_ref().is_none_or(|p| p.eval(c, a) == Some(true));
    let key_of =
        |c: &Row, a: &Row| -> Vec<Option<String>> { q.group.iter().map(|g| g.of(c, a)).collect() };
    // Every joined row that passes WHERE, the unmatched side as `unmatched`.
    let mut joined: Vec<(&Row, &Row)> = Vec::new();
    for c in &d.customers {
        let matched = d.audience.iter().any(|a| a.id == c.id);
        let unmatched_row = (q.join == Join::LeftEmail && !matched).then_some(&unmatched);
        // A matched customer would fall where its unmatched row would:
        // globex's person counts there too.
        if q.join == Join::LeftEmail && matched && passes(c, &unmatched) {
            let g = groups.entry(key_of(c, &unmatched)).or_default();
            g.atoms
                .entry(atom(c, &unmatched))
                .or_default()
                .partner_if_unmatched
                .insert(c.id);
            g.atoms
                .entry(atom(c, &unmatched))
                .or_default()
                .caller_if_unmatched
                .insert(c.id);
        }
        for a in d.audience.iter().chain(unmatched_row) {
            let on = match q.join {
                Join::Email | Join::LeftEmail => c.id == a.id || std::ptr::eq(a, &unmatched),
                Join::Phone => c.phone && a.phone && c.id == a.id,
                Join::Both => c.id == a.id && c.phone && a.phone,
            };
            if on && passes(c, a) {
                joined.push((c, a));
            }
        }
    }
    for &(c, a) in &joined {
        let behind = groups
            .entry(key_of(c, a))
            .or_default()
            .atoms
            .entry(atom(c, a))
            .or_default();
        behind.caller.insert(c.id);
        if !std::ptr::eq(a, &unmatched) {
            behind.partner.insert(a.id);
        }
    }
    // Under a LEFT JOIN, first which atoms keep their matched rows, acme's
    // people counted on the customers that would fall in the atom were they
    // unmatched as well; a matched row of an atom left out is held as
    // unmatched. Then the held rows' own people decide each atom.
    let left = q.join == Join::LeftEmail;
    let partner_enough = |b: &Behind| b.partner.len() >= min || b.partner_if_unmatched.len() >= min;
    let held: Vec<(&Row, &Row)> = joined
        .iter()
        .filter_map(|&(c, a)| {
            let b = &groups[&key_of(c, a)].atoms[&atom(c, a)];
            let wide = b.caller.union(&b.caller_if_unmatched).count();
            let matched = !std::ptr::eq(a, &unmatched);
            if wide >= min && partner_enough(b) {
                Some((c, a))
            } else if left && matched {
                passes(c, &unmatched).then_some((c, &unmatched))
            } else {
                left.then_some((c, a))
            }
        })
        .collect();
    let mut second: BTreeMap<(Vec<Option<String>>, Vec<bool>), Behind> = BTreeMap::new();
    for &(c, a) in &held {
        let b = second.entry((key_of(c, a), atom(c, a))).or_default();
        b.caller.insert(c.id);
        if !std::ptr::eq(a, &unmatched) {
            b.partner.insert(a.id);
        }
    }
    for &(c, a) in &held {
        let b = &second[&(key_of(c, a), atom(c, a))];
        let if_unmatched = groups[&key_of(c, a)]
            .atoms
            .get(&atom(c, a))
            .map_or(0, |b| b.partner_if_unmatched.len());
        if b.caller.len() < min || (b.partner.len() < min && if_unmatched < min) {
            continue;
        }
        let g = groups.get_mut(&key_of(c, a)).expect("grouped above");
        g.rows += 1;
        g.people.insert(c.id);
        g.emails.insert(c.id);
        if g.values.is_empty() {
            g.values = vec![Vec::new(); q.aggs.len()];
        }
        for (i, agg) in q.aggs.iter().enumerate() {
            let m = match agg {
                Agg::Count(m) | Agg::Sum(m) | Agg::Avg(m) => m.of(c, a),
                Agg::ShareAbove => Some(if c.ltv.is_some_and(|v| v > 2500.0) {
                    1.0
                } else {
                    0.0
                }),
                _ => None,
            };
            if let Some(v) = m {
                g.values[i].push(v);
            }
        }
        if let Some(Having::SumAbove(m, _)) = q.having
            && let Some(v) = m.of(c, a)
        {
            g.having.push(v);
        }
    }
    groups
}

fn reference(q: &Query, d: &Data, min: u32) -> Expected {
    let groups = groups(q, d, min as usize);
    let mut out = Vec::new();
    for (key, g) in &groups {
        // The release boundary: a group left with a row of a cell of
        // enough people.
        if g.rows == 0 {
            continue;
        }
        let values: Vec<Option<f64>> = q
            .aggs
            .iter()
            .enumerate()
            .map(|(i, agg)| {
                let vs = g.values.get(i).cloned().unwrap_or_default();
                match agg {
                    Agg::CountStar => Some(g.rows as f64),
                    Agg::People => Some(g.emails.len() as f64),
                    Agg::Count(_) => Some(vs.len() as f64),
                    Agg::ShareAbove => {
                        (!vs.is_empty()).then(|| vs.iter().sum::<f64>() / vs.len() as f64)
                    }
                    Agg::Sum(_) => (!vs.is_empty()).then(|| vs.iter().sum()),
                    Agg::Avg(_) => {
                        (!vs.is_empty()).then(|| vs.iter().sum::<f64>() / vs.len() as f64)
                    }
                }
            })
            .collect();
        let keep = match q.having {
            None => true,
            Some(Having::CountAtLeast(k)) => g.rows >= k,
            Some(Having::DivideBy(k)) => {
                if g.rows == k {
                    return Expected::OutputError;
                }
                1 / (g.rows - k) >= 0
            }
            Some(Having::SumAbove(_, v)) => {
                !g.having.is_empty() && g.having.iter().sum::<f64>() > v
            }
        };
        if keep {
            out.push((key.clone(), values));
        }
    }
    // BTreeMap order is the ORDER BY of the group columns, NULLS FIRST.
    if let Some(n) = q.limit {
        out.truncate(n);
    }
    Expected::Rows(out)
}

fn product_rows(batches: &[RecordBatch], groups: usize) -> Vec<OutRow> {
    let mut out = Vec::new();
    for b in batches {
        let strings: Vec<_> = (0..groups)
            .map(|i| arrow::compute::cast(b.column(i), &DataType::Utf8).unwrap())
            .collect();
        let numbers: Vec<_> = (groups..b.num_columns())
            .map(|i| arrow::compute::cast(b.column(i), &DataType::Float64).unwrap())
            .collect();
        for r in 0..b.num_rows() {
            let key = strings
                .iter()
                .map(|s| (!s.is_null(r)).then(|| s.as_string::<i32>().value(r).to_string()))
                .collect();
            let values = numbers
                .iter()
                .map(|n| (!n.is_null(r)).then(|| n.as_primitive::<Float64Type>().value(r)))
                .collect();
            out.push((key, values));
        }
    }
    out
}

fn close(a: &OutRow, b: &OutRow) -> bool {
    a.0 == b.0
        && a.1.len() == b.1.len()
        && a.1.iter().zip(&b.1).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0),
            (None, None) => true,
            _ => false,
        })
}

/// Counts of what a run of the suite saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub queries: u64,
    pub accepted: u64,
    pub refused: u64,
    pub output_errors: u64,
    pub rows_compared: u64,
    pub groups_held_back: u64,
}

impl Tally {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &Tally) {
        self.queries += other.queries;
        self.accepted += other.accepted;
        self.refused += other.refused;
        self.output_errors += other.output_errors;
        self.rows_compared += other.rows_compared;
        self.groups_held_back += other.groups_held_back;
    }
}

/// What one suite checks of one outcome on one data set.
type Check =
    fn(&Query, &Data, &Result<QueryOutcome, QueryError>, &Policy, &mut Tally) -> Result<(), String>;

/// Runs `n` random queries from `seed` on two unrelated data sets, checks
/// each outcome with `check` and that refusals are the same on both; the
/// first failure as text, with its seed and query.
async fn drive(policy: &Policy, seed: u64, n: u64, check: Check) -> Result<Tally, String> {
    let first = data(policy, seed, 400);
    let second = data(policy, seed ^ 0x9e37_79b9_7f4a_7c15, 400);
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    let mut tally = Tally::default();
    for i in 0..n {
        let q = query(&mut rng);
        let sql = q.sql();
        let fail = |what: String| format!("seed {seed}, query {i}: {sql}\n{what}");
        tally.queries += 1;
        let mut refusals = Vec::new();
        for d in [&first, &second] {
            let outcome = run(policy, "acme", &d.tables, &sql).await;
            refusals.push(match &outcome {
                Err(QueryError::Refused(v)) => Some(v.to_string()),
                _ => None,
            });
            check(&q, d, &outcome, policy, &mut tally).map_err(fail)?;
        }
        if refusals[0] != refusals[1] {
            return Err(fail(format!(
                "refusal depends on the data: {:?} vs {:?}",
                refusals[0], refusals[1]
            )));
        }
        if refusals[0].is_some() {
            tally.refused += 1;
        } else {
            tally.accepted += 1;
        }
    }
    tally.groups_held_back = held_back(policy, &first);
    Ok(tally)
}

/// Thresholds only: every accepted answer equals the reference with small
/// groups removed; errors only where the reference predicts them; the
/// refused constructs by their rule, and nothing else refused.
pub async fn suite(policy: &Policy, seed: u64, n: u64) -> Result<Tally, String> {
    drive(policy, seed, n, check_exact).await
}

fn check_exact(
    q: &Query,
    d: &Data,
    outcome: &Result<QueryOutcome, QueryError>,
    policy: &Policy,
    tally: &mut Tally,
) -> Result<(), String> {
    if let Some((rule, _)) = &q.refused {
        return match outcome {
            Err(QueryError::Refused(v)) if v.rule == *rule => Ok(()),
            other => Err(format!(
                "expected rule {rule}, got {:?}",
                other.as_ref().map(|o| o.rows()).map_err(|e| e.to_string())
            )),
        };
    }
    match (outcome, reference(q, d, policy.query().min_group_size())) {
        (Err(QueryError::Output), Expected::OutputError) => {
            tally.output_errors += 1;
            Ok(())
        }
        (Ok(o), Expected::Rows(rows)) => {
            let got = product_rows(&o.batches, q.group.len());
            let mut got_sorted = got.clone();
            got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = rows.clone();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            if got_sorted.len() != want.len()
                || !got_sorted.iter().zip(&want).all(|(a, b)| close(a, b))
            {
                return Err(format!("product {got:?}\nreference {rows:?}"));
            }
            tally.rows_compared += got.len() as u64;
            Ok(())
        }
        (other, expected) => Err(format!(
            "product {:?}, reference {expected:?}",
            other.as_ref().map(|o| o.rows()).map_err(|e| e.to_string())
        )),
    }
}

/// Under differential privacy: every released row is a group of at least
/// the minimum of people in the exact data (values are noisy, so they are
/// not compared), and refusals do not depend on the data.
pub async fn suite_private(policy: &Policy, seed: u64, n: u64) -> Result<Tally, String> {
    drive(policy, seed, n, check_private).await
}

fn check_private(
    q: &Query,
    d: &Data,
    outcome: &Result<QueryOutcome, QueryError>,
    policy: &Policy,
    tally: &mut Tally,
) -> Result<(), String> {
    let min = policy.query().min_group_size() as usize;
    match outcome {
        Ok(o) => {
            let exact = groups(q, d, 0);
            for (key, _) in product_rows(&o.batches, q.group.len()) {
                let people = exact
                    .iter()
                    .find(|(k, _)| **k == key)
                    .map_or(0, |(_, g)| g.people.len());
                if people < min {
                    return Err(format!("released group {key:?} stands for {people} people"));
                }
                tally.rows_compared += 1;
            }
            Ok(())
        }
        Err(QueryError::Output) => {
            tally.output_errors += 1;
            Ok(())
        }
        Err(QueryError::Refused(_)) => Ok(()),
        Err(e @ (QueryError::Engine(_) | QueryError::Limit { .. })) => Err(format!("failed: {e}")),
    }
}

/// A group of the finest grouping: region, age band, segment.
type FinestKey = (
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

/// Groups of the finest grouping that the minimum holds back in `d`: the
/// suite's data must have some, or it tests nothing.
fn held_back(policy: &Policy, d: &Data) -> u64 {
    let mut people: BTreeMap<FinestKey, BTreeSet<u64>> = BTreeMap::new();
    for c in &d.customers {
        for a in d.audience.iter().filter(|a| a.id == c.id) {
            people
                .entry((c.region, c.age_band, a.segment))
                .or_default()
                .insert(c.id);
        }
    }
    let min = policy.query().min_group_size() as usize;
    people.values().filter(|p| p.len() < min).count() as u64
}

/// Counts of what the neighbouring-datasets suite saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct Neighbours {
    pub cases: u64,
    pub refused: u64,
    /// The victim's every cell under the minimum: answers compared.
    pub hidden: u64,
    /// ... of which the victim was in the joined rows at all.
    pub hidden_present: u64,
    /// The victim in a cell of enough people: a difference is allowed.
    pub in_large_cell: u64,
    /// Under privacy: answers with a count or sum compared.
    pub compared: u64,
}

impl Neighbours {
    pub fn add(&mut self, o: &Neighbours) {
        self.cases += o.cases;
        self.refused += o.refused;
        self.hidden += o.hidden;
        self.hidden_present += o.hidden_present;
        self.in_large_cell += o.in_large_cell;
        self.compared += o.compared;
    }
}

/// Generated data with what a crafting partner adds: padding (customers
/// globex never holds, in one region), and the victim's customer with
/// values no one else has; and the victim, a globex person, with or
/// without. Returns the data without and with the victim, and the victim.
fn neighbouring(policy: &Policy, seed: u64) -> (Data, Data, u64) {
    let base = data(policy, seed, 300);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5bd1_e995);
    let victim_id = 20_000;
    let mut customers = base.customers.clone();
    for id in 10_000..10_000 + rng.random_range(0..120u64) {
        customers.push(Row {
            region: Some("south"),
            ..Row::new(id)
        });
    }
    customers.push(Row {
        id: victim_id,
        phone: false,
        region: Some(REGIONS[rng.random_range(0..4)]),
        age_band: Some(AGES[rng.random_range(0..6)]),
        ltv: Some(4_321.5),
        lead_score: Some(rng.random_range(0..=100)),
        ..Row::new(victim_id)
    });
    let victim = Row {
        id: victim_id,
        phone: true,
        region: None,
        age_band: None,
        segment: Some(SEGMENTS[rng.random_range(0..6)]),
        ltv: None,
        exposures: Some(rng.random_range(0..=100)),
        spend: Some(f64::from(rng.random_range(0..4_000u32)) / 2.0),
        purchases: None,
        last_purchase: None,
        lead_score: None,
        first_exposure: Some(people::MARCH_2026 - rng.random_range(0..180)),
    };
    let without = Data {
        tables: tables(policy, &customers, &base.audience),
        customers: customers.clone(),
        audience: base.audience.clone(),
    };
    let mut audience = base.audience;
    audience.push(victim);
    let with = Data {
        tables: tables(policy, &customers, &audience),
        customers,
        audience,
    };
    (without, with, victim_id)
}

/// Whether `victim` is, in `d`, only in cells under `min` people of
/// globex (as a row of its own, or as a customer it keeps from being
/// unmatched), and whether it is in the joined rows at all.
fn victim_hidden(q: &Query, d: &Data, victim: u64, min: usize) -> (bool, bool) {
    let mut present = false;
    for g in groups(q, d, min).values() {
        for b in g.atoms.values() {
            let real = b.partner.contains(&victim);
            let phantom = b.partner_if_unmatched.contains(&victim);
            present |= real || phantom;
            if (real || phantom) && (b.partner.len() >= min || b.partner_if_unmatched.len() >= min)
            {
                return (false, true);
            }
        }
    }
    (true, present)
}

/// The neighbouring-datasets suite under thresholds: `n` random queries,
/// each on generated data with crafted rows, with and without one victim
/// of globex's. Where the victim's every cell is under the minimum, acme
/// must see the same answer (rows compared by value) or the same refusal.
pub async fn neighbours(policy: &Policy, seed: u64, n: u64) -> Result<Neighbours, String> {
    let min = policy.query().min_group_size() as usize;
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(7));
    let mut tally = Neighbours::default();
    let mut sets = None;
    for i in 0..n {
        // New data every 25 queries.
        if i % 25 == 0 {
            sets = Some(neighbouring(policy, seed.wrapping_add(i)));
        }
        let (without, with, victim) = sets.as_ref().expect("made above");
        let q = query(&mut rng);
        let sql = q.sql();
        let fail = |what: String| format!("seed {seed}, case {i}: {sql}\n{what}");
        tally.cases += 1;
        let a = run(policy, "acme", &with.tables, &sql).await;
        let b = run(policy, "acme", &without.tables, &sql).await;
        match (&a, &b) {
            (Err(QueryError::Refused(x)), Err(QueryError::Refused(y))) => {
                if x.to_string() != y.to_string() {
                    return Err(fail(format!("refusals differ: {x} / {y}")));
                }
                tally.refused += 1;
                continue;
            }
            (Err(QueryError::Refused(x)), _) | (_, Err(QueryError::Refused(x))) => {
                return Err(fail(format!("refused on one side only: {x}")));
            }
            _ => {}
        }
        let (hidden, present) = victim_hidden(&q, with, *victim, min);
        if !hidden {
            tally.in_large_cell += 1;
            continue;
        }
        tally.hidden += 1;
        tally.hidden_present += u64::from(present);
        let shown = |o: &Result<QueryOutcome, QueryError>| match o {
            Ok(o) => Ok(product_rows(&o.batches, q.group.len())),
            Err(e) => Err(e.to_string()),
        };
        let same = match (shown(&a), shown(&b)) {
            (Ok(x), Ok(y)) => x.len() == y.len() && x.iter().zip(&y).all(|(r, s)| close(r, s)),
            (Err(x), Err(y)) => x == y,
            _ => false,
        };
        if !same {
            return Err(fail(format!(
                "the victim's cells were all under the minimum, yet the answers differ:\nwith    {:?}\nwithout {:?}",
                shown(&a),
                shown(&b)
            )));
        }
    }
    Ok(tally)
}

/// The most one bounding unit adds to one group's value of `agg` under
/// `policy` (None: not checked here, as an average's change depends on
/// the group's size).
fn sensitivity(agg: Agg, policy: &Policy) -> Option<f64> {
    let privacy = policy.privacy()?;
    let bound = |dataset: &str, column: &str| {
        policy
            .dataset(dataset)?
            .columns()
            .iter()
            .find(|c| c.name() == column)
            .and_then(|c| match c.role() {
                cleanroom::policy::ColumnRole::Metric { min, max, .. } => {
                    Some(min.abs().max(max.abs()))
                }
                _ => None,
            })
    };
    match agg {
        Agg::CountStar | Agg::Count(_) => Some(f64::from(privacy.max_rows_per_person())),
        Agg::People => Some(1.0),
        Agg::Sum(Metric::Ltv) => bound("customers", "lifetime_value"),
        Agg::Sum(Metric::Exposures) => bound("audience", "ad_exposures"),
        Agg::Sum(Metric::Spend) => bound("audience", "spend"),
        Agg::Avg(_) | Agg::ShareAbove => None,
    }
}

/// The neighbouring-datasets suite under differential privacy with noise
/// made negligible (a huge epsilon, so the released values are the
/// bounded aggregates): for every group released with and without the
/// victim, each count and sum moves by at most what the bounding units the
/// victim touches may add (the victim; under a LEFT JOIN also the
/// customer it keeps from being unmatched), and by at most
/// `max_groups_per_person` times that over all groups.
pub async fn neighbours_private(policy: &Policy, seed: u64, n: u64) -> Result<Neighbours, String> {
    let privacy = policy.privacy().ok_or("a policy with a privacy section")?;
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(11));
    let mut tally = Neighbours::default();
    let mut sets = None;
    for i in 0..n {
        if i % 25 == 0 {
            let (mut without, mut with, victim) = neighbouring(policy, seed.wrapping_add(i));
            // Two of acme's rows carry other customers' emails and the
            // victim's phone: with the victim they join its email to its
            // phone, and so link acme's people through globex's victim.
            let bridges = [(3, victim), (5, victim)];
            // And the victim holds two more rows, each with the email of
            // another of acme's customers and the victim's own phone: one
            // globex person whose rows match three of acme's people under
            // a LEFT JOIN on email.
            for id in MORE_EMAILS {
                let customer = Row {
                    phone: false,
                    region: Some("east"),
                    ..Row::new(id)
                };
                without.customers.push(customer.clone());
                with.customers.push(customer);
            }
            let victims_rows = MORE_EMAILS.map(|id| (id, victim));
            sets = Some((
                Data {
                    tables: bridged(policy, &without, &bridges, &[]),
                    ..without
                },
                Data {
                    tables: bridged(policy, &with, &bridges, &victims_rows),
                    ..with
                },
                victim,
            ));
        }
        let (without, with, _) = sets.as_ref().expect("made above");
        let (without, with) = (&without.tables, &with.tables);
        let q = query(&mut rng);
        let sql = q.sql();
        let fail = |what: String| format!("seed {seed}, case {i}: {sql}\n{what}");
        tally.cases += 1;
        let a = run(policy, "acme", with, &sql).await;
        let b = run(policy, "acme", without, &sql).await;
        let (a, b) = match (a, b) {
            (Err(QueryError::Refused(x)), Err(QueryError::Refused(y))) => {
                if x.to_string() != y.to_string() {
                    return Err(fail(format!("refusals differ: {x} / {y}")));
                }
                tally.refused += 1;
                continue;
            }
            (Ok(a), Ok(b)) => (a, b),
            (Err(QueryError::Output), _) | (_, Err(QueryError::Output)) => continue,
            (a, b) => {
                return Err(fail(format!(
                    "outcomes differ in kind: {:?} / {:?}",
                    a.err(),
                    b.err()
                )));
            }
        };
        let units = if q.join == Join::LeftEmail { 2.0 } else { 1.0 };
        let rows_a = product_rows(&a.batches, q.group.len());
        let rows_b = product_rows(&b.batches, q.group.len());
        let mut moved = vec![0.0f64; q.aggs.len()];
        let mut compared = false;
        for (key, va) in &rows_a {
            let Some((_, vb)) = rows_b.iter().find(|(k, _)| k == key) else {
                continue;
            };
            for (j, agg) in q.aggs.iter().enumerate() {
                let (Some(sens), Some(x), Some(y)) = (sensitivity(*agg, policy), va[j], vb[j])
                else {
                    continue;
                };
                compared = true;
                let d = (x - y).abs();
                // The negligible noise is still there: a thousandth of the
                // bound at this epsilon, on each side.
                let slack = 0.01 * sens;
                if d > units * sens + slack {
                    return Err(fail(format!(
                        "{} moved by {d} in group {key:?}, more than {units} unit(s) of {sens}",
                        agg.sql()
                    )));
                }
                moved[j] += d;
            }
        }
        for (j, agg) in q.aggs.iter().enumerate() {
            if let Some(sens) = sensitivity(*agg, policy) {
                let most = units * f64::from(privacy.max_groups_per_person()) * sens;
                if moved[j] > most * 1.01 {
                    return Err(fail(format!(
                        "{} moved by {} in all, more than {most}",
                        agg.sql(),
                        moved[j]
                    )));
                }
            }
        }
        if compared {
            tally.compared += 1;
        }
    }
    Ok(tally)
}

/// Acme customers whose emails the victim's further globex rows hold.
const MORE_EMAILS: [u64; 2] = [30_000, 30_001];

/// The tables of `d` with one more acme row per `(email_of, phone_of)` of
/// `bridges` and one more globex row per `(email_of, phone_of)` of
/// `partner_rows`: the email of the one person and the phone of the other.
fn bridged(
    policy: &Policy,
    d: &Data,
    bridges: &[(u64, u64)],
    partner_rows: &[(u64, u64)],
) -> Vec<TableData> {
    let mut rows = d.customers.clone();
    rows.extend(bridges.iter().map(|(e, _)| Row {
        phone: true,
        ..Row::new(*e)
    }));
    // Every row's own phone, but the bridges'.
    let phones: Vec<Option<u64>> = rows
        .iter()
        .enumerate()
        .map(|(r, row)| match r.checked_sub(d.customers.len()) {
            Some(b) => Some(bridges[b].1),
            None => row.phone.then_some(row.id),
        })
        .collect();
    let batch = people::with_phones(&people::customers(policy, &rows), &phones);
    let mut audience = d.audience.clone();
    audience.extend(partner_rows.iter().map(|(e, _)| {
        Row {
            phone: true,
            ..d.audience
                .last()
                .cloned()
                .map_or_else(|| Row::new(*e), |v| Row { id: *e, ..v })
        }
    }));
    let audience_phones: Vec<Option<u64>> = audience
        .iter()
        .enumerate()
        .map(|(r, row)| match r.checked_sub(d.audience.len()) {
            Some(b) => Some(partner_rows[b].1),
            None => row.phone.then_some(row.id),
        })
        .collect();
    let audience = people::with_phones(&people::audience(policy, &audience), &audience_phones);
    cleanroom::query::agreement_tables(policy, vec![vec![batch], vec![audience]])
}
