//! The `X-Consul-Index` of a blocking query and the client rules for it
//! (`shared/consul-api.md` §1.4): backwards means reset, never block on 0, unchanged is no news.

use std::fmt;

/// The index a blocking query waits past. `Index::ZERO` asks for an immediate answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Index(u64);

/// What an answer's index means for the watch that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A fresh baseline or a newer index: look at the payload, then block on the new index.
    Advanced(Index),
    /// Same index as before: a wait timeout or an unrelated write. Not an update.
    Unchanged,
    /// The index went backwards (snapshot restore, KV tombstones reaped, a new cluster):
    /// forget it and re-read from zero to get a fresh baseline.
    WentBackwards,
}

impl Index {
    pub const ZERO: Index = Index(0);

    pub fn new(value: u64) -> Index {
        Index(value)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// Applies the rules to the index Consul `reported` for a query sent with `self`.
    /// The index after a step is never 0: blocking on 0 answers at once and would spin.
    pub fn step(self, reported: u64) -> Step {
        if self.0 == 0 {
            return Step::Advanced(Index(reported.max(1)));
        }
        match reported.cmp(&self.0) {
            std::cmp::Ordering::Less => Step::WentBackwards,
            std::cmp::Ordering::Equal => Step::Unchanged,
            std::cmp::Ordering::Greater => Step::Advanced(Index(reported)),
        }
    }
}

impl fmt::Display for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_answer_is_always_a_baseline() {
        assert_eq!(Index::ZERO.step(42), Step::Advanced(Index(42)));
    }

    #[test]
    fn a_zero_index_is_clamped_to_one_so_the_next_query_blocks() {
        assert_eq!(Index::ZERO.step(0), Step::Advanced(Index(1)));
    }

    #[test]
    fn the_same_index_is_not_an_update() {
        assert_eq!(Index(7).step(7), Step::Unchanged);
    }

    #[test]
    fn a_greater_index_advances() {
        assert_eq!(Index(7).step(9), Step::Advanced(Index(9)));
    }

    #[test]
    fn an_index_that_went_backwards_asks_for_a_reset() {
        assert_eq!(Index(7).step(3), Step::WentBackwards);
        assert_eq!(Index(7).step(0), Step::WentBackwards);
    }
}
