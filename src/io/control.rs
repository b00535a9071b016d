//! The control connection adapter: byte streams carrying framed control messages. It knows
//! nothing of what the messages mean; the router feeds them to the core's `Node`. The
//! reader and writer are generic over the stream, so a handshake and cipher layer can sit
//! between them and the TCP socket.

use crate::core::mesh::message::{encode, Decoder, FrameError, Message};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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

pub struct FrameReader<R> {
    half: R,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(half: R) -> Self {
        FrameReader {
            half,
            decoder: Decoder::default(),
            buf: vec![0; 64 * 1024],
        }
    }

    /// The next message; an error means the connection must be dropped.
    pub async fn next(&mut self) -> Result<Message, ControlIoError> {
        loop {
            if let Some(m) = self.decoder.next_message()? {
                return Ok(m);
            }
            let n = tokio::time::timeout(IDLE_TIMEOUT, self.half.read(&mut self.buf))
                .await
                .map_err(|_| ControlIoError::Idle(IDLE_TIMEOUT))??;
            if n == 0 {
                return Err(ControlIoError::Eof);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }
}

pub struct FrameWriter<W> {
    half: W,
    buf: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(half: W) -> Self {
        FrameWriter {
            half,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ControlIoError> {
        self.buf.clear();
        encode(msg, &mut self.buf);
        self.half.write_all(&self.buf).await?;
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

    #[tokio::test]
    async fn frames_cross_any_byte_stream_and_eof_and_garbage_end_it() {
        let (a, b) = tokio::io::duplex(64);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let mut w = FrameWriter::new(aw);
        let mut r = FrameReader::new(br);
        w.send(&Message::Heartbeat).await.unwrap();
        w.send(&Message::Digest { ring: Some(9) }).await.unwrap();
        assert_eq!(r.next().await.unwrap(), Message::Heartbeat);
        assert_eq!(r.next().await.unwrap(), Message::Digest { ring: Some(9) });
        w.shutdown().await;
        assert!(matches!(r.next().await, Err(ControlIoError::Eof)));
        drop((ar, bw));

        let (a, b) = tokio::io::duplex(64);
        let (_ar, mut aw) = tokio::io::split(a);
        let mut r = FrameReader::new(b);
        aw.write_all(&3u32.to_be_bytes()).await.unwrap();
        aw.write_all(b"{x}").await.unwrap();
        assert!(matches!(r.next().await, Err(ControlIoError::Frame(_))));
    }
}
