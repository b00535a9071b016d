//! The data-plane UDP socket, and batched I/O on it.
//!
//! User-space forwarders lose packets at the receiving socket buffer long before they run
//! out of CPU, so the buffers are raised to [`SOCKET_BUFFER_BYTES`]: with the
//! `*BUFFORCE` options when privileged (they ignore `net.core.rmem_max`/`wmem_max`),
//! otherwise as far as those limits allow.
//!
//! Sending uses `sendmmsg` with UDP GSO (`UDP_SEGMENT` per message): one message carries
//! up to [`MAX_GSO_SEGMENTS`] equal-sized datagrams to one peer, gathered from scattered
//! header and payload slices, and one syscall carries many messages. Receiving uses
//! `recvmmsg` with UDP GRO: each message can hold many datagrams of one sender,
//! back to back, with the segment size in a control message. `SO_RXQ_OVFL` reports how
//! many datagrams the kernel dropped because the receive buffer was full.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;
pub use crate::core::datapath::{MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
/// Largest message a GRO receive can return: 64 KiB of datagrams, or one datagram of a
/// kernel VXLAN sender's segmentation offload that a veth delivered unsegmented (a
/// 64 KiB inner packet behind its VXLAN and Ethernet headers).
pub const MAX_GRO_BYTES: usize = 65_535 + 22;

/// Binds the data socket on `addr` (normally `0.0.0.0:<data port>`), in the calling
/// thread's network namespace. The socket is blocking; the data plane changes that.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_cloexec(true)?;
    set_buffers(&socket, SOCKET_BUFFER_BYTES);
    if addr.is_ipv4() {
        allow_outer_fragmentation(&socket)?;
    }
    // Further workers bind the same port; the kernel spreads senders over them by hash.
    socket.set_reuse_port(true)?;
    // Best effort: without GRO each datagram is its own message, still correct.
    let _ = set_int(&socket, libc::SOL_UDP, libc::UDP_GRO, 1);
    let _ = set_int(&socket, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Whether the kernel accepts UDP GSO on this socket (Linux 4.18+).
pub fn gso_supported(socket: &UdpSocket) -> bool {
    set_int(socket, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

fn set_int(
    socket: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd, and a pointer/length pair describing a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            opt,
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

/// Outer datagrams carry DF while they fit the path MTU the kernel knows for their
/// destination (IP_PMTUDISC_WANT): a hop with a smaller MTU then answers with ICMP
/// "fragmentation needed", the kernel lowers its path MTU for that peer, and
/// [`path_mtu`] reads it, so that pods' senders can be told in turn (a GSO send over the
/// learnt path MTU is refused meanwhile). A datagram over the known path MTU (inner packet
/// without DF) is fragmented by the kernel, as Linux's VXLAN does.
fn allow_outer_fragmentation(socket: &Socket) -> io::Result<()> {
    set_int(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_WANT,
    )
}

/// The path MTU the kernel knows towards `to` (the route's MTU, lowered by ICMP
/// "fragmentation needed" until that expires), read with a connected socket that sends
/// nothing.
pub fn path_mtu(to: SocketAddrV4) -> io::Result<u32> {
    use nix::sys::socket::{getsockopt, sockopt};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.connect(&SocketAddr::V4(to).into())?;
    let mtu = getsockopt(&socket, sockopt::IpMtu).map_err(io::Error::from)?;
    Ok(u32::try_from(mtu).unwrap_or(0))
}

/// Control-message space for one `c_int`/`u16` option (`CMSG_SPACE(sizeof(int))`), as
/// u64s for alignment.
const CMSG_WORDS: usize = 4;
/// Room for UDP_GRO's segment size and SO_RXQ_OVFL's counter.
const RECV_CMSG_WORDS: usize = 8;

/// One GSO message: datagrams of `seg_size` bytes (the last may be shorter) to `to`,
/// gathered from `iovs[iov.clone()]` of the slice passed to [`Sender::send`].
#[derive(Debug, Clone)]
pub struct GsoMsg {
    pub to: SocketAddrV4,
    pub seg_size: usize,
    pub segments: usize,
    pub iov: std::ops::Range<usize>,
}

/// Reusable `sendmmsg` scratch space.
pub struct Sender {
    hdrs: Vec<libc::mmsghdr>,
    names: Vec<libc::sockaddr_in>,
    ctrl: Vec<[u64; CMSG_WORDS]>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.hdrs.capacity())
            .finish()
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    s.sin_family = libc::AF_INET as libc::sa_family_t;
    s.sin_port = a.port().to_be();
    s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    s
}

impl Sender {
    pub fn new(max_msgs: usize) -> Sender {
        Sender {
            hdrs: Vec::with_capacity(max_msgs),
            names: Vec::with_capacity(max_msgs),
            ctrl: Vec::with_capacity(max_msgs),
        }
    }

    /// Sends `msgs` (at most the capacity given to [`Sender::new`]) in one `sendmmsg`.
    /// Returns how many messages the kernel took, from the first; an error concerns the
    /// first message. Each message with more than one segment carries `UDP_SEGMENT`.
    pub fn send(
        &mut self,
        socket: &UdpSocket,
        msgs: &[GsoMsg],
        iovs: &[io::IoSlice<'_>],
    ) -> io::Result<usize> {
        let n = msgs.len().min(self.hdrs.capacity());
        self.hdrs.clear();
        self.names.clear();
        self.ctrl.clear();
        for m in &msgs[..n] {
            self.names.push(sockaddr_in(m.to));
            let mut c = [0u64; CMSG_WORDS];
            if m.segments > 1 {
                // SAFETY: `c` is CMSG_SPACE(sizeof(u16)) bytes or more and 8-aligned; the
                // header and data written stay inside it.
                unsafe {
                    let cm = c.as_mut_ptr().cast::<libc::cmsghdr>();
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = libc::UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), m.seg_size as u16);
                }
            }
            self.ctrl.push(c);
        }
        for (i, m) in msgs[..n].iter().enumerate() {
            let iov = &iovs[m.iov.clone()];
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // The kernel only reads the iovecs; IoSlice is ABI-compatible with iovec.
            h.msg_hdr.msg_iov = iov.as_ptr() as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = iov.len() as _;
            if m.segments > 1 {
                h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_hdr.msg_controllen =
                    unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as _;
            }
            self.hdrs.push(h);
        }
        // SAFETY: every pointer in `hdrs` refers to `self.names`, `self.ctrl` or `iovs`,
        // all alive and unmoved for the duration of the call.
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

/// What one received message holds.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    pub len: usize,
    pub src: Option<SocketAddr>,
    /// Size of each datagram in the message (the last may be shorter): the GRO segment
    /// size, or `len` when the kernel did not coalesce.
    pub stride: usize,
}

/// Reusable `recvmmsg` buffers.
pub struct Receiver {
    bufs: Vec<Box<[u8]>>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    ctrl: Vec<[u64; RECV_CMSG_WORDS]>,
    meta: Vec<RecvMeta>,
    /// Latest `SO_RXQ_OVFL` value: datagrams dropped so far for lack of buffer space.
    overflows: Option<u32>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("buffers", &self.bufs.len())
            .finish()
    }
}

impl Receiver {
    /// `msgs` buffers of [`MAX_GRO_BYTES`] each.
    pub fn new(msgs: usize) -> Receiver {
        Receiver {
            bufs: (0..msgs)
                .map(|_| vec![0u8; MAX_GRO_BYTES].into_boxed_slice())
                .collect(),
            hdrs: Vec::with_capacity(msgs),
            iovs: Vec::with_capacity(msgs),
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            names: vec![unsafe { std::mem::zeroed() }; msgs],
            ctrl: vec![[0u64; RECV_CMSG_WORDS]; msgs],
            meta: Vec::with_capacity(msgs),
            overflows: None,
        }
    }

    /// One non-blocking `recvmmsg`; returns how many messages arrived
    /// (`ErrorKind::WouldBlock` if none).
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let n = self.bufs.len();
        self.hdrs.clear();
        self.iovs.clear();
        self.meta.clear();
        for b in self.bufs.iter_mut() {
            self.iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        for i in 0..n {
            // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen =
                std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = std::mem::size_of::<[u64; RECV_CMSG_WORDS]>() as _;
            self.hdrs.push(h);
        }
        // SAFETY: every pointer in `hdrs` refers to buffers owned by `self` that stay
        // alive and unmoved for the duration of the call.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = rc as usize;
        for i in 0..got {
            let h = &self.hdrs[i];
            let len = (h.msg_len as usize).min(self.bufs[i].len());
            let mut stride = len;
            // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_* macros walk
            // within them, and each data read is bounded by the cmsg's type.
            unsafe {
                let mut cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !cm.is_null() {
                    let (level, ty) = ((*cm).cmsg_level, (*cm).cmsg_type);
                    if level == libc::SOL_UDP && ty == libc::UDP_GRO {
                        let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<libc::c_int>());
                        if v > 0 {
                            stride = v as usize;
                        }
                    } else if level == libc::SOL_SOCKET && ty == libc::SO_RXQ_OVFL {
                        self.overflows =
                            Some(std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<u32>()));
                    }
                    cm = libc::CMSG_NXTHDR(&h.msg_hdr, cm);
                }
            }
            self.meta.push(RecvMeta {
                len,
                src: sockaddr_to_std(&self.names[i]),
                stride: stride.max(1),
            });
        }
        Ok(got)
    }

    pub fn meta(&self, i: usize) -> RecvMeta {
        self.meta[i]
    }

    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.meta[i].len]
    }

    /// Message `i`'s bytes, to be opened or decapsulated in place.
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i][..self.meta[i].len]
    }

    /// Latest `SO_RXQ_OVFL` counter seen (cumulative drops at this socket).
    pub fn overflows(&self) -> Option<u32> {
        self.overflows
    }
}

