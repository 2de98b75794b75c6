//! Typed hashes as Nix writes them: `sha256:<nixbase32>` in narinfo files and
//! content addresses, `sha256-<base64>` (SRI) in `nix path-info --json`.
use crate::nixbase32;
use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use sha2::Digest;
use std::fmt;
use std::str::FromStr;

/// A hash algorithm Nix knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    /// MD5 (16 bytes; only for old fixed-output derivations).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes): NAR hashes, file hashes, store path computation.
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgo {
    /// The name Nix uses (`md5`, `sha1`, `sha256`, `sha512`).
    pub fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_string())),
        }
    }
}

/// A string that is not a valid hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The algorithm name is not one Nix knows.
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    /// Neither `algo:` nor the SRI `algo-` prefix.
    #[error("hash {0:?} has no algorithm prefix (expected e.g. \"sha256:…\")")]
    MissingPrefix(String),
    /// The encoded digest has a length that fits no encoding of this algorithm.
    #[error(
        "{algo} hash {value:?} has length {len}, which fits neither hex, nixbase32 nor base64"
    )]
    BadLength {
        /// The algorithm.
        algo: HashAlgo,
        /// The encoded digest.
        value: String,
        /// Its length in characters.
        len: usize,
    },
    /// The digest does not decode.
    #[error("invalid {encoding} in {algo} hash {value:?}")]
    BadEncoding {
        /// The algorithm.
        algo: HashAlgo,
        /// `hex`, `nixbase32` or `base64`.
        encoding: &'static str,
        /// The encoded digest.
        value: String,
    },
    /// A hash of another algorithm than required.
    #[error("expected a {expected} hash, got {actual}")]
    WrongAlgo {
        /// The required algorithm.
        expected: HashAlgo,
        /// The algorithm given.
        actual: HashAlgo,
    },
}

/// A digest with its algorithm. The digest always has the algorithm's length.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NixHash {
    algo: HashAlgo,
    digest: Vec<u8>,
}

impl NixHash {
    /// A hash from raw digest bytes; `None` if the length does not fit `algo`.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Option<Self> {
        (digest.len() == algo.digest_len()).then(|| Self {
            algo,
            digest: digest.to_vec(),
        })
    }

    /// A SHA-256 hash from its 32 bytes.
    pub fn sha256(digest: [u8; 32]) -> Self {
        Self {
            algo: HashAlgo::Sha256,
            digest: digest.to_vec(),
        }
    }

    /// SHA-256 of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::sha256(sha2::Sha256::digest(data).into())
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The raw digest.
    pub fn digest(&self) -> &[u8] {
        &self.digest
    }

    /// The digest as 32 bytes if this is a SHA-256 hash.
    pub fn as_sha256(&self) -> Option<[u8; 32]> {
        if self.algo != HashAlgo::Sha256 {
            return None;
        }
        self.digest.as_slice().try_into().ok()
    }

    /// Lowercase hex of the digest (no prefix).
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.digest)
    }

    /// nixbase32 of the digest (no prefix).
    pub fn to_nixbase32(&self) -> String {
        nixbase32::encode(&self.digest)
    }

    /// The SRI form `algo-<base64>`, as `nix path-info --json` writes it.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, BASE64.encode(&self.digest))
    }

    /// Parses an unprefixed digest of a known algorithm, in any encoding Nix
    /// accepts, told apart by length: hex, nixbase32 or (padded) base64.
    pub fn parse_unprefixed(algo: HashAlgo, s: &str) -> Result<Self, HashError> {
        let n = algo.digest_len();
        let bad = |encoding| HashError::BadEncoding {
            algo,
            encoding,
            value: s.to_string(),
        };
        let digest = if s.len() == 2 * n {
            HEXLOWER_PERMISSIVE
                .decode(s.as_bytes())
                .map_err(|_| bad("hex"))?
        } else if s.len() == nixbase32::encode_len(n) {
            nixbase32::decode(s).map_err(|_| bad("nixbase32"))?
        } else if s.len() == BASE64.encode_len(n) {
            BASE64.decode(s.as_bytes()).map_err(|_| bad("base64"))?
        } else {
            return Err(HashError::BadLength {
                algo,
                value: s.to_string(),
                len: s.len(),
            });
        };
        // Every branch decodes to exactly `n` bytes, but stay total.
        Self::new(algo, &digest).ok_or_else(|| bad("digest"))
    }

    /// Parses `algo:<hex|nixbase32|base64>` or SRI `algo-<base64>`.
    pub fn parse_prefixed(s: &str) -> Result<Self, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            return Self::parse_unprefixed(algo.parse()?, rest);
        }
        if let Some((algo, rest)) = s.split_once('-') {
            let algo: HashAlgo = algo.parse()?;
            if rest.len() != BASE64.encode_len(algo.digest_len()) {
                return Err(HashError::BadLength {
                    algo,
                    value: rest.to_string(),
                    len: rest.len(),
                });
            }
            return Self::parse_unprefixed(algo, rest);
        }
        Err(HashError::MissingPrefix(s.to_string()))
    }
}

