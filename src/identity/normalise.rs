//! Normalisation profiles: the exact spelling of an identifier that gets
//! fingerprinted. Both partners apply the profile the agreement names, so
//! the same person gets the same fingerprint. `docs/fingerprints.md`
//! specifies every step.

use rlibphonenumber::{PHONE_NUMBER_UTIL, PhoneNumberFormat, PhoneNumberUtil, Region};

use super::{Profile, Standard};

/// Why a value could not be normalised. Carries no part of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    /// Not exactly one `@`, an empty part, a space inside, or a domain
    /// without a dot.
    NotAnEmail,
    /// Not a valid number by libphonenumber's metadata (read in the
    /// profile's default country when written nationally).
    NotAPhone,
}

impl Invalid {
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::Empty => "empty",
            Invalid::NotAnEmail => "not an email address",
            Invalid::NotAPhone => "not a phone number",
        }
    }
}

/// Normalises `raw` under `profile`.
pub fn normalise(profile: &Profile, raw: &str) -> Result<String, Invalid> {
    let mut out = String::new();
    Normaliser::new(profile)
        .ok_or(Invalid::NotAPhone)?
        .normalise_into(raw, &mut out)?;
    Ok(out)
}

/// The libphonenumber metadata phone numbers are read by: that of
/// rlibphonenumber 2.2.15, pinned in `Cargo.toml`. Every agreement with a
/// phone identity kind names it (`metadata`), and a build with other
/// metadata refuses the agreement, so both parties read numbers alike.
pub const PHONE_METADATA: &str = "9.0.42";

/// A country whose national numbers libphonenumber can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country(Region);

/// The country of an ISO 3166 alpha-2 code, if libphonenumber has
/// metadata for it.
pub fn country(code: &str) -> Option<Country> {
    let region: Region = code.parse().ok()?;
    PHONE_NUMBER_UTIL.get_country_code_for_region(region)?;
    Some(Country(region))
}

/// What the gmail rule of an email profile does to gmail addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gmail {
    /// Nothing (Meta; ours without `gmail_canonical`).
    Kept,
    /// Ours with `gmail_canonical`: gmail.com and googlemail.com lose the
    /// dots and any `+tag` of their local part, written at gmail.com.
    Canonical,
    /// Google: gmail.com and googlemail.com lose the dots of their local
    /// part; the domain and any `+tag` stay.
    Dots,
    /// UID2: gmail.com only loses the dots and any `+tag`.
    DotsAndTag,
}

/// A profile resolved once, for normalising many values into one buffer.
#[derive(Debug, Clone, Copy)]
pub enum Normaliser {
    Email { gmail: Gmail },
    Phone { country: Country, plus: bool },
    Text,
}

impl Normaliser {
    /// `None` for a phone profile whose country libphonenumber does not know.
    pub fn new(profile: &Profile) -> Option<Self> {
        Some(match profile {
            Profile::Email {
                gmail_canonical,
                standard,
            } => Normaliser::Email {
                gmail: match standard {
                    Standard::Cleanroom if *gmail_canonical => Gmail::Canonical,
                    Standard::Cleanroom | Standard::Meta => Gmail::Kept,
                    Standard::Google => Gmail::Dots,
                    Standard::Uid2 => Gmail::DotsAndTag,
                },
            },
            Profile::Phone {
                default_country,
                standard,
            } => Normaliser::Phone {
                country: country(default_country)?,
                plus: *standard != Standard::Meta,
            },
            Profile::Text => Normaliser::Text,
        })
    }

    /// Writes the normalised form of `raw` into `out` (cleared first).
    pub fn normalise_into(&self, raw: &str, out: &mut String) -> Result<(), Invalid> {
        out.clear();
        match self {
            Normaliser::Email { gmail } => email_into(raw, *gmail, out),
            Normaliser::Phone { country, plus } => phone_into(raw, *country, *plus, out),
            Normaliser::Text => {
                let t = trim(raw);
                if t.is_empty() {
                    return Err(Invalid::Empty);
                }
                lower_into(t, out);
                Ok(())
            }
        }
    }
}

/// `str::trim`, answered at once for the usual value whose first and last
/// bytes are printable ASCII, which is never white space.
#[inline]
pub(crate) fn trim(s: &str) -> &str {
    match s.as_bytes() {
        [first, .., last] if first.is_ascii_graphic() && last.is_ascii_graphic() => s,
        [only] if only.is_ascii_graphic() => s,
        _ => s.trim(),
    }
}

