//! How identifiers of one kind are spelt before fingerprinting: the
//! profile an agreement names for each identity kind, and the standard
//! whose rules it follows.

/// How identifiers of one kind are normalised before fingerprinting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// Trim and lower-case, then the gmail rule of `standard` (under ours:
    /// with `gmail_canonical`, drop dots and `+tag` on gmail.com and
    /// googlemail.com).
    Email {
        gmail_canonical: bool,
        standard: Standard,
    },
    /// A valid number by libphonenumber's metadata, national numbers read
    /// in `default_country` (ISO 3166 alpha-2); written as `standard` says.
    Phone {
        default_country: String,
        standard: Standard,
    },
    /// Trim and lower-case.
    Text,
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Email { .. } => "email",
            Profile::Phone { .. } => "phone",
            Profile::Text => "text",
        }
    }

    /// The standard the spelling follows (ours for text).
    pub fn standard(&self) -> Standard {
        match self {
            Profile::Email { standard, .. } | Profile::Phone { standard, .. } => *standard,
            Profile::Text => Standard::Cleanroom,
        }
    }
}

/// Whose normalisation rules an identity kind follows: ours, or those of a
/// destination partners already upload to, so that a partner's other tools
/// and the clean room spell a person alike. `docs/fingerprints.md` gives
/// each rule with its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standard {
    /// Ours: E.164 with `+`; the gmail rule only with `gmail_canonical`.
    Cleanroom,
    /// Google Customer Match: E.164 with `+`; dots dropped from gmail.com
    /// and googlemail.com addresses.
    Google,
    /// Meta: the digits of the international number, no `+`; no gmail rule.
    Meta,
    /// Unified ID 2.0: E.164 with `+`; dots and `+tag` dropped from
    /// gmail.com addresses.
    Uid2,
}

impl Standard {
    pub const ALL: [Standard; 4] = [
        Standard::Cleanroom,
        Standard::Google,
        Standard::Meta,
        Standard::Uid2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Standard::Cleanroom => "cleanroom",
            Standard::Google => "google",
            Standard::Meta => "meta",
            Standard::Uid2 => "uid2",
        }
    }

    pub fn parse(text: &str) -> Option<Standard> {
        Standard::ALL.into_iter().find(|s| s.as_str() == text)
    }
}
