//! The secure channel every control connection runs before its first message: a preamble,
//! a Noise handshake, then records sealed with the session's keys.
//!
//! Pure: bytes in, bytes out; the I/O adapter (`io::control`) moves them. Nothing a peer
//! sends reaches the node's state machine before the handshake has authenticated it.
//!
//! - **With a password** (`WEAVE_PASSWORD`): `Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s`, the
//!   password hashed into the pre-shared key. A peer without it fails the handshake's third
//!   message (responder side) or the first sealed record (initiator side), having shown
//!   nothing but its ephemeral and static public keys.
//! - **Without:** `Noise_XX_25519_ChaChaPoly_BLAKE2s`: still encrypted, and every peer
//!   proves that it holds the private key of the static key it presents, which the node
//!   binds to its name on first contact (a stopped node cannot be impersonated), but anyone
//!   who can reach the port can join.
//!
//! Each record is a 2-byte big-endian length and a Noise message (at most 65,535 bytes).
//! Until the handshake is over a record is at most [`HANDSHAKE_RECORD_MAX`] bytes, so an
//! unauthenticated peer cannot make the node buffer more than that.

use snow::params::NoiseParams;
use snow::{HandshakeState, StatelessTransportState};
use std::sync::Arc;

/// Bytes at the start of every connection, in both directions: `weft`, the version of this
/// channel, and whether the sender requires a password. It is not authenticated; it only
/// lets a mismatch be reported as what it is rather than as a failed decryption.
pub const PREAMBLE_LEN: usize = 8;
const MAGIC: &[u8; 4] = b"weft";
/// Version 3 of the control protocol is the first with a secure channel.
const CHANNEL_VERSION: u8 = 3;
/// The largest handshake record: the XX messages are under 100 bytes.
pub const HANDSHAKE_RECORD_MAX: usize = 256;
/// Noise's limit on one message, and so on a record after the handshake.
const NOISE_MAX: usize = 65_535;
pub const RECORD_MAX: usize = NOISE_MAX;
const TAG_LEN: usize = 16;
/// Plaintext carried by one record.
pub const RECORD_PLAINTEXT_MAX: usize = NOISE_MAX - TAG_LEN;
pub const KEY_LEN: usize = 32;

const OPEN_PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
const PSK_PATTERN: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Bound into the handshake hash, so that a weft handshake cannot be replayed into another
/// protocol using the same pattern.
const PROLOGUE: &[u8] = b"weft control v3";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecureError {
    #[error("the peer does not speak weft's control protocol v3 (an older weft, or not weft)")]
    NotWeft,
    #[error("the peer requires a password (WEAVE_PASSWORD) and this node has none")]
    PeerNeedsPassword,
    #[error("this node requires a password (WEAVE_PASSWORD) and the peer has none")]
    PeerHasNoPassword,
    #[error("handshake failed: the peer's password (WEAVE_PASSWORD) differs, or it is not a weft node ({0})")]
    Handshake(String),
    #[error("record of {len} bytes is over the limit of {max} at this stage")]
    RecordTooLarge { len: usize, max: usize },
    #[error("a record failed authentication (tampered, replayed or wrong key)")]
    Tampered,
    #[error("no more nonces on this connection")]
    NoncesExhausted,
    #[error("invalid static key: {0}")]
    Key(String),
}

/// Whether connections need the password.
#[derive(Clone)]
pub enum Mode {
    Open,
    /// The pre-shared key derived from the password.
    Password([u8; KEY_LEN]),
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Open => "Open",
            Mode::Password(_) => "Password(..)",
        })
    }
}

impl Mode {
    /// The mode for a password (`None` or empty: open). The password is stretched by one
    /// keyed BLAKE2s hash: it is the operator's secret, not a user's, and a slow KDF would
    /// only delay every connection.
    pub fn from_password(password: Option<&[u8]>) -> Mode {
        use blake2::digest::{Mac, Update};
        match password {
            Some(p) if !p.is_empty() => {
                let mut mac = blake2::Blake2sMac256::new_from_slice(b"weft psk v1")
                    .expect("key length is valid for BLAKE2s");
                Update::update(&mut mac, p);
                let mut key = [0u8; KEY_LEN];
                key.copy_from_slice(&mac.finalize().into_bytes());
                Mode::Password(key)
            }
            _ => Mode::Open,
        }
    }

    pub fn is_password(&self) -> bool {
        matches!(self, Mode::Password(_))
    }

    fn params(&self) -> NoiseParams {
        let p = if self.is_password() {
            PSK_PATTERN
        } else {
            OPEN_PATTERN
        };
        p.parse().expect("a valid Noise pattern")
    }
}