fn lower_into(t: &str, out: &mut String) {
    if t.is_ascii() {
        out.push_str(t);
        out.make_ascii_lowercase();
    } else {
        out.push_str(&t.to_lowercase());
    }
}

/// Trim and lower-case.
pub fn text(raw: &str) -> Result<String, Invalid> {
    let mut out = String::new();
    Normaliser::Text.normalise_into(raw, &mut out)?;
    Ok(out)
}

/// Trim, lower-case, check the shape; with `gmail_canonical`, addresses at
/// gmail.com or googlemail.com lose the dots and any `+tag` of their local
/// part and are written at gmail.com (our own rule; see [`Gmail`] for the
/// others).
pub fn email(raw: &str, gmail_canonical: bool) -> Result<String, Invalid> {
    let mut out = String::new();
    let gmail = match gmail_canonical {
        true => Gmail::Canonical,
        false => Gmail::Kept,
    };
    email_into(raw, gmail, &mut out)?;
    Ok(out)
}

fn email_into(raw: &str, gmail: Gmail, out: &mut String) -> Result<(), Invalid> {
    let t = trim(raw);
    if t.is_empty() {
        return Err(Invalid::Empty);
    }
    lower_into(t, out);
    let (local, domain) = out.split_once('@').ok_or(Invalid::NotAnEmail)?;
    let valid = !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !out.chars().any(char::is_whitespace);
    if !valid {
        return Err(Invalid::NotAnEmail);
    }
    let googlemail = domain == "googlemail.com";
    let (dots, tag) = match gmail {
        Gmail::Kept => return Ok(()),
        Gmail::Canonical if domain == "gmail.com" || googlemail => (true, true),
        Gmail::Dots if domain == "gmail.com" || googlemail => (true, false),
        Gmail::DotsAndTag if domain == "gmail.com" => (true, true),
        _ => return Ok(()),
    };
    // In place: the local part, up to any '+' tag if it goes, without dots.
    let at = local.len();
    let end = match tag {
        true => local.find('+').unwrap_or(at),
        false => at,
    };
    let domain = match gmail {
        Gmail::Canonical => "gmail.com".to_string(),
        _ => out[at + 1..].to_string(),
    };
    out.truncate(end);
    if dots {
        out.retain(|c| c != '.');
    }
    if out.is_empty() {
        return Err(Invalid::NotAnEmail);
    }
    out.push('@');
    out.push_str(&domain);
    Ok(())
}

/// A valid number by libphonenumber, in E.164 (`+` and up to 15 digits).
/// International input starts with `+` or the default country's
/// international prefix; anything else is a national number of `default`
/// (its trunk prefix dropped). An extension is not part of the number.
pub fn phone(raw: &str, default: Country) -> Result<String, Invalid> {
    let mut out = String::new();
    phone_into(raw, default, true, &mut out)?;
    Ok(out)
}

fn phone_into(raw: &str, default: Country, plus: bool, out: &mut String) -> Result<(), Invalid> {
    let t = trim(raw);
    if t.is_empty() {
        return Err(Invalid::Empty);
    }
    PHONES.with(|util| {
        let number = util
            .parse(t, Some(default.0))
            .map_err(|_| Invalid::NotAPhone)?;
        if !util.is_valid_number(&number) {
            return Err(Invalid::NotAPhone);
        }
        let e164 = util.format(&number, PhoneNumberFormat::E164);
        match plus {
            true => out.push_str(&e164),
            false => out.push_str(e164.trim_start_matches('+')),
        }
        Ok(())
    })
}

