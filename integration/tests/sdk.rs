//! The SDK in this test's own process, against a real sidecar.

// Test code: a failed step should fail loudly.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use lifl_integration::{block_on, Mode, SidecarProcess};
use lifl_sdk::{Endpoint, Registration};

/// A caller that gives up on `alloc` while the sidecar is still answering
/// (a dropped future: a timeout, a cancelled request handler) must not
/// leave the granted buffer allocated until the endpoint leaves.
fn an_abandoned_allocation_is_given_back(mode: Mode) {
    if !mode.available() {
        return;
    }
    let sidecar = SidecarProcess::builder(mode).start().unwrap();
    block_on(async {
        let endpoint = Endpoint::register(Registration::new(sidecar.socket(), 7, "caller"))
            .await
            .unwrap();
        const ABANDONED: usize = 50;
        for _ in 0..ABANDONED {
            // Polled once, so the request is on its way, then dropped.
            tokio::select! {
                biased;
                _ = endpoint.alloc(4096) => panic!("answered before the first poll returned"),
                () = std::future::ready(()) => {}
            }
        }
        // A later allocation is answered after the abandoned ones.
        let kept = endpoint.alloc(4096).await.unwrap();

        let started = Instant::now();
        let buffers = loop {
            let stats = lifl_sdk::stats(sidecar.socket()).await.unwrap();
            let job = stats.jobs.iter().find(|j| j.job == 7).unwrap();
            if job.buffers <= 1 || started.elapsed() > Duration::from_secs(5) {
                break job.buffers;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(buffers, 1, "only the buffer still held stays allocated");
        drop(kept);
    });
}

#[test]
fn an_abandoned_allocation_is_given_back_on_the_kernel_path() {
    an_abandoned_allocation_is_given_back(Mode::Kernel);
}

#[test]
fn an_abandoned_allocation_is_given_back_on_the_userspace_path() {
    an_abandoned_allocation_is_given_back(Mode::Userspace);
}
