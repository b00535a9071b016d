//! The control connection adapter: TCP streams carrying framed control messages. It knows
//! nothing of what the messages mean; the router feeds them to the core's `Node`.

use crate::core::mesh::message::{encode, Decoder, FrameError, Message};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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

pub struct FrameReader {
    half: OwnedReadHalf,
    decoder: Decoder,
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new(half: OwnedReadHalf) -> Self {
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

pub struct FrameWriter {
    half: OwnedWriteHalf,
    buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new(half: OwnedWriteHalf) -> Self {
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