thread_local! {
    /// libphonenumber's reader, one per thread: its compiled patterns keep
    /// their match state in pools that only the thread that made them
    /// reaches without a lock, so threads sharing one instance wait on each
    /// other (two preparing threads went 1.4 times slower than with one
    /// each). The same metadata, so the same answers; about 7 ms to make.
    static PHONES: PhoneNumberUtil =
        PhoneNumberUtil::new().expect("libphonenumber's built-in metadata loads");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quick trim equals `str::trim` on values with and without white
    /// space of every kind at either end, single characters and nothing.
    #[test]
    fn trim_equals_the_standard_trim() {
        let edges = [
            "", " ", "\t", "\u{b}", "\u{c}", "\r\n", "\u{a0}", "\u{2003}", "\u{3000}", "é", "x",
            "!", "~",
        ];
        let middles = ["", "a", "a b", "é", "\u{a0}", "ab@c.d"];
        for a in edges {
            for m in middles {
                for b in edges {
                    let v = format!("{a}{m}{b}");
                    assert_eq!(trim(&v), v.trim(), "{v:?}");
                }
            }
        }
    }

    /// The metadata version named in agreements is that of the crate the
    /// lock file pins: bumping one without the other fails here.
    #[test]
    fn phone_metadata_is_the_pinned_crates() {
        let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"));
        assert!(
            lock.contains("name = \"rlibphonenumber\"\nversion = \"2.2.15\""),
            "rlibphonenumber is no longer 2.2.15: set PHONE_METADATA to its metadata version"
        );
        assert_eq!(PHONE_METADATA, "9.0.42");
    }

    fn us() -> Country {
        country("US").unwrap()
    }

    fn email_by(raw: &str, gmail: Gmail) -> Result<String, Invalid> {
        let mut out = String::new();
        email_into(raw, gmail, &mut out).map(|()| out)
    }

    #[test]
    fn emails() {
        assert_eq!(
            email("  A.B@Example.COM ", false).unwrap(),
            "a.b@example.com"
        );
        assert_eq!(email("a.b+x@googlemail.com", true).unwrap(), "ab@gmail.com");
        assert_eq!(
            email("a.b+x@googlemail.com", false).unwrap(),
            "a.b+x@googlemail.com"
        );
        assert_eq!(
            email("a.b+x@example.com", true).unwrap(),
            "a.b+x@example.com"
        );
        for bad in [
            "",
            "   ",
            "no-at-sign",
            "a@b",
            "a@@b.com",
            "@b.com",
            "a b@c.com",
            "a@.com",
            "a@b.com.",
            "+@gmail.com",
        ] {
            assert!(email(bad, true).is_err(), "{bad}");
        }
    }

    /// Each standard's gmail rule on the same addresses.
    #[test]
    fn gmail_rules_by_standard() {
        let cases = [
            // (input, kept, canonical, dots, dots and tag)
            (
                "J.Doe+ads@Gmail.com",
                "j.doe+ads@gmail.com",
                "jdoe@gmail.com",
                "jdoe+ads@gmail.com",
                "jdoe@gmail.com",
            ),
            (
                "j.doe+ads@googlemail.com",
                "j.doe+ads@googlemail.com",
                "jdoe@gmail.com",
                "jdoe+ads@googlemail.com",
                "j.doe+ads@googlemail.com",
            ),
            (
                "j.doe+ads@example.com",
                "j.doe+ads@example.com",
                "j.doe+ads@example.com",
                "j.doe+ads@example.com",
                "j.doe+ads@example.com",
            ),
        ];
        for (raw, kept, canonical, dots, both) in cases {
            assert_eq!(email_by(raw, Gmail::Kept).unwrap(), kept);
            assert_eq!(email_by(raw, Gmail::Canonical).unwrap(), canonical);
            assert_eq!(email_by(raw, Gmail::Dots).unwrap(), dots);
            assert_eq!(email_by(raw, Gmail::DotsAndTag).unwrap(), both);
        }
        assert!(email_by("...@gmail.com", Gmail::Dots).is_err());
        assert!(email_by("+x@gmail.com", Gmail::DotsAndTag).is_err());
    }

    #[test]
    fn phones() {
        assert_eq!(phone("(415) 555-0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("1-415-555-0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("415.555.0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("415 555 0132 ext 4", us()).unwrap(), "+14155550132");
        assert_eq!(phone("+44 20 7031 3000", us()).unwrap(), "+442070313000");
        assert_eq!(phone("011 44 20 7031 3000", us()).unwrap(), "+442070313000");
        let gb = country("GB").unwrap();
        assert_eq!(phone("020 7031 3000", gb).unwrap(), "+442070313000");
        assert_eq!(phone("+44 (0)20 7031 3000", gb).unwrap(), "+442070313000");
        assert_eq!(phone("0044 20 7031 3000", gb).unwrap(), "+442070313000");
        let it = country("IT").unwrap();
        assert_eq!(phone("06 1234 5678", it).unwrap(), "+390612345678");
        for bad in [
            "",
            "12",
            "555-0132",
            "(015) 555-0132",
            "+1234",
            "abc",
            "+1 415 555 0132 0000 0000",
        ] {
            assert!(phone(bad, us()).is_err(), "{bad}");
        }
        assert!(country("ZZ").is_none());
        assert!(country("us").is_none() || country("us") == country("US"));
    }
}
