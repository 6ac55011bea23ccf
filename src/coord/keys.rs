//! WireGuard public key checks shared by the coordinator and the node.
//!
//! A key is 32 bytes in standard base64. Low-order Curve25519 points (the seven of
//! small order and their non-canonical encodings) are refused: a Diffie-Hellman with
//! them yields all zeros, which gives no security.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("public key is not valid base64")]
    NotBase64,
    #[error("public key must be 32 bytes, got {0}")]
    WrongLength(usize),
    #[error("public key is a low-order Curve25519 point")]
    LowOrder,
}

/// Parses and checks a base64 WireGuard public key.
pub fn parse_public_key(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| KeyError::NotBase64)?;
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::WrongLength(bytes.len()))?;
    if is_low_order(&key) {
        return Err(KeyError::LowOrder);
    }
    Ok(key)
}

/// True when `key` is a point of small order: its product with any clamped scalar is
/// the identity, which X25519 encodes as all zeros. A table lookup (X25519 ignores the
/// top bit), not a Diffie-Hellman: a node checks every peer's key of a snapshot.
pub fn is_low_order(key: &[u8; 32]) -> bool {
    let mut masked = *key;
    masked[31] &= 0x7f;
    LOW_ORDER.contains(&masked)
}

/// The small-order points of Curve25519 in canonical encoding, plus encodings
/// of the same points above the field prime (as listed by the X25519 literature).
pub const LOW_ORDER: [[u8; 32]; 7] = {
    let zero = [0u8; 32];
    let mut one = [0u8; 32];
    one[0] = 1;
    let a = [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ];
    let b = [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ];
    let mut p_minus_1 = [0xff; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0x7f;
    let mut p = [0xff; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    let mut p_plus_1 = [0xff; 32];
    p_plus_1[0] = 0xee;
    p_plus_1[31] = 0x7f;
    [zero, one, a, b, p_minus_1, p, p_plus_1]
};

/// Encodes a key as standard base64.
pub fn encode_key(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use boringtun::x25519::{PublicKey, StaticSecret};

    /// Whether a Diffie-Hellman with `key` gives no contribution (all zeros).
    fn dh_low_order(key: &[u8; 32]) -> bool {
        !StaticSecret::from([0x5a; 32])
            .diffie_hellman(&PublicKey::from(*key))
            .was_contributory()
    }

    #[test]
    fn low_order_points_refused() {
        for key in LOW_ORDER {
            let mut high = key;
            high[31] |= 0x80;
            for k in [key, high] {
                assert!(dh_low_order(&k), "not low order: {k:02x?}");
                assert!(is_low_order(&k), "{k:02x?}");
                assert_eq!(parse_public_key(&encode_key(&k)), Err(KeyError::LowOrder));
            }
        }
    }

    /// The table agrees with a Diffie-Hellman on keys that are not in it.
    #[test]
    fn table_agrees_with_diffie_hellman() {
        for n in 0u8..=255 {
            let public = *PublicKey::from(&StaticSecret::from([n; 32])).as_bytes();
            let mut near = LOW_ORDER[usize::from(n) % LOW_ORDER.len()];
            near[usize::from(n) % 31] ^= 1 << (n % 8);
            for k in [public, near, [n; 32]] {
                assert_eq!(is_low_order(&k), dh_low_order(&k), "{k:02x?}");
            }
        }
    }

    #[test]
    fn real_key_accepted() {
        let secret = StaticSecret::from([7u8; 32]);
        let public = PublicKey::from(&secret);
        let text = encode_key(public.as_bytes());
        assert_eq!(parse_public_key(&text), Ok(*public.as_bytes()));
    }

    #[test]
    fn malformed_refused() {
        assert_eq!(parse_public_key("not base64!"), Err(KeyError::NotBase64));
        assert_eq!(parse_public_key("AAAA"), Err(KeyError::WrongLength(3)));
    }
}
