//! Keyed fingerprints of normalised identifiers.
//!
//! ```text
//! key         = BLAKE3-derive_key(CONTEXT, le32(len(secret)) || secret || salt || le32(len(kind)) || kind)
//! fingerprint = BLAKE3-keyed_hash(key, utf8(normalised value))      (32 bytes)
//! ```
//!
//! The secret is shared by the partners and never reaches the server, so the
//! server cannot test guesses; the agreement's salt and the identity kind
//! make fingerprints of one person unlinkable across agreements and kinds.

use std::fmt;
use std::path::Path;

/// BLAKE3 key-derivation context string; changing it changes every fingerprint.
pub const CONTEXT: &str = "cleanroom 2026-11-24 fingerprint key v1";

/// Smallest accepted shared secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The partners' shared secret. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret was not accepted. Never carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: the secret must be hex digits (as `cleanroom secret new` writes)")]
    NotHex { origin: String },
    #[error("{origin}: the secret must be at least {MIN_SECRET_BYTES} bytes ({got} given)")]
    TooShort { origin: String, got: usize },
}

impl Secret {
    /// From raw bytes (at least 32).
    pub fn from_bytes(bytes: Vec<u8>, origin: &str) -> Result<Self, SecretError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError::TooShort {
                origin: origin.to_string(),
                got: bytes.len(),
            });
        }
        Ok(Secret(bytes))
    }

    /// From hex text, surrounding white space ignored.
    pub fn from_hex(text: &str, origin: &str) -> Result<Self, SecretError> {
        let bytes = hex::decode(text.trim()).map_err(|_| SecretError::NotHex {
            origin: origin.to_string(),
        })?;
        Self::from_bytes(bytes, origin)
    }

    /// From a file holding hex text.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_hex(&text, &path.display().to_string())
    }

    /// 32 fresh random bytes.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; MIN_SECRET_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the system random source failed");
        Secret(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

/// Fingerprints values of one identity kind in one agreement.
#[derive(Clone)]
pub struct Fingerprinter {
    key: [u8; 32],
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprinter(..)")
    }
}

impl Fingerprinter {
    pub fn new(secret: &Secret, salt: &[u8; 32], kind: &str) -> Self {
        let mut material = Vec::with_capacity(8 + secret.0.len() + 32 + kind.len());
        material.extend_from_slice(&(secret.0.len() as u32).to_le_bytes());
        material.extend_from_slice(&secret.0);
        material.extend_from_slice(salt);
        material.extend_from_slice(&(kind.len() as u32).to_le_bytes());
        material.extend_from_slice(kind.as_bytes());
        Fingerprinter {
            key: blake3::derive_key(CONTEXT, &material),
        }
    }

    /// The fingerprint of an already normalised value.
    pub fn fingerprint(&self, normalised: &str) -> [u8; 32] {
        *blake3::keyed_hash(&self.key, normalised.as_bytes()).as_bytes()
    }

    /// The fingerprints of many normalised values, in order, appended to
    /// `out` (32 bytes each); the same bytes as [`Self::fingerprint`] of
    /// each, several at a time.
    pub fn fingerprint_all<'a>(
        &self,
        normalised: impl IntoIterator<Item = &'a str>,
        out: &mut Vec<u8>,
    ) {
        super::lanes::keyed_hash_all(&self.key, normalised.into_iter().map(str::as_bytes), out);
    }
}
