//! End-to-end tests of the control plane's gRPC API against a real server on
//! `127.0.0.1:0`, through the generated clients.

// Test helpers panic on purpose: a failure is the test failing.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lifl_control_plane::server::{self, RunningServer, ServerConfig, StoreLocation};
use lifl_proto::v1 as pb;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use lifl_proto::v1::round_service_client::RoundServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

/// How long any single wait in these tests may take before it fails.
const DEADLINE: Duration = Duration::from_secs(10);

async fn start(store: StoreLocation, admin_token: Option<&str>) -> RunningServer {
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), store);
    config.admin_token = admin_token.map(str::to_owned);
    config.heartbeat_interval = Duration::from_millis(100);
    server::start(config).await.unwrap()
}

async fn channel(server: &RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn spec(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        model: Some(pb::ModelLayout {
            tensors: vec![pb::Tensor {
                name: "w".to_owned(),
                shape: vec![4, 4],
                dtype: "f32".to_owned(),
            }],
        }),
        rounds: 2,
        trainers_per_round: 8,
        min_trainers: 4,
        round_deadline_ms: 60_000,
        aggregation: Some(pb::Aggregation {
            rule: "fedavg".to_owned(),
            mode: "eager".to_owned(),
        }),
        hierarchy: Some(pb::Hierarchy {
            levels: 2,
            max_fan_in: 4,
        }),
    }
}

fn with_token<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {token}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

async fn create(jobs: &mut JobServiceClient<Channel>, name: &str) -> pb::CreateJobResponse {
    let request = pb::CreateJobRequest {
        spec: Some(spec(name)),
    };
    jobs.create_job(request).await.unwrap().into_inner()
}

async fn register_node(channel: &Channel, id: &str) {
    register_node_with_cores(channel, id, 4).await;
}

async fn register_node_with_cores(channel: &Channel, id: &str, cores: u32) {
    let mut nodes = NodeServiceClient::new(channel.clone());
    nodes
        .register_node(pb::RegisterNodeRequest {
            node_id: id.to_owned(),
            capacity: Some(pb::NodeCapacity {
                cores,
                arena_bytes: 1 << 30,
            }),
            gateway_address: format!("{id}.example:7500"),
            peer_address: format!("{id}.example:7501"),
        })
        .await
        .unwrap();
}

async fn watch_assignments(channel: &Channel, node_id: &str) -> Streaming<pb::NodeAssignment> {
    let mut nodes = NodeServiceClient::new(channel.clone());
    let request = pb::WatchAssignmentsRequest {
        node_id: node_id.to_owned(),
    };
    nodes.watch_assignments(request).await.unwrap().into_inner()
}

async fn join(
    rounds: &mut RoundServiceClient<Channel>,
    job_id: u32,
    trainer_id: &str,
) -> pb::TrainerAssignment {
    let request = pb::JoinRoundRequest {
        job_id,
        trainer_id: trainer_id.to_owned(),
    };
    rounds.join_round(request).await.unwrap().into_inner()
}

/// What a node's stream says about one job's round: its assignment, the
/// seats of each `TrainersAdmitted` in order, and whether `JobEnded` closed it.
#[derive(Debug, Default)]
struct NodeView {
    rounds: Vec<pb::RoundAssignment>,
    admitted: Vec<Vec<(String, u32)>>,
    ended: bool,
}

impl NodeView {
    /// Reads `stream` up to and including the first `JobEnded`, checking
    /// that each admission comes after a round assignment of its round.
    async fn read_until_job_ended(stream: &mut Streaming<pb::NodeAssignment>) -> Self {
        use pb::node_assignment::Kind;
        let mut view = Self::default();
        while !view.ended {
            let message = tokio::time::timeout(DEADLINE, stream.message())
                .await
                .expect("a message within the deadline")
                .unwrap()
                .expect("the stream is still open");
            match message.kind.unwrap() {
                Kind::Round(round) => view.rounds.push(round),
                Kind::TrainersAdmitted(admitted) => {
                    let sent_first = view
                        .rounds
                        .iter()
                        .any(|r| (r.job_id, r.round) == (admitted.job_id, admitted.round));
                    assert!(sent_first, "{admitted:?} came before its round");
                    view.admitted.push(seats(&admitted.trainers));
                }
                Kind::JobEnded(_) => view.ended = true,
            }
        }
        view
    }

