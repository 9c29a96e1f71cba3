//! End-to-end tests of the shipped binaries: `lifl-control-plane` started as
//! a real process on `127.0.0.1:0`, driven by `liflctl` and by the real
//! `grpcurl` through server reflection.

// Test helpers panic on purpose: a failure is the test failing.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a process may take to start or stop before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// A control-plane process, killed on drop if the test did not stop it.
struct ControlPlane {
    child: Child,
    addr: String,
}

impl ControlPlane {
    fn start(store: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lifl-control-plane"))
            .args(["--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .args(extra)
            .env("LIFL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // The first stdout line is the bound address; read_line blocks until
        // it comes or the process exits (EOF).
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "the control plane exited before listening"
        );
        Self {
            child,
            addr: line.trim().to_owned(),
        }
    }

    /// Sends `signal` and waits for the exit status, within the deadline.
    fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the control plane did not exit on {signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn liflctl(addr: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_liflctl"))
        .args(["--server", addr])
        .args(args)
        .env_remove("LIFL_CTL_TOKEN")
        .output()
        .unwrap()
}

fn stdout_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

const SPEC: &str = r#"{
  "name": "cifar-resnet",
  "model": {"tensors": [{"name": "fc.weight", "shape": [10, 512], "dtype": "f32"}]},
  "rounds": 5,
  "trainers_per_round": 100,
  "min_trainers": 90,
  "round_deadline_ms": 120000,
  "aggregation": {"rule": "fedavg", "mode": "lazy"},
  "hierarchy": {"levels": "auto", "max_fan_in": 10}
}"#;

#[test]
fn acknowledged_jobs_survive_kill_dash_9_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("cp.redb");
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, SPEC).unwrap();

    let server = ControlPlane::start(&store, &[]);
    let spec_arg = spec.to_str().unwrap();
    for _ in 0..3 {
        let created = stdout_json(&liflctl(
            &server.addr,
            &["--json", "job", "create", "-f", spec_arg],
        ));
        assert!(created["trainer_token"]
            .as_str()
            .unwrap()
            .starts_with("lifl_"));
    }
    let status = server.stop_with("-KILL");
    assert!(!status.success());

    let server = ControlPlane::start(&store, &[]);
    let jobs = stdout_json(&liflctl(&server.addr, &["--json", "job", "list"]));
    let ids: Vec<u64> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3]);
    assert_eq!(jobs[2]["spec"]["name"], "cifar-resnet");
    assert_eq!(jobs[2]["state"], "pending");

    let status = server.stop_with("-TERM");
    assert!(
        status.success(),
        "SIGTERM must shut down cleanly: {status:?}"
    );
}

