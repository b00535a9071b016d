//! Consensus on the first division of the range (`consensus=N`): every consensus node is
//! a Paxos acceptor and may propose (see `ipam::paxos` for the rules). The acceptor's
//! state is persisted; its answers (Promise, Accepted, Nack) carry that state and so leave
//! the node only after it is durable (see `effects`).
//!
//! Proposers avoid duelling: a node proposes only while a quorum is connected, and
//! higher-named peers wait longer (by rank) before proposing, so that one proposer usually
//! runs alone; an abandoned round backs off by 1 to 3 ticks.

use super::effects::{ConnId, Outbox};
use super::message::Message;
use super::node::{Node, PAXOS_TIMEOUT};
use super::PeerName;
use crate::core::ipam::paxos::{Accepted, Acceptor, Ballot, Phase, Proposal, Step};
use crate::core::ipam::IpallocInit;

#[derive(Debug)]
pub(super) struct Consensus {
    /// This node as an acceptor (persisted).
    pub(super) acceptor: Acceptor,
    /// This node's round as a proposer, if one is running.
    pub(super) proposal: Option<Proposal>,
    next_proposal: u64,
    attempts: u64,
    max_round: u64,
    /// Tick since which a quorum is connected, and of the last Prepare/Accept heard from
    /// another proposer.
    eligible_since: Option<u64>,
    last_foreign: u64,
    /// Targets that turned out to be this node: they do not count towards N.
    self_targets: usize,
}

impl Consensus {
    pub(super) fn new(acceptor: Acceptor) -> Consensus {
        let max_round = acceptor.max_round();
        Consensus {
            acceptor,
            proposal: None,
            next_proposal: 0,
            attempts: 0,
            max_round,
            eligible_since: None,
            last_foreign: 0,
            self_targets: 0,
        }
    }
}

impl Node {
    /// Acceptors needed: a majority of `consensus=N` (targets that turned out to be this
    /// node do not count towards N).
    pub(super) fn quorum(&self) -> usize {
        match self.cfg.init {
            IpallocInit::Consensus(n) => {
                n.saturating_sub(self.consensus.self_targets).max(1) / 2 + 1
            }
            _ => 1,
        }
    }

    fn is_acceptor(&self) -> bool {
        matches!(self.cfg.init, IpallocInit::Consensus(_))
    }

    pub(super) fn maybe_propose(&mut self, out: &mut Outbox) {
        if self.ipam.is_ready() || !self.is_acceptor() {
            return;
        }
        if let Some(p) = &self.consensus.proposal {
            if self.ticks < p.started + PAXOS_TIMEOUT {
                return;
            }
            self.abandon_proposal();
        }
        let mut members = self.established_peers();
        if members.len() + 1 < self.quorum() {
            self.consensus.eligible_since = None;
            return;
        }
        let since = *self.consensus.eligible_since.get_or_insert(self.ticks);
        let rank = members.iter().filter(|p| **p < self.cfg.name).count() as u64;
        if rank > 0 && self.ticks < since.max(self.consensus.last_foreign) + rank * PAXOS_TIMEOUT {
            return;
        }
        if self.ticks < self.consensus.next_proposal {
            return;
        }
        members.push(self.cfg.name.clone());
        self.consensus.max_round = self
            .consensus
            .max_round
            .max(self.consensus.acceptor.max_round())
            + 1;
        let ballot = Ballot {
            round: self.consensus.max_round,
            proposer: self.cfg.name.clone(),
        };
        self.counters.paxos_rounds += 1;
        self.consensus.proposal = Some(Proposal::new(
            ballot.clone(),
            self.quorum(),
            members,
            self.ticks,
        ));
        out.info(format!(
            "proposing the initial IP ring members (round {}, quorum {})",
            ballot.round,
            self.quorum()
        ));
        for id in self.established_ids() {
            out.send(
                id,
                Message::Prepare {
                    ballot: ballot.clone(),
                },
            );
        }
        // This node is an acceptor too.
        let (r, changed) = self.consensus.acceptor.prepare(&ballot);
        if changed {
            self.touch();
        }
        if let Ok(acc) = r {
            let me = self.cfg.name.clone();
            self.on_promise(me, ballot, acc, out);
        }
    }

    fn abandon_proposal(&mut self) {
        self.consensus.proposal = None;
        self.consensus.attempts += 1;
        // Deterministic per-peer backoff of 1 to 3 ticks breaks duelling proposers.
        let jitter = 1 + self.next_rand() % 3;
        self.consensus.next_proposal = self.ticks + jitter;
    }

