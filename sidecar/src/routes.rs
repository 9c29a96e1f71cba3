//! The routing state the data path consults: which endpoint owns which
//! socket and job, and who holds each buffer reference.
//!
//! With the SK_MSG router it lives in BPF maps, where the kernel reads it on
//! every send and moves a reference's holder when it redirects a descriptor.
//! In user space it lives in this process. The [`Routes`] trait is the seam
//! between the two: the node logic is written once against it, and unit tests
//! drive it through [`UserRoutes`] without privileges.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;

use lifl_proto::descriptor::{EndpointEntry, RefEntry, RouteStats, SenderEntry};

use crate::bpf::{BpfError, Map, SkMsgRouter};

/// Which data path moves descriptors on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dataplane {
    /// The kernel redirects descriptors between sockets.
    SkMsg,
    /// The sidecar reads every descriptor and writes it to its destination.
    Userspace,
}

impl Dataplane {
    /// The name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SkMsg => "sk_msg",
            Self::Userspace => "userspace",
        }
    }
}

/// The routing state of one node.
pub trait Routes: Send + Sync {
    /// Which data path this state feeds.
    fn dataplane(&self) -> Dataplane;

    /// Makes an endpoint routable: its id, job and client socket.
    fn add_endpoint(
        &self,
        endpoint: u32,
        job: u32,
        client_port: u16,
        client: BorrowedFd<'_>,
    ) -> Result<(), BpfError>;

    /// Makes an endpoint unroutable; later sends to it fall to the sidecar.
    fn remove_endpoint(&self, endpoint: u32, client_port: u16) -> Result<(), BpfError>;

    /// Writes a ref slot (issue, holder change, or release with a zero holder).
    fn set_ref(&self, slot: u32, entry: RefEntry) -> Result<(), BpfError>;

    /// Reads a ref slot.
    fn get_ref(&self, slot: u32) -> Result<RefEntry, BpfError>;

    /// What the kernel did for descriptors `endpoint` sent (zero in user space).
    fn route_stats(&self, endpoint: u32) -> Result<RouteStats, BpfError>;

    /// Endpoint ids whose sockets the kernel can route to right now.
    fn socket_endpoints(&self) -> Result<Vec<u32>, BpfError>;
}

/// Routing state in the SK_MSG router's maps.
#[derive(Debug)]
pub struct KernelRoutes {
    router: SkMsgRouter,
}

impl KernelRoutes {
    /// Wraps an attached router.
    pub fn new(router: SkMsgRouter) -> Self {
        Self { router }
    }

    fn write_endpoint(
        &self,
        endpoint: u32,
        job: u32,
        client_port: u16,
        client: BorrowedFd<'_>,
    ) -> Result<(), BpfError> {
        let r = &self.router;
        r.zero_percpu(Map::RouteStats, &endpoint)?;
        let sender = SenderEntry { endpoint, job };
        r.update(Map::SenderPorts, &u32::from(client_port), &sender)?;
        r.update(Map::Endpoints, &endpoint, &EndpointEntry { job, flags: 0 })?;
        r.insert_socket(endpoint, client)
    }
}

impl Routes for KernelRoutes {
    fn dataplane(&self) -> Dataplane {
        Dataplane::SkMsg
    }

    fn add_endpoint(
        &self,
        endpoint: u32,
        job: u32,
        client_port: u16,
        client: BorrowedFd<'_>,
    ) -> Result<(), BpfError> {
        // Counters and identity first, the socket last: once the socket is in
        // the map the program runs on its sends and must find both. A partial
        // failure (a full map) takes back what was written.
        let added = self.write_endpoint(endpoint, job, client_port, client);
        if added.is_err() {
            let _ = self.remove_endpoint(endpoint, client_port);
        }
        added
    }

    fn remove_endpoint(&self, endpoint: u32, client_port: u16) -> Result<(), BpfError> {
        // The socket first, so no redirect can reach the endpoint while its
        // references are being released.
        let r = &self.router;
        r.remove_socket(endpoint)?;
        r.delete(Map::Endpoints, &endpoint)?;
        r.delete(Map::SenderPorts, &u32::from(client_port))?;
        r.delete(Map::RouteStats, &endpoint)
    }

    fn set_ref(&self, slot: u32, entry: RefEntry) -> Result<(), BpfError> {
        self.router.update(Map::Refs, &slot, &entry)
    }

    fn get_ref(&self, slot: u32) -> Result<RefEntry, BpfError> {
        Ok(self.router.lookup(Map::Refs, &slot)?.unwrap_or_default())
    }

    fn route_stats(&self, endpoint: u32) -> Result<RouteStats, BpfError> {
        Ok(self
            .router
            .lookup_percpu_sum(Map::RouteStats, &endpoint)?
            .unwrap_or_default())
    }

    fn socket_endpoints(&self) -> Result<Vec<u32>, BpfError> {
        self.router.socket_endpoints()
    }
}

/// Routing state kept in this process, for the user-space data path.
#[derive(Debug, Default)]
pub struct UserRoutes {
    refs: std::sync::Mutex<HashMap<u32, RefEntry>>,
}

impl Routes for UserRoutes {
    fn dataplane(&self) -> Dataplane {
        Dataplane::Userspace
    }

    fn add_endpoint(&self, _: u32, _: u32, _: u16, _: BorrowedFd<'_>) -> Result<(), BpfError> {
        Ok(())
    }

    fn remove_endpoint(&self, _: u32, _: u16) -> Result<(), BpfError> {
        Ok(())
    }

    fn set_ref(&self, slot: u32, entry: RefEntry) -> Result<(), BpfError> {
        let mut refs = self.refs.lock().unwrap_or_else(|e| e.into_inner());
        if entry.holder == 0 {
            refs.remove(&slot);
        } else {
            refs.insert(slot, entry);
        }
        Ok(())
    }

    fn get_ref(&self, slot: u32) -> Result<RefEntry, BpfError> {
        let refs = self.refs.lock().unwrap_or_else(|e| e.into_inner());
        Ok(refs.get(&slot).copied().unwrap_or_default())
    }

    fn route_stats(&self, _: u32) -> Result<RouteStats, BpfError> {
        Ok(RouteStats::default())
    }

    fn socket_endpoints(&self) -> Result<Vec<u32>, BpfError> {
        Ok(Vec::new())
    }
}