fn sockaddr_to_std(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
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
        // SO_REUSEPORT lets weft's own workers share the port, not other sockets.
        assert!(UdpSocket::bind(a.local_addr().unwrap()).is_err());
    }

    #[test]
    fn gso_send_arrives_as_one_gro_message() {
        let rx = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let tx = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let to = match rx.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let gso = gso_supported(&tx);
        let hdr = [7u8; 10];
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        // Three 1000-byte datagrams (10 header + 990 payload) and a 410-byte last one,
        // then a single small datagram as a second message.
        let mut iovs = Vec::new();
        for c in payload[..3380].chunks(990) {
            iovs.push(io::IoSlice::new(&hdr));
            iovs.push(io::IoSlice::new(c));
        }
        iovs.push(io::IoSlice::new(b"solo"));
        let segs = if gso { 4 } else { 1 };
        let mut msgs = vec![GsoMsg {
            to,
            seg_size: 1000,
            segments: segs,
            iov: 0..if gso { 8 } else { 2 },
        }];
        msgs.push(GsoMsg {
            to,
            seg_size: 4,
            segments: 1,
            iov: 8..9,
        });
        let mut sender = Sender::new(8);
        assert_eq!(sender.send(&tx, &msgs, &iovs).unwrap(), 2);
        let mut r = Receiver::new(4);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            match r.recv(&rx) {
                Ok(n) => (0..n).for_each(|i| got.push((r.meta(i), r.buf(i).to_vec()))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let (m, bytes) = &got[0];
        assert_eq!(m.src, Some(tx.local_addr().unwrap()));
        if gso {
            assert_eq!((m.len, m.stride), (3420, 1000));
            assert_eq!(&bytes[..10], &hdr);
            assert_eq!(&bytes[1000..1010], &hdr);
            assert_eq!(&bytes[3010..], &payload[2970..3380]);
        }
        assert_eq!(got.last().unwrap().1, b"solo");
    }
}
