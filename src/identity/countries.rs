//! Countries the phone profile can read national numbers for: ISO 3166-1
//! alpha-2 code, ITU-T E.164 country calling code, and the national trunk
//! prefix dialled before a national number (ITU-T E.164 assignments list).

/// A country the phone profile supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country {
    /// ISO 3166-1 alpha-2, upper case.
    pub code: &'static str,
    /// E.164 country calling code.
    pub calling_code: u16,
    /// National trunk prefix, removed from national numbers ("" if none).
    pub trunk_prefix: &'static str,
}

const fn c(code: &'static str, calling_code: u16, trunk_prefix: &'static str) -> Country {
    Country {
        code,
        calling_code,
        trunk_prefix,
    }
}

const COUNTRIES: &[Country] = &[
    c("AE", 971, "0"),
    c("AR", 54, "0"),
    c("AT", 43, "0"),
    c("AU", 61, "0"),
    c("BE", 32, "0"),
    c("BR", 55, "0"),
    c("CA", 1, "1"),
    c("CH", 41, "0"),
    c("CL", 56, ""),
    c("CN", 86, "0"),
    c("CO", 57, ""),
    c("CZ", 420, ""),
    c("DE", 49, "0"),
    c("DK", 45, ""),
    c("EG", 20, "0"),
    c("ES", 34, ""),
    c("FI", 358, "0"),
    c("FR", 33, "0"),
    c("GB", 44, "0"),
    c("GR", 30, ""),
    c("HK", 852, ""),
    c("HU", 36, "06"),
    c("ID", 62, "0"),
    c("IE", 353, "0"),
    c("IL", 972, "0"),
    c("IN", 91, "0"),
    c("IT", 39, ""),
    c("JP", 81, "0"),
    c("KR", 82, "0"),
    c("MX", 52, ""),
    c("MY", 60, "0"),
    c("NG", 234, "0"),
    c("NL", 31, "0"),
    c("NO", 47, ""),
    c("NZ", 64, "0"),
    c("PE", 51, "0"),
    c("PH", 63, "0"),
    c("PL", 48, ""),
    c("PT", 351, ""),
    c("RO", 40, "0"),
    c("SA", 966, "0"),
    c("SE", 46, "0"),
    c("SG", 65, ""),
    c("TH", 66, "0"),
    c("TR", 90, "0"),
    c("TW", 886, "0"),
    c("UA", 380, "0"),
    c("US", 1, "1"),
    c("VN", 84, "0"),
    c("ZA", 27, "0"),
];

/// The supported country with this ISO 3166-1 alpha-2 code (upper case).
pub fn country(code: &str) -> Option<&'static Country> {
    COUNTRIES.iter().find(|c| c.code == code)
}

/// The E.164 calling code of a supported country.
pub fn country_calling_code(code: &str) -> Option<u16> {
    country(code).map(|c| c.calling_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for pair in COUNTRIES.windows(2) {
            assert!(
                pair[0].code < pair[1].code,
                "{} then {}",
                pair[0].code,
                pair[1].code
            );
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(country_calling_code("GB"), Some(44));
        assert_eq!(country_calling_code("US"), Some(1));
        assert_eq!(country_calling_code("us"), None);
        assert_eq!(country_calling_code("XX"), None);
    }
}
