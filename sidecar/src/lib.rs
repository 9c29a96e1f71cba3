//! The lifl sidecar: the per-node daemon that owns each job's shared-memory
//! arena and moves descriptors between the node's endpoints.
//!
//! Start-up is four named steps, each in [`run`]: pick the data path (load
//! and attach the SK_MSG router, or fall back to user space), bind the
//! registration socket (and, as a node of a control plane, the trainers'
//! gateway), announce readiness, serve until SIGTERM or SIGINT.
//!
//! Given a control plane, the sidecar is a node of it: the [`agent`]
//! registers, follows the node's round assignments and starts aggregators
//! through a [`launcher`], and the [`gateway`] takes trainers' updates into
//! the arena and serves the global model.

pub mod agent;
pub mod arena;
pub mod bpf;
pub mod config;
pub mod gateway;
pub mod launcher;
pub mod node;
pub mod routes;
pub mod server;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use lifl_proto::v1::gateway_service_server::GatewayServiceServer;
use lifl_proto::v1::NodeCapacity;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::agent::AgentConfig;
use crate::bpf::SkMsgRouter;
use crate::config::{Config, DataplaneChoice};
use crate::gateway::{Gateway, GatewayConfig, GatewayServer};
use crate::launcher::{Launcher, ProcessLauncher};
use crate::node::{Node, NodeConfig};
use crate::routes::{Dataplane, KernelRoutes, Routes, UserRoutes};

/// Sockets the kernel's maps hold (`LIFL_MAX_ENDPOINTS` in `lifl.h`).
const KERNEL_MAX_ENDPOINTS: usize = 4096;

/// Largest gateway message: a chunk of an update, with room to spare.
const GATEWAY_MAX_MESSAGE_BYTES: usize = 16 << 20;

/// How often references stranded by a departed endpoint are looked for.
const ORPHAN_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Runs the sidecar until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let routes = open_dataplane(&config)?;
    tracing::info!("dataplane={}", routes.dataplane().as_str());
    let node = Arc::new(Node::new(node_config(&config, routes.dataplane()), routes));

    let listener = bind(&config.socket, config.socket_group.as_deref())?;
    tracing::info!(socket = %config.socket.display(), "serving registrations");
    let as_node = match &config.control_plane {
        Some(url) => Some(node_setup(&config, url).await?),
        None => None,
    };
    // Handlers first: whoever is told "ready" may send SIGTERM at once.
    let stop = stop_signal()?;
    notify_ready();

    let shutdown = CancellationToken::new();
    tokio::spawn(sweep_orphans(node.clone(), shutdown.clone()));
    let server = tokio::spawn(server::serve(node.clone(), listener, shutdown.clone()));
    let mut node_tasks = Vec::new();
    if let Some(setup) = as_node {
        node_tasks = setup.start(&config, node, shutdown.clone());
    }

    stop.await;
    tracing::info!("shutting down");
    shutdown.cancel();
    for task in node_tasks {
        let _ = task.await;
    }
    let _ = server.await;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// What serving as a node needs bound before readiness.
struct NodeSetup {
    agent: AgentConfig,
    gateway_listener: TcpListener,
    launcher: Arc<dyn Launcher>,
}

