//! A harness that runs lifl's real binaries as separate processes, for the
//! end-to-end tests and the benchmarks.
//!
//! [`SidecarProcess`] starts `lifl-sidecar` on a socket in a fresh directory
//! and stops it with SIGTERM; [`Peer`] starts `lifl-dp-peer`, a small SDK
//! program that plays one side of a scenario and reports what it saw as JSON
//! lines. Both can run as an unprivileged user (through `setpriv`) so the
//! user-space data path is tested as such even where the tests run as root.
//!
//! For whole federated rounds, [`ControlPlaneProcess`] starts
//! `lifl-control-plane` with an in-memory store and drives it with `liflctl`;
//! [`SidecarBuilder::node`] makes a sidecar serve as that control plane's node
//! (trainer gateway, aggregators it launches, checkpoints in its own
//! directory); [`run_trainers`] runs the `lifl-trainer` simulation to its end.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use lifl_sdk::SidecarStats;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The uid and gid unprivileged processes run as (`nobody`).
const NOBODY: u32 = 65534;

/// Which data path a scenario runs on, and as whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel path: a privileged sidecar with `--dataplane sk-msg`.
    Kernel,
    /// The user-space path, every process unprivileged.
    Userspace,
}

impl Mode {
    /// Whether this mode can run here. The kernel path needs root; where
    /// `LIFL_REQUIRE_BPF=1` it must run, so a missing privilege fails the
    /// test instead of skipping it.
    pub fn available(self) -> bool {
        if self == Mode::Userspace || is_root() {
            return true;
        }
        assert!(
            std::env::var("LIFL_REQUIRE_BPF").as_deref() != Ok("1"),
            "LIFL_REQUIRE_BPF=1 but the kernel data path needs root (CAP_BPF, CAP_NET_ADMIN)"
        );
        eprintln!("skipping the kernel data path: not root; the user-space tests still run");
        false
    }

    /// The kernel path where it can run, else the user-space one: for
    /// scenarios whose point is not the data path.
    pub fn preferred() -> Mode {
        if Mode::Kernel.available() {
            Mode::Kernel
        } else {
            Mode::Userspace
        }
    }

    /// The `dataplane` the sidecar must report in this mode.
    pub fn dataplane(self) -> &'static str {
        match self {
            Mode::Kernel => "sk_msg",
            Mode::Userspace => "userspace",
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Where the workspace's binaries are: `LIFL_BIN_DIR`, else the profile
/// directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LIFL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test binary has a path");
    // target/<profile>/deps/<test> -> target/<profile>
    let mut dir = exe.parent().expect("in a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    Ok(path)
}

/// A command for `program`, run as `nobody` with no capabilities in
/// [`Mode::Userspace`] when this process is root.
fn command_for(mode: Mode, program: &Path) -> Command {
    if mode == Mode::Userspace && is_root() {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ]);
        cmd.arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// A running `lifl-sidecar`, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct SidecarProcess {
    child: Child,
    socket: PathBuf,
    mode: Mode,
    /// Set when it serves as a control plane's node.
    node: Option<NodeInfo>,
    _dir: tempfile::TempDir,
}

/// Who a sidecar is to the control plane it serves.
#[derive(Debug, Clone)]
struct NodeInfo {
    id: String,
    gateway_address: String,
    checkpoint_dir: PathBuf,
}

/// How to start a sidecar.
#[derive(Debug, Clone)]
pub struct SidecarBuilder {
    mode: Mode,
    arena_bytes: String,
    endpoint_credit: Option<u64>,
    hugepages: bool,
    /// `host:port` of the control plane to serve as a node of.
    control_plane: Option<String>,
    extra: Vec<String>,
}

impl SidecarProcess {
    /// A sidecar on the data path of `mode`, with small defaults for tests.
    pub fn builder(mode: Mode) -> SidecarBuilder {
        SidecarBuilder {
            mode,
            arena_bytes: "64MiB".into(),
            endpoint_credit: None,
            hugepages: false,
            control_plane: None,
            extra: vec![],
        }
    }

    /// The registration socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The mode it runs in.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Its node id at the control plane, if it serves one.
    pub fn node_id(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.id.as_str())
    }

    /// `host:port` of its trainer gateway, if it serves a control plane.
    pub fn gateway_address(&self) -> Option<&str> {
        self.node.as_ref().map(|n| n.gateway_address.as_str())
    }

    /// Where its top aggregators write checkpoints, if it serves a control
    /// plane.
    pub fn checkpoint_dir(&self) -> Option<&Path> {
        self.node.as_ref().map(|n| n.checkpoint_dir.as_path())
    }

