//! Control messages between peers and their framing on the TCP stream.
//!
//! A frame is a 4-byte big-endian length followed by a JSON body. JSON keeps the protocol
//! readable in captures and lets fields be added without a version bump; control traffic
//! is small and rare, so its cost does not matter. Decoding is incremental (sans-I/O): the
//! adapter feeds whatever bytes arrived and takes out whole messages.

use crate::core::ipam::paxos::{Accepted, Ballot};
use crate::core::ipam::{Ring, SignKey, Signed};
use crate::core::mesh::secure::PublicKey;
use crate::core::mesh::PeerName;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

pub const PROTOCOL: &str = "weft";
pub const PROTOCOL_VERSION: u32 = 2;
/// Large enough for a ring of thousands of entries; a peer announcing more is broken or
/// hostile and is disconnected rather than buffered.
pub(crate) const MAX_FRAME: usize = 16 * 1024 * 1024;
/// The largest frame before the peer's Hello is accepted: a Hello is a few hundred bytes,
/// and nothing else may come first.
pub(crate) const MAX_FRAME_BEFORE_HELLO: usize = 16 * 1024;
/// Most peer summaries in one gossip message: a node summarises itself and its direct
/// neighbours, which `CONN_LIMIT` (200 by default) bounds.
pub(crate) const MAX_SUMMARIES: usize = 1024;

/// The first message on every connection, in both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: String,
    pub version: u32,
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start: distinguishes a restarted peer from a different node that
    /// (wrongly) uses the same name.
    pub uid: u64,
    pub control_port: u16,
    pub data_port: u16,
    pub range: String,
    /// Digest of the sender's ring (None without one): a side that sees a different
    /// digest sends its ring, so a node joining a cluster adopts the existing ring at once.
    pub digest: Option<u64>,
    /// The sender restarted and has not yet heard a live peer's ring: its ring may be
    /// stale, so it does not vouch for anything.
    #[serde(default)]
    pub gated: bool,
    /// The key the sender signs its ring records with (see `ipam::sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_key: Option<SignKey>,
}

/// What one peer knows about another, gossiped so that every node learns every owner's
/// underlay address even without a direct connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSummary {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    /// Underlay address as observed by a node connected to it.
    pub address: Option<Ipv4Addr>,
    pub control_port: u16,
    pub data_port: u16,
    /// Names of the peers it has established connections with (only in the sender's own
    /// summary: what a peer says about others' connections would be second-hand).
    #[serde(default)]
    pub connections: Vec<PeerName>,
    /// The same connections with their remote address and direction as the sender sees
    /// them, so that every node's peer list shows who dialled whom and at which address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkSummary>,
    /// Its static key as the summarising node authenticated it (None for the sender
    /// itself, whose key the receiver has from the handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PublicKey>,
}

/// One established control connection of the summarised peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSummary {
    pub name: PeerName,
    /// The remote end's `ip:port` as the summarised peer sees it.
    pub remote: std::net::SocketAddr,
    /// The summarised peer dialled it.
    pub outbound: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Message {
    Hello(Hello),
    /// First-hand peer summaries and/or the sender's whole ring.
    Gossip {
        peers: Vec<PeerSummary>,
        ring: Option<Ring>,
        /// As in `Hello`.
        #[serde(default)]
        gated: bool,
        /// Answer to a `Digest`: if the merged ring still differs, send it back (once;
        /// that reply does not ask again, so exchanges cannot ping-pong).
        #[serde(default)]
        answer: bool,
    },
    /// Liveness. A `probe` is echoed back at once (`echo`), so that the I/O layer, which
    /// has the clock, can time the round trip; old peers ignore both fields.
    Heartbeat {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        probe: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        echo: Option<u64>,
    },
    /// Anti-entropy probe: the receiver answers with its ring if its digest differs.
    Digest {
        ring: Option<u64>,
    },
    /// The sender has no free space (in `subnet`, or anywhere): please donate some.
    SpaceRequest {
        subnet: Option<Ipv4Net>,
        #[serde(default)]
        incarnation: u32,
        /// The sender's signature of its comeback record at `incarnation` (above 0), so
        /// that a donor that has not heard of the comeback yet can write it down.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signed: Option<Signed>,
    },
    /// Paxos phase 1a/1b/2a/2b, and a refusal carrying the acceptor's promise.
    Prepare {
        ballot: Ballot,
    },
    Promise {
        ballot: Ballot,
        accepted: Option<Accepted>,
    },
    Accept {
        ballot: Ballot,
        value: Vec<PeerName>,
    },
    Accepted {
        ballot: Ballot,
    },
    Nack {
        ballot: Ballot,
        promised: Ballot,
    },
    /// With `WEAVE_PASSWORD`: the key the sender will seal its datagrams to the receiver
    /// with (hex), once the receiver acknowledges it. Only ever sent over the Noise
    /// channel, which encrypts it.
    DataKey {
        id: u8,
        key: String,
    },
    DataKeyAck {
        id: u8,
    },
}

