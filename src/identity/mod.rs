//! Identifiers: normalisation profiles (phone numbers by libphonenumber's
//! metadata), keyed fingerprints, blinded points.

pub mod blinding;
mod fingerprint;
mod lanes;
mod normalise;
mod profile;

pub use blinding::{BlindingKey, KeyError};
pub use fingerprint::{CONTEXT, Fingerprinter, MIN_SECRET_BYTES, Secret, SecretError};
pub(crate) use normalise::trim;
pub use normalise::{
    Country, Gmail, Invalid, Normaliser, PHONE_METADATA, country, email, normalise, phone, text,
};
pub use profile::{Profile, Standard};
