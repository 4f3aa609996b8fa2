//! Synthetic partners for the demo agreement: two CSV files, as a retailer
//! and a publisher would export them, with messy identifiers and a known
//! true overlap. The demo, the tests and the benchmarks share it.
//!
//! `acme-customers.csv`: customer_id, email, phone, age_band, region,
//! lifetime_value, purchases, last_purchase, lead_score, signup_date.
//! `globex-audience.csv`: user_id, email, phone, interest_segment,
//! ad_exposures, first_exposure, spend, health_interest. Columns the
//! agreement does not name (ids, the signup date, the sensitive attribute)
//! are there on purpose: the upload must leave them behind.
//!
//! The data is exported on [`AS_OF`]. About 60% of globex's audience saw
//! ads (a first exposure in the half year before); shared customers who
//! saw them are worth about 25% more to acme and buy more often, and half
//! of them made their last purchase within 14 days of their first
//! exposure, so the cookbook's lift and attribution questions have
//! answers. `truth-people.csv` pairs each acme customer that the upload
//! keeps with its globex user (if any), for checking results against.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The agreement whose parties this generator knows.
pub const DEMO_AGREEMENT: &str = "retail-media-demo";
pub const ACME_FILE: &str = "acme-customers.csv";
pub const GLOBEX_FILE: &str = "globex-audience.csv";
/// customer_id,user_id: every acme customer the upload keeps, with the
/// globex user who is the same person (empty if none).
pub const PEOPLE_FILE: &str = "truth-people.csv";
/// The day both exports were taken.
pub const AS_OF: &str = "2026-06-30";

#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Rows per party.
    pub rows: u64,
    /// Share of acme's customers that are also in globex's audience.
    pub overlap: f64,
    pub seed: u64,
    pub out: PathBuf,
}

/// What was generated, for checking results against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SynthTruth {
    pub acme_rows: u64,
    pub globex_rows: u64,
    /// People present in both files; each matches on email.
    pub overlap: u64,
    /// Rows whose only identifiers are invalid (dropped by the upload).
    pub acme_rows_without_valid_identifier: u64,
    pub globex_rows_without_valid_identifier: u64,
    /// Identifier values that do not normalise (counted by the upload).
    pub acme_invalid_identifiers: u64,
    pub globex_invalid_identifiers: u64,
}

const FIRST: &[&str] = &[
    "jane", "john", "maria", "wei", "amara", "lucas", "sofia", "omar", "emma", "liam", "yuki",
    "priya", "noah", "chloe", "mateo", "aisha",
];
const LAST: &[&str] = &[
    "saoirse", "smith", "garcia", "chen", "okafor", "silva", "rossi", "haddad", "muller", "brown",
    "tanaka", "patel", "jones", "martin", "lopez", "khan",
];
const DOMAINS: &[&str] = &[
    "gmail.com",
    "example.com",
    "mail.example.org",
    "googlemail.com",
    "inbox.test",
];
const AREA_CODES: &[u32] = &[
    212, 213, 305, 312, 404, 415, 503, 512, 602, 617, 702, 713, 720, 808, 857, 901, 917, 206, 303,
    410,
];
const AGE_BANDS: &[&str] = &["18-24", "25-34", "35-44", "45-54", "55-64", "65+"];
const REGIONS: &[&str] = &["north", "south", "east", "west"];
const SEGMENTS: &[&str] = &["sports", "travel", "home", "tech", "fashion", "food"];

/// The canonical identity of person `id`.
struct Person {
    local: String,
    domain: &'static str,
    area: u32,
    exchange: u32,
    line: u32,
}

fn person(id: u64) -> Person {
    let first = FIRST[(id % FIRST.len() as u64) as usize];
    let last = LAST[((id / 16) % LAST.len() as u64) as usize];
    Person {
        local: format!("{first}.{last}{id}"),
        domain: DOMAINS[((id / 7) % DOMAINS.len() as u64) as usize],
        area: AREA_CODES[(id % AREA_CODES.len() as u64) as usize],
        exchange: 200 + ((id / 20) % 800) as u32,
        line: ((id / 16_000) % 10_000) as u32,
    }
}

