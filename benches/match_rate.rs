//! Match rate against a known truth: two partners write the same people's
//! contact data the messy ways real exports do (case, white space, gmail
//! dots and tags, googlemail, national and international phone forms,
//! trunk prefixes, `(0)`, extensions), each with a default country of its
//! own; both normalise under one profile and the bench counts, per
//! identity kind, how many of the people both hold get equal normalised
//! values, and whether any two different people do.
//!
//! ```text
//! cargo bench --bench match_rate                      # 20,000 people per partner
//! cargo bench --bench match_rate -- --people 100000 --seed 7
//! ```
//!
//! Phone numbers are libphonenumber's own example numbers of 46 countries
//! (`tests/vectors/phones.toml`) with their last four digits varied, one
//! number per person.

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Instant;

use cleanroom::identity::Normaliser;
use cleanroom::policy::{Profile, Standard};
use common::arg;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(serde::Deserialize)]
struct Vectors {
    number: Vec<Number>,
}

#[derive(serde::Deserialize)]
struct Number {
    region: String,
    national: String,
    e164: String,
}

/// A person as they are: one mailbox and one phone line.
struct Person {
    local: String,
    domain: &'static str,
    /// Country, trunk prefix and national significant number.
    region: String,
    trunk: String,
    cc: String,
    national: String,
}

const DOMAINS: [&str; 6] = [
    "gmail.com",
    "googlemail.com",
    "example.com",
    "mail.example.org",
    "gmail.com",
    "example.net",
];

fn people(n: usize, rng: &mut StdRng, numbers: &[Number]) -> Vec<Person> {
    (0..n)
        .map(|i| {
            // Every person a number of their own: a vector by turn, its
            // last four digits from the person's index.
            let v = &numbers[i % numbers.len()];
            let digits = v.e164.trim_start_matches('+');
            // The country code: the e164 digits before the national number
            // as the vector writes it nationally (trunk prefix removed).
            let national_written: String =
                v.national.chars().filter(char::is_ascii_digit).collect();
            let (trunk, cc, national) = split(digits, &national_written);
            let mut national = national.to_string();
            let varied = format!("{:04}", (i / numbers.len()) % 10_000);
            national.replace_range(national.len() - 4.., &varied);
            Person {
                local: format!("first{i}.last{}", i / 7),
                domain: DOMAINS[rng.random_range(0..DOMAINS.len())],
                region: v.region.clone(),
                trunk: trunk.to_string(),
                cc: cc.to_string(),
                national,
            }
        })
        .collect()
}

/// (trunk prefix, country code, national significant number) of a vector.
fn split<'a>(digits: &'a str, national_written: &'a str) -> (&'a str, &'a str, &'a str) {
    for cc_len in 1..=3 {
        let (cc, nsn) = digits.split_at(cc_len);
        if let Some(trunk) = national_written.strip_suffix(nsn) {
            return (trunk, cc, nsn);
        }
    }
    panic!("a vector whose national form does not end in its number")
}

