//! Space on demand: a node without free space in the wanted subnet asks the connected
//! peer with the most free space there (skipping those already tried, until all were),
//! and retries another after `SPACE_RETRY` ticks; a donor gives at most half of its free
//! space as the largest aligned block and pushes its ring to the requester first. The
//! donor's ring is persisted before that push leaves (it gives space away).

use super::effects::{Action, ConnId, Outbox};
use super::message::Message;
use super::node::{Node, SPACE_RETRY};
use super::PeerName;
use crate::core::ipam::{PeerRecord, Signed};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};

/// A space request in flight.
#[derive(Clone, Debug)]
pub(super) struct Want {
    pub(super) subnet: Ipv4Net,
    asked: Option<PeerName>,
    at: u64,
    tried: BTreeSet<PeerName>,
}

#[derive(Debug, Default)]
pub(super) struct Donation {
    pub(super) want: Option<Want>,
}

impl Node {
    /// An allocation in `subnet` found no free address of ours: ask for space (once per
    /// subnet until it arrives).
    pub(super) fn want_space(&mut self, subnet: Ipv4Net, out: &mut Outbox) {
        let subnet = subnet.trunc();
        let fresh = self
            .donation
            .want
            .as_ref()
            .is_none_or(|w| w.subnet != subnet);
        if fresh {
            self.donation.want = Some(Want {
                subnet,
                asked: None,
                at: self.ticks,
                tried: BTreeSet::new(),
            });
            self.ask_space(out);
        }
    }

    /// Free addresses of each owner in the wanted subnet, if a want and a ring exist.
    fn free_in_wanted(&self) -> Option<BTreeMap<PeerName, u64>> {
        let want = self.donation.want.as_ref()?;
        let ring = self.ipam.ring()?;
        let window = self.ipam.window(want.subnet);
        Some(
            ring.free_by_owner(window)
                .into_iter()
                .map(|(o, f)| (o.clone(), f))
                .collect(),
        )
    }

    fn ask_space(&mut self, out: &mut Outbox) {
        let Some(free) = self.free_in_wanted() else {
            return;
        };
        let connected: BTreeMap<PeerName, ConnId> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| c.peer.as_ref().map(|p| (p.0.clone(), id)))
            .collect();
        let pick = |tried: &BTreeSet<PeerName>| {
            free.iter()
                .filter(|(o, f)| **f > 0 && connected.contains_key(*o) && !tried.contains(*o))
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(o, _)| o.clone())
        };
        let Some(want) = self.donation.want.as_mut() else {
            return;
        };
        let mut donor = pick(&want.tried);
        if donor.is_none() && !want.tried.is_empty() {
            donor = pick(&BTreeSet::new());
            want.tried.clear();
        }
        want.at = self.ticks;
        want.asked = donor.clone();
        let Some(donor) = donor else {
            return;
        };
        want.tried.insert(donor.clone());
        let subnet = (want.subnet != self.cfg.range).then_some(want.subnet);
        self.counters.space_requests_sent += 1;
        out.send(
            connected[&donor],
            Message::SpaceRequest {
                subnet,
                incarnation: self.ipam.incarnation(),
                signed: self.own_comeback_signature(),
            },
        );
    }

    pub(super) fn retry_space(&mut self, out: &mut Outbox) {
        if self
            .donation
            .want
            .as_ref()
            .is_some_and(|w| self.ticks >= w.at + SPACE_RETRY)
        {
            self.ask_space(out);
        }
    }

    /// Space arrived for a waiting allocation: wake the waiters.
    pub(super) fn check_want(&mut self, out: &mut Outbox) {
        let Some(free) = self.free_in_wanted() else {
            return;
        };
        if free.get(&self.cfg.name).copied().unwrap_or(0) > 0 {
            self.donation.want = None;
            out.push(Action::Ready);
        }
    }

    pub(super) fn on_space_request(
        &mut self,
        id: ConnId,
        from: &PeerName,
        incarnation: u32,
        signed: Option<Signed>,
        subnet: Option<Ipv4Net>,
        out: &mut Outbox,
    ) {
        // Only a signature under the requester's bound key (it is connected: its Hello
        // bound it) may write its comeback into our ring: a comeback carries its own key.
        let signed = signed.filter(|s| {
            let rec = PeerRecord {
                incarnation,
                removed_by: None,
                signed: Some(*s),
                key: Some(s.key),
            };
            self.gossip.sign_keys.get(from) == Some(&s.key)
                && s.verifies(&rec.message(self.ipam.range(), from))
        });
        match self.ipam.donate(from, incarnation, signed, subnet) {
            Ok(Some(block)) => {
                self.counters.donations_given += 1;
                out.info(format!("gave {block} to {from}"));
                self.touch();
                out.push(Action::RoutesChanged);
                self.push_ring(out, Some(id));
            }
            // Nothing to give: our ring at least shows the requester who has space.
            Ok(None) => self.send_ring(id, out),
            Err(e) => {
                out.warn(format!("cannot give space to {from}: {e}"));
                self.send_ring(id, out);
            }
        }
    }
}