fn messy_case(s: &str, rng: &mut ChaCha8Rng) -> String {
    match rng.random_range(0..4) {
        0 => s.to_uppercase(),
        1 => {
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
        _ => s.to_string(),
    }
}

/// One spelling of the person's email as a CRM might hold it.
fn messy_email(p: &Person, rng: &mut ChaCha8Rng) -> String {
    let gmail = p.domain == "gmail.com" || p.domain == "googlemail.com";
    let mut local = p.local.clone();
    if gmail && rng.random_bool(0.3) {
        local = local.replace('.', "");
    }
    if gmail && rng.random_bool(0.2) {
        local.push_str("+news");
    }
    let mut email = format!("{}@{}", messy_case(&local, rng), messy_case(p.domain, rng));
    if rng.random_bool(0.1) {
        email = format!("  {email} ");
    }
    email
}

fn messy_phone(p: &Person, rng: &mut ChaCha8Rng) -> String {
    let (a, e, l) = (p.area, p.exchange, p.line);
    match rng.random_range(0..5) {
        0 => format!("({a}) {e}-{l:04}"),
        1 => format!("{a}.{e}.{l:04}"),
        2 => format!("1-{a}-{e}-{l:04}"),
        3 => format!("+1 {a} {e} {l:04}"),
        _ => format!("{a}{e}{l:04}"),
    }
}

/// What globex knows of one person: exposures and the day of the first.
#[derive(Debug, Clone, Copy)]
struct Exposure {
    count: u32,
    /// Days before [`AS_OF`] of the first exposure (0 to 180).
    first_days_ago: u32,
}

/// Ad exposure of person `id`, the same in both files.
fn exposure(id: u64, seed: u64) -> Option<Exposure> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    rng.random_bool(0.6).then(|| Exposure {
        count: rng.random_range(1..=100),
        first_days_ago: rng.random_range(0..=180),
    })
}

/// `AS_OF` minus `days`, as YYYY-MM-DD.
fn day_before_as_of(days: u32) -> String {
    let as_of = time::Date::from_calendar_date(2026, time::Month::June, 30).expect("valid date");
    crate::policy::format_date(as_of - time::Duration::days(i64::from(days)))
}

