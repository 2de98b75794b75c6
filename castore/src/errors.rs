//! The error type of every castore service, and its mapping to gRPC status codes.
use crate::directory::DirectoryError;
use tonic::{Code, Status};

/// What went wrong in a service call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request or the data sent is invalid (bad digest, invalid
    /// directory, wrong order, dangling reference, wrong size, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The backend failed in a way retrying may fix (network, timeouts).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend failed otherwise, or returned data that fails verification.
    #[error("storage error: {0}")]
    Storage(String),
    /// A blob written with an expected digest ([crate::BlobWriter::expect_digest])
    /// turned out to have another: the data changed since it was hashed, or
    /// the store computed a wrong digest.
    #[error("the data written has digest {actual}, not the expected {expected}")]
    DigestMismatch {
        /// The digest announced before writing.
        expected: crate::B3Digest,
        /// The digest the store computed.
        actual: crate::B3Digest,
    },
}

impl Error {
    /// A storage error from anything displayable.
    pub fn storage(e: impl std::fmt::Display) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<DirectoryError> for Error {
    fn from(e: DirectoryError) -> Self {
        Error::InvalidRequest(format!("invalid directory: {e}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        // Errors we raised ourselves travel through io::Error (e.g. AsyncRead); unwrap them.
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(err) = inner.downcast::<Error>() {
                    return *err;
                }
            }
            return Error::Storage("unknown I/O error".into());
        }
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(e.to_string()),
            std::io::ErrorKind::InvalidInput => Error::InvalidRequest(e.to_string()),
            std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::TimedOut => Error::Unavailable(e.to_string()),
            _ => Error::Storage(e.to_string()),
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::InvalidRequest(_) => std::io::ErrorKind::InvalidInput,
            Error::NotFound(_) => std::io::ErrorKind::NotFound,
            Error::Unavailable(_) => std::io::ErrorKind::ConnectionAborted,
            Error::Storage(_) => std::io::ErrorKind::Other,
            Error::DigestMismatch { .. } => std::io::ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, e)
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidRequest(m) => Status::invalid_argument(m),
            Error::NotFound(m) => Status::not_found(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Storage(m) => Status::internal(m),
            e @ Error::DigestMismatch { .. } => Status::data_loss(e.to_string()),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        let m = s.message().to_string();
        match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                Error::InvalidRequest(m)
            }
            Code::NotFound => Error::NotFound(m),
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted => Error::Unavailable(format!("{}: {m}", s.code())),
            _ => Error::Storage(format!("{}: {m}", s.code())),
        }
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound(e.to_string()),
            object_store::Error::Generic { store, ref source } if is_transient(source.as_ref()) => {
                Error::Unavailable(format!("{store}: {e}"))
            }
            other => Error::Storage(other.to_string()),
        }
    }
}

fn is_transient(e: &(dyn std::error::Error + 'static)) -> bool {
    let s = e.to_string().to_lowercase();
    s.contains("timed out") || s.contains("connection") || s.contains("retry")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_precise_grpc_codes() {
        assert_eq!(
            Status::from(Error::InvalidRequest("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(Error::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(Error::Unavailable("x".into())).code(),
            Code::Unavailable
        );
        assert_eq!(
            Status::from(Error::Storage("x".into())).code(),
            Code::Internal
        );
    }

    #[test]
    fn roundtrips_through_io_error() {
        let io: std::io::Error = Error::InvalidRequest("bad".into()).into();
        assert!(matches!(Error::from(io), Error::InvalidRequest(m) if m == "bad"));
    }

    #[test]
    fn status_back_to_error() {
        assert!(matches!(
            Error::from(Status::not_found("x")),
            Error::NotFound(_)
        ));
        assert!(matches!(
            Error::from(Status::invalid_argument("x")),
            Error::InvalidRequest(_)
        ));
        assert!(matches!(
            Error::from(Status::unavailable("x")),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            Error::from(Status::internal("x")),
            Error::Storage(_)
        ));
    }
}
