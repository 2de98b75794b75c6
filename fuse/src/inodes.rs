//! The inode table: inode number → castore node, with the kernel's lookup
//! counts, so entries are dropped when the kernel forgets them.
//!
//! Inode numbers are derived, not allocated (63 bits of BLAKE3), so
//! `readdir` can report the inode a later `lookup` will return without
//! allocating anything, and numbers are stable for the life of the mount
//! (indeed across mounts):
//!
//! - files: from the blob digest and the executable bit: the same content
//!   has one inode wherever it appears (hard links, in effect), and a file's
//!   exec bit is still its own (`(digest, executable)` are two inodes);
//! - symlinks: from the target;
//! - directories: from the parent directory's inode and the name, i.e. from
//!   the path. Not from the digest: the kernel allows one dentry per
//!   directory inode, so two identical directories sharing an inode would
//!   make it move the dentry between them, and `..` or `getcwd` seen from
//!   one would land in the other.
//!
//! The table only holds the nodes the kernel currently references.
use arca_castore::{B3Digest, Node};
use parking_lot::Mutex;
use std::collections::HashMap;

/// The root directory (`/nix/store` itself).
pub const ROOT_INO: u64 = 1;

/// Where a node was last looked up: its directory and its index among that
/// directory's entries (to fetch the following siblings ahead of reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    /// Digest of the directory holding the node.
    pub dir: B3Digest,
    /// Index of the node among the directory's (sorted) entries.
    pub index: usize,
}

/// What the table knows about one inode.
#[derive(Clone, Debug)]
pub struct InodeEntry {
    /// The node (for a store path, its root node).
    pub node: Node,
    /// Where it was last looked up (None: a store path's root).
    pub parent: Option<Parent>,
    /// The parent directory's inode, for `..` in readdir.
    pub parent_ino: u64,
    /// The name it was (last) looked up by.
    name: Vec<u8>,
    /// Lookups the kernel has not forgotten yet.
    nlookup: u64,
}

/// The inode number `node`, called `name` in the directory `parent_ino`,
/// gets (absent a hash collision, see [InodeTable::lookup]).
pub fn ino_of(parent_ino: u64, name: &[u8], node: &Node) -> u64 {
    let mut h = blake3::Hasher::new();
    match node {
        Node::Directory { .. } => {
            h.update(b"d");
            h.update(&parent_ino.to_le_bytes());
            h.update(name);
        }
        Node::File {
            digest, executable, ..
        } => {
            h.update(if *executable { b"x" } else { b"f" });
            h.update(digest.as_bytes());
        }
        Node::Symlink { target } => {
            h.update(b"l");
            h.update(target.as_bytes());
        }
    }
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    // 63 bits (positive as an off_t), never 0 (invalid) or 1 (the root).
    let v = u64::from_le_bytes(first) >> 1;
    if v <= ROOT_INO {
        v + 2
    } else {
        v
    }
}

/// Inode number → entry, for the inodes the kernel holds.
#[derive(Default)]
pub struct InodeTable {
    map: Mutex<HashMap<u64, InodeEntry>>,
}

impl InodeTable {
    /// An empty table (the root is implicit).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one kernel lookup of `node`, called `name` in the directory
    /// `parent_ino`, and returns its inode number. On a (astronomically
    /// unlikely) collision of the 63-bit hash with a different live node, the
    /// next free number is used instead.
    pub fn lookup(&self, node: &Node, parent: Option<Parent>, parent_ino: u64, name: &[u8]) -> u64 {
        let mut ino = ino_of(parent_ino, name, node);
        let is_dir = matches!(node, Node::Directory { .. });
        let mut map = self.map.lock();
        loop {
            match map.get_mut(&ino) {
                Some(e)
                    if &e.node == node
                        && (!is_dir || (e.parent_ino == parent_ino && e.name == name)) =>
                {
                    e.nlookup += 1;
                    if !is_dir {
                        // Files and symlinks: remember the latest place (for read-ahead of siblings).
                        if parent.is_some() {
                            e.parent = parent;
                        }
                        e.parent_ino = parent_ino;
                        e.name = name.to_vec();
                    }
                    return ino;
                }
                Some(_) => {
                    tracing::warn!(ino, "inode number collision; probing");
                    ino = (ino + 1) & (u64::MAX >> 1);
                    if ino <= ROOT_INO {
                        ino = ROOT_INO + 1;
                    }
                }
                None => {
                    map.insert(
                        ino,
                        InodeEntry {
                            node: node.clone(),
                            parent,
                            parent_ino,
                            name: name.to_vec(),
                            nlookup: 1,
                        },
                    );
                    return ino;
                }
            }
        }
    }

