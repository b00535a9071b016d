//! Single-decree Paxos deciding the initial member set of the ring (`consensus=N`).
//!
//! Every consensus node is both acceptor and proposer. A proposal is numbered by a ballot
//! `(round, proposer name)`, totally ordered, so two proposers never share a ballot. The
//! value is the set of peers the proposer is connected to, itself included. Acceptors
//! promise not to accept lower ballots (phase 1) and accept a value for a ballot they
//! promised (phase 2); a proposer that heard of an earlier accepted value must propose the
//! one with the highest ballot. A value accepted by a quorum `N/2 + 1` is decided; any two
//! quorums share an acceptor, so at most one value is ever decided, and the ring seeded
//! from it is the same on every node. The acceptor state is persisted before its answers
//! leave the node, so a restart cannot break a promise.

use crate::core::mesh::PeerName;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: PeerName,
}

/// What an acceptor accepted: the ballot and the proposed member set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub ballot: Ballot,
    pub value: Vec<PeerName>,
}

/// Persistent acceptor state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceptor {
    pub promised: Option<Ballot>,
    pub accepted: Option<Accepted>,
}

impl Acceptor {
    /// Phase 1b. `Ok(previously accepted)` with a promise, `Err(promised)` to refuse.
    /// The bool says whether the state changed (and must be persisted).
    pub fn prepare(&mut self, b: &Ballot) -> (Result<Option<Accepted>, Ballot>, bool) {
        match &self.promised {
            Some(p) if p >= b => {
                if p == b {
                    (Ok(self.accepted.clone()), false)
                } else {
                    (Err(p.clone()), false)
                }
            }
            _ => {
                self.promised = Some(b.clone());
                (Ok(self.accepted.clone()), true)
            }
        }
    }

    /// Phase 2b. `Ok(())` if accepted, `Err(promised)` otherwise; bool as in `prepare`.
    pub fn accept(&mut self, b: &Ballot, value: &[PeerName]) -> (Result<(), Ballot>, bool) {
        if let Some(p) = &self.promised {
            if p > b {
                return (Err(p.clone()), false);
            }
        }
        let new = Accepted {
            ballot: b.clone(),
            value: value.to_vec(),
        };
        if self.accepted.as_ref() == Some(&new) && self.promised.as_ref() == Some(b) {
            return (Ok(()), false);
        }
        self.promised = Some(b.clone());
        self.accepted = Some(new);
        (Ok(()), true)
    }

    /// The highest round this acceptor has seen.
    pub(crate) fn max_round(&self) -> u64 {
        self.promised.as_ref().map_or(0, |b| b.round)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Preparing,
    Accepting(Vec<PeerName>),
    Decided(Vec<PeerName>),
}

/// One proposer round.
#[derive(Clone, Debug)]
pub(crate) struct Proposal {
    pub ballot: Ballot,
    pub quorum: usize,
    /// The proposer's own value, used if no acceptor reports an accepted one.
    pub own_value: Vec<PeerName>,
    pub promises: BTreeMap<PeerName, Option<Accepted>>,
    pub accepts: BTreeSet<PeerName>,
    pub phase: Phase,
    pub started: u64,
}

/// What the proposer wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Nothing,
    /// Phase 2a: ask the acceptors that promised to accept this value.
    SendAccept(Vec<PeerName>),
    Decided(Vec<PeerName>),
}

impl Proposal {
    pub fn new(ballot: Ballot, quorum: usize, mut own_value: Vec<PeerName>, now: u64) -> Self {
        own_value.sort();
        own_value.dedup();
        Proposal {
            ballot,
            quorum: quorum.max(1),
            own_value,
            promises: BTreeMap::new(),
            accepts: BTreeSet::new(),
            phase: Phase::Preparing,
            started: now,
        }
    }

    pub fn on_promise(&mut self, from: PeerName, accepted: Option<Accepted>) -> Step {
        if self.phase != Phase::Preparing {
            return Step::Nothing;
        }
        self.promises.insert(from, accepted);
        if self.promises.len() < self.quorum {
            return Step::Nothing;
        }
        let value = self
            .promises
            .values()
            .flatten()
            .max_by(|a, b| a.ballot.cmp(&b.ballot))
            .map_or_else(|| self.own_value.clone(), |a| a.value.clone());
        self.phase = Phase::Accepting(value.clone());
        Step::SendAccept(value)
    }

    pub fn on_accepted(&mut self, from: PeerName) -> Step {
        let Phase::Accepting(value) = &self.phase else {
            return Step::Nothing;
        };
        let value = value.clone();
        self.accepts.insert(from);
        if self.accepts.len() >= self.quorum {
            self.phase = Phase::Decided(value.clone());
            return Step::Decided(value);
        }
        Step::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u8) -> PeerName {
        PeerName::from_bytes([2, 0, 0, 0, 0, i])
    }
    fn b(round: u64, i: u8) -> Ballot {
        Ballot {
            round,
            proposer: p(i),
        }
    }

    #[test]
    fn acceptor_keeps_promises() {
        let mut a = Acceptor::default();
        assert_eq!(a.prepare(&b(1, 1)), (Ok(None), true));
        assert_eq!(a.prepare(&b(1, 1)), (Ok(None), false));
        assert_eq!(a.prepare(&b(1, 0)).0, Err(b(1, 1)));
        assert_eq!(a.accept(&b(0, 9), &[p(1)]).0, Err(b(1, 1)));
        assert_eq!(a.accept(&b(1, 1), &[p(1), p(2)]), (Ok(()), true));
        assert_eq!(a.accept(&b(1, 1), &[p(1), p(2)]), (Ok(()), false));
        let (r, _) = a.prepare(&b(2, 3));
        assert_eq!(r.unwrap().unwrap().value, vec![p(1), p(2)]);
        assert_eq!(a.max_round(), 2);
    }

    #[test]
    fn proposer_adopts_highest_accepted_value() {
        let mut pr = Proposal::new(b(3, 1), 2, vec![p(1), p(3)], 0);
        assert_eq!(pr.on_promise(p(1), None), Step::Nothing);
        let acc = Accepted {
            ballot: b(2, 2),
            value: vec![p(1), p(2)],
        };
        assert_eq!(
            pr.on_promise(p(2), Some(acc)),
            Step::SendAccept(vec![p(1), p(2)])
        );
        assert_eq!(pr.on_promise(p(3), None), Step::Nothing);
        assert_eq!(pr.on_accepted(p(1)), Step::Nothing);
        assert_eq!(
            pr.on_accepted(p(1)),
            Step::Nothing,
            "duplicates do not count"
        );
        assert_eq!(pr.on_accepted(p(2)), Step::Decided(vec![p(1), p(2)]));
    }
}
