//! Order and integrity checks for closures sent to and received from a
//! directory service.
use crate::{B3Digest, Directory, Error};
use std::collections::{HashMap, HashSet};

/// A closure that passed [ClosureValidator]: leaves first, root last,
/// connected, sizes consistent.
#[derive(Debug, Clone)]
pub struct ValidatedClosure {
    dirs: Vec<(B3Digest, Directory)>,
}

impl ValidatedClosure {
    /// A single directory whose children the caller checked are stored.
    pub(crate) fn with_stored_children(dir: Directory) -> Self {
        Self {
            dirs: vec![(dir.digest(), dir)],
        }
    }

    /// The root digest.
    pub fn root(&self) -> B3Digest {
        self.dirs
            .last()
            .expect("a validated closure is never empty")
            .0
    }

    /// Directories with their digests, leaves first.
    pub fn directories(&self) -> &[(B3Digest, Directory)] {
        &self.dirs
    }

    /// Takes the directories, leaves first.
    pub fn into_directories(self) -> Vec<(B3Digest, Directory)> {
        self.dirs
    }

    /// Depth of each directory above the leaves within this closure (0 for a
    /// directory with no child directory in it), in the closure's order.
    pub fn levels(&self) -> Vec<usize> {
        let mut level_of: HashMap<B3Digest, usize> = HashMap::new();
        self.dirs
            .iter()
            .map(|(d, dir)| {
                let l = dir
                    .child_directories()
                    .filter_map(|(_, c, _)| level_of.get(&c).map(|l| l + 1))
                    .max()
                    .unwrap_or(0);
                level_of.insert(*d, l);
                l
            })
            .collect()
    }
}

/// Checks a `Put` stream: each directory may only refer to directories sent
/// before it with the right size; the stream must form one connected closure
/// whose root comes last. Duplicates are dropped.
#[derive(Default)]
pub struct ClosureValidator {
    dirs: Vec<(B3Digest, Directory)>,
    sizes: HashMap<B3Digest, u64>,
    referenced: HashSet<B3Digest>,
}

impl ClosureValidator {
    /// An empty validator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next directory of the stream.
    pub fn add(&mut self, dir: Directory) -> Result<(), Error> {
        let digest = dir.digest();
        if self.sizes.contains_key(&digest) {
            return Ok(());
        }
        for (name, child, size) in dir.child_directories() {
            match self.sizes.get(&child) {
                None => {
                    return Err(Error::InvalidRequest(format!(
                        "directory {digest}: entry {name:?} refers to directory {child}, which was not sent before it"
                    )))
                }
                Some(actual) if *actual != size => {
                    return Err(Error::InvalidRequest(format!(
                        "directory {digest}: entry {name:?} claims size {size}, directory {child} has size {actual}"
                    )))
                }
                Some(_) => {
                    self.referenced.insert(child);
                }
            }
        }
        self.sizes.insert(digest, dir.size());
        self.dirs.push((digest, dir));
        Ok(())
    }

    /// Number of (distinct) directories added.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Checks the closure is complete and connected.
    pub fn finalize(self) -> Result<ValidatedClosure, Error> {
        let Some((root, _)) = self.dirs.last() else {
            return Err(Error::InvalidRequest("no directories sent".into()));
        };
        // Every directory but the root must be referred to by a later one;
        // since references only point backwards, this makes the closure connected.
        for (d, _) in &self.dirs[..self.dirs.len() - 1] {
            if !self.referenced.contains(d) {
                return Err(Error::InvalidRequest(format!(
                    "directory {d} is not part of the closure of the root {root} (the root must come last)"
                )));
            }
        }
        Ok(ValidatedClosure { dirs: self.dirs })
    }
}

/// Checks a recursive `Get` answer: every directory must have been asked for
/// or referred to by one received before, at most once, with the size its
/// parent claims; and the closure must be complete at the end.
pub struct RecursiveReceiveValidator {
    expected: HashMap<B3Digest, Option<u64>>,
    /// Received directories and their sizes.
    received: HashMap<B3Digest, u64>,
}

impl RecursiveReceiveValidator {
    /// Expects the closure of `root`.
    pub fn new(root: B3Digest) -> Self {
        Self {
            expected: HashMap::from([(root, None)]),
            received: HashMap::new(),
        }
    }

