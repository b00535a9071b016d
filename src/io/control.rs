//! The control connection adapter: byte streams carrying framed control messages. It knows
//! nothing of what the messages mean; the router feeds them to the core's `Node`. The
//! reader and writer are generic over the stream, so a handshake and cipher layer can sit
//! between them and the TCP socket.

use crate::core::mesh::message::{
    encode, Decoder, FrameError, Message, MAX_FRAME, MAX_FRAME_BEFORE_HELLO,
};
use crate::core::mesh::secure::{
    self, Handshake, Mode, Opener, PublicKey, RecordReader, Sealer, SecureError, StaticKey,
    HANDSHAKE_RECORD_MAX, PREAMBLE_LEN,
};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// A peer that sends nothing (not even a heartbeat) for this long is considered gone; the
/// core sends heartbeats much more often than this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ControlIoError {
    #[error("connection closed by peer")]
    Eof,
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Secure(#[from] SecureError),
    #[error("the peer has not read for {0:?}")]
    Stalled(Duration),
}

/// Sets the socket options a control connection wants: no Nagle delay for small gossip
/// messages, and TCP keepalive so that a vanished node is noticed even when idle.
pub fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    sock.set_tcp_keepalive(&ka)
}

/// How long a new connection has for the preamble, the handshake and its Hello: a peer
/// that is slower (or sends one byte every few seconds) is dropped, so slow connections
/// cannot pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write may wait for the peer to read: a peer that does not read is dropped
/// rather than buffered for.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the preamble and the Noise handshake on `stream` (the caller bounds its time with
/// [`HANDSHAKE_TIMEOUT`]). On success the peer proved it holds `remote`'s private key, and
/// with a password that it knows the password; nothing it sent was parsed beyond the
/// handshake records, each at most [`HANDSHAKE_RECORD_MAX`] bytes.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &StaticKey,
    mode: &Mode,
    initiator: bool,
) -> Result<
    (
        FrameReader<ReadHalf<S>>,
        FrameWriter<WriteHalf<S>>,
        PublicKey,
    ),
    ControlIoError,
> {
    stream.write_all(&secure::preamble(mode)).await?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    read_exact(&mut stream, &mut theirs).await?;
    secure::check_preamble(mode, &theirs)?;

    let mut hs = Handshake::new(key, mode, initiator)?;
    let mut records = RecordReader::new(HANDSHAKE_RECORD_MAX);
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while !hs.is_finished() {
        if hs.is_my_turn() {
            out.clear();
            hs.write(&mut out)?;
            stream.write_all(&out).await?;
            continue;
        }
        loop {
            if let Some(rec) = records.next_record()? {
                hs.read(rec)?;
                break;
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(ControlIoError::Eof);
            }
            records.feed(&buf[..n]);
        }
    }
    let est = hs.finish()?;
    records.set_max(secure::RECORD_MAX);
    let (read_half, write_half) = tokio::io::split(stream);
    Ok((
        FrameReader {
            half: read_half,
            records,
            opener: est.opener,
            plain: Vec::new(),
            decoder: Decoder::with_max(MAX_FRAME_BEFORE_HELLO),
            buf: vec![0; 64 * 1024],
        },
        FrameWriter {
            half: write_half,
            sealer: est.sealer,
            frame: Vec::new(),
            wire: Vec::new(),
        },
        est.remote,
    ))
}

async fn read_exact<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<(), ControlIoError> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ControlIoError::Eof),
        Err(e) => Err(e.into()),
    }
}

/// Reads sealed records and yields the messages in them.
pub struct FrameReader<R> {
    half: R,
    records: RecordReader,
    opener: Opener,
    plain: Vec<u8>,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Lifts the frame limit once the peer's Hello is accepted (a ring may be large).
    pub fn accept_large_frames(&mut self) {
        self.decoder.set_max(MAX_FRAME);
    }

    /// The next message; an error means the connection must be dropped.
    pub async fn next(&mut self) -> Result<Message, ControlIoError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(m);
            }
            // One record at a time, so that a frame over the limit is refused after at most
            // one record past it.
            if let Some(rec) = self.records.next_record()? {
                self.plain.clear();
                self.opener.open(rec, &mut self.plain)?;
                self.decoder.feed(&self.plain);
                continue;
            }
            let n = tokio::time::timeout(IDLE_TIMEOUT, self.half.read(&mut self.buf))
                .await
                .map_err(|_| ControlIoError::Idle(IDLE_TIMEOUT))??;
            if n == 0 {
                return Err(ControlIoError::Eof);
            }
            self.records.feed(&self.buf[..n]);
        }
    }
}

