//! Conversions between `lifl.v1` messages and domain types. Requests become
//! drafts or plain values for the domain to validate; domain values become
//! complete messages.

use lifl_proto::v1 as pb;

use crate::coordinator::{Event, NodeWork, TrainerAssignment, TrainerSeat};
use crate::job::{Job, JobState, RoundRecord};
use crate::node::{Node, NodeStatus};
use crate::planner::{Aggregator, Topology};
use crate::spec::{
    AggregationDraft, HierarchyDraft, JobSpec, JobSpecDraft, Levels, LevelsDraft, ModelLayoutDraft,
    SpecError, Tensor, TensorDraft,
};

pub(super) fn draft_from_pb(spec: pb::JobSpec) -> JobSpecDraft {
    let model = spec.model.unwrap_or_default();
    let aggregation = spec.aggregation.unwrap_or_default();
    let hierarchy = spec.hierarchy.unwrap_or_default();
    JobSpecDraft {
        name: spec.name,
        model: ModelLayoutDraft {
            tensors: model
                .tensors
                .into_iter()
                .map(|t| TensorDraft {
                    name: t.name,
                    shape: t.shape,
                    dtype: t.dtype,
                })
                .collect(),
        },
        rounds: spec.rounds,
        trainers_per_round: spec.trainers_per_round,
        min_trainers: spec.min_trainers,
        round_deadline_ms: spec.round_deadline_ms,
        aggregation: AggregationDraft {
            rule: aggregation.rule,
            mode: aggregation.mode,
        },
        hierarchy: HierarchyDraft {
            levels: LevelsDraft::Count(hierarchy.levels),
            max_fan_in: hierarchy.max_fan_in,
        },
    }
}

/// The wire form of a draft. The wire carries levels as a number, so a
/// `levels` word other than `auto` is refused here, naming `hierarchy.levels`,
/// rather than silently sent as auto.
pub fn draft_to_pb(draft: &JobSpecDraft) -> Result<pb::JobSpec, SpecError> {
    let levels = draft.hierarchy.levels.to_count()?;
    Ok(spec_fields_to_pb(draft, levels))
}

fn spec_fields_to_pb(draft: &JobSpecDraft, levels: u32) -> pb::JobSpec {
    pb::JobSpec {
        name: draft.name.clone(),
        model: Some(pb::ModelLayout {
            tensors: draft.model.tensors.iter().map(tensor_draft_to_pb).collect(),
        }),
        rounds: draft.rounds,
        trainers_per_round: draft.trainers_per_round,
        min_trainers: draft.min_trainers,
        round_deadline_ms: draft.round_deadline_ms,
        aggregation: Some(pb::Aggregation {
            rule: draft.aggregation.rule.clone(),
            mode: draft.aggregation.mode.clone(),
        }),
        hierarchy: Some(pb::Hierarchy {
            levels,
            max_fan_in: draft.hierarchy.max_fan_in,
        }),
    }
}

fn tensor_draft_to_pb(t: &TensorDraft) -> pb::Tensor {
    pb::Tensor {
        name: t.name.clone(),
        shape: t.shape.clone(),
        dtype: t.dtype.clone(),
    }
}

fn spec_to_pb(spec: &JobSpec) -> pb::JobSpec {
    let levels = match spec.levels {
        Levels::Auto => 0,
        Levels::Fixed(n) => n,
    };
    spec_fields_to_pb(&JobSpecDraft::from(spec), levels)
}

fn tensors_to_pb(tensors: &[Tensor]) -> pb::ModelLayout {
    pb::ModelLayout {
        tensors: tensors
            .iter()
            .map(|t| pb::Tensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.as_str().to_owned(),
            })
            .collect(),
    }
}

