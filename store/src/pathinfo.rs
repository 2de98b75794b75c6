//! [PathInfo]: what the store knows about one store path — its root node in
//! castore, its references, NAR hash and size, signatures, deriver and
//! content address.
//!
//! The wire type `tvix.store.v1.PathInfo` becomes a [PathInfo] only through
//! `TryFrom`, which checks every rule of `protocol.md` (each with its own
//! [PathInfoError] variant); [PathInfo::to_proto] gives the wire type back.
use crate::hash::{HashAlgo, NixHash};
use crate::narinfo::{Compression, NarInfo, NarInfoError};
use crate::signature::{self, PublicKey, SecretKey, Signature, SIGNATURE_LEN};
use crate::store_path::{ContentAddress, StorePath, StorePathError, DIGEST_LEN};
use arca_castore::{DirectoryError, Node};
use arca_proto::castore as cproto;
use arca_proto::store as proto;
use bytes::Bytes;

/// A PathInfo that breaks a rule of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathInfoError {
    /// No root node.
    #[error("no root node")]
    NoNode,
    /// The root node itself is invalid (no variant, bad digest, bad symlink target).
    #[error("invalid root node: {0}")]
    InvalidNode(DirectoryError),
    /// The root node's name is not a store path basename.
    #[error("root node name {name:?} is not a store path basename: {source}")]
    InvalidNodeName {
        /// The name, lossily decoded.
        name: String,
        /// Why.
        source: StorePathError,
    },
    /// No `narinfo` message.
    #[error("no narinfo")]
    NoNarInfo,
    /// A reference is not 20 bytes.
    #[error("reference {index} is {len} bytes long, expected {DIGEST_LEN}")]
    InvalidReferenceDigest {
        /// Position in `references`.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// `references` and `reference_names` differ in length.
    #[error("{references} references but {names} reference names")]
    ReferenceCountMismatch {
        /// Number of `references`.
        references: usize,
        /// Number of `reference_names`.
        names: usize,
    },
    /// A reference name is not a store path basename.
    #[error("reference name {index} ({name:?}) is not a store path basename: {source}")]
    InvalidReferenceName {
        /// Position in `reference_names`.
        index: usize,
        /// The name.
        name: String,
        /// Why.
        source: StorePathError,
    },
    /// A reference name's hash part is not the raw reference at the same position.
    #[error("reference name {index} ({name:?}) does not match reference digest {digest}")]
    ReferenceNameMismatch {
        /// Position.
        index: usize,
        /// The name.
        name: String,
        /// The raw reference, nixbase32.
        digest: String,
    },
    /// `nar_sha256` is not 32 bytes.
    #[error("nar_sha256 is {0} bytes long, expected 32")]
    InvalidNarSha256(usize),
    /// A signature with an empty name.
    #[error("signature {0} has an empty name")]
    SignatureWithoutName(usize),
    /// A signature that is not 64 bytes.
    #[error("signature {index} is {len} bytes long, expected {SIGNATURE_LEN}")]
    InvalidSignatureLength {
        /// Position.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// The deriver's digest is not 20 bytes.
    #[error("deriver digest is {0} bytes long, expected {DIGEST_LEN}")]
    InvalidDeriverDigest(usize),
    /// The deriver's name is invalid.
    #[error("deriver name {name:?} is invalid: {source}")]
    InvalidDeriverName {
        /// The name.
        name: String,
        /// Why.
        source: StorePathError,
    },
    /// The deriver's name does not end in `.drv`.
    #[error("deriver name {0:?} does not end in .drv")]
    DeriverNotDrv(String),
    /// Unknown CA hash type.
    #[error("unknown CA hash type {0}")]
    UnknownCaHashType(i32),
    /// The CA digest's length does not match its hash type.
    #[error("CA digest is {len} bytes long, {algo} needs {}", algo.digest_len())]
    InvalidCaDigest {
        /// The hash type's algorithm.
        algo: HashAlgo,
        /// The digest's length.
        len: usize,
    },
    /// A content address the wire format cannot carry (text with another hash than SHA-256).
    #[error("content address {0} cannot be sent")]
    UnrepresentableCa(String),
}

impl From<PathInfoError> for arca_castore::Error {
    fn from(e: PathInfoError) -> Self {
        arca_castore::Error::InvalidRequest(format!("invalid PathInfo: {e}"))
    }
}

/// A validated path info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The store path (the root node's name).
    pub store_path: StorePath,
    /// The root node in castore.
    pub node: Node,
    /// The store paths it refers to (in the order given; may include itself).
    pub references: Vec<StorePath>,
    /// Size of its NAR in bytes.
    pub nar_size: u64,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Signatures over its [fingerprint](PathInfo::fingerprint).
    pub signatures: Vec<Signature>,
    /// The `.drv` that built it, if known.
    pub deriver: Option<StorePath>,
    /// Its content address, if it is content-addressed.
    pub ca: Option<ContentAddress>,
}

