//! Admin keys of the HTTPS API (DESIGN §12).
//!
//! A key is `nxa1.` followed by unpadded base64url of 64 bytes: the SHA-256
//! fingerprint of the certificate the API presents (the remote CLI pins it, as nodes
//! pin the coordinator's from a join token) and a 32-byte random secret. The
//! coordinator stores only the SHA-256 of the secret's text and compares hashes in
//! constant time. Pure: the caller supplies the randomness.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;
use thiserror::Error;

use super::token::{encode_secret, hash_secret};

const PREFIX: &str = "nxa1.";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AdminKeyError {
    #[error("an admin key starts with {PREFIX} (see `nexodus admin-key create`)")]
    BadPrefix,
    #[error("the admin key is not valid base64url")]
    NotBase64,
    #[error("the admin key has the wrong length")]
    WrongLength,
}

/// A parsed admin key.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminKeyText {
    /// SHA-256 of the API's certificate (DER).
    pub fingerprint: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for AdminKeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminKeyText")
            .field("fingerprint", &super::token::hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl AdminKeyText {
    pub fn parse(text: &str) -> Result<Self, AdminKeyError> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(AdminKeyError::BadPrefix)?;
        if body.len() > 128 {
            return Err(AdminKeyError::WrongLength);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| AdminKeyError::NotBase64)?;
        let raw: [u8; 64] = raw.try_into().map_err(|_| AdminKeyError::WrongLength)?;
        let mut fingerprint = [0; 32];
        let mut secret = [0; 32];
        fingerprint.copy_from_slice(&raw[..32]);
        secret.copy_from_slice(&raw[32..]);
        Ok(Self {
            fingerprint,
            secret,
        })
    }

    /// What the store keeps: the hash of the secret's text.
    pub fn secret_hash(&self) -> String {
        hash_secret(&encode_secret(&self.secret))
    }
}

impl std::fmt::Display for AdminKeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&self.fingerprint);
        raw[32..].copy_from_slice(&self.secret);
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }
}

/// Whether `presented` (a secret hash) is one of `in_force`. Every candidate is
/// compared in full, in constant time, so the time taken says nothing about how close
/// a guess came.
pub fn matches<'a>(presented: &str, in_force: impl IntoIterator<Item = &'a str>) -> bool {
    let mut found = subtle::Choice::from(0);
    for h in in_force {
        found |= presented.as_bytes().ct_eq(h.as_bytes());
    }
    found.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let k = AdminKeyText {
            fingerprint: [3; 32],
            secret: [4; 32],
        };
        let text = k.to_string();
        assert!(text.starts_with("nxa1."));
        assert_eq!(AdminKeyText::parse(&text), Ok(k.clone()));
        assert_eq!(
            AdminKeyText::parse("nx1.AAAA"),
            Err(AdminKeyError::BadPrefix)
        );
        assert_eq!(
            AdminKeyText::parse("nxa1.!!"),
            Err(AdminKeyError::NotBase64)
        );
        assert_eq!(
            AdminKeyText::parse("nxa1.AAAA"),
            Err(AdminKeyError::WrongLength)
        );
        assert!(!format!("{k:?}").contains(&encode_secret(&k.secret)));
    }

    #[test]
    fn matching_is_by_whole_hash() {
        let k = AdminKeyText {
            fingerprint: [3; 32],
            secret: [4; 32],
        };
        let h = k.secret_hash();
        assert!(matches(&h, ["x", h.as_str()]));
        assert!(!matches(&h[..63], [h.as_str()]));
        assert!(!matches(&h, std::iter::empty()));
    }
}