/// A node's long-lived X25519 key pair (kept in `--db-dir`).
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; KEY_LEN],
    public: [u8; KEY_LEN],
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticKey({})", hex(&self.public))
    }
}

impl StaticKey {
    /// A new random key pair (the OS's randomness, through snow).
    pub fn generate() -> Result<StaticKey, SecureError> {
        let kp = snow::Builder::new(OPEN_PATTERN.parse().expect("valid pattern"))
            .generate_keypair()
            .map_err(|e| SecureError::Key(e.to_string()))?;
        Self::from_private(&kp.private)
    }

    /// The pair for a private key (32 bytes).
    pub fn from_private(private: &[u8]) -> Result<StaticKey, SecureError> {
        let private: [u8; KEY_LEN] = private.try_into().map_err(|_| {
            SecureError::Key(format!("{} bytes, expected {KEY_LEN}", private.len()))
        })?;
        let public = x25519_public(&private);
        Ok(StaticKey { private, public })
    }

    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.public)
    }
}

/// The public half, as a node's identity: what a peer name is bound to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SecureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = unhex(s).ok_or_else(|| SecureError::Key(format!("not hex: {s:?}")))?;
        let key: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|_| SecureError::Key(format!("{s:?} is not {KEY_LEN} bytes")))?;
        Ok(PublicKey(key))
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn x25519_public(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    // snow's own X25519 (its default resolver) derives the public key: no second
    // implementation of the curve in weft.
    use snow::params::DHChoice;
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&DHChoice::Curve25519)
        .expect("the default resolver has X25519");
    dh.set(private);
    let mut public = [0u8; KEY_LEN];
    public.copy_from_slice(dh.pubkey());
    public
}

/// The preamble this node sends.
pub fn preamble(mode: &Mode) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(MAGIC);
    p[4] = CHANNEL_VERSION;
    p[5] = u8::from(mode.is_password());
    p
}

/// Checks the peer's preamble against this node's mode.
pub fn check_preamble(mode: &Mode, theirs: &[u8; PREAMBLE_LEN]) -> Result<(), SecureError> {
    if &theirs[..4] != MAGIC || theirs[4] != CHANNEL_VERSION {
        return Err(SecureError::NotWeft);
    }
    match (mode.is_password(), theirs[5]) {
        (false, 1) => Err(SecureError::PeerNeedsPassword),
        (true, 0) => Err(SecureError::PeerHasNoPassword),
        (_, 0 | 1) => Ok(()),
        _ => Err(SecureError::NotWeft),
    }
}

/// Splits a byte stream into records. A record longer than `max` is refused from its
/// length prefix, before its body is buffered; the caller feeds one read at a time.
#[derive(Debug)]
pub struct RecordReader {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl RecordReader {
    pub fn new(max: usize) -> RecordReader {
        RecordReader {
            buf: Vec::new(),
            start: 0,
            max,
        }
    }

    /// Raises the limit (once the peer is authenticated).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            // What was taken is dropped; at most one partial record moves to the front.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > 4 * NOISE_MAX {
            // A burst is over: give its memory back.
            self.buf = Vec::new();
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes fed but not yet taken as records.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole record, if one has arrived. An error ends the connection.
    pub fn next_record(&mut self) -> Result<Option<&mut [u8]>, SecureError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        if len > self.max {
            return Err(SecureError::RecordTooLarge { len, max: self.max });
        }
        if avail.len() < 2 + len {
            return Ok(None);
        }
        let from = self.start + 2;
        self.start = from + len;
        Ok(Some(&mut self.buf[from..from + len]))
    }
}

fn push_record(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

/// One side of the handshake.
pub struct Handshake {
    state: HandshakeState,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("finished", &self.state.is_handshake_finished())
            .finish()
    }
}

/// The outcome of a finished handshake.
pub struct Established {
    pub remote: PublicKey,
    pub sealer: Sealer,
    pub opener: Opener,
}

impl Handshake {
    /// `initiator`: this node dialled.
    pub fn new(key: &StaticKey, mode: &Mode, initiator: bool) -> Result<Handshake, SecureError> {
        let err = |e: snow::Error| SecureError::Handshake(e.to_string());
        let mut b = snow::Builder::new(mode.params())
            .prologue(PROLOGUE)
            .map_err(err)?
            .local_private_key(key.private())
            .map_err(err)?;
        if let Mode::Password(psk) = mode {
            b = b.psk(3, psk).map_err(err)?;
        }
        let state = if initiator {
            b.build_initiator()
        } else {
            b.build_responder()
        }
        .map_err(err)?;
        Ok(Handshake { state })
    }

