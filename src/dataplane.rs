//! The forwarding loops between the TUN device and the VXLAN-format UDP socket.
//!
//! Transmit: the TUN device runs with offloads, so one read returns a TCP or UDP
//! super-packet of up to 64 KiB. [`gso::split`] cuts it into MTU-sized segments (own
//! headers and checksums, payload left in place), each gets the 22-byte VXLAN + Ethernet
//! prefix for its peer, and segments of one peer and size are grouped into UDP GSO
//! messages (at most 64 datagrams, 65,507 bytes); one `sendmmsg` sends the whole batch.
//! Packets over the MTU with DF set are answered with ICMP "fragmentation needed"
//! written back into the TUN device.
//!
//! Receive: one `recvmmsg` returns up to [`RX_MSGS`] messages, each holding many
//! datagrams of one sender (UDP GRO). Every datagram is validated and decapsulated in
//! place; [`Gro`] coalesces consecutive segments of a TCP flow, and each result is one
//! `writev` (header + payload slices) into the TUN device.
//!
//! Each worker thread serves a TUN queue and, for worker 0, the socket; it drains its
//! sources in batches, loads the route table once per batch (an `arc_swap` load, not a
//! lock) and sleeps in `poll` only when both are empty. Nothing on this path allocates,
//! locks or logs per packet: drops are counted by reason in per-thread arrays that are
//! added to [`DataplaneCounters`] once per batch, per-peer counters once per message,
//! and I/O errors are logged at most once per [`LOG_INTERVAL`].

use crate::api::report::DropReport;
use crate::core::route::{Lookup, PeerCounters, PeerRoute, RouteTable};
use crate::core::wire::gro::{self, Gro};
use crate::core::wire::gso::{self, GsoError};
use crate::core::wire::virtio::{self, VnetHdr};
use crate::core::wire::{self, icmp, ipv4, DecapError, WireError, VXLAN_OVERHEAD_INNER};
use crate::io::tun::Tun;
use crate::io::udp::{GsoMsg, Receiver, Sender, MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use arc_swap::ArcSwap;
use std::io::{self, ErrorKind, IoSlice, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// The data socket's send buffer stayed full (after a short wait).
    SocketFull,
    /// The TUN device refused a write for lack of room.
    TunFull,
    /// Datagrams the kernel dropped because the data socket's receive buffer was full
    /// (`SO_RXQ_OVFL`).
    RxBufferFull,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
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
        DropReason::SocketFull,
        DropReason::TunFull,
        DropReason::RxBufferFull,
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
            DropReason::SocketFull => "udp_send_buffer_full",
            DropReason::TunFull => "tun_queue_full",
            DropReason::RxBufferFull => "udp_receive_buffer_full",
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
    tun_reads: AtomicU64,
    tun_writes: AtomicU64,
    udp_sends: AtomicU64,
    udp_recvs: AtomicU64,
}

/// How much batching the offloads achieved: compare with the per-peer packet counts
/// (one TUN read can carry 40+ packets, one UDP message 64 datagrams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Reads from the TUN device (each a packet or a super-packet).
    pub tun_reads: u64,
    /// Writes to the TUN device (each a packet or a coalesced super-packet).
    pub tun_writes: u64,
    /// UDP messages sent (each up to 64 datagrams with GSO).
    pub udp_sends: u64,
    /// UDP messages received (each up to 64 datagrams with GRO).
    pub udp_recvs: u64,
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

    pub fn batches(&self) -> BatchStats {
        BatchStats {
            tun_reads: self.tun_reads.load(Ordering::Relaxed),
            tun_writes: self.tun_writes.load(Ordering::Relaxed),
            udp_sends: self.udp_sends.load(Ordering::Relaxed),
            udp_recvs: self.udp_recvs.load(Ordering::Relaxed),
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

/// Tuning of [`start_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Worker threads, each reading its own TUN queue (the kernel keeps a flow on one
    /// queue, so flows are not reordered). Worker 0 also serves the data socket: every
    /// peer sends from the one data port, so extra `SO_REUSEPORT` sockets would all
    /// hash a peer's traffic to the same socket anyway, and one reader keeps each
    /// peer's datagrams in order.
    pub tx_workers: usize,
    /// How long a worker keeps polling after its last packet before it sleeps.
    pub spin: Duration,
    /// Run the workers under `SCHED_FIFO` with this priority (1..=99): a woken worker
    /// then preempts ordinary tasks at once, as the kernel's own softirq forwarding
    /// would. Off by default: a saturated worker then competes with everything else.
    pub realtime_priority: Option<i32>,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            tx_workers: 1,
            spin: DEFAULT_SPIN,
            realtime_priority: None,
        }
    }
}