/// `algo:<nixbase32>`, as Nix writes hashes in narinfo files and content addresses.
impl fmt::Display for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nixbase32())
    }
}

impl fmt::Debug for NixHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NixHash({self})")
    }
}

impl FromStr for NixHash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_prefixed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // printf 'hello\n' > hello.txt; nix-hash --type sha256 hello.txt (NAR hash, hex) and --base32;
    // `nix path-info --json` of `nix-store --add hello.txt` gives the SRI form.
    const HEX: &str = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13";
    const B32: &str = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";
    const SRI: &str = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=";

    #[test]
    fn all_encodings_agree() {
        let a: NixHash = format!("sha256:{B32}").parse().unwrap();
        let b: NixHash = format!("sha256:{HEX}").parse().unwrap();
        let c: NixHash = SRI.parse().unwrap();
        let d: NixHash = format!("sha256:{}", &SRI[7..]).parse().unwrap();
        let e: NixHash = format!("sha256:{}", HEX.to_uppercase()).parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a, e);
        assert_eq!(a.to_string(), format!("sha256:{B32}"));
        assert_eq!(a.to_hex(), HEX);
        assert_eq!(a.to_sri(), SRI);
        assert_eq!(a.algo(), HashAlgo::Sha256);
        assert!(a.as_sha256().is_some());
    }

    #[test]
    fn sha256_of_matches_nix() {
        // printf 'hello\n' | nix-hash --type sha256 --flat --base32 /dev/stdin
        assert_eq!(
            NixHash::sha256_of(b"hello\n").to_string(),
            "sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
        );
    }

    #[test]
    fn other_algorithms() {
        // nix-hash --type sha1 --flat [--base32] hello.txt
        let h: NixHash = "sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm".parse().unwrap();
        assert_eq!(h.to_hex(), "f572d396fae9206628714fb2ce00f72e94f2258f");
        assert_eq!(h.as_sha256(), None);
        // nix-hash --type md5 --flat [--base32] hello.txt
        let h: NixHash = "md5:b1946ac92492d2347c6235b4d2611184".parse().unwrap();
        assert_eq!(h.to_string(), "md5:4425hx5d1mc9y39llj4k4nm55i");
    }

    #[test]
    fn rejects_bad_hashes() {
        assert!(matches!(
            "sha256".parse::<NixHash>(),
            Err(HashError::MissingPrefix(_))
        ));
        assert!(matches!(
            "sha257:abc".parse::<NixHash>(),
            Err(HashError::UnknownAlgo(_))
        ));
        assert!(matches!(
            "sha256:abc".parse::<NixHash>(),
            Err(HashError::BadLength { len: 3, .. })
        ));
        let bad_b32 = format!("sha256:{}e", &B32[..51]);
        assert!(matches!(
            bad_b32.parse::<NixHash>(),
            Err(HashError::BadEncoding {
                encoding: "nixbase32",
                ..
            })
        ));
        let bad_hex = format!("sha256:{}g", &HEX[..63]);
        assert!(matches!(
            bad_hex.parse::<NixHash>(),
            Err(HashError::BadEncoding {
                encoding: "hex",
                ..
            })
        ));
        // SRI takes base64 only.
        assert!(matches!(
            format!("sha256-{HEX}").parse::<NixHash>(),
            Err(HashError::BadLength { .. })
        ));
        assert_eq!(NixHash::new(HashAlgo::Sha256, &[0; 31]), None);
    }
}