/// The wire CA hash type for a content address.
fn ca_to_proto(ca: &ContentAddress) -> Result<proto::nar_info::Ca, PathInfoError> {
    use proto::nar_info::ca::Hash as H;
    let (ty, hash) = match ca {
        ContentAddress::Text(h) if h.algo() == HashAlgo::Sha256 => (H::TextSha256, h),
        ContentAddress::Text(_) => return Err(PathInfoError::UnrepresentableCa(ca.to_string())),
        ContentAddress::Fixed {
            recursive: true,
            hash,
        } => (
            match hash.algo() {
                HashAlgo::Sha256 => H::NarSha256,
                HashAlgo::Sha1 => H::NarSha1,
                HashAlgo::Sha512 => H::NarSha512,
                HashAlgo::Md5 => H::NarMd5,
            },
            hash,
        ),
        ContentAddress::Fixed {
            recursive: false,
            hash,
        } => (
            match hash.algo() {
                HashAlgo::Sha256 => H::FlatSha256,
                HashAlgo::Sha1 => H::FlatSha1,
                HashAlgo::Sha512 => H::FlatSha512,
                HashAlgo::Md5 => H::FlatMd5,
            },
            hash,
        ),
    };
    Ok(proto::nar_info::Ca {
        r#type: ty as i32,
        digest: Bytes::copy_from_slice(hash.digest()),
    })
}

