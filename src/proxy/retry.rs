//! Every retry decision of the request path, in one place: how many tries a route
//! allows, which outcomes are tried again (a status the route names; a failed connect,
//! always; a failure after the request was sent, only for methods that may be sent twice
//! or routes that allow it), whether the body can be replayed, and the gateway-wide budget
//! that caps retries at a share of the requests in flight.
//!
//! (A request that may be sent twice and finds its pooled connection closed before a byte
//! came back goes again on the next connection: that is the HTTP/1.1 pool reusing
//! connections, [`crate::http1::pool`], not a retry, and it costs no budget.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};

use crate::http1::fields::is_idempotent;
use crate::routing::spec::RetrySpec;

/// The retry decisions of one request.
pub struct Retries<'a> {
    spec: &'a RetrySpec,
    /// The request may be sent twice: an idempotent method, or a route that allows it.
    may_resend: bool,
    budget: &'a RetryBudget,
    active: Active<'a>,
    route: &'a str,
    /// Tries started.
    tries: u32,
}

impl<'a> Retries<'a> {
    pub fn new(
        spec: &'a RetrySpec,
        method: &Method,
        budget: &'a RetryBudget,
        route: &'a str,
    ) -> Retries<'a> {
        Retries {
            spec,
            may_resend: is_idempotent(method) || spec.non_idempotent,
            active: budget.enter(),
            budget,
            route,
            tries: 0,
        }
    }

    /// Whether the request may be tried more than once (so a small body is worth keeping
    /// for a replay).
    pub fn may_retry(&self) -> bool {
        self.spec.attempts > 0 && self.may_resend
    }

    /// Whether another try may start: the first always; a retry when the route has tries
    /// left, the body can be sent again, and the budget allows one (then counted).
    pub fn start_try(&mut self, replayable: bool) -> bool {
        if self.tries > 0 {
            if self.tries > self.spec.attempts
                || !replayable
                || !self.budget.try_retry(&mut self.active)
            {
                return false;
            }
            metrics::counter!(crate::metrics::RETRIES, "route" => self.route.to_string())
                .increment(1);
        }
        self.tries += 1;
        true
    }

    /// Whether the route counts this status as a failed try.
    pub fn names_status(&self, status: StatusCode) -> bool {
        self.spec.on_status.contains(&status.as_u16())
    }

    /// Whether an answer with a status the route names is dropped for another try rather
    /// than returned: not on the last try, only with a body that can be sent again, and
    /// only if the request may be sent twice (the instance answered: it may have acted).
    pub fn retries_status(&self, status: StatusCode, replayable: bool) -> bool {
        self.names_status(status)
            && self.may_resend
            && self.tries <= self.spec.attempts
            && replayable
    }

    /// Whether a try that failed may be followed by another: after a failed connect
    /// (nothing was sent) always, else only if the request may be sent twice.
    pub fn retries_failure(&self, connect: bool) -> bool {
        connect || self.may_resend
    }
}

/// Retries may be at most `percent` of the requests in flight (but always at least
/// [`RetryBudget::MIN_RETRIES`] concurrent ones), so a failing service sees at most that
/// much extra load from retries instead of a multiple of it.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    active: AtomicU64,
    retries: Arc<AtomicU64>,
}

/// Counts one request as active while held.
pub struct Active<'a>(&'a RetryBudget, u64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        if self.1 > 0 {
            self.0.retries.fetch_sub(self.1, Ordering::Relaxed);
        }
    }
}

impl RetryBudget {
    pub const MIN_RETRIES: u64 = 10;

    pub fn new(percent: u32) -> RetryBudget {
        RetryBudget {
            percent: percent as u64,
            active: AtomicU64::new(0),
            retries: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn enter(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self, 0)
    }

    /// Takes a retry from the budget; false when the budget is spent.
    pub fn try_retry(&self, active: &mut Active<'_>) -> bool {
        let allowed =
            (self.active.load(Ordering::Relaxed) * self.percent / 100).max(Self::MIN_RETRIES);
        let now = self.retries.fetch_add(1, Ordering::Relaxed);
        if now >= allowed {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::RETRY_BUDGET_EXHAUSTED).increment(1);
            return false;
        }
        active.1 += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_gets_its_attempts_and_no_more() {
        let budget = RetryBudget::new(100);
        let spec = RetrySpec {
            attempts: 2,
            on_status: vec![503],
            non_idempotent: false,
        };
        let mut get = Retries::new(&spec, &Method::GET, &budget, "r");
        assert!(get.may_retry());
        let started = (0..5).take_while(|_| get.start_try(true)).count();
        assert_eq!(started, 3, "the first try and two retries");

        let mut post = Retries::new(&spec, &Method::POST, &budget, "r");
        assert!(!post.may_retry());
        assert!(post.start_try(true));
        assert!(post.retries_failure(true), "nothing was sent");
        assert!(
            !post.retries_failure(false),
            "a POST may have been acted on"
        );
        assert!(
            !post.retries_status(StatusCode::SERVICE_UNAVAILABLE, true),
            "an answered POST was acted on, whatever its status"
        );

        let mut get = Retries::new(&spec, &Method::GET, &budget, "r");
        assert!(get.start_try(true));
        assert!(get.retries_status(StatusCode::SERVICE_UNAVAILABLE, true));
        assert!(!get.retries_status(StatusCode::SERVICE_UNAVAILABLE, false));
        assert!(
            !get.retries_status(StatusCode::BAD_GATEWAY, true),
            "not named"
        );
        assert!(get.start_try(true) && get.start_try(true));
        assert!(
            !get.retries_status(StatusCode::SERVICE_UNAVAILABLE, true),
            "the last try's answer is returned"
        );
        assert!(!get.start_try(true), "no tries left");
    }

    #[test]
    fn a_streamed_body_is_tried_once() {
        let budget = RetryBudget::new(100);
        let spec = RetrySpec::default();
        let mut put = Retries::new(&spec, &Method::PUT, &budget, "r");
        assert!(put.start_try(false));
        assert!(!put.start_try(false));
    }
    #[test]
    fn the_retry_budget_caps_concurrent_retries() {
        let budget = RetryBudget::new(20);
        let mut guards: Vec<Active<'_>> = (0..10).map(|_| budget.enter()).collect();
        let granted = guards
            .iter_mut()
            .map(|g| budget.try_retry(g))
            .filter(|ok| *ok)
            .count();
        assert_eq!(granted, 10, "the minimum of 10 with 10 active at 20%");
        drop(guards);
        let mut guards: Vec<Active<'_>> = (0..100).map(|_| budget.enter()).collect();
        // 20% of 100 active.
        let granted = guards
            .iter_mut()
            .map(|g| budget.try_retry(g))
            .filter(|ok| *ok)
            .count();
        assert_eq!(granted, 20);
        drop(guards);
        assert_eq!(
            budget.retries.load(Ordering::Relaxed),
            0,
            "released with requests"
        );
    }
}
