//! `.narinfo` files: the metadata of one store path in a binary cache.
//!
//! A narinfo is `Key: value` lines. Nix writes, in this order: `StorePath`,
//! `URL`, `Compression`, `FileHash`, `FileSize`, `NarHash`, `NarSize`,
//! `References`, `Deriver`, `System`, `Sig` (repeatable) and `CA`.
//!
//! [NarInfo::parse] checks every field it knows and keeps every line as
//! written (unknown ones too), so [NarInfo]'s `Display` gives back the input
//! byte for byte. The setters keep that order and write new values the way Nix
//! does.
use crate::hash::{HashAlgo, HashError, NixHash};
use crate::signature::{self, PublicKey, SecretKey, Signature, SignatureError};
use crate::store_path::{ContentAddress, ContentAddressError, StorePath, StorePathError};
use std::fmt;
use std::str::FromStr;

/// Largest narinfo accepted, in bytes. Real ones are well under 1 KiB plus
/// about 60 bytes per reference.
pub const MAX_NARINFO_SIZE: usize = 64 * 1024;

/// The value Nix writes as `Deriver` when the deriver is not known.
const UNKNOWN_DERIVER: &str = "unknown-deriver";

/// How the NAR file a narinfo points to is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// `none`
    None,
    /// `xz`
    Xz,
    /// `zstd`
    Zstd,
    /// `bzip2` (also what a missing `Compression` field means)
    Bzip2,
    /// `br` (brotli)
    Brotli,
    /// `gzip`
    Gzip,
}

impl Compression {
    /// The name narinfo files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
            Compression::Brotli => "br",
            Compression::Gzip => "gzip",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = String;
    /// Parses a compression name; the error is the unknown name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            "bzip2" => Ok(Compression::Bzip2),
            "br" => Ok(Compression::Brotli),
            "gzip" => Ok(Compression::Gzip),
            _ => Err(s.to_string()),
        }
    }
}

/// A narinfo that does not parse, or a value a setter refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    /// Larger than [MAX_NARINFO_SIZE].
    #[error("narinfo is {0} bytes long, at most {MAX_NARINFO_SIZE} are allowed")]
    TooLarge(usize),
    /// Not UTF-8.
    #[error("narinfo is not valid UTF-8")]
    NotUtf8,
    /// The last line has no `\n`.
    #[error("narinfo does not end with a newline")]
    MissingFinalNewline,
    /// A line is not `Key: value`.
    #[error("line {line}: expected \"Key: value\", got {text:?}")]
    MalformedLine {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A control character (other than the line ends).
    #[error("line {line}: control character {character:?}")]
    ControlCharacter {
        /// 1-based line number.
        line: usize,
        /// The character.
        character: char,
    },
    /// A field that may appear once appears again.
    #[error("line {line}: duplicate {field} field")]
    DuplicateField {
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The field.
        field: &'static str,
    },
    /// A required field (`StorePath`, `URL`, `NarHash`, `NarSize`) is absent.
    #[error("missing required field {0}")]
    MissingField(&'static str),
    /// `URL` is empty.
    #[error("line {line}: URL is empty")]
    EmptyUrl {
        /// 1-based line number.
        line: usize,
    },
    /// A store path (`StorePath`, `References`, `Deriver`) is invalid.
    #[error("line {line}: invalid store path in {field}: {source}")]
    InvalidStorePath {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// Why.
        source: StorePathError,
    },
    /// `FileSize` or `NarSize` is not a decimal u64.
    #[error("line {line}: {field} {value:?} is not a non-negative integer")]
    InvalidNumber {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// `NarSize` is 0 (Nix refuses it: a NAR is never empty).
    #[error("NarSize is 0")]
    ZeroNarSize,
    /// `FileHash` or `NarHash` does not parse.
    #[error("line {line}: invalid {field}: {source}")]
    InvalidHash {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// Why.
        source: HashError,
    },
    /// `FileHash` or `NarHash` is not SHA-256.
    #[error("line {line}: {field} must be sha256, got {algo}")]
    NotSha256 {
        /// 1-based line number.
        line: usize,
        /// The field.
        field: &'static str,
        /// The algorithm given.
        algo: HashAlgo,
    },
    /// `Compression` names an unknown method.
    #[error("line {line}: unknown compression {value:?}")]
    UnknownCompression {
        /// 1-based line number.
        line: usize,
        /// The value.
        value: String,
    },
    /// A `Sig` line does not parse.
    #[error("line {line}: invalid Sig: {source}")]
    InvalidSignature {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: SignatureError,
    },
    /// `CA` does not parse.
    #[error("line {line}: invalid CA: {source}")]
    InvalidContentAddress {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: ContentAddressError,
    },
    /// A value given to a setter would not fit on one line.
    #[error("{field} value {value:?} is empty or holds a control character")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
}

/// A narinfo field name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    StorePath,
    Url,
    Compression,
    FileHash,
    FileSize,
    NarHash,
    NarSize,
    References,
    Deriver,
    System,
    Sig,
    Ca,
    Unknown(String),
}

impl Key {
    const KNOWN: [Key; 12] = [
        Key::StorePath,
        Key::Url,
        Key::Compression,
        Key::FileHash,
        Key::FileSize,
        Key::NarHash,
        Key::NarSize,
        Key::References,
        Key::Deriver,
        Key::System,
        Key::Sig,
        Key::Ca,
    ];

    fn name(&self) -> &str {
        match self {
            Key::Unknown(s) => s,
            known => known.field(),
        }
    }

    /// The static name of a known key (for errors).
    fn field(&self) -> &'static str {
        match self {
            Key::StorePath => "StorePath",
            Key::Url => "URL",
            Key::Compression => "Compression",
            Key::FileHash => "FileHash",
            Key::FileSize => "FileSize",
            Key::NarHash => "NarHash",
            Key::NarSize => "NarSize",
            Key::References => "References",
            Key::Deriver => "Deriver",
            Key::System => "System",
            Key::Sig => "Sig",
            Key::Ca => "CA",
            Key::Unknown(_) => "unknown",
        }
    }

    fn parse(s: &str) -> Key {
        Key::KNOWN
            .iter()
            .find(|k| k.name() == s)
            .cloned()
            .unwrap_or_else(|| Key::Unknown(s.to_string()))
    }

    /// Position in the order Nix writes fields; `None` for unknown keys.
    fn rank(&self) -> Option<usize> {
        Key::KNOWN.iter().position(|k| k == self)
    }
}