/// Writes both partners' files into `options.out`, `truth.json` and
/// [`PEOPLE_FILE`].
pub fn generate(options: &SynthOptions) -> std::io::Result<SynthTruth> {
    std::fs::create_dir_all(&options.out)?;
    let rows = options.rows;
    let shared = ((rows as f64) * options.overlap.clamp(0.0, 1.0)).round() as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);

    let mut acme = Writer::create(&options.out.join(ACME_FILE))?;
    writeln!(
        acme.out,
        "customer_id,email,phone,age_band,region,lifetime_value,purchases,last_purchase,lead_score,signup_date"
    )?;
    let mut truth = SynthTruth {
        acme_rows: rows,
        globex_rows: rows,
        overlap: shared,
        acme_rows_without_valid_identifier: 0,
        globex_rows_without_valid_identifier: 0,
        acme_invalid_identifiers: 0,
        globex_invalid_identifiers: 0,
    };
    let mut kept = vec![false; rows as usize];
    for id in 0..rows {
        let p = person(id);
        let is_shared = id < shared;
        let (email, phone, invalid, orphan) = identifiers(&p, is_shared, &mut rng);
        truth.acme_invalid_identifiers += invalid;
        truth.acme_rows_without_valid_identifier += orphan;
        kept[id as usize] = orphan == 0;
        let seen = if is_shared {
            exposure(id, options.seed)
        } else {
            None
        };
        let lift = if seen.is_some() { 1.25 } else { 1.0 };
        let value: f64 = (rng.random::<f64>().powi(3) * 4000.0 * lift * 100.0).round() / 100.0;
        let purchases = rng.random_range(0..=4) + u32::from(seen.is_some() && rng.random_bool(0.5));
        let last_days_ago = match seen {
            Some(e) if rng.random_bool(0.5) => {
                e.first_days_ago.saturating_sub(rng.random_range(0..=14))
            }
            _ => rng.random_range(0..=364),
        };
        writeln!(
            acme.out,
            "C{id:09},{email},{phone},{},{},{value:.2},{purchases},{},{},2024-{:02}-{:02}",
            AGE_BANDS[rng.random_range(0..AGE_BANDS.len())],
            REGIONS[rng.random_range(0..REGIONS.len())],
            day_before_as_of(last_days_ago),
            rng.random_range(0..=100),
            rng.random_range(1..=12),
            rng.random_range(1..=28),
        )?;
    }
    acme.finish()?;

    // globex: the shared people plus its own, in another order.
    let mut ids: Vec<u64> = (0..shared).chain(rows..(2 * rows - shared)).collect();
    ids.shuffle(&mut rng);
    let mut globex = Writer::create(&options.out.join(GLOBEX_FILE))?;
    writeln!(
        globex.out,
        "user_id,email,phone,interest_segment,ad_exposures,first_exposure,spend,health_interest"
    )?;
    let mut user_of = vec![None; shared as usize];
    for (n, id) in ids.into_iter().enumerate() {
        let p = person(id);
        let (email, phone, invalid, orphan) = identifiers(&p, id < shared, &mut rng);
        truth.globex_invalid_identifiers += invalid;
        truth.globex_rows_without_valid_identifier += orphan;
        if id < shared {
            user_of[id as usize] = Some(n);
        }
        let seen = exposure(id, options.seed);
        let spend: f64 = (rng.random::<f64>().powi(2) * 2000.0 * 100.0).round() / 100.0;
        writeln!(
            globex.out,
            "U{n:09},{email},{phone},{},{},{},{spend:.2},{}",
            SEGMENTS[rng.random_range(0..SEGMENTS.len())],
            seen.map_or(0, |e| e.count),
            seen.map(|e| day_before_as_of(e.first_days_ago))
                .unwrap_or_default(),
            if rng.random_bool(0.1) { "yes" } else { "no" },
        )?;
    }
    globex.finish()?;

    let mut people = Writer::create(&options.out.join(PEOPLE_FILE))?;
    writeln!(people.out, "customer_id,user_id")?;
    for id in (0..rows).filter(|id| kept[*id as usize]) {
        match user_of.get(id as usize).copied().flatten() {
            Some(n) => writeln!(people.out, "C{id:09},U{n:09}")?,
            None => writeln!(people.out, "C{id:09},")?,
        }
    }
    people.finish()?;

    let json = serde_json::to_string_pretty(&truth).map_err(std::io::Error::other)?;
    std::fs::write(options.out.join("truth.json"), json + "\n")?;
    Ok(truth)
}

/// Email and phone cells for one row, plus (invalid identifier values,
/// 1 if the row has no valid identifier). Shared people always carry a
/// valid email so the true overlap is exact; 0.5% of the others carry
/// invalid identifiers only.
fn identifiers(p: &Person, shared: bool, rng: &mut ChaCha8Rng) -> (String, String, u64, u64) {
    if !shared && rng.random_bool(0.005) {
        let email = format!("{}.{}", p.local, p.domain);
        return (email, "555-12".to_string(), 2, 1);
    }
    let email = if shared || rng.random_bool(0.9) {
        messy_email(p, rng)
    } else {
        String::new()
    };
    let phone = if rng.random_bool(0.7) || email.is_empty() {
        messy_phone(p, rng)
    } else {
        String::new()
    };
    (email, phone, 0, 0)
}

struct Writer {
    out: BufWriter<File>,
}

impl Writer {
    fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Writer {
            out: BufWriter::with_capacity(1 << 20, File::create(path)?),
        })
    }
    fn finish(mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.out.get_ref().sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_of_distinct_people_differ() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..200_000u64 {
            let p = person(id);
            assert!(seen.insert((p.area, p.exchange, p.line)), "{id}");
        }
    }

    #[test]
    fn same_seed_same_files() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for dir in [&a, &b] {
            generate(&SynthOptions {
                rows: 500,
                overlap: 0.4,
                seed: 7,
                out: dir.path().to_path_buf(),
            })
            .unwrap();
        }
        for f in [ACME_FILE, GLOBEX_FILE] {
            assert_eq!(
                std::fs::read(a.path().join(f)).unwrap(),
                std::fs::read(b.path().join(f)).unwrap()
            );
        }
    }
}
