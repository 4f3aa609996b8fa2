//! The identity kinds of an agreement and its parties: profiles,
//! standards, rights.

use super::*;

pub(super) fn validate_identities(
    raw: &BTreeMap<String, RawIdentity>,
    parties: &[RawParty],
    p: &mut Problems,
) -> BTreeMap<String, IdentityKind> {
    if raw.is_empty() {
        p.push(
            "identity",
            "at least one identity kind must be declared (for example [identity.email])",
        );
    }
    for (i, party) in parties.iter().enumerate() {
        for kind in party.standards.keys() {
            if !raw.contains_key(kind) {
                p.push(
                    format!("party[{i}].standards.{kind}"),
                    "names an identity kind the agreement does not declare in [identity]",
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, r) in raw {
        let field = format!("identity.{name}");
        if !is_sql_name(name) {
            p.push(&field, format!("the kind name {SQL_NAME_RULE}"));
            continue;
        }
        let standard = standard_of(name, r, parties, p);
        let profile = match r.profile.as_str() {
            "email" => Some(Profile::Email {
                gmail_canonical: r.gmail_canonical.unwrap_or(false),
                standard,
            }),
            "phone" => match &r.default_country {
                Some(c) if country(c).is_some() => Some(Profile::Phone {
                    default_country: c.clone(),
                    standard,
                }),
                Some(_) => {
                    p.push(
                        format!("{field}.default_country"),
                        "is not an ISO 3166 alpha-2 country code libphonenumber has metadata for (upper case, for example \"US\")",
                    );
                    None
                }
                None => {
                    p.push(
                        format!("{field}.default_country"),
                        "is required for the phone profile (country of national numbers)",
                    );
                    None
                }
            },
            "text" => Some(Profile::Text),
            other => {
                p.push(
                    format!("{field}.profile"),
                    format!("{other:?} is not a known profile (known: email, phone, text)"),
                );
                None
            }
        };
        if r.gmail_canonical.is_some() && r.profile != "email" {
            p.push(
                format!("{field}.gmail_canonical"),
                "only applies to the email profile",
            );
        } else if r.gmail_canonical.is_some() && standard != Standard::Cleanroom {
            p.push(
                format!("{field}.gmail_canonical"),
                format!(
                    "only applies under the cleanroom standard; {} has its own gmail rule",
                    standard.as_str()
                ),
            );
        }
        if r.default_country.is_some() && r.profile != "phone" {
            p.push(
                format!("{field}.default_country"),
                "only applies to the phone profile",
            );
        }
        match (&r.metadata, r.profile.as_str()) {
            (None, "phone") => p.push(
                format!("{field}.metadata"),
                format!(
                    "is required for the phone profile: the libphonenumber metadata version both parties read numbers by (this build has {PHONE_METADATA:?})"
                ),
            ),
            (Some(m), "phone") if m != PHONE_METADATA => p.push(
                format!("{field}.metadata"),
                format!(
                    "{m:?} is not the libphonenumber metadata of this build ({PHONE_METADATA:?}): both parties must read numbers alike; amend the agreement, or use the cleanroom release with that metadata"
                ),
            ),
            (Some(_), "phone") | (None, _) => {}
            (Some(_), _) => p.push(
                format!("{field}.metadata"),
                "only applies to the phone profile",
            ),
        }
        if r.profile == "text" && standard != Standard::Cleanroom {
            p.push(
                format!("{field}.standard"),
                "only applies to the email and phone profiles",
            );
        }
        if let Some(profile) = profile {
            out.insert(
                name.clone(),
                IdentityKind {
                    name: name.clone(),
                    profile,
                },
            );
        }
    }
    out
}

/// The standard an identity kind follows: the one `[identity.<kind>]`
/// names, or the one the parties that declare one for it agree on, or
/// ours. Two parties (or a party and the kind) on different standards
/// would fingerprint one person two ways: refused, naming both.
fn standard_of(name: &str, r: &RawIdentity, parties: &[RawParty], p: &mut Problems) -> Standard {
    let parse = |text: &str, field: String, p: &mut Problems| {
        let s = Standard::parse(text);
        if s.is_none() {
            p.push(
                field,
                format!(
                    "{text:?} is not a known standard (known: {})",
                    known_list(&Standard::ALL, |s| s.as_str())
                ),
            );
        }
        s
    };
    let mut chosen: Option<(Standard, String)> = r.standard.as_deref().and_then(|text| {
        parse(text, format!("identity.{name}.standard"), p)
            .map(|s| (s, format!("[identity.{name}]")))
    });
    for (i, party) in parties.iter().enumerate() {
        let Some(text) = party.standards.get(name) else {
            continue;
        };
        let field = format!("party[{i}].standards.{name}");
        let Some(s) = parse(text, field.clone(), p) else {
            continue;
        };
        match &chosen {
            Some((c, by)) if *c != s => p.push(
                field,
                format!(
                    "{} declares the {} standard for {name} but {by} the {}: one identity kind has one profile, or the same person gets two fingerprints; agree on one",
                    party.org,
                    s.as_str(),
                    c.as_str()
                ),
            ),
            Some(_) => {}
            None => chosen = Some((s, party.org.clone())),
        }
    }
    chosen.map_or(Standard::Cleanroom, |(s, _)| s)
}

pub(super) fn validate_parties(raw: &RawPolicy, p: &mut Problems) -> Vec<Party> {
    if raw.party.len() < 2 {
        p.push("party", "an agreement needs at least two parties");
    }
    let mut parties: Vec<Party> = Vec::new();
    for (i, rp) in raw.party.iter().enumerate() {
        let field = format!("party[{i}]");
        if !is_slug(&rp.org) {
            p.push(format!("{field}.org"), SLUG_RULE);
        } else if parties.iter().any(|q| q.org == rp.org) {
            p.push(
                format!("{field}.org"),
                format!(
                    "{:?} is already a party; each organisation appears once",
                    rp.org
                ),
            );
        }
        let mut rights = BTreeSet::new();
        for (j, r) in rp.rights.iter().enumerate() {
            match Right::parse(r) {
                Some(right) => {
                    if !rights.insert(right) {
                        p.push(
                            format!("{field}.rights[{j}]"),
                            format!("{r:?} is listed twice"),
                        );
                    }
                }
                None => p.push(
                    format!("{field}.rights"),
                    format!(
                        "{r:?} is not a known right (known: {})",
                        known_list(&Right::ALL, Right::as_str)
                    ),
                ),
            }
        }
        if rp.rights.is_empty() {
            p.push(
                format!("{field}.rights"),
                "a party needs at least one right",
            );
        }
        if rights.contains(&Right::Query) && !rights.contains(&Right::ReceiveResults) {
            p.push(
                format!("{field}.rights"),
                "\"query\" needs \"receive_results\": a querying party receives its own results",
            );
        }
        parties.push(Party {
            org: rp.org.clone(),
            rights,
        });
    }
    if !raw.party.is_empty() && !parties.iter().any(|q| q.has(Right::Query)) {
        p.push(
            "party",
            "no party has the \"query\" right, so the agreement has no use",
        );
    }
    parties
}
