//! Envelope encryption with AES-256-GCM (ring): a master key wraps one data
//! key per agreement; data keys encrypt dataset files chunk by chunk.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

pub(crate) const KEY_LEN: usize = 32;
pub(crate) const TAG_LEN: usize = 16;

/// An AES-256-GCM key. No `Debug` of its bytes.
pub(crate) struct Key(LessSafeKey);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CryptoError {
    #[error("the system random source failed")]
    Random,
    #[error("decryption failed: wrong key or tampered data")]
    Open,
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError::Random)?;
    Ok(out)
}

impl Key {
    pub(crate) fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte key fits AES-256");
        Key(LessSafeKey::new(unbound))
    }

    /// `nonce || ciphertext || tag`, with a fresh random 96-bit nonce.
    pub(crate) fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let nonce_bytes = random_bytes::<NONCE_LEN>()?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(plaintext);
        let mut body = out.split_off(NONCE_LEN);
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| CryptoError::Open)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// As [`Key::open`], decrypting in place: the plaintext is `sealed`'s
    /// own allocation, moved to its start, with no second copy of a chunk.
    pub(crate) fn open_owned(
        &self,
        mut sealed: Vec<u8>,
        aad: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Open);
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN])
            .map_err(|_| CryptoError::Open)?;
        let plain_len = self
            .0
            .open_within(nonce, Aad::from(aad), &mut sealed, NONCE_LEN..)
            .map_err(|_| CryptoError::Open)?
            .len();
        sealed.truncate(plain_len);
        Ok(sealed)
    }

    /// Opens what [`Key::seal`] produced with the same `aad`.
    pub(crate) fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoError::Open)?;
        let mut buf = body.to_vec();
        let plain_len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| CryptoError::Open)?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_in_place_matches_opening_by_copy() {
        let key = Key::from_bytes(&[7u8; KEY_LEN]);
        let sealed = key.seal(b"chunk of rows", b"aad").unwrap();
        assert_eq!(
            key.open_owned(sealed.clone(), b"aad").unwrap(),
            b"chunk of rows"
        );
        assert!(key.open_owned(sealed.clone(), b"other").is_err());
        let mut tampered = sealed;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.open_owned(tampered, b"aad").is_err());
        assert!(
            key.open_owned(vec![0; NONCE_LEN + TAG_LEN - 1], b"aad")
                .is_err()
        );
    }

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let key = Key::from_bytes(&[7u8; 32]);
        let sealed = key.seal(b"hello", b"aad").unwrap();
        assert_eq!(key.open(&sealed, b"aad").unwrap(), b"hello");
        assert!(key.open(&sealed, b"other aad").is_err());
        let mut tampered = sealed.clone();
        tampered[NONCE_LEN] ^= 1;
        assert!(key.open(&tampered, b"aad").is_err());
        let other = Key::from_bytes(&[8u8; 32]);
        assert!(other.open(&sealed, b"aad").is_err());
    }
}
