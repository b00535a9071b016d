//! Entry points for the fuzz targets in `fuzz/`: every byte sequence from the network, the
//! disk or a runtime that weft parses, fed to the code that parses it.
//!
//! Compiled in every build (not only under `cargo fuzz`), so that the ordinary tests run
//! them on the committed corpus' seeds and they cannot rot; each returns normally for any
//! input, and panics only when an invariant is broken, which is the fuzzer's finding.

use crate::core::datapath::{DropReason, Identity, RxPlan};
use crate::core::ipam::{IpallocInit, Ipam, Ring};
use crate::core::mesh::message::{Decoder, Message};
use crate::core::mesh::secure::{self, Handshake, Mode, RecordReader, StaticKey};
use crate::core::mesh::secure::{HANDSHAKE_RECORD_MAX, PREAMBLE_LEN};
use crate::core::mesh::{Node, NodeConfig, PeerName};
use crate::core::persist;
use crate::core::route::{PeerRoute, PeerState, RouteTable};
use crate::core::wire::WEFT_VNI;
use ipnet::Ipv4Net;
use std::net::SocketAddr;
use std::sync::Arc;

fn name(i: u8) -> PeerName {
    PeerName::from_bytes([0x02, 0x77, 0x66, 0, 0, i])
}

fn range() -> Ipv4Net {
    "192.168.0.0/16".parse().expect("valid range")
}

