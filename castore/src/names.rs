//! Validated directory entry names and symlink targets.
use bytes::Bytes;
use std::fmt;

/// Longest allowed entry name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest allowed symlink target, in bytes.
pub const MAX_TARGET_LEN: usize = 4095;

/// Why a name or a symlink target is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// An empty name.
    #[error("name is empty")]
    Empty,
    /// `.` or `..`.
    #[error("name {0:?} is not allowed")]
    Dot(String),
    /// Longer than 255 bytes.
    #[error("name is {0} bytes long, at most {MAX_NAME_LEN} allowed")]
    TooLong(usize),
    /// Contains `/`.
    #[error("name {0:?} contains '/'")]
    Slash(String),
    /// Contains a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// An empty symlink target.
    #[error("symlink target is empty")]
    EmptyTarget,
    /// A symlink target longer than 4095 bytes.
    #[error("symlink target is {0} bytes long, at most {MAX_TARGET_LEN} allowed")]
    TargetTooLong(usize),
}

/// One path component: the name of a directory entry. Not empty, not `.` or
/// `..`, at most 255 bytes, no `/` and no NUL; any other bytes (non-UTF-8 too).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathComponent(Bytes);

impl PathComponent {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The raw bytes, as `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl TryFrom<Bytes> for PathComponent {
    type Error = NameError;
    fn try_from(b: Bytes) -> Result<Self, Self::Error> {
        if b.is_empty() {
            return Err(NameError::Empty);
        }
        if b.as_ref() == b"." || b.as_ref() == b".." {
            return Err(NameError::Dot(lossy(&b)));
        }
        if b.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong(b.len()));
        }
        if b.contains(&b'/') {
            return Err(NameError::Slash(lossy(&b)));
        }
        if b.contains(&0) {
            return Err(NameError::Nul(lossy(&b)));
        }
        Ok(Self(b))
    }
}

impl TryFrom<&[u8]> for PathComponent {
    type Error = NameError;
    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        Self::try_from(Bytes::copy_from_slice(b))
    }
}

impl TryFrom<&str> for PathComponent {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::try_from(s.as_bytes())
    }
}

impl fmt::Display for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

/// A symlink target: 1..=4095 bytes, no NUL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SymlinkTarget(Bytes);

impl SymlinkTarget {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// The raw bytes, as `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }
}

impl TryFrom<Bytes> for SymlinkTarget {
    type Error = NameError;
    fn try_from(b: Bytes) -> Result<Self, Self::Error> {
        if b.is_empty() {
            return Err(NameError::EmptyTarget);
        }
        if b.len() > MAX_TARGET_LEN {
            return Err(NameError::TargetTooLong(b.len()));
        }
        if b.contains(&0) {
            return Err(NameError::Nul(lossy(&b)));
        }
        Ok(Self(b))
    }
}

impl TryFrom<&[u8]> for SymlinkTarget {
    type Error = NameError;
    fn try_from(b: &[u8]) -> Result<Self, Self::Error> {
        Self::try_from(Bytes::copy_from_slice(b))
    }
}

impl TryFrom<&str> for SymlinkTarget {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::try_from(s.as_bytes())
    }
}

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert_eq!(PathComponent::try_from(""), Err(NameError::Empty));
        assert!(matches!(
            PathComponent::try_from("."),
            Err(NameError::Dot(_))
        ));
        assert!(matches!(
            PathComponent::try_from(".."),
            Err(NameError::Dot(_))
        ));
        assert!(matches!(
            PathComponent::try_from("a/b"),
            Err(NameError::Slash(_))
        ));
        assert!(matches!(
            PathComponent::try_from("a\0b"),
            Err(NameError::Nul(_))
        ));
        assert_eq!(
            PathComponent::try_from("x".repeat(256).as_str()),
            Err(NameError::TooLong(256))
        );
        assert!(PathComponent::try_from("x".repeat(255).as_str()).is_ok());
        assert!(PathComponent::try_from("...").is_ok());
        assert!(
            PathComponent::try_from(&[0xff, 0xfe][..]).is_ok(),
            "non-UTF-8 names are allowed"
        );
    }

    #[test]
    fn symlink_target_rules() {
        assert_eq!(SymlinkTarget::try_from(""), Err(NameError::EmptyTarget));
        assert!(matches!(
            SymlinkTarget::try_from("a\0"),
            Err(NameError::Nul(_))
        ));
        assert_eq!(
            SymlinkTarget::try_from("x".repeat(4096).as_str()),
            Err(NameError::TargetTooLong(4096))
        );
        assert!(SymlinkTarget::try_from("x".repeat(4095).as_str()).is_ok());
        assert!(SymlinkTarget::try_from("/nix/store/../a").is_ok());
    }
}
