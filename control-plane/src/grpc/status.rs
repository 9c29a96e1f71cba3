//! Maps domain errors to gRPC statuses, in one place: bad input is
//! INVALID_ARGUMENT, unknown ids NOT_FOUND, a state that forbids the call
//! FAILED_PRECONDITION, exhausted capacity RESOURCE_EXHAUSTED. Internal detail
//! is logged here and not sent.

use tonic::Status;
use tracing::error;

use crate::auth::AuthError;
use crate::coordinator::{error_chain, CoordinatorError};
use crate::planner::PlanError;

/// The status a caller gets for a coordinator error.
pub(super) fn from_coordinator(e: CoordinatorError) -> Status {
    match &e {
        CoordinatorError::InvalidSpec(spec) => {
            Status::invalid_argument(spec.clone().under("spec").to_string())
        }
        CoordinatorError::InvalidField { .. } => Status::invalid_argument(e.to_string()),
        CoordinatorError::JobNotFound(_)
        | CoordinatorError::NodeNotFound(_)
        | CoordinatorError::NoRound(_) => Status::not_found(e.to_string()),
        CoordinatorError::JobEnded { .. }
        | CoordinatorError::WrongRound { .. }
        | CoordinatorError::NoOnlineLeaf { .. } => Status::failed_precondition(e.to_string()),
        CoordinatorError::Plan { source, .. } => match source {
            PlanError::NoNode => Status::failed_precondition(error_chain(&e)),
            PlanError::EndpointIdsExhausted { .. } => Status::resource_exhausted(error_chain(&e)),
        },
        CoordinatorError::RoundFull { .. } | CoordinatorError::JobIdsExhausted => {
            Status::resource_exhausted(e.to_string())
        }
        CoordinatorError::Token(_) | CoordinatorError::Store(_) => {
            error!(error = %error_chain(&e), "request failed");
            Status::internal("internal error; see the control plane's log")
        }
    }
}

/// The status a caller gets for a refused token.
pub(super) fn from_auth(e: AuthError) -> Status {
    match e {
        AuthError::Missing | AuthError::Invalid => Status::unauthenticated(e.to_string()),
        AuthError::OutOfScope { .. } => Status::permission_denied(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn exhausted_endpoint_ids_are_resource_exhausted_with_the_reason() {
        let status = from_coordinator(CoordinatorError::Plan {
            job_id: 3,
            round: 2,
            source: PlanError::EndpointIdsExhausted {
                first: 4_294_967_290,
                needed: 11,
            },
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "job 3: cannot plan round 2: endpoint ids are exhausted: the round needs 11 \
             from id 4294967290, but the last endpoint id is 4294967295"
        );
    }
}
