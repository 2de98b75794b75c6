//! BLAKE3 digests, the addresses of blobs, chunks and directories.
use bytes::Bytes;
use std::fmt;
use std::str::FromStr;

/// Length of a BLAKE3 digest in bytes.
pub const B3_LEN: usize = 32;

/// A BLAKE3 digest (32 bytes, unkeyed). Shown as lowercase hex, as `b3sum` prints it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; B3_LEN]);

/// A byte string that is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The digest has the wrong number of bytes.
    #[error("invalid digest length: expected {B3_LEN} bytes, got {0}")]
    InvalidLength(usize),
    /// The text is not 64 hex characters.
    #[error("invalid hex digest {0:?}: expected 64 hex characters")]
    InvalidHex(String),
}

impl B3Digest {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; B3_LEN] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest as `Bytes`, for wire messages.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(&self.0)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl From<[u8; B3_LEN]> for B3Digest {
    fn from(b: [u8; B3_LEN]) -> Self {
        Self(b)
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = DigestError;
    fn try_from(v: &[u8]) -> Result<Self, Self::Error> {
        let arr: [u8; B3_LEN] = v
            .try_into()
            .map_err(|_| DigestError::InvalidLength(v.len()))?;
        Ok(Self(arr))
    }
}

impl TryFrom<Bytes> for B3Digest {
    type Error = DigestError;
    fn try_from(v: Bytes) -> Result<Self, Self::Error> {
        B3Digest::try_from(v.as_ref())
    }
}

impl TryFrom<&Bytes> for B3Digest {
    type Error = DigestError;
    fn try_from(v: &Bytes) -> Result<Self, Self::Error> {
        B3Digest::try_from(v.as_ref())
    }
}

impl FromStr for B3Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; B3_LEN];
        if s.len() != 2 * B3_LEN {
            return Err(DigestError::InvalidHex(s.to_string()));
        }
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::InvalidHex(s.to_string()))?;
        Ok(Self(out))
    }
}

impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_hello_world_vectors() {
        assert_eq!(
            B3Digest::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            B3Digest::of(b"Hello World!").to_hex(),
            "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"
        );
    }

    #[test]
    fn parse_hex_roundtrip_and_errors() {
        let d = B3Digest::of(b"x");
        assert_eq!(d.to_hex().parse::<B3Digest>().unwrap(), d);
        assert_eq!(d.to_hex().to_uppercase().parse::<B3Digest>().unwrap(), d);
        assert!(matches!(
            "abc".parse::<B3Digest>(),
            Err(DigestError::InvalidHex(_))
        ));
        assert!(matches!(
            "zz".repeat(32).parse::<B3Digest>(),
            Err(DigestError::InvalidHex(_))
        ));
        assert_eq!(
            B3Digest::try_from(&[0u8; 31][..]),
            Err(DigestError::InvalidLength(31))
        );
        assert_eq!(
            B3Digest::try_from(&[0u8; 33][..]),
            Err(DigestError::InvalidLength(33))
        );
    }
}