fn ca_from_proto(ca: &proto::nar_info::Ca) -> Result<ContentAddress, PathInfoError> {
    use proto::nar_info::ca::Hash as H;
    let ty = H::try_from(ca.r#type).map_err(|_| PathInfoError::UnknownCaHashType(ca.r#type))?;
    // (text, recursive, algo)
    let (text, recursive, algo) = match ty {
        H::NarSha256 => (false, true, HashAlgo::Sha256),
        H::NarSha1 => (false, true, HashAlgo::Sha1),
        H::NarSha512 => (false, true, HashAlgo::Sha512),
        H::NarMd5 => (false, true, HashAlgo::Md5),
        H::TextSha256 => (true, false, HashAlgo::Sha256),
        H::FlatSha1 => (false, false, HashAlgo::Sha1),
        H::FlatMd5 => (false, false, HashAlgo::Md5),
        H::FlatSha256 => (false, false, HashAlgo::Sha256),
        H::FlatSha512 => (false, false, HashAlgo::Sha512),
    };
    let hash = NixHash::new(algo, &ca.digest).ok_or(PathInfoError::InvalidCaDigest {
        algo,
        len: ca.digest.len(),
    })?;
    Ok(if text {
        ContentAddress::Text(hash)
    } else {
        ContentAddress::Fixed { recursive, hash }
    })
}

impl TryFrom<proto::PathInfo> for PathInfo {
    type Error = PathInfoError;

    fn try_from(p: proto::PathInfo) -> Result<Self, Self::Error> {
        let node = p.node.ok_or(PathInfoError::NoNode)?;
        let (name, node) = Node::try_from_proto(node).map_err(PathInfoError::InvalidNode)?;
        let lossy_name = String::from_utf8_lossy(&name).into_owned();
        let store_path = std::str::from_utf8(&name)
            .map_err(|_| StorePathError::NotInStore(lossy_name.clone()))
            .and_then(StorePath::from_basename)
            .map_err(|source| PathInfoError::InvalidNodeName {
                name: lossy_name,
                source,
            })?;

        let narinfo = p.narinfo.ok_or(PathInfoError::NoNarInfo)?;
        if p.references.len() != narinfo.reference_names.len() {
            return Err(PathInfoError::ReferenceCountMismatch {
                references: p.references.len(),
                names: narinfo.reference_names.len(),
            });
        }
        let mut references = Vec::with_capacity(p.references.len());
        for (index, (raw, name)) in p
            .references
            .iter()
            .zip(&narinfo.reference_names)
            .enumerate()
        {
            let digest: [u8; DIGEST_LEN] =
                raw.as_ref()
                    .try_into()
                    .map_err(|_| PathInfoError::InvalidReferenceDigest {
                        index,
                        len: raw.len(),
                    })?;
            let sp = StorePath::from_basename(name).map_err(|source| {
                PathInfoError::InvalidReferenceName {
                    index,
                    name: name.clone(),
                    source,
                }
            })?;
            if *sp.digest() != digest {
                return Err(PathInfoError::ReferenceNameMismatch {
                    index,
                    name: name.clone(),
                    digest: crate::nixbase32::encode(&digest),
                });
            }
            references.push(sp);
        }

        let nar_sha256: [u8; 32] = narinfo
            .nar_sha256
            .as_ref()
            .try_into()
            .map_err(|_| PathInfoError::InvalidNarSha256(narinfo.nar_sha256.len()))?;

        let mut signatures = Vec::with_capacity(narinfo.signatures.len());
        for (index, s) in narinfo.signatures.iter().enumerate() {
            if s.name.is_empty() {
                return Err(PathInfoError::SignatureWithoutName(index));
            }
            let bytes: [u8; SIGNATURE_LEN] =
                s.data
                    .as_ref()
                    .try_into()
                    .map_err(|_| PathInfoError::InvalidSignatureLength {
                        index,
                        len: s.data.len(),
                    })?;
            signatures.push(Signature::new(s.name.clone(), bytes));
        }

        let deriver = match &narinfo.deriver {
            None => None,
            Some(d) => {
                let digest: [u8; DIGEST_LEN] = d
                    .digest
                    .as_ref()
                    .try_into()
                    .map_err(|_| PathInfoError::InvalidDeriverDigest(d.digest.len()))?;
                let sp = StorePath::new(digest, &d.name).map_err(|source| {
                    PathInfoError::InvalidDeriverName {
                        name: d.name.clone(),
                        source,
                    }
                })?;
                if !d.name.ends_with(".drv") {
                    return Err(PathInfoError::DeriverNotDrv(d.name.clone()));
                }
                Some(sp)
            }
        };

        let ca = narinfo.ca.as_ref().map(ca_from_proto).transpose()?;

        Ok(PathInfo {
            store_path,
            node,
            references,
            nar_size: narinfo.nar_size,
            nar_sha256,
            signatures,
            deriver,
            ca,
        })
    }
}

impl PathInfo {
    /// The 20-byte digest of its store path (the key services store it under).
    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        self.store_path.digest()
    }

    /// The wire type. Fails only for a content address the wire cannot carry
    /// (`text:` with another hash than SHA-256).
    pub fn try_to_proto(&self) -> Result<proto::PathInfo, PathInfoError> {
        Ok(proto::PathInfo {
            node: Some(
                self.node
                    .clone()
                    .into_proto(Bytes::from(self.store_path.basename())),
            ),
            references: self
                .references
                .iter()
                .map(|r| Bytes::copy_from_slice(r.digest()))
                .collect(),
            narinfo: Some(proto::NarInfo {
                nar_size: self.nar_size,
                nar_sha256: Bytes::copy_from_slice(&self.nar_sha256),
                signatures: self
                    .signatures
                    .iter()
                    .map(|s| proto::nar_info::Signature {
                        name: s.name().to_string(),
                        data: Bytes::copy_from_slice(s.bytes()),
                    })
                    .collect(),
                reference_names: self.references.iter().map(StorePath::basename).collect(),
                deriver: self.deriver.as_ref().map(|d| proto::StorePath {
                    name: d.name().to_string(),
                    digest: Bytes::copy_from_slice(d.digest()),
                }),
                ca: self.ca.as_ref().map(ca_to_proto).transpose()?,
            }),
        })
    }

    /// The wire type (see [PathInfo::try_to_proto]; an unrepresentable CA is
    /// an [arca_castore::Error::InvalidRequest]).
    pub fn to_proto(&self) -> Result<proto::PathInfo, arca_castore::Error> {
        Ok(self.try_to_proto()?)
    }

    /// The fingerprint Nix signs: `1;<path>;sha256:<nixbase32>;<size>;<sorted refs>`.
    pub fn fingerprint(&self) -> String {
        signature::fingerprint(
            &self.store_path,
            &NixHash::sha256(self.nar_sha256),
            self.nar_size,
            &self.references,
        )
    }

    /// Signs the fingerprint with `key` and adds the signature, keeping the
    /// existing ones (nothing changes if the same signature is already there).
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        if !self.signatures.contains(&sig) {
            self.signatures.push(sig);
        }
    }

    /// Whether at least one signature verifies with one of `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.signatures
            .iter()
            .any(|s| keys.iter().any(|k| k.verify(fp.as_bytes(), s)))
    }

    /// The narinfo describing it, for a NAR served at `url` with `compression`
    /// (references written sorted, as Nix writes them). Fails for a zero NAR
    /// size or a URL with control characters.
    pub fn to_narinfo(&self, url: &str, compression: Compression) -> Result<NarInfo, NarInfoError> {
        let mut n = NarInfo::new(self.store_path.clone(), url, self.nar_sha256, self.nar_size)?;
        n.set_compression(compression);
        let mut refs = self.references.clone();
        refs.sort();
        refs.dedup();
        n.set_references(refs);
        n.set_deriver(self.deriver.clone());
        n.set_ca(self.ca.clone());
        for s in &self.signatures {
            n.add_signature(s.clone());
        }
        Ok(n)
    }

    /// A path info from a narinfo and the root node its NAR was ingested as.
    pub fn from_narinfo(narinfo: &NarInfo, node: Node) -> Self {
        PathInfo {
            store_path: narinfo.store_path().clone(),
            node,
            references: narinfo.references().to_vec(),
            nar_size: narinfo.nar_size(),
            nar_sha256: narinfo.nar_sha256(),
            signatures: narinfo.signatures().to_vec(),
            deriver: narinfo.deriver().cloned(),
            ca: narinfo.ca().cloned(),
        }
    }
}