/// One `Key: value` line, value as written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    key: Key,
    value: String,
}

/// A parsed narinfo: typed fields, and the lines as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    store_path: StorePath,
    url: String,
    compression: Option<Compression>,
    file_hash: Option<NixHash>,
    file_size: Option<u64>,
    nar_hash: NixHash,
    nar_size: u64,
    references: Vec<StorePath>,
    deriver: Option<StorePath>,
    system: Option<String>,
    signatures: Vec<Signature>,
    ca: Option<ContentAddress>,
    lines: Vec<Line>,
}

fn parse_sha256(line: usize, field: &'static str, value: &str) -> Result<NixHash, NarInfoError> {
    let h = NixHash::parse_prefixed(value).map_err(|source| NarInfoError::InvalidHash {
        line,
        field,
        source,
    })?;
    if h.algo() != HashAlgo::Sha256 {
        return Err(NarInfoError::NotSha256 {
            line,
            field,
            algo: h.algo(),
        });
    }
    Ok(h)
}

fn parse_u64(line: usize, field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    // `u64::from_str` would accept a leading `+`; Nix writes plain digits.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NarInfoError::InvalidNumber {
            line,
            field,
            value: value.to_string(),
        });
    }
    value.parse().map_err(|_| NarInfoError::InvalidNumber {
        line,
        field,
        value: value.to_string(),
    })
}

fn parse_basename(
    line: usize,
    field: &'static str,
    value: &str,
) -> Result<StorePath, NarInfoError> {
    StorePath::from_basename(value).map_err(|source| NarInfoError::InvalidStorePath {
        line,
        field,
        source,
    })
}

fn check_value(field: &'static str, value: &str) -> Result<(), NarInfoError> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(NarInfoError::InvalidValue {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn references_value(references: &[StorePath]) -> String {
    references
        .iter()
        .map(StorePath::basename)
        .collect::<Vec<_>>()
        .join(" ")
}

