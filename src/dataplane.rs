//! The forwarding loops: TUN -> VXLAN/UDP ("weft-tx") and UDP -> TUN ("weft-rx"), each
//! on a dedicated std thread.
//!
//! Each loop drains its non-blocking source into a batch of reused buffers until it is
//! empty or the batch is full, loads the route table once for the batch (an `arc_swap`
//! load, not a lock), then handles every packet with the pure [`plan_tx`]/[`plan_rx`] and
//! the `core::wire` functions. Only when the source is empty does it sleep in `poll`,
//! together with a stop pipe. No per-packet allocation, lock or log line: drops are
//! counted by reason in [`DataplaneCounters`], and I/O errors are logged at most once per
//! [`LOG_INTERVAL`] per loop.
//!
//! The batch shape is where the later performance work plugs in: recvmmsg/sendmmsg, UDP
//! GSO/GRO and TUN offloads fill and drain the same batches and call the same per-packet
//! functions.
//!
//! Packets over the MTU with DF set are dropped and counted as `too_big`; weft does not
//! send ICMP "fragmentation needed" back yet (a later issue adds it), so until then path
//! MTU discovery through weft relies on the overlay MTU rule (underlay MTU - 50) being
//! applied to every interface that feeds the overlay.

use crate::api::report::DropReport;
use crate::core::route::{Lookup, PeerRoute, RouteTable};
use crate::core::wire::{self, ipv4, DecapError, WireError, VXLAN_OVERHEAD_INNER};
use crate::io::tun::Tun;
use arc_swap::ArcSwap;
use std::io::{self, ErrorKind, Write};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Packets read per batch before the route table is consulted.
pub const BATCH: usize = 32;
/// Buffer per packet: the largest IPv4 packet behind the VXLAN and Ethernet headers.
/// Pages are only touched as far as packets reach, so at a 1450 MTU each buffer costs
/// one page of memory.
const SLOT_LEN: usize = VXLAN_OVERHEAD_INNER + 65_535;
/// Minimum spacing of repeated error log lines from one loop.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after an I/O error that left a batch empty, so a persistent error (device gone)
/// does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How long a send waits for room in the socket buffer before counting a drop.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// Why a packet was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// TUN packet to an address in no range, or in a local range: a local-range
    /// address that reached the TUN device has no pod behind it.
    NoRoute,
    /// TUN packet to a range whose owner has no known data address.
    Unreachable,
    /// TUN packet over the MTU with DF set.
    TooBig,
    /// TUN packet that is not IPv4 (e.g. IPv6 neighbour discovery).
    NotIpv4,
    /// Malformed IPv4 from the TUN, or a datagram that failed decapsulation (see
    /// [`DataplaneCounters::malformed_kinds`]).
    Malformed,
    /// Datagram from an underlay address that is no known peer's.
    UnknownPeer,
    /// Decapsulated packet to an address outside this node's ranges.
    NotLocal,
    TunWrite,
    UdpSend,
    TunRead,
    UdpRecv,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NoRoute,
        DropReason::Unreachable,
        DropReason::TooBig,
        DropReason::NotIpv4,
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::NotLocal,
        DropReason::TunWrite,
        DropReason::UdpSend,
        DropReason::TunRead,
        DropReason::UdpRecv,
    ];
    const COUNT: usize = Self::ALL.len();

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::Unreachable => "unreachable",
            DropReason::TooBig => "too_big",
            DropReason::NotIpv4 => "not_ipv4",
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::NotLocal => "not_local",
            DropReason::TunWrite => "tun_write",
            DropReason::UdpSend => "udp_send",
            DropReason::TunRead => "tun_read",
            DropReason::UdpRecv => "udp_recv",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Drop counters shared between the loops and the reporting side.
#[derive(Debug, Default)]
pub struct DataplaneCounters {
    drops: [AtomicU64; DropReason::COUNT],
    malformed: [AtomicU64; DecapError::KINDS],
}