fn email_as_written(p: &Person, rng: &mut StdRng) -> String {
    let mut local = p.local.clone();
    let gmail = p.domain == "gmail.com" || p.domain == "googlemail.com";
    if gmail && rng.random_bool(0.3) {
        local = local.replace('.', "");
    }
    if gmail && rng.random_bool(0.3) {
        local.push_str("+shop");
    }
    let mut domain = p.domain.to_string();
    if gmail && rng.random_bool(0.2) {
        domain = "googlemail.com".into();
    }
    let mut text = format!("{local}@{domain}");
    match rng.random_range(0..4) {
        0 => text = text.to_uppercase(),
        1 => text = format!("  {text} "),
        2 => text = capitalised(&text),
        _ => {}
    }
    text
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The phone as a partner in `home` writes it: nationally for its own
/// country's numbers (trunk prefix and separators), internationally in
/// one of the usual ways otherwise, sometimes with an extension.
fn phone_as_written(p: &Person, home: &str, rng: &mut StdRng) -> String {
    let spaced = |s: &str, sep: &str| {
        s.as_bytes()
            .chunks(3)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(sep)
    };
    let mut text = if p.region == home && rng.random_bool(0.7) {
        match rng.random_range(0..3) {
            0 => format!("{}{}", p.trunk, spaced(&p.national, " ")),
            1 => format!(
                "({}{}) {}",
                p.trunk,
                &p.national[..2],
                spaced(&p.national[2..], "-")
            ),
            _ => format!("{}{}", p.trunk, p.national),
        }
    } else {
        match rng.random_range(0..4) {
            0 => format!("+{} {}", p.cc, spaced(&p.national, " ")),
            1 if !p.trunk.is_empty() && p.trunk == "0" => {
                format!("+{} ({}){}", p.cc, p.trunk, spaced(&p.national, " "))
            }
            2 => format!("+{}-{}", p.cc, spaced(&p.national, "-")),
            _ => format!("+{}{}", p.cc, p.national),
        }
    };
    if rng.random_bool(0.05) {
        text.push_str(" ext. 12");
    }
    text
}

fn main() {
    let n = arg("--people", 20_000) as usize;
    let seed = arg("--seed", 1);
    let text = std::fs::read_to_string("tests/vectors/phones.toml").expect("phone vectors");
    let mut vectors: Vectors = toml::from_str(&text).expect("phone vectors parse");
    // Some countries give one example for fixed lines and mobiles: once.
    let mut seen = std::collections::HashSet::new();
    vectors.number.retain(|v| seen.insert(v.e164.clone()));
    let mut rng = StdRng::seed_from_u64(seed);
    let everyone = people(n * 3 / 2, &mut rng, &vectors.number);
    // Partner A holds the first n, partner B the last n: n/2 in both.
    let a: Vec<usize> = (0..n).collect();
    let b: Vec<usize> = (n / 2..n * 3 / 2).collect();
    let both = n / 2;
    println!(
        "match rate: {n} people per partner, {both} in both (seed {seed}); partner A in GB, partner B in US"
    );
    for standard in [
        Standard::Cleanroom,
        Standard::Google,
        Standard::Meta,
        Standard::Uid2,
    ] {
        let email = Profile::Email {
            gmail_canonical: standard == Standard::Cleanroom,
            standard,
        };
        let phone_of = |home: &str| Profile::Phone {
            default_country: home.into(),
            standard,
        };
        let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37);
        let written =
            |who: &[usize], home: &str, rng: &mut StdRng| -> Vec<(usize, String, String)> {
                who.iter()
                    .map(|&i| {
                        let p = &everyone[i];
                        (i, email_as_written(p, rng), phone_as_written(p, home, rng))
                    })
                    .collect()
            };
        let wa = written(&a, "GB", &mut rng);
        let wb = written(&b, "US", &mut rng);
        let mut per_kind = Vec::new();
        for (kind, pa, pb) in [
            ("email", email.clone(), email.clone()),
            ("phone", phone_of("GB"), phone_of("US")),
        ] {
            let started = Instant::now();
            let na = normalised(&wa, kind, &pa);
            let nb = normalised(&wb, kind, &pb);
            let per_value = started.elapsed().as_secs_f64() / (2 * n) as f64;
            let index: HashMap<&str, usize> = na
                .iter()
                .filter_map(|(i, v)| v.as_deref().map(|v| (v, *i)))
                .collect();
            let (mut right, mut wrong) = (0, 0);
            for (i, v) in &nb {
                match v.as_deref().and_then(|v| index.get(v)) {
                    Some(j) if j == i => right += 1,
                    Some(_) => wrong += 1,
                    None => {}
                }
            }
            let invalid = na.iter().chain(&nb).filter(|(_, v)| v.is_none()).count();
            per_kind.push(format!(
                "{kind} {:.2}% of {both} ({right} matched, {wrong} false, {invalid} invalid of {}), {:.2} us per value",
                100.0 * right as f64 / both as f64,
                2 * n,
                per_value * 1e6
            ));
        }
        println!("  {:<9} {}", standard.as_str(), per_kind.join("; "));
    }
}

fn normalised(
    rows: &[(usize, String, String)],
    kind: &str,
    profile: &Profile,
) -> Vec<(usize, Option<String>)> {
    let normaliser = Normaliser::new(profile).expect("a known country");
    let mut out = String::new();
    rows.iter()
        .map(|(i, email, phone)| {
            let raw = if kind == "email" { email } else { phone };
            let v = normaliser
                .normalise_into(raw, &mut out)
                .ok()
                .map(|()| out.clone());
            (*i, v)
        })
        .collect()
}
