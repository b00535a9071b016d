//! NFLOG over netlink: the packets the policy table logs to group 86 before dropping
//! them, read on a thread of their own and handed over decoded. Nothing here decides.

use crate::core::policy::denied::{self, Denied};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, PacketNla, Timeout, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum NflogError {
    #[error("NFLOG socket: {0}")]
    Socket(std::io::Error),
    #[error("binding NFLOG group {group}: {source}")]
    Bind { group: u16, source: std::io::Error },
}

/// Bytes of each logged packet copied to user space: the IPv4 header and the ports.
const COPY_RANGE: u32 = 96;

fn send_config(
    socket: &Socket,
    group: u16,
    nlas: Vec<netlink_packet_netfilter::nflog::ConfigNla>,
) -> Result<(), NflogError> {
    let msg = config_request(NetfilterProtoFamily::IPv4, group, nlas);
    let mut buf = vec![0; msg.header.length as usize];
    msg.serialize(&mut buf);
    socket.send(&buf, 0).map_err(NflogError::Socket)?;
    let mut rx = vec![0u8; 4096];
    let n = socket
        .recv(&mut &mut rx[..], 0)
        .map_err(NflogError::Socket)?;
    let ack = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[..n])
        .map_err(|e| NflogError::Socket(std::io::Error::other(e.to_string())))?;
    if let NetlinkPayload::Error(e) = ack.payload {
        if let Some(code) = e.code {
            return Err(NflogError::Bind {
                group,
                source: std::io::Error::from_raw_os_error(-code.get()),
            });
        }
    }
    Ok(())
}

/// Binds NFLOG `group` in this network namespace.
pub fn open(group: u16) -> Result<Socket, NflogError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NflogError::Socket)?;
    socket.bind_auto().map_err(NflogError::Socket)?;
    // A flood of refused packets must not make the kernel block or grow: the socket's
    // buffer bounds what waits, and what does not fit is dropped (and counted).
    let _ = socket.set_rx_buf_sz(1 << 20);
    send_config(&socket, group, vec![ConfigCmd::Bind.into()])?;
    send_config(
        &socket,
        group,
        vec![
            ConfigMode::new_packet(COPY_RANGE).into(),
            Timeout::new(10).into(),
        ],
    )?;
    Ok(socket)
}

/// Reads refused packets from `socket` forever, passing each to `sink`; what the sink
/// cannot take now (it says `false`), and what the kernel could not queue, is counted in
/// `lost`.
pub fn read_loop(socket: Socket, mut sink: impl FnMut(Denied) -> bool, lost: Arc<AtomicU64>) {
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = match socket.recv(&mut &mut rx[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut off = 0;
        while off < n {
            let Ok(m) = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[off..n]) else {
                break;
            };
            let len = m.header.length as usize;
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = m.payload
            else {
                continue;
            };
            let mut prefix = String::new();
            let mut payload: &[u8] = &[];
            for nla in &nlas {
                match nla {
                    PacketNla::Prefix(p) => prefix = p.to_string_lossy().into_owned(),
                    PacketNla::Payload(p) => payload = p,
                    _ => {}
                }
            }
            if let Some(d) = denied::decode(&prefix, payload) {
                if !sink(d) {
                    lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
