//! Normalisation profiles: the exact spelling of an identifier that gets
//! fingerprinted. Both partners apply the profile the agreement names, so
//! the same person gets the same fingerprint. `docs/fingerprints.md`
//! specifies every step.

use crate::policy::Profile;

use super::countries::{Country, country};

/// Why a value could not be normalised. Carries no part of the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    /// Not exactly one `@`, an empty part, a space inside, or a domain
    /// without a dot.
    NotAnEmail,
    /// Characters other than digits and separators, or a length that no
    /// E.164 number has.
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

/// A profile resolved once, for normalising many values into one buffer.
#[derive(Debug, Clone, Copy)]
pub enum Normaliser {
    Email { gmail_canonical: bool },
    Phone { country: &'static Country },
    Text,
}

impl Normaliser {
    /// `None` for a phone profile whose country is not supported.
    pub fn new(profile: &Profile) -> Option<Self> {
        Some(match profile {
            Profile::Email { gmail_canonical } => Normaliser::Email {
                gmail_canonical: *gmail_canonical,
            },
            Profile::Phone { default_country } => Normaliser::Phone {
                country: country(default_country)?,
            },
            Profile::Text => Normaliser::Text,
        })
    }

    /// Writes the normalised form of `raw` into `out` (cleared first).
    pub fn normalise_into(&self, raw: &str, out: &mut String) -> Result<(), Invalid> {
        out.clear();
        match self {
            Normaliser::Email { gmail_canonical } => email_into(raw, *gmail_canonical, out),
            Normaliser::Phone { country } => phone_into(raw, country, out),
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
/// part and are written at gmail.com.
pub fn email(raw: &str, gmail_canonical: bool) -> Result<String, Invalid> {
    let mut out = String::new();
    email_into(raw, gmail_canonical, &mut out)?;
    Ok(out)
}

fn email_into(raw: &str, gmail_canonical: bool, out: &mut String) -> Result<(), Invalid> {
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
    if gmail_canonical && (domain == "gmail.com" || domain == "googlemail.com") {
        // In place: the local part up to any '+' tag, without dots.
        let untagged = local.find('+').unwrap_or(local.len());
        out.truncate(untagged);
        out.retain(|c| c != '.');
        if out.is_empty() {
            return Err(Invalid::NotAnEmail);
        }
        out.push_str("@gmail.com");
    }
    Ok(())
}

/// Shortest and longest national significant numbers accepted outside the
/// North American Numbering Plan, and E.164's 15-digit ceiling.
const MIN_NATIONAL: usize = 4;
const MAX_E164_DIGITS: usize = 15;
const MIN_E164_DIGITS: usize = 8;

/// To E.164 (`+` and up to 15 digits). International input starts with `+`
/// or `00`; anything else is a national number of `default`.
pub fn phone(raw: &str, default: &Country) -> Result<String, Invalid> {
    let mut out = String::new();
    phone_into(raw, default, &mut out)?;
    Ok(out)
}

fn phone_into(raw: &str, default: &Country, out: &mut String) -> Result<(), Invalid> {
    let t = trim(raw);
    if t.is_empty() {
        return Err(Invalid::Empty);
    }
    let (plus, rest) = match t.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, t),
    };
    // Digits go after a leading '+' in `out`; national numbers are rewritten below.
    out.push('+');
    for c in rest.chars() {
        match c {
            '0'..='9' => out.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            _ => return Err(Invalid::NotAPhone),
        }
    }
    if out.len() > 1 + MAX_DIGITS {
        return Err(Invalid::NotAPhone);
    }
    if !plus && out[1..].starts_with("00") {
        out.replace_range(1..3, "");
    } else if !plus {
        // The digits copied out (at most MAX_DIGITS), then written back
        // as E.164: no allocation per number.
        let mut copy = [0u8; MAX_DIGITS];
        let n = out.len() - 1;
        copy[..n].copy_from_slice(&out.as_bytes()[1..]);
        let digits = std::str::from_utf8(&copy[..n]).map_err(|_| Invalid::NotAPhone)?;
        out.truncate(1);
        national(digits, default, out)?;
    }
    let e164 = &out[1..];
    let ok = (MIN_E164_DIGITS..=MAX_E164_DIGITS).contains(&e164.len()) && !e164.starts_with('0');
    if !ok {
        return Err(Invalid::NotAPhone);
    }
    Ok(())
}

/// Digits a phone number may hold before it is refused outright: E.164's
/// 15 and a trunk or international prefix, with room to spare.
const MAX_DIGITS: usize = 24;

/// A national number of `c` as E.164 digits (without `+`), appended to `out`.
fn national(digits: &str, c: &Country, out: &mut String) -> Result<(), Invalid> {
    // The calling code's decimal digits, written into a small buffer.
    let mut cc_text = [0u8; 5];
    let mut start = cc_text.len();
    let mut code = c.calling_code;
    loop {
        start -= 1;
        cc_text[start] = b'0' + (code % 10) as u8;
        code /= 10;
        if code == 0 {
            break;
        }
    }
    let cc = std::str::from_utf8(&cc_text[start..]).map_err(|_| Invalid::NotAPhone)?;
    if c.calling_code == 1 {
        // North American Numbering Plan: 10 digits, optionally after the
        // trunk prefix 1; area code and exchange never start with 0 or 1.
        let nsn = match digits.len() {
            10 => digits,
            11 if digits.starts_with('1') => &digits[1..],
            _ => return Err(Invalid::NotAPhone),
        };
        let b = nsn.as_bytes();
        if b[0] < b'2' || b[3] < b'2' {
            return Err(Invalid::NotAPhone);
        }
        out.push('1');
        out.push_str(nsn);
        return Ok(());
    }
    let nsn = if !c.trunk_prefix.is_empty() && digits.starts_with(c.trunk_prefix) {
        &digits[c.trunk_prefix.len()..]
    } else if digits.starts_with(cc) && digits.len() >= cc.len() + MIN_E164_DIGITS {
        // Already written with the country code, without `+`.
        &digits[cc.len()..]
    } else {
        digits
    };
    if nsn.len() < MIN_NATIONAL || nsn.starts_with('0') {
        return Err(Invalid::NotAPhone);
    }
    out.push_str(cc);
    out.push_str(nsn);
    Ok(())
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

    fn us() -> &'static Country {
        country("US").unwrap()
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

    #[test]
    fn phones() {
        assert_eq!(phone("(415) 555-0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("1-415-555-0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("415.555.0132", us()).unwrap(), "+14155550132");
        assert_eq!(phone("+44 20 7031 3000", us()).unwrap(), "+442070313000");
        assert_eq!(phone("0044 20 7031 3000", us()).unwrap(), "+442070313000");
        let gb = country("GB").unwrap();
        assert_eq!(phone("020 7031 3000", gb).unwrap(), "+442070313000");
        assert_eq!(phone("44 20 7031 3000", gb).unwrap(), "+442070313000");
        for bad in [
            "",
            "12",
            "555-0132",
            "415 555 0132 ext 4",
            "(015) 555-0132",
            "+1234",
            "abc",
            "+1 415 555 0132 0000 0000",
        ] {
            assert!(phone(bad, us()).is_err(), "{bad}");
        }
    }
}
