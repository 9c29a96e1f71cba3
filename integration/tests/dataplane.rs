//! End-to-end tests of the node data path: a real sidecar, real peer
//! processes, and (as root) the real SK_MSG program. Every scenario runs on
//! both data paths; the user-space one runs every process unprivileged.

// Scenario helpers are test code too: a failed step should fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lifl_integration::{Mode, Peer, SidecarProcess};
use serde_json::Value;

// Generous: a debug build on two shared cores, beside other tests.
const SLOW: Duration = Duration::from_secs(300);
const QUICK: Duration = Duration::from_secs(20);

fn sidecar(mode: Mode) -> Option<SidecarProcess> {
    mode.available().then(|| {
        SidecarProcess::builder(mode)
            .start()
            .expect("sidecar starts")
    })
}

fn two_processes_exchange_100k_descriptors(mode: Mode) {
    let Some(sidecar) = sidecar(mode) else { return };
    const COUNT: &str = "100000";

    let mut receiver =
        Peer::start(&sidecar, &["recv", "--endpoint", "20", "--count", COUNT]).unwrap();
    let ready = receiver.expect("ready", QUICK).unwrap();
    assert_eq!(ready["dataplane"], mode.dataplane());
    let mut sender = Peer::start(
        &sidecar,
        &["send", "--endpoint", "10", "--to", "20", "--count", COUNT],
    )
    .unwrap();

    let sent = sender.expect("done", SLOW).unwrap();
    let received = receiver.expect("done", SLOW).unwrap();
    assert_eq!(sent["sent"], 100_000);
    assert_eq!(received["received"], 100_000);
    assert_eq!(
        received["bad_payloads"], 0,
        "every payload byte must arrive intact"
    );
    assert_eq!(received["out_of_order"], 0);

    // Who moved them: the kernel on the sk_msg path, the sidecar otherwise.
    let stats = sidecar.stats().unwrap();
    let sender_stats = stats.endpoints.iter().find(|e| e.endpoint == 10).unwrap();
    match mode {
        Mode::Kernel => {
            assert_eq!(sender_stats.kernel_routed, 100_000, "{stats:#?}");
            assert_eq!(sender_stats.kernel_passed, 0);
            assert_eq!(stats.routed_by_sidecar, 0);
        }
        Mode::Userspace => assert_eq!(stats.routed_by_sidecar, 100_000),
    }
    assert!(
        stats.refused.is_empty(),
        "nothing refused: {:?}",
        stats.refused
    );

    sender.finish().unwrap();
    receiver.finish().unwrap();
    let idle = sidecar
        .wait_for_stats(QUICK, |s| {
            s.endpoints.is_empty() && s.jobs.iter().all(|j| j.used_bytes == 0)
        })
        .unwrap();
    assert!(
        idle.endpoints.is_empty() && idle.jobs.iter().all(|j| j.refs == 0),
        "{idle:#?}"
    );
    assert!(
        sidecar.stop().unwrap().success(),
        "SIGTERM stops the sidecar with exit 0"
    );
}

#[test]
fn kernel_two_processes_exchange_100k_descriptors() {
    two_processes_exchange_100k_descriptors(Mode::Kernel);
}

#[test]
fn userspace_two_processes_exchange_100k_descriptors() {
    two_processes_exchange_100k_descriptors(Mode::Userspace);
}

fn descriptor_to_another_job_is_refused_and_never_delivered(mode: Mode) {
    let Some(sidecar) = sidecar(mode) else { return };
    let mut peer = Peer::start(&sidecar, &["--job", "1", "cross-job", "--other-job", "2"]).unwrap();
    let result = peer.expect("result", QUICK).unwrap();
    assert_eq!(result["refusal"], "cross_job");
    assert_eq!(result["delivered_across_jobs"], false);
    assert_eq!(
        result["same_job_after_refusal"], true,
        "a refusal must not poison the socket"
    );

    let stats = sidecar.stats().unwrap();
    assert_eq!(
        stats.refused.get(&lifl_sdk::RefuseReason::CrossJob),
        Some(&1)
    );
    let sender = result["endpoints"]["sender"].as_u64().unwrap() as u32;
    let sender = stats
        .endpoints
        .iter()
        .find(|e| e.endpoint == sender)
        .unwrap();
    if mode == Mode::Kernel {
        assert_eq!(sender.kernel_refused, 1, "the kernel counts its refusal");
        assert_eq!(sender.kernel_routed, 1, "and routes the same-job send");
    }
    peer.finish().unwrap();
}

#[test]
fn kernel_descriptor_to_another_job_is_refused_and_never_delivered() {
    descriptor_to_another_job_is_refused_and_never_delivered(Mode::Kernel);
}

