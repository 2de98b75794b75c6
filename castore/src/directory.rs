//! Directories: validated, canonical, addressed by the BLAKE3 digest of their
//! canonical protobuf encoding.
use crate::digest::DigestError;
use crate::names::NameError;
use crate::node::lossy;
use crate::{B3Digest, Node, PathComponent};
use arca_proto::castore as proto;
use prost::Message;
use std::collections::BTreeMap;

/// Why a directory (or a node) is invalid. Each rule of protocol.md has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// A list is not strictly ascending by raw bytes.
    #[error("entry {0:?} is out of order (each list must be strictly ascending)")]
    WrongSorting(String),
    /// A name occurs twice (within or across the lists).
    #[error("entry {0:?} occurs more than once")]
    DuplicateName(String),
    /// An invalid entry name.
    #[error("invalid entry name {0:?}: {1}")]
    InvalidName(String, NameError),
    /// A digest that is not 32 bytes.
    #[error("entry {0:?}: {1}")]
    InvalidDigest(String, DigestError),
    /// An invalid symlink target.
    #[error("symlink {0:?}: {1}")]
    InvalidSymlinkTarget(String, NameError),
    /// The size sum overflows u64.
    #[error("directory size overflows u64 at entry {0:?}")]
    SizeOverflow(String),
    /// A `Node` with no variant set.
    #[error("node has no variant set")]
    NoNodeSet,
    /// The bytes are not a protobuf `Directory`.
    #[error("not a Directory message: {0}")]
    Decode(String),
}

/// A directory: entries by name. Always valid; the size never overflows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    entries: BTreeMap<PathComponent, Node>,
    size: u64,
}

fn entry_weight(node: &Node) -> Option<u64> {
    match node {
        Node::Directory { size, .. } => size.checked_add(1),
        _ => Some(1),
    }
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry. Fails if the name exists or the size would overflow.
    pub fn add(&mut self, name: PathComponent, node: Node) -> Result<(), DirectoryError> {
        if self.entries.contains_key(&name) {
            return Err(DirectoryError::DuplicateName(name.to_string()));
        }
        let size = entry_weight(&node)
            .and_then(|w| w.checked_add(1))
            .and_then(|w| self.size.checked_add(w))
            .ok_or_else(|| DirectoryError::SizeOverflow(name.to_string()))?;
        self.entries.insert(name, node);
        self.size = size;
        Ok(())
    }

    /// The deployed (Tvix/Snix) size: `entries + Σ (1 + child.size)` for
    /// directories and `1` for files and symlinks.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the directory has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries, sorted by name.
    pub fn entries(&self) -> impl Iterator<Item = (&PathComponent, &Node)> {
        self.entries.iter()
    }

    /// Looks up an entry.
    pub fn get(&self, name: &PathComponent) -> Option<&Node> {
        self.entries.get(name)
    }

    /// The child directories: (digest, size) pairs, in name order.
    pub fn child_directories(&self) -> impl Iterator<Item = (&PathComponent, B3Digest, u64)> {
        self.entries.iter().filter_map(|(n, node)| match node {
            Node::Directory { digest, size } => Some((n, *digest, *size)),
            _ => None,
        })
    }

    /// The canonical wire form: each list sorted, defaults omitted.
    pub fn to_proto(&self) -> proto::Directory {
        let mut out = proto::Directory::default();
        for (name, node) in &self.entries {
            let name = name.to_bytes();
            match node {
                Node::Directory { digest, size } => out.directories.push(proto::DirectoryNode {
                    name,
                    digest: digest.to_bytes(),
                    size: *size,
                }),
                Node::File {
                    digest,
                    size,
                    executable,
                } => out.files.push(proto::FileNode {
                    name,
                    digest: digest.to_bytes(),
                    size: *size,
                    executable: *executable,
                }),
                Node::Symlink { target } => out.symlinks.push(proto::SymlinkNode {
                    name,
                    target: target.to_bytes(),
                }),
            }
        }
        out
    }

    /// The canonical encoding (the bytes the digest is computed over).
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// The directory's digest: BLAKE3 of its canonical encoding.
    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode())
    }

    /// Decodes and validates bytes holding a wire `Directory`.
    pub fn decode(bytes: &[u8]) -> Result<Self, DirectoryError> {
        let p =
            proto::Directory::decode(bytes).map_err(|e| DirectoryError::Decode(e.to_string()))?;
        Self::try_from(p)
    }
}

