//! Nix store paths (`/nix/store/<hash>-<name>`) and how content-addressed
//! ones are computed.
use crate::hash::{HashAlgo, HashError, NixHash};
use crate::nixbase32;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// The store directory. Arca only supports the default one.
pub const STORE_DIR: &str = "/nix/store";
/// Length of a store path digest ("hash part") in bytes.
pub const DIGEST_LEN: usize = 20;
/// Length of the nixbase32 hash part in characters.
pub const ENCODED_DIGEST_LEN: usize = 32;
/// Longest allowed name, in bytes.
pub const MAX_NAME_LEN: usize = 211;

/// A string that is not a valid store path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// The path is not directly under `/nix/store/`.
    #[error("{0:?} is not a path directly under {STORE_DIR}/")]
    NotInStore(String),
    /// The basename is too short to hold a hash part, a `-` and a name.
    #[error("store path basename {0:?} is too short")]
    TooShort(String),
    /// No `-` after the 32 hash characters.
    #[error("store path basename {0:?} has no '-' after the hash part")]
    MissingDash(String),
    /// The hash part is not nixbase32.
    #[error("invalid hash part in {basename:?}: {source}")]
    InvalidHashPart {
        /// The basename.
        basename: String,
        /// Why the hash part does not decode.
        source: nixbase32::Nixbase32Error,
    },
    /// The name is empty.
    #[error("store path name is empty")]
    EmptyName,
    /// The name is longer than 211 bytes.
    #[error("store path name is {0} bytes long, at most {MAX_NAME_LEN} are allowed")]
    NameTooLong(usize),
    /// The name starts with a `.`.
    #[error("store path name {0:?} starts with '.'")]
    NameStartsWithDot(String),
    /// The name holds a character outside `[A-Za-z0-9+\-._?=]`.
    #[error("store path name {name:?} has an invalid character {character:?} at byte {position}")]
    InvalidNameCharacter {
        /// The name.
        name: String,
        /// The offending character.
        character: char,
        /// Its byte offset in the name.
        position: usize,
    },
}

/// A store path: a 20-byte digest (the "hash part") and a name.
///
/// Ordered like Nix orders store paths: by basename, i.e. by the nixbase32
/// hash part, then the name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    digest: [u8; DIGEST_LEN],
    name: String,
}

/// Checks a store path name: 1..=211 bytes of `[A-Za-z0-9+\-._?=]`, not starting with `.`.
pub fn validate_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(name.len()));
    }
    if name.starts_with('.') {
        return Err(StorePathError::NameStartsWithDot(name.to_string()));
    }
    if let Some((position, character)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(StorePathError::InvalidNameCharacter {
            name: name.to_string(),
            character,
            position,
        });
    }
    Ok(())
}

/// XOR-folds a hash into `N` bytes: `out[i % N] ^= in[i]`, as Nix's
/// `compressHash` does (SHA-256 → the 20-byte store path digest).
pub fn compress_hash<const N: usize>(input: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    if N == 0 {
        return out;
    }
    for (i, b) in input.iter().enumerate() {
        out[i % N] ^= b;
    }
    out
}

impl StorePath {
    /// A store path from its parts, checking the name.
    pub fn new(digest: [u8; DIGEST_LEN], name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        Ok(Self {
            digest,
            name: name.to_string(),
        })
    }

