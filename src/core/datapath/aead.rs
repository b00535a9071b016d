//! The data plane's authenticated encryption (with `WEAVE_PASSWORD`): every datagram
//! between two nodes is sealed with AES-256-GCM under a key the sender chose and gave its
//! peer over their authenticated, encrypted control connection (see
//! `core::mesh::datakeys`). A datagram nobody with the key sealed, or one already
//! received, is refused before decapsulation: a spoofed underlay source address gains
//! nothing.
//!
//! Wire format (24 bytes more than plain VXLAN):
//! ```text
//! [key id: 1][counter: 7, big-endian][AES-256-GCM(VXLAN header + inner frame)][tag: 16]
//! ```
//! The nonce is four zero bytes and the first eight; those eight are also the associated
//! data. Each key sends at most 2^56 datagrams, and keys are replaced every few minutes,
//! so a (key, nonce) pair never repeats. The key id tells the receiver which of the
//! sender's last two keys sealed the datagram, so a key change loses nothing in flight.
//!
//! Keys live in each peer's [`PeerState`] (which outlives route table rebuilds) behind
//! `arc_swap` pointers: the control plane swaps them without stopping the workers, and
//! a worker's load is lock-free. The replay window is atomics written by the one receive
//! worker, so it needs no lock either.

use super::transform::{OpenError, Sealed, Transform};
use crate::core::route::{PeerRoute, PeerState};
use arc_swap::ArcSwapOption;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const KEY_LEN: usize = 32;
/// Key id and counter, before the sealed VXLAN datagram.
pub const HEADER_LEN: usize = 8;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed datagram has over a plain one.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Counters are 56 bits (the key id takes the top byte).
const COUNTER_LIMIT: u64 = 1 << 56;
/// Datagrams a receiver still takes when they arrive this far behind the newest it has
/// seen: the transmit workers take counters independently, and GSO batches of different
/// workers interleave on the wire. One word of the bitmap short of its size (RFC 6479),
/// so that the word the newest counter is in never shares its slot with the oldest's.
pub const REPLAY_WINDOW: u64 = (WINDOW_WORDS as u64 - 1) * 64;
const WINDOW_WORDS: usize = 128;

/// A key as the control plane hands it over: its id and secret.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey {
    pub id: u8,
    pub secret: [u8; KEY_LEN],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey {{ id: {}, secret: <redacted> }}", self.id)
    }
}

fn cipher(secret: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, secret).expect("32 bytes is AES-256's key"))
}

/// The key this node seals with, for one peer.
pub struct TxKey {
    id: u8,
    key: LessSafeKey,
    next: AtomicU64,
}

impl TxKey {
    pub fn new(k: &DataKey) -> TxKey {
        TxKey {
            id: k.id,
            key: cipher(&k.secret),
            next: AtomicU64::new(0),
        }
    }

    /// The next counter, or `None` once the key is used up (it is replaced long before).
    fn take_counter(&self) -> Option<u64> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n < COUNTER_LIMIT).then_some(n)
    }
}

/// A key a peer seals with, and the counters already received under it.
pub struct RxKey {
    id: u8,
    key: LessSafeKey,
    window: ReplayWindow,
}

impl RxKey {
    pub fn new(k: &DataKey) -> RxKey {
        RxKey {
            id: k.id,
            key: cipher(&k.secret),
            window: ReplayWindow::default(),
        }
    }
}

