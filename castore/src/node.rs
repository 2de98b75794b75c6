//! Nodes: what a directory entry (or a store path's root) points at.
use crate::directory::DirectoryError;
use crate::{B3Digest, PathComponent, SymlinkTarget};
use arca_proto::castore as proto;
use bytes::Bytes;

/// A directory entry without its name: a directory, a file or a symlink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory, by the digest of its [crate::Directory] and its size
    /// (deployed convention, see [crate::Directory::size]).
    Directory {
        /// Digest of the child directory.
        digest: B3Digest,
        /// Size of the child directory.
        size: u64,
    },
    /// A regular file.
    File {
        /// Digest of the contents.
        digest: B3Digest,
        /// Length of the contents in bytes.
        size: u64,
        /// Whether the executable bit is set.
        executable: bool,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points; never followed.
        target: SymlinkTarget,
    },
}

impl Node {
    /// Converts a wire `Node`, returning its (unvalidated, possibly empty) name.
    /// Every other rule is checked: digest lengths, symlink targets, a set variant.
    pub fn try_from_proto(node: proto::Node) -> Result<(Bytes, Node), DirectoryError> {
        match node.node {
            None => Err(DirectoryError::NoNodeSet),
            Some(proto::node::Node::Directory(d)) => {
                let n = Node::Directory {
                    digest: B3Digest::try_from(&d.digest)
                        .map_err(|e| DirectoryError::InvalidDigest(lossy(&d.name), e))?,
                    size: d.size,
                };
                Ok((d.name, n))
            }
            Some(proto::node::Node::File(f)) => {
                let n = Node::File {
                    digest: B3Digest::try_from(&f.digest)
                        .map_err(|e| DirectoryError::InvalidDigest(lossy(&f.name), e))?,
                    size: f.size,
                    executable: f.executable,
                };
                Ok((f.name, n))
            }
            Some(proto::node::Node::Symlink(s)) => {
                let target = SymlinkTarget::try_from(s.target)
                    .map_err(|e| DirectoryError::InvalidSymlinkTarget(lossy(&s.name), e))?;
                Ok((s.name, Node::Symlink { target }))
            }
        }
    }

    /// The wire `Node` with the given name (empty for `CalculateNAR`).
    pub fn into_proto(self, name: Bytes) -> proto::Node {
        let inner = match self {
            Node::Directory { digest, size } => {
                proto::node::Node::Directory(proto::DirectoryNode {
                    name,
                    digest: digest.to_bytes(),
                    size,
                })
            }
            Node::File {
                digest,
                size,
                executable,
            } => proto::node::Node::File(proto::FileNode {
                name,
                digest: digest.to_bytes(),
                size,
                executable,
            }),
            Node::Symlink { target } => proto::node::Node::Symlink(proto::SymlinkNode {
                name,
                target: target.to_bytes(),
            }),
        };
        proto::Node { node: Some(inner) }
    }

    /// Converts a wire `Node` whose name must be a valid [PathComponent].
    pub fn try_from_proto_named(
        node: proto::Node,
    ) -> Result<(PathComponent, Node), DirectoryError> {
        let (name, node) = Self::try_from_proto(node)?;
        let name = PathComponent::try_from(name.clone())
            .map_err(|e| DirectoryError::InvalidName(lossy(&name), e))?;
        Ok((name, node))
    }

    /// The JSON shape printed by `arca castore import`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Node::Directory { digest, size } => {
                serde_json::json!({"type": "directory", "digest": digest.to_hex(), "size": size})
            }
            Node::File {
                digest,
                size,
                executable,
            } => serde_json::json!({
                "type": "file", "digest": digest.to_hex(), "size": size, "executable": executable
            }),
            Node::Symlink { target } => {
                serde_json::json!({"type": "symlink", "target": target.to_string()})
            }
        }
    }
}

pub(crate) fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
