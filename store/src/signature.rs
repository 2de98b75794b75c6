//! ed25519 signatures over store path fingerprints, in Nix's formats.
//!
//! - fingerprint: `1;<store path>;<sha256:nixbase32 NAR hash>;<NAR size>;<comma-joined sorted reference paths>`
//! - secret key file: `name:base64(32-byte seed ‖ 32-byte public key)` (`nix key generate-secret`)
//! - public key: `name:base64(32 bytes)` (`nix key convert-secret-to-public`, `trusted-public-keys`)
//! - signature (`Sig:` in narinfo): `name:base64(64-byte signature)`
use crate::hash::NixHash;
use crate::store_path::StorePath;
use data_encoding::BASE64;
use ed25519_dalek::Signer;
use std::fmt;
use std::str::FromStr;

/// Length of an ed25519 signature in bytes.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of a Nix secret key (seed and public key) in bytes.
pub const SECRET_KEY_LEN: usize = 64;

/// A key or signature that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `name:` prefix, or an empty name.
    #[error("expected \"name:base64\", got {0:?}")]
    MissingName(String),
    /// The part after the name is not base64.
    #[error("invalid base64 in {what} named {name:?}")]
    BadBase64 {
        /// `signature`, `public key` or `secret key`.
        what: &'static str,
        /// The key name.
        name: String,
    },
    /// The decoded bytes have the wrong length.
    #[error("{what} named {name:?} is {actual} bytes long, expected {expected}")]
    BadLength {
        /// `signature`, `public key` or `secret key`.
        what: &'static str,
        /// The key name.
        name: String,
        /// Decoded length.
        actual: usize,
        /// Required length.
        expected: usize,
    },
    /// The public key is not a valid ed25519 point.
    #[error("public key named {0:?} is not a valid ed25519 key")]
    InvalidPublicKey(String),
    /// The second half of a secret key is not the public key of its first half.
    #[error("secret key named {0:?}: the public half does not match the seed")]
    MismatchedKeyPair(String),
}

/// The fingerprint Nix signs for a store path:
/// `1;<path>;<sha256:nixbase32>;<nar size>;<references, sorted, comma-joined>`.
pub fn fingerprint<'a>(
    store_path: &StorePath,
    nar_hash: &NixHash,
    nar_size: u64,
    references: impl IntoIterator<Item = &'a StorePath>,
) -> String {
    let mut refs: Vec<String> = references.into_iter().map(|r| r.to_string()).collect();
    // Nix joins a std::set of path strings: sorted, no duplicates.
    refs.sort();
    refs.dedup();
    format!("1;{store_path};{nar_hash};{nar_size};{}", refs.join(","))
}

/// Splits `name:base64` and decodes the payload into exactly `N` bytes.
fn parse_named<const N: usize>(
    s: &str,
    what: &'static str,
) -> Result<(String, [u8; N]), SignatureError> {
    let s = s.trim_end_matches(['\n', '\r', ' ', '\t']);
    let (name, payload) = s
        .split_once(':')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
        .ok_or_else(|| SignatureError::MissingName(s.to_string()))?;
    let bytes = BASE64
        .decode(payload.as_bytes())
        .map_err(|_| SignatureError::BadBase64 {
            what,
            name: name.to_string(),
        })?;
    let arr: [u8; N] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| SignatureError::BadLength {
            what,
            name: name.to_string(),
            actual: bytes.len(),
            expected: N,
        })?;
    Ok((name.to_string(), arr))
}

/// A named ed25519 signature, as in a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    name: String,
    bytes: [u8; SIGNATURE_LEN],
}

impl Signature {
    /// A signature from its parts.
    pub fn new(name: impl Into<String>, bytes: [u8; SIGNATURE_LEN]) -> Self {
        Self {
            name: name.into(),
            bytes,
        }
    }

    /// The name of the key that made it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 64 signature bytes.
    pub fn bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(&self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = parse_named::<SIGNATURE_LEN>(s, "signature")?;
        Ok(Self { name, bytes })
    }
}