    /// Whether this side sends the next handshake record.
    pub fn is_my_turn(&self) -> bool {
        !self.state.is_handshake_finished() && self.state.is_my_turn()
    }

    pub fn is_finished(&self) -> bool {
        self.state.is_handshake_finished()
    }

    /// Appends this side's next handshake record to `out`.
    pub fn write(&mut self, out: &mut Vec<u8>) -> Result<(), SecureError> {
        let mut msg = [0u8; HANDSHAKE_RECORD_MAX];
        let n = self
            .state
            .write_message(&[], &mut msg)
            .map_err(|e| SecureError::Handshake(e.to_string()))?;
        push_record(out, &msg[..n]);
        Ok(())
    }

    /// Takes the peer's handshake record (its body, without the length).
    pub fn read(&mut self, record: &[u8]) -> Result<(), SecureError> {
        let mut payload = [0u8; HANDSHAKE_RECORD_MAX];
        self.state
            .read_message(record, &mut payload)
            .map(|_| ())
            .map_err(|e| SecureError::Handshake(e.to_string()))
    }

    /// The session, once [`Handshake::is_finished`].
    pub fn finish(self) -> Result<Established, SecureError> {
        let remote = self
            .state
            .get_remote_static()
            .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
            .map(PublicKey)
            .ok_or_else(|| SecureError::Handshake("no static key from the peer".into()))?;
        let transport = Arc::new(
            self.state
                .into_stateless_transport_mode()
                .map_err(|e| SecureError::Handshake(e.to_string()))?,
        );
        Ok(Established {
            remote,
            sealer: Sealer {
                transport: transport.clone(),
                nonce: 0,
            },
            opener: Opener {
                transport,
                nonce: 0,
            },
        })
    }
}

/// Seals outgoing bytes into records. Nonces count up from 0, one per record; TCP keeps
/// them in order, so the opener expects exactly the next one (no replay window needed).
pub struct Sealer {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// Appends `plaintext`, sealed into as many records as it needs, to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        for chunk in plaintext.chunks(RECORD_PLAINTEXT_MAX) {
            if self.nonce == u64::MAX {
                return Err(SecureError::NoncesExhausted);
            }
            let at = out.len();
            out.resize(at + 2 + chunk.len() + TAG_LEN, 0);
            let n = self
                .transport
                .write_message(self.nonce, chunk, &mut out[at + 2..])
                .map_err(|e| SecureError::Handshake(e.to_string()))?;
            debug_assert_eq!(n, chunk.len() + TAG_LEN);
            out[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            self.nonce += 1;
        }
        Ok(())
    }
}

