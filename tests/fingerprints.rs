//! Normalisation and fingerprint test vectors.
//!
//! Normalisation examples are the published ones of:
//! - UID2, "Normalization and Encoding" (IABTechLab/uid2docs,
//!   docs/getting-started/gs-normalization-encoding.md): email table and
//!   phone examples, with their SHA-256 of the normalised value;
//! - Meta Conversions API, "Customer Information Parameters" (developers.facebook.com,
//!   marketing-api/conversions-api/parameters/customer-information-parameters):
//!   `em` and `ph` examples and their SHA-256 outputs. Meta writes phones as
//!   digits without `+`; we compare our E.164 without its `+`;
//! - Google Ads Customer Match: the Customer Match upload template's phone
//!   spellings (1-800-888-8888, 1(800)888-8888, 18008888899), the E.164
//!   examples given by the Google Ads API team (+12125650000, +442070313000),
//!   and the Campaign Manager 360 enhanced conversions rule that dots before
//!   gmail.com and googlemail.com are removed.
//!
//! - libphonenumber's own example numbers for 46 countries
//!   (`tests/vectors/phones.toml`, written by `docs/vectors/phone_vectors.py`
//!   from its `PhoneNumberMetadata.xml`), national and international.
//!
//! Each platform's examples run through the profile of that platform's
//! standard (`standard = "uid2"`, `"meta"`, `"google"`).
//!
//! Fingerprint vectors were computed independently with the Python `blake3`
//! package (PyPI, 1.x) from the derivation in docs/fingerprints.md.

use cleanroom::identity::{Fingerprinter, Invalid, Secret, country, email, normalise, phone};
use cleanroom::policy::{Profile, Standard};
use proptest::prelude::*;

/// `raw` as an email under `standard`'s rules.
fn email_by(standard: Standard, raw: &str) -> Result<String, Invalid> {
    let profile = Profile::Email {
        gmail_canonical: false,
        standard,
    };
    normalise(&profile, raw)
}

/// `raw` as a phone number under `standard`'s rules, national numbers of
/// `country`.
fn phone_by(standard: Standard, country: &str, raw: &str) -> Result<String, Invalid> {
    let profile = Profile::Phone {
        default_country: country.into(),
        standard,
    };
    normalise(&profile, raw)
}

