//! `lifl.v1.NodeService`: sidecars register, send heartbeats, receive their
//! work and report finished rounds.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use lifl_proto::v1 as pb;
use lifl_proto::v1::node_service_server::NodeService;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert::{job_ended_to_pb, job_to_pb, node_from_pb, node_to_pb, work_to_pb};
use super::status::{from_auth, from_coordinator};
use super::{bearer_token, send_or_stop, STREAM_BUFFER};
use crate::coordinator::{Coordinator, CoordinatorError, Event, NodeWork};

/// The node service over a coordinator.
#[derive(Debug, Clone)]
pub struct NodesGrpc {
    coordinator: Arc<Coordinator>,
    /// Cancelled when the server begins to shut down; ends every stream.
    shutdown: CancellationToken,
}

impl NodesGrpc {
    /// Serves `coordinator`; assignment streams end when `shutdown` is
    /// cancelled.
    pub fn new(coordinator: Arc<Coordinator>, shutdown: CancellationToken) -> Self {
        Self {
            coordinator,
            shutdown,
        }
    }

    async fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let token = bearer_token(request.metadata())?;
        self.coordinator
            .authorize_admin(token)
            .await
            .map_err(from_auth)
    }

    fn heartbeat_interval_ms(&self) -> u64 {
        let interval = self.coordinator.config().heartbeat_interval;
        u64::try_from(interval.as_millis()).unwrap_or(u64::MAX)
    }
}

type AssignmentStream = Pin<Box<dyn Stream<Item = Result<pb::NodeAssignment, Status>> + Send>>;

#[tonic::async_trait]
impl NodeService for NodesGrpc {
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        self.authorize(&request).await?;
        let node = node_from_pb(request.into_inner());
        let status = self
            .coordinator
            .register_node(node)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(pb::RegisterNodeResponse {
            node: Some(node_to_pb(&status)),
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.authorize(&request).await?;
        let node_id = request.into_inner().node_id;
        self.coordinator
            .heartbeat(&node_id)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval_ms: self.heartbeat_interval_ms(),
        }))
    }

    type WatchAssignmentsStream = AssignmentStream;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<AssignmentStream>, Status> {
        self.authorize(&request).await?;
        let node_id = request.into_inner().node_id;
        if !self.coordinator.has_node(&node_id).await {
            return Err(from_coordinator(CoordinatorError::NodeNotFound(node_id)));
        }

        // Subscribe before reading current work so no round falls between.
        let events = self.coordinator.subscribe();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let feeder = AssignmentFeeder {
            node_id,
            coordinator: Arc::clone(&self.coordinator),
            tx,
            shutdown: self.shutdown.clone(),
            sent_rounds: HashSet::new(),
        };
        tokio::spawn(feeder.run(events));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.authorize(&request).await?;
        let nodes = self.coordinator.nodes().await;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(node_to_pb).collect(),
        }))
    }

    async fn complete_round(
        &self,
        request: Request<pb::CompleteRoundRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&request).await?;
        let r = request.into_inner();
        let job = self
            .coordinator
            .complete_round(r.job_id, r.round, r.updates_aggregated, &r.model_checksum)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(job_to_pb(&job)))
    }
}

/// Feeds one node's assignment stream.
#[derive(Debug)]
struct AssignmentFeeder {
    node_id: String,
    coordinator: Arc<Coordinator>,
    /// The stream's sending half; closed when the client leaves.
    tx: mpsc::Sender<Result<pb::NodeAssignment, Status>>,
    shutdown: CancellationToken,
    /// (job, round) pairs already sent, so a catch-up never repeats one.
    sent_rounds: HashSet<(u32, u32)>,
}

impl AssignmentFeeder {
    /// Sends current work, then new rounds and ended jobs, until the client
    /// leaves or the server shuts down.
    async fn run(mut self, mut events: broadcast::Receiver<Event>) {
        if !self.catch_up().await {
            return;
        }
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                () = self.shutdown.cancelled() => return,
                () = self.tx.closed() => return,
            };
            let keep_going = match received {
                Ok(Event::RoundStarted { job, topology }) => {
                    let work = self
                        .coordinator
                        .work_in(&self.node_id, &job, &topology)
                        .await;
                    match work {
                        Some(work) => self.send_work(&work).await,
                        None => true,
                    }
                }
                Ok(Event::StateChanged { job, .. }) if job.state.is_terminal() => {
                    let had_work = self.sent_rounds.iter().any(|&(j, _)| j == job.id);
                    self.sent_rounds.retain(|&(j, _)| j != job.id);
                    !had_work || send_or_stop(&self.tx, job_ended_to_pb(&job), &self.shutdown).await
                }
                Ok(_) => true,
                // Missed events: whatever is open now is what matters.
                Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => false,
            };
            if !keep_going {
                return;
            }
        }
    }

    async fn catch_up(&mut self) -> bool {
        for work in self.coordinator.current_work(&self.node_id).await {
            if !self.send_work(&work).await {
                return false;
            }
        }
        true
    }

    async fn send_work(&mut self, work: &NodeWork) -> bool {
        if !self.sent_rounds.insert((work.job_id, work.round)) {
            return true;
        }
        send_or_stop(&self.tx, work_to_pb(work), &self.shutdown).await
    }
}