#[test]
fn liflctl_reads_and_refuses_as_a_shell_user_expects() {
    let dir = tempfile::tempdir().unwrap();
    let server = ControlPlane::start(Path::new(":memory:"), &[]);
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, SPEC).unwrap();
    let spec_arg = spec.to_str().unwrap();

    let created = liflctl(&server.addr, &["job", "create", "-f", spec_arg]);
    assert!(created.status.success());
    let text = String::from_utf8(created.stdout).unwrap();
    assert!(text.starts_with("created job 1 (cifar-resnet)\n"), "{text}");

    let job = stdout_json(&liflctl(&server.addr, &["job", "get", "1", "--json"]));
    assert_eq!(job["spec"]["hierarchy"]["levels"], "auto");
    assert_eq!(job["spec"]["trainers_per_round"], 100);
    let table = liflctl(&server.addr, &["job", "list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.lines().nth(1).unwrap().contains("cifar-resnet"),
        "{table}"
    );

    // An unknown field in the spec file is an error, not ignored.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        SPEC.replace("\"rounds\": 5", "\"rounds\": 5, \"epochs\": 2"),
    )
    .unwrap();
    let out = liflctl(
        &server.addr,
        &["job", "create", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `epochs`"));

    // An invalid value is refused by the server, naming the field.
    std::fs::write(
        &bad,
        SPEC.replace("\"max_fan_in\": 10", "\"max_fan_in\": 1"),
    )
    .unwrap();
    let out = liflctl(
        &server.addr,
        &["job", "create", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid argument: spec.hierarchy.max_fan_in: is 1"),
        "{stderr}"
    );

    // A levels word other than auto has no wire form: refused before sending.
    std::fs::write(
        &bad,
        SPEC.replace("\"levels\": \"auto\"", "\"levels\": \"deep\""),
    )
    .unwrap();
    let out = liflctl(
        &server.addr,
        &["job", "create", "-f", bad.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "liflctl: {}: spec.hierarchy.levels: is \"deep\"; must be 1 to 3, or \"auto\"\n",
            bad.display()
        )
    );

    let out = liflctl(&server.addr, &["job", "cancel", "7"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "liflctl: not found: job 7 not found\n"
    );
    let out = liflctl(&server.addr, &["topology", "1"]);
    assert_eq!(out.status.code(), Some(3));
    let nodes = stdout_json(&liflctl(&server.addr, &["node", "list", "--json"]));
    assert_eq!(nodes, Value::Array(Vec::new()));
    let cancelled = stdout_json(&liflctl(&server.addr, &["job", "cancel", "1", "--json"]));
    assert_eq!(cancelled["state"], "cancelled");
    // A watch of an ended job prints its snapshot and returns.
    let watched = liflctl(&server.addr, &["job", "watch", "1"]);
    assert!(watched.status.success());
    assert_eq!(
        String::from_utf8_lossy(&watched.stdout),
        "job 1 (cifar-resnet) is cancelled, 0 of 5 rounds done\n"
    );

    let token = ControlPlane::start(Path::new(":memory:"), &["--admin-token", "s3cret"]);
    let out = liflctl(&token.addr, &["job", "list"]);
    assert_eq!(out.status.code(), Some(4));
    let out = liflctl(&token.addr, &["--token", "s3cret", "job", "list", "--json"]);
    assert_eq!(stdout_json(&out), Value::Array(Vec::new()));

    drop(server);
    drop(token);
    let out = liflctl("127.0.0.1:1", &["job", "list"]);
    assert_eq!(out.status.code(), Some(5));
}

fn grpcurl(args: &[&str]) -> Output {
    match Command::new("grpcurl").args(args).output() {
        Ok(output) => output,
        Err(e) => panic!("grpcurl must be on PATH (`just deps` installs it): {e}"),
    }
}

#[test]
fn grpcurl_lists_services_and_creates_and_reads_back_a_job() {
    let server = ControlPlane::start(Path::new(":memory:"), &[]);
    let addr = server.addr.as_str();

    // grpcurl 1.8 finds services through v1alpha reflection.
    let listed = grpcurl(&["-plaintext", addr, "list"]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let services = String::from_utf8(listed.stdout).unwrap();
    for service in [
        "grpc.health.v1.Health",
        "lifl.v1.JobService",
        "lifl.v1.NodeService",
        "lifl.v1.RoundService",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from {services}"
        );
    }
    let described = grpcurl(&["-plaintext", addr, "describe", "lifl.v1.JobSpec"]);
    assert!(String::from_utf8_lossy(&described.stdout).contains("trainers_per_round"));

    let request: Value = serde_json::from_str(&format!(r#"{{"spec": {SPEC}}}"#)).unwrap();
    let mut request = request;
    request["spec"]["hierarchy"]["levels"] = 0.into();
    let created = grpcurl(&[
        "-plaintext",
        "-d",
        &request.to_string(),
        addr,
        "lifl.v1.JobService/CreateJob",
    ]);
    let created = stdout_json(&created);
    assert_eq!(created["job"]["id"], 1);
    assert_eq!(created["job"]["state"], "JOB_STATE_PENDING");

    let got = stdout_json(&grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"job_id": 1}"#,
        addr,
        "lifl.v1.JobService/GetJob",
    ]));
    assert_eq!(got["spec"]["name"], "cifar-resnet");
    assert_eq!(got["spec"]["trainersPerRound"], 100);
    assert_eq!(
        got["spec"]["model"]["tensors"][0]["shape"],
        serde_json::json!(["10", "512"])
    );

    request["spec"]["rounds"] = 0.into();
    let refused = grpcurl(&[
        "-plaintext",
        "-d",
        &request.to_string(),
        addr,
        "lifl.v1.JobService/CreateJob",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("Message: spec.rounds: must be 1 to 1000000"),
        "{stderr}"
    );

    let health = stdout_json(&grpcurl(&[
        "-plaintext",
        addr,
        "grpc.health.v1.Health/Check",
    ]));
    assert_eq!(health["status"], "SERVING");
}
