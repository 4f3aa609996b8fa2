//! Blinded identifiers, for agreements that match without a shared secret
//! (`matching = "ecdh"`; the protocol is in `docs/matching.md`).
//!
//! ```text
//! wide  = BLAKE3-derive_key(HASH_CONTEXT) XOF, 64 bytes, of
//!         salt || le32(len(kind)) || kind || utf8(normalised value)
//! H(v)  = ristretto255 one-way map (RFC 9496 section 4.3.4) of wide
//! blind = compress(a * H(v))              a: the party's secret scalar
//! ```
//!
//! Each party blinds its own identifiers with its scalar `a` before they
//! leave its machine, and blinds its partner's points once more with the
//! same scalar. Multiplication commutes, so `a * (b * H(v)) = b * (a * H(v))`:
//! both datasets meet on doubly blinded points that neither party can make
//! alone.

use std::fmt;
use std::path::Path;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rayon::prelude::*;
use zeroize::Zeroize;

/// BLAKE3 key-derivation context of the hash to the group; changing it
/// changes every point.
pub const HASH_CONTEXT: &str = "cleanroom 2026-11-25 ristretto255 identifier v1";

/// Length of a compressed point, the only form points take outside memory.
pub const POINT_LEN: usize = 32;

/// Points per relayed message: 2 MiB, well under gRPC's 4 MiB limit.
pub const POINTS_PER_MESSAGE: usize = 65_536;

/// Points handled by one task: large enough that one field inversion per
/// batch costs nothing, small enough to spread over every core.
const BATCH: usize = 2048;

/// A party's secret scalar. Its `Debug` never shows it; every copy is
/// wiped from memory when dropped.
#[derive(Clone)]
pub struct BlindingKey(Scalar);

impl fmt::Debug for BlindingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlindingKey(..)")
    }
}

impl Drop for BlindingKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Why a blinding key was not accepted. Never carries the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{origin}: a blinding key is 64 hex digits, a canonical non-zero scalar (as `cleanroom key new` writes)"
    )]
    Malformed { origin: String },
}

impl BlindingKey {
    /// A fresh uniformly random non-zero scalar from the system's source.
    pub fn generate() -> Self {
        let rng = ring::rand::SystemRandom::new();
        loop {
            let mut wide = [0u8; 64];
            ring::rand::SecureRandom::fill(&rng, &mut wide)
                .expect("the system random source failed");
            let scalar = Scalar::from_bytes_mod_order_wide(&wide);
            wide.zeroize();
            if scalar != Scalar::ZERO {
                return BlindingKey(scalar);
            }
        }
    }

    /// From its 32 canonical little-endian bytes.
    pub fn from_bytes(mut bytes: [u8; 32], origin: &str) -> Result<Self, KeyError> {
        let scalar: Option<Scalar> = Scalar::from_canonical_bytes(bytes).into();
        bytes.zeroize();
        match scalar {
            Some(s) if s != Scalar::ZERO => Ok(BlindingKey(s)),
            _ => Err(KeyError::Malformed {
                origin: origin.to_string(),
            }),
        }
    }

    /// From hex text, surrounding white space ignored.
    pub fn from_hex(text: &str, origin: &str) -> Result<Self, KeyError> {
        let malformed = || KeyError::Malformed {
            origin: origin.to_string(),
        };
        let mut bytes = hex::decode(text.trim()).map_err(|_| malformed())?;
        let fixed: Result<[u8; 32], _> = bytes.as_slice().try_into();
        bytes.zeroize();
        Self::from_bytes(fixed.map_err(|_| malformed())?, origin)
    }

    /// From a file holding hex text.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let mut text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let key = Self::from_hex(&text, &path.display().to_string());
        text.zeroize();
        key
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// The key's public id: the compressed `a*B` for the group's generator
    /// `B`. It tells the server which key made a party's points (so a
    /// changed key is noticed) and reveals nothing usable of `a`.
    pub fn key_id(&self) -> [u8; POINT_LEN] {
        RistrettoPoint::mul_base(&self.0).compress().to_bytes()
    }

