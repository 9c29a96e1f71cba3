//! `lifl.v1.RoundService`: trainers join rounds and learn where to upload.

use std::sync::Arc;

use lifl_proto::v1 as pb;
use lifl_proto::v1::round_service_server::RoundService;
use tonic::{Request, Response, Status};

use super::bearer_token;
use super::convert::assignment_to_pb;
use super::status::{from_auth, from_coordinator};
use crate::coordinator::Coordinator;

/// The round service over a coordinator.
#[derive(Debug, Clone)]
pub struct RoundsGrpc {
    coordinator: Arc<Coordinator>,
}

impl RoundsGrpc {
    /// Serves `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

#[tonic::async_trait]
impl RoundService for RoundsGrpc {
    async fn join_round(
        &self,
        request: Request<pb::JoinRoundRequest>,
    ) -> Result<Response<pb::TrainerAssignment>, Status> {
        let token = bearer_token(request.metadata())?.map(str::to_owned);
        let request = request.into_inner();
        self.coordinator
            .authorize_trainer(token.as_deref(), request.job_id)
            .await
            .map_err(from_auth)?;

        let assignment = self
            .coordinator
            .join_round(request.job_id, &request.trainer_id)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(assignment_to_pb(assignment)))
    }
}