/// Which counters were seen: the newest, and a bitmap of the [`REPLAY_WINDOW`] before it.
/// One writer (the receive worker); atomics only so that it can sit in shared state.
struct ReplayWindow {
    /// One more than the highest counter accepted; 0 before the first.
    top: AtomicU64,
    bits: [AtomicU64; WINDOW_WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: AtomicU64::new(0),
            bits: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl ReplayWindow {
    /// Whether `n` may still be accepted (not too old, not seen). Checked before the
    /// datagram is authenticated, so a forged one costs no decryption when it replays.
    fn fresh(&self, n: u64) -> bool {
        let top = self.top.load(Ordering::Relaxed);
        if n >= top {
            return true;
        }
        if top - n > REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Self::slot(n);
        self.bits[w].load(Ordering::Relaxed) & (1 << b) == 0
    }

    /// Records `n` as received; only after it authenticated, so forgeries cannot move the
    /// window. Returns false if it was seen meanwhile.
    fn commit(&self, n: u64) -> bool {
        let top = self.top.load(Ordering::Relaxed);
        if n >= top {
            // Clear the words the window slides over (all of them after a long jump).
            let from = top.div_ceil(64);
            let to = (n / 64) + 1;
            if to - from.min(to) >= WINDOW_WORDS as u64 {
                for w in &self.bits {
                    w.store(0, Ordering::Relaxed);
                }
            } else {
                for word in from..to {
                    self.bits[(word % WINDOW_WORDS as u64) as usize].store(0, Ordering::Relaxed);
                }
            }
            self.top.store(n + 1, Ordering::Relaxed);
        } else if top - n > REPLAY_WINDOW {
            return false;
        }
        let (w, b) = Self::slot(n);
        self.bits[w].fetch_or(1 << b, Ordering::Relaxed) & (1 << b) == 0
    }

    fn slot(n: u64) -> (usize, u32) {
        (((n / 64) % WINDOW_WORDS as u64) as usize, (n % 64) as u32)
    }
}

/// One peer's keys: the one this node seals with (once the peer confirmed it has it), and
/// the peer's last two, by the parity of their ids.
#[derive(Default)]
pub struct PeerCrypto {
    tx: ArcSwapOption<TxKey>,
    rx: [ArcSwapOption<RxKey>; 2],
}

impl std::fmt::Debug for PeerCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = |k: Option<&Arc<TxKey>>| k.map(|k| k.id);
        let rx = |i: usize| self.rx[i].load().as_ref().map(|k| k.id);
        f.debug_struct("PeerCrypto")
            .field("tx", &id(self.tx.load().as_ref()))
            .field("rx", &[rx(0), rx(1)])
            .finish()
    }
}

impl PeerCrypto {
    pub fn set_tx(&self, k: &DataKey) {
        self.tx.store(Some(Arc::new(TxKey::new(k))));
    }

    /// The peer's new key; its previous one stays usable (the other slot) until the next.
    pub fn add_rx(&self, k: &DataKey) {
        self.rx[usize::from(k.id & 1)].store(Some(Arc::new(RxKey::new(k))));
    }

    pub fn clear(&self) {
        self.tx.store(None);
        for r in &self.rx {
            r.store(None);
        }
    }

    pub fn tx_id(&self) -> Option<u8> {
        self.tx.load().as_ref().map(|k| k.id)
    }

    pub fn rx_ids(&self) -> Vec<u8> {
        self.rx
            .iter()
            .filter_map(|r| r.load().as_ref().map(|k| k.id))
            .collect()
    }
}

/// The sealing transform: each segment is copied into the output buffer behind its key id
/// and counter, encrypted there in place, and followed by its tag.
pub struct Aead {
    out: Vec<u8>,
    used: usize,
}

impl Aead {
    /// A transform for a transmit worker whose batches hold at most `capacity` bytes of
    /// sealed datagrams (a receive worker's needs none).
    pub fn new(capacity: usize) -> Aead {
        Aead {
            out: vec![0; capacity],
            used: 0,
        }
    }
}

fn nonce(header: &[u8; HEADER_LEN]) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(header);
    Nonce::assume_unique_for_key(n)
}

fn header_bytes(id: u8, counter: u64) -> [u8; HEADER_LEN] {
    let mut h = counter.to_be_bytes();
    h[0] = id;
    h
}

impl Transform for Aead {
    const HEADROOM: usize = HEADER_LEN;
    const TAILROOM: usize = TAG_LEN;
    const PASSTHROUGH: bool = false;

