//! Secrets at rest: cistern's own provider credentials are stored sealed
//! with AES-256-GCM under a key-encryption key (KEK) that never touches the
//! store (an environment variable or a file). The provider's name is the
//! associated data, so a sealed value cannot be moved to another provider.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

/// A sealed secret: a random 96-bit nonce and the ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// GCM nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext ‖ tag.
    pub ciphertext: Vec<u8>,
}

/// Why sealing or opening failed. Never holds key or secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The KEK is not 32 bytes of base64.
    #[error("the key-encryption key must be 32 bytes, base64-encoded ({0})")]
    BadKek(String),
    /// The sealed value does not open under this KEK for this provider
    /// (wrong key, tampered, or sealed for another provider).
    #[error("the stored credential does not open with this key-encryption key")]
    Open,
    /// The system random generator or the cipher failed.
    #[error("sealing failed")]
    Seal,
}

/// The key-encryption key, zeroized on drop.
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Parses a base64 KEK (`openssl rand -base64 32`).
    pub fn from_base64(text: &str) -> Result<Kek, SealError> {
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| SealError::BadKek("not base64".into()))?,
        );
        if bytes.len() != 32 {
            return Err(SealError::BadKek(format!("{} bytes", bytes.len())));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SealError::Seal)?;
        Ok(Kek(LessSafeKey::new(key)))
    }

    /// Seals `secret` for `provider`.
    pub fn seal(&self, provider: &str, secret: &str) -> Result<Sealed, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Seal)?;
        let mut buf = secret.as_bytes().to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(provider.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Seal)?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            ciphertext: buf,
        })
    }

    /// Opens a value sealed for `provider`.
    pub fn open(&self, provider: &str, sealed: &Sealed) -> Result<Zeroizing<String>, SealError> {
        let nonce: [u8; NONCE_LEN] = sealed
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| SealError::Open)?;
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        let plain = self
            .0
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(provider.as_bytes()),
                &mut buf,
            )
            .map_err(|_| SealError::Open)?;
        let text = std::str::from_utf8(plain).map_err(|_| SealError::Open)?;
        Ok(Zeroizing::new(text.to_owned()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn a_sealed_credential_opens_only_for_its_provider_and_key() {
        let kek = Kek::from_base64(KEK).unwrap();
        let sealed = kek.seal("gitlab", "glpat-secret").unwrap();
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"glpat-"));
        assert_eq!(
            kek.open("gitlab", &sealed).unwrap().as_str(),
            "glpat-secret"
        );
        assert_eq!(kek.open("other", &sealed), Err(SealError::Open));
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(kek.open("gitlab", &tampered), Err(SealError::Open));
        let other = Kek::from_base64(&STANDARD.encode([7u8; 32])).unwrap();
        assert_eq!(other.open("gitlab", &sealed), Err(SealError::Open));
        // Fresh nonce every time.
        assert_ne!(
            kek.seal("gitlab", "x").unwrap().nonce,
            kek.seal("gitlab", "x").unwrap().nonce
        );
        assert!(matches!(
            Kek::from_base64("c2hvcnQ="),
            Err(SealError::BadKek(_))
        ));
        assert!(format!("{kek:?}").contains("redacted"));
    }
}
