//! The data-plane UDP socket.
//!
//! User-space forwarders lose packets at the receiving socket buffer long before they run
//! out of CPU, so the buffers are raised to [`SOCKET_BUFFER_BYTES`]: with the
//! `*BUFFORCE` options when privileged (they ignore `net.core.rmem_max`/`wmem_max`),
//! otherwise as far as those limits allow.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Binds the data socket on `addr` (normally `0.0.0.0:<data port>`), in the calling
/// thread's network namespace. The socket is blocking; the data plane changes that.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_cloexec(true)?;
    set_buffers(&socket, SOCKET_BUFFER_BYTES);
    if addr.is_ipv4() {
        allow_outer_fragmentation(&socket)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Best effort: a socket with default buffers still works, only drops more under load.
fn set_buffers(socket: &Socket, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let size = bytes;
    if setsockopt(socket, sockopt::RcvBufForce, &size).is_err() {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &size).is_err() {
        let _ = socket.set_send_buffer_size(bytes);
    }
}

/// Sends outer datagrams without DF, as Linux's kernel VXLAN does by default: if some
/// underlay hop has a smaller MTU than assumed, the outer packet is fragmented instead of
/// silently lost (weft sees no ICMP errors for datagrams it did not mark DF).
fn allow_outer_fragmentation(socket: &Socket) -> io::Result<()> {
    let val: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: a valid socket fd, and a pointer/length pair describing a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn binds_loopback_with_large_buffers() {
        let s = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let local = s.local_addr().unwrap();
        assert_ne!(local.port(), 0);
        let sock = socket2::SockRef::from(&s);
        // The kernel doubles the value it stores; without privileges it is capped by
        // rmem_max, so only check that something above the small defaults took effect
        // when running as root.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(sock.recv_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES);
            assert!(sock.send_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES);
        }
        // Loopback round trip through the bound socket.
        let peer = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        peer.send_to(b"ping", local).unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from, peer.local_addr().unwrap());
    }

    #[test]
    fn bind_conflict_is_an_error() {
        let a = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        assert!(bind(a.local_addr().unwrap()).is_err());
    }
}
