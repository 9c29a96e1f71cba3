//! `lifl.v1.NodeService`: sidecars register, send heartbeats, receive their
//! work and the trainers admitted to it, and report finished rounds.
//!
//! A node's assignment stream keeps one order per round: its
//! `RoundAssignment` first and never twice, then `TrainersAdmitted` for the
//! trainers whose leaf is on the node. A trainer admitted after
//! `WatchAssignments` returned is sent once, as it joins; trainers admitted
//! before are listed in the catch-up that follows each round's assignment,
//! and listed again if the stream falls behind and catches up once more.

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

use super::convert::{
    admitted_to_pb, job_ended_to_pb, job_to_pb, node_from_pb, node_to_pb, work_to_pb,
};
use super::status::{from_auth, from_coordinator};
use super::{bearer_token, send_or_stop, STREAM_BUFFER};
use crate::coordinator::{Coordinator, CoordinatorError, Event, NodeWork, OpenWork, TrainerSeat};

/// Seats per `TrainersAdmitted` message in a catch-up. A seat is at most
/// about 140 bytes (a 128-byte trainer id and its leaf), so a full message
/// stays near 560 KiB, well inside gRPC's default 4 MiB message limit.
const MAX_SEATS_PER_MESSAGE: usize = 4096;

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

        // Subscribe before reading current work so no round or admission
        // falls between; read it before answering so that every admission
        // after the answer comes as an event, exactly once.
        let events = self.coordinator.subscribe();
        let open = self.coordinator.current_work(&node_id).await;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let feeder = AssignmentFeeder {
            node_id,
            coordinator: Arc::clone(&self.coordinator),
            tx,
            shutdown: self.shutdown.clone(),
            sent_rounds: HashSet::new(),
        };
        tokio::spawn(feeder.run(open, events));
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
    /// (job, round) pairs whose `RoundAssignment` was sent: a catch-up never
    /// repeats one, and admissions are forwarded only after it.
    sent_rounds: HashSet<(u32, u32)>,
}