#[test]
fn userspace_descriptor_to_another_job_is_refused_and_never_delivered() {
    descriptor_to_another_job_is_refused_and_never_delivered(Mode::Userspace);
}

fn killed_client_has_its_buffers_released(mode: Mode) {
    let Some(sidecar) = sidecar(mode) else { return };
    let mut holder = Peer::start(&sidecar, &["--job", "3", "hold", "--buffers", "40"]).unwrap();
    let holding = holder.expect("holding", QUICK).unwrap();
    let ids: Vec<u32> = holding["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();

    let before = sidecar.stats().unwrap();
    let job = before.jobs.iter().find(|j| j.job == 3).unwrap();
    assert_eq!(job.buffers, 40);
    assert_eq!(job.used_bytes, 40 * 4096);
    if mode == Mode::Kernel {
        assert!(
            ids.iter().all(|id| before.sockmap_endpoints.contains(id)),
            "{before:#?}"
        );
    }

    holder.kill9().unwrap();
    let after = sidecar
        .wait_for_stats(QUICK, |s| {
            s.endpoints.is_empty()
                && s.jobs.iter().all(|j| j.used_bytes == 0)
                && s.sockmap_endpoints.is_empty()
        })
        .unwrap();
    assert!(after.endpoints.is_empty(), "{after:#?}");
    assert!(
        after.jobs.iter().all(|j| j.used_bytes == 0 && j.refs == 0),
        "{after:#?}"
    );
    assert!(
        after.sockmap_endpoints.is_empty(),
        "sockets left in the map: {after:#?}"
    );
}

#[test]
fn kernel_killed_client_has_its_buffers_released() {
    killed_client_has_its_buffers_released(Mode::Kernel);
}

#[test]
fn userspace_killed_client_has_its_buffers_released() {
    killed_client_has_its_buffers_released(Mode::Userspace);
}

fn exhaustion(mode: Mode, sidecar: SidecarProcess, len: &str, code: &str, allocated: u64) {
    let mut peer = Peer::start(&sidecar, &["exhaust", "--len", len]).unwrap();
    let result: Value = peer.expect("result", QUICK).unwrap();
    assert_eq!(result["code"], code, "{result}");
    assert_eq!(result["allocated"], allocated, "{result}");
    assert_eq!(result["retryable"], true);
    assert_eq!(result["fault"], "Capacity");
    assert_eq!(
        result["round_trip_after_release"], true,
        "{mode:?}: sends work again"
    );
    peer.finish().unwrap();
}

#[test]
fn arena_exhaustion_is_a_clear_error_and_release_recovers() {
    for mode in [Mode::Kernel, Mode::Userspace] {
        if !mode.available() {
            continue;
        }
        // 1 MiB holds a 4 KiB header and three 256 KiB buffers.
        let sidecar = SidecarProcess::builder(mode)
            .arena_bytes("1MiB")
            .start()
            .unwrap();
        exhaustion(mode, sidecar, "262144", "arena_full", 3);
    }
}

#[test]
fn endpoint_credit_exhaustion_is_a_clear_error_and_release_recovers() {
    for mode in [Mode::Kernel, Mode::Userspace] {
        if !mode.available() {
            continue;
        }
        let sidecar = SidecarProcess::builder(mode)
            .endpoint_credit(5)
            .start()
            .unwrap();
        exhaustion(mode, sidecar, "64", "credit_exhausted", 5);
    }
}

fn malformed_descriptors_are_refused_and_counted(mode: Mode) {
    let Some(sidecar) = sidecar(mode) else { return };
    let mut peer = Peer::start(&sidecar, &["malformed"]).unwrap();
    let result = peer.expect("result", QUICK).unwrap();
    let observed = &result["observed"];
    for (case, reason) in [
        ("bad_magic", "bad_magic"),
        ("bad_version", "bad_version"),
        ("bad_kind", "bad_kind"),
        ("spoofed_source", "spoofed_source"),
        ("unknown_endpoint", "unknown_endpoint"),
        ("out_of_bounds_offset", "out_of_bounds"),
        ("out_of_bounds_len", "out_of_bounds"),
        ("not_holder", "not_holder"),
        ("short", "short"),
    ] {
        assert_eq!(observed[case], reason, "{mode:?} {case}: {result}");
    }
    assert_eq!(
        result["delivered"], false,
        "nothing malformed reaches the target"
    );

    let stats = sidecar.stats().unwrap();
    let counted: Vec<(&str, u64)> = stats
        .refused
        .iter()
        .map(|(r, n)| (r.as_str(), *n))
        .collect();
    assert_eq!(
        counted,
        vec![
            ("short", 1),
            ("bad_magic", 1),
            ("bad_version", 1),
            ("bad_kind", 1),
            ("spoofed_source", 1),
            ("unknown_endpoint", 1),
            ("out_of_bounds", 2),
            ("not_holder", 1),
        ]
    );
    // The short one left the stream out of step: its endpoint was closed.
    assert_eq!(
        stats.endpoints.len(),
        1,
        "only the target is left: {stats:#?}"
    );
    if mode == Mode::Kernel {
        let job = stats.jobs.iter().find(|j| j.job == 1).unwrap();
        assert_eq!(
            job.kernel_passed, 9,
            "the kernel handed each one to the sidecar: {stats:#?}"
        );
    }
    peer.finish().unwrap();
    assert!(sidecar.stop().unwrap().success());
}

#[test]
fn kernel_malformed_descriptors_are_refused_and_counted() {
    malformed_descriptors_are_refused_and_counted(Mode::Kernel);
}

#[test]
fn userspace_malformed_descriptors_are_refused_and_counted() {
    malformed_descriptors_are_refused_and_counted(Mode::Userspace);
}

/// Restores `vm.nr_hugepages` when dropped.
struct HugepageReservation(String);

impl HugepageReservation {
    const PATH: &'static str = "/proc/sys/vm/nr_hugepages";

    fn add(pages: u64) -> Self {
        let before = std::fs::read_to_string(Self::PATH)
            .unwrap()
            .trim()
            .to_owned();
        let wanted = before.parse::<u64>().unwrap() + pages;
        std::fs::write(Self::PATH, wanted.to_string()).unwrap();
        Self(before)
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

#[test]
fn arena_is_hugepage_backed_when_the_machine_has_hugepages() {
    if !lifl_integration::is_root() {
        eprintln!("skipping: reserving hugepages needs root");
        return;
    }
    // 24 pages of 2 MiB: room for a 16 MiB arena whatever else is reserved.
    let _reserved = HugepageReservation::add(24);
    let sidecar = SidecarProcess::builder(Mode::Kernel)
        .arena_bytes("16MiB")
        .hugepages(true)
        .start()
        .unwrap();
    let mut holder = Peer::start(&sidecar, &["--job", "5", "hold", "--buffers", "8"]).unwrap();
    holder.expect("holding", QUICK).unwrap();

    let stats = sidecar.stats().unwrap();
    let job = stats.jobs.iter().find(|j| j.job == 5).unwrap();
    assert_eq!(job.page_bytes, 2 << 20, "{stats:#?}");
    assert_eq!(job.arena_bytes, 16 << 20);
    assert_eq!(job.buffers, 8, "buffers written and moved on hugepages");
    holder.kill9().unwrap();
}

#[test]
fn the_sdk_example_runs_against_a_live_sidecar() {
    let Some(sidecar) = sidecar(Mode::Userspace) else {
        return;
    };
    let example = lifl_integration::bin_dir().join("examples/round_trip");
    let output = std::process::Command::new(&example)
        .arg(sidecar.socket())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", example.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("samples=600 values=[0.5, -1.0, 2.0, 4.25]"),
        "{stdout}"
    );
}

fn a_sender_that_exits_at_once_loses_nothing(mode: Mode) {
    let Some(sidecar) = sidecar(mode) else { return };
    let mut receiver =
        Peer::start(&sidecar, &["recv", "--endpoint", "20", "--count", "2000"]).unwrap();
    receiver.expect("ready", QUICK).unwrap();
    let mut sender = Peer::start(
        &sidecar,
        &[
            "send",
            "--endpoint",
            "10",
            "--to",
            "20",
            "--count",
            "2000",
            "--exit-at-once",
        ],
    )
    .unwrap();
    sender.expect("done", QUICK).unwrap();

    let received = receiver.expect("done", QUICK).unwrap();
    assert_eq!(received["bad_payloads"], 0);
    assert_eq!(received["out_of_order"], 0);
    let stats = sidecar.stats().unwrap();
    assert!(
        stats.refused.is_empty(),
        "nothing refused: {:?}",
        stats.refused
    );
    receiver.finish().unwrap();
}

#[test]
fn kernel_sender_that_exits_at_once_loses_nothing() {
    a_sender_that_exits_at_once_loses_nothing(Mode::Kernel);
}

#[test]
fn userspace_sender_that_exits_at_once_loses_nothing() {
    a_sender_that_exits_at_once_loses_nothing(Mode::Userspace);
}

#[test]
fn sigint_stops_the_sidecar_cleanly() {
    let sidecar = SidecarProcess::builder(Mode::Userspace).start().unwrap();
    let socket = sidecar.socket().to_owned();
    let status = sidecar.interrupt().unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C is a clean stop");
    assert!(!socket.exists(), "the socket is removed on stop");
}
