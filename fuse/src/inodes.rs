//! The inode table: inode number → castore node, with the kernel's lookup
//! counts, so entries are dropped when the kernel forgets them.
//!
//! Inode numbers are derived from what a node *is*, not from where it was
//! found: BLAKE3 over a kind tag and the directory digest, the blob digest
//! plus the executable bit, or the symlink target. So the same directory or
//! file content has one inode wherever it appears (as in Tvix), a file's exec
//! bit is still its own (`(digest, executable)` are two inodes), and `readdir`
//! can report the inode a later `lookup` will return without allocating
//! anything. Numbers are stable for the life of the mount (indeed across
//! mounts); the table only holds the nodes the kernel currently references.
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
    /// Lookups the kernel has not forgotten yet.
    nlookup: u64,
}

/// The inode number a node gets (absent a hash collision, see [InodeTable::lookup]).
pub fn ino_of(node: &Node) -> u64 {
    let mut h = blake3::Hasher::new();
    match node {
        Node::Directory { digest, .. } => {
            h.update(b"d");
            h.update(digest.as_bytes());
        }
        Node::File { digest, executable, .. } => {
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

    /// Records one kernel lookup of `node` and returns its inode number.
    /// On a (astronomically unlikely) collision of the 63-bit hash with a
    /// different live node, the next free number is used instead.
    pub fn lookup(&self, node: &Node, parent: Option<Parent>, parent_ino: u64) -> u64 {
        let mut ino = ino_of(node);
        let mut map = self.map.lock();
        loop {
            match map.get_mut(&ino) {
                Some(e) if &e.node == node => {
                    e.nlookup += 1;
                    if parent.is_some() {
                        e.parent = parent;
                    }
                    e.parent_ino = parent_ino;
                    return ino;
                }
                Some(_) => {
                    tracing::warn!(ino, "inode number collision; probing");
                    ino = ino.wrapping_add(1).max(ROOT_INO + 1) & (u64::MAX >> 1);
                }
                None => {
                    map.insert(ino, InodeEntry { node: node.clone(), parent, parent_ino, nlookup: 1 });
                    return ino;
                }
            }
        }
    }

    /// The entry of a live inode.
    pub fn get(&self, ino: u64) -> Option<InodeEntry> {
        self.map.lock().get(&ino).cloned()
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
        Node::File { digest: B3Digest::from([byte; 32]), size: 1, executable }
    }

    #[test]
    fn exec_bit_gives_a_distinct_inode() {
        assert_ne!(ino_of(&file(1, false)), ino_of(&file(1, true)));
        assert_eq!(ino_of(&file(1, true)), ino_of(&file(1, true)));
        let dir = Node::Directory { digest: B3Digest::from([1; 32]), size: 1 };
        assert_ne!(ino_of(&dir), ino_of(&file(1, false)));
    }

    #[test]
    fn entries_live_until_forgotten() {
        let t = InodeTable::new();
        let a = t.lookup(&file(7, false), None, ROOT_INO);
        assert_eq!(t.lookup(&file(7, false), None, ROOT_INO), a);
        assert_eq!(t.len(), 1);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert!(t.is_empty());
        // Looked up again: the same number.
        assert_eq!(t.lookup(&file(7, false), None, ROOT_INO), a);
    }

    #[test]
    fn collisions_probe() {
        let t = InodeTable::new();
        let a = file(1, false);
        let ino = t.lookup(&a, None, ROOT_INO);
        // Fake a collision: put another node at the number `b` would take.
        let b = file(2, false);
        let b_ino = ino_of(&b);
        t.map.lock().insert(b_ino, InodeEntry { node: a.clone(), parent: None, parent_ino: 1, nlookup: 1 });
        let got = t.lookup(&b, None, ROOT_INO);
        assert_ne!(got, b_ino);
        assert_ne!(got, ino);
        assert_eq!(t.get(got).unwrap().node, b);
    }
}