impl DataplaneCounters {
    pub fn count(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a datagram that failed decapsulation, as `malformed` and by kind.
    pub fn count_malformed(&self, err: DecapError) {
        self.count(DropReason::Malformed);
        if let Some(c) = self.malformed.get(err.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// Every reason, in a fixed order, zero counts included (stable metric series).
    pub fn drops(&self) -> Vec<DropReport> {
        DropReason::ALL
            .iter()
            .map(|r| DropReport {
                reason: r.as_str().to_string(),
                packets: self.get(*r),
            })
            .collect()
    }

    /// Received datagrams counted as `malformed`, broken down by decapsulation failure
    /// ("truncated", "wrong_vni", ...). Their sum equals the received part of
    /// `malformed`; they are not included in [`DataplaneCounters::drops`] so that drops
    /// add up.
    pub fn malformed_kinds(&self) -> Vec<DropReport> {
        self.malformed
            .iter()
            .enumerate()
            .map(|(i, c)| DropReport {
                reason: DecapError::kind_name(i).unwrap_or("unknown").to_string(),
                packets: c.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// What to do with a TUN packet that is to be forwarded.
#[derive(Debug)]
pub struct TxPlan<'a> {
    /// The datagram is `buf[..len]`.
    pub len: usize,
    pub to: SocketAddrV4,
    pub peer: &'a PeerRoute,
}

/// Routes and encapsulates (in place) the IP packet at `buf[VXLAN_OVERHEAD_INNER..][..ip_len]`.
/// Pure: the caller does the I/O and the counting.
pub fn plan_tx<'a>(
    table: &'a RouteTable,
    vni: u32,
    mtu: usize,
    buf: &mut [u8],
    ip_len: usize,
) -> Result<TxPlan<'a>, DropReason> {
    let ip_bytes = VXLAN_OVERHEAD_INNER
        .checked_add(ip_len)
        .and_then(|end| buf.get(VXLAN_OVERHEAD_INNER..end))
        .ok_or(DropReason::Malformed)?;
    let ip = ipv4::Packet::new_checked(ip_bytes).map_err(|e| match e {
        WireError::NotIpv4 => DropReason::NotIpv4,
        _ => DropReason::Malformed,
    })?;
    let (peer, to) = match table.lookup(ip.dst_addr()) {
        Lookup::Remote(p) => match p.data_addr {
            Some(a) => (p, a),
            None => return Err(DropReason::Unreachable),
        },
        Lookup::Unreachable(_) => return Err(DropReason::Unreachable),
        Lookup::Local | Lookup::NoRoute => return Err(DropReason::NoRoute),
    };
    if ip.total_len() > mtu && ip.dont_frag() {
        return Err(DropReason::TooBig);
    }
    let len = wire::encapsulate(buf, ip_len, vni, table.local_mac(), peer.mac)
        .map_err(|_| DropReason::Malformed)?;
    Ok(TxPlan { len, to, peer })
}

/// Where the inner packet of an accepted datagram lies, and whom it came from.
#[derive(Debug)]
pub struct RxPlan<'a> {
    pub inner: Range<usize>,
    pub peer: &'a PeerRoute,
}

/// Why a received datagram is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxDrop {
    Reason(DropReason),
    Malformed(DecapError),
}

/// Validates a received datagram: known source peer, well-formed VXLAN with our VNI,
/// inner destination in a local range. Pure.
pub fn plan_rx<'a>(
    table: &'a RouteTable,
    vni: u32,
    src: SocketAddr,
    datagram: &[u8],
) -> Result<RxPlan<'a>, RxDrop> {
    let peer = match src {
        SocketAddr::V4(a) => table.peer_by_endpoint(a),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .and_then(|ip| table.peer_by_endpoint(SocketAddrV4::new(ip, a.port()))),
    }
    .ok_or(RxDrop::Reason(DropReason::UnknownPeer))?;
    let d = wire::decapsulate(datagram, vni).map_err(RxDrop::Malformed)?;
    if !table.is_local(d.dst) {
        return Err(RxDrop::Reason(DropReason::NotLocal));
    }
    Ok(RxPlan {
        inner: d.inner_ip,
        peer,
    })
}