impl NarInfo {
    /// Parses a narinfo from bytes (at most [MAX_NARINFO_SIZE], UTF-8).
    pub fn parse(input: &[u8]) -> Result<Self, NarInfoError> {
        if input.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge(input.len()));
        }
        let text = std::str::from_utf8(input).map_err(|_| NarInfoError::NotUtf8)?;
        Self::parse_str(text)
    }

    fn parse_str(text: &str) -> Result<Self, NarInfoError> {
        if text.len() > MAX_NARINFO_SIZE {
            return Err(NarInfoError::TooLarge(text.len()));
        }
        let body = match text.strip_suffix('\n') {
            Some(body) => body,
            None if text.is_empty() => "",
            None => return Err(NarInfoError::MissingFinalNewline),
        };

        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut system = None;
        let mut signatures = Vec::new();
        let mut ca = None;
        let mut lines = Vec::new();
        let mut seen: Vec<Key> = Vec::new();

        let lines_iter = if text.is_empty() {
            None
        } else {
            Some(body.split('\n'))
        };
        for (idx, raw) in lines_iter.into_iter().flatten().enumerate() {
            let line = idx + 1;
            if let Some(character) = raw.chars().find(|c| c.is_control()) {
                return Err(NarInfoError::ControlCharacter { line, character });
            }
            let (name, value) = raw
                .split_once(": ")
                .filter(|(name, _)| !name.is_empty() && !name.contains([' ', ':']))
                .ok_or_else(|| NarInfoError::MalformedLine {
                    line,
                    text: raw.to_string(),
                })?;
            let key = Key::parse(name);
            let field = key.field();
            if !matches!(key, Key::Sig | Key::Unknown(_)) {
                if seen.contains(&key) {
                    return Err(NarInfoError::DuplicateField { line, field });
                }
                seen.push(key.clone());
            }
            match &key {
                Key::StorePath => {
                    store_path = Some(StorePath::from_absolute_path(value).map_err(|source| {
                        NarInfoError::InvalidStorePath {
                            line,
                            field,
                            source,
                        }
                    })?)
                }
                Key::Url => {
                    if value.is_empty() {
                        return Err(NarInfoError::EmptyUrl { line });
                    }
                    url = Some(value.to_string())
                }
                Key::Compression => {
                    compression = Some(
                        value
                            .parse::<Compression>()
                            .map_err(|value| NarInfoError::UnknownCompression { line, value })?,
                    )
                }
                Key::FileHash => file_hash = Some(parse_sha256(line, field, value)?),
                Key::FileSize => file_size = Some(parse_u64(line, field, value)?),
                Key::NarHash => nar_hash = Some(parse_sha256(line, field, value)?),
                Key::NarSize => nar_size = Some(parse_u64(line, field, value)?),
                Key::References => {
                    references = Some(
                        value
                            .split(' ')
                            .filter(|r| !r.is_empty())
                            .map(|r| parse_basename(line, field, r))
                            .collect::<Result<Vec<_>, _>>()?,
                    )
                }
                Key::Deriver => {
                    if value != UNKNOWN_DERIVER {
                        deriver = Some(parse_basename(line, field, value)?);
                    }
                }
                Key::System => system = Some(value.to_string()),
                Key::Sig => signatures.push(
                    value
                        .parse::<Signature>()
                        .map_err(|source| NarInfoError::InvalidSignature { line, source })?,
                ),
                Key::Ca => {
                    ca =
                        Some(value.parse::<ContentAddress>().map_err(|source| {
                            NarInfoError::InvalidContentAddress { line, source }
                        })?)
                }
                Key::Unknown(_) => {}
            }
            lines.push(Line {
                key,
                value: value.to_string(),
            });
        }

        let store_path = store_path.ok_or(NarInfoError::MissingField("StorePath"))?;
        let url = url.ok_or(NarInfoError::MissingField("URL"))?;
        let nar_hash = nar_hash.ok_or(NarInfoError::MissingField("NarHash"))?;
        let nar_size = nar_size.ok_or(NarInfoError::MissingField("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        Ok(Self {
            store_path,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references: references.unwrap_or_default(),
            deriver,
            system,
            signatures,
            ca,
            lines,
        })
    }

    /// A new narinfo with the required fields and an empty `References` line.
    /// Nix also writes `Compression`, `FileHash` and `FileSize`: set them with
    /// the setters.
    pub fn new(
        store_path: StorePath,
        url: &str,
        nar_sha256: [u8; 32],
        nar_size: u64,
    ) -> Result<Self, NarInfoError> {
        check_value("URL", url)?;
        if nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        let nar_hash = NixHash::sha256(nar_sha256);
        let lines = vec![
            Line {
                key: Key::StorePath,
                value: store_path.to_string(),
            },
            Line {
                key: Key::Url,
                value: url.to_string(),
            },
            Line {
                key: Key::NarHash,
                value: nar_hash.to_string(),
            },
            Line {
                key: Key::NarSize,
                value: nar_size.to_string(),
            },
            Line {
                key: Key::References,
                value: String::new(),
            },
        ];
        Ok(Self {
            store_path,
            url: url.to_string(),
            compression: None,
            file_hash: None,
            file_size: None,
            nar_hash,
            nar_size,
            references: Vec::new(),
            deriver: None,
            system: None,
            signatures: Vec::new(),
            ca: None,
            lines,
        })
    }

    /// The store path it describes.
    pub fn store_path(&self) -> &StorePath {
        &self.store_path
    }

    /// Where the (compressed) NAR is, relative to the cache URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The NAR's compression; `bzip2` if the field is absent, as in Nix.
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or(Compression::Bzip2)
    }

    /// The `Compression` field as written, `None` if absent.
    pub fn compression_field(&self) -> Option<Compression> {
        self.compression
    }

    /// SHA-256 of the compressed NAR file.
    pub fn file_hash(&self) -> Option<&NixHash> {
        self.file_hash.as_ref()
    }

    /// Size of the compressed NAR file.
    pub fn file_size(&self) -> Option<u64> {
        self.file_size
    }

    /// SHA-256 of the uncompressed NAR.
    pub fn nar_hash(&self) -> &NixHash {
        &self.nar_hash
    }

    /// The 32 bytes of [NarInfo::nar_hash].
    pub fn nar_sha256(&self) -> [u8; 32] {
        // Parsing and `new` only ever store SHA-256 hashes.
        self.nar_hash.as_sha256().unwrap_or_default()
    }

    /// Size of the uncompressed NAR (never 0).
    pub fn nar_size(&self) -> u64 {
        self.nar_size
    }

    /// The references, in the order written.
    pub fn references(&self) -> &[StorePath] {
        &self.references
    }

    /// The deriver (`None` if absent or `unknown-deriver`).
    pub fn deriver(&self) -> Option<&StorePath> {
        self.deriver.as_ref()
    }

    /// The system it was built for, if written.
    pub fn system(&self) -> Option<&str> {
        self.system.as_deref()
    }

    /// The signatures, in the order written.
    pub fn signatures(&self) -> &[Signature] {
        &self.signatures
    }

    /// The content address, if the path is content-addressed.
    pub fn ca(&self) -> Option<&ContentAddress> {
        self.ca.as_ref()
    }

    /// Lines with a key this parser does not know, as `(key, value)`.
    pub fn unknown_fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match &l.key {
            Key::Unknown(k) => Some((k.as_str(), l.value.as_str())),
            _ => None,
        })
    }

    /// The fingerprint its signatures sign (see [signature::fingerprint]).
    pub fn fingerprint(&self) -> String {
        signature::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// How many of its signatures verify with one of `keys` (matched by name).
    pub fn count_valid_signatures(&self, keys: &[PublicKey]) -> usize {
        let fp = self.fingerprint();
        self.signatures
            .iter()
            .filter(|sig| keys.iter().any(|k| k.verify(fp.as_bytes(), sig)))
            .count()
    }

    /// Whether at least one signature verifies with one of `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        self.count_valid_signatures(keys) > 0
    }

    /// Signs the fingerprint with `key` and adds the `Sig` line (nothing
    /// changes if that exact signature is already there).
    pub fn sign(&mut self, key: &SecretKey) {
        self.add_signature(key.sign(self.fingerprint().as_bytes()));
    }

    /// Adds a `Sig` line after the existing ones (nothing changes if the same
    /// signature is already there).
    pub fn add_signature(&mut self, sig: Signature) {
        if self.signatures.contains(&sig) {
            return;
        }
        let value = sig.to_string();
        self.signatures.push(sig);
        let pos = match self.lines.iter().rposition(|l| l.key == Key::Sig) {
            Some(last) => last + 1,
            None => self.insert_position(&Key::Sig),
        };
        self.lines.insert(
            pos,
            Line {
                key: Key::Sig,
                value,
            },
        );
    }

    /// Removes every signature (e.g. before re-signing).
    pub fn clear_signatures(&mut self) {
        self.signatures.clear();
        self.lines.retain(|l| l.key != Key::Sig);
    }

    /// Sets `Compression`.
    pub fn set_compression(&mut self, compression: Compression) {
        self.compression = Some(compression);
        self.set_line(Key::Compression, Some(compression.to_string()));
    }

    /// Sets or removes `FileHash` (a SHA-256 of the compressed file).
    pub fn set_file_hash(&mut self, sha256: Option<[u8; 32]>) {
        self.file_hash = sha256.map(NixHash::sha256);
        let value = self.file_hash.as_ref().map(ToString::to_string);
        self.set_line(Key::FileHash, value);
    }

    /// Sets or removes `FileSize`.
    pub fn set_file_size(&mut self, size: Option<u64>) {
        self.file_size = size;
        self.set_line(Key::FileSize, size.map(|s| s.to_string()));
    }

    /// Sets `URL`.
    pub fn set_url(&mut self, url: &str) -> Result<(), NarInfoError> {
        check_value("URL", url)?;
        self.url = url.to_string();
        self.set_line(Key::Url, Some(url.to_string()));
        Ok(())
    }

    /// Sets `References` (written in the order given; Nix writes them sorted).
    pub fn set_references(&mut self, references: Vec<StorePath>) {
        let value = references_value(&references);
        self.references = references;
        self.set_line(Key::References, Some(value));
    }

    /// Sets or removes `Deriver`.
    pub fn set_deriver(&mut self, deriver: Option<StorePath>) {
        let value = deriver.as_ref().map(StorePath::basename);
        self.deriver = deriver;
        self.set_line(Key::Deriver, value);
    }

    /// Sets or removes `System`.
    pub fn set_system(&mut self, system: Option<&str>) -> Result<(), NarInfoError> {
        if let Some(s) = system {
            check_value("System", s)?;
        }
        self.system = system.map(str::to_string);
        self.set_line(Key::System, self.system.clone());
        Ok(())
    }

    /// Sets or removes `CA`.
    pub fn set_ca(&mut self, ca: Option<ContentAddress>) {
        let value = ca.as_ref().map(ToString::to_string);
        self.ca = ca;
        self.set_line(Key::Ca, value);
    }

    /// Where a new line with `key` goes: before the first known line that Nix
    /// writes after it, else at the end.
    fn insert_position(&self, key: &Key) -> usize {
        let rank = key.rank();
        self.lines
            .iter()
            .position(|l| matches!((l.key.rank(), rank), (Some(a), Some(b)) if a > b))
            .unwrap_or(self.lines.len())
    }

    /// Replaces, inserts (`Some`) or removes (`None`) the line of a field
    /// that appears at most once.
    fn set_line(&mut self, key: Key, value: Option<String>) {
        match (self.lines.iter().position(|l| l.key == key), value) {
            (Some(i), Some(value)) => self.lines[i].value = value,
            (Some(i), None) => {
                self.lines.remove(i);
            }
            (None, Some(value)) => {
                let pos = self.insert_position(&key);
                self.lines.insert(pos, Line { key, value });
            }
            (None, None) => {}
        }
    }
}