    /// The entry of a live inode.
    pub fn get(&self, ino: u64) -> Option<InodeEntry> {
        self.map.lock().get(&ino).cloned()
    }

    /// Whether the kernel holds `ino` (without copying its entry).
    pub fn contains(&self, ino: u64) -> bool {
        self.map.lock().contains_key(&ino)
    }

    /// The kernel dropped `n` lookups of `ino`; the entry goes at zero
    /// (then `true` is returned).
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        let mut map = self.map.lock();
        if let Some(e) = map.get_mut(&ino) {
            e.nlookup = e.nlookup.saturating_sub(n);
            if e.nlookup == 0 {
                map.remove(&ino);
                return true;
            }
        }
        false
    }

    /// Live inodes (without the root).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no inode but the root is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(byte: u8, executable: bool) -> Node {
        Node::File {
            digest: B3Digest::from([byte; 32]),
            size: 1,
            executable,
        }
    }

    fn dir(byte: u8) -> Node {
        Node::Directory {
            digest: B3Digest::from([byte; 32]),
            size: 1,
        }
    }

    #[test]
    fn files_by_content_and_exec_bit_directories_by_path() {
        assert_ne!(
            ino_of(5, b"a", &file(1, false)),
            ino_of(5, b"a", &file(1, true))
        );
        assert_eq!(
            ino_of(5, b"a", &file(1, true)),
            ino_of(9, b"b", &file(1, true))
        );
        // Identical directories in two places: two inodes.
        assert_ne!(ino_of(5, b"same", &dir(1)), ino_of(6, b"same", &dir(1)));
        assert_ne!(ino_of(5, b"a", &dir(1)), ino_of(5, b"b", &dir(1)));
        assert_eq!(ino_of(5, b"a", &dir(1)), ino_of(5, b"a", &dir(1)));
        assert_ne!(ino_of(5, b"a", &dir(1)), ino_of(5, b"a", &file(1, false)));
        for n in [file(3, true), dir(3)] {
            assert!(ino_of(1, b"x", &n) > ROOT_INO && ino_of(1, b"x", &n) < 1 << 63);
        }
    }

    #[test]
    fn entries_live_until_forgotten() {
        let t = InodeTable::new();
        let a = t.lookup(&file(7, false), None, ROOT_INO, b"a");
        assert_eq!(
            t.lookup(&file(7, false), None, 12, b"b"),
            a,
            "same content elsewhere"
        );
        assert_eq!(t.len(), 1);
        assert!(!t.forget(a, 1));
        assert!(t.get(a).is_some());
        assert!(t.forget(a, 1));
        assert!(t.get(a).is_none());
        assert!(t.is_empty());
        // Looked up again: the same number.
        assert_eq!(t.lookup(&file(7, false), None, ROOT_INO, b"a"), a);
    }

    #[test]
    fn collisions_probe() {
        let t = InodeTable::new();
        let a = file(1, false);
        let ino = t.lookup(&a, None, ROOT_INO, b"a");
        // Fake a collision: put another node at the number `b` would take.
        let b = file(2, false);
        let b_ino = ino_of(ROOT_INO, b"b", &b);
        t.map.lock().insert(
            b_ino,
            InodeEntry {
                node: a.clone(),
                parent: None,
                parent_ino: 1,
                name: b"a".to_vec(),
                nlookup: 1,
            },
        );
        let got = t.lookup(&b, None, ROOT_INO, b"b");
        assert_ne!(got, b_ino);
        assert_ne!(got, ino);
        assert_eq!(t.get(got).unwrap().node, b);
        // A directory with the same digest at another path is another inode.
        let d1 = t.lookup(&dir(4), None, 100, b"same");
        let d2 = t.lookup(&dir(4), None, 200, b"same");
        assert_ne!(d1, d2);
        assert_eq!(t.get(d2).unwrap().parent_ino, 200);
    }
}