    /// The sidecar's current state.
    pub fn stats(&self) -> anyhow::Result<SidecarStats> {
        block_on(lifl_sdk::stats(&self.socket)).context("ask the sidecar for stats")
    }

    /// Polls the sidecar's state until `done` holds or `timeout` passes, and
    /// returns the last state seen.
    pub fn wait_for_stats(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&SidecarStats) -> bool,
    ) -> anyhow::Result<SidecarStats> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats()?;
            if done(&stats) || Instant::now() > deadline {
                return Ok(stats);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the sidecar with SIGINT, as Ctrl-C would, and returns how it
    /// exited.
    pub fn interrupt(mut self) -> anyhow::Result<ExitStatus> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the sidecar ignored SIGINT");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the sidecar with SIGTERM and returns how it exited.
    pub fn stop(mut self) -> anyhow::Result<ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(10))
    }
}

impl SidecarBuilder {
    /// Size of each job's arena (`64MiB` by default here).
    pub fn arena_bytes(mut self, bytes: &str) -> Self {
        self.arena_bytes = bytes.into();
        self
    }

    /// Live references one endpoint may have allocated.
    pub fn endpoint_credit(mut self, credit: u64) -> Self {
        self.endpoint_credit = Some(credit);
        self
    }

    /// Lets the sidecar back arenas with hugepages. Off by default, so tests
    /// running side by side never take each other's reserved hugepages.
    pub fn hugepages(mut self, on: bool) -> Self {
        self.hugepages = on;
        self
    }

    /// Serves as a node of `control_plane`: registers with it, runs the
    /// trainer gateway on a free port of 127.0.0.1, launches the aggregators
    /// of its round assignments and has the tops checkpoint into a directory
    /// of its own. [`start`](Self::start) then returns once the control
    /// plane lists the node online.
    pub fn node(mut self, control_plane: &ControlPlaneProcess) -> Self {
        self.control_plane = Some(control_plane.address().to_owned());
        self
    }

