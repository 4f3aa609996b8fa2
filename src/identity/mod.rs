//! Identifiers: normalisation profiles, keyed fingerprints, and the countries
//! the phone profile knows.

mod countries;
mod fingerprint;
mod normalise;

pub use countries::{Country, country, country_calling_code};
pub use fingerprint::{
    CONTEXT, Fingerprinter, MIN_SECRET_BYTES, PrefixHash, PrefixHasher, Secret, SecretError,
};
pub use normalise::{Invalid, Normaliser, email, normalise, phone, text};
