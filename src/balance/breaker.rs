//! Circuit breaking per upstream service (a route's `circuit_breaker`), as Envoy's
//! thresholds: at most `max_requests` in flight to the service from this gateway, at most
//! `max_pending` more waiting for one of them to finish; anything beyond is refused at
//! once, so a slow upstream can hold only its share of the gateway's connections and
//! memory, not all of them.
//!
//! The counters ([`ServiceLoad`]) belong to the service, are shared by every set and route
//! that sends to it and are carried across snapshots, so a route update never resets
//! them. A slot is held from admission until the answer's body is done.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::spec::BreakerSpec;

/// Requests in flight to a service and requests waiting for a slot.
#[derive(Debug, Default)]
pub struct ServiceLoad {
    active: AtomicU32,
    pending: AtomicU32,
    released: Notify,
    refused: AtomicU64,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// `max_requests` in flight and no room to wait.
    MaxRequests,
    /// `max_pending` already waiting.
    MaxPending,
    /// Waited for a slot until the route's deadline.
    WaitedTooLong,
}

impl Overflow {
    pub fn reason(self) -> &'static str {
        match self {
            Overflow::MaxRequests => "max_requests",
            Overflow::MaxPending => "max_pending",
            Overflow::WaitedTooLong => "pending_timeout",
        }
    }
}

/// A slot in flight; frees it when dropped.
#[derive(Debug)]
pub struct Admitted(Arc<ServiceLoad>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.released.notify_one();
    }
}

/// Decrements the waiting count however the wait ends (admitted, timed out, abandoned).
struct Waiting<'a>(&'a ServiceLoad);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ServiceLoad {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Requests refused by the breaker since the gateway started.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn try_enter(self: &Arc<Self>, max: u32) -> Option<Admitted> {
        let mut now = self.active.load(Ordering::Acquire);
        while now < max {
            match self.active.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Admitted(self.clone())),
                Err(seen) => now = seen,
            }
        }
        None
    }

    /// A slot for one request, waiting (within `max_pending`) until `deadline` at most.
    pub async fn admit(
        self: &Arc<Self>,
        limits: &BreakerSpec,
        deadline: Instant,
    ) -> Result<Admitted, Overflow> {
        if let Some(slot) = self.try_enter(limits.max_requests) {
            return Ok(slot);
        }
        if limits.max_pending == 0 {
            return Err(self.refuse(Overflow::MaxRequests));
        }
        let waiting = self.pending.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(self);
        if waiting >= limits.max_pending {
            return Err(self.refuse(Overflow::MaxPending));
        }
        loop {
            // Registered before the check, so a release between the two is not lost.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(slot) = self.try_enter(limits.max_requests) {
                return Ok(slot);
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(self.refuse(Overflow::WaitedTooLong));
            }
        }
    }

    fn refuse(&self, why: Overflow) -> Overflow {
        self.refused.fetch_add(1, Ordering::Relaxed);
        why
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max_requests: u32, max_pending: u32) -> BreakerSpec {
        BreakerSpec {
            max_requests,
            max_pending,
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn beyond_max_requests_without_room_to_wait_is_refused_at_once() {
        let load = Arc::new(ServiceLoad::default());
        let a = load.admit(&limits(2, 0), soon()).await.unwrap();
        let _b = load.admit(&limits(2, 0), soon()).await.unwrap();
        assert_eq!(load.active(), 2);
        let refused = load.admit(&limits(2, 0), soon()).await.unwrap_err();
        assert_eq!(refused, Overflow::MaxRequests);
        assert_eq!(load.refused(), 1);
        drop(a);
        assert_eq!(load.active(), 1);
        assert!(load.admit(&limits(2, 0), soon()).await.is_ok());
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_slot_a_finished_one_frees() {
        let load = Arc::new(ServiceLoad::default());
        let first = load.admit(&limits(1, 1), soon()).await.unwrap();
        let waiter = {
            let load = load.clone();
            tokio::spawn(async move { load.admit(&limits(1, 1), soon()).await.map(|_| ()) })
        };
        while load.pending() == 0 {
            tokio::task::yield_now().await;
        }
        // The queue is full now.
        assert_eq!(
            load.admit(&limits(1, 1), soon()).await.unwrap_err(),
            Overflow::MaxPending
        );
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!((load.active(), load.pending()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_no_longer_than_its_deadline() {
        let load = Arc::new(ServiceLoad::default());
        let _held = load.admit(&limits(1, 4), soon()).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        assert_eq!(
            load.admit(&limits(1, 4), deadline).await.unwrap_err(),
            Overflow::WaitedTooLong
        );
        assert_eq!(load.pending(), 0, "the waiter left the queue");
    }
}