pub(super) fn state_to_pb(state: JobState) -> pb::JobState {
    match state {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::Completed => pb::JobState::Completed,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn record_to_pb(r: &RoundRecord) -> pb::RoundRecord {
    pb::RoundRecord {
        round: r.round,
        started_unix_ms: r.started_unix_ms,
        deadline_unix_ms: r.deadline_unix_ms,
        trainers_joined: r.trainers_joined,
        updates_aggregated: r.updates_aggregated,
        duration_ms: r.duration_ms,
        model_checksum: r.model_checksum.clone(),
        finished: r.finished,
    }
}

pub(super) fn job_to_pb(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id,
        spec: Some(spec_to_pb(&job.spec)),
        state: state_to_pb(job.state).into(),
        created_unix_ms: job.created_unix_ms,
        model_version: job.model_version,
        rounds: job.rounds.iter().map(record_to_pb).collect(),
        failure: job.failure.clone(),
    }
}

fn aggregator_to_pb(a: &Aggregator) -> pb::Aggregator {
    pb::Aggregator {
        endpoint_id: a.endpoint_id,
        level: a.level,
        parent_endpoint_id: a.parent.unwrap_or(0),
        node_id: a.node_id.clone(),
        expected_inputs: a.expected_inputs,
    }
}

pub(super) fn topology_to_pb(t: &Topology) -> pb::Topology {
    pb::Topology {
        job_id: t.job_id,
        round: t.round,
        levels: t.levels,
        fan_in: t.fan_in,
        aggregators: t.aggregators.iter().map(aggregator_to_pb).collect(),
    }
}

/// The job watchers' message for `event`; `None` for an admission, which they
/// see as the `RoundProgress` published with it.
pub(super) fn event_to_pb(event: &Event) -> Option<pb::JobEvent> {
    use pb::job_event::Kind;
    let (job, kind) = match event {
        Event::StateChanged { job, from } => (
            Some(job_to_pb(job)),
            Kind::StateChanged(pb::StateChanged {
                from: state_to_pb(*from).into(),
                to: state_to_pb(job.state).into(),
            }),
        ),
        Event::RoundStarted { job, topology } => (
            Some(job_to_pb(job)),
            Kind::RoundStarted(pb::RoundStarted {
                round: topology.round,
                topology: Some(topology_to_pb(topology)),
            }),
        ),
        Event::RoundProgress {
            round,
            trainers_joined,
            trainers_per_round,
            ..
        } => (
            None,
            Kind::RoundProgress(pb::RoundProgress {
                round: *round,
                trainers_joined: *trainers_joined,
                trainers_per_round: *trainers_per_round,
            }),
        ),
        Event::RoundFinished { job, record } => (
            Some(job_to_pb(job)),
            Kind::RoundFinished(pb::RoundFinished {
                record: Some(record_to_pb(record)),
            }),
        ),
        Event::TrainerAdmitted { .. } => return None,
    };
    Some(pb::JobEvent {
        job,
        kind: Some(kind),
    })
}

pub(super) fn snapshot_to_pb(job: &Job) -> pb::JobEvent {
    pb::JobEvent {
        job: Some(job_to_pb(job)),
        kind: Some(pb::job_event::Kind::Snapshot(pb::Snapshot {})),
    }
}

pub(super) fn node_from_pb(req: pb::RegisterNodeRequest) -> Node {
    let capacity = req.capacity.unwrap_or_default();
    Node {
        id: req.node_id,
        cores: capacity.cores,
        arena_bytes: capacity.arena_bytes,
        gateway_address: req.gateway_address,
        peer_address: req.peer_address,
    }
}

pub(super) fn node_to_pb(status: &NodeStatus) -> pb::Node {
    let node = &status.node;
    pb::Node {
        id: node.id.clone(),
        capacity: Some(pb::NodeCapacity {
            cores: node.cores,
            arena_bytes: node.arena_bytes,
        }),
        gateway_address: node.gateway_address.clone(),
        peer_address: node.peer_address.clone(),
        online: status.online,
        last_heartbeat_unix_ms: status.last_heartbeat_unix_ms,
    }
}

pub(super) fn work_to_pb(work: &NodeWork) -> pb::NodeAssignment {
    pb::NodeAssignment {
        kind: Some(pb::node_assignment::Kind::Round(pb::RoundAssignment {
            job_id: work.job_id,
            round: work.round,
            model: Some(tensors_to_pb(&work.tensors)),
            mode: work.mode.as_str().to_owned(),
            deadline_unix_ms: work.deadline_unix_ms,
            aggregators: work.aggregators.iter().map(aggregator_to_pb).collect(),
            remote_parents: work
                .remote_parents
                .iter()
                .map(|p| pb::ParentLocation {
                    endpoint_id: p.endpoint_id,
                    node_id: p.node_id.clone(),
                    peer_address: p.peer_address.clone(),
                })
                .collect(),
        })),
    }
}

pub(super) fn admitted_to_pb(job_id: u32, round: u32, seats: &[TrainerSeat]) -> pb::NodeAssignment {
    pb::NodeAssignment {
        kind: Some(pb::node_assignment::Kind::TrainersAdmitted(
            pb::TrainersAdmitted {
                job_id,
                round,
                trainers: seats
                    .iter()
                    .map(|s| pb::TrainerSeat {
                        trainer_id: s.trainer_id.clone(),
                        leaf_endpoint_id: s.leaf_endpoint_id,
                    })
                    .collect(),
            },
        )),
    }
}

pub(super) fn job_ended_to_pb(job: &Job) -> pb::NodeAssignment {
    pb::NodeAssignment {
        kind: Some(pb::node_assignment::Kind::JobEnded(pb::JobEnded {
            job_id: job.id,
            state: state_to_pb(job.state).into(),
        })),
    }
}

pub(super) fn assignment_to_pb(a: TrainerAssignment) -> pb::TrainerAssignment {
    pb::TrainerAssignment {
        job_id: a.job_id,
        round: a.round,
        model_version: a.model_version,
        gateway_address: a.gateway_address,
        leaf_endpoint_id: a.leaf_endpoint_id,
        node_id: a.node_id,
        deadline_unix_ms: a.deadline_unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::good_draft;

    #[test]
    fn a_levels_word_other_than_auto_is_refused_naming_the_field() {
        let mut draft = good_draft();
        assert_eq!(draft_to_pb(&draft).unwrap().hierarchy.unwrap().levels, 0);
        draft.hierarchy.levels = LevelsDraft::Count(2);
        assert_eq!(draft_to_pb(&draft).unwrap().hierarchy.unwrap().levels, 2);

        draft.hierarchy.levels = LevelsDraft::Word("two".into());
        let err = draft_to_pb(&draft).unwrap_err().under("spec");
        assert_eq!(
            err.to_string(),
            "spec.hierarchy.levels: is \"two\"; must be 1 to 3, or \"auto\""
        );
    }

    #[test]
    fn a_spec_round_trips_through_the_wire() {
        let mut draft = good_draft();
        draft.hierarchy.levels = LevelsDraft::Count(2);
        let spec = draft.validate().unwrap();
        assert_eq!(draft_from_pb(spec_to_pb(&spec)), draft);
    }
}
