//! Identifiers: normalisation profiles, keyed fingerprints, blinded points,
//! and the countries the phone profile knows.

pub mod blinding;
mod countries;
mod fingerprint;
mod lanes;
mod normalise;

pub use blinding::{BlindingKey, KeyError};
pub use countries::{Country, country, country_calling_code};
pub use fingerprint::{CONTEXT, Fingerprinter, MIN_SECRET_BYTES, Secret, SecretError};
pub(crate) use normalise::trim;
pub use normalise::{Invalid, Normaliser, email, normalise, phone, text};