    /// Every seat, in the order sent.
    fn all_seats(&self) -> Vec<(String, u32)> {
        self.admitted.concat()
    }

    /// Endpoint ids of the leaves the node was told to run.
    fn leaves(&self) -> Vec<u32> {
        let aggregators = self.rounds.iter().flat_map(|r| &r.aggregators);
        aggregators
            .filter(|a| a.level == 1)
            .map(|a| a.endpoint_id)
            .collect()
    }
}

fn seats(trainers: &[pb::TrainerSeat]) -> Vec<(String, u32)> {
    trainers
        .iter()
        .map(|s| (s.trainer_id.clone(), s.leaf_endpoint_id))
        .collect()
}

async fn next_event(stream: &mut tonic::Streaming<pb::JobEvent>) -> pb::JobEvent {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("an event within the deadline")
        .unwrap()
        .expect("the stream is still open")
}

fn kind(event: &pb::JobEvent) -> &'static str {
    use pb::job_event::Kind;
    match &event.kind {
        Some(Kind::Snapshot(_)) => "snapshot",
        Some(Kind::StateChanged(_)) => "state_changed",
        Some(Kind::RoundStarted(_)) => "round_started",
        Some(Kind::RoundProgress(_)) => "round_progress",
        Some(Kind::RoundFinished(_)) => "round_finished",
        None => "none",
    }
}