/// The root node of a `CalculateNAR` request: any valid node, with an empty name.
pub fn calculate_nar_node(node: cproto::Node) -> Result<Node, arca_castore::Error> {
    let (name, node) = Node::try_from_proto(node)
        .map_err(|e| arca_castore::Error::InvalidRequest(format!("invalid node: {e}")))?;
    if !name.is_empty() {
        return Err(arca_castore::Error::InvalidRequest(
            "the node of CalculateNAR must have an empty name".into(),
        ));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::B3Digest;

    const DRV: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la-hello-2.12.drv";

    fn sp(s: &str) -> StorePath {
        StorePath::from_basename(s).unwrap()
    }

    fn sample() -> PathInfo {
        let me = sp("00000000000000000000000000000000-hello");
        let other = sp("11111111111111111111111111111111-dep");
        PathInfo {
            store_path: me.clone(),
            node: Node::Directory {
                digest: B3Digest::of(b"x"),
                size: 3,
            },
            references: vec![other, me],
            nar_size: 100,
            nar_sha256: [7; 32],
            signatures: vec![Signature::new("k-1", [9; 64])],
            deriver: Some(sp(DRV)),
            ca: Some(ContentAddress::Fixed {
                recursive: true,
                hash: NixHash::sha256([1; 32]),
            }),
        }
    }

    fn bad(f: impl FnOnce(&mut proto::PathInfo)) -> PathInfoError {
        let mut p = sample().try_to_proto().unwrap();
        f(&mut p);
        PathInfo::try_from(p).unwrap_err()
    }

    fn ni(p: &mut proto::PathInfo) -> &mut proto::NarInfo {
        p.narinfo.as_mut().unwrap()
    }

    #[test]
    fn roundtrips_through_proto() {
        let i = sample();
        assert_eq!(PathInfo::try_from(i.try_to_proto().unwrap()).unwrap(), i);
        for ca in [
            ContentAddress::Text(NixHash::sha256([2; 32])),
            ContentAddress::Fixed {
                recursive: false,
                hash: NixHash::new(HashAlgo::Md5, &[3; 16]).unwrap(),
            },
            ContentAddress::Fixed {
                recursive: true,
                hash: NixHash::new(HashAlgo::Sha512, &[3; 64]).unwrap(),
            },
            ContentAddress::Fixed {
                recursive: false,
                hash: NixHash::new(HashAlgo::Sha1, &[3; 20]).unwrap(),
            },
        ] {
            let mut i = sample();
            i.ca = Some(ca);
            i.deriver = None;
            i.signatures.clear();
            assert_eq!(PathInfo::try_from(i.try_to_proto().unwrap()).unwrap(), i);
        }
    }

    #[test]
    fn every_rule_has_its_error() {
        assert_eq!(bad(|p| p.node = None), PathInfoError::NoNode);
        assert!(matches!(
            bad(|p| p.node = Some(cproto::Node { node: None })),
            PathInfoError::InvalidNode(_)
        ));
        assert!(matches!(
            bad(|p| p.node = Some(
                Node::Symlink {
                    target: arca_castore::SymlinkTarget::try_from(Bytes::from_static(b"/x"))
                        .unwrap()
                }
                .into_proto("hello".into())
            )),
            PathInfoError::InvalidNodeName { .. }
        ));
        assert!(matches!(
            bad(|p| p.node = Some(
                Node::File {
                    digest: B3Digest::of(b""),
                    size: 0,
                    executable: false
                }
                .into_proto("".into())
            )),
            PathInfoError::InvalidNodeName { .. }
        ));
        assert_eq!(bad(|p| p.narinfo = None), PathInfoError::NoNarInfo);
        assert_eq!(
            bad(|p| {
                ni(p).reference_names.pop();
            }),
            PathInfoError::ReferenceCountMismatch {
                references: 2,
                names: 1
            }
        );
        assert_eq!(
            bad(|p| p.references[0] = Bytes::from_static(&[1; 19])),
            PathInfoError::InvalidReferenceDigest { index: 0, len: 19 }
        );
        assert!(matches!(
            bad(|p| ni(p).reference_names[1] = "nope".into()),
            PathInfoError::InvalidReferenceName { index: 1, .. }
        ));
        // Same count, swapped order: names no longer match the raw digests.
        assert!(matches!(
            bad(|p| ni(p).reference_names.swap(0, 1)),
            PathInfoError::ReferenceNameMismatch { index: 0, .. }
        ));
        assert_eq!(
            bad(|p| ni(p).nar_sha256 = Bytes::from_static(&[0; 20])),
            PathInfoError::InvalidNarSha256(20)
        );
        assert_eq!(
            bad(|p| ni(p).signatures[0].name.clear()),
            PathInfoError::SignatureWithoutName(0)
        );
        assert_eq!(
            bad(|p| ni(p).signatures[0].data = Bytes::from_static(&[0; 63])),
            PathInfoError::InvalidSignatureLength { index: 0, len: 63 }
        );
        assert_eq!(
            bad(|p| ni(p).deriver.as_mut().unwrap().digest = Bytes::from_static(&[0; 32])),
            PathInfoError::InvalidDeriverDigest(32)
        );
        assert!(matches!(
            bad(|p| ni(p).deriver.as_mut().unwrap().name = "a/b.drv".into()),
            PathInfoError::InvalidDeriverName { .. }
        ));
        assert_eq!(
            bad(|p| ni(p).deriver.as_mut().unwrap().name = "hello".into()),
            PathInfoError::DeriverNotDrv("hello".into())
        );
        assert_eq!(
            bad(|p| ni(p).ca.as_mut().unwrap().r#type = 42),
            PathInfoError::UnknownCaHashType(42)
        );
        assert_eq!(
            bad(|p| ni(p).ca.as_mut().unwrap().digest = Bytes::from_static(&[0; 20])),
            PathInfoError::InvalidCaDigest {
                algo: HashAlgo::Sha256,
                len: 20
            }
        );
        assert_eq!(
            bad(|p| ni(p).ca.as_mut().unwrap().r#type = proto::nar_info::ca::Hash::NarMd5 as i32),
            PathInfoError::InvalidCaDigest {
                algo: HashAlgo::Md5,
                len: 32
            }
        );
        // Errors become INVALID_ARGUMENT.
        let e: arca_castore::Error = PathInfoError::NoNode.into();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn narinfo_conversion_and_signing() {
        let key: SecretKey = include_str!("../tests/data/keys/secret.key")
            .parse()
            .unwrap();
        let public: PublicKey = include_str!("../tests/data/keys/public.key")
            .parse()
            .unwrap();
        let mut i = sample();
        i.sign(&key);
        i.sign(&key);
        assert_eq!(
            i.signatures.len(),
            2,
            "existing signature kept, re-signing adds nothing"
        );
        assert!(i.verify(std::slice::from_ref(&public)));
        let n = i.to_narinfo("nar/x.nar", Compression::None).unwrap();
        assert_eq!(n.fingerprint(), i.fingerprint());
        assert!(n.verify(&[public]));
        assert_eq!(n.references().len(), 2);
        let back = PathInfo::from_narinfo(
            &NarInfo::parse(n.to_string().as_bytes()).unwrap(),
            i.node.clone(),
        );
        let mut sorted = i.clone();
        sorted.references.sort();
        assert_eq!(back, sorted);
    }

    #[test]
    fn fingerprints_of_real_narinfos_verify() {
        let public: PublicKey = include_str!("../tests/data/keys/public.key")
            .parse()
            .unwrap();
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cache-xz-signed");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let n_info = NarInfo::parse(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
            let i = PathInfo::from_narinfo(
                &n_info,
                Node::Directory {
                    digest: B3Digest::of(b""),
                    size: 0,
                },
            );
            assert_eq!(i.fingerprint(), n_info.fingerprint());
            assert!(i.verify(std::slice::from_ref(&public)));
            let back = PathInfo::try_from(i.try_to_proto().unwrap()).unwrap();
            assert_eq!(back, i);
            n += 1;
        }
        assert_eq!(n, 6);
    }

    #[test]
    fn calculate_nar_node_needs_empty_name() {
        let n = Node::File {
            digest: B3Digest::of(b""),
            size: 0,
            executable: false,
        };
        assert_eq!(
            calculate_nar_node(n.clone().into_proto(Bytes::new())).unwrap(),
            n
        );
        assert!(matches!(
            calculate_nar_node(n.into_proto("x".into())),
            Err(arca_castore::Error::InvalidRequest(_))
        ));
    }
}