/// The running loops. Dropping it stops and joins them.
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    waker: Option<io::PipeWriter>,
    threads: Vec<JoinHandle<()>>,
}

impl Dataplane {
    /// Stops both loops and waits for them (they notice within one batch).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The byte stays unread, so the pipe remains readable and wakes every poll.
        if let Some(mut w) = self.waker.take() {
            let _ = w.write_all(&[1]);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Starts the two forwarding threads. The TUN device and the socket are switched to
/// non-blocking mode. `vni` must fit in 24 bits.
pub fn start(
    tun: Tun,
    socket: UdpSocket,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<DataplaneCounters>,
) -> io::Result<Dataplane> {
    if vni > wire::vxlan::MAX_VNI {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("VNI {vni:#x} does not fit in 24 bits"),
        ));
    }
    tun.set_nonblocking(true)?;
    socket.set_nonblocking(true)?;
    let (reader, writer) = io::pipe()?;
    let stop_fd = Arc::new(reader);
    let socket = Arc::new(socket);
    let mut dp = Dataplane {
        stop: Arc::new(AtomicBool::new(false)),
        waker: Some(writer),
        threads: Vec::with_capacity(2),
    };
    let shared = Shared {
        tun,
        socket,
        routes,
        vni,
        counters,
        stop: dp.stop.clone(),
        stop_fd,
    };
    let tx = shared.clone();
    dp.threads.push(
        std::thread::Builder::new()
            .name("weft-tx".into())
            .spawn(move || tx_loop(&tx))?,
    );
    // On failure here, dropping `dp` stops the thread already started.
    dp.threads.push(
        std::thread::Builder::new()
            .name("weft-rx".into())
            .spawn(move || rx_loop(&shared))?,
    );
    Ok(dp)
}

#[derive(Clone)]
struct Shared {
    tun: Tun,
    socket: Arc<UdpSocket>,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<DataplaneCounters>,
    stop: Arc<AtomicBool>,
    stop_fd: Arc<io::PipeReader>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `fd` is ready for `events`, the stop pipe fires, or `timeout`.
    /// Returns false when stopping.
    fn wait(&self, fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> bool {
        let mut fds = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.stop_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
        // SAFETY: `fds` is a live array of two initialised pollfd structs.
        let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        // Errors (EINTR) and timeouts simply return to the loop, which retries.
        !self.stopping() && fds[1].revents == 0
    }

    /// Pause after an error, interruptible by stop.
    fn backoff(&self) -> bool {
        self.wait(-1, 0, Some(ERROR_BACKOFF))
    }
}

/// Logs an error at most once per [`LOG_INTERVAL`], with the number suppressed since.
struct RateLimitedLog {
    what: &'static str,
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(what: &'static str) -> Self {
        RateLimitedLog {
            what,
            next: None,
            suppressed: 0,
        }
    }

    fn error(&mut self, err: &io::Error) {
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            "{}: {err} ({} similar errors suppressed)",
            self.what,
            self.suppressed
        );
        self.suppressed = 0;
        self.next = Some(now + LOG_INTERVAL);
    }
}

/// Reused packet buffers of one loop.
struct Batch {
    bufs: Vec<Box<[u8]>>,
    lens: [usize; BATCH],
    srcs: [Option<SocketAddr>; BATCH],
    n: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; SLOT_LEN].into_boxed_slice())
                .collect(),
            lens: [0; BATCH],
            srcs: [None; BATCH],
            n: 0,
        }
    }
}

