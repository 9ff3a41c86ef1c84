//! Several agent addresses for one gateway (`consul.addresses`): which one reads go to, a
//! move to the next when the active one cannot be reached, and a move back to an earlier
//! one (the local agent comes first) once it answers again.
//!
//! Requests carry the [`AgentChoice`] they were sent with; of the many watches that fail
//! together when an agent dies, only the first report moves the pool, the others see the
//! generation has changed and simply retry on the new agent.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// The agent a request goes to, and the pool generation it was chosen in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentChoice {
    pub index: usize,
    pub generation: u64,
}

#[derive(Debug)]
struct PoolState {
    active: usize,
    generation: u64,
    since: Instant,
    moves: u64,
    last_move_reason: Option<String>,
    /// Consecutive failed liveness probes of the active agent.
    probe_failures: u32,
    last_failback_probe: Option<Instant>,
}

/// The addresses, in order of preference, and the active one.
#[derive(Debug)]
pub struct AgentPool {
    addresses: Vec<String>,
    /// How often an earlier address is tried while a later one is active; `None`: stay.
    failback: Option<Duration>,
    state: Mutex<PoolState>,
}

/// What the admin API shows about the agents.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsReport {
    pub addresses: Vec<String>,
    pub active: String,
    pub active_index: usize,
    /// Seconds since the active agent became active.
    pub active_for_s: f64,
    /// Moves between agents since start.
    pub changes_total: u64,
    pub last_change_reason: Option<String>,
}

/// Consecutive failed liveness probes after which the active agent counts as down.
const PROBE_FAILURES_TO_MOVE: u32 = 2;

