//! What the node asks of the I/O layer after an event: one typed value, carried out in one
//! place (the router's effect interpreter), in a fixed order.
//!
//! The rule it encodes: nothing that depends on the node's persisted state leaves the node
//! before that state is durable. A Paxos promise, an acceptance, a ring that gives space
//! away, an answer to a local allocation: each is a commitment that must survive a crash.
//! So the node sorts every action as it is produced: messages carrying state go to
//! `after_save` and are dropped if the save fails; heartbeats, closes and logs go to `now`.
//! The sort happens in [`Outbox`], in one place, by message type
//! ([`Message::carries_state`]).

use super::message::Message;
use crate::core::persist::PersistedState;
use std::net::SocketAddrV4;

/// Identifies a control connection; chosen by the I/O layer.
pub type ConnId = u64;

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send(ConnId, Message),
    Close(ConnId, String),
    /// A peer learned through gossip that this node is not connected to: dial it.
    Dial(SocketAddrV4),
    /// The connection turned out to lead back to this very process (a target that names
    /// this node): stop dialling the target it was dialled for.
    TargetIsSelf(ConnId),
    /// Ring or peer addresses changed: rebuild the data plane's routes.
    RoutesChanged,
    /// IPAM became ready, or space this node waited for arrived: retry waiting
    /// allocations.
    Ready,
    /// New keys for the data plane with a peer, or none any more.
    DataKey(super::PeerName, super::datakeys::KeyChange),
    /// Something an operator must see in the log.
    Log(Level, String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// The state to write before anything in [`Effects::after_save`] is carried out.
#[derive(Clone, Debug, PartialEq)]
pub struct Save {
    /// Increases with every change of the persisted state; acknowledge a durable save with
    /// `Node::saved(generation)`.
    pub generation: u64,
    pub state: PersistedState,
}

/// The outcome of one event. Carry it out in this order: write `save` (if any) to stable
/// storage; carry out `now`; then, only if the save succeeded, `after_save`.
#[must_use = "effects must be carried out: save first, then what depends on it"]
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effects {
    /// Present whenever the node holds state not yet acknowledged as saved.
    pub save: Option<Save>,
    /// Independent of the save.
    pub now: Vec<Action>,
    /// Carried out only once `save` is durable; dropped if it fails.
    pub after_save: Vec<Action>,
}

impl Effects {
    /// Every action, in the order carried out when the save succeeds.
    pub fn actions(&self) -> impl Iterator<Item = &Action> {
        self.now.iter().chain(self.after_save.iter())
    }

    /// The messages sent, in order (for tests and the simulation).
    pub fn sends(&self) -> impl Iterator<Item = (ConnId, &Message)> {
        self.actions().filter_map(|a| match a {
            Action::Send(id, m) => Some((*id, m)),
            _ => None,
        })
    }

    pub fn contains(&self, action: &Action) -> bool {
        self.actions().any(|a| a == action)
    }
}

/// Collects one event's actions, sorting each into `now` or `after_save`.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    now: Vec<Action>,
    after_save: Vec<Action>,
}

impl Outbox {
    pub(crate) fn send(&mut self, id: ConnId, msg: Message) {
        if msg.carries_state() {
            self.after_save.push(Action::Send(id, msg));
        } else {
            self.now.push(Action::Send(id, msg));
        }
    }

    pub(crate) fn close(&mut self, id: ConnId, why: impl Into<String>) {
        self.now.push(Action::Close(id, why.into()));
    }

    pub(crate) fn push(&mut self, action: Action) {
        debug_assert!(
            !matches!(action, Action::Send(..)),
            "sends go through Outbox::send, which sorts them"
        );
        self.now.push(action);
    }

    pub(crate) fn info(&mut self, msg: impl Into<String>) {
        self.now.push(Action::Log(Level::Info, msg.into()));
    }

    pub(crate) fn warn(&mut self, msg: impl Into<String>) {
        self.now.push(Action::Log(Level::Warn, msg.into()));
    }

    pub(crate) fn finish(self, save: Option<Save>) -> Effects {
        Effects {
            save,
            now: self.now,
            after_save: self.after_save,
        }
    }
}