    fn seal(&mut self, peer: &PeerRoute, header: &mut [u8], payload: &[u8]) -> Sealed {
        let state: &PeerState = &peer.counters;
        let guard = state.crypto.tx.load();
        let Some(tx) = guard.as_ref() else {
            return Sealed::Refused;
        };
        let Some(body) = (header.len() + payload.len()).checked_sub(HEADER_LEN) else {
            debug_assert!(false, "the planner reserves the headroom in every header");
            return Sealed::Refused;
        };
        let start = self.used;
        let end = start + HEADER_LEN + body + TAG_LEN;
        if header.len() < HEADER_LEN || end > self.out.len() {
            debug_assert!(false, "the output buffer is sized for a full batch");
            return Sealed::Refused;
        }
        let Some(counter) = tx.take_counter() else {
            return Sealed::Refused;
        };
        let hdr = header_bytes(tx.id, counter);
        let out = &mut self.out[start..end];
        out[..HEADER_LEN].copy_from_slice(&hdr);
        let (h, rest) = out[HEADER_LEN..].split_at_mut(header.len() - HEADER_LEN);
        h.copy_from_slice(&header[HEADER_LEN..]);
        rest[..payload.len()].copy_from_slice(payload);
        let in_out = &mut out[HEADER_LEN..HEADER_LEN + body];
        let Ok(tag) = tx
            .key
            .seal_in_place_separate_tag(nonce(&hdr), Aad::from(hdr), in_out)
        else {
            return Sealed::Refused;
        };
        out[HEADER_LEN + body..].copy_from_slice(tag.as_ref());
        self.used = end;
        Sealed::Replaced(start..end)
    }

    fn output(&self) -> &[u8] {
        &self.out[..self.used]
    }

    fn reset(&mut self) {
        self.used = 0;
    }