fn check_sorted<'a>(names: impl Iterator<Item = &'a bytes::Bytes>) -> Result<(), DirectoryError> {
    let mut prev: Option<&bytes::Bytes> = None;
    for n in names {
        if let Some(p) = prev {
            if n <= p {
                return Err(if n == p {
                    DirectoryError::DuplicateName(lossy(n))
                } else {
                    DirectoryError::WrongSorting(lossy(n))
                });
            }
        }
        prev = Some(n);
    }
    Ok(())
}

impl TryFrom<proto::Directory> for Directory {
    type Error = DirectoryError;

    fn try_from(p: proto::Directory) -> Result<Self, Self::Error> {
        check_sorted(p.directories.iter().map(|d| &d.name))?;
        check_sorted(p.files.iter().map(|f| &f.name))?;
        check_sorted(p.symlinks.iter().map(|s| &s.name))?;
        let mut dir = Directory::new();
        let nodes = p
            .directories
            .into_iter()
            .map(|d| proto::Node {
                node: Some(proto::node::Node::Directory(d)),
            })
            .chain(p.files.into_iter().map(|f| proto::Node {
                node: Some(proto::node::Node::File(f)),
            }))
            .chain(p.symlinks.into_iter().map(|s| proto::Node {
                node: Some(proto::node::Node::Symlink(s)),
            }));
        for node in nodes {
            let (name, node) = Node::try_from_proto_named(node)?;
            dir.add(name, node)?;
        }
        Ok(dir)
    }
}

impl From<&Directory> for proto::Directory {
    fn from(d: &Directory) -> Self {
        d.to_proto()
    }
}

impl From<Directory> for proto::Directory {
    fn from(d: Directory) -> Self {
        d.to_proto()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn empty_digest() -> B3Digest {
        B3Digest::of(b"")
    }

    fn pnode(name: &str) -> proto::DirectoryNode {
        proto::DirectoryNode {
            name: Bytes::from(name.to_string()),
            digest: empty_digest().to_bytes(),
            size: 0,
        }
    }
    fn pfile(name: &str) -> proto::FileNode {
        proto::FileNode {
            name: Bytes::from(name.to_string()),
            digest: empty_digest().to_bytes(),
            size: 0,
            executable: false,
        }
    }
    fn plink(name: &str, target: &str) -> proto::SymlinkNode {
        proto::SymlinkNode {
            name: Bytes::from(name.to_string()),
            target: Bytes::from(target.to_string()),
        }
    }

    #[test]
    fn vector_empty_directory() {
        assert_eq!(
            Directory::new().digest().to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn vector_keep_file() {
        let mut d = Directory::new();
        d.add(
            ".keep".try_into().unwrap(),
            Node::File {
                digest: empty_digest(),
                size: 0,
                executable: false,
            },
        )
        .unwrap();
        assert_eq!(
            d.digest().to_hex(),
            "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"
        );
    }

    #[test]
    fn vector_child_directory() {
        let mut d = Directory::new();
        d.add(
            "a".try_into().unwrap(),
            Node::Directory {
                digest: Directory::new().digest(),
                size: 0,
            },
        )
        .unwrap();
        assert_eq!(
            d.digest().to_hex(),
            "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc"
        );
    }

    #[test]
    fn size_uses_deployed_convention() {
        let mut inner = Directory::new();
        inner
            .add(
                ".keep".try_into().unwrap(),
                Node::File {
                    digest: empty_digest(),
                    size: 0,
                    executable: false,
                },
            )
            .unwrap();
        assert_eq!(inner.size(), 2);
        let mut outer = Directory::new();
        outer
            .add(
                "keep".try_into().unwrap(),
                Node::Directory {
                    digest: inner.digest(),
                    size: inner.size(),
                },
            )
            .unwrap();
        outer
            .add(
                "l".try_into().unwrap(),
                Node::Symlink {
                    target: "x".try_into().unwrap(),
                },
            )
            .unwrap();
        // 2 entries + (1 + 2) + 1
        assert_eq!(outer.size(), 6);
    }

    #[test]
    fn roundtrip_through_proto() {
        let p = proto::Directory {
            directories: vec![pnode("a")],
            files: vec![pfile("b")],
            symlinks: vec![plink("c", "t")],
        };
        let d = Directory::try_from(p.clone()).unwrap();
        assert_eq!(d.to_proto(), p);
    }

    #[test]
    fn rejects_unsorted_list() {
        let p = proto::Directory {
            files: vec![pfile("b"), pfile("a")],
            ..Default::default()
        };
        assert!(matches!(Directory::try_from(p), Err(DirectoryError::WrongSorting(n)) if n == "a"));
    }

    #[test]
    fn rejects_duplicate_within_list() {
        let p = proto::Directory {
            symlinks: vec![plink("a", "t"), plink("a", "t")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::DuplicateName(_))
        ));
    }

    #[test]
    fn rejects_duplicate_across_lists() {
        let p = proto::Directory {
            directories: vec![pnode("a")],
            files: vec![pfile("a")],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::DuplicateName(_))
        ));
    }