/// The control port's bytes before authentication: a preamble, then handshake records, as
/// a responder sees them. Nothing may panic or buffer beyond the record limit.
pub fn control_handshake(data: &[u8]) {
    let mode = Mode::from_password(Some(b"fuzz"));
    let key = StaticKey::from_private(&[7; 32]).expect("valid key");
    if data.len() < PREAMBLE_LEN {
        return;
    }
    let (pre, rest) = data.split_at(PREAMBLE_LEN);
    let pre: [u8; PREAMBLE_LEN] = pre.try_into().expect("length checked");
    let _ = secure::check_preamble(&mode, &pre);
    let mut hs = Handshake::new(&key, &mode, false).expect("handshake state");
    let mut records = RecordReader::new(HANDSHAKE_RECORD_MAX);
    records.feed(rest);
    let mut out = Vec::new();
    loop {
        assert!(records.buffered() <= rest.len());
        match records.next_record() {
            Ok(Some(rec)) => {
                if hs.read(rec).is_err() {
                    return;
                }
                if hs.is_my_turn() {
                    out.clear();
                    if hs.write(&mut out).is_err() {
                        return;
                    }
                }
                if hs.is_finished() {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Decrypted control frames (what an authenticated peer's stream carries), in arbitrary
/// chunks: the decoder yields messages or an error, never panics, and keeps its limit.
pub fn control_frames(data: &[u8]) {
    let mut d = Decoder::with_max(64 * 1024);
    for chunk in data.chunks(97) {
        d.feed(chunk);
        loop {
            match d.next_message() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// Control messages (one JSON message per line) from an established peer into a node:
/// the node may refuse them, never panic, and its ring stays valid.
pub fn control_messages(data: &[u8]) {
    let cfg = NodeConfig {
        name: name(1),
        nickname: "n1".into(),
        uid: 1,
        control_port: 6783,
        data_port: 6784,
        range: range(),
        init: IpallocInit::Consensus(2),
        tentative_ticks: crate::core::mesh::TENTATIVE_TICKS,
        // Encrypting, so that data keys and their acknowledgements are handled too.
        data_key_seed: Some(crate::core::mesh::KeySeed([7; 32])),
        signer: crate::core::ipam::Signer::from_seed(&[1; 32]),
    };
    let mut node = Node::new(cfg, Ipam::new(name(1), range()), Default::default());
    let _ = node.start();
    let remote: SocketAddr = "10.0.0.2:6783".parse().expect("address");
    let key = secure::PublicKey([2; 32]);
    let _ = node.on_connected(1, remote, false, key);
    for line in data.split(|b| *b == b'\n') {
        if let Ok(msg) = serde_json::from_slice::<Message>(line) {
            let _ = node.on_message(1, msg);
            if let Some(ring) = node.ipam().ring() {
                ring.validate()
                    .expect("a ring the node holds is always valid");
            }
        }
    }
    let _ = node.on_tick();
    let _ = node.on_closed(1, "fuzz");
}

/// A ring from a peer merged into a valid one: refused or merged, and valid after.
pub fn ring_merge(data: &[u8]) {
    let Ok(theirs) = serde_json::from_slice::<Ring>(data) else {
        return;
    };
    let mut ours = Ipam::new(name(1), range());
    ours.seed(&[name(1), name(2), name(3)])
        .expect("seeding a fresh ring");
    let mut ring = ours.ring().expect("seeded").clone();
    if ring.merge(&theirs).is_ok() {
        ring.validate()
            .expect("a merge that succeeds leaves a valid ring");
    }
}

/// A state file's bytes: decoded or refused; a decoded state restores or is refused.
pub fn persisted_state(data: &[u8]) {
    if let Ok(state) = persist::decode(data) {
        let _ = Ipam::restore(name(1), range(), state.ipam_state());
        let _ = persist::encode(&state);
    }
}

/// Datagrams on the data port from a known peer, decapsulated and coalesced (GRO): the
/// first byte sets the datagram stride (a GRO receive's segment size).
pub fn datapath_rx(data: &[u8]) {
    let Some((&stride, rest)) = data.split_first() else {
        return;
    };
    let stride = 64 + usize::from(stride) * 8;
    let peer = |i: u8, a: &str| PeerRoute {
        name: name(i),
        nickname: format!("n{i}"),
        data_addr: Some(a.parse().expect("address")),
        mac: name(i).mac(),
        counters: Arc::new(PeerState::default()),
    };
    let table = RouteTable::new(
        name(1),
        name(1).mac(),
        &[
            (0xc0a8_0000, 0xc0a8_7fff, name(1)),
            (0xc0a8_8000, 0xc0a8_ffff, name(2)),
        ],
        vec![peer(1, "10.77.0.1:6784"), peer(2, "10.77.0.2:6784")],
    );
    for vnet in [false, true] {
        let mut buf = rest.to_vec();
        let mut plan = RxPlan::new(64, vnet, WEFT_VNI);
        if vnet {
            // As the workers set it: oversize TCP packets become GSO super-packets.
            plan.set_mtu(1450);
        }
        plan.clear();
        let src: SocketAddr = "10.77.0.2:6784".parse().expect("address");
        plan.ingest(&table, &mut Identity, 0, Some(src), stride, &mut buf);
        plan.finish();
        for j in 0..plan.len() {
            let header = plan.header(j).len();
            let body: usize = plan.parts(j).map(|(_, r)| r.len()).sum();
            assert!(plan.segments(j) >= 1);
            assert!(
                header + body <= 65_535 + 64,
                "a coalesced packet over 64 KiB"
            );
        }
    }
}

/// Datagrams on the data port with WEAVE_PASSWORD: the first byte chooses whether the rest
/// arrives as it is (forgeries: truncated, unauthenticated, replayed) or is first cut into
/// datagrams (of 16..=271 bytes, by the second byte) and sealed with the peer's key, so
/// that opening succeeds and decapsulation and GRO see the plaintext; a third of the
/// sealed ones are sent twice (replays) and a bit of some is flipped.
pub fn datapath_rx_sealed(data: &[u8]) {
    use crate::core::datapath::aead::{Aead, DataKey};
    use crate::core::datapath::{Sealed, Transform};
    let [mode, size, rest @ ..] = data else {
        return;
    };
    let key = DataKey {
        id: 3,
        secret: [0x5a; 32],
    };
    let sender = PeerRoute {
        name: name(2),
        nickname: "n2".into(),
        data_addr: Some("10.77.0.2:6784".parse().expect("address")),
        mac: name(2).mac(),
        counters: Arc::new(PeerState::default()),
    };
    sender.counters.crypto.set_tx(&key);
    let receiving = Arc::new(PeerState::default());
    receiving.crypto.add_rx(&key);
    let table = RouteTable::new(
        name(1),
        name(1).mac(),
        &[
            (0xc0a8_0000, 0xc0a8_7fff, name(1)),
            (0xc0a8_8000, 0xc0a8_ffff, name(2)),
        ],
        vec![PeerRoute {
            counters: receiving,
            ..sender.clone()
        }],
    );
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    if mode & 1 == 0 {
        datagrams.push(rest.to_vec());
    } else {
        let mut seal = Aead::new(1 << 20);
        let len = 16 + usize::from(*size);
        for (i, chunk) in rest.chunks(len).enumerate() {
            seal.reset();
            let split = chunk.len().min(40);
            let mut header = vec![0u8; 8];
            header.extend_from_slice(&chunk[..split]);
            let Sealed::Replaced(r) = seal.seal(&sender, &mut header, &chunk[split..]) else {
                panic!("a peer with a key seals");
            };
            let mut d = seal.output()[r].to_vec();
            if (i + usize::from(*mode)) % 5 == 0 {
                let at = (usize::from(*size) + i) % d.len();
                d[at] ^= 1 << (mode >> 5);
            }
            if i % 3 == 0 {
                datagrams.push(d.clone());
            }
            datagrams.push(d);
        }
    }
    let src: SocketAddr = "10.77.0.2:6784".parse().expect("address");
    let mut open = Aead::new(0);
    let mut plan = RxPlan::new(64, mode & 2 != 0, WEFT_VNI);
    plan.clear();
    for (i, d) in datagrams.iter_mut().enumerate() {
        let stride = d.len();
        plan.ingest(&table, &mut open, i, Some(src), stride, d);
    }
    plan.finish();
    let drops = plan.take_counts();
    let refused = drops.get(DropReason::Unauthenticated) + drops.get(DropReason::Replayed);
    assert!(refused <= datagrams.len() as u64);
    for j in 0..plan.len() {
        assert!(plan.segments(j) >= 1);
    }
}

/// What the HTTP API takes from a path: a container id, a subnet, a peer name.
pub fn http_path_parts(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for part in s.split('/') {
        let _ = weft_contract::ContainerId::parse(part);
        let _ = PeerName::parse(part);
        let _ = part.parse::<Ipv4Net>();
    }
}

/// A `weft report -f` template (`/report?format=`) from a local user: never a panic or
/// a stack overflow, whatever it says.
pub fn report_template(data: &[u8]) {
    let Ok(t) = std::str::from_utf8(data) else {
        return;
    };
    let mut r = crate::api::report::Report::default();
    r.router.name = "02:77:66:00:00:01".into();
    r.router.peers = vec![Default::default(), Default::default()];
    r.ipam.entries = vec![Default::default()];
    let _ = crate::api::template::render_on_this_thread(t, &r);
}

#[cfg(test)]
mod tests {
    /// Every committed seed of every target runs here, so the entry points cannot rot
    /// and what the fuzzer once found stays fixed.
    #[test]
    fn the_committed_corpus_runs_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        type Target = (&'static str, fn(&[u8]));
        let targets: [Target; 9] = [
            ("control_handshake", super::control_handshake),
            ("control_frames", super::control_frames),
            ("control_messages", super::control_messages),
            ("ring_merge", super::ring_merge),
            ("persisted_state", super::persisted_state),
            ("datapath_rx", super::datapath_rx),
            ("datapath_rx_sealed", super::datapath_rx_sealed),
            ("http_path_parts", super::http_path_parts),
            ("report_template", super::report_template),
        ];
        let mut ran = 0;
        for (target, f) in targets {
            let Ok(dir) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            for entry in dir.flatten() {
                let bytes = std::fs::read(entry.path()).expect("corpus file");
                f(&bytes);
                ran += 1;
            }
        }
        assert!(ran > 0, "no corpus under {}", root.display());
    }
}