/// The narinfo text: every line as parsed or set, each ending in `\n`.
impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.lines {
            writeln!(f, "{}: {}", l.key.name(), l.value)?;
        }
        Ok(())
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real narinfo files written by Nix 2.8 (`/work/shared/fixtures/make-nix-fixture.sh`,
    /// copied into `store/tests/data/`).
    const FIXTURES: &[(&str, &str)] = &[
        (
            "cache-xz-signed/1dvpcviwf86l59qmr29nfz530vpz5jpq",
            include_str!("../tests/data/cache-xz-signed/1dvpcviwf86l59qmr29nfz530vpz5jpq.narinfo"),
        ),
        (
            "cache-xz-signed/26iyx2c1s18l4jyk02mys08wf1dv6cw6",
            include_str!("../tests/data/cache-xz-signed/26iyx2c1s18l4jyk02mys08wf1dv6cw6.narinfo"),
        ),
        (
            "cache-xz-signed/ls2n8xh9822nkj0x35s1lmj7y8f11i28",
            include_str!("../tests/data/cache-xz-signed/ls2n8xh9822nkj0x35s1lmj7y8f11i28.narinfo"),
        ),
        (
            "cache-xz-signed/ni4748pm1fsl68w21l9jmxsyzg3j87ay",
            include_str!("../tests/data/cache-xz-signed/ni4748pm1fsl68w21l9jmxsyzg3j87ay.narinfo"),
        ),
        (
            "cache-xz-signed/p5fizk1ihhkjp9any6qdwxhrg2z24dxh",
            include_str!("../tests/data/cache-xz-signed/p5fizk1ihhkjp9any6qdwxhrg2z24dxh.narinfo"),
        ),
        (
            "cache-xz-signed/y4l70l742s47h8lbkds6fjqvph6hhxs6",
            include_str!("../tests/data/cache-xz-signed/y4l70l742s47h8lbkds6fjqvph6hhxs6.narinfo"),
        ),
        (
            "cache-none/1dvpcviwf86l59qmr29nfz530vpz5jpq",
            include_str!("../tests/data/cache-none/1dvpcviwf86l59qmr29nfz530vpz5jpq.narinfo"),
        ),
        (
            "cache-none/26iyx2c1s18l4jyk02mys08wf1dv6cw6",
            include_str!("../tests/data/cache-none/26iyx2c1s18l4jyk02mys08wf1dv6cw6.narinfo"),
        ),
        (
            "cache-none/ls2n8xh9822nkj0x35s1lmj7y8f11i28",
            include_str!("../tests/data/cache-none/ls2n8xh9822nkj0x35s1lmj7y8f11i28.narinfo"),
        ),
        (
            "cache-none/ni4748pm1fsl68w21l9jmxsyzg3j87ay",
            include_str!("../tests/data/cache-none/ni4748pm1fsl68w21l9jmxsyzg3j87ay.narinfo"),
        ),
        (
            "cache-none/p5fizk1ihhkjp9any6qdwxhrg2z24dxh",
            include_str!("../tests/data/cache-none/p5fizk1ihhkjp9any6qdwxhrg2z24dxh.narinfo"),
        ),
        (
            "cache-none/y4l70l742s47h8lbkds6fjqvph6hhxs6",
            include_str!("../tests/data/cache-none/y4l70l742s47h8lbkds6fjqvph6hhxs6.narinfo"),
        ),
        (
            "cache-zstd/26iyx2c1s18l4jyk02mys08wf1dv6cw6",
            include_str!("../tests/data/cache-zstd/26iyx2c1s18l4jyk02mys08wf1dv6cw6.narinfo"),
        ),
        (
            "cache-zstd/p5fizk1ihhkjp9any6qdwxhrg2z24dxh",
            include_str!("../tests/data/cache-zstd/p5fizk1ihhkjp9any6qdwxhrg2z24dxh.narinfo"),
        ),
    ];
    const PUBLIC_KEY: &str = include_str!("../tests/data/keys/public.key");
    const SECRET_KEY: &str = include_str!("../tests/data/keys/secret.key");

    fn fixture(name: &str) -> &'static str {
        FIXTURES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap()
    }

    fn top_signed() -> NarInfo {
        fixture("cache-xz-signed/26iyx2c1s18l4jyk02mys08wf1dv6cw6")
            .parse()
            .unwrap()
    }

    #[test]
    fn real_narinfos_round_trip_byte_identical() {
        for (name, text) in FIXTURES {
            let ni = NarInfo::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ni.to_string(), *text, "{name}");
            // The file is named after the hash part.
            assert!(name.ends_with(&ni.store_path().hash_part()), "{name}");
            assert_eq!(ni.unknown_fields().count(), 0);
        }
    }

    #[test]
    fn typed_fields_of_a_real_narinfo() {
        let ni = top_signed();
        assert_eq!(
            ni.store_path().to_string(),
            "/nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top"
        );
        assert_eq!(
            ni.url(),
            "nar/1f9rfx5cbjj7rxfmjdamdchxdzh4g31ff4g8q3mzi5afi485k54c.nar.xz"
        );
        assert_eq!(ni.compression(), Compression::Xz);
        assert_eq!(ni.compression_field(), Some(Compression::Xz));
        assert_eq!(
            ni.file_hash().unwrap().to_string(),
            "sha256:1f9rfx5cbjj7rxfmjdamdchxdzh4g31ff4g8q3mzi5afi485k54c"
        );
        assert_eq!(ni.file_size(), Some(360));
        // manifest.json (nix path-info --json) of the fixture gives the SRI form.
        assert_eq!(
            ni.nar_hash().to_sri(),
            "sha256-exWI+XhFKcZt4+f67u+ODaRyAG+++AsVeorPxS7qO7k="
        );
        assert_eq!(ni.nar_sha256(), ni.nar_hash().as_sha256().unwrap());
        assert_eq!(ni.nar_size(), 1056);
        let refs: Vec<String> = ni.references().iter().map(StorePath::basename).collect();
        assert_eq!(
            refs,
            [
                "1dvpcviwf86l59qmr29nfz530vpz5jpq-fixture-leaf",
                "26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top",
                "ni4748pm1fsl68w21l9jmxsyzg3j87ay-fixture-mid"
            ]
        );
        assert_eq!(
            ni.deriver().unwrap().basename(),
            "zckd9rk0czb1l50nfs8iz77hlf60clip-fixture-top.drv"
        );
        assert_eq!(ni.system(), None);
        assert_eq!(ni.signatures().len(), 1);
        assert_eq!(ni.signatures()[0].name(), "arca-fixture-1");
        assert_eq!(ni.ca(), None);

        let note: NarInfo = fixture("cache-none/p5fizk1ihhkjp9any6qdwxhrg2z24dxh")
            .parse()
            .unwrap();
        assert_eq!(note.compression(), Compression::None);
        assert!(note.references().is_empty());
        assert_eq!(note.deriver(), None);
        let ca = note.ca().unwrap();
        assert_eq!(
            ca.store_path("note.txt", &[]).unwrap().unwrap(),
            *note.store_path()
        );
        let zstd: NarInfo = fixture("cache-zstd/26iyx2c1s18l4jyk02mys08wf1dv6cw6")
            .parse()
            .unwrap();
        assert_eq!(zstd.compression(), Compression::Zstd);
        assert_eq!(zstd.nar_hash(), ni.nar_hash());
    }

    #[test]
    fn nix_signatures_verify_with_fixture_key() {
        let pk: PublicKey = PUBLIC_KEY.parse().unwrap();
        let mut n = 0;
        for (name, text) in FIXTURES
            .iter()
            .filter(|(n, _)| n.starts_with("cache-xz-signed/"))
        {
            let ni: NarInfo = text.parse().unwrap();
            assert!(ni.verify(std::slice::from_ref(&pk)), "{name}");
            assert_eq!(
                ni.count_valid_signatures(std::slice::from_ref(&pk)),
                1,
                "{name}"
            );
            n += 1;
        }
        assert_eq!(n, 6);
        // Unsigned caches have nothing to verify.
        let unsigned: NarInfo = fixture("cache-none/26iyx2c1s18l4jyk02mys08wf1dv6cw6")
            .parse()
            .unwrap();
        assert!(!unsigned.verify(&[pk]));
    }

    #[test]
    fn fingerprint_of_real_narinfo() {
        let ni = top_signed();
        assert_eq!(
            ni.fingerprint(),
            "1;/nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top;\
             sha256:1f9vx8pcbkwag8ahpy5ydw07590divpyxyp7wdnwcaa5g3wqh5bv;1056;\
             /nix/store/1dvpcviwf86l59qmr29nfz530vpz5jpq-fixture-leaf,\
             /nix/store/26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top,\
             /nix/store/ni4748pm1fsl68w21l9jmxsyzg3j87ay-fixture-mid"
        );
    }

    #[test]
    fn tampered_narinfos_do_not_verify() {
        let pk: PublicKey = PUBLIC_KEY.parse().unwrap();
        let text = fixture("cache-xz-signed/26iyx2c1s18l4jyk02mys08wf1dv6cw6");
        for (from, to) in [
            ("NarSize: 1056", "NarSize: 1057"),
            ("NarHash: sha256:1f9vx8", "NarHash: sha256:1f9vx9"),
            (" ni4748pm1fsl68w21l9jmxsyzg3j87ay-fixture-mid", ""),
            (
                "26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-top\nURL",
                "26iyx2c1s18l4jyk02mys08wf1dv6cw6-fixture-toq\nURL",
            ),
        ] {
            assert!(text.contains(from), "{from}");
            let ni: NarInfo = text.replacen(from, to, 1).parse().unwrap();
            assert!(!ni.verify(std::slice::from_ref(&pk)), "{from} -> {to}");
        }
        // Fields outside the fingerprint do not matter.
        let ni: NarInfo = text
            .replace("FileSize: 360", "FileSize: 361")
            .parse()
            .unwrap();
        assert!(ni.verify(&[pk]));
    }

    #[test]
    fn signing_with_fixture_key_reproduces_nix_signature() {
        let sk: SecretKey = SECRET_KEY.parse().unwrap();
        let signed = fixture("cache-xz-signed/1dvpcviwf86l59qmr29nfz530vpz5jpq");
        let unsigned = fixture("cache-xz-signed/1dvpcviwf86l59qmr29nfz530vpz5jpq")
            .lines()
            .filter(|l| !l.starts_with("Sig: "))
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        let mut ni: NarInfo = unsigned.parse().unwrap();
        assert!(ni.signatures().is_empty());
        ni.sign(&sk);
        assert_eq!(ni.to_string(), signed);
        // Signing again changes nothing.
        ni.sign(&sk);
        assert_eq!(ni.to_string(), signed);
        // The text CA path: Sig goes before CA.
        let signed = fixture("cache-xz-signed/p5fizk1ihhkjp9any6qdwxhrg2z24dxh");
        let mut ni: NarInfo = signed.parse().unwrap();
        ni.clear_signatures();
        assert!(!ni.to_string().contains("Sig:"));
        ni.sign(&sk);
        assert_eq!(ni.to_string(), signed);
    }

    #[test]
    fn built_narinfo_matches_nix_layout() {
        // Rebuild cache-xz-signed's fixture-leaf narinfo from typed values.
        let expected = fixture("cache-xz-signed/1dvpcviwf86l59qmr29nfz530vpz5jpq");
        let parsed: NarInfo = expected.parse().unwrap();
        let mut ni = NarInfo::new(
            parsed.store_path().clone(),
            parsed.url(),
            parsed.nar_sha256(),
            parsed.nar_size(),
        )
        .unwrap();
        // Set in a scrambled order: the lines still come out in Nix's order.
        ni.add_signature(parsed.signatures()[0].clone());
        ni.set_deriver(parsed.deriver().cloned());
        ni.set_references(parsed.references().to_vec());
        ni.set_file_size(parsed.file_size());
        ni.set_compression(Compression::Xz);
        ni.set_file_hash(parsed.file_hash().and_then(NixHash::as_sha256));
        assert_eq!(ni.to_string(), expected);
        assert_eq!(ni, parsed);

        let expected = fixture("cache-xz-signed/p5fizk1ihhkjp9any6qdwxhrg2z24dxh");
        let parsed: NarInfo = expected.parse().unwrap();
        let mut ni = NarInfo::new(
            parsed.store_path().clone(),
            parsed.url(),
            parsed.nar_sha256(),
            parsed.nar_size(),
        )
        .unwrap();
        ni.set_ca(parsed.ca().cloned());
        ni.add_signature(parsed.signatures()[0].clone());
        ni.set_file_hash(parsed.file_hash().and_then(NixHash::as_sha256));
        ni.set_file_size(parsed.file_size());
        ni.set_compression(Compression::Xz);
        assert_eq!(ni.to_string(), expected);
        assert_eq!(ni, parsed);
    }

    #[test]
    fn setters_replace_and_remove() {
        let mut ni = top_signed();
        ni.set_system(Some("x86_64-linux")).unwrap();
        assert!(ni
            .to_string()
            .contains("Deriver: zckd9rk0czb1l50nfs8iz77hlf60clip-fixture-top.drv\nSystem: x86_64-linux\nSig: "));
        assert_eq!(ni.to_string().parse::<NarInfo>().unwrap(), ni);
        ni.set_system(None).unwrap();
        ni.set_deriver(None);
        ni.set_file_hash(None);
        ni.set_file_size(None);
        assert!(!ni.to_string().contains("System:"));
        assert!(!ni.to_string().contains("Deriver:"));
        assert!(!ni.to_string().contains("File"));
        ni.set_url("nar/x.nar").unwrap();
        assert_eq!(ni.url(), "nar/x.nar");
        assert!(ni.to_string().contains("\nURL: nar/x.nar\n"));
        assert!(matches!(
            ni.set_url(""),
            Err(NarInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            ni.set_url("a\nb"),
            Err(NarInfoError::InvalidValue { .. })
        ));
        assert!(matches!(
            ni.set_system(Some("a\rb")),
            Err(NarInfoError::InvalidValue { .. })
        ));
        ni.set_references(vec![]);
        assert!(ni.to_string().contains("\nReferences: \n"));
        assert_eq!(ni.to_string().parse::<NarInfo>().unwrap(), ni);
        let sp = ni.store_path().clone();
        assert!(matches!(
            NarInfo::new(sp.clone(), "u", [0; 32], 0),
            Err(NarInfoError::ZeroNarSize)
        ));
        assert!(matches!(
            NarInfo::new(sp, "", [0; 32], 1),
            Err(NarInfoError::InvalidValue { .. })
        ));
    }

    fn minimal() -> String {
        "StorePath: /nix/store/y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base\n\
         URL: nar/x.nar\n\
         NarHash: sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv\n\
         NarSize: 128\n"
            .to_string()
    }

    #[test]
    fn minimal_narinfo_defaults() {
        let ni: NarInfo = minimal().parse().unwrap();
        assert_eq!(ni.compression(), Compression::Bzip2);
        assert_eq!(ni.compression_field(), None);
        assert_eq!(ni.file_hash(), None);
        assert_eq!(ni.file_size(), None);
        assert!(ni.references().is_empty());
        assert_eq!(ni.to_string(), minimal());
    }

    #[test]
    fn unknown_lines_are_kept_in_place() {
        let text = minimal().replace(
            "URL: nar/x.nar\n",
            "URL: nar/x.nar\nX-Extra: a: b\nLastModified: \n",
        );
        let mut ni: NarInfo = text.parse().unwrap();
        assert_eq!(ni.to_string(), text);
        let unknown: Vec<_> = ni.unknown_fields().collect();
        assert_eq!(unknown, [("X-Extra", "a: b"), ("LastModified", "")]);
        // Keys are case-sensitive: `sig` is not `Sig`.
        let text2 = format!("{}sig: whatever\n", minimal());
        let ni2: NarInfo = text2.parse().unwrap();
        assert!(ni2.signatures().is_empty());
        assert_eq!(ni2.to_string(), text2);
        // Inserting a known field keeps unknown lines where they were.
        ni.set_compression(Compression::Zstd);
        assert_eq!(
            ni.to_string(),
            minimal().replace(
                "URL: nar/x.nar\n",
                "URL: nar/x.nar\nX-Extra: a: b\nLastModified: \nCompression: zstd\n"
            )
        );
    }

    #[test]
    fn non_canonical_but_valid_values_round_trip() {
        // Nix accepts hex and SRI hashes and `unknown-deriver`; they are kept as written.
        let text = minimal()
            .replace(
                "sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv",
                "sha256-Lyuw+xskTQOwRCbauT3R6OKGOeFSxQjQbtNmaYmeFwU=",
            )
            + "References:  y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base  \nDeriver: unknown-deriver\nCompression: br\n";
        let ni: NarInfo = text.parse().unwrap();
        assert_eq!(ni.to_string(), text);
        assert_eq!(ni.deriver(), None);
        assert_eq!(ni.references().len(), 1);
        assert_eq!(ni.compression(), Compression::Brotli);
        assert_eq!(
            ni.nar_hash().to_sri(),
            "sha256-Lyuw+xskTQOwRCbauT3R6OKGOeFSxQjQbtNmaYmeFwU="
        );
    }

    #[test]
    fn all_compressions() {
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::Brotli,
            Compression::Gzip,
        ] {
            let text = format!("{}Compression: {c}\n", minimal());
            let ni: NarInfo = text.parse().unwrap();
            assert_eq!(ni.compression(), c);
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
    }

    fn err(text: &str) -> NarInfoError {
        text.parse::<NarInfo>().unwrap_err()
    }

    #[test]
    fn rejects_missing_required_fields() {
        for (field, line) in [
            (
                "StorePath",
                "StorePath: /nix/store/y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base\n",
            ),
            ("URL", "URL: nar/x.nar\n"),
            (
                "NarHash",
                "NarHash: sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv\n",
            ),
            ("NarSize", "NarSize: 128\n"),
        ] {
            assert_eq!(
                err(&minimal().replace(line, "")),
                NarInfoError::MissingField(field)
            );
        }
        assert_eq!(err(""), NarInfoError::MissingField("StorePath"));
    }

    #[test]
    fn rejects_bad_numbers() {
        for bad in [
            "",
            "-1",
            "+1",
            "1.0",
            "0x10",
            "12a",
            " 12",
            "18446744073709551616",
        ] {
            let e = err(&minimal().replace("NarSize: 128", &format!("NarSize: {bad}")));
            assert!(
                matches!(
                    e,
                    NarInfoError::InvalidNumber {
                        field: "NarSize",
                        line: 4,
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
            let e = err(&format!("{}FileSize: {bad}\n", minimal()));
            assert!(
                matches!(
                    e,
                    NarInfoError::InvalidNumber {
                        field: "FileSize",
                        line: 5,
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
        }
        assert_eq!(
            err(&minimal().replace("NarSize: 128", "NarSize: 0")),
            NarInfoError::ZeroNarSize
        );
        let ni: NarInfo = minimal()
            .replace("NarSize: 128", "NarSize: 18446744073709551615")
            .parse()
            .unwrap();
        assert_eq!(ni.nar_size(), u64::MAX);
    }

    #[test]
    fn rejects_bad_hashes() {
        let good = "sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv";
        for bad in [
            "0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv",
            "sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sge",
            "sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sg",
            "sha256:zfsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv",
            "md6:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv",
            "",
        ] {
            let e = err(&minimal().replace(good, bad));
            assert!(
                matches!(
                    e,
                    NarInfoError::InvalidHash {
                        field: "NarHash",
                        line: 3,
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
            let e = err(&format!("{}FileHash: {bad}\n", minimal()));
            assert!(
                matches!(
                    e,
                    NarInfoError::InvalidHash {
                        field: "FileHash",
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
        }
        let e = err(&minimal().replace(good, "sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm"));
        assert!(
            matches!(
                e,
                NarInfoError::NotSha256 {
                    field: "NarHash",
                    algo: HashAlgo::Sha1,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn rejects_duplicate_fields() {
        for (line, field) in [
            (
                "StorePath: /nix/store/y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base\n",
                "StorePath",
            ),
            ("URL: nar/y.nar\n", "URL"),
            ("NarSize: 128\n", "NarSize"),
            (
                "NarHash: sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv\n",
                "NarHash",
            ),
        ] {
            assert_eq!(
                err(&format!("{}{line}", minimal())),
                NarInfoError::DuplicateField { line: 5, field }
            );
        }
        for (line, field) in [
            ("Compression: xz\n", "Compression"),
            ("References: \n", "References"),
            ("Deriver: unknown-deriver\n", "Deriver"),
            ("System: x86_64-linux\n", "System"),
            (
                "CA: text:sha256:13gacf97vd8p1ak45rxn5nnjgjc3j8sh3s7kbz4nwj6lnapm31d6\n",
                "CA",
            ),
            ("FileSize: 1\n", "FileSize"),
            (
                "FileHash: sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv\n",
                "FileHash",
            ),
        ] {
            assert_eq!(
                err(&format!("{}{line}{line}", minimal())),
                NarInfoError::DuplicateField { line: 6, field }
            );
        }
        // Sig and unknown fields may repeat.
        let sig = "Sig: k:JTAGGelS63ZrJu58lms3G+DGqWUBrvxw4tIIhiq+O98eurtt4koUoFsaSxzVIastD5QCw11C78AzpTVnC/S2AQ==\n";
        let text = format!("{}{sig}{sig}X: 1\nX: 2\n", minimal());
        let ni: NarInfo = text.parse().unwrap();
        assert_eq!(ni.signatures().len(), 2);
        assert_eq!(ni.to_string(), text);
    }

    #[test]
    fn rejects_malformed_lines() {
        let e = err(&minimal().replace("\n", "\r\n"));
        assert_eq!(
            e,
            NarInfoError::ControlCharacter {
                line: 1,
                character: '\r'
            }
        );
        assert_eq!(err(minimal().trim_end()), NarInfoError::MissingFinalNewline);
        for (bad, line) in [
            ("\n", 5),
            ("NoColon\n", 5),
            ("Key:value\n", 5),
            (": value\n", 5),
            ("A B: c\n", 5),
            ("Key:\n", 5),
        ] {
            let e = err(&format!("{}{bad}", minimal()));
            assert!(
                matches!(e, NarInfoError::MalformedLine { line: l, .. } if l == line),
                "{bad:?}: {e:?}"
            );
        }
        assert!(matches!(
            err(&format!("{}X: a\tb\n", minimal())),
            NarInfoError::ControlCharacter {
                line: 5,
                character: '\t'
            }
        ));
        assert_eq!(
            NarInfo::parse(b"StorePath: \xff\n"),
            Err(NarInfoError::NotUtf8)
        );
    }

    #[test]
    fn rejects_bad_field_values() {
        let e = err(&minimal().replace("URL: nar/x.nar", "URL: "));
        assert_eq!(e, NarInfoError::EmptyUrl { line: 2 });
        let e = err(&minimal().replace("/nix/store/y4l70", "/nix/stor/y4l70"));
        assert!(
            matches!(
                e,
                NarInfoError::InvalidStorePath {
                    field: "StorePath",
                    line: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(&minimal().replace("-fixture-base\n", "-.fixture-base\n"));
        assert!(
            matches!(
                e,
                NarInfoError::InvalidStorePath {
                    field: "StorePath",
                    ..
                }
            ),
            "{e:?}"
        );
        // References and Deriver are basenames, not absolute paths.
        let e = err(&format!(
            "{}References: /nix/store/y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base\n",
            minimal()
        ));
        assert!(
            matches!(
                e,
                NarInfoError::InvalidStorePath {
                    field: "References",
                    line: 5,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(&format!(
            "{}References: y4l70l742s47h8lbkds6fjqvph6hhxs6-fixture-base bad\n",
            minimal()
        ));
        assert!(
            matches!(
                e,
                NarInfoError::InvalidStorePath {
                    field: "References",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(&format!("{}Deriver: x.drv\n", minimal()));
        assert!(
            matches!(
                e,
                NarInfoError::InvalidStorePath {
                    field: "Deriver",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = err(&format!("{}Compression: lzma\n", minimal()));
        assert_eq!(
            e,
            NarInfoError::UnknownCompression {
                line: 5,
                value: "lzma".into()
            }
        );
        let e = err(&format!("{}Compression: \n", minimal()));
        assert!(
            matches!(e, NarInfoError::UnknownCompression { .. }),
            "{e:?}"
        );
        for bad in ["nokey", "k:!!", "k:AAAA", ":AAAA"] {
            let e = err(&format!("{}Sig: {bad}\n", minimal()));
            assert!(
                matches!(e, NarInfoError::InvalidSignature { line: 5, .. }),
                "{bad:?}: {e:?}"
            );
        }
        for bad in [
            "",
            "sha256:0fsaxg1w9nlx43wn5jfspsypxrl2pcpkl9r54cdhjvxnklw42sgv",
            "text:sha256:x",
            "fixed:r:sha256",
        ] {
            let e = err(&format!("{}CA: {bad}\n", minimal()));
            assert!(
                matches!(e, NarInfoError::InvalidContentAddress { line: 5, .. }),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn rejects_oversized_input() {
        let mut text = minimal();
        while text.len() <= MAX_NARINFO_SIZE {
            text.push_str("X-Padding: 0123456789012345678901234567890123456789\n");
        }
        assert_eq!(
            NarInfo::parse(text.as_bytes()),
            Err(NarInfoError::TooLarge(text.len()))
        );
        assert_eq!(
            text.parse::<NarInfo>(),
            Err(NarInfoError::TooLarge(text.len()))
        );
        // Exactly at the limit is fine.
        let mut text = minimal();
        let pad = MAX_NARINFO_SIZE - text.len() - "X: \n".len();
        text.push_str(&format!("X: {}\n", "a".repeat(pad)));
        assert_eq!(text.len(), MAX_NARINFO_SIZE);
        assert!(NarInfo::parse(text.as_bytes()).is_ok());
    }
}