/// See [`DataplaneConfig::spin`].
pub const DEFAULT_SPIN: Duration = Duration::from_micros(0);

/// Starts the forwarding threads with the default configuration, except that the
/// environment variables `WEFT_DP_TX_WORKERS` (1..=8), `WEFT_DP_SPIN_US` (0..=10000) and
/// `WEFT_DP_RT_PRIO` (1..=99) may override [`DataplaneConfig`], for measurements.
pub fn start(
    tun: Tun,
    socket: UdpSocket,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<DataplaneCounters>,
) -> io::Result<Dataplane> {
    let mut cfg = DataplaneConfig::default();
    if let Some(n) = std::env::var("WEFT_DP_TX_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=8).contains(n))
    {
        cfg.tx_workers = n;
    }
    if let Some(us) = std::env::var("WEFT_DP_SPIN_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|us| *us <= 10_000)
    {
        cfg.spin = Duration::from_micros(us);
    }
    cfg.realtime_priority = std::env::var("WEFT_DP_RT_PRIO")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|p| (1..=99).contains(p));
    start_with(tun, socket, routes, vni, counters, &cfg)
}

/// Starts the forwarding threads. The TUN device and the socket are switched to
/// non-blocking mode. `vni` must fit in 24 bits. Extra TUN queues are opened by name, so
/// this must run in the device's network namespace.
pub fn start_with(
    tun: Tun,
    socket: UdpSocket,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<DataplaneCounters>,
    cfg: &DataplaneConfig,
) -> io::Result<Dataplane> {
    check_vni(vni)?;
    let mut queues = vec![tun.clone()];
    for _ in 1..cfg.tx_workers.max(1) {
        queues.push(tun.add_queue()?);
    }
    for q in &queues {
        q.set_nonblocking(true)?;
    }
    socket.set_nonblocking(true)?;
    let gso = crate::io::udp::gso_supported(&socket);
    let (reader, writer) = io::pipe()?;
    let stop_fd = Arc::new(reader);
    let socket = Arc::new(socket);
    let mut dp = Dataplane {
        stop: Arc::new(AtomicBool::new(false)),
        waker: Some(writer),
        threads: Vec::with_capacity(queues.len() + 1),
    };
    let shared = Shared {
        tun,
        socket,
        routes,
        vni,
        counters,
        stop: dp.stop.clone(),
        stop_fd,
        gso: Arc::new(AtomicBool::new(gso)),
    };
    let spin = cfg.spin;
    let rt = cfg.realtime_priority;
    for (i, q) in queues.into_iter().enumerate() {
        let mut w = shared.clone();
        w.tun = q;
        // On failure, dropping `dp` stops the threads already started.
        dp.threads.push(
            std::thread::Builder::new()
                .name(format!("weft-dp{i}"))
                .spawn(move || {
                    if let Some(p) = rt {
                        set_realtime(p);
                    }
                    let rx = (i == 0).then(|| RxWorker::new(&w));
                    run_worker(TxWorker::new(&w), rx, &w, spin)
                })?,
        );
    }
    Ok(dp)
}

fn check_vni(vni: u32) -> io::Result<()> {
    if vni > wire::vxlan::MAX_VNI {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("VNI {vni:#x} does not fit in 24 bits"),
        ));
    }
    Ok(())
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
    /// Cleared if the kernel rejects a GSO send (e.g. an underlay device without
    /// checksum offload): from then on every datagram is its own message.
    gso: Arc<AtomicBool>,
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

    /// Sleeps until one of `fds` is readable or the stop pipe fires. Returns false when
    /// stopping.
    fn wait_readable(&self, fds: &[RawFd]) -> bool {
        let mut p = [libc::pollfd {
            fd: self.stop_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }; 3];
        let n = fds.len().min(2);
        for (slot, fd) in p[1..].iter_mut().zip(&fds[..n]) {
            slot.fd = *fd;
        }
        // SAFETY: `p` is a live array of initialised pollfd structs, n + 1 <= 3.
        let _ = unsafe { libc::poll(p.as_mut_ptr(), (n + 1) as libc::nfds_t, -1) };
        !self.stopping() && p[0].revents == 0
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

/// Drop counts of one loop, added to the shared atomics once per batch.
struct LocalCounts {
    drops: [u64; DropReason::COUNT],
    malformed: [u64; DecapError::KINDS],
    batches: BatchStats,
}

impl LocalCounts {
    fn new() -> Self {
        LocalCounts {
            drops: [0; DropReason::COUNT],
            malformed: [0; DecapError::KINDS],
            batches: BatchStats::default(),
        }
    }

    fn add(&mut self, r: DropReason, n: u64) {
        self.drops[r.index()] += n;
    }

    fn malformed(&mut self, e: DecapError) {
        self.drops[DropReason::Malformed.index()] += 1;
        if let Some(c) = self.malformed.get_mut(e.index()) {
            *c += 1;
        }
    }

    fn flush(&mut self, to: &DataplaneCounters) {
        for (i, n) in self.drops.iter_mut().enumerate() {
            if *n != 0 {
                to.drops[i].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        for (i, n) in self.malformed.iter_mut().enumerate() {
            if *n != 0 {
                to.malformed[i].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        let b = std::mem::take(&mut self.batches);
        for (n, c) in [
            (b.tun_reads, &to.tun_reads),
            (b.tun_writes, &to.tun_writes),
            (b.udp_sends, &to.udp_sends),
            (b.udp_recvs, &to.udp_recvs),
        ] {
            if n != 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

fn is_full(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

/// TUN reads per transmit batch.
const TX_READS: usize = 8;
/// Datagrams per transmit batch (headers in the arena, two iovecs each).
const TX_SEGMENTS: usize = 1024;
/// Messages per `sendmmsg`: one per datagram at worst (GSO off), so a batch never
/// runs out of messages before it runs out of segments.
const TX_MSGS: usize = TX_SEGMENTS;
/// Arena bytes per segment header: encapsulation + IPv4 + TCP with options.
const TX_HDR_BYTES: usize = VXLAN_OVERHEAD_INNER + 120;
/// `recvmmsg` messages per receive batch (each up to 64 KiB of GRO datagrams).
pub const RX_MSGS: usize = 8;
/// Inner packets per receive batch: 8 messages of at most 64 KiB / 50 bytes each would
/// be more, but datagrams that small are never coalesced by the kernel in such numbers;
/// the GRO table grows (once) if they are.
const RX_PACKETS: usize = 1024;

/// Switches the calling thread to `SCHED_FIFO` at priority `p`; logs if refused.
fn set_realtime(p: i32) {
    let param = libc::sched_param { sched_priority: p };
    // SAFETY: a valid sched_param; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!(
            "cannot run the data plane at real-time priority {p}: {}",
            io::Error::last_os_error()
        );
    }
}

/// What one pass over a source found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Busy,
    Idle,
    Failed,
}

/// One worker thread: a TUN queue's transmit side and, for worker 0, the socket's
/// receive side. Serving both directions from one thread means that a reply the kernel
/// produces while weft writes a request into the TUN device is picked up without waking
/// another thread; the short spin before sleeping catches replies from the peer the
/// same way. Both matter for latency on VMs, where a wake-up costs tens of microseconds.
fn run_worker(mut tx: TxWorker, mut rx: Option<RxWorker>, s: &Shared, spin: Duration) {
    let mut fds = vec![s.tun.as_raw_fd()];
    if rx.is_some() {
        fds.push(s.socket.as_raw_fd());
    }
    let mut idle_since: Option<Instant> = None;
    while !s.stopping() {
        let t = tx.step(s);
        let r = rx.as_mut().map_or(Step::Idle, |rx| rx.step(s));
        if t == Step::Busy || r == Step::Busy {
            idle_since = None;
            continue;
        }
        if t == Step::Failed || r == Step::Failed {
            if !s.backoff() {
                return;
            }
            continue;
        }
        let now = Instant::now();
        if now.duration_since(*idle_since.get_or_insert(now)) < spin {
            std::thread::yield_now();
            continue;
        }
        idle_since = None;
        if !s.wait_readable(&fds) {
            return;
        }
    }
}

/// One open GSO message being assembled.
struct TxMsg {
    to: SocketAddrV4,
    seg_size: usize,
    segments: usize,
    bytes: usize,
    /// Segments `first..first + segments` of the batch.
    first: usize,
    closed: bool,
    peer: Arc<PeerCounters>,
    inner_bytes: usize,
}

/// The transmit loop: TUN super-packets -> segments -> UDP GSO messages.
struct TxWorker {
    reads: Vec<Box<[u8]>>,
    /// Read length of each used buffer.
    used: usize,
    arena: gso::Arena,
    segs: Vec<gso::Segment>,
    seg_buf: Vec<usize>,
    msgs: Vec<TxMsg>,
    gso_msgs: Vec<GsoMsg>,
    sender: Sender,
    local: LocalCounts,
    icmp: [u8; icmp::MAX_LEN],
    log: RateLimitedLog,
    send_log: RateLimitedLog,
    vnet: bool,
    mtu: usize,
}

impl TxWorker {
    fn new(s: &Shared) -> Self {
        let vnet = s.tun.vnet_hdr();
        let read_len = if vnet { virtio::LEN } else { 0 } + 65_535;
        TxWorker {
            reads: (0..TX_READS)
                .map(|_| vec![0u8; read_len].into_boxed_slice())
                .collect(),
            used: 0,
            arena: gso::Arena::new(TX_SEGMENTS * TX_HDR_BYTES),
            segs: Vec::with_capacity(TX_SEGMENTS),
            seg_buf: Vec::with_capacity(TX_SEGMENTS),
            msgs: Vec::with_capacity(TX_MSGS),
            gso_msgs: Vec::with_capacity(TX_MSGS),
            sender: Sender::new(TX_MSGS),
            local: LocalCounts::new(),
            icmp: [0; icmp::MAX_LEN],
            log: RateLimitedLog::new("reading from the TUN device"),
            send_log: RateLimitedLog::new("sending to a peer"),
            vnet,
            mtu: usize::from(s.tun.mtu()),
        }
    }

    /// Reads and forwards one batch from the TUN queue.
    fn step(&mut self, s: &Shared) -> Step {
        let mut step = Step::Idle;
        let table = s.routes.load();
        while self.used < TX_READS {
            let i = self.used;
            match s.tun.read_raw(&mut self.reads[i]) {
                Ok(len) => {
                    step = Step::Busy;
                    self.local.batches.tun_reads += 1;
                    self.handle(s, &table, i, len);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.local.add(DropReason::TunRead, 1);
                    self.log.error(&e);
                    if step == Step::Idle {
                        step = Step::Failed;
                    }
                    break;
                }
            }
        }
        self.flush(s);
        self.local.flush(&s.counters);
        step
    }

    /// Routes and segments the packet read into buffer `i`.
    fn handle(&mut self, s: &Shared, table: &RouteTable, i: usize, len: usize) {
        let off = if self.vnet { virtio::LEN } else { 0 };
        let vnet = if self.vnet {
            match VnetHdr::parse(&self.reads[i][..len]) {
                Some(h) if len > off => h,
                _ => {
                    self.local.add(DropReason::Malformed, 1);
                    return;
                }
            }
        } else {
            VnetHdr::default()
        };
        let (peer, to, dont_frag) = match route_packet(table, &self.reads[i][off..len]) {
            Ok(r) => r,
            Err(reason) => {
                self.local.add(reason, 1);
                return;
            }
        };
        let counters = peer.counters.clone();
        let template = match wire::encap::header(s.vni, table.local_mac(), peer.mac) {
            Ok(h) => h,
            Err(_) => {
                self.local.add(DropReason::Malformed, 1);
                return;
            }
        };
        let (arena_mark, seg_mark) = (self.arena.used(), self.segs.len());
        let mut split = gso::split(
            &vnet,
            &mut self.reads[i][off..len],
            &mut self.arena,
            VXLAN_OVERHEAD_INNER,
            &mut self.segs,
            TX_SEGMENTS,
        );
        if split == Err(GsoError::NoRoom) && seg_mark > 0 {
            // Send what is queued, then retry with empty buffers; keep this packet's
            // buffer by moving it to slot 0.
            self.flush(s);
            self.reads.swap(0, i);
            split = gso::split(
                &vnet,
                &mut self.reads[0][off..len],
                &mut self.arena,
                VXLAN_OVERHEAD_INNER,
                &mut self.segs,
                TX_SEGMENTS,
            );
            return self.after_split(s, split, 0, len, (0, 0), &template, to, counters, dont_frag);
        }
        self.after_split(
            s,
            split,
            i,
            len,
            (arena_mark, seg_mark),
            &template,
            to,
            counters,
            dont_frag,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn after_split(
        &mut self,
        s: &Shared,
        split: Result<gso::Split, GsoError>,
        i: usize,
        len: usize,
        (arena_mark, seg_mark): (usize, usize),
        template: &[u8; VXLAN_OVERHEAD_INNER],
        to: SocketAddrV4,
        counters: Arc<PeerCounters>,
        dont_frag: bool,
    ) {
        let off = if self.vnet { virtio::LEN } else { 0 };
        let split = match split {
            Ok(sp) => sp,
            Err(GsoError::NotIpv4) => return self.local.add(DropReason::NotIpv4, 1),
            Err(_) => return self.local.add(DropReason::Malformed, 1),
        };
        // Without DF an oversize packet is sent anyway: the kernel fragments the outer
        // datagram (the socket does not set DF), as Linux's VXLAN does.
        if split.max_ip_len > self.mtu && dont_frag {
            self.arena.rewind(arena_mark);
            self.segs.truncate(seg_mark);
            self.local.add(DropReason::TooBig, 1);
            self.frag_needed(s, i, off, len);
            return;
        }
        let max_segs = if s.gso.load(Ordering::Relaxed) {
            MAX_GSO_SEGMENTS
        } else {
            1
        };
        self.used = self.used.max(i + 1);
        for k in seg_mark..self.segs.len() {
            let seg = self.segs[k].clone();
            self.arena
                .get_mut(seg.hdr.start..seg.hdr.start + VXLAN_OVERHEAD_INNER)
                .copy_from_slice(template);
            self.seg_buf.push(i);
            let seg_len = seg.len();
            let inner = seg_len - VXLAN_OVERHEAD_INNER;
            // A datagram beyond the underlay MTU (no DF: the kernel fragments it) cannot
            // be part of a GSO message.
            let oversize = inner > self.mtu;
            let append = match self.msgs.last() {
                Some(m) => {
                    m.to == to
                        && !m.closed
                        && !oversize
                        && seg_len <= m.seg_size
                        && m.segments < max_segs
                        && m.bytes + seg_len <= MAX_GSO_BYTES
                }
                None => false,
            };
            if append {
                if let Some(m) = self.msgs.last_mut() {
                    m.segments += 1;
                    m.bytes += seg_len;
                    m.inner_bytes += inner;
                    m.closed = seg_len < m.seg_size;
                }
            } else {
                // At most one message per segment, and segments are capped at TX_MSGS.
                debug_assert!(self.msgs.len() < TX_MSGS);
                self.msgs.push(TxMsg {
                    to,
                    seg_size: seg_len,
                    segments: 1,
                    bytes: seg_len,
                    first: k,
                    closed: oversize,
                    peer: counters.clone(),
                    inner_bytes: inner,
                });
            }
        }
    }

    /// Writes ICMP "fragmentation needed" for the packet in buffer `i` back to the TUN.
    fn frag_needed(&mut self, s: &Shared, i: usize, off: usize, len: usize) {
        let mtu = u16::try_from(self.mtu).unwrap_or(u16::MAX);
        if let Some(n) = icmp::frag_needed(&self.reads[i][off..len], mtu, &mut self.icmp) {
            if let Err(e) = s.tun.send_packet(&self.icmp[..n]) {
                self.local.add(DropReason::TunWrite, 1);
                self.log.error(&e);
            }
        }
    }

    /// Sends every assembled message, then frees the batch's buffers.
    fn flush(&mut self, s: &Shared) {
        if !self.msgs.is_empty() {
            self.send_all(s);
        }
        self.msgs.clear();
        self.segs.clear();
        self.seg_buf.clear();
        self.arena.reset();
        self.used = 0;
    }

    fn send_all(&mut self, s: &Shared) {
        let off = if self.vnet { virtio::LEN } else { 0 };
        let mut iovs: [IoSlice<'_>; 2 * TX_SEGMENTS] = [IoSlice::new(&[]); 2 * TX_SEGMENTS];
        self.gso_msgs.clear();
        let mut n_iov = 0;
        for m in &self.msgs {
            let start = n_iov;
            for k in m.first..m.first + m.segments {
                let seg = &self.segs[k];
                let buf = &self.reads[self.seg_buf[k]];
                iovs[n_iov] = IoSlice::new(self.arena.get(seg.hdr.clone()));
                iovs[n_iov + 1] =
                    IoSlice::new(&buf[off + seg.payload.start..off + seg.payload.end]);
                n_iov += 2;
            }
            self.gso_msgs.push(GsoMsg {
                to: m.to,
                seg_size: m.seg_size,
                segments: m.segments,
                iov: start..n_iov,
            });
        }
        let mut done = 0;
        let mut waited = false;
        while done < self.gso_msgs.len() {
            match self
                .sender
                .send(&s.socket, &self.gso_msgs[done..], &iovs[..n_iov])
            {
                Ok(n) => {
                    self.local.batches.udp_sends += n as u64;
                    for m in &self.msgs[done..done + n] {
                        m.peer
                            .tx_packets
                            .fetch_add(m.segments as u64, Ordering::Relaxed);
                        m.peer
                            .tx_bytes
                            .fetch_add(m.inner_bytes as u64, Ordering::Relaxed);
                    }
                    done += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_full(&e) && !waited => {
                    waited = true;
                    if !s.wait(s.socket.as_raw_fd(), libc::POLLOUT, Some(SEND_WAIT)) {
                        break;
                    }
                }
                Err(e) => {
                    let m = &self.msgs[done];
                    if is_full(&e) {
                        self.local.add(DropReason::SocketFull, m.segments as u64);
                    } else {
                        if e.raw_os_error() == Some(libc::EIO) && m.segments > 1 {
                            // The route's device cannot checksum GSO sends: stop using GSO.
                            s.gso.store(false, Ordering::Relaxed);
                        }
                        self.local.add(DropReason::UdpSend, m.segments as u64);
                        self.send_log.error(&e);
                    }
                    done += 1;
                }
            }
        }
    }
}

/// Finds the peer for a TUN packet; `Ok` carries its route, address and the DF bit.
fn route_packet<'t>(
    table: &'t RouteTable,
    packet: &[u8],
) -> Result<(&'t PeerRoute, SocketAddrV4, bool), DropReason> {
    let first = *packet.first().ok_or(DropReason::Malformed)?;
    if first >> 4 != 4 {
        return Err(DropReason::NotIpv4);
    }
    if packet.len() < ipv4::MIN_HEADER_LEN {
        return Err(DropReason::Malformed);
    }
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let dont_frag = packet[6] & 0x40 != 0;
    match table.lookup(dst) {
        Lookup::Remote(p) => match p.data_addr {
            Some(a) => Ok((p, a, dont_frag)),
            None => Err(DropReason::Unreachable),
        },
        Lookup::Unreachable(_) => Err(DropReason::Unreachable),
        Lookup::Local | Lookup::NoRoute => Err(DropReason::NoRoute),
    }
}

/// Where a decapsulated inner packet lies: message index and offset in its buffer.
type InnerRef = (usize, usize);

/// The receive loop: GRO messages -> datagrams -> inner packets -> coalesced TUN writes.
struct RxWorker {
    receiver: Receiver,
    gro: Gro<InnerRef>,
    local: LocalCounts,
    log: RateLimitedLog,
    tun_log: RateLimitedLog,
    vnet: bool,
    overflows_seen: Option<u32>,
}

impl RxWorker {
    fn new(s: &Shared) -> Self {
        RxWorker {
            receiver: Receiver::new(RX_MSGS),
            gro: Gro::with_capacity(RX_PACKETS),
            local: LocalCounts::new(),
            log: RateLimitedLog::new("receiving from the data socket"),
            tun_log: RateLimitedLog::new("writing to the TUN device"),
            vnet: s.tun.vnet_hdr(),
            overflows_seen: None,
        }
    }

    /// Receives and forwards one batch from the data socket.
    fn step(&mut self, s: &Shared) -> Step {
        loop {
            match self.receiver.recv(&s.socket) {
                Ok(n) => {
                    self.handle(s, n);
                    self.local.flush(&s.counters);
                    return Step::Busy;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.local.add(DropReason::UdpRecv, 1);
                    self.local.flush(&s.counters);
                    self.log.error(&e);
                    return Step::Failed;
                }
            }
        }
    }

    fn handle(&mut self, s: &Shared, n: usize) {
        self.local.batches.udp_recvs += n as u64;
        let table = s.routes.load();
        self.gro.clear();
        for i in 0..n {
            let meta = self.receiver.meta(i);
            let buf = self.receiver.buf(i);
            let datagrams = buf.len().div_ceil(meta.stride).max(1) as u64;
            let peer = meta.src.and_then(|src| match src {
                SocketAddr::V4(a) => table.peer_by_endpoint(a),
                SocketAddr::V6(a) => a
                    .ip()
                    .to_ipv4_mapped()
                    .and_then(|ip| table.peer_by_endpoint(SocketAddrV4::new(ip, a.port()))),
            });
            let Some(peer) = peer else {
                self.local.add(DropReason::UnknownPeer, datagrams);
                continue;
            };
            let (mut packets, mut bytes) = (0u64, 0u64);
            let mut at = 0;
            let mut local_cache: Option<(Ipv4Addr, bool)> = None;
            // `loop`, not `while`: an empty datagram is a datagram too (and malformed).
            loop {
                let end = (at + meta.stride).min(buf.len());
                let d = &buf[at..end];
                match wire::decapsulate(d, s.vni) {
                    // Datagrams of one message mostly share a destination: one lookup.
                    Ok(dec)
                        if local_cache.filter(|c| c.0 == dec.dst).map_or_else(
                            || {
                                let l = table.is_local(dec.dst);
                                local_cache = Some((dec.dst, l));
                                l
                            },
                            |c| c.1,
                        ) =>
                    {
                        let inner = &d[dec.inner_ip.clone()];
                        packets += 1;
                        bytes += inner.len() as u64;
                        self.gro.push((i, at + dec.inner_ip.start), inner);
                    }
                    Ok(_) => self.local.add(DropReason::NotLocal, 1),
                    Err(e) => self.local.malformed(e),
                }
                at = end;
                if at >= buf.len() {
                    break;
                }
            }
            if packets > 0 {
                peer.counters
                    .rx_packets
                    .fetch_add(packets, Ordering::Relaxed);
                peer.counters.rx_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        if let Some(o) = self.receiver.overflows() {
            let prev = self.overflows_seen.unwrap_or(0);
            self.local
                .add(DropReason::RxBufferFull, u64::from(o.wrapping_sub(prev)));
            self.overflows_seen = Some(o);
        }
        self.gro.finish();
        let mut iov: [IoSlice<'_>; 2 + gro::MAX_SEGMENTS] =
            [IoSlice::new(&[]); 2 + gro::MAX_SEGMENTS];
        for j in 0..self.gro.len() {
            let mut k = 0;
            let hdr = self.gro.header(j);
            let hdr = if self.vnet { hdr } else { &hdr[virtio::LEN..] };
            if !hdr.is_empty() {
                iov[k] = IoSlice::new(hdr);
                k += 1;
            }
            for (r, range) in self.gro.parts(j) {
                let b = self.receiver.buf(r.0);
                iov[k] = IoSlice::new(&b[r.1 + range.start..r.1 + range.end]);
                k += 1;
            }
            self.local.batches.tun_writes += 1;
            if let Err(e) = s.tun.write_vectored(&iov[..k]) {
                let segs = self.gro.segments(j) as u64;
                if is_full(&e) {
                    self.local.add(DropReason::TunFull, segs);
                } else {
                    self.local.add(DropReason::TunWrite, segs);
                    self.tun_log.error(&e);
                }
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

    /// Buffer per packet in the tests: the largest IPv4 packet behind the VXLAN and
    /// Ethernet headers.
    const SLOT_LEN: usize = VXLAN_OVERHEAD_INNER + 65_535;

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
    fn vni_must_fit_24_bits() {
        assert!(check_vni(wire::vxlan::MAX_VNI).is_ok());
        let err = check_vni(0x100_0000).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
