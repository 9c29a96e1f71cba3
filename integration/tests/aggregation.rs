//! End-to-end aggregation through trees of real `lifl-aggregator`
//! processes: a stand-in gateway pushes known updates to the leaves, the
//! tree folds them hop by hop over the node's data path, and the top's model
//! is checked against the weighted average computed here from the same
//! updates. As root the hops must go through the kernel.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use lifl_integration::{update_samples, update_values, Mode, Peer, SidecarProcess};
use serde_json::Value;

const PARAMS: usize = 5000;
const UPDATES: u64 = 12;
const PATIENCE: Duration = Duration::from_secs(30);
const COLLECTOR: u32 = 900;
const TOP: u32 = 200;

/// A tree as `(endpoint, role, parent)` for every aggregator, leaves first.
fn tree(levels: u32) -> Vec<(u32, &'static str, u32)> {
    match levels {
        2 => vec![(101, "leaf", TOP), (102, "leaf", TOP), (103, "leaf", TOP)],
        3 => vec![
            (101, "leaf", 151),
            (102, "leaf", 151),
            (103, "leaf", 152),
            (104, "leaf", 152),
            (151, "middle", TOP),
            (152, "middle", TOP),
        ],
        _ => unreachable!("the scenarios use two or three levels"),
    }
}

/// The weighted average of every pushed update, straight from the definition.
fn flat_average() -> (Vec<f64>, u64) {
    let total: u64 = (0..UPDATES).map(update_samples).sum();
    let mut mean = vec![0.0f64; PARAMS];
    for k in 0..UPDATES {
        let weight = update_samples(k) as f64 / total as f64;
        for (m, v) in mean.iter_mut().zip(update_values(k, PARAMS)) {
            *m += weight * f64::from(v);
        }
    }
    (mean, total)
}

struct Round {
    model: Vec<f32>,
    samples: u64,
    updates: u64,
    top: Value,
    checkpoint_dir: tempfile::TempDir,
    kernel_routed: u64,
    routed_by_sidecar: u64,
}