    /// Any further flags.
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// Starts it and waits until it answers on its socket.
    pub fn start(self) -> anyhow::Result<SidecarProcess> {
        let dir = tempfile::Builder::new().prefix("lifl-it-").tempdir()?;
        // An unprivileged sidecar must be able to create its socket here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        let socket = dir.path().join("sidecar.sock");

        let dataplane = match self.mode {
            Mode::Kernel => "sk-msg",
            Mode::Userspace => "auto",
        };
        let mut cmd = command_for(self.mode, &binary("lifl-sidecar")?);
        cmd.arg("--socket").arg(&socket);
        cmd.args(["--dataplane", dataplane, "--arena-bytes", &self.arena_bytes]);
        if let Some(credit) = self.endpoint_credit {
            cmd.args(["--endpoint-credit", &credit.to_string()]);
        }
        if !self.hugepages {
            cmd.arg("--no-hugepages");
        }
        let node = match &self.control_plane {
            Some(control_plane) => Some(node_flags(&mut cmd, dir.path(), control_plane)?),
            None => None,
        };
        cmd.args(&self.extra);
        cmd.env("LIFL_LOG", log_filter());
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .context("spawn lifl-sidecar")?;
        let mut sidecar = SidecarProcess {
            child,
            socket,
            mode: self.mode,
            node: None,
            _dir: dir,
        };

        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = sidecar.child.try_wait()? {
                bail!("lifl-sidecar exited during start-up: {status}");
            }
            if let Ok(stats) = sidecar.stats() {
                if stats.dataplane != self.mode.dataplane() {
                    bail!(
                        "sidecar runs dataplane={}, wanted {}",
                        stats.dataplane,
                        self.mode.dataplane()
                    );
                }
                if let (Some(mut node), Some(control_plane)) = (node, &self.control_plane) {
                    node.gateway_address =
                        wait_for_node(&mut sidecar.child, control_plane, &node.id, deadline)?;
                    sidecar.node = Some(node);
                }
                return Ok(sidecar);
            }
            if Instant::now() > deadline {
                bail!(
                    "lifl-sidecar did not answer on {} in time",
                    sidecar.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Adds the flags that make a sidecar in `dir` a node of `control_plane`,
/// and makes its checkpoint directory; the gateway address is learnt later.
fn node_flags(cmd: &mut Command, dir: &Path, control_plane: &str) -> anyhow::Result<NodeInfo> {
    let checkpoint_dir = dir.join("checkpoints");
    std::fs::create_dir(&checkpoint_dir)?;
    // Its top aggregators may run as an unprivileged user.
    std::fs::set_permissions(&checkpoint_dir, std::fs::Permissions::from_mode(0o777))?;
    // Unique per sidecar, as the directory is.
    let id = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .context("the sidecar directory has a name")?;
    cmd.arg("--control-plane")
        .arg(format!("http://{control_plane}"));
    cmd.args(["--gateway-listen", "127.0.0.1:0", "--node-id", &id]);
    cmd.arg("--checkpoint-dir").arg(&checkpoint_dir);
    Ok(NodeInfo {
        id,
        gateway_address: String::new(),
        checkpoint_dir,
    })
}

/// Polls `liflctl node list` until node `id` is online, and returns the
/// gateway address it registered.
fn wait_for_node(
    sidecar: &mut Child,
    control_plane: &str,
    id: &str,
    deadline: Instant,
) -> anyhow::Result<String> {
    loop {
        if let Some(status) = sidecar.try_wait()? {
            bail!("lifl-sidecar exited before registering with the control plane: {status}");
        }
        let nodes = liflctl(control_plane, &["node", "list"])?;
        let node = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == id && n["online"] == true);
        if let Some(address) = node.and_then(|n| n["gateway_address"].as_str()) {
            return Ok(address.to_owned());
        }
        if Instant::now() > deadline {
            bail!("node {id} did not come online at the control plane {control_plane}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Sends SIGTERM and waits; SIGKILL if it does not exit within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> anyhow::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill()?;
    Err(anyhow!(
        "process {} ignored SIGTERM for {grace:?}",
        child.id()
    ))
}

/// A running `lifl-control-plane` on `127.0.0.1:0` with an in-memory store,
/// stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    child: Child,
    /// `host:port` it listens on, as it printed it.
    address: String,
    /// Its stdout after the address, kept open so a later line never meets
    /// a closed pipe.
    _stdout: mpsc::Receiver<String>,
}

/// A job as `liflctl job create` reported it.
#[derive(Debug, Clone)]
pub struct CreatedJob {
    /// Job id.
    pub id: u32,
    /// The secret its trainers join rounds with.
    pub trainer_token: String,
}

impl ControlPlaneProcess {
    /// Starts one and waits for the address it prints first.
    pub fn start() -> anyhow::Result<Self> {
        let mut child = Command::new(binary("lifl-control-plane")?)
            .args(["--store", ":memory:", "--listen", "127.0.0.1:0"])
            .env("LIFL_LOG", log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn lifl-control-plane")?;
        let stdout = forward_lines(child.stdout.take().expect("stdout is piped"));
        match stdout.recv_timeout(Duration::from_secs(20)) {
            Ok(address) => Ok(Self {
                child,
                address: address.trim().to_owned(),
                _stdout: stdout,
            }),
            Err(_) => {
                let _ = terminate(&mut child, Duration::from_secs(5));
                bail!("lifl-control-plane printed no address");
            }
        }
    }

    /// `host:port` it listens on.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Its address as a URL, for clients that want one.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Runs `liflctl --json <args>` against it and returns what it printed.
    pub fn liflctl(&self, args: &[&str]) -> anyhow::Result<Value> {
        liflctl(&self.address, args)
    }

    /// Creates a job from `spec` (the JSON `liflctl job create` takes).
    pub fn create_job(&self, spec: &Value) -> anyhow::Result<CreatedJob> {
        let mut file = tempfile::Builder::new().suffix(".json").tempfile()?;
        file.write_all(spec.to_string().as_bytes())?;
        self.create_job_from(file.path())
    }

    /// Creates a job from the spec file at `path`.
    pub fn create_job_from(&self, path: &Path) -> anyhow::Result<CreatedJob> {
        let path = path.to_str().context("the spec path is not UTF-8")?;
        let created = self.liflctl(&["job", "create", "-f", path])?;
        let id = created["job"]["id"]
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no job id in {created}"))?;
        let trainer_token = created["trainer_token"]
            .as_str()
            .with_context(|| format!("no trainer token in {created}"))?
            .to_owned();
        Ok(CreatedJob { id, trainer_token })
    }

    /// The job as `liflctl job get` shows it, rounds included.
    pub fn job(&self, id: u32) -> anyhow::Result<Value> {
        self.liflctl(&["job", "get", &id.to_string()])
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// Runs `liflctl --server <control_plane> --json <args>` and parses its
/// output; a non-zero exit is an error carrying what it printed on stderr.
fn liflctl(control_plane: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new(binary("liflctl")?)
        .args(["--server", control_plane, "--json"])
        .args(args)
        .env_remove("LIFL_CTL_TOKEN")
        .output()
        .context("run liflctl")?;
    if !output.status.success() {
        bail!(
            "liflctl {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("liflctl {} printed no JSON", args.join(" ")))
}

/// Runs `lifl-trainer` for `job` to its end, as the user `mode` runs
/// processes as, with `args` after the connection flags, and returns the
/// JSON lines it printed. Fails if it exits non-zero or outlives `timeout`.
pub fn run_trainers(
    mode: Mode,
    control_plane: &ControlPlaneProcess,
    job: &CreatedJob,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    let mut cmd = command_for(mode, &binary("lifl-trainer")?);
    cmd.args(["--control-plane", &control_plane.url()])
        .args(["--token", &job.trainer_token])
        .args(["--job", &job.id.to_string()])
        .args(args)
        .env("LIFL_LOG", log_filter());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn lifl-trainer")?;
    let lines = forward_lines(child.stdout.take().expect("stdout is piped"));

    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => events.push(
                serde_json::from_str(&line)
                    .with_context(|| format!("lifl-trainer printed a non-JSON line: {line}"))?,
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = terminate(&mut child, Duration::from_secs(5));
                bail!("lifl-trainer did not finish within {timeout:?}; it printed {events:?}");
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("lifl-trainer failed ({status}) after printing {events:?}");
    }
    Ok(events)
}

/// `LIFL_LOG` for the processes started here: the caller's, else `info`.
fn log_filter() -> String {
    std::env::var("LIFL_LOG").unwrap_or_else(|_| "info".into())
}

/// A running `lifl-dp-peer`: one side of a scenario, reporting JSON lines.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Peer {
    /// Starts `lifl-dp-peer <args>` against `sidecar`, as the same user.
    pub fn start(sidecar: &SidecarProcess, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_program(sidecar, "lifl-dp-peer", args)
    }

    /// Starts the workspace binary `program` with `--socket` and `args`, as
    /// the sidecar's user; it must print JSON event lines.
    pub fn start_program(
        sidecar: &SidecarProcess,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = command_for(sidecar.mode(), &binary(program)?);
        cmd.arg("--socket").arg(sidecar.socket()).args(args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {program}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        Ok(Self {
            child,
            stdin,
            lines: forward_lines(stdout),
        })
    }

    /// Waits for the next JSON line whose `event` is `name`.
    pub fn expect(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .map_err(|_| match self.child.try_wait() {
                    Ok(Some(status)) => anyhow!("peer exited ({status}) before `{name}`"),
                    _ => anyhow!("no `{name}` from the peer within {timeout:?}"),
                })?;
            let value: Value = serde_json::from_str(&line)
                .with_context(|| format!("peer printed a non-JSON line: {line}"))?;
            if value["event"] == name {
                return Ok(value);
            }
            if value["event"] == "error" {
                bail!("peer failed: {}", value["message"]);
            }
        }
    }

    /// Closes its stdin, which tells it to exit, and waits for it.
    pub fn finish(mut self) -> anyhow::Result<ExitStatus> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("peer did not exit after its stdin closed");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL)?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn forward_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Prints one JSON event line on stdout and flushes it; for peer programs.
pub fn emit(event: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

/// Runs a future to completion on a fresh current-thread runtime.
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(future)
}

/// The payload a sender writes for sequence number `seq`: `len` bytes that
/// differ for every `seq`, so a receiver can check every byte.
pub fn fill_payload(seq: u64, out: &mut [u8]) {
    let mut words = XorShift::new(seq);
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&words.next_u64().to_le_bytes()[..chunk.len()]);
    }
}

/// xorshift64: cheap, deterministic, and no two seeds share a stream.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Whether `bytes` is exactly the payload of `seq`.
pub fn payload_matches(seq: u64, bytes: &[u8]) -> bool {
    let mut expected = vec![0u8; bytes.len()];
    fill_payload(seq, &mut expected);
    expected == bytes
}

/// Percentiles of one-way latency, from measured round trips.
#[derive(Debug)]
pub struct LatencySummary;

impl LatencySummary {
    /// p50, p99 and mean of half of each round trip, in microseconds.
    pub fn one_way(rtts: &mut [Duration]) -> Value {
        if rtts.is_empty() {
            return Value::Null;
        }
        rtts.sort_unstable();
        let us = |d: Duration| d.as_secs_f64() * 1e6 / 2.0;
        let at = |q: f64| us(rtts[((rtts.len() - 1) as f64 * q).round() as usize]);
        let mean = rtts.iter().map(|&d| us(d)).sum::<f64>() / rtts.len() as f64;
        serde_json::json!({
            "samples": rtts.len(),
            "p50_us": at(0.50),
            "p99_us": at(0.99),
            "mean_us": mean,
        })
    }
}

/// The model update trainer `k` sends in the aggregation scenarios: `params`
/// values in [-1, 1), different for every `k`.
pub fn update_values(k: u64, params: usize) -> Vec<f32> {
    let mut words = XorShift::new(k);
    (0..params)
        .map(|_| (words.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect()
}

/// The sample count behind trainer `k`'s update: uneven on purpose, so a
/// plain mean and the weighted one differ.
pub fn update_samples(k: u64) -> u64 {
    10 + (k * 37) % 91
}

/// The sample-weighted average of `updates` (values, samples), in `f64`
/// straight from the definition: what any tree of aggregators must publish.
pub fn weighted_average(updates: &[(Vec<f32>, u64)]) -> Vec<f64> {
    let total: u64 = updates.iter().map(|(_, samples)| samples).sum();
    let params = updates.first().map_or(0, |(values, _)| values.len());
    let mut mean = vec![0.0f64; params];
    for (values, samples) in updates {
        let weight = *samples as f64 / total as f64;
        for (m, &v) in mean.iter_mut().zip(values) {
            *m += weight * f64::from(v);
        }
    }
    mean
}

/// Max-norm relative distance between a model and a reference: infinite
/// when their lengths differ, NaN when the model holds a NaN (so that
/// `error < bound` fails).
pub fn relative_error(model: &[f32], reference: &[f64]) -> f64 {
    if model.len() != reference.len() {
        return f64::INFINITY;
    }
    let scale = reference.iter().fold(0.0f64, |m, r| m.max(r.abs()));
    // `f64::max` would skip a NaN; keep it instead.
    let worst = model.iter().zip(reference).fold(0.0f64, |m, (&x, &r)| {
        let d = (f64::from(x) - r).abs();
        if d.is_nan() || d > m {
            d
        } else {
            m
        }
    });
    worst / scale
}

/// `values` as the little-endian bytes models travel and are stored as.
pub fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The FedAvg fold's throughput on one core, folding `updates` updates of
/// `params` values 1, 2, 4 and 8 per pass, beside a memcpy of the same
/// bytes measured in the same run (best of `reps` each), as JSON:
/// `{"memcpy_gbps", "fold": [{"updates_per_pass", "fold_gbps", "vs_memcpy"}]}`.
pub fn measure_fold(params: usize, updates: usize, reps: usize) -> Value {
    use std::hint::black_box;

    let best_secs = |reps: usize, f: &mut dyn FnMut()| {
        (0..reps.max(1))
            .map(|_| {
                let started = std::time::Instant::now();
                f();
                started.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let updates: Vec<Vec<f32>> = (0..updates.max(1))
        .map(|k| update_values(k as u64, params))
        .collect();
    let update_bytes = (params * 4) as f64;

    // The baseline: copy one update's bytes into memory already touched,
    // rotating over sources and targets of 64 MiB or more each, twice the
    // last-level cache of these machines, so that the copy streams from
    // memory to memory as the fold does.
    let targets = (64usize << 20).div_ceil(params * 4).max(2);
    let mut copies = vec![vec![0f32; params]; targets];
    let mut which = 0;
    // Timed like a fold, over every update and best of as many tries: a
    // noisy machine's quiet moments should favour neither side.
    let memcpy = best_secs(reps, &mut || {
        for update in &updates {
            let target = &mut copies[which % targets];
            target.copy_from_slice(black_box(update));
            black_box(target);
            which += 1;
        }
    });
    let memcpy_gbps = update_bytes * updates.len() as f64 / memcpy / 1e9;

    let mut acc = lifl_sdk::fedavg::Accumulator::new(params);
    let mut results = Vec::new();
    for per_pass in [1usize, 2, 4, 8] {
        let secs = best_secs(reps, &mut || {
            acc.reset();
            for chunk in updates.chunks(per_pass) {
                let batch: Vec<(&[f32], u64)> = chunk.iter().map(|u| (u.as_slice(), 10)).collect();
                acc.fold(&batch).expect("updates match the model");
            }
            black_box(&acc);
        });
        let fold_gbps = update_bytes * updates.len() as f64 / secs / 1e9;
        results.push(serde_json::json!({
            "updates_per_pass": per_pass,
            "fold_gbps": fold_gbps,
            "vs_memcpy": fold_gbps / memcpy_gbps,
        }));
    }
    serde_json::json!({"memcpy_gbps": memcpy_gbps, "fold": results})
}