fn tx_loop(s: &Shared) {
    let mut batch = Batch::new();
    let mut log = RateLimitedLog::new("reading from the TUN device");
    let mut send_log = RateLimitedLog::new("sending to a peer");
    let mtu = usize::from(s.tun.mtu());
    let tun_fd = s.tun.as_raw_fd();
    while !s.stopping() {
        batch.n = 0;
        let mut failed = false;
        while batch.n < BATCH {
            let i = batch.n;
            match s.tun.recv(&mut batch.bufs[i][VXLAN_OVERHEAD_INNER..]) {
                Ok(len) => {
                    batch.lens[i] = len;
                    batch.n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    s.counters.count(DropReason::TunRead);
                    log.error(&e);
                    failed = true;
                    break;
                }
            }
        }
        if batch.n == 0 {
            let go_on = if failed {
                s.backoff()
            } else {
                s.wait(tun_fd, libc::POLLIN, None)
            };
            if !go_on {
                return;
            }
            continue;
        }
        let table = s.routes.load();
        for i in 0..batch.n {
            let buf = &mut batch.bufs[i][..];
            match plan_tx(&table, s.vni, mtu, buf, batch.lens[i]) {
                Ok(plan) => match send(s, &buf[..plan.len], plan.to) {
                    Ok(()) => plan.peer.counters.count_tx(plan.len - VXLAN_OVERHEAD_INNER),
                    Err(e) => {
                        s.counters.count(DropReason::UdpSend);
                        send_log.error(&e);
                    }
                },
                Err(reason) => s.counters.count(reason),
            }
        }
    }
}