    #[test]
    fn rejects_invalid_names() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            let p = proto::Directory {
                files: vec![pfile(bad)],
                ..Default::default()
            };
            assert!(
                matches!(Directory::try_from(p), Err(DirectoryError::InvalidName(..))),
                "{bad:?}"
            );
        }
        let p = proto::Directory {
            files: vec![pfile(&"x".repeat(256))],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::InvalidName(..))
        ));
    }

    #[test]
    fn rejects_wrong_digest_length() {
        let mut f = pfile("a");
        f.digest = Bytes::from_static(&[1u8; 31]);
        let p = proto::Directory {
            files: vec![f],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::InvalidDigest(..))
        ));
        let mut d = pnode("a");
        d.digest = Bytes::new();
        let p = proto::Directory {
            directories: vec![d],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::InvalidDigest(..))
        ));
    }

    #[test]
    fn rejects_invalid_symlink_targets() {
        for bad in [String::new(), "a\0".to_string(), "x".repeat(4096)] {
            let p = proto::Directory {
                symlinks: vec![plink("l", &bad)],
                ..Default::default()
            };
            assert!(matches!(
                Directory::try_from(p),
                Err(DirectoryError::InvalidSymlinkTarget(..))
            ));
        }
    }

    #[test]
    fn rejects_size_overflow() {
        let mut a = pnode("a");
        a.size = u64::MAX - 1;
        let p = proto::Directory {
            directories: vec![a],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::SizeOverflow(_))
        ));
        let mut a = pnode("a");
        a.size = u64::MAX / 2;
        let mut b = pnode("b");
        b.size = u64::MAX / 2;
        let p = proto::Directory {
            directories: vec![a, b],
            ..Default::default()
        };
        assert!(matches!(
            Directory::try_from(p),
            Err(DirectoryError::SizeOverflow(_))
        ));
    }

    #[test]
    fn rejects_node_without_variant() {
        assert_eq!(
            Node::try_from_proto(proto::Node { node: None }),
            Err(DirectoryError::NoNodeSet)
        );
    }

    #[test]
    fn rejects_garbage_bytes() {
        assert!(matches!(
            Directory::decode(&[0xff, 0xff, 0xff]),
            Err(DirectoryError::Decode(_))
        ));
    }
}