    /// Checks one received directory.
    pub fn check(&mut self, dir: &Directory) -> Result<(), Error> {
        let digest = dir.digest();
        if self.received.contains_key(&digest) {
            return Err(Error::Storage(format!("directory {digest} was sent twice")));
        }
        match self.expected.remove(&digest) {
            None => {
                return Err(Error::Storage(format!(
                    "directory {digest} was neither asked for nor referred to"
                )))
            }
            Some(Some(size)) if size != dir.size() => {
                return Err(Error::Storage(format!(
                    "directory {digest} has size {}, its parent claims {size}",
                    dir.size()
                )))
            }
            Some(_) => {}
        }
        self.received.insert(digest, dir.size());
        for (_, child, size) in dir.child_directories() {
            if let Some(actual) = self.received.get(&child) {
                if *actual != size {
                    return Err(Error::Storage(format!(
                        "directory {digest} claims size {size} for {child}, which has size {actual}"
                    )));
                }
                continue;
            }
            match self.expected.get(&child) {
                Some(Some(s)) if *s != size => {
                    return Err(Error::Storage(format!(
                        "directory {child} is claimed with sizes {s} and {size}"
                    )))
                }
                _ => {
                    self.expected.insert(child, Some(size));
                }
            }
        }
        Ok(())
    }

    /// Whether nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.received.is_empty()
    }

    /// Fails if directories referred to were never received.
    pub fn finish(&self) -> Result<(), Error> {
        match self.expected.keys().next() {
            None => Ok(()),
            Some(d) => Err(Error::Storage(format!(
                "closure incomplete: directory {d} was never sent"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Node;

    fn leaf() -> Directory {
        let mut d = Directory::new();
        d.add(
            "f".try_into().unwrap(),
            Node::File {
                digest: B3Digest::of(b""),
                size: 0,
                executable: false,
            },
        )
        .unwrap();
        d
    }
    fn parent_of(child: &Directory, size: u64) -> Directory {
        let mut d = Directory::new();
        d.add(
            "c".try_into().unwrap(),
            Node::Directory {
                digest: child.digest(),
                size,
            },
        )
        .unwrap();
        d
    }

    #[test]
    fn accepts_leaves_first() {
        let l = leaf();
        let p = parent_of(&l, l.size());
        let mut v = ClosureValidator::new();
        v.add(l).unwrap();
        v.add(p.clone()).unwrap();
        assert_eq!(v.finalize().unwrap().root(), p.digest());
    }

    #[test]
    fn refuses_root_first() {
        let l = leaf();
        let p = parent_of(&l, l.size());
        let mut v = ClosureValidator::new();
        assert!(matches!(v.add(p), Err(Error::InvalidRequest(_))));
    }

    #[test]
    fn refuses_wrong_size() {
        let l = leaf();
        let p = parent_of(&l, l.size() + 1);
        let mut v = ClosureValidator::new();
        v.add(l).unwrap();
        assert!(matches!(v.add(p), Err(Error::InvalidRequest(m)) if m.contains("size")));
    }

    #[test]
    fn refuses_disconnected() {
        let mut v = ClosureValidator::new();
        v.add(leaf()).unwrap();
        v.add(Directory::new()).unwrap();
        assert!(matches!(v.finalize(), Err(Error::InvalidRequest(_))));
    }

    #[test]
    fn refuses_empty_stream() {
        assert!(matches!(
            ClosureValidator::new().finalize(),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn receive_validator_rules() {
        let l = leaf();
        let p = parent_of(&l, l.size());
        let mut v = RecursiveReceiveValidator::new(p.digest());
        assert!(v.check(&l).is_err(), "child before parent");
        let mut v = RecursiveReceiveValidator::new(p.digest());
        v.check(&p).unwrap();
        assert!(v.finish().is_err(), "incomplete");
        v.check(&l).unwrap();
        assert!(v.check(&l).is_err(), "twice");
        v.finish().unwrap();
        let mut v = RecursiveReceiveValidator::new(p.digest());
        assert!(v.check(&Directory::new()).is_err(), "not asked for");
    }

    #[test]
    fn levels_count_from_leaves() {
        let l = leaf();
        let p = parent_of(&l, l.size());
        let g = parent_of(&p, p.size());
        let mut v = ClosureValidator::new();
        for d in [l, p, g] {
            v.add(d).unwrap();
        }
        assert_eq!(v.finalize().unwrap().levels(), vec![0, 1, 2]);
    }
}