/// A named ed25519 public key (`trusted-public-keys` entry).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    /// A public key from its name and 32 bytes.
    pub fn new(
        name: impl Into<String>,
        bytes: [u8; PUBLIC_KEY_LEN],
    ) -> Result<Self, SignatureError> {
        let name = name.into();
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| SignatureError::InvalidPublicKey(name.clone()))?;
        Ok(Self { name, key })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32 key bytes.
    pub fn bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        self.key.to_bytes()
    }

    /// Whether `sig` is this key's valid signature of `message`. A signature
    /// by a key of another name never verifies. Checks are strict (canonical
    /// `s`, no small-order points), as libsodium's are in Nix.
    pub fn verify(&self, message: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                .verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// Parses `name:base64(32 bytes)`; a trailing newline (as in a key file) is ignored.
impl FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = parse_named::<PUBLIC_KEY_LEN>(s, "public key")?;
        Self::new(name, bytes)
    }
}

/// A named ed25519 secret key, as `nix key generate-secret` writes it.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    /// A secret key from its name and 32-byte seed.
    pub fn from_seed(name: impl Into<String>, seed: [u8; 32]) -> Self {
        Self {
            name: name.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The matching public key (`nix key convert-secret-to-public`).
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message` (normally a [fingerprint]).
    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(message).to_bytes(),
        }
    }

    /// The key file contents `name:base64(seed ‖ public key)` (no newline).
    pub fn to_key_file(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "SecretKey({}:…)", self.name)
    }
}

/// Parses `name:base64(64 bytes)`; a trailing newline is ignored. The public
/// half must match the seed.
impl FromStr for SecretKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, bytes) = parse_named::<SECRET_KEY_LEN>(s, "secret key")?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SignatureError::MismatchedKeyPair(name.clone()))?;
        Ok(Self { name, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // nix key generate-secret --key-name test-key-1 > sk
    const SECRET: &str =
        "test-key-1:26EfKzDgFCDmRc6tGrj8jACWxJdjmj7Zf0Z4UKJpx5CcoRNvKfVcvhPYSVMRdFFMG3SNeybFtX5TxmvsbFYMog==";
    // nix key convert-secret-to-public < sk
    const PUBLIC: &str = "test-key-1:nKETbyn1XL4T2ElTEXRRTBt0jXsmxbV+U8Zr7GxWDKI=";
    // S='local?root=/tmp/nv/store'; nix-store --store "$S" --add hello.txt   (hello.txt = "hello\n")
    // nix store sign --store "$S" --key-file sk /nix/store/i9pm…-hello.txt
    // nix path-info --store "$S" --json --sigs /nix/store/i9pm…-hello.txt
    //   narHash sha256-HDfQ… = sha256:04zw…, narSize 120, references [], signatures:
    const NIX_SIG: &str =
        "test-key-1:kO5ojrQDq41cXh2l25nAUYXXrUs4IyPRr8b+z9SdExu8aJ2Z6Os/W5KBD5LR7Kh/iGatJMmf8UtQluSzHDbhCw==";

    fn hello_fingerprint() -> String {
        let path: StorePath = "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
            .parse()
            .unwrap();
        let hash: NixHash = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM="
            .parse()
            .unwrap();
        fingerprint(&path, &hash, 120, [])
    }

    #[test]
    fn fingerprint_format() {
        assert_eq!(
            hello_fingerprint(),
            "1;/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt;sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;"
        );
        let top: StorePath = "/nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top"
            .parse()
            .unwrap();
        let leaf: StorePath = "/nix/store/1dvpcviwf86l59qmr29nfz530vpz5jpq-fixture-leaf"
            .parse()
            .unwrap();
        let h = NixHash::sha256([0; 32]);
        // References sorted and deduplicated.
        assert_eq!(
            fingerprint(&top, &h, 7, [&top, &leaf, &top]),
            format!("1;{top};{h};7;{leaf},{top}")
        );
    }

    #[test]
    fn nix_keys_parse_and_match() {
        let sk: SecretKey = SECRET.parse().unwrap();
        let pk: PublicKey = PUBLIC.parse().unwrap();
        assert_eq!(sk.name(), "test-key-1");
        assert_eq!(sk.public_key(), pk);
        assert_eq!(sk.public_key().to_string(), PUBLIC);
        assert_eq!(sk.to_key_file(), SECRET);
        assert_eq!(pk.to_string(), PUBLIC);
        // Key files may end in a newline.
        assert_eq!(format!("{PUBLIC}\n").parse::<PublicKey>().unwrap(), pk);
        assert_eq!(
            format!("{SECRET}\n")
                .parse::<SecretKey>()
                .unwrap()
                .public_key(),
            pk
        );
        assert!(!format!("{sk:?}").contains("26EfKz"));
    }

    #[test]
    fn nix_signature_verifies_and_we_sign_identically() {
        let sk: SecretKey = SECRET.parse().unwrap();
        let pk: PublicKey = PUBLIC.parse().unwrap();
        let fp = hello_fingerprint();
        let nix_sig: Signature = NIX_SIG.parse().unwrap();
        assert!(pk.verify(fp.as_bytes(), &nix_sig));
        // ed25519 is deterministic: the same key signs the same fingerprint identically.
        let ours = sk.sign(fp.as_bytes());
        assert_eq!(ours, nix_sig);
        assert_eq!(ours.to_string(), NIX_SIG);
    }

    #[test]
    fn verification_fails_when_anything_differs() {
        let pk: PublicKey = PUBLIC.parse().unwrap();
        let fp = hello_fingerprint();
        let sig: Signature = NIX_SIG.parse().unwrap();
        // Another message.
        assert!(!pk.verify(b"1;/nix/store/x;sha256:0;120;", &sig));
        let mut other = fp.clone().into_bytes();
        other[5] ^= 1;
        assert!(!pk.verify(&other, &sig));
        // Another key name with the same bytes.
        let renamed = Signature::new("test-key-2", *sig.bytes());
        assert!(!pk.verify(fp.as_bytes(), &renamed));
        // Flipped signature bits.
        for i in [0usize, 31, 32, 63] {
            let mut b = *sig.bytes();
            b[i] ^= 0x01;
            assert!(
                !pk.verify(fp.as_bytes(), &Signature::new("test-key-1", b)),
                "byte {i}"
            );
        }
        // Another key.
        let other_key = SecretKey::from_seed("test-key-1", [7; 32]).public_key();
        assert!(!other_key.verify(fp.as_bytes(), &sig));
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let sk = SecretKey::from_seed("cache.example.org-1", [42; 32]);
        let pk = sk.public_key();
        let sig = sk.sign(b"message");
        assert_eq!(sig.name(), "cache.example.org-1");
        assert!(pk.verify(b"message", &sig));
        let reparsed: Signature = sig.to_string().parse().unwrap();
        assert_eq!(reparsed, sig);
        let sk2: SecretKey = sk.to_key_file().parse().unwrap();
        assert_eq!(sk2.public_key(), pk);
    }

    #[test]
    fn rejects_malformed_keys_and_signatures() {
        use SignatureError::*;
        assert!(matches!("nokey".parse::<PublicKey>(), Err(MissingName(_))));
        assert!(matches!(
            ":nKETbyn1XL4T2ElTEXRRTBt0jXsmxbV+U8Zr7GxWDKI=".parse::<PublicKey>(),
            Err(MissingName(_))
        ));
        assert!(matches!("name:".parse::<PublicKey>(), Err(MissingName(_))));
        assert!(matches!(
            "name:!!!!".parse::<PublicKey>(),
            Err(BadBase64 { .. })
        ));
        assert!(matches!(
            "name:AAAA".parse::<PublicKey>(),
            Err(BadLength {
                actual: 3,
                expected: 32,
                ..
            })
        ));
        // The public key of a 32-byte secret seed is not accepted as a secret key.
        assert!(matches!(
            PUBLIC.parse::<SecretKey>(),
            Err(BadLength {
                actual: 32,
                expected: 64,
                ..
            })
        ));
        assert!(matches!(
            SECRET.parse::<PublicKey>(),
            Err(BadLength {
                actual: 64,
                expected: 32,
                ..
            })
        ));
        assert!(matches!(
            NIX_SIG.parse::<PublicKey>(),
            Err(BadLength { .. })
        ));
        assert!(matches!(
            "k:AAAA".parse::<Signature>(),
            Err(BadLength { expected: 64, .. })
        ));
        // A secret key whose public half belongs to another seed.
        let a = SecretKey::from_seed("k", [1; 32]);
        let b = SecretKey::from_seed("k", [2; 32]);
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&[1; 32]);
        bytes[32..].copy_from_slice(&b.public_key().bytes());
        let mixed = format!("k:{}", BASE64.encode(&bytes));
        assert!(matches!(
            mixed.parse::<SecretKey>(),
            Err(MismatchedKeyPair(_))
        ));
        assert!(a.to_key_file().parse::<SecretKey>().is_ok());
        // About half of all y coordinates are not on the curve.
        let invalid = (2u8..100).find_map(|y| {
            let mut bytes = [0u8; 32];
            bytes[0] = y;
            PublicKey::new("k", bytes).err()
        });
        assert!(matches!(invalid, Some(InvalidPublicKey(_))), "{invalid:?}");
    }
}