    /// Parses a basename `<32 nixbase32 chars>-<name>`.
    pub fn from_basename(basename: &str) -> Result<Self, StorePathError> {
        if basename.len() < ENCODED_DIGEST_LEN + 2 {
            return Err(StorePathError::TooShort(basename.to_string()));
        }
        let (hash, rest) = match (
            basename.get(..ENCODED_DIGEST_LEN),
            basename.get(ENCODED_DIGEST_LEN..),
        ) {
            (Some(h), Some(r)) => (h, r),
            // Not a char boundary: the hash part holds a non-ASCII character.
            _ => {
                return Err(StorePathError::InvalidHashPart {
                    basename: basename.to_string(),
                    source: first_bad_char(basename),
                })
            }
        };
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(basename.to_string()))?;
        let digest = nixbase32::decode_fixed::<DIGEST_LEN>(hash).map_err(|source| {
            StorePathError::InvalidHashPart {
                basename: basename.to_string(),
                source,
            }
        })?;
        Self::new(digest, name)
    }

    /// Parses an absolute path `/nix/store/<hash>-<name>` (no trailing
    /// slash, nothing below it).
    pub fn from_absolute_path(path: &str) -> Result<Self, StorePathError> {
        let basename = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .filter(|b| !b.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_string()))?;
        Self::from_basename(basename)
    }

    /// The 20-byte digest.
    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        &self.digest
    }

    /// The name (after the `-`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nixbase32 hash part (32 characters): a store path's identity for lookups.
    pub fn hash_part(&self) -> String {
        nixbase32::encode(&self.digest)
    }

    /// `<hash part>-<name>`.
    pub fn basename(&self) -> String {
        format!("{}-{}", self.hash_part(), self.name)
    }

    /// `/nix/store/<hash part>-<name>` (the same as `Display`).
    pub fn to_absolute_path(&self) -> String {
        self.to_string()
    }

    /// Nix's `makeStorePath`: the path for `<type>:<inner hash>:/nix/store:<name>`.
    ///
    /// `path_type` is e.g. `source`, `text:/nix/store/…`, `output:out`;
    /// `inner` is written as `algo:<hex>`.
    pub fn make(path_type: &str, inner: &NixHash, name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        let s = format!(
            "{path_type}:{}:{}:{STORE_DIR}:{name}",
            inner.algo(),
            inner.to_hex()
        );
        Ok(Self {
            digest: compress_hash(&Sha256::digest(s.as_bytes())),
            name: name.to_string(),
        })
    }

    /// The path of a NAR-hashed (recursive) SHA-256 content-addressed path,
    /// as `nix-store --add` and `builtins.path` make it: type `source`, plus
    /// `:<path>` for each reference (sorted; `nix-store --add` has none).
    pub fn from_source(
        nar_sha256: [u8; 32],
        references: &[StorePath],
        name: &str,
    ) -> Result<Self, StorePathError> {
        Self::make(
            &type_with_refs("source", references),
            &NixHash::sha256(nar_sha256),
            name,
        )
    }

    /// The path of a text file (`builtins.toFile`, derivations): type `text`
    /// plus `:<path>` for each reference, over the SHA-256 of the contents.
    pub fn from_text_hash(
        contents_sha256: [u8; 32],
        references: &[StorePath],
        name: &str,
    ) -> Result<Self, StorePathError> {
        Self::make(
            &type_with_refs("text", references),
            &NixHash::sha256(contents_sha256),
            name,
        )
    }

    /// [StorePath::from_text_hash] over `contents`.
    pub fn from_text(
        contents: &[u8],
        references: &[StorePath],
        name: &str,
    ) -> Result<Self, StorePathError> {
        Self::from_text_hash(Sha256::digest(contents).into(), references, name)
    }

    /// The path of a fixed-output path (`nix-store --add-fixed`, fetchers)
    /// without references. A recursive SHA-256 hash gives the `source` path
    /// of [StorePath::from_source]; anything else gives
    /// `output:out` over `sha256("fixed:out:" + ["r:"] + algo:hex + ":")`.
    pub fn from_fixed_output(
        hash: &NixHash,
        recursive: bool,
        name: &str,
    ) -> Result<Self, StorePathError> {
        if recursive {
            if let Some(d) = hash.as_sha256() {
                return Self::from_source(d, &[], name);
            }
        }
        let inner = format!(
            "fixed:out:{}{}:{}:",
            if recursive { "r:" } else { "" },
            hash.algo(),
            hash.to_hex()
        );
        Self::make("output:out", &NixHash::sha256_of(inner.as_bytes()), name)
    }
}

fn type_with_refs(base: &str, references: &[StorePath]) -> String {
    let mut refs: Vec<String> = references.iter().map(|r| r.to_string()).collect();
    refs.sort();
    refs.dedup();
    let mut t = base.to_string();
    for r in refs {
        t.push(':');
        t.push_str(&r);
    }
    t
}

fn first_bad_char(s: &str) -> nixbase32::Nixbase32Error {
    let (position, character) = s
        .char_indices()
        .find(|&(_, c)| !c.is_ascii() || !nixbase32::ALPHABET.contains(&(c as u8)))
        .unwrap_or((0, char::REPLACEMENT_CHARACTER));
    nixbase32::Nixbase32Error::InvalidCharacter {
        character,
        position,
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash_part(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.hash_part()
            .cmp(&other.hash_part())
            .then_with(|| self.name.cmp(&other.name))
    }
}

/// Parses an absolute store path (`/nix/store/…`).
impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_absolute_path(s)
    }
}