#[tokio::test]
async fn create_get_list_watch_and_cancel_a_job() {
    let server = start(StoreLocation::Memory, None).await;
    let mut jobs = JobServiceClient::new(channel(&server).await);

    let created = create(&mut jobs, "first").await;
    let job = created.job.unwrap();
    assert_eq!(job.id, 1);
    assert_eq!(job.state(), pb::JobState::Pending);
    assert!(created.trainer_token.starts_with("lifl_"));
    assert_eq!(job.spec.as_ref().unwrap(), &spec("first"));
    create(&mut jobs, "second").await;

    let got = jobs
        .get_job(pb::GetJobRequest { job_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, job);
    let listed = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed
        .jobs
        .iter()
        .map(|j| j.spec.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names, ["first", "second"]);

    let mut watch = jobs
        .watch_job(pb::WatchJobRequest { job_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&next_event(&mut watch).await), "snapshot");

    let cancelled = jobs
        .cancel_job(pb::CancelJobRequest { job_id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state(), pb::JobState::Cancelled);
    let event = next_event(&mut watch).await;
    let pb::job_event::Kind::StateChanged(change) = event.kind.clone().unwrap() else {
        panic!("expected a state change, got {event:?}");
    };
    assert_eq!(
        (change.from(), change.to()),
        (pb::JobState::Pending, pb::JobState::Cancelled)
    );
    // The job ended, so the watch ends.
    let end = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, None);

    let again = jobs
        .cancel_job(pb::CancelJobRequest { job_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let missing = jobs
        .get_job(pb::GetJobRequest { job_id: 99 })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (Code::NotFound, "job 99 not found")
    );

    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn each_invalid_spec_is_refused_naming_its_field() {
    let server = start(StoreLocation::Memory, None).await;
    let mut jobs = JobServiceClient::new(channel(&server).await);

    type Breaker = fn(&mut pb::JobSpec);
    let cases: [(&str, Breaker); 14] = [
        ("spec.model.tensors", |s| {
            let tensor = s.model.as_ref().unwrap().tensors[0].clone();
            s.model.as_mut().unwrap().tensors = (0..10_001)
                .map(|i| pb::Tensor {
                    name: format!("w{i}"),
                    ..tensor.clone()
                })
                .collect();
        }),
        ("spec.model.tensors[0].shape", |s| {
            s.model.as_mut().unwrap().tensors[0].shape = vec![1; 9]
        }),
        ("spec.rounds", |s| s.rounds = 0),
        ("spec.trainers_per_round", |s| {
            s.trainers_per_round = 1_000_001;
            s.hierarchy.as_mut().unwrap().max_fan_in = 1024;
        }),
        // A million trainers at fan-in 16 need 66,669 aggregators.
        ("spec.hierarchy.max_fan_in", |s| {
            s.trainers_per_round = 1_000_000;
            s.hierarchy = Some(pb::Hierarchy {
                levels: 0,
                max_fan_in: 16,
            });
        }),
        ("spec.hierarchy.max_fan_in", |s| {
            s.hierarchy.as_mut().unwrap().max_fan_in = 1
        }),
        ("spec.model.tensors", |s| s.model = None),
        ("spec.model.tensors[0].shape[1]", |s| {
            s.model.as_mut().unwrap().tensors[0].shape[1] = 0
        }),
        ("spec.model.tensors[0].shape", |s| {
            s.model.as_mut().unwrap().tensors[0].shape.clear()
        }),
        ("spec.min_trainers", |s| s.min_trainers = 9),
        ("spec.aggregation.rule", |s| {
            s.aggregation.as_mut().unwrap().rule = "fedprox".into()
        }),
        ("spec.aggregation.mode", |s| {
            s.aggregation.as_mut().unwrap().mode = "".into()
        }),
        ("spec.hierarchy.levels", |s| {
            s.hierarchy.as_mut().unwrap().levels = 7
        }),
        ("spec.name", |s| s.name = "has space".into()),
    ];
    for (field, break_it) in cases {
        let mut bad = spec("bad");
        break_it(&mut bad);
        let status = jobs
            .create_job(pb::CreateJobRequest { spec: Some(bad) })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{field}: {}",
            status.message()
        );
    }
    let status = jobs
        .create_job(pb::CreateJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "spec: is required")
    );

    // Nothing invalid was stored.
    let listed = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn restarting_on_the_same_store_file_finds_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let store = || StoreLocation::File(path.clone());

    let server = start(store(), None).await;
    let channel1 = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel1.clone());
    for name in ["a", "b", "c"] {
        create(&mut jobs, name).await;
    }
    jobs.cancel_job(pb::CancelJobRequest { job_id: 2 })
        .await
        .unwrap();
    register_node(&channel1, "n1").await;
    let mut rounds = RoundServiceClient::new(channel1.clone());
    let assignment = rounds
        .join_round(pb::JoinRoundRequest {
            job_id: 3,
            trainer_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let before = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    drop((jobs, rounds, channel1));
    server.shutdown().await.unwrap();

    let server = start(store(), None).await;
    let channel2 = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel2.clone());
    let after = jobs
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after, before);
    assert_eq!(after.jobs[1].state(), pb::JobState::Cancelled);
    assert_eq!(after.jobs[2].state(), pb::JobState::Running);

    // The round's tree survived, and new jobs get fresh ids and endpoints.
    let topology = jobs
        .get_topology(pb::GetTopologyRequest { job_id: 3 })
        .await
        .unwrap()
        .into_inner();
    assert!(topology
        .aggregators
        .iter()
        .any(|a| a.endpoint_id == assignment.leaf_endpoint_id));
    let created = create(&mut jobs, "d").await;
    assert_eq!(created.job.unwrap().id, 4);
    let mut nodes = NodeServiceClient::new(channel2.clone());
    let listed = nodes
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 1);
    assert!(
        !listed.nodes[0].online,
        "a node is offline until it is heard from again"
    );
    nodes
        .heartbeat(pb::HeartbeatRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap();
    let mut rounds = RoundServiceClient::new(channel2);
    let next = rounds
        .join_round(pb::JoinRoundRequest {
            job_id: 4,
            trainer_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let last = topology
        .aggregators
        .iter()
        .map(|a| a.endpoint_id)
        .max()
        .unwrap();
    assert!(
        next.leaf_endpoint_id > last,
        "endpoint ids are never reused"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn rounds_run_from_join_to_completion_with_nodes_told_their_work() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut nodes = NodeServiceClient::new(channel.clone());
    let mut rounds = RoundServiceClient::new(channel.clone());

    // Joining before any node is online cannot plan a round.
    let job_id = create(&mut jobs, "rounds").await.job.unwrap().id;
    let status = rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "t0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    register_node(&channel, "n1").await;
    let mut work = nodes
        .watch_assignments(pb::WatchAssignmentsRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&next_event(&mut watch).await), "snapshot");

    // 8 trainers, max fan-in 4, 2 levels.
    let mut leaves = Vec::new();
    for t in 0..8 {
        let a = rounds
            .join_round(pb::JoinRoundRequest {
                job_id,
                trainer_id: format!("t{t}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((a.round, a.model_version, a.node_id.as_str()), (1, 0, "n1"));
        assert_eq!(a.gateway_address, "n1.example:7500");
        leaves.push(a.leaf_endpoint_id);
    }
    let again = rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "t3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.leaf_endpoint_id, leaves[3],
        "joining twice gives the same leaf"
    );
    let full = rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "t8".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);
    // The planner balances: fan-in 3 (3^2 >= 8), so 3 leaves of 3, 3, 2.
    let counts: Vec<usize> = leaves[..3]
        .iter()
        .map(|leaf| leaves.iter().filter(|&l| l == leaf).count())
        .collect();
    assert_eq!(counts, [3, 3, 2]);

    let topology = jobs
        .get_topology(pb::GetTopologyRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (topology.levels, topology.fan_in, topology.aggregators.len()),
        (2, 3, 4)
    );
    let Some(pb::node_assignment::Kind::Round(assigned)) =
        tokio::time::timeout(DEADLINE, work.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .kind
    else {
        panic!("expected a round assignment");
    };
    assert_eq!(
        (assigned.job_id, assigned.round, assigned.aggregators.len()),
        (job_id, 1, 4)
    );
    assert_eq!(assigned.model.unwrap().tensors[0].shape, [4, 4]);

    let kinds: Vec<_> = [
        next_event(&mut watch).await,
        next_event(&mut watch).await,
        next_event(&mut watch).await,
    ]
    .iter()
    .map(kind)
    .collect();
    assert_eq!(kinds, ["state_changed", "round_started", "round_progress"]);

    // Too few updates is refused; enough finishes the round.
    let complete = |round, updates| pb::CompleteRoundRequest {
        job_id,
        round,
        updates_aggregated: updates,
        model_checksum: format!("sha256:{round}"),
    };
    let status = nodes.complete_round(complete(1, 3)).await.unwrap_err();
    assert!(
        status.message().starts_with("updates_aggregated: "),
        "{status:?}"
    );
    let job = nodes
        .complete_round(complete(1, 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((job.model_version, job.state()), (1, pb::JobState::Running));
    let record = &job.rounds[0];
    assert_eq!(
        (
            record.trainers_joined,
            record.updates_aggregated,
            record.finished
        ),
        (8, 7, true)
    );
    assert_eq!(record.model_checksum, "sha256:1");
    // The top's retry of a report whose answer it lost gets the same job;
    // another report for the finished round is refused.
    let again = nodes
        .complete_round(complete(1, 7))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, job);
    let status = nodes.complete_round(complete(1, 6)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let mut other_model = complete(1, 7);
    other_model.model_checksum = "sha256:other".into();
    let status = nodes.complete_round(other_model).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status.message(),
        format!("job {job_id}: round 1 is not open (open round: none)")
    );

    // The second (last) round completes the job and ends both streams.
    let a = rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "t0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((a.round, a.model_version), (2, 1));
    let job = nodes
        .complete_round(complete(2, 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), pb::JobState::Completed);
    // Repeated once the job has ended, the report still gets its answer.
    let again = nodes
        .complete_round(complete(2, 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, job);

    let mut saw_job_ended = false;
    while let Some(message) = tokio::time::timeout(DEADLINE, work.message())
        .await
        .unwrap()
        .unwrap()
    {
        if let Some(pb::node_assignment::Kind::JobEnded(ended)) = message.kind {
            assert_eq!(
                (ended.job_id, ended.state()),
                (job_id, pb::JobState::Completed)
            );
            saw_job_ended = true;
            break;
        }
    }
    assert!(saw_job_ended);
    let mut last = None;
    while let Some(event) = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .unwrap()
        .unwrap()
    {
        last = Some(event);
    }
    assert_eq!(last.map(|e| kind(&e)), Some("state_changed"));
    let status = rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watching_node_gets_its_round_then_one_seat_per_new_trainer() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut rounds = RoundServiceClient::new(channel.clone());
    register_node(&channel, "n1").await;
    let mut work = watch_assignments(&channel, "n1").await;

    let job_id = create(&mut jobs, "admitted").await.job.unwrap().id;
    let mut joins = Vec::new();
    for t in 0..5 {
        let trainer = format!("t{t}");
        let assignment = join(&mut rounds, job_id, &trainer).await;
        joins.push((trainer, assignment.leaf_endpoint_id));
    }
    // A repeat join is no new admission. The job's end closes the view, so
    // anything the repeat sent would be read before it.
    let again = join(&mut rounds, job_id, "t2").await;
    assert_eq!(again.leaf_endpoint_id, joins[2].1);
    jobs.cancel_job(pb::CancelJobRequest { job_id })
        .await
        .unwrap();

    let view = NodeView::read_until_job_ended(&mut work).await;
    assert_eq!(view.rounds.len(), 1);
    assert_eq!((view.rounds[0].job_id, view.rounds[0].round), (job_id, 1));
    let one_seat_each: Vec<Vec<(String, u32)>> = joins.iter().map(|j| vec![j.clone()]).collect();
    assert_eq!(view.admitted, one_seat_each);
    let leaves = view.leaves();
    assert_eq!(leaves.len(), 3, "8 trainers at fan-in 3 need 3 leaves");
    assert!(joins.iter().all(|(_, leaf)| leaves.contains(leaf)));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_that_watches_after_trainers_joined_gets_its_round_then_their_seats() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut rounds = RoundServiceClient::new(channel.clone());
    register_node(&channel, "n1").await;
    let job_id = create(&mut jobs, "late-watcher").await.job.unwrap().id;
    let mut early = Vec::new();
    for t in 0..5 {
        let trainer = format!("t{t}");
        let assignment = join(&mut rounds, job_id, &trainer).await;
        early.push((trainer, assignment.leaf_endpoint_id));
    }

    let mut work = watch_assignments(&channel, "n1").await;
    // Joined after the watch began: sent on its own, once.
    let late = join(&mut rounds, job_id, "t5").await;
    jobs.cancel_job(pb::CancelJobRequest { job_id })
        .await
        .unwrap();

    let view = NodeView::read_until_job_ended(&mut work).await;
    assert_eq!(view.rounds.len(), 1, "the round is sent once");
    assert_eq!(view.admitted.len(), 2, "{view:?}");
    let mut caught_up = view.admitted[0].clone();
    caught_up.sort();
    early.sort();
    assert_eq!(caught_up, early);
    assert_eq!(view.admitted[1], [("t5".to_owned(), late.leaf_endpoint_id)]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn each_node_gets_only_the_seats_of_leaves_placed_on_it() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut rounds = RoundServiceClient::new(channel.clone());
    // Two cores each for a tree of four (three leaves and a top): the
    // planner must spread leaves over both nodes.
    register_node_with_cores(&channel, "a", 2).await;
    register_node_with_cores(&channel, "b", 2).await;
    let mut work_a = watch_assignments(&channel, "a").await;
    let mut work_b = watch_assignments(&channel, "b").await;

    let job_id = create(&mut jobs, "spread").await.job.unwrap().id;
    let mut joins = Vec::new();
    for t in 0..8 {
        let trainer = format!("t{t}");
        let assignment = join(&mut rounds, job_id, &trainer).await;
        joins.push((trainer, assignment.leaf_endpoint_id, assignment.node_id));
    }
    jobs.cancel_job(pb::CancelJobRequest { job_id })
        .await
        .unwrap();

    for (node, stream) in [("a", &mut work_a), ("b", &mut work_b)] {
        let view = NodeView::read_until_job_ended(stream).await;
        let expected: Vec<(String, u32)> = joins
            .iter()
            .filter(|(_, _, n)| n == node)
            .map(|(t, leaf, _)| (t.clone(), *leaf))
            .collect();
        assert!(!expected.is_empty(), "no leaf on {node}: {joins:?}");
        assert_eq!(view.all_seats(), expected, "node {node}");
        let leaves = view.leaves();
        assert!(
            expected.iter().all(|(_, leaf)| leaves.contains(leaf)),
            "node {node} runs leaves {leaves:?}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_goes_offline_and_gets_no_work() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut nodes = NodeServiceClient::new(channel.clone());
    register_node(&channel, "quiet").await;
    register_node(&channel, "chatty").await;

    // Heartbeat interval is 100 ms and 3 may be missed: keep one alive and
    // poll until the other is marked offline.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        nodes
            .heartbeat(pb::HeartbeatRequest {
                node_id: "chatty".into(),
            })
            .await
            .unwrap();
        let listed = nodes
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner();
        let online: Vec<_> = listed
            .nodes
            .iter()
            .filter(|n| n.online)
            .map(|n| n.id.as_str())
            .collect();
        if online == ["chatty"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "quiet never went offline: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut jobs = JobServiceClient::new(channel.clone());
    let job_id = create(&mut jobs, "placed").await.job.unwrap().id;
    let mut rounds = RoundServiceClient::new(channel.clone());
    rounds
        .join_round(pb::JoinRoundRequest {
            job_id,
            trainer_id: "t".into(),
        })
        .await
        .unwrap();
    let topology = jobs
        .get_topology(pb::GetTopologyRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert!(
        topology.aggregators.iter().all(|a| a.node_id == "chatty"),
        "{topology:?}"
    );

    let unknown = nodes
        .heartbeat(pb::HeartbeatRequest {
            node_id: "ghost".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn tokens_are_enforced_per_job_when_an_admin_token_is_set() {
    let server = start(StoreLocation::Memory, Some("admin-secret")).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let mut nodes = NodeServiceClient::new(channel.clone());
    let mut rounds = RoundServiceClient::new(channel.clone());

    let status = jobs.list_jobs(pb::ListJobsRequest {}).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unauthenticated, "missing bearer token")
    );
    let status = jobs
        .list_jobs(with_token(pb::ListJobsRequest {}, "wrong"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let create_as_admin = |name: &str| {
        with_token(
            pb::CreateJobRequest {
                spec: Some(spec(name)),
            },
            "admin-secret",
        )
    };
    let a = jobs
        .create_job(create_as_admin("a"))
        .await
        .unwrap()
        .into_inner();
    let b = jobs
        .create_job(create_as_admin("b"))
        .await
        .unwrap()
        .into_inner();
    let (a_id, b_id) = (a.job.unwrap().id, b.job.unwrap().id);
    nodes
        .register_node(with_token(
            pb::RegisterNodeRequest {
                node_id: "n1".into(),
                capacity: Some(pb::NodeCapacity {
                    cores: 2,
                    arena_bytes: 1 << 20,
                }),
                gateway_address: "127.0.0.1:7500".into(),
                peer_address: "127.0.0.1:7501".into(),
            },
            "admin-secret",
        ))
        .await
        .unwrap();

    let join = |job_id| pb::JoinRoundRequest {
        job_id,
        trainer_id: "t".into(),
    };
    rounds
        .join_round(with_token(join(a_id), &a.trainer_token))
        .await
        .unwrap();
    let status = rounds
        .join_round(with_token(join(b_id), &a.trainer_token))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::PermissionDenied,
            "token is not allowed to act on job 2"
        )
    );
    let status = rounds.join_round(join(b_id)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    rounds
        .join_round(with_token(join(b_id), &b.trainer_token))
        .await
        .unwrap();
    rounds
        .join_round(with_token(join(b_id), "admin-secret"))
        .await
        .unwrap();

    // A trainer token is no admin token.
    let status = jobs
        .list_jobs(with_token(pb::ListJobsRequest {}, &a.trainer_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // It reads its own job, to follow the rounds, and no other.
    let read = |job_id| pb::GetJobRequest { job_id };
    let own = jobs
        .get_job(with_token(read(a_id), &a.trainer_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.id, a_id);
    let status = jobs
        .get_job(with_token(read(b_id), &a.trainer_token))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut watch = jobs
        .watch_job(with_token(
            pb::WatchJobRequest { job_id: b_id },
            &b.trainer_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some(), "a snapshot first");
    let status = jobs
        .watch_job(with_token(
            pb::WatchJobRequest { job_id: a_id },
            &b.trainer_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = jobs
        .cancel_job(with_token(
            pb::CancelJobRequest { job_id: a_id },
            &a.trainer_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = nodes
        .heartbeat(with_token(
            pb::HeartbeatRequest {
                node_id: "n1".into(),
            },
            &b.trainer_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut malformed = Request::new(pb::ListJobsRequest {});
    malformed
        .metadata_mut()
        .insert("authorization", "Basic abc".parse().unwrap());
    assert_eq!(
        jobs.list_jobs(malformed).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_reports_not_serving() {
    let server = start(StoreLocation::Memory, None).await;
    let channel = channel(&server).await;
    let mut jobs = JobServiceClient::new(channel.clone());
    let job_id = create(&mut jobs, "long").await.job.unwrap().id;
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kind(&next_event(&mut watch).await), "snapshot");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    let serving = health
        .check(check("lifl.v1.JobService"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Shutdown must not wait for the watcher: the stream ends first.
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .unwrap()
        .unwrap();
    let end = tokio::time::timeout(DEADLINE, watch.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
}
