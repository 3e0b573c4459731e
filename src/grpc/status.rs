//! The one map from [`Error`] to [`tonic::Status`]. Client mistakes keep their message (it
//! names the field and the rule); server-side failures are logged with their cause chain and
//! answered with an opaque message.

use tonic::{Code, Status};

use crate::domain::Error;

/// Converts a service error into the status the client sees.
pub fn to_status(err: Error) -> Status {
    match err {
        Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        Error::NotFound(_) => Status::not_found(err.to_string()),
        Error::AlreadyExists(_) => Status::already_exists(err.to_string()),
        Error::PermissionDenied(_) => Status::permission_denied(err.to_string()),
        Error::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
        Error::Unauthenticated(msg) => Status::unauthenticated(msg),
        Error::Unavailable(ref cause) => {
            tracing::warn!(error = %err, cause = %chain(cause.as_ref()), "answering UNAVAILABLE");
            Status::new(Code::Unavailable, "tokend cannot reach its database; retry")
        }
        Error::Internal(ref cause) => {
            tracing::error!(cause = %chain(cause.as_ref()), "internal error");
            Status::internal("internal error; see tokend's log")
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        to_status(err)
    }
}

/// `cause: its cause: …`, for one log field.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
