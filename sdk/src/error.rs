//! What can go wrong between an endpoint and its sidecar, and whose fault it
//! is.

use lifl_proto::control::{ErrorCode, RefuseReason};

/// Who has to act for a failed call to succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The calling code asked for something invalid; retrying cannot help.
    Caller,
    /// The node is out of room (arena, reference slots, or this endpoint's
    /// credit); retry once references are released.
    Capacity,
    /// The sidecar is unreachable or gone; retry once it is back.
    Environment,
    /// The sidecar or the kernel broke the protocol: a lifl defect.
    Platform,
}

/// An error from the SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdkError {
    /// The sidecar's socket could not be reached.
    #[error("cannot reach the sidecar at {path}")]
    Connect {
        /// The socket path tried.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The sidecar answered a request with an error.
    #[error("the sidecar refused: {message} ({code:?})")]
    Rejected {
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// A descriptor this endpoint sent was not delivered; its buffer has been
    /// released.
    #[error("descriptor {seq} to endpoint {dst} was refused: {}", reason.as_str())]
    Refused {
        /// The descriptor's sequence number, as `send` returned it.
        seq: u32,
        /// Where it was addressed.
        dst: u32,
        /// Why.
        reason: RefuseReason,
    },
    /// A buffer's length is not a whole number of `f32` values.
    #[error("a buffer of {len} bytes is not a whole number of f32 values")]
    NotF32 {
        /// The buffer's length in bytes.
        len: u64,
    },
    /// The sidecar sent something this SDK cannot make sense of.
    #[error("protocol error from the sidecar: {0}")]
    Protocol(String),
    /// The sidecar closed the connection (it stopped or restarted).
    #[error("the sidecar closed the connection")]
    Closed,
    /// Reading or writing a socket failed.
    #[error("socket I/O with the sidecar")]
    Io(#[from] std::io::Error),
}

impl SdkError {
    /// Whose action the error calls for.
    pub fn fault(&self) -> Fault {
        match self {
            Self::Connect { .. } | Self::Closed | Self::Io(_) => Fault::Environment,
            Self::Rejected { code, .. } if code.is_retryable() => match code {
                ErrorCode::Internal => Fault::Platform,
                _ => Fault::Capacity,
            },
            Self::Rejected { .. } | Self::Refused { .. } | Self::NotF32 { .. } => Fault::Caller,
            Self::Protocol(_) => Fault::Platform,
        }
    }

    /// Whether the same call may succeed later, unchanged.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected { code, .. } => code.is_retryable(),
            other => matches!(other.fault(), Fault::Capacity | Fault::Environment),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_are_retryable_and_caller_errors_are_not() {
        let full = SdkError::Rejected {
            code: ErrorCode::ArenaFull,
            message: String::new(),
        };
        assert_eq!(full.fault(), Fault::Capacity);
        assert!(full.is_retryable());

        let refused = SdkError::Refused {
            seq: 1,
            dst: 2,
            reason: RefuseReason::CrossJob,
        };
        assert_eq!(refused.fault(), Fault::Caller);
        assert!(!refused.is_retryable());
        assert_eq!(
            refused.to_string(),
            "descriptor 1 to endpoint 2 was refused: cross_job"
        );

        assert!(SdkError::Closed.is_retryable());
        assert_eq!(SdkError::Protocol("x".into()).fault(), Fault::Platform);
    }
}