/// Opens incoming records.
pub struct Opener {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Opener {
    /// Appends the plaintext of one record (its body, without the length) to `out`.
    pub fn open(&mut self, record: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        if record.len() < TAG_LEN {
            return Err(SecureError::Tampered);
        }
        if self.nonce == u64::MAX {
            return Err(SecureError::NoncesExhausted);
        }
        let at = out.len();
        out.resize(at + record.len() - TAG_LEN, 0);
        match self
            .transport
            .read_message(self.nonce, record, &mut out[at..])
        {
            Ok(n) => {
                out.truncate(at + n);
                self.nonce += 1;
                Ok(())
            }
            Err(_) => {
                out.truncate(at);
                Err(SecureError::Tampered)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StaticKey {
        StaticKey::from_private(&[b; 32]).unwrap()
    }

    /// Runs a handshake between two in-memory sides; Err carries each side's failure.
    fn run(
        a: (&StaticKey, &Mode),
        b: (&StaticKey, &Mode),
    ) -> Result<(Established, Established), SecureError> {
        let mut i = Handshake::new(a.0, a.1, true)?;
        let mut r = Handshake::new(b.0, b.1, false)?;
        let mut wire = Vec::new();
        let mut rr = RecordReader::new(HANDSHAKE_RECORD_MAX);
        let mut ir = RecordReader::new(HANDSHAKE_RECORD_MAX);
        while !(i.is_finished() && r.is_finished()) {
            if i.is_my_turn() {
                wire.clear();
                i.write(&mut wire)?;
                rr.feed(&wire);
                let rec = rr.next_record()?.unwrap().to_vec();
                r.read(&rec)?;
            } else {
                wire.clear();
                r.write(&mut wire)?;
                ir.feed(&wire);
                let rec = ir.next_record()?.unwrap().to_vec();
                i.read(&rec)?;
            }
        }
        Ok((i.finish()?, r.finish()?))
    }

    fn exchange(
        from: &mut Established,
        to: &mut Established,
        msg: &[u8],
    ) -> Result<Vec<u8>, SecureError> {
        let mut wire = Vec::new();
        from.sealer.seal(msg, &mut wire)?;
        let mut rd = RecordReader::new(NOISE_MAX);
        rd.feed(&wire);
        let mut plain = Vec::new();
        while let Some(rec) = rd.next_record()? {
            let rec = rec.to_vec();
            to.opener.open(&rec, &mut plain)?;
        }
        Ok(plain)
    }

    #[test]
    fn same_password_gives_a_channel_and_each_side_learns_the_others_key() {
        let m = Mode::from_password(Some(b"s3cret"));
        let (mut a, mut b) = run((&key(1), &m), (&key(2), &m)).unwrap();
        assert_eq!(a.remote, key(2).public());
        assert_eq!(b.remote, key(1).public());
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(
            exchange(&mut a, &mut b, &big).unwrap(),
            big,
            "several records"
        );
        assert_eq!(exchange(&mut b, &mut a, b"hi").unwrap(), b"hi");
    }

    #[test]
    fn a_different_password_fails_the_handshake() {
        let a = Mode::from_password(Some(b"one"));
        let b = Mode::from_password(Some(b"two"));
        let e = run((&key(1), &a), (&key(2), &b)).err().unwrap();
        assert!(matches!(e, SecureError::Handshake(_)), "{e}");
    }

    #[test]
    fn open_mode_still_authenticates_keys_and_encrypts() {
        let (mut a, mut b) = run((&key(1), &Mode::Open), (&key(2), &Mode::Open)).unwrap();
        assert_eq!(b.remote, key(1).public());
        let mut wire = Vec::new();
        a.sealer.seal(b"ring and peers", &mut wire).unwrap();
        assert!(
            !wire.windows(4).any(|w| w == b"ring"),
            "plaintext on the wire"
        );
        let mut plain = Vec::new();
        b.opener.open(&wire[2..], &mut plain).unwrap();
        assert_eq!(plain, b"ring and peers");
        assert_eq!(exchange(&mut a, &mut b, b"x").unwrap(), b"x");
    }

    #[test]
    fn tampered_replayed_or_reordered_records_are_refused() {
        let m = Mode::from_password(Some(b"pw"));
        let (mut a, mut b) = run((&key(1), &m), (&key(2), &m)).unwrap();
        let mut one = Vec::new();
        a.sealer.seal(b"first", &mut one).unwrap();
        let mut two = Vec::new();
        a.sealer.seal(b"second", &mut two).unwrap();
        let mut out = Vec::new();
        // Reordered: the second record under the first nonce.
        assert_eq!(
            b.opener.open(&two[2..], &mut out),
            Err(SecureError::Tampered)
        );
        b.opener.open(&one[2..], &mut out).unwrap();
        // Replayed.
        assert_eq!(
            b.opener.open(&one[2..], &mut out),
            Err(SecureError::Tampered)
        );
        let mut bad = two.clone();
        bad[5] ^= 1;
        assert_eq!(
            b.opener.open(&bad[2..], &mut out),
            Err(SecureError::Tampered)
        );
        b.opener.open(&two[2..], &mut out).unwrap();
        assert_eq!(out, b"firstsecond");
    }

    #[test]
    fn preambles_report_mismatches_clearly() {
        let pw = Mode::from_password(Some(b"x"));
        assert_eq!(check_preamble(&pw, &preamble(&pw)), Ok(()));
        assert_eq!(check_preamble(&Mode::Open, &preamble(&Mode::Open)), Ok(()));
        assert_eq!(
            check_preamble(&Mode::Open, &preamble(&pw)),
            Err(SecureError::PeerNeedsPassword)
        );
        assert_eq!(
            check_preamble(&pw, &preamble(&Mode::Open)),
            Err(SecureError::PeerHasNoPassword)
        );
        assert_eq!(
            check_preamble(&pw, b"\0\0\0\x10{\"ty"),
            Err(SecureError::NotWeft),
            "a v2 peer's first JSON frame"
        );
    }

    #[test]
    fn records_over_the_limit_end_the_connection_before_they_are_buffered() {
        let mut r = RecordReader::new(HANDSHAKE_RECORD_MAX);
        r.feed(&[0xff, 0xff, 1, 2, 3]);
        assert_eq!(
            r.next_record().err(),
            Some(SecureError::RecordTooLarge {
                len: 65535,
                max: HANDSHAKE_RECORD_MAX
            })
        );
    }

    #[test]
    fn keys_round_trip_as_hex() {
        let k = key(7).public();
        let s = k.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<PublicKey>().unwrap(), k);
        assert!("zz".parse::<PublicKey>().is_err());
        assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{s}\""));
        assert_ne!(key(7).public(), key(8).public());
    }
}
