//! The sidecar's settings: flags, each with an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default path of the registration socket.
pub const DEFAULT_SOCKET: &str = "/run/lifl/sidecar.sock";
/// Default size of each job's arena: room for ten ResNet-18 updates.
pub const DEFAULT_ARENA_BYTES: u64 = 512 << 20;
/// Default live references one endpoint may have allocated.
pub const DEFAULT_ENDPOINT_CREDIT: u64 = 4096;
/// Default size of the ref table.
pub const DEFAULT_MAX_REFS: u32 = 65536;

/// Which data path to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneChoice {
    /// The kernel path when privileges allow, user space otherwise.
    Auto,
    /// The kernel path or nothing: start-up fails without it.
    SkMsg,
    /// User-space routing, even with privileges.
    Userspace,
}

/// `lifl-sidecar`: the per-node lifl daemon.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lifl-sidecar", version, about)]
pub struct Config {
    /// Path of the registration socket (created with mode 0660).
    #[arg(long, env = "LIFL_SIDECAR_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Group that owns the registration socket, so its members may register
    /// endpoints (mode 0660); the sidecar's own group when unset.
    #[arg(long, env = "LIFL_SIDECAR_SOCKET_GROUP")]
    pub socket_group: Option<String>,

    /// Size of each job's shared-memory arena, e.g. `1GiB`, `512MiB`, `4096`.
    #[arg(
        long,
        env = "LIFL_SIDECAR_ARENA_BYTES",
        default_value = "512MiB",
        value_parser = parse_bytes
    )]
    pub arena_bytes: u64,

    /// Data path: `auto`, `sk-msg` or `userspace`.
    #[arg(
        long,
        env = "LIFL_SIDECAR_DATAPLANE",
        value_enum,
        default_value = "auto"
    )]
    pub dataplane: DataplaneChoice,

    /// Live buffer references one endpoint may have allocated at once.
    #[arg(long, env = "LIFL_SIDECAR_ENDPOINT_CREDIT", default_value_t = DEFAULT_ENDPOINT_CREDIT)]
    pub endpoint_credit: u64,

    /// Slots in the reference table: the most references alive on the node.
    #[arg(long, env = "LIFL_SIDECAR_MAX_REFS", default_value_t = DEFAULT_MAX_REFS)]
    pub max_refs: u32,

    /// Most endpoints registered at once (at most 4096 on the kernel path,
    /// the size of its maps).
    #[arg(long, env = "LIFL_SIDECAR_MAX_ENDPOINTS", default_value_t = 4096)]
    pub max_endpoints: usize,

    /// Most jobs with an arena on this node at once.
    #[arg(long, env = "LIFL_SIDECAR_MAX_JOBS", default_value_t = 8)]
    pub max_jobs: usize,

    /// Never back arenas with hugepages, even when some are free.
    #[arg(long, env = "LIFL_SIDECAR_NO_HUGEPAGES")]
    pub no_hugepages: bool,

    /// The control plane to serve as a node of, e.g. `http://10.0.0.2:7400`.
    /// Without it the sidecar only moves descriptors between endpoints that
    /// register themselves: no gateway, no aggregators of its own.
    #[arg(long, env = "LIFL_SIDECAR_CONTROL_PLANE")]
    pub control_plane: Option<String>,

    /// The control plane's admin token, if it has one; also handed to top
    /// aggregators to report their rounds.
    #[arg(long, env = "LIFL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// This node's id in the control plane (default: the host name).
    #[arg(long, env = "LIFL_SIDECAR_NODE_ID")]
    pub node_id: Option<String>,

    /// Where the trainer-facing gateway listens.
    #[arg(
        long,
        env = "LIFL_SIDECAR_GATEWAY_LISTEN",
        default_value = "127.0.0.1:7401"
    )]
    pub gateway_listen: SocketAddr,

    /// `host:port` trainers are told to reach the gateway at (default: the
    /// listen address, which must then not be a wildcard).
    #[arg(long, env = "LIFL_SIDECAR_GATEWAY_ADDRESS")]
    pub gateway_address: Option<String>,

    /// `host:port` announced for forwarding between nodes.
    #[arg(
        long,
        env = "LIFL_SIDECAR_PEER_ADDRESS",
        default_value = "127.0.0.1:7402"
    )]
    pub peer_address: String,

    /// The `lifl-aggregator` executable (default: beside this one).
    #[arg(long, env = "LIFL_SIDECAR_AGGREGATOR")]
    pub aggregator: Option<PathBuf>,

    /// Seconds an ended job's last model stays available to trainers (and
    /// its arena stays allocated) before the gateway lets the job go.
    #[arg(long, env = "LIFL_SIDECAR_MODEL_LINGER_SECS", default_value_t = 600)]
    pub model_linger_secs: u64,

    /// Seconds a model download may take from header to last byte; a slower
    /// reader is cut off with DEADLINE_EXCEEDED, so that it cannot keep an
    /// old model's buffer in the arena by not reading.
    #[arg(
        long,
        env = "LIFL_SIDECAR_FETCH_TRANSFER_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub fetch_transfer_secs: u64,

    /// Where top aggregators write each round's model checkpoint.
    #[arg(
        long,
        env = "LIFL_SIDECAR_CHECKPOINT_DIR",
        default_value = "/var/lib/lifl/checkpoints"
    )]
    pub checkpoint_dir: PathBuf,
}

/// Parses a byte count with an optional binary suffix (`KiB`, `MiB`, `GiB`).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a byte count"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        other => return Err(format!("unknown unit `{other}`; use KiB, MiB or GiB")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert!(parse_bytes("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn a_download_gets_at_least_a_second() {
        use clap::Parser;
        let parse =
            |secs: &str| Config::try_parse_from(["lifl-sidecar", "--fetch-transfer-secs", secs]);
        assert_eq!(parse("1").unwrap().fetch_transfer_secs, 1);
        let err = parse("0").unwrap_err().to_string();
        assert!(err.contains("--fetch-transfer-secs"), "{err}");
    }
}