/// A content address, as narinfo `CA:` fields write it:
/// `text:sha256:<b32>`, `fixed:r:<algo>:<b32>` or `fixed:<algo>:<b32>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// A text file (`builtins.toFile`, `.drv`), by the SHA-256 of its contents.
    Text(NixHash),
    /// A fixed output: the hash of the NAR (`recursive`) or of the flat file.
    Fixed {
        /// NAR hash (`r:`) rather than flat file hash.
        recursive: bool,
        /// The hash.
        hash: NixHash,
    },
}

/// A string that is not a valid content address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentAddressError {
    /// Neither `text:` nor `fixed:`.
    #[error("content address {0:?} is neither text: nor fixed:")]
    UnknownMethod(String),
    /// The hash does not parse.
    #[error("invalid hash in content address {value:?}: {source}")]
    Hash {
        /// The content address.
        value: String,
        /// Why.
        source: HashError,
    },
    /// `text:` with another algorithm than SHA-256.
    #[error("text content address {0:?} must use sha256")]
    TextNotSha256(String),
}

impl ContentAddress {
    /// The store path this content address gives for `name` and `references`
    /// (references only apply to text and recursive SHA-256 paths; other
    /// fixed outputs cannot have any, and `None` is returned if some are given).
    pub fn store_path(
        &self,
        name: &str,
        references: &[StorePath],
    ) -> Option<Result<StorePath, StorePathError>> {
        match self {
            ContentAddress::Text(h) => h
                .as_sha256()
                .map(|d| StorePath::from_text_hash(d, references, name)),
            ContentAddress::Fixed {
                recursive: true,
                hash,
            } if hash.algo() == HashAlgo::Sha256 => hash
                .as_sha256()
                .map(|d| StorePath::from_source(d, references, name)),
            ContentAddress::Fixed { recursive, hash } => references
                .is_empty()
                .then(|| StorePath::from_fixed_output(hash, *recursive, name)),
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentAddress::Text(h) => write!(f, "text:{h}"),
            ContentAddress::Fixed { recursive, hash } => {
                write!(f, "fixed:{}{hash}", if *recursive { "r:" } else { "" })
            }
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |source| ContentAddressError::Hash {
            value: s.to_string(),
            source,
        };
        // Nix writes the hash as `algo:<any encoding>`, never SRI.
        let parse = |h: &str| -> Result<NixHash, ContentAddressError> {
            let (algo, digest) = h
                .split_once(':')
                .ok_or_else(|| err(HashError::MissingPrefix(h.to_string())))?;
            NixHash::parse_unprefixed(algo.parse().map_err(err)?, digest).map_err(err)
        };
        if let Some(rest) = s.strip_prefix("text:") {
            let hash = parse(rest)?;
            if hash.algo() != HashAlgo::Sha256 {
                return Err(ContentAddressError::TextNotSha256(s.to_string()));
            }
            Ok(ContentAddress::Text(hash))
        } else if let Some(rest) = s.strip_prefix("fixed:r:") {
            Ok(ContentAddress::Fixed {
                recursive: true,
                hash: parse(rest)?,
            })
        } else if let Some(rest) = s.strip_prefix("fixed:") {
            Ok(ContentAddress::Fixed {
                recursive: false,
                hash: parse(rest)?,
            })
        } else {
            Err(ContentAddressError::UnknownMethod(s.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        s.parse().unwrap()
    }

    fn unhex32(s: &str) -> [u8; 32] {
        data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .unwrap()
            .try_into()
            .unwrap()
    }

    #[test]
    fn parses_basename_and_absolute() {
        let p = StorePath::from_basename("i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt").unwrap();
        assert_eq!(p.name(), "hello.txt");
        assert_eq!(p.hash_part(), "i9pmrzmpshapij2kin22pff6fc2adavx");
        assert_eq!(p.basename(), "i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt");
        assert_eq!(
            p.to_string(),
            "/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt"
        );
        assert_eq!(p.to_absolute_path(), p.to_string());
        let q =
            StorePath::from_absolute_path("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt")
                .unwrap();
        assert_eq!(p, q);
        assert_eq!(StorePath::new(*p.digest(), "hello.txt").unwrap(), p);
        assert_eq!(
            format!("{p:?}"),
            "StorePath(/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt)"
        );
    }

    #[test]
    fn rejects_bad_paths() {
        use StorePathError::*;
        let h = "i9pmrzmpshapij2kin22pff6fc2adavx";
        assert!(matches!(StorePath::from_basename(h), Err(TooShort(_))));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}-")),
            Err(TooShort(_))
        ));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}_x")),
            Err(MissingDash(_))
        ));
        assert!(matches!(
            StorePath::from_basename("e9pmrzmpshapij2kin22pff6fc2adavx-x"),
            Err(InvalidHashPart { .. })
        ));
        assert!(matches!(
            StorePath::from_basename("i9pmrzmpshapij2kin22pff6fc2adavé-x"),
            Err(InvalidHashPart {
                source: nixbase32::Nixbase32Error::InvalidCharacter {
                    character: 'é', ..
                },
                ..
            })
        ));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}-.x")),
            Err(NameStartsWithDot(_))
        ));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}-a b")),
            Err(InvalidNameCharacter {
                character: ' ',
                position: 1,
                ..
            })
        ));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}-a/b")),
            Err(InvalidNameCharacter { .. })
        ));
        assert!(matches!(
            StorePath::from_basename(&format!("{h}-ü")),
            Err(InvalidNameCharacter { .. })
        ));
        assert!(matches!(
            StorePath::from_absolute_path(&format!("/nix/store/{h}-x/bin")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::from_absolute_path(&format!("/nix/store/{h}-x/")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::from_absolute_path(&format!("/nix/storex/{h}-x")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::from_absolute_path(&format!("{h}-x")),
            Err(NotInStore(_))
        ));
        assert!(matches!(
            StorePath::from_absolute_path(&format!("/gnu/store/{h}-x")),
            Err(NotInStore(_))
        ));
    }

    #[test]
    fn name_rules() {
        use StorePathError::*;
        assert_eq!(validate_name(""), Err(EmptyName));
        assert_eq!(validate_name(&"a".repeat(211)), Ok(()));
        assert_eq!(validate_name(&"a".repeat(212)), Err(NameTooLong(212)));
        assert_eq!(validate_name("AZaz09+-._?="), Ok(()));
        assert_eq!(validate_name("a.b"), Ok(()));
        assert_eq!(validate_name("-"), Ok(()));
        assert!(matches!(validate_name("."), Err(NameStartsWithDot(_))));
        assert!(matches!(validate_name(".."), Err(NameStartsWithDot(_))));
        for bad in [
            "a b", "a:b", "a/b", "a\0b", "a\nb", "a@b", "a~b", "a%b", "aäb",
        ] {
            assert!(
                matches!(validate_name(bad), Err(InvalidNameCharacter { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ordering_is_by_basename() {
        let a = sp("/nix/store/1dvpcviwf86l59qmr29nfz530vpz5jpq-fixture-leaf");
        let b = sp("/nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top");
        let c = sp("/nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-toq");
        assert!(a < b && b < c);
    }

    #[test]
    fn compress_hash_xor_folds() {
        let input: Vec<u8> = (0..32).collect();
        let out: [u8; 20] = compress_hash(&input);
        for (i, &o) in out.iter().enumerate() {
            let expected = if i < 12 {
                (i as u8) ^ (i as u8 + 20)
            } else {
                i as u8
            };
            assert_eq!(o, expected, "byte {i}");
        }
        assert_eq!(compress_hash::<0>(&input), [0u8; 0]);
        assert_eq!(compress_hash::<4>(&[1, 2, 3, 4, 1, 2, 3, 4]), [0; 4]);
    }

    // Vectors from Nix 2.8, in a chroot store:
    //   export NIX_CONFIG=$'build-users-group =\nexperimental-features = nix-command\nsubstituters ='
    //   S='local?root=/tmp/nv/store'
    //   printf 'hello\n' > hello.txt; : > empty
    //   mkdir -p dir/sub; printf abc > dir/a; printf '#!/bin/sh\n' > dir/sub/x; chmod +x dir/sub/x; ln -s a dir/link

    #[test]
    fn source_paths_match_nix_store_add() {
        // nix-store --store "$S" --add hello.txt; nix-hash --type sha256 hello.txt
        let p = StorePath::from_source(
            unhex32("1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"),
            &[],
            "hello.txt",
        )
        .unwrap();
        assert_eq!(
            p,
            sp("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt")
        );
        // nix-store --store "$S" --add empty; nix-hash --type sha256 empty
        let p = StorePath::from_source(
            unhex32("77ac62e2629d8e45f624589c0c8bf99e24b3a722349bf1e79bc186008534e246"),
            &[],
            "empty",
        )
        .unwrap();
        assert_eq!(p, sp("/nix/store/lx5i78a4izwk2qj1nq8rdc07y8zrwy90-empty"));
        // nix-store --store "$S" --add dir; nix-hash --type sha256 dir
        // (nix-store --add-fixed --recursive sha256 dir gives the same path)
        let nar = unhex32("c44c76c54cea410e2daefd610c00edb3b4bbd265e846e542e87b558d808e9e04");
        let p = StorePath::from_source(nar, &[], "dir").unwrap();
        assert_eq!(p, sp("/nix/store/2hj196j85fdwcpy77mmw6m1qw3sk7xb7-dir"));
        assert_eq!(
            StorePath::from_fixed_output(&NixHash::sha256(nar), true, "dir").unwrap(),
            p
        );
        // nix path-info --json: "ca":"fixed:r:sha256:04zw…"
        let ca: ContentAddress =
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
                .parse()
                .unwrap();
        assert_eq!(
            ca.store_path("hello.txt", &[]).unwrap().unwrap(),
            sp("/nix/store/i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt")
        );
    }

    #[test]
    fn fixed_output_paths_match_nix() {
        // nix-store --store "$S" --add-fixed sha256 hello.txt  (flat)
        // nix-hash --type sha256 --flat hello.txt
        let h: NixHash = "sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
            .parse()
            .unwrap();
        assert_eq!(
            StorePath::from_fixed_output(&h, false, "hello.txt").unwrap(),
            sp("/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt")
        );
        // nix-store --print-fixed-path sha256 5891b5b5…be03 foo
        assert_eq!(
            StorePath::from_fixed_output(&h, false, "foo").unwrap(),
            sp("/nix/store/w8r2kfwk48haw3v8l15jjjvwnhhavxc6-foo")
        );
        // nix path-info --json of it: "ca":"fixed:sha256:00xyyr…"
        let ca: ContentAddress =
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
                .parse()
                .unwrap();
        assert_eq!(
            ca,
            ContentAddress::Fixed {
                recursive: false,
                hash: h.clone()
            }
        );
        assert_eq!(
            ca.store_path("hello.txt", &[]).unwrap().unwrap(),
            sp("/nix/store/gy454w1cxaq731grqwylhzf4pp9r5izh-hello.txt")
        );
        // nix-store --add-fixed sha1 hello.txt; nix-hash --type sha1 --flat hello.txt
        let h: NixHash = "sha1:f572d396fae9206628714fb2ce00f72e94f2258f"
            .parse()
            .unwrap();
        assert_eq!(
            StorePath::from_fixed_output(&h, false, "hello.txt").unwrap(),
            sp("/nix/store/svdva85yi507g9vncgsaxvnd1r808h4w-hello.txt")
        );
        // nix-store --add-fixed sha512 hello.txt; nix-hash --type sha512 --flat hello.txt
        let h: NixHash = "sha512:e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629".parse().unwrap();
        assert_eq!(
            StorePath::from_fixed_output(&h, false, "hello.txt").unwrap(),
            sp("/nix/store/9a8mxachqmcv8x2cfijdps9dyxgyyrzm-hello.txt")
        );
        // nix-store --add-fixed --recursive sha1 dir; nix-hash --type sha1 dir;
        // nix path-info --json: "ca":"fixed:r:sha1:v5s7ya7cixl38w27na7nfwvcp2m3wi48"
        let h: NixHash = "sha1:88443eaab86c73678fb2477034688fec287f74d9"
            .parse()
            .unwrap();
        let expected = sp("/nix/store/9ky8xnplywqha0jhajqfppz6rdz65nh7-dir");
        assert_eq!(
            StorePath::from_fixed_output(&h, true, "dir").unwrap(),
            expected
        );
        let ca: ContentAddress = "fixed:r:sha1:v5s7ya7cixl38w27na7nfwvcp2m3wi48"
            .parse()
            .unwrap();
        assert_eq!(
            ca,
            ContentAddress::Fixed {
                recursive: true,
                hash: h
            }
        );
        assert_eq!(ca.store_path("dir", &[]).unwrap().unwrap(), expected);
        // Fixed outputs other than recursive sha256 cannot have references.
        assert!(ca
            .store_path("dir", std::slice::from_ref(&expected))
            .is_none());
    }

    #[test]
    fn text_paths_match_builtins_to_file() {
        // nix-instantiate --eval -E 'builtins.toFile "greeting" "hello\n"'
        assert_eq!(
            StorePath::from_text(b"hello\n", &[], "greeting").unwrap(),
            sp("/nix/store/ybf7by4xvcgjhwilsg87rqz9di79bify-greeting")
        );
        // nix-instantiate --eval -E 'builtins.toFile "a.txt" "A"' (and "b.txt" "B")
        let a = StorePath::from_text(b"A", &[], "a.txt").unwrap();
        let b = StorePath::from_text(b"B", &[], "b.txt").unwrap();
        assert_eq!(a, sp("/nix/store/l82nr4gna33sc2g8m4hkkr6r983dlbd6-a.txt"));
        assert_eq!(b, sp("/nix/store/57927swfj6jm5fzhr3ciwhn6n5g3z9cl-b.txt"));
        // nix-instantiate --eval -E 'let a = builtins.toFile "a.txt" "A";
        //   b = builtins.toFile "b.txt" "B"; in builtins.toFile "refs" "${b} ${a}"'
        let contents = format!("{b} {a}");
        let expected = sp("/nix/store/idi89jvza1z0qb3bxman9mb2w8dgwnr8-refs");
        // References are sorted whatever order they are given in.
        assert_eq!(
            StorePath::from_text(contents.as_bytes(), &[a.clone(), b.clone()], "refs").unwrap(),
            expected
        );
        assert_eq!(
            StorePath::from_text(contents.as_bytes(), &[b.clone(), a.clone()], "refs").unwrap(),
            expected
        );
        let ca = ContentAddress::Text(NixHash::sha256_of(contents.as_bytes()));
        assert_eq!(ca.store_path("refs", &[b, a]).unwrap().unwrap(), expected);
        assert_ne!(ca.store_path("refs", &[]).unwrap().unwrap(), expected);
    }

    #[test]
    fn text_path_from_fixture_narinfo() {
        // make-nix-fixture.sh: note.txt is a text: CA path without references.
        let ca: ContentAddress = "text:sha256:13gacf97vd8p1ak45rxn5nnjgjc3j8sh3s7kbz4nwj6lnapm31d6"
            .parse()
            .unwrap();
        assert_eq!(
            ca.store_path("note.txt", &[]).unwrap().unwrap(),
            sp("/nix/store/p5fizk1ihhkjp9any6qdwxhrg2z24dxh-note.txt")
        );
        assert_eq!(
            ca.to_string(),
            "text:sha256:13gacf97vd8p1ak45rxn5nnjgjc3j8sh3s7kbz4nwj6lnapm31d6"
        );
    }

    #[test]
    fn computed_paths_check_names() {
        let h = NixHash::sha256([0; 32]);
        assert_eq!(
            StorePath::from_source([0; 32], &[], ".x"),
            Err(StorePathError::NameStartsWithDot(".x".into()))
        );
        assert_eq!(
            StorePath::from_text(b"", &[], ""),
            Err(StorePathError::EmptyName)
        );
        assert!(StorePath::from_fixed_output(&h, false, "a b").is_err());
    }

    #[test]
    fn content_address_parsing() {
        use ContentAddressError::*;
        let b32 = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";
        for s in [
            format!("text:sha256:{b32}"),
            format!("fixed:sha256:{b32}"),
            format!("fixed:r:sha256:{b32}"),
        ] {
            let ca: ContentAddress = s.parse().unwrap();
            assert_eq!(ca.to_string(), s);
        }
        // Hex is accepted and written back as nixbase32.
        let ca: ContentAddress = "fixed:sha1:f572d396fae9206628714fb2ce00f72e94f2258f"
            .parse()
            .unwrap();
        assert_eq!(
            ca.to_string(),
            "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm"
        );
        assert!(matches!(
            "blob:sha256:x".parse::<ContentAddress>(),
            Err(UnknownMethod(_))
        ));
        assert!(matches!(
            "text:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm".parse::<ContentAddress>(),
            Err(TextNotSha256(_))
        ));
        assert!(matches!(
            "fixed:sha256".parse::<ContentAddress>(),
            Err(Hash { .. })
        ));
        assert!(matches!(
            "fixed:sha256:abc".parse::<ContentAddress>(),
            Err(Hash { .. })
        ));
        assert!(matches!(
            format!("fixed:r:sha256-{b32}").parse::<ContentAddress>(),
            Err(Hash { .. })
        ));
    }
}