/// Binds the gateway and settles who the node is.
async fn node_setup(config: &Config, control_plane: &str) -> anyhow::Result<NodeSetup> {
    let gateway_listener = TcpListener::bind(config.gateway_listen)
        .await
        .with_context(|| format!("bind the gateway on {}", config.gateway_listen))?;
    let gateway_address = match &config.gateway_address {
        Some(address) => address.clone(),
        None if config.gateway_listen.ip().is_unspecified() => bail!(
            "the gateway listens on {}: say with --gateway-address where trainers reach it",
            config.gateway_listen
        ),
        None => gateway_listener.local_addr()?.to_string(),
    };
    let node_id = match &config.node_id {
        Some(id) => id.clone(),
        None => nix::unistd::gethostname()
            .context("read the host name for the node id")?
            .to_string_lossy()
            .into_owned(),
    };
    let program = match &config.aggregator {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("find this executable")?
            .with_file_name("lifl-aggregator"),
    };
    if !program.exists() {
        bail!(
            "no aggregator executable at {}; set --aggregator",
            program.display()
        );
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    tracing::info!(
        node = %node_id,
        control_plane,
        gateway = %gateway_address,
        aggregator = %program.display(),
        "serving as a node"
    );
    Ok(NodeSetup {
        agent: AgentConfig {
            control_plane: control_plane.to_owned(),
            token: config.admin_token.clone().filter(|t| !t.is_empty()),
            node_id,
            capacity: NodeCapacity {
                cores,
                arena_bytes: config.arena_bytes,
            },
            gateway_address,
            peer_address: config.peer_address.clone(),
            checkpoint_dir: config.checkpoint_dir.clone(),
        },
        gateway_listener,
        launcher: Arc::new(ProcessLauncher {
            program,
            socket: config.socket.clone(),
            admin_token: config.admin_token.clone().filter(|t| !t.is_empty()),
        }),
    })
}

impl NodeSetup {
    /// Serves the gateway and follows the control plane until `shutdown`.
    fn start(
        self,
        config: &Config,
        node: Arc<Node>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let gateway_config = GatewayConfig {
            model_linger: Duration::from_secs(config.model_linger_secs),
            fetch_transfer: Duration::from_secs(config.fetch_transfer_secs),
            ..GatewayConfig::default()
        };
        let gateway = Gateway::new(config.socket.clone(), node, gateway_config);
        let service = GatewayServiceServer::new(GatewayServer::new(gateway.clone()))
            .max_decoding_message_size(GATEWAY_MAX_MESSAGE_BYTES);
        let incoming = TcpListenerStream::new(self.gateway_listener);
        let stopped = shutdown.clone();
        let serve = tokio::spawn(async move {
            // Keep-alives find trainers that vanished without a word, so
            // their pushes end and give their buffers back.
            let served = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .tcp_keepalive(Some(Duration::from_secs(60)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stopped.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "gateway stopped");
            }
        });
        let follow = tokio::spawn({
            let gateway = gateway.clone();
            async move {
                agent::run(self.agent, gateway.clone(), self.launcher, shutdown).await;
                gateway.close();
            }
        });
        vec![serve, follow]
    }
}

fn node_config(config: &Config, dataplane: Dataplane) -> NodeConfig {
    let max_endpoints = match dataplane {
        // The kernel's maps hold this many sockets and no more.
        Dataplane::SkMsg => config.max_endpoints.min(KERNEL_MAX_ENDPOINTS),
        Dataplane::Userspace => config.max_endpoints,
    };
    NodeConfig {
        arena_bytes: config.arena_bytes,
        endpoint_credit: config.endpoint_credit,
        max_refs: config.max_refs,
        hugepages: !config.no_hugepages,
        max_endpoints,
        max_jobs: config.max_jobs,
    }
}

/// Loads the kernel router, or chooses user space as configured.
fn open_dataplane(config: &Config) -> anyhow::Result<Box<dyn Routes>> {
    if config.dataplane == DataplaneChoice::Userspace {
        return Ok(Box::new(UserRoutes::default()));
    }
    match SkMsgRouter::load(config.max_refs) {
        Ok(router) => {
            tracing::info!("sk_msg router attached");
            Ok(Box::new(KernelRoutes::new(router)))
        }
        Err(err) if config.dataplane == DataplaneChoice::Auto && err.is_permission() => {
            tracing::warn!(%err, "no CAP_BPF/CAP_NET_ADMIN; routing descriptors in user space");
            Ok(Box::new(UserRoutes::default()))
        }
        Err(err) => Err(err).context("load the sk_msg router"),
    }
}

/// Binds the registration socket with mode 0660 (and `group`, if given),
/// replacing a stale one.
fn bind(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is served by a running sidecar", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    if let Some(name) = group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("look up group {name}"))?
            .with_context(|| format!("no group named {name}"))?;
        nix::unistd::chown(path, None, Some(group.gid))
            .with_context(|| format!("chgrp {name} {}", path.display()))?;
    }
    Ok(listener)
}

/// Tells systemd (`Type=notify`) that the socket is ready, when run by it.
fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let target = target.as_encoded_bytes();
        if let Some(name) = target.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(b"READY=1", &addr)?;
        } else {
            socket.send_to(b"READY=1", std::ffi::OsStr::from_bytes(target))?;
        }
        Ok(())
    })();
    if let Err(err) = sent {
        tracing::warn!(%err, "could not notify systemd of readiness");
    }
}

/// Installs the SIGTERM and SIGINT handlers; the future completes on either.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

async fn sweep_orphans(node: Arc<Node>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(ORPHAN_SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => { node.sweep_orphans(); }
        }
    }
}
