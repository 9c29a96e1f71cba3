//! Assembles a running control plane: opens the store, loads the
//! coordinator, binds the listener, and serves the lifl services with gRPC
//! health and reflection until shut down.
//!
//! Shutdown is one [`CancellationToken`]: cancelling it marks every service
//! NOT_SERVING, ends every server stream, stops housekeeping, and lets
//! in-flight unary calls finish before [`RunningServer::wait`] returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lifl_proto::v1::job_service_server::JobServiceServer;
use lifl_proto::v1::node_service_server::NodeServiceServer;
use lifl_proto::v1::round_service_server::RoundServiceServer;
use lifl_proto::v1::FILE_DESCRIPTOR_SET;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::info;

use crate::auth::Auth;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::grpc::{JobsGrpc, NodesGrpc, RoundsGrpc};
use crate::store::{MemoryStore, RedbStore, Store, StoreError};

/// Where state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A redb file, created if missing.
    File(PathBuf),
    /// Memory only; lost on exit.
    Memory,
}

/// Everything a control plane needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Where state lives.
    pub store: StoreLocation,
    /// The admin token; `None` turns auth off.
    pub admin_token: Option<String>,
    /// How often nodes must send heartbeats.
    pub heartbeat_interval: Duration,
    /// Heartbeats a node may miss before it is offline.
    pub missed_heartbeats: u32,
    /// Time past a round's deadline before its job fails.
    pub round_grace: Duration,
}

impl ServerConfig {
    /// Defaults for everything but the address and the store.
    pub fn new(listen: SocketAddr, store: StoreLocation) -> Self {
        let defaults = CoordinatorConfig::default();
        Self {
            listen,
            store,
            admin_token: None,
            heartbeat_interval: defaults.heartbeat_interval,
            missed_heartbeats: defaults.missed_heartbeats,
            round_grace: defaults.round_grace,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened or read.
    #[error("open the store")]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not read the descriptor set.
    #[error("build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed while serving.
    #[error("serve gRPC")]
    Serve(#[from] tonic::transport::Error),
    /// The serving task died.
    #[error("server task did not finish")]
    TaskLost(#[from] tokio::task::JoinError),
}

/// A control plane serving in the background.
#[derive(Debug)]
pub struct RunningServer {
    local_addr: SocketAddr,
    /// Cancelling it starts graceful shutdown.
    shutdown: CancellationToken,
    /// The serving task; finishes once shutdown completed.
    task: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The token that starts graceful shutdown when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server stopped (after shutdown began, or on error).
    pub async fn wait(self) -> Result<(), ServerError> {
        self.task.await?
    }

    /// Starts graceful shutdown and waits for it to complete.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Opens the store, binds, and starts serving in the background.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    let store: Arc<dyn Store> = match &config.store {
        StoreLocation::File(path) => Arc::new(RedbStore::open(path)?),
        StoreLocation::Memory => Arc::new(MemoryStore::new()),
    };
    let auth = Auth::new(config.admin_token.as_deref());
    let coordinator = Coordinator::open(
        store,
        CoordinatorConfig {
            heartbeat_interval: config.heartbeat_interval,
            missed_heartbeats: config.missed_heartbeats,
            round_grace: config.round_grace,
            auth: auth.clone(),
        },
    )
    .await?;

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(listener, coordinator, shutdown.clone()));
    info!(addr = %local_addr, auth = auth.is_enabled(), "serving gRPC");
    Ok(RunningServer {
        local_addr,
        shutdown,
        task,
    })
}

/// Serves until `shutdown` is cancelled and in-flight calls finished.
async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let jobs = JobServiceServer::new(JobsGrpc::new(Arc::clone(&coordinator), shutdown.clone()));
    let nodes = NodeServiceServer::new(NodesGrpc::new(Arc::clone(&coordinator), shutdown.clone()));
    let rounds = RoundServiceServer::new(RoundsGrpc::new(Arc::clone(&coordinator)));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<JobsGrpc>>().await;
    health.set_serving::<NodeServiceServer<NodesGrpc>>().await;
    health.set_serving::<RoundServiceServer<RoundsGrpc>>().await;

    // grpcurl 1.8 speaks only v1alpha reflection; newer clients speak v1.
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let housekeeping = tokio::spawn(Arc::clone(&coordinator).run_housekeeping(shutdown.clone()));
    let stopping = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            info!("shutting down: no new calls, streams ending");
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health.set_not_serving::<JobServiceServer<JobsGrpc>>().await;
            health
                .set_not_serving::<NodeServiceServer<NodesGrpc>>()
                .await;
            health
                .set_not_serving::<RoundServiceServer<RoundsGrpc>>()
                .await;
        }
    };

    let served = Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(jobs)
        .add_service(nodes)
        .add_service(rounds)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping)
        .await;

    // Serving may also stop on an error; stop the streams and housekeeping
    // either way, so the store is released.
    shutdown.cancel();
    housekeeping.await?;
    served?;
    info!("stopped");
    Ok(())
}
