//! The one error type of the domain and the services built on it. The gRPC layer maps each
//! variant to exactly one status code (`grpc::status`); a new variant forces a decision there.

/// A boxed cause, kept for logs and never shown to a caller.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input: names the field and the rule it broke.
    #[error("{field}: {rule}")]
    InvalidArgument {
        /// The request field, as the client spells it (`scopes[2]`, `ttl`).
        field: String,
        /// The rule, in words.
        rule: String,
    },
    /// The object does not exist, or the caller may not know that it does.
    #[error("{0} not found")]
    NotFound(String),
    /// The object would collide with an existing one.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is known but lacks a permission; the message names it.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is well-formed but the system's state forbids it (tenant suspended,
    /// policy violated).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No credential, or one that is not live.
    #[error("{0}")]
    Unauthenticated(String),
    /// tokend cannot know the truth right now (database unreachable); retrying may help.
    #[error("tokend cannot reach its database")]
    Unavailable(#[source] Cause),
    /// A bug or an unexpected state; the cause goes to the log only.
    #[error("internal error")]
    Internal(#[source] Cause),
}

impl Error {
    /// Bad input in `field`, breaking `rule`.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }

    /// An unexpected failure with a cause for the log.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        Error::Internal(cause.into())
    }
}

/// Results of the domain and services.
pub type Result<T, E = Error> = std::result::Result<T, E>;