impl AgentPool {
    /// `addresses` must not be empty (the configuration guarantees it).
    pub fn new(addresses: Vec<String>, failback: Option<Duration>) -> AgentPool {
        let pool = AgentPool {
            addresses,
            failback,
            state: Mutex::new(PoolState {
                active: 0,
                generation: 0,
                since: Instant::now(),
                moves: 0,
                last_move_reason: None,
                probe_failures: 0,
                last_failback_probe: None,
            }),
        };
        pool.export_active(0);
        pool
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    /// The agent to send a request to now.
    pub fn current(&self) -> AgentChoice {
        let s = self.lock();
        AgentChoice {
            index: s.active,
            generation: s.generation,
        }
    }

    pub fn address(&self, index: usize) -> &str {
        self.addresses
            .get(index)
            .or(self.addresses.first())
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// A request sent with `choice` could not reach its agent. Moves to the next address
    /// (wrapping around) unless someone already moved the pool; `true` when this moved it.
    pub fn unreachable(&self, choice: AgentChoice, why: &str) -> bool {
        if self.addresses.len() < 2 {
            return false;
        }
        let next = (choice.index + 1) % self.addresses.len();
        self.move_from(choice, next, &format!("unreachable: {why}"))
    }

    /// Moves from the agent of `choice` to `to` if the pool is still where `choice` saw it.
    pub fn move_from(&self, choice: AgentChoice, to: usize, reason: &str) -> bool {
        let mut s = self.lock();
        if s.generation != choice.generation || s.active == to || to >= self.addresses.len() {
            return false;
        }
        let from = s.active;
        s.active = to;
        s.generation += 1;
        s.since = Instant::now();
        s.moves += 1;
        s.probe_failures = 0;
        s.last_move_reason = Some(reason.to_string());
        drop(s);
        let (from_addr, to_addr) = (self.address(from), self.address(to));
        if to < from {
            tracing::info!(
                from = from_addr,
                to = to_addr,
                reason,
                "consul: back to a preferred agent"
            );
        } else {
            tracing::warn!(
                from = from_addr,
                to = to_addr,
                reason,
                "consul: agent unreachable; reading from the next address"
            );
        }
        metrics::counter!(crate::metrics::CONSUL_AGENT_CHANGES,
            "from" => from_addr.to_string(), "to" => to_addr.to_string())
        .increment(1);
        self.export_active(to);
        true
    }

    /// Earlier (preferred) addresses worth probing now, best first; empty when the first
    /// is active, failback is off, or the last probe was too recent.
    pub fn failback_candidates(&self) -> (AgentChoice, Vec<usize>) {
        let mut s = self.lock();
        let choice = AgentChoice {
            index: s.active,
            generation: s.generation,
        };
        let Some(every) = self.failback else {
            return (choice, Vec::new());
        };
        let due = s.last_failback_probe.is_none_or(|t| t.elapsed() >= every)
            && s.since.elapsed() >= every;
        if s.active == 0 || !due {
            return (choice, Vec::new());
        }
        s.last_failback_probe = Some(Instant::now());
        (choice, (0..s.active).collect())
    }

    /// The result of a liveness probe of the active agent (sent with `choice`). Two
    /// failures in a row count as unreachable: an agent that accepts connections but
    /// never answers would otherwise hold every watch for a whole blocking wait. With a
    /// single address there is nowhere to move: once it answers after two missed probes, the
    /// generation changes (`true`) so that every watch abandons the query it sent to the
    /// hung agent and asks again.
    pub fn probed(&self, choice: AgentChoice, answered: Result<(), String>) -> bool {
        let mut s = self.lock();
        if s.generation != choice.generation {
            return false;
        }
        match answered {
            Ok(()) => {
                let was_down = s.probe_failures >= PROBE_FAILURES_TO_MOVE;
                s.probe_failures = 0;
                if was_down && self.addresses.len() == 1 {
                    // Queries the only agent took while it did not answer may never be
                    // answered: a new generation makes every watch ask again.
                    s.generation += 1;
                    drop(s);
                    tracing::info!(
                        address = self.address(0),
                        "consul: the agent answers again; asking every waiting query again"
                    );
                    return true;
                }
                false
            }
            Err(why) => {
                s.probe_failures += 1;
                if s.probe_failures < PROBE_FAILURES_TO_MOVE {
                    return false;
                }
                drop(s);
                self.unreachable(choice, &format!("liveness probe: {why}"))
            }
        }
    }

    /// Whether the last liveness probe of the active agent went unanswered.
    pub fn missed_a_probe(&self) -> bool {
        self.lock().probe_failures > 0
    }

    pub fn report(&self) -> AgentsReport {
        let s = self.lock();
        AgentsReport {
            addresses: self.addresses.clone(),
            active: self.address(s.active).to_string(),
            active_index: s.active,
            active_for_s: s.since.elapsed().as_secs_f64(),
            changes_total: s.moves,
            last_change_reason: s.last_move_reason.clone(),
        }
    }

    fn export_active(&self, active: usize) {
        for (i, address) in self.addresses.iter().enumerate() {
            let on = if i == active { 1.0 } else { 0.0 };
            metrics::gauge!(crate::metrics::CONSUL_AGENT_ACTIVE, "address" => address.clone())
                .set(on);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Only plain assignments happen under this lock: a poisoned one holds valid data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, failback: Option<Duration>) -> AgentPool {
        AgentPool::new(
            (0..n).map(|i| format!("http://10.0.0.{i}:8500")).collect(),
            failback,
        )
    }

    #[test]
    fn many_reports_of_one_failure_move_the_pool_once() {
        let p = pool(3, None);
        let seen = p.current();
        assert!(p.unreachable(seen, "refused"));
        assert!(!p.unreachable(seen, "refused"), "already moved");
        assert_eq!(p.current().index, 1);
        assert!(p.unreachable(p.current(), "refused"));
        assert!(p.unreachable(p.current(), "refused"));
        assert_eq!(p.current().index, 0, "wraps around");
        assert_eq!(p.report().changes_total, 3);
    }

    #[test]
    fn a_single_address_never_moves() {
        let p = pool(1, Some(Duration::ZERO));
        assert!(!p.unreachable(p.current(), "refused"));
        assert_eq!(p.current().generation, 0);
        assert!(p.failback_candidates().1.is_empty());
    }

    #[test]
    fn a_single_address_that_answers_after_two_missed_probes_starts_a_new_generation() {
        let p = pool(1, None);
        assert!(
            !p.probed(p.current(), Ok(())),
            "answering all along changes nothing"
        );
        assert!(!p.probed(p.current(), Err("timeout".into())));
        assert!(
            !p.probed(p.current(), Err("timeout".into())),
            "nowhere to move"
        );
        assert!(p.missed_a_probe());
        assert!(p.probed(p.current(), Ok(())));
        assert_eq!(
            p.current(),
            AgentChoice {
                index: 0,
                generation: 1
            }
        );
        assert!(!p.missed_a_probe());
        assert!(!p.probed(p.current(), Ok(())), "once");
        assert_eq!(p.current().generation, 1);
    }

    #[test]
    fn earlier_addresses_are_probed_only_when_due_and_best_first() {
        let p = pool(3, Some(Duration::ZERO));
        assert!(p.failback_candidates().1.is_empty(), "the first is active");
        p.move_from(p.current(), 2, "test");
        let (choice, candidates) = p.failback_candidates();
        assert_eq!(candidates, [0, 1]);
        assert!(p.move_from(choice, 0, "answers again"));
        assert!(!p.move_from(choice, 1, "stale choice"));
        assert_eq!(p.current().index, 0);

        let never = pool(2, None);
        never.move_from(never.current(), 1, "test");
        assert!(never.failback_candidates().1.is_empty(), "failback off");
        let later = pool(2, Some(Duration::from_secs(3600)));
        later.move_from(later.current(), 1, "test");
        assert!(later.failback_candidates().1.is_empty(), "not due yet");
    }

    #[test]
    fn two_failed_liveness_probes_in_a_row_move_the_pool() {
        let p = pool(2, None);
        let c = p.current();
        assert!(!p.probed(c, Err("timeout".into())));
        assert!(!p.probed(c, Ok(())), "an answer resets the count");
        assert!(!p.probed(c, Err("timeout".into())));
        assert!(p.probed(c, Err("timeout".into())));
        assert_eq!(p.current().index, 1);
        assert!(p.report().last_change_reason.unwrap().contains("liveness"));
    }
}