    fn open(&mut self, peer: &PeerRoute, datagram: &mut [u8]) -> Result<Range<usize>, OpenError> {
        if datagram.len() < OVERHEAD {
            return Err(OpenError::Truncated);
        }
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&datagram[..HEADER_LEN]);
        let id = hdr[0];
        let guard = peer.counters.crypto.rx[usize::from(id & 1)].load();
        let Some(rx) = guard.as_ref().filter(|k| k.id == id) else {
            return Err(OpenError::Unauthenticated);
        };
        let mut c = hdr;
        c[0] = 0;
        let counter = u64::from_be_bytes(c);
        if !rx.window.fresh(counter) {
            return Err(OpenError::Replayed);
        }
        let len = rx
            .key
            .open_in_place(nonce(&hdr), Aad::from(hdr), &mut datagram[HEADER_LEN..])
            .map_err(|_| OpenError::Unauthenticated)?
            .len();
        if !rx.window.commit(counter) {
            return Err(OpenError::Replayed);
        }
        Ok(HEADER_LEN..HEADER_LEN + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mesh::PeerName;

    fn peer() -> PeerRoute {
        let name: PeerName = "aa:00:00:00:00:01".parse().unwrap();
        PeerRoute {
            mac: name.mac(),
            name,
            nickname: "a".into(),
            data_addr: None,
            counters: Arc::default(),
        }
    }

    fn key(id: u8, fill: u8) -> DataKey {
        DataKey {
            id,
            secret: [fill; KEY_LEN],
        }
    }

    /// Seals `body` (as a segment with `HEADER_LEN` of headroom, split into header and
    /// payload at `split`) from `tx` and returns the datagram.
    fn seal(t: &mut Aead, tx: &PeerRoute, body: &[u8], split: usize) -> Option<Vec<u8>> {
        let mut header = vec![0u8; HEADER_LEN];
        header.extend_from_slice(&body[..split]);
        match t.seal(tx, &mut header, &body[split..]) {
            Sealed::Replaced(r) => Some(t.output()[r].to_vec()),
            Sealed::Refused => None,
            Sealed::AsPlanned => panic!("a cipher never sends the plain segment"),
        }
    }

    fn pair() -> (PeerRoute, PeerRoute) {
        let (a, b) = (peer(), peer());
        a.counters.crypto.set_tx(&key(1, 7));
        b.counters.crypto.add_rx(&key(1, 7));
        (a, b)
    }

    #[test]
    fn what_one_side_seals_the_other_opens_and_nothing_else() {
        let (a, b) = pair();
        let mut t = Aead::new(1 << 16);
        let body: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let d = seal(&mut t, &a, &body, 64).unwrap();
        assert_eq!(d.len(), body.len() + OVERHEAD);
        assert_ne!(
            &d[HEADER_LEN..HEADER_LEN + body.len()],
            &body[..],
            "encrypted"
        );
        let mut rx = Aead::new(0);
        let mut got = d.clone();
        let r = rx.open(&b, &mut got).unwrap();
        assert_eq!(&got[r], &body[..]);
        // Replayed: refused.
        let mut again = d.clone();
        assert_eq!(rx.open(&b, &mut again), Err(OpenError::Replayed));
        // Any bit flipped anywhere: refused.
        for i in [0, 3, HEADER_LEN, HEADER_LEN + 100, d.len() - 1] {
            let mut bad = d.clone();
            bad[i] ^= 0x10;
            assert!(rx.open(&b, &mut bad).is_err(), "byte {i} flipped");
        }
        // Another key (a host that is not a member guessing): refused.
        let stranger = peer();
        stranger.counters.crypto.set_tx(&key(1, 8));
        // (Its first counter, 0, is refused as a replay before any decryption.)
        let mut first = seal(&mut t, &stranger, &body, 64).unwrap();
        assert_eq!(rx.open(&b, &mut first), Err(OpenError::Replayed));
        let mut forged = seal(&mut t, &stranger, &body, 64).unwrap();
        assert_eq!(rx.open(&b, &mut forged), Err(OpenError::Unauthenticated));
        let mut short = vec![1u8; OVERHEAD - 1];
        assert_eq!(rx.open(&b, &mut short), Err(OpenError::Truncated));
    }

    #[test]
    fn no_key_no_send() {
        let mut t = Aead::new(1 << 16);
        assert_eq!(seal(&mut t, &peer(), &[0u8; 100], 50), None);
    }

    #[test]
    fn a_new_key_takes_over_while_the_previous_still_opens() {
        let (a, b) = pair();
        let mut t = Aead::new(1 << 16);
        let mut rx = Aead::new(0);
        let old = seal(&mut t, &a, &[1u8; 200], 10).unwrap();
        // The peer gets key 2 first, then this side seals with it.
        b.counters.crypto.add_rx(&key(2, 9));
        a.counters.crypto.set_tx(&key(2, 9));
        let new = seal(&mut t, &a, &[2u8; 200], 10).unwrap();
        assert_eq!(new[0], 2);
        let mut d = new.clone();
        assert!(rx.open(&b, &mut d).is_ok());
        // In flight under the old key: still delivered.
        let mut d = old.clone();
        assert!(rx.open(&b, &mut d).is_ok());
        // Key 3 replaces key 1 (same slot): the old key's datagrams are refused.
        b.counters.crypto.add_rx(&key(3, 10));
        let mut d = old.clone();
        assert_eq!(rx.open(&b, &mut d), Err(OpenError::Unauthenticated));
        b.counters.crypto.clear();
        let mut d = new.clone();
        assert_eq!(rx.open(&b, &mut d), Err(OpenError::Unauthenticated));
    }

    #[test]
    fn the_window_takes_reordered_counters_once_and_refuses_old_ones() {
        let w = ReplayWindow::default();
        assert!(w.fresh(5) && w.commit(5));
        assert!(!w.fresh(5) && !w.commit(5));
        for n in [3, 0, 4, 1, 2] {
            assert!(w.fresh(n) && w.commit(n), "{n} arrives late, once");
        }
        assert!(w.commit(REPLAY_WINDOW + 5));
        assert!(w.fresh(6) && w.commit(6), "exactly the window behind");
        assert!(!w.fresh(5), "just out of the window");
        // A long jump forgets everything before it, and reuses the words cleanly.
        let far = 10 * REPLAY_WINDOW + 3;
        assert!(w.commit(far));
        for n in far + 1 - REPLAY_WINDOW..far {
            assert!(w.fresh(n), "{n} not seen");
        }
        assert!(!w.fresh(far - REPLAY_WINDOW));
    }

    proptest::proptest! {
        /// Against a model (a set of everything accepted): a counter is accepted at most
        /// once, and always if it is new and within the window of the highest.
        #[test]
        fn the_window_matches_a_model(ops in proptest::collection::vec(0u64..30_000, 1..400)) {
            let w = ReplayWindow::default();
            let mut seen = std::collections::BTreeSet::new();
            let mut top: Option<u64> = None;
            for n in ops {
                let expect = !seen.contains(&n) && top.is_none_or(|t| n + REPLAY_WINDOW > t);
                let got = w.fresh(n) && w.commit(n);
                proptest::prop_assert_eq!(got, expect, "counter {}", n);
                if got {
                    seen.insert(n);
                    top = Some(top.map_or(n, |t| t.max(n)));
                }
            }
        }
    }
}
