//! `lifl.v1.JobService`: operators create, read, cancel and watch jobs.

use std::pin::Pin;
use std::sync::Arc;

use lifl_proto::v1 as pb;
use lifl_proto::v1::job_service_server::JobService;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::convert::{draft_from_pb, event_to_pb, job_to_pb, snapshot_to_pb, topology_to_pb};
use super::status::{from_auth, from_coordinator};
use super::{bearer_token, send_or_stop, STREAM_BUFFER};
use crate::coordinator::{Coordinator, Event};

/// The job service over a coordinator.
#[derive(Debug, Clone)]
pub struct JobsGrpc {
    coordinator: Arc<Coordinator>,
    /// Cancelled when the server begins to shut down; ends every watch.
    shutdown: CancellationToken,
}

impl JobsGrpc {
    /// Serves `coordinator`; watches end when `shutdown` is cancelled.
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

    /// Reading one job is open to its trainers too: they follow its rounds.
    async fn authorize_reader<T>(&self, request: &Request<T>, job_id: u32) -> Result<(), Status> {
        let token = bearer_token(request.metadata())?;
        self.coordinator
            .authorize_trainer(token, job_id)
            .await
            .map_err(from_auth)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobsGrpc {
    async fn create_job(
        &self,
        request: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        self.authorize(&request).await?;
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let (job, trainer_token) = self
            .coordinator
            .create_job(&draft_from_pb(spec))
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(pb::CreateJobResponse {
            job: Some(job_to_pb(&job)),
            trainer_token,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize_reader(&request, request.get_ref().job_id)
            .await?;
        let job_id = request.into_inner().job_id;
        let job = self
            .coordinator
            .job(job_id)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&request).await?;
        let jobs = self.coordinator.jobs().await;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(job_to_pb).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&request).await?;
        let job_id = request.into_inner().job_id;
        let job = self
            .coordinator
            .cancel_job(job_id)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(job_to_pb(&job)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize_reader(&request, request.get_ref().job_id)
            .await?;
        let job_id = request.into_inner().job_id;

        // Subscribe before the snapshot so that no event falls in between.
        let events = self.coordinator.subscribe();
        let job = self
            .coordinator
            .job(job_id)
            .await
            .map_err(from_coordinator)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let first = snapshot_to_pb(&job);
        let ended = job.state.is_terminal();
        let coordinator = Arc::clone(&self.coordinator);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if send_or_stop(&tx, first, &shutdown).await && !ended {
                feed_watch(job_id, events, &coordinator, &tx, &shutdown).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_topology(
        &self,
        request: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::Topology>, Status> {
        self.authorize(&request).await?;
        let job_id = request.into_inner().job_id;
        let topology = self
            .coordinator
            .topology(job_id)
            .await
            .map_err(from_coordinator)?;
        Ok(Response::new(topology_to_pb(&topology)))
    }
}

/// Forwards the job's events until it ends, the client leaves or the server
/// shuts down. A watcher that fell behind gets a fresh snapshot instead of
/// the events it missed.
async fn feed_watch(
    job_id: u32,
    mut events: broadcast::Receiver<Event>,
    coordinator: &Coordinator,
    tx: &mpsc::Sender<Result<pb::JobEvent, Status>>,
    shutdown: &CancellationToken,
) {
    loop {
        let received = tokio::select! {
            received = events.recv() => received,
            () = shutdown.cancelled() => return,
            () = tx.closed() => return,
        };
        let (message, ended) = match received {
            Ok(event) if event.job_id() == job_id => {
                let Some(message) = event_to_pb(&event) else {
                    continue;
                };
                let ended =
                    matches!(&event, Event::StateChanged { job, .. } if job.state.is_terminal());
                (message, ended)
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => match coordinator.job(job_id).await {
                Ok(job) => (snapshot_to_pb(&job), job.state.is_terminal()),
                Err(_) => return,
            },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if !send_or_stop(tx, message, shutdown).await || ended {
            return;
        }
    }
}