impl AssignmentFeeder {
    /// Sends `open` (the work current when the stream opened), then new
    /// rounds, admissions and ended jobs, until the client leaves or the
    /// server shuts down.
    async fn run(mut self, open: Vec<OpenWork>, mut events: broadcast::Receiver<Event>) {
        if !self.catch_up(open).await {
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
                Ok(Event::TrainerAdmitted {
                    job_id,
                    round,
                    node_id,
                    seat,
                }) => self.forward_admission(job_id, round, &node_id, seat).await,
                Ok(Event::StateChanged { job, .. }) if job.state.is_terminal() => {
                    let had_work = self.sent_rounds.iter().any(|&(j, _)| j == job.id);
                    self.sent_rounds.retain(|&(j, _)| j != job.id);
                    !had_work || send_or_stop(&self.tx, job_ended_to_pb(&job), &self.shutdown).await
                }
                Ok(_) => true,
                // Missed events: whatever is open now is what matters.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.end_missed_jobs().await && {
                        let open = self.coordinator.current_work(&self.node_id).await;
                        self.catch_up(open).await
                    }
                }
                Err(broadcast::error::RecvError::Closed) => false,
            };
            if !keep_going {
                return;
            }
        }
    }

    /// After missed events: tells the node of every job it was given work
    /// in that has ended since (its `StateChanged` may be among the missed).
    async fn end_missed_jobs(&mut self) -> bool {
        let mut jobs: Vec<u32> = self.sent_rounds.iter().map(|&(j, _)| j).collect();
        jobs.sort_unstable();
        jobs.dedup();
        for job_id in jobs {
            let Ok(job) = self.coordinator.job(job_id).await else {
                continue;
            };
            if job.state.is_terminal() {
                self.sent_rounds.retain(|&(j, _)| j != job_id);
                if !send_or_stop(&self.tx, job_ended_to_pb(&job), &self.shutdown).await {
                    return false;
                }
            }
        }
        true
    }

    /// Sends each open round's work unless already sent, then every seat on
    /// this node admitted to it so far.
    async fn catch_up(&mut self, open: Vec<OpenWork>) -> bool {
        for OpenWork { work, seats } in open {
            if !self.send_work(&work).await {
                return false;
            }
            for chunk in seats.chunks(MAX_SEATS_PER_MESSAGE) {
                let message = admitted_to_pb(work.job_id, work.round, chunk);
                if !send_or_stop(&self.tx, message, &self.shutdown).await {
                    return false;
                }
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

    /// Forwards an admission to a leaf on this node. One to a round whose
    /// work was not sent is dropped: a round's start is published before its
    /// admissions, and current work is read after subscribing and after each
    /// lag, so such a round had ended by the time the feeder last looked.
    async fn forward_admission(
        &self,
        job_id: u32,
        round: u32,
        node_id: &str,
        seat: TrainerSeat,
    ) -> bool {
        if node_id != self.node_id || !self.sent_rounds.contains(&(job_id, round)) {
            return true;
        }
        let message = admitted_to_pb(job_id, round, std::slice::from_ref(&seat));
        send_or_stop(&self.tx, message, &self.shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::CoordinatorConfig;
    use crate::node::Node;
    use crate::spec::tests::good_draft;
    use crate::store::{MemoryStore, Store};

    /// The kind of each message queued on `rx`, with the seat count of each
    /// admission.
    fn drain(rx: &mut mpsc::Receiver<Result<pb::NodeAssignment, Status>>) -> Vec<(&str, usize)> {
        use pb::node_assignment::Kind;
        let mut kinds = Vec::new();
        while let Ok(message) = rx.try_recv() {
            let kind = match message.unwrap().kind.unwrap() {
                Kind::Round(_) => ("round", 0),
                Kind::JobEnded(_) => ("job_ended", 0),
                Kind::TrainersAdmitted(a) => ("admitted", a.trainers.len()),
            };
            kinds.push(kind);
        }
        kinds
    }

    /// A coordinator with one node, `n1`, online.
    async fn coordinator_with_node_n1() -> Arc<Coordinator> {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let coordinator = Coordinator::open(store, CoordinatorConfig::default())
            .await
            .unwrap();
        let node = Node {
            id: "n1".to_owned(),
            cores: 8,
            arena_bytes: 1 << 30,
            gateway_address: "n1:7500".to_owned(),
            peer_address: "n1:7501".to_owned(),
        };
        coordinator.register_node(node).await.unwrap();
        coordinator
    }

    /// A feeder of `n1`'s stream that has sent nothing yet, and the stream.
    fn feeder_of_n1(
        coordinator: &Arc<Coordinator>,
    ) -> (
        AssignmentFeeder,
        mpsc::Receiver<Result<pb::NodeAssignment, Status>>,
    ) {
        let (tx, rx) = mpsc::channel(8);
        let feeder = AssignmentFeeder {
            node_id: "n1".to_owned(),
            coordinator: Arc::clone(coordinator),
            tx,
            shutdown: CancellationToken::new(),
            sent_rounds: HashSet::new(),
        };
        (feeder, rx)
    }

    #[tokio::test]
    async fn a_catch_up_sends_seats_in_messages_of_at_most_4096_and_the_round_only_once() {
        let coordinator = coordinator_with_node_n1().await;
        let mut draft = good_draft();
        draft.trainers_per_round = 5000;
        draft.min_trainers = 1;
        draft.hierarchy.max_fan_in = 100;
        let (job, _) = coordinator.create_job(&draft).await.unwrap();
        let mut leaves = Vec::new();
        for t in 0..5000 {
            let joined = coordinator.join_round(job.id, &format!("t{t}")).await;
            leaves.push(joined.unwrap().leaf_endpoint_id);
        }

        let (mut feeder, mut rx) = feeder_of_n1(&coordinator);
        let open = coordinator.current_work("n1").await;
        let mut seats: Vec<(String, u32)> = open[0]
            .seats
            .iter()
            .map(|s| (s.trainer_id.clone(), s.leaf_endpoint_id))
            .collect();
        seats.sort();
        let mut expected: Vec<(String, u32)> =
            (0..5000).map(|t| (format!("t{t}"), leaves[t])).collect();
        expected.sort();
        assert_eq!(seats, expected);

        assert!(feeder.catch_up(open).await);
        assert_eq!(
            drain(&mut rx),
            [("round", 0), ("admitted", 4096), ("admitted", 904)]
        );
        // As after a lag: the seats again, not the round.
        assert!(feeder.catch_up(coordinator.current_work("n1").await).await);
        assert_eq!(drain(&mut rx), [("admitted", 4096), ("admitted", 904)]);
    }

    #[tokio::test]
    async fn after_missed_events_a_node_hears_of_its_jobs_that_ended() {
        let coordinator = coordinator_with_node_n1().await;
        let (ended, _) = coordinator.create_job(&good_draft()).await.unwrap();
        let (running, _) = coordinator.create_job(&good_draft()).await.unwrap();
        for job in [ended.id, running.id] {
            coordinator.join_round(job, "t0").await.unwrap();
        }

        let (mut feeder, mut rx) = feeder_of_n1(&coordinator);
        assert!(feeder.catch_up(coordinator.current_work("n1").await).await);
        assert_eq!(
            drain(&mut rx),
            [("round", 0), ("admitted", 1), ("round", 0), ("admitted", 1)]
        );

        // Cancelled while the feeder was not listening.
        coordinator.cancel_job(ended.id).await.unwrap();
        assert!(feeder.end_missed_jobs().await);
        assert_eq!(drain(&mut rx), [("job_ended", 0)]);
        // Said once.
        assert!(feeder.end_missed_jobs().await);
        assert_eq!(drain(&mut rx), []);
    }
}