impl Message {
    /// A heartbeat without probe or echo.
    pub const HEARTBEAT: Message = Message::Heartbeat {
        probe: None,
        echo: None,
    };

    /// Whether this message states something the sender persisted (its ring, an
    /// acceptor's promise or acceptance, a proposal it promised itself, its incarnation),
    /// and so may leave only once that state is durable. Hellos, heartbeats, digests and
    /// peer summaries do not: a peer acting on them learns nothing a crash could take
    /// back.
    pub(crate) fn carries_state(&self) -> bool {
        !matches!(
            self,
            Message::Hello(_)
                | Message::Heartbeat { .. }
                | Message::DataKey { .. }
                | Message::DataKeyAck { .. }
                | Message::Digest { .. }
                | Message::Gossip { ring: None, .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("control frame of {len} bytes exceeds the {max}-byte limit at this stage")]
    TooLarge { len: usize, max: usize },
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Appends one framed message to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Serialising these types into a Vec cannot fail: no maps with non-string keys and no
    // failing Serialize impls.
    serde_json::to_writer(&mut *out, msg).expect("control messages always serialise");
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Incremental frame decoder.
pub(crate) struct Decoder {
    buf: Vec<u8>,
    max: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            buf: Vec::new(),
            max: MAX_FRAME,
        }
    }
}

impl Decoder {
    /// A decoder refusing frames over `max` bytes.
    pub(crate) fn with_max(max: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            max,
        }
    }

    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an error the
    /// stream is out of sync and the connection must be dropped.
    pub(crate) fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let result = serde_json::from_slice(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        if self.buf.is_empty() && self.buf.capacity() > 1024 * 1024 {
            // A large ring has been decoded: do not keep its buffer for the connection's life.
            self.buf = Vec::new();
        }
        Ok(Some(result?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol: PROTOCOL.into(),
            version: PROTOCOL_VERSION,
            name: PeerName::parse("02:77:66:00:00:01").unwrap(),
            nickname: "n1".into(),
            uid: 42,
            control_port: 6783,
            data_port: 6784,
            range: "192.168.0.0/16".into(),
            digest: Some(7),
            gated: false,
            sign_key: Some(crate::core::ipam::Signer::from_seed(&[1; 32]).public()),
        })
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        encode(&hello(), &mut wire);
        encode(&Message::HEARTBEAT, &mut wire);
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in wire {
            d.feed(&[b]);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![hello(), Message::HEARTBEAT]);
    }

    #[test]
    fn rejects_oversized_and_malformed_frames() {
        let mut d = Decoder::default();
        d.feed(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert!(matches!(d.next_message(), Err(FrameError::TooLarge { .. })));

        let mut d = Decoder::with_max(MAX_FRAME_BEFORE_HELLO);
        d.feed(&(MAX_FRAME_BEFORE_HELLO as u32 + 1).to_be_bytes());
        assert!(matches!(d.next_message(), Err(FrameError::TooLarge { .. })));

        let mut d = Decoder::default();
        d.feed(&5u32.to_be_bytes());
        d.feed(b"{oops");
        assert!(matches!(d.next_message(), Err(FrameError::Malformed(_))));

        let mut d = Decoder::default();
        let body = br#"{"type":"Hello","name":"not-a-name"}"#;
        d.feed(&(body.len() as u32).to_be_bytes());
        d.feed(body);
        assert!(d.next_message().is_err());
    }

    /// Heartbeats gained a probe and an echo without a version bump: a peer of the
    /// previous release, whose `Heartbeat` was a unit variant, must still read them (and a
    /// plain one from it must read here).
    #[test]
    fn heartbeats_with_probes_are_read_by_the_previous_release() {
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(tag = "type")]
        enum PreviousRelease {
            Heartbeat,
        }
        let mut wire = Vec::new();
        encode(
            &Message::Heartbeat {
                probe: Some(3),
                echo: None,
            },
            &mut wire,
        );
        let old: PreviousRelease = serde_json::from_slice(&wire[4..]).unwrap();
        assert_eq!(old, PreviousRelease::Heartbeat);
        let plain: Message = serde_json::from_str(r#"{"type":"Heartbeat"}"#).unwrap();
        assert_eq!(plain, Message::HEARTBEAT);
    }
}