    /// A proposal in flight may have gone out on a connection that was then closed as the
    /// duplicate of `id`: repeat its current phase there rather than wait for the round
    /// to time out. Acceptors and the proposer treat repeats idempotently.
    pub(super) fn repeat_phase(&mut self, id: ConnId, out: &mut Outbox) {
        let Some(p) = &self.consensus.proposal else {
            return;
        };
        let msg = match &p.phase {
            Phase::Preparing => Message::Prepare {
                ballot: p.ballot.clone(),
            },
            Phase::Accepting(value) => Message::Accept {
                ballot: p.ballot.clone(),
                value: value.clone(),
            },
            Phase::Decided(_) => return,
        };
        out.send(id, msg);
    }

    pub(super) fn on_prepare(&mut self, id: ConnId, ballot: Ballot, out: &mut Outbox) {
        self.consensus.max_round = self.consensus.max_round.max(ballot.round);
        self.consensus.last_foreign = self.ticks;
        if self.ipam.is_ready() {
            // Already decided: the ring is the answer.
            return self.send_ring(id, out);
        }
        if !self.is_acceptor() {
            return;
        }
        let (r, changed) = self.consensus.acceptor.prepare(&ballot);
        if changed {
            self.touch();
        }
        let msg = match r {
            Ok(accepted) => Message::Promise { ballot, accepted },
            Err(promised) => Message::Nack { ballot, promised },
        };
        out.send(id, msg);
    }

    pub(super) fn on_promise(
        &mut self,
        from: PeerName,
        ballot: Ballot,
        accepted: Option<Accepted>,
        out: &mut Outbox,
    ) {
        let Some(p) = self
            .consensus
            .proposal
            .as_mut()
            .filter(|p| p.ballot == ballot)
        else {
            return;
        };
        let Step::SendAccept(value) = p.on_promise(from, accepted) else {
            return;
        };
        let promisers: Vec<PeerName> = p.promises.keys().cloned().collect();
        for name in &promisers {
            if let Some(id) = self.conn_to(name) {
                out.send(
                    id,
                    Message::Accept {
                        ballot: ballot.clone(),
                        value: value.clone(),
                    },
                );
            }
        }
        let (r, changed) = self.consensus.acceptor.accept(&ballot, &value);
        if changed {
            self.touch();
        }
        if r.is_ok() {
            let me = self.cfg.name.clone();
            self.on_accepted(me, ballot, out);
        }
    }

    pub(super) fn on_accept(
        &mut self,
        id: ConnId,
        ballot: Ballot,
        value: Vec<PeerName>,
        out: &mut Outbox,
    ) {
        self.consensus.max_round = self.consensus.max_round.max(ballot.round);
        self.consensus.last_foreign = self.ticks;
        if self.ipam.is_ready() {
            return self.send_ring(id, out);
        }
        if !self.is_acceptor() {
            return;
        }
        let (r, changed) = self.consensus.acceptor.accept(&ballot, &value);
        if changed {
            self.touch();
        }
        let msg = match r {
            Ok(()) => Message::Accepted { ballot },
            Err(promised) => Message::Nack { ballot, promised },
        };
        out.send(id, msg);
    }

    pub(super) fn on_accepted(&mut self, from: PeerName, ballot: Ballot, out: &mut Outbox) {
        let Some(p) = self
            .consensus
            .proposal
            .as_mut()
            .filter(|p| p.ballot == ballot)
        else {
            return;
        };
        let Step::Decided(value) = p.on_accepted(from) else {
            return;
        };
        self.consensus.proposal = None;
        if self.ipam.is_ready() {
            return;
        }
        match self.ipam.seed_any(&value) {
            Ok(_) => {
                let names: Vec<&str> = value.iter().map(PeerName::as_str).collect();
                out.info(format!(
                    "consensus reached: IP range {} split among [{}]",
                    self.cfg.range,
                    names.join(" ")
                ));
                self.touch();
                out.push(super::effects::Action::RoutesChanged);
                out.push(super::effects::Action::Ready);
                // The decision goes to every neighbour once.
                for id in self.established_ids() {
                    self.send_ring(id, out);
                }
            }
            Err(e) => out.warn(format!("cannot seed IP ring: {e}")),
        }
    }

    pub(super) fn on_nack(&mut self, ballot: Ballot, promised: Ballot) {
        self.consensus.max_round = self.consensus.max_round.max(promised.round);
        if self
            .consensus
            .proposal
            .as_ref()
            .is_some_and(|p| p.ballot == ballot)
        {
            self.abandon_proposal();
        }
    }

    /// A target turned out to be this node: it no longer counts towards consensus.
    pub(crate) fn target_is_self(&mut self) -> super::effects::Effects {
        self.consensus.self_targets += 1;
        let mut out = Outbox::default();
        self.maybe_propose(&mut out);
        self.finish(out)
    }
}