/// Frames and seals messages.
pub struct FrameWriter<W> {
    half: W,
    sealer: Sealer,
    frame: Vec<u8>,
    wire: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub async fn send(&mut self, msg: &Message) -> Result<(), ControlIoError> {
        self.frame.clear();
        encode(msg, &mut self.frame);
        self.wire.clear();
        self.sealer.seal(&self.frame, &mut self.wire)?;
        tokio::time::timeout(WRITE_TIMEOUT, self.half.write_all(&self.wire))
            .await
            .map_err(|_| ControlIoError::Stalled(WRITE_TIMEOUT))??;
        if self.frame.capacity() > 1024 * 1024 {
            // A ring went out: do not keep megabytes per connection for heartbeats.
            self.frame = Vec::new();
            self.wire = Vec::new();
        }
        Ok(())
    }

    pub async fn shutdown(&mut self) {
        let _ = self.half.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mesh::message::Message;

    fn key(b: u8) -> StaticKey {
        StaticKey::from_private(&[b; 32]).unwrap()
    }

    async fn pair(
        a: Mode,
        b: Mode,
    ) -> (
        Result<
            (
                FrameReader<ReadHalf<tokio::io::DuplexStream>>,
                FrameWriter<WriteHalf<tokio::io::DuplexStream>>,
                PublicKey,
            ),
            ControlIoError,
        >,
        Result<
            (
                FrameReader<ReadHalf<tokio::io::DuplexStream>>,
                FrameWriter<WriteHalf<tokio::io::DuplexStream>>,
                PublicKey,
            ),
            ControlIoError,
        >,
    ) {
        let (x, y) = tokio::io::duplex(4096);
        let (ka, kb) = (key(1), key(2));
        tokio::join!(handshake(x, &ka, &a, true), handshake(y, &kb, &b, false))
    }

    #[tokio::test]
    async fn messages_cross_the_secure_channel_and_eof_ends_it() {
        let pw = Mode::from_password(Some(b"pw"));
        let (a, b) = pair(pw.clone(), pw).await;
        let (_ar, mut w, kb) = a.unwrap();
        let (mut r, _bw, ka) = b.unwrap();
        assert_eq!((ka, kb), (key(1).public(), key(2).public()));
        w.send(&Message::HEARTBEAT).await.unwrap();
        w.send(&Message::Digest { ring: Some(9) }).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Message::HEARTBEAT);
        assert_eq!(r.next().await.unwrap(), Message::Digest { ring: Some(9) });
        w.shutdown().await;
        assert!(matches!(r.next().await, Err(ControlIoError::Eof)));
    }

    #[tokio::test]
    async fn a_peer_without_the_password_gets_a_clear_refusal() {
        let (a, b) = pair(Mode::Open, Mode::from_password(Some(b"pw"))).await;
        assert!(matches!(
            a.err(),
            Some(ControlIoError::Secure(SecureError::PeerNeedsPassword))
        ));
        assert!(matches!(
            b.err(),
            Some(ControlIoError::Secure(SecureError::PeerHasNoPassword))
        ));
        let (a, b) = pair(
            Mode::from_password(Some(b"a")),
            Mode::from_password(Some(b"b")),
        )
        .await;
        assert!(
            a.is_err() || b.is_err(),
            "a wrong password never gives a channel"
        );
    }

    #[tokio::test]
    async fn before_the_hello_only_small_frames_are_taken() {
        let (a, b) = pair(Mode::Open, Mode::Open).await;
        let (_ar, mut w, _) = a.unwrap();
        let (mut r, _bw, _) = b.unwrap();
        let big = Message::Gossip {
            peers: Vec::new(),
            ring: None,
            gated: false,
            answer: false,
        };
        // A frame claiming 16 MiB before any Hello: refused from its header.
        w.frame.clear();
        w.frame.extend_from_slice(&(16u32 << 20).to_be_bytes());
        w.wire.clear();
        w.sealer.seal(&w.frame, &mut w.wire).unwrap();
        w.half.write_all(&w.wire).await.unwrap();
        let e = r.next().await.unwrap_err();
        assert!(
            matches!(e, ControlIoError::Frame(FrameError::TooLarge { .. })),
            "{e}"
        );
        let _ = big;
    }

    #[tokio::test]
    async fn garbage_instead_of_a_preamble_is_not_weft() {
        let (x, mut y) = tokio::io::duplex(4096);
        y.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let e = handshake(x, &key(1), &Mode::Open, false)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(e, ControlIoError::Secure(SecureError::NotWeft)),
            "{e}"
        );
    }
}
