//! The sidecar's systemd unit: systemd is not PID 1 on the machines that
//! test lifl, so the unit is checked offline with `systemd-analyze`, then its
//! exact `ExecStart` runs in the foreground under a `NOTIFY_SOCKET`, as
//! systemd would run it, until it reports ready and stops on SIGTERM.

#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use lifl_integration::{bin_dir, terminate};

const UNIT: &str = "lifl-sidecar.service";

fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sidecar")
        .join(UNIT)
}

/// A file-system root holding the unit, the binary its `ExecStart` names,
/// and a copy of the machine's own units for the dependencies it pulls in.
fn unit_root(exec: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(unit_file(), units.join(UNIT)).unwrap();

    let binary = root.path().join(exec.strip_prefix("/").unwrap());
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    std::fs::copy(bin_dir().join("lifl-sidecar"), &binary).unwrap();

    let lib = root.path().join("usr/lib/systemd");
    std::fs::create_dir_all(&lib).unwrap();
    let copied = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(lib.join("system"))
        .status()
        .unwrap();
    assert!(copied.success(), "copy the machine's systemd units");
    root
}

/// `(key, value)` pairs of the `[Service]` section.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut settings = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((key, value)) = line.split_once('=') {
                settings.push((key.to_owned(), value.to_owned()));
            }
        }
    }
    settings
}

#[test]
fn unit_verifies_cleanly_and_its_exec_start_serves_until_sigterm() {
    let unit = std::fs::read_to_string(unit_file()).unwrap();
    let settings = service_settings(&unit);
    let exec_start = settings
        .iter()
        .find(|(k, _)| k == "ExecStart")
        .unwrap()
        .1
        .clone();
    let argv: Vec<&str> = exec_start.split_whitespace().collect();
    let root = unit_root(Path::new(argv[0]));

    // Offline verification: any output at all (unknown keys warn) fails.
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.path().display()))
        .arg(format!("/etc/systemd/system/{UNIT}"))
        .output()
        .expect("systemd-analyze is installed (`just deps`)");
    let said = String::from_utf8_lossy(&verify.stderr).to_string()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );

    // The hardening holds up: systemd rates the exposure "OK" or better.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(format!("--root={}", root.path().display()))
        .arg(UNIT)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for lifl-sidecar.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{report}"));
    assert!(exposure <= 3.0, "exposure {exposure} above 3.0:\n{report}");

    // The exact command line, with the unit's environment; only the socket
    // moves to a private directory, and readiness comes over NOTIFY_SOCKET.
    let run = tempfile::tempdir().unwrap();
    let notify_path = run.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = Command::new(root.path().join(argv[0].trim_start_matches('/')));
    cmd.args(&argv[1..]);
    for (_, value) in settings.iter().filter(|(k, _)| k == "Environment") {
        let (name, value) = value.split_once('=').unwrap();
        cmd.env(name, value);
    }
    cmd.env("LIFL_SIDECAR_SOCKET", run.path().join("sidecar.sock"));
    cmd.env("LIFL_SIDECAR_ARENA_BYTES", "16MiB");
    cmd.env("NOTIFY_SOCKET", &notify_path);
    let mut child = cmd.stdin(Stdio::null()).spawn().unwrap();

    let mut message = [0u8; 256];
    let n = notify.recv(&mut message).expect("READY=1 within 20 s");
    assert_eq!(&message[..n], b"READY=1");
    assert!(run.path().join("sidecar.sock").exists());

    let status = terminate(&mut child, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop");
    assert!(
        !run.path().join("sidecar.sock").exists(),
        "the socket is removed on stop"
    );
}
