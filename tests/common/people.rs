//! Demo-agreement rows for people the test knows: every attribute is given,
//! fingerprints are BLAKE3 of the person's number and identity kind, so a
//! test can compute every answer on its own.

use std::sync::Arc;

use arrow::array::{Date32Array, FixedSizeBinaryBuilder, Float64Array, Int64Array, StringArray};
use arrow::record_batch::RecordBatch;
use cleanroom::policy::Policy;
use cleanroom::query::{TableData, agreement_tables};
use cleanroom::upload::upload_schema;

/// One row of one party's dataset, about person `id`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: u64,
    /// Whether the row carries the person's phone fingerprint too.
    pub phone: bool,
    pub region: Option<&'static str>,
    pub age_band: Option<&'static str>,
    pub segment: Option<&'static str>,
    pub ltv: Option<f64>,
    pub exposures: Option<i64>,
    pub spend: Option<f64>,
    pub purchases: Option<i64>,
    /// Days since 1970-01-01.
    pub last_purchase: Option<i32>,
    pub lead_score: Option<i64>,
    /// Days since 1970-01-01.
    pub first_exposure: Option<i32>,
}

/// 2026-03-01, days since 1970-01-01.
pub const MARCH_2026: i32 = 20_513;

impl Row {
    pub fn new(id: u64) -> Self {
        Row {
            id,
            phone: false,
            region: Some("north"),
            age_band: Some("25-34"),
            segment: Some("sports"),
            ltv: Some(100.0),
            exposures: Some(1),
            spend: Some(10.0),
            purchases: Some(1),
            last_purchase: Some(MARCH_2026),
            lead_score: Some(50),
            first_exposure: Some(MARCH_2026 - 7),
        }
    }
}

/// The fingerprint of person `id` for identity kind 0 (email) or 1 (phone).
pub fn fingerprint(id: u64, kind: u8) -> [u8; 32] {
    let mut input = [0u8; 9];
    input[..8].copy_from_slice(&id.to_le_bytes());
    input[8] = kind;
    *blake3::hash(&input).as_bytes()
}

fn identifiers(rows: &[Row]) -> (Arc<dyn arrow::array::Array>, Arc<dyn arrow::array::Array>) {
    let mut email = FixedSizeBinaryBuilder::new(32);
    let mut phone = FixedSizeBinaryBuilder::new(32);
    for r in rows {
        email.append_value(fingerprint(r.id, 0)).unwrap();
        if r.phone {
            phone.append_value(fingerprint(r.id, 1)).unwrap();
        } else {
            phone.append_null();
        }
    }
    (Arc::new(email.finish()), Arc::new(phone.finish()))
}

/// acme's `customers` rows, in the upload schema.
pub fn customers(policy: &Policy, rows: &[Row]) -> RecordBatch {
    let (email, phone) = identifiers(rows);
    RecordBatch::try_new(
        upload_schema(policy.dataset("customers").unwrap()),
        vec![
            email,
            phone,
            Arc::new(rows.iter().map(|r| r.age_band).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.region).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.ltv).collect::<Float64Array>()),
            Arc::new(rows.iter().map(|r| r.purchases).collect::<Int64Array>()),
            Arc::new(
                rows.iter()
                    .map(|r| r.last_purchase)
                    .collect::<Date32Array>(),
            ),
            Arc::new(rows.iter().map(|r| r.lead_score).collect::<Int64Array>()),
        ],
    )
    .unwrap()
}

/// globex's `audience` rows, in the upload schema.
pub fn audience(policy: &Policy, rows: &[Row]) -> RecordBatch {
    let (email, phone) = identifiers(rows);
    RecordBatch::try_new(
        upload_schema(policy.dataset("audience").unwrap()),
        vec![
            email,
            phone,
            Arc::new(rows.iter().map(|r| r.segment).collect::<StringArray>()),
            Arc::new(rows.iter().map(|r| r.exposures).collect::<Int64Array>()),
            Arc::new(
                rows.iter()
                    .map(|r| r.first_exposure)
                    .collect::<Date32Array>(),
            ),
            Arc::new(rows.iter().map(|r| r.spend).collect::<Float64Array>()),
        ],
    )
    .unwrap()
}

/// Both demo datasets as query tables, people matched as the server does.
pub fn tables(policy: &Policy, customer_rows: &[Row], audience_rows: &[Row]) -> Vec<TableData> {
    agreement_tables(
        policy,
        vec![
            vec![customers(policy, customer_rows)],
            vec![audience(policy, audience_rows)],
        ],
    )
}

/// The demo agreement with its `[privacy]` section replaced (None: removed,
/// thresholds only) and its minimum group size set.
pub fn demo_policy(privacy: Option<&str>, min_group_size: u32) -> Policy {
    let path = super::policies_dir().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let (head, _) = text.split_once("[privacy]").unwrap();
    let head = head.replace(
        "min_group_size = 50",
        &format!("min_group_size = {min_group_size}"),
    );
    let text = match privacy {
        None => head,
        Some(section) => format!("{head}[privacy]\n{section}\n"),
    };
    cleanroom::agreements::parse_policy(&text, &path).unwrap()
}

/// (year, month, day) of a day count since 1970-01-01, computed apart from
/// any date library the product uses.
pub fn civil(days: i32) -> (i64, u32, u32) {
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil`]).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i32 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) as i32
}

/// `batch` with its `phone` column replaced: the fingerprint of person
/// `phones[i]`'s phone on row `i` (None: no phone).
pub fn with_phones(batch: &RecordBatch, phones: &[Option<u64>]) -> RecordBatch {
    let mut builder = FixedSizeBinaryBuilder::new(32);
    for p in phones {
        match p {
            Some(id) => builder.append_value(fingerprint(*id, 1)).unwrap(),
            None => builder.append_null(),
        }
    }
    let i = batch.schema().index_of("phone").unwrap();
    let mut columns = batch.columns().to_vec();
    columns[i] = Arc::new(builder.finish());
    RecordBatch::try_new(batch.schema(), columns).unwrap()
}