fn sha256_hex(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

#[test]
fn uid2_email_examples() {
    // (inputs, normalised, SHA-256 of the normalised value) from the UID2 table.
    let table: &[(&[&str], &str, &str)] = &[
        (
            &["MyEmail@example.com", "MYEMAIL@example.com"],
            "myemail@example.com",
            "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5",
        ),
        (
            &["My.Email@example.com"],
            "my.email@example.com",
            "e22b53bc6f871274f3a62ab37a3caed7214fc14d676215a96a242fcfada1c81f",
        ),
        (
            &["JANESAOIRSE@example.com", "JaneSaoirse@example.com"],
            "janesaoirse@example.com",
            "d6670e7a92007f1b5ff785f1fc81e53aa6d3d7bd06bdf5c473cdc7286c284b6d",
        ),
        (
            &["jane.saoirse@example.com", "Jane.Saoirse@example.com"],
            "jane.saoirse@example.com",
            "b196432c7b989a2ca91c83799957c515da53e6c13abf20b78fea94f117e90bf8",
        ),
        (
            &["JaneSaoirse+Work@example.com"],
            "janesaoirse+work@example.com",
            "28aaee4815230cd3b4ebd88c515226550666e91ac019929e3adac3f66c288180",
        ),
        (
            &[
                "JANE.SAOIRSE@gmail.com",
                "Jane.Saoirse@gmail.com",
                "JaneSaoirse+Work@gmail.com",
            ],
            "janesaoirse@gmail.com",
            "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
        ),
        (
            &["user@example.com"],
            "user@example.com",
            "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514",
        ),
    ];
    for (inputs, normalised, sha) in table {
        for input in *inputs {
            assert_eq!(
                email_by(Standard::Uid2, input).unwrap(),
                *normalised,
                "{input}"
            );
            // Ours with the gmail rule agrees on every one of them.
            assert_eq!(email(input, true).unwrap(), *normalised, "{input}");
        }
        assert_eq!(sha256_hex(normalised), *sha, "{normalised}");
    }
}

#[test]
fn uid2_phone_examples() {
    assert_eq!(
        phone_by(Standard::Uid2, "US", "1 (234) 567-8901").unwrap(),
        "+12345678901"
    );
    assert_eq!(
        sha256_hex("+12345678901"),
        "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee"
    );
    assert_eq!(
        phone_by(Standard::Uid2, "AU", "(02) 1234 5678").unwrap(),
        "+61212345678"
    );
}

#[test]
fn meta_conversions_api_examples() {
    let em = email_by(Standard::Meta, "John_Smith@gmail.com").unwrap();
    assert_eq!(em, "john_smith@gmail.com");
    // Meta has no gmail rule: dots and tags stay.
    assert_eq!(
        email_by(Standard::Meta, " J.Smith+x@Gmail.com").unwrap(),
        "j.smith+x@gmail.com"
    );
    assert_eq!(
        sha256_hex(&em),
        "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
    );
    let ph = phone_by(Standard::Meta, "US", "(650)555-1212").unwrap();
    assert_eq!(ph, "16505551212");
    assert_eq!(
        sha256_hex(&ph),
        "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
    );
}

#[test]
fn google_customer_match_examples() {
    let g = |raw: &str| phone_by(Standard::Google, "US", raw).unwrap();
    for spelling in ["1-800-888-8888", "1(800)888-8888", "+1 800 888 8888"] {
        assert_eq!(g(spelling), "+18008888888", "{spelling}");
    }
    assert_eq!(g("18008888899"), "+18008888899");
    assert_eq!(g("+12125650000"), "+12125650000");
    assert_eq!(g("+442070313000"), "+442070313000");
    let e = |raw: &str| email_by(Standard::Google, raw).unwrap();
    assert_eq!(e(" test@gmail.com "), "test@gmail.com");
    // Dots before gmail.com and googlemail.com are removed; the domain and
    // a +tag stay (Google names no tag rule).
    assert_eq!(e("te.st@gmail.com"), "test@gmail.com");
    assert_eq!(e("te.st@googlemail.com"), "test@googlemail.com");
    assert_eq!(e("te.st+news@gmail.com"), "test+news@gmail.com");
    assert_eq!(e("te.st@example.com"), "te.st@example.com");
}

#[derive(serde::Deserialize)]
struct PhoneVectors {
    number: Vec<PhoneVector>,
}

#[derive(serde::Deserialize)]
struct PhoneVector {
    region: String,
    kind: String,
    national: String,
    international: String,
    e164: String,
}

/// libphonenumber's own example numbers, written nationally (trunk prefix
/// and spaces) and internationally, read as every standard writes them:
/// E.164 for ours, Google's and UID2's, its digits for Meta's.
#[test]
fn libphonenumber_example_numbers_of_46_countries() {
    let text = std::fs::read_to_string("tests/vectors/phones.toml").unwrap();
    let vectors: PhoneVectors = toml::from_str(&text).unwrap();
    let countries: std::collections::BTreeSet<&str> =
        vectors.number.iter().map(|v| v.region.as_str()).collect();
    assert!(countries.len() >= 30, "{} countries", countries.len());
    for v in &vectors.number {
        for standard in Standard::ALL {
            let expected = match standard {
                Standard::Meta => v.e164.trim_start_matches('+'),
                _ => v.e164.as_str(),
            };
            for written in [&v.national, &v.international] {
                assert_eq!(
                    phone_by(standard, &v.region, written).as_deref(),
                    Ok(expected),
                    "{} {} {written:?} under {}",
                    v.region,
                    v.kind,
                    standard.as_str()
                );
            }
        }
    }
}

#[test]
fn invalid_identifiers_are_refused_not_hashed() {
    let us = country("US").unwrap();
    for bad in ["jane.example.com", "jane@", "@example.com", "jane@example"] {
        assert!(email(bad, true).is_err(), "{bad}");
    }
    for bad in ["12", "555-CALL-NOW", "(000) 555-1212"] {
        assert!(phone(bad, us).is_err(), "{bad}");
    }
}

struct Vector {
    secret: &'static str,
    salt: &'static str,
    kind: &'static str,
    input: &'static str,
    fingerprint: &'static str,
}

const S1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const SALT1: &str = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f";
const S2: &str = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5";
const SALT2: &str = "78b466a94ebe863f839442841e3c0f34213649f2aa8696c6c0a2d18e450740d6";

const VECTORS: &[Vector] = &[
    Vector {
        secret: S1,
        salt: SALT1,
        kind: "email",
        input: "janesaoirse@gmail.com",
        fingerprint: "aa24fe5eb1498ee811dbffb06e9d912f9ca4d3a7c77bb86ef4e2e83c5b9505c8",
    },
    Vector {
        secret: S1,
        salt: SALT1,
        kind: "phone",
        input: "+12345678901",
        fingerprint: "2941af597bba00fedaecbfd3263831a4a0e6d53ef0a5c7a7260d1472cbfbdde4",
    },
    Vector {
        secret: S1,
        salt: SALT1,
        kind: "email",
        input: "user@example.com",
        fingerprint: "57077e3763db1c68dc29a43c379efcab873d5f2d997f79ed8e5ab60bdba8c130",
    },
    Vector {
        secret: S2,
        salt: SALT2,
        kind: "email",
        input: "janesaoirse@gmail.com",
        fingerprint: "418421f6868cdeba15c441f9e43a2e345ac7ca2edf6def754c5d7377936de450",
    },
    // Same secret and value, another agreement's salt: unlinkable.
    Vector {
        secret: S1,
        salt: SALT2,
        kind: "email",
        input: "janesaoirse@gmail.com",
        fingerprint: "dc5fd605be2553e951cd692510cc988b27da3d91a5f2794bc22c8ea7a5764918",
    },
    // Same secret, salt and value, another kind: unlinkable.
    Vector {
        secret: S1,
        salt: SALT1,
        kind: "email2",
        input: "janesaoirse@gmail.com",
        fingerprint: "d7e0e94c407f679d027e33284eda434edca9349a9ceea65db663b9911dec36e1",
    },
    Vector {
        secret: S2,
        salt: SALT2,
        kind: "text",
        input: "jöhn ßmith",
        fingerprint: "dd4e656efe5eb6883046f0140f72ec954e725bd543182cdd1686cc55e86720f4",
    },
];

#[test]
fn fingerprint_vectors() {
    for v in VECTORS {
        let secret = Secret::from_hex(v.secret, "vector").unwrap();
        let salt: [u8; 32] = hex::decode(v.salt).unwrap().try_into().unwrap();
        let fp = Fingerprinter::new(&secret, &salt, v.kind).fingerprint(v.input);
        assert_eq!(hex::encode(fp), v.fingerprint, "{} {}", v.kind, v.input);
    }
}

#[test]
fn secrets_are_checked_and_never_shown() {
    assert!(Secret::from_hex("abcd", "x").is_err());
    assert!(Secret::from_hex("zz", "x").is_err());
    let s = Secret::from_hex(S1, "x").unwrap();
    assert_eq!(format!("{s:?}"), "Secret(32 bytes)");
    let err = Secret::from_hex(&S1[..60], "CLEANROOM_SECRET")
        .unwrap_err()
        .to_string();
    assert!(!err.contains(&S1[..60]), "{err}");
}

/// A messy spelling of one email address: case, surrounding space, and for
/// gmail, dots and a +tag in the local part.
fn messy_email(local: &str, gmail: bool) -> impl Strategy<Value = String> {
    let local = local.to_string();
    (
        proptest::collection::vec(any::<bool>(), local.len()),
        proptest::collection::vec(any::<bool>(), local.len()),
        prop::option::of("[a-z0-9]{1,6}"),
        "[ \t]{0,2}",
        "[ \t]{0,2}",
        any::<bool>(),
    )
        .prop_map(move |(upper, dots, tag, pre, post, googlemail)| {
            let mut out = String::new();
            for (i, c) in local.chars().enumerate() {
                if gmail && dots[i] && i > 0 {
                    out.push('.');
                }
                out.push(if upper[i] { c.to_ascii_uppercase() } else { c });
            }
            let domain = if !gmail {
                "Example.COM"
            } else if googlemail {
                "GoogleMail.com"
            } else {
                "GMAIL.com"
            };
            if gmail && let Some(tag) = tag {
                out.push('+');
                out.push_str(&tag);
            }
            format!("{pre}{out}@{domain}{post}")
        })
}

/// A messy spelling of one US number 415-555-NNNN.
fn messy_phone(line: u32) -> impl Strategy<Value = String> {
    (0..6usize).prop_map(move |style| match style {
        0 => format!("(415) 555-{line:04}"),
        1 => format!("415.555.{line:04}"),
        2 => format!("1-415-555-{line:04}"),
        3 => format!("+1 415 555 {line:04}"),
        4 => format!("  415555{line:04} "),
        // By the US international prefix.
        _ => format!("011 1 (415) 555 {line:04}"),
    })
}

proptest! {
    #[test]
    fn equal_people_get_equal_fingerprints(
        a in messy_email("janesaoirse", true),
        b in messy_email("janesaoirse", true),
        c in messy_email("jane", false),
        d in messy_email("jane", false),
        p in messy_phone(132),
        q in messy_phone(132),
    ) {
        let secret = Secret::from_hex(S1, "test").unwrap();
        let salt: [u8; 32] = hex::decode(SALT1).unwrap().try_into().unwrap();
        let emails = Fingerprinter::new(&secret, &salt, "email");
        let phones = Fingerprinter::new(&secret, &salt, "phone");
        let us = country("US").unwrap();
        let fp = |s: &str| emails.fingerprint(&email(s, true).unwrap());
        prop_assert_eq!(fp(&a), fp(&b));
        prop_assert_eq!(fp(&c), fp(&d));
        prop_assert_ne!(fp(&a), fp(&c));
        let pp = |s: &str| phones.fingerprint(&phone(s, us).unwrap());
        prop_assert_eq!(pp(&p), pp(&q));
    }
}