/// Runs one round; with `poison`, the first leaf is also sent an update
/// claiming nearly 2^64 samples before the honest ones, which it must refuse.
fn run_round(mode: Mode, levels: u32, fold: &str, poison: bool) -> Round {
    let sidecar = SidecarProcess::builder(mode).start().unwrap();
    let checkpoint_dir = tempfile::tempdir().unwrap();
    // The top may run as an unprivileged user (the user-space path).
    std::fs::set_permissions(
        checkpoint_dir.path(),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let aggregators = tree(levels);
    let leaves: Vec<u32> = aggregators
        .iter()
        .filter(|a| a.1 == "leaf")
        .map(|a| a.0)
        .collect();
    let children = |id: u32| -> usize {
        if aggregators.iter().any(|a| a.0 == id && a.1 == "leaf") {
            (0..UPDATES)
                .filter(|k| leaves[(*k as usize) % leaves.len()] == id)
                .count()
        } else {
            aggregators.iter().filter(|a| a.2 == id).count()
        }
    };

    let mut collector = Peer::start(
        &sidecar,
        &[
            "--job",
            "4",
            "collect",
            "--endpoint",
            &COLLECTOR.to_string(),
        ],
    )
    .unwrap();
    collector.expect("ready", PATIENCE).unwrap();

    let start = |id: u32, role: &str, send_to: u32, expected: usize| {
        let (id, send_to, expected) = (id.to_string(), send_to.to_string(), expected.to_string());
        let params = PARAMS.to_string();
        let mut args = vec![
            "--job",
            "4",
            "--endpoint",
            &id,
            "--role",
            role,
            "--mode",
            fold,
            "--round",
            "1",
            "--params",
            &params,
            "--expected",
            &expected,
            "--send-to",
            &send_to,
        ];
        let dir = checkpoint_dir.path().to_str().unwrap().to_owned();
        if role == "top" {
            args.extend(["--checkpoint-dir", &dir]);
        }
        let mut process = Peer::start_program(&sidecar, "lifl-aggregator", &args).unwrap();
        process.expect("ready", PATIENCE).unwrap();
        process
    };
    let mut top = start(TOP, "top", COLLECTOR, children(TOP));
    let mut others: Vec<Peer> = aggregators
        .iter()
        .rev()
        .map(|&(id, role, parent)| start(id, role, parent, children(id)))
        .collect();

    let leaf_list = leaves
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (count, params) = (UPDATES.to_string(), PARAMS.to_string());
    let first_leaf = leaves[0].to_string();
    let mut args = vec![
        "--job", "4", "push", "--count", &count, "--params", &params, "--leaves", &leaf_list,
    ];
    if poison {
        args.extend(["--poison", &first_leaf]);
    }
    let mut gateway = Peer::start(&sidecar, &args).unwrap();
    gateway.expect("done", PATIENCE).unwrap();

    for aggregator in &mut others {
        let done = aggregator.expect("done", PATIENCE).unwrap();
        let refused = u64::from(poison && done["endpoint"] == leaves[0]);
        assert_eq!(done["refused"], refused, "{done}");
    }
    let top_done = top.expect("done", PATIENCE).unwrap();
    let model = collector.expect("model", PATIENCE).unwrap();
    assert_eq!(model["src"], TOP);
    assert_eq!(model["kind"], "Model");
    let values: Vec<f32> = serde_json::from_value(model["values"].clone()).unwrap();

    let stats = sidecar.stats().unwrap();
    let job = stats.jobs.iter().find(|j| j.job == 4).unwrap();
    let (kernel_routed, routed_by_sidecar) = (job.kernel_routed, stats.routed_by_sidecar);
    gateway.finish().unwrap();
    collector.finish().unwrap();
    Round {
        model: values,
        samples: model["samples"].as_u64().unwrap(),
        updates: model["updates"].as_u64().unwrap(),
        top: top_done,
        checkpoint_dir,
        kernel_routed,
        routed_by_sidecar,
    }
}

/// Max-norm relative distance between a model and a reference.
fn relative_error(model: &[f32], reference: &[f64]) -> f64 {
    let scale = reference.iter().fold(0.0f64, |m, r| m.max(r.abs()));
    let worst = model
        .iter()
        .zip(reference)
        .fold(0.0f64, |m, (&x, &r)| m.max((f64::from(x) - r).abs()));
    worst / scale
}

fn tree_equals_the_flat_weighted_average(mode: Mode, levels: u32, poison: bool) {
    let (flat, total) = flat_average();
    let round = run_round(mode, levels, "eager", poison);

    assert_eq!(round.samples, total, "every update's samples reach the top");
    assert_eq!(
        round.updates, UPDATES,
        "the model says how many trainers' updates it folds"
    );
    assert_eq!(round.model.len(), PARAMS);
    let error = relative_error(&round.model, &flat);
    assert!(
        error < 1e-6,
        "{levels}-level tree is {error:e} from the flat average"
    );

    // The checkpoint holds exactly the published bytes, under its SHA-256.
    let path = std::path::PathBuf::from(round.top["checkpoint"].as_str().unwrap());
    let bytes = std::fs::read(&path).unwrap();
    let published: Vec<u8> = round.model.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(bytes, published);
    let check = std::process::Command::new("sha256sum")
        .arg("-c")
        .arg(path.with_extension("f32.sha256"))
        .current_dir(round.checkpoint_dir.path())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // Every hop (gateway to leaves, up the tree, top to collector) moved by
    // descriptor; as root, the kernel moved every one of them.
    let hops = UPDATES + u64::from(poison) + tree(levels).len() as u64 + 1;
    if mode == Mode::Kernel {
        assert_eq!(round.kernel_routed, hops, "hops through the kernel");
        assert_eq!(round.routed_by_sidecar, 0);
    } else {
        assert_eq!(round.routed_by_sidecar, hops);
    }
}

#[test]
fn two_level_tree_equals_the_flat_weighted_average() {
    if Mode::Kernel.available() {
        tree_equals_the_flat_weighted_average(Mode::Kernel, 2, false);
    }
}

#[test]
fn three_level_tree_equals_the_flat_weighted_average() {
    if Mode::Kernel.available() {
        tree_equals_the_flat_weighted_average(Mode::Kernel, 3, false);
    }
}

/// Aggregators send and exit at once: on the user-space path the sidecar
/// must still route what they wrote before it forgets them.
#[test]
fn three_level_tree_on_the_userspace_path_equals_the_flat_weighted_average() {
    tree_equals_the_flat_weighted_average(Mode::Userspace, 3, false);
}

/// A gateway gone wrong sends a leaf, first, an update claiming nearly 2^64
/// samples: taken, it would leave no room in the round's total for the
/// honest updates after it. The leaf refuses it, and the round publishes
/// exactly the average of the rest.
#[test]
fn an_update_claiming_impossible_samples_is_refused_and_the_rest_average_exactly() {
    tree_equals_the_flat_weighted_average(Mode::preferred(), 2, true);
}

#[test]
fn eager_and_lazy_folds_publish_the_same_model() {
    let mode = Mode::preferred();
    let eager = run_round(mode, 3, "eager", false);
    let lazy = run_round(mode, 3, "lazy", false);
    let reference: Vec<f64> = eager.model.iter().map(|&v| f64::from(v)).collect();
    let error = relative_error(&lazy.model, &reference);
    assert!(error < 1e-6, "eager and lazy differ by {error:e}");
    assert_eq!(eager.samples, lazy.samples);
}