    /// This party's scalar times `point`, for tests and vectors.
    pub fn mul(&self, point: &RistrettoPoint) -> RistrettoPoint {
        self.0 * point
    }
}

/// The point of a normalised identifier of one kind in one agreement.
pub fn hash_to_point(salt: &[u8; 32], kind: &str, normalised: &str) -> RistrettoPoint {
    RistrettoPoint::from_uniform_bytes(&wide_hash(salt, kind, normalised))
}

/// The 64 bytes the one-way map takes, for vectors.
pub fn wide_hash(salt: &[u8; 32], kind: &str, normalised: &str) -> [u8; 64] {
    let mut h = blake3::Hasher::new_derive_key(HASH_CONTEXT);
    h.update(salt);
    h.update(&(kind.len() as u32).to_le_bytes());
    h.update(kind.as_bytes());
    h.update(normalised.as_bytes());
    let mut wide = [0u8; 64];
    h.finalize_xof().fill(&mut wide);
    wide
}

/// Blinds a party's own normalised identifiers of one kind: the compressed
/// `a * H(v)` of each, in order, over every core.
pub fn blind_values(
    key: &BlindingKey,
    salt: &[u8; 32],
    kind: &str,
    values: &[&str],
) -> Vec<[u8; POINT_LEN]> {
    let half = half_of(key);
    values
        .par_chunks(BATCH)
        .flat_map_iter(|chunk| {
            let points: Vec<RistrettoPoint> = chunk
                .iter()
                .map(|v| half * hash_to_point(salt, kind, v))
                .collect();
            compress_doubled(&points)
        })
        .collect()
}

/// A point received for blinding is not the canonical encoding of a
/// non-identity group element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("point {index} is not a canonical non-identity ristretto255 encoding")]
pub struct BadPoint {
    pub index: usize,
}

/// Blinds a partner's points once more: the compressed `a * P` of each
/// compressed `P`, in order, over every core. Every point is checked.
pub fn reblind(
    key: &BlindingKey,
    points: &[[u8; POINT_LEN]],
) -> Result<Vec<[u8; POINT_LEN]>, BadPoint> {
    let half = half_of(key);
    let chunks: Vec<Result<Vec<[u8; POINT_LEN]>, BadPoint>> = points
        .par_chunks(BATCH)
        .enumerate()
        .map(|(c, chunk)| {
            let mut blinded = Vec::with_capacity(chunk.len());
            for (i, bytes) in chunk.iter().enumerate() {
                let p = decompress(bytes).ok_or(BadPoint {
                    index: c * BATCH + i,
                })?;
                blinded.push(half * p);
            }
            Ok(compress_doubled(&blinded))
        })
        .collect();
    let mut out = Vec::with_capacity(points.len());
    for chunk in chunks {
        out.extend(chunk?);
    }
    Ok(out)
}

/// A canonical non-identity point, or None.
pub fn decompress(bytes: &[u8; POINT_LEN]) -> Option<RistrettoPoint> {
    CompressedRistretto(*bytes)
        .decompress()
        .filter(|p| *p != RistrettoPoint::identity())
}

/// `a / 2`: a batch is multiplied by half the scalar and then doubled and
/// compressed together, which shares one field inversion per batch.
fn half_of(key: &BlindingKey) -> Scalar {
    key.0 * Scalar::from(2u8).invert()
}

