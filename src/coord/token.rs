//! Join tokens and device credentials.
//!
//! A join token is `nx1.` followed by unpadded base64url of 64 bytes: the SHA-256
//! fingerprint of the coordinator's certificate (the node pins it) and a 32-byte random
//! secret. The coordinator stores only the SHA-256 of the secret. Device credentials are
//! 32 random bytes, base64url, likewise stored hashed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use thiserror::Error;

const PREFIX: &str = "nx1.";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("join token must start with {PREFIX}")]
    BadPrefix,
    #[error("join token is not valid base64url")]
    NotBase64,
    #[error("join token has the wrong length")]
    WrongLength,
}

/// A parsed join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the coordinator certificate (DER).
    pub fingerprint: [u8; 32],
    pub secret: [u8; 32],
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenError::BadPrefix)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::NotBase64)?;
        let raw: [u8; 64] = raw.try_into().map_err(|_| TokenError::WrongLength)?;
        let mut fingerprint = [0; 32];
        let mut secret = [0; 32];
        fingerprint.copy_from_slice(&raw[..32]);
        secret.copy_from_slice(&raw[32..]);
        Ok(Self {
            fingerprint,
            secret,
        })
    }

    /// The secret as sent to the coordinator.
    pub fn secret_text(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.secret)
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(&self.fingerprint);
        raw[32..].copy_from_slice(&self.secret);
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }
}

/// Encodes random bytes as a credential or token secret.
pub fn encode_secret(secret: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(secret)
}

/// The stored form of a secret: SHA-256 of its text, lowercase hex.
pub fn hash_secret(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = JoinToken {
            fingerprint: [1; 32],
            secret: [2; 32],
        };
        let text = t.to_string();
        assert!(text.starts_with("nx1."));
        assert_eq!(JoinToken::parse(&text), Ok(t));
    }

    #[test]
    fn garbage_refused() {
        assert_eq!(JoinToken::parse("abc"), Err(TokenError::BadPrefix));
        assert_eq!(JoinToken::parse("nx1.!!"), Err(TokenError::NotBase64));
        assert_eq!(JoinToken::parse("nx1.AAAA"), Err(TokenError::WrongLength));
    }

    #[test]
    fn hash_is_stable_and_not_the_secret() {
        let h = hash_secret("s");
        assert_eq!(h.len(), 64);
        assert_eq!(h, hash_secret("s"));
        assert_ne!(h, hash_secret("t"));
    }
}