/// Sends one datagram; when the socket buffer is full, waits briefly for room once.
fn send(s: &Shared, datagram: &[u8], to: SocketAddrV4) -> io::Result<()> {
    let mut waited = false;
    loop {
        match s.socket.send_to(datagram, to) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock && !waited => {
                waited = true;
                if !s.wait(s.socket.as_raw_fd(), libc::POLLOUT, Some(SEND_WAIT)) {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn rx_loop(s: &Shared) {
    let mut batch = Batch::new();
    let mut log = RateLimitedLog::new("receiving from the data socket");
    let mut tun_log = RateLimitedLog::new("writing to the TUN device");
    let sock_fd = s.socket.as_raw_fd();
    while !s.stopping() {
        batch.n = 0;
        let mut failed = false;
        while batch.n < BATCH {
            let i = batch.n;
            match s.socket.recv_from(&mut batch.bufs[i]) {
                Ok((len, src)) => {
                    batch.lens[i] = len;
                    batch.srcs[i] = Some(src);
                    batch.n += 1;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    s.counters.count(DropReason::UdpRecv);
                    log.error(&e);
                    failed = true;
                    break;
                }
            }
        }
        if batch.n == 0 {
            let go_on = if failed {
                s.backoff()
            } else {
                s.wait(sock_fd, libc::POLLIN, None)
            };
            if !go_on {
                return;
            }
            continue;
        }
        let table = s.routes.load();
        for i in 0..batch.n {
            let Some(src) = batch.srcs[i] else { continue };
            let datagram = &batch.bufs[i][..batch.lens[i]];
            match plan_rx(&table, s.vni, src, datagram) {
                Ok(plan) => {
                    let inner = &datagram[plan.inner];
                    match s.tun.send(inner) {
                        Ok(_) => plan.peer.counters.count_rx(inner.len()),
                        Err(e) => {
                            s.counters.count(DropReason::TunWrite);
                            tun_log.error(&e);
                        }
                    }
                }
                Err(RxDrop::Reason(r)) => s.counters.count(r),
                Err(RxDrop::Malformed(e)) => s.counters.count_malformed(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::mesh::peer::PeerName;
    use crate::core::route::PeerCounters;
    use crate::core::wire::WEFT_VNI;
    use std::net::Ipv4Addr;

    fn name(i: u8) -> PeerName {
        PeerName::from_bytes([0x02, 0x77, 0x66, 0, 0, i])
    }

    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    /// Node 1 owns 192.168.0.0/17 and node 2 192.168.128.0/17 (at 10.77.0.2:6784);
    /// node 3 owns 10.1.0.0/24 with no known address.
    fn table(local: u8) -> RouteTable {
        let peer = |i: u8, a: Option<&str>| PeerRoute {
            name: name(i),
            nickname: format!("n{i}"),
            data_addr: a.map(|a| a.parse().unwrap()),
            mac: name(i).mac(),
            counters: Arc::new(PeerCounters::default()),
        };
        RouteTable::new(
            name(local),
            name(local).mac(),
            &[
                (ip("192.168.0.0"), ip("192.168.127.255"), name(1)),
                (ip("192.168.128.0"), ip("192.168.255.255"), name(2)),
                (ip("10.1.0.0"), ip("10.1.0.255"), name(3)),
            ],
            vec![
                peer(1, Some("10.77.0.1:6784")),
                peer(2, Some("10.77.0.2:6784")),
                peer(3, None),
            ],
        )
    }

    fn tun_packet(dst: &str, payload_len: usize, dont_frag: bool) -> (Vec<u8>, usize) {
        let repr = ipv4::Repr {
            src: "192.168.0.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: ipv4::PROTO_TCP,
            ttl: 64,
            dont_frag,
            payload_len,
        };
        let mut buf = vec![0u8; SLOT_LEN];
        repr.emit(&mut buf[VXLAN_OVERHEAD_INNER..]).unwrap();
        (buf, repr.total_len())
    }

    #[test]
    fn tx_routes_and_encapsulates() {
        let t = table(1);
        let (mut buf, len) = tun_packet("192.168.200.1", 100, true);
        let plan = plan_tx(&t, WEFT_VNI, 1450, &mut buf, len).unwrap();
        assert_eq!(plan.len, len + 22);
        assert_eq!(plan.to, "10.77.0.2:6784".parse().unwrap());
        assert_eq!(plan.peer.name, name(2));
        let d = wire::decapsulate(&buf[..plan.len], WEFT_VNI).unwrap();
        assert_eq!(d.dst, "192.168.200.1".parse::<Ipv4Addr>().unwrap());
        // Inner Ethernet: dst = peer's MAC, src = ours.
        assert_eq!(&buf[8..14], &name(2).mac());
        assert_eq!(&buf[14..20], &name(1).mac());
    }

    #[test]
    fn tx_drop_reasons() {
        let t = table(1);
        let reason = |dst: &str, payload: usize, df: bool| {
            let (mut buf, len) = tun_packet(dst, payload, df);
            plan_tx(&t, WEFT_VNI, 1450, &mut buf, len).map(|p| p.len)
        };
        assert_eq!(reason("192.168.0.9", 10, true), Err(DropReason::NoRoute));
        assert_eq!(reason("172.16.0.1", 10, true), Err(DropReason::NoRoute));
        assert_eq!(reason("10.1.0.1", 10, true), Err(DropReason::Unreachable));
        assert_eq!(reason("192.168.200.1", 1431, true), Err(DropReason::TooBig));
        assert_eq!(reason("192.168.200.1", 1430, true), Ok(1450 + 22));
        assert!(reason("192.168.200.1", 1431, false).is_ok());

        let (mut buf, len) = tun_packet("192.168.200.1", 10, true);
        buf[VXLAN_OVERHEAD_INNER] = 0x60;
        assert_eq!(
            plan_tx(&t, WEFT_VNI, 1450, &mut buf, len).map(|p| p.len),
            Err(DropReason::NotIpv4)
        );
        buf[VXLAN_OVERHEAD_INNER] = 0x45;
        assert_eq!(
            plan_tx(&t, WEFT_VNI, 1450, &mut buf, 10).map(|p| p.len),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            plan_tx(&t, WEFT_VNI, 1450, &mut buf, usize::MAX).map(|p| p.len),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn rx_accepts_traffic_for_local_ranges_from_known_peers() {
        let sender = table(1);
        let receiver = table(2);
        let (mut buf, len) = tun_packet("192.168.200.1", 40, true);
        let n = plan_tx(&sender, WEFT_VNI, 1450, &mut buf, len).unwrap().len;
        let from: SocketAddr = "10.77.0.1:6784".parse().unwrap();
        let plan = plan_rx(&receiver, WEFT_VNI, from, &buf[..n]).unwrap();
        assert_eq!(plan.peer.name, name(1));
        assert_eq!(plan.inner, 22..22 + len);

        let unknown: SocketAddr = "10.77.0.9:6784".parse().unwrap();
        assert_eq!(
            plan_rx(&receiver, WEFT_VNI, unknown, &buf[..n]).map(|p| p.inner),
            Err(RxDrop::Reason(DropReason::UnknownPeer))
        );
        let mapped: SocketAddr = "[::ffff:10.77.0.1]:6784".parse().unwrap();
        assert!(plan_rx(&receiver, WEFT_VNI, mapped, &buf[..n]).is_ok());
        assert_eq!(
            plan_rx(&receiver, 0x1234, from, &buf[..n]).map(|p| p.inner),
            Err(RxDrop::Malformed(DecapError::WrongVni { got: WEFT_VNI }))
        );
        assert_eq!(
            plan_rx(&receiver, WEFT_VNI, from, &buf[..30]).map(|p| p.inner),
            Err(RxDrop::Malformed(DecapError::Truncated))
        );
        // Node 1 receiving a packet addressed to node 2's range: not ours.
        assert_eq!(
            plan_rx(
                &sender,
                WEFT_VNI,
                "10.77.0.2:6784".parse().unwrap(),
                &buf[..n]
            )
            .map(|p| p.inner),
            Err(RxDrop::Reason(DropReason::NotLocal))
        );
    }

    #[test]
    fn counters_report_every_reason() {
        let c = DataplaneCounters::default();
        c.count(DropReason::NoRoute);
        c.count(DropReason::NoRoute);
        c.count_malformed(DecapError::WrongVni { got: 1 });
        let drops = c.drops();
        assert_eq!(drops.len(), DropReason::ALL.len());
        let get = |r: &str| drops.iter().find(|d| d.reason == r).unwrap().packets;
        assert_eq!(get("no_route"), 2);
        assert_eq!(get("malformed"), 1);
        assert_eq!(get("udp_send"), 0);
        let kinds = c.malformed_kinds();
        assert_eq!(kinds.len(), DecapError::KINDS);
        assert_eq!(
            kinds
                .iter()
                .find(|k| k.reason == "wrong_vni")
                .unwrap()
                .packets,
            1
        );
        let names: std::collections::BTreeSet<_> =
            DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn rate_limited_log_suppresses_repeats() {
        let mut log = RateLimitedLog::new("test");
        let e = io::Error::other("boom");
        log.error(&e);
        log.error(&e);
        log.error(&e);
        assert_eq!(log.suppressed, 2);
        log.next = Some(Instant::now() - Duration::from_secs(1));
        log.error(&e);
        assert_eq!(log.suppressed, 0);
    }

    #[test]
    fn start_rejects_wide_vni() {
        // Needs a Tun; creating one needs root, so only the argument check runs otherwise.
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty(
            name(1),
            name(1).mac(),
        )));
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: creating a TUN device needs root");
            return;
        }
        let tun_name = format!("wfv{}", std::process::id() % 100_000);
        let tun = std::thread::spawn(move || {
            // A private namespace so the test's device never appears on the host.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            crate::io::tun::create(&tun_name, 1400).unwrap()
        })
        .join()
        .unwrap();
        let err = start(
            tun,
            sock,
            routes,
            0x100_0000,
            Arc::new(DataplaneCounters::default()),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