fn compress_doubled(points: &[RistrettoPoint]) -> Vec<[u8; POINT_LEN]> {
    RistrettoPoint::double_and_compress_batch(points)
        .into_iter()
        .map(|c| c.to_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> BlindingKey {
        BlindingKey::from_bytes([n; 32].map(|b| b & 0x0f), "test").unwrap()
    }

    #[test]
    fn blinding_commutes_and_batches_agree_with_single_multiplication() {
        let (a, b) = (key(3), key(7));
        let salt = [9u8; 32];
        let values: Vec<String> = (0..5000).map(|i| format!("u{i}@example.com")).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let by_a = blind_values(&a, &salt, "email", &refs);
        let by_b = blind_values(&b, &salt, "email", &refs);
        for (i, v) in refs.iter().enumerate().step_by(997) {
            let single = a
                .mul(&hash_to_point(&salt, "email", v))
                .compress()
                .to_bytes();
            assert_eq!(by_a[i], single);
        }
        assert_eq!(reblind(&b, &by_a).unwrap(), reblind(&a, &by_b).unwrap());
        assert_ne!(by_a, by_b);
    }

    /// `tests/vectors/ecdh.toml` comes from a second implementation
    /// (`docs/vectors/ecdh_vectors.py`, pure Python from RFC 9496); each
    /// step of the product's own path must give the same bytes.
    #[test]
    fn vectors_from_the_python_implementation() {
        let text = include_str!("../../tests/vectors/ecdh.toml");
        let vectors: toml::Table = toml::from_str(text).unwrap();
        let hex32 = |v: &toml::Value| -> [u8; 32] {
            hex::decode(v.as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        };
        let salt = hex32(&vectors["salt"]);
        let a = BlindingKey::from_hex(vectors["a"].as_str().unwrap(), "a").unwrap();
        let b = BlindingKey::from_hex(vectors["b"].as_str().unwrap(), "b").unwrap();
        let maps = vectors["one_way_map"].as_array().unwrap();
        assert_eq!(maps.len(), 7);
        for m in maps {
            let wide: [u8; 64] = hex::decode(m["wide"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let point = RistrettoPoint::from_uniform_bytes(&wide).compress();
            assert_eq!(point.to_bytes(), hex32(&m["point"]));
        }
        let identifiers = vectors["identifier"].as_array().unwrap();
        assert_eq!(identifiers.len(), 5);
        for v in identifiers {
            let (kind, value) = (v["kind"].as_str().unwrap(), v["value"].as_str().unwrap());
            assert_eq!(
                hex::encode(wide_hash(&salt, kind, value)),
                v["wide"].as_str().unwrap()
            );
            let point = hash_to_point(&salt, kind, value).compress().to_bytes();
            assert_eq!(point, hex32(&v["point"]), "{kind}");
            let by_a = blind_values(&a, &salt, kind, &[value])[0];
            let by_b = blind_values(&b, &salt, kind, &[value])[0];
            assert_eq!(by_a, hex32(&v["blinded_a"]));
            assert_eq!(by_b, hex32(&v["blinded_b"]));
            let double = hex32(&v["double"]);
            assert_eq!(reblind(&b, &[by_a]).unwrap()[0], double);
            assert_eq!(reblind(&a, &[by_b]).unwrap()[0], double);
        }
    }

    #[test]
    fn malformed_and_identity_points_are_refused_by_index() {
        let a = key(3);
        let good = blind_values(&a, &[1; 32], "phone", &["+15550100"])[0];
        let identity = RistrettoPoint::identity().compress().to_bytes();
        let mut not_canonical = good;
        not_canonical[31] |= 0x80;
        for bad in [identity, not_canonical, [0xff; 32]] {
            let points = vec![good; BATCH + 5]
                .into_iter()
                .chain([bad])
                .collect::<Vec<_>>();
            assert_eq!(reblind(&a, &points), Err(BadPoint { index: BATCH + 5 }));
        }
    }

    #[test]
    fn keys_are_canonical_non_zero_scalars_and_never_printed() {
        assert!(BlindingKey::from_bytes([0; 32], "k").is_err());
        assert!(BlindingKey::from_bytes([0xff; 32], "k").is_err());
        assert!(BlindingKey::from_hex("00", "k").is_err());
        let k = BlindingKey::generate();
        let again = BlindingKey::from_hex(&k.to_hex(), "k").unwrap();
        assert_eq!(again.0, k.0);
        assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
        let err = BlindingKey::from_hex(&format!("{}zz", k.to_hex()), "file.key").unwrap_err();
        assert!(!err.to_string().contains(&k.to_hex()[..8]));
    }
}
