//! weft's own data path: forwarding threads between the TUN device and the VXLAN-format
//! UDP socket. Every decision is made by the planners of `core::datapath`; this module
//! owns the buffers, does the I/O in batches and counts.
//!
//! Transmit: up to [`TX_READS`] TUN reads per batch (each a packet or a 64 KiB
//! super-packet) go into a [`TxPlan`]; the transform stage seals the planned segments;
//! one `sendmmsg` sends the batch's GSO messages, each gathered from header and payload
//! slices without copying the payload. Receive: one `recvmmsg` returns up to [`RX_MSGS`]
//! GRO messages; the [`RxPlan`] opens, decapsulates and coalesces them; each output is
//! one `writev` into the TUN device.
//!
//! Each worker thread serves a TUN queue and, for worker 0, the socket; it drains its
//! sources in batches, loads the route table once per batch (an `arc_swap` load, not a
//! lock) and sleeps in `poll` only when both are empty. Nothing on this path allocates,
//! locks or logs per packet: drops are counted by reason in per-worker arrays that are
//! added to [`SharedCounters`] once per batch, per-peer counters once per message, and
//! I/O errors are logged at most once per [`LOG_INTERVAL`].

use super::{Backend, DatapathView, PeerTraffic, SharedCounters};
use crate::core::datapath::aead::{self, Aead};
use crate::core::datapath::{
    segment_overhead, DropCounts, DropReason, Identity, RxPlan, Sealed, Transform, TxOutcome,
    TxPlan,
};
use crate::core::mesh::{KeyChange, PeerEndpoint, PeerName};
use crate::core::route::{PeerRoute, PeerState, RouteTable};
use crate::core::wire::{self, icmp, virtio};
use crate::io::tun::Tun;
use crate::io::udp::{GsoMsg, Receiver, Sender};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io::{self, ErrorKind, IoSlice, Write};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Minimum spacing of repeated error log lines from one loop.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after an I/O error that left a batch empty, so a persistent error (device gone)
/// does not spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How long a send waits for room in the socket buffer before counting a drop.
const SEND_WAIT: Duration = Duration::from_millis(100);

/// TUN reads per transmit batch.
const TX_READS: usize = 8;
/// Datagrams per transmit batch (headers in the plan's arena, two iovecs each).
const TX_SEGMENTS: usize = 1024;
/// `recvmmsg` messages per receive batch (each up to 64 KiB of GRO datagrams).
pub const RX_MSGS: usize = 8;
/// Inner packets per receive batch: 8 messages of at most 64 KiB / 50 bytes each would
/// be more, but datagrams that small are never coalesced by the kernel in such numbers;
/// the GRO table grows (once) if they are.
const RX_PACKETS: usize = 1024;

/// The most one transmit batch seals: every read full, every segment with its headers.
const SEALED_BATCH_BYTES: usize = TX_READS * 65_535 + TX_SEGMENTS * segment_overhead::<Aead>();

/// Tuning of the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
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
    /// Seal and open every datagram ([`Aead`]: `WEAVE_PASSWORD`); plain VXLAN otherwise.
    pub encrypted: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            tx_workers: 1,
            spin: Duration::ZERO,
            realtime_priority: None,
            encrypted: false,
        }
    }
}

impl WorkerConfig {
    /// The defaults, except that `WEFT_DP_TX_WORKERS` (1..=8), `WEFT_DP_SPIN_US`
    /// (0..=10000) and `WEFT_DP_RT_PRIO` (1..=99) may override them, for measurements.
    pub fn from_env() -> WorkerConfig {
        let mut cfg = WorkerConfig::default();
        let var = |k: &str| std::env::var(k).ok();
        if let Some(n) = var("WEFT_DP_TX_WORKERS")
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| (1..=8).contains(n))
        {
            cfg.tx_workers = n;
        }
        if let Some(us) = var("WEFT_DP_SPIN_US")
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us <= 10_000)
        {
            cfg.spin = Duration::from_micros(us);
        }
        cfg.realtime_priority = var("WEFT_DP_RT_PRIO")
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|p| (1..=99).contains(p));
        cfg
    }
}

/// The user-space backend: the forwarding threads and the route table they read.
pub struct UserspaceBackend {
    local: PeerName,
    routes: Arc<ArcSwap<RouteTable>>,
    /// Per-peer traffic counters, kept across table rebuilds (control plane only).
    peer_counters: Mutex<HashMap<PeerName, Arc<PeerState>>>,
    counters: Arc<SharedCounters>,
    workers: Workers,
}

impl std::fmt::Debug for UserspaceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserspaceBackend")
            .field("local", &self.local)
            .field("workers", &self.workers.threads.len())
            .finish()
    }
}

impl UserspaceBackend {
    /// Starts forwarding between `tun` and `socket` (both switched to non-blocking mode)
    /// for the node `local`, with an empty route table until [`Backend::set_routes`].
    /// `vni` must fit in 24 bits. Extra TUN queues are opened by name, so this must run in
    /// the device's network namespace.
    pub fn start(
        tun: Tun,
        socket: UdpSocket,
        local: PeerName,
        vni: u32,
        cfg: &WorkerConfig,
    ) -> io::Result<UserspaceBackend> {
        let routes = Arc::new(ArcSwap::from_pointee(RouteTable::empty(
            local.clone(),
            local.mac(),
        )));
        let counters = Arc::new(SharedCounters::default());
        let workers = start_workers(tun, socket, routes.clone(), vni, counters.clone(), cfg)?;
        Ok(UserspaceBackend {
            local,
            routes,
            peer_counters: Mutex::new(HashMap::new()),
            counters,
            workers,
        })
    }

    /// Drop and batch counters (for measurements and tests).
    pub fn counters(&self) -> &SharedCounters {
        &self.counters
    }

    /// Stops the workers and waits for them (they notice within one batch).
    pub fn stop(mut self) {
        self.workers.shutdown();
    }
}

impl Backend for UserspaceBackend {
    fn set_routes(&self, ranges: &[(u32, u32, PeerName)], peers: Vec<PeerEndpoint>) {
        let mut counters = self.peer_counters.lock().unwrap_or_else(|p| p.into_inner());
        let peers = peers
            .into_iter()
            .map(|p| PeerRoute {
                mac: p.name.mac(),
                counters: counters.entry(p.name.clone()).or_default().clone(),
                name: p.name,
                nickname: p.nickname,
                data_addr: p.data_addr,
            })
            .collect();
        let table = RouteTable::new(self.local.clone(), self.local.mac(), ranges, peers);
        self.routes.store(Arc::new(table));
    }

    fn set_data_key(&self, peer: &PeerName, change: &KeyChange) {
        // The keys live in the peer's state, which every table shares: the workers see
        // them at their next load, without a table rebuild.
        let mut counters = self.peer_counters.lock().unwrap_or_else(|p| p.into_inner());
        let state = counters.entry(peer.clone()).or_default();
        match change {
            KeyChange::Send(k) => state.crypto.set_tx(k),
            KeyChange::Receive(k) => state.crypto.add_rx(k),
            KeyChange::Forget => state.crypto.clear(),
        }
    }

    fn view(&self) -> DatapathView {
        let table = self.routes.load();
        DatapathView {
            routes: table.routes(),
            peers: table
                .peers()
                .iter()
                .map(|p| PeerTraffic {
                    name: p.name.clone(),
                    nickname: p.nickname.clone(),
                    tx_packets: p.counters.tx_packets.load(Ordering::Relaxed),
                    tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                    rx_packets: p.counters.rx_packets.load(Ordering::Relaxed),
                    rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
                })
                .collect(),
            drops: self.counters.drops(),
        }
    }
}

/// The running threads. Dropping stops and joins them.
struct Workers {
    stop: Arc<AtomicBool>,
    waker: Option<io::PipeWriter>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
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

impl Drop for Workers {
    fn drop(&mut self) {
        self.shutdown();
    }
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

fn start_workers(
    tun: Tun,
    socket: UdpSocket,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<SharedCounters>,
    cfg: &WorkerConfig,
) -> io::Result<Workers> {
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
    let mut workers = Workers {
        stop: Arc::new(AtomicBool::new(false)),
        waker: Some(writer),
        threads: Vec::with_capacity(queues.len()),
    };
    let shared = Shared {
        tun,
        socket: Arc::new(socket),
        routes,
        vni,
        counters,
        stop: workers.stop.clone(),
        stop_fd: Arc::new(reader),
        gso: Arc::new(AtomicBool::new(gso)),
    };
    let spin = cfg.spin;
    let rt = cfg.realtime_priority;
    let encrypted = cfg.encrypted;
    for (i, q) in queues.into_iter().enumerate() {
        let mut w = shared.clone();
        w.tun = q;
        // On failure, dropping `workers` stops the threads already started.
        workers.threads.push(
            std::thread::Builder::new()
                .name(format!("weft-dp{i}"))
                .spawn(move || {
                    if let Some(p) = rt {
                        set_realtime(p);
                    }
                    if encrypted {
                        let rx = (i == 0).then(|| RxWorker::new(&w, Aead::new(0)));
                        let tx = TxWorker::new(&w, Aead::new(SEALED_BATCH_BYTES));
                        run_worker(tx, rx, &w, spin)
                    } else {
                        let rx = (i == 0).then(|| RxWorker::new(&w, Identity));
                        run_worker(TxWorker::new(&w, Identity), rx, &w, spin)
                    }
                })?,
        );
    }
    let overlay_mtu = usize::from(shared.tun.mtu());
    let sealed = if encrypted { aead::OVERHEAD as u32 } else { 0 };
    let (routes, stop) = (shared.routes.clone(), shared.stop.clone());
    workers.threads.push(
        std::thread::Builder::new()
            .name("weft-pmtu".into())
            .spawn(move || follow_path_mtu(&routes, &stop, overlay_mtu, sealed))?,
    );
    Ok(workers)
}

/// How often the path MTU to each peer is read from the kernel.
const PATH_MTU_POLL: Duration = Duration::from_secs(1);

/// Keeps each peer's path MTU (see [`PeerState::path_mtu`]) in step with what the kernel
/// learnt from the underlay's ICMP, in both directions: lowered when a hop says so, raised
/// again when the kernel lets that knowledge expire. Off the forwarding threads: they only
/// read one atomic per packet.
fn follow_path_mtu(
    routes: &ArcSwap<RouteTable>,
    stop: &AtomicBool,
    overlay_mtu: usize,
    sealed: u32,
) {
    while !stop.load(Ordering::Relaxed) {
        let table = routes.load();
        for p in table.peers() {
            let Some(addr) = p.data_addr else { continue };
            let Ok(path) = crate::io::udp::path_mtu(addr) else {
                continue;
            };
            let limit = crate::core::datapath::path_limit(path, overlay_mtu, sealed);
            let old = p.counters.path_mtu.swap(limit, Ordering::Relaxed);
            if old != limit {
                if limit == 0 {
                    tracing::info!(
                        "path MTU to {} ({addr}) is {path} again: the overlay MTU {overlay_mtu} fits",
                        p.nickname
                    );
                } else {
                    tracing::warn!(
                        "path MTU to {} ({addr}) dropped to {path}: pods' packets to it over {limit} bytes are answered with ICMP fragmentation needed",
                        p.nickname
                    );
                }
            }
        }
        drop(table);
        let until = std::time::Instant::now() + PATH_MTU_POLL;
        while std::time::Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[derive(Clone)]
struct Shared {
    tun: Tun,
    socket: Arc<UdpSocket>,
    routes: Arc<ArcSwap<RouteTable>>,
    vni: u32,
    counters: Arc<SharedCounters>,
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

fn is_full(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOBUFS)
}

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
/// another thread; the optional spin before sleeping catches replies from the peer the
/// same way. Both matter for latency on VMs, where a wake-up costs tens of microseconds.
fn run_worker<T: Transform>(
    mut tx: TxWorker<T>,
    mut rx: Option<RxWorker<T>>,
    s: &Shared,
    spin: Duration,
) {
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

/// The transmit loop: TUN reads -> [`TxPlan`] -> transform -> `sendmmsg`.
struct TxWorker<T: Transform> {
    reads: Vec<Box<[u8]>>,
    /// Read buffers holding planned packets.
    used: usize,
    plan: TxPlan<T>,
    transform: T,
    /// Per planned segment, how the transform sealed it (unused when it passes through).
    sealed: Vec<Sealed>,
    gso_msgs: Vec<GsoMsg>,
    /// For each of `gso_msgs`, the planned message it sends.
    gso_of: Vec<usize>,
    sender: Sender,
    /// I/O failures and batch counts (the plan counts its own drops).
    io: DropCounts,
    icmp: [u8; icmp::MAX_LEN],
    log: RateLimitedLog,
    send_log: RateLimitedLog,
}

impl<T: Transform> TxWorker<T> {
    fn new(s: &Shared, transform: T) -> Self {
        let vnet = s.tun.vnet_hdr();
        let read_len = if vnet { virtio::LEN } else { 0 } + 65_535;
        TxWorker {
            reads: (0..TX_READS)
                .map(|_| vec![0u8; read_len].into_boxed_slice())
                .collect(),
            used: 0,
            plan: TxPlan::new(TX_SEGMENTS, vnet, usize::from(s.tun.mtu()), s.vni),
            transform,
            sealed: Vec::with_capacity(if T::PASSTHROUGH { 0 } else { TX_SEGMENTS }),
            gso_msgs: Vec::with_capacity(TX_SEGMENTS),
            gso_of: Vec::with_capacity(TX_SEGMENTS),
            sender: Sender::new(TX_SEGMENTS),
            io: DropCounts::default(),
            icmp: [0; icmp::MAX_LEN],
            log: RateLimitedLog::new("reading from the TUN device"),
            send_log: RateLimitedLog::new("sending to a peer"),
        }
    }

    /// Reads and forwards one batch from the TUN queue.
    fn step(&mut self, s: &Shared) -> Step {
        let mut step = Step::Idle;
        let table = s.routes.load();
        if self.plan.gso_enabled() && !s.gso.load(Ordering::Relaxed) {
            self.plan.disable_gso();
        }
        while self.used < TX_READS {
            let i = self.used;
            match s.tun.read_raw(&mut self.reads[i]) {
                Ok(len) => {
                    step = Step::Busy;
                    self.io.batches.tun_reads += 1;
                    self.handle(s, &table, i, len);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.io.add(DropReason::TunRead, 1);
                    self.log.error(&e);
                    if step == Step::Idle {
                        step = Step::Failed;
                    }
                    break;
                }
            }
        }
        self.flush(s, &table);
        s.counters.drain(&mut self.io);
        s.counters.drain(self.plan.counts_mut());
        step
    }

    /// Plans the packet read into buffer `i`.
    fn handle(&mut self, s: &Shared, table: &RouteTable, mut i: usize, len: usize) {
        loop {
            match self
                .plan
                .push(table, i, &mut self.reads[i][..len], &mut self.icmp)
            {
                TxOutcome::Queued(_) => {
                    self.used = self.used.max(i + 1);
                    return;
                }
                TxOutcome::Dropped(_) => return,
                TxOutcome::FragNeeded(n) => {
                    if let Err(e) = s.tun.send_packet(&self.icmp[..n]) {
                        self.io.add(DropReason::TunWrite, 1);
                        self.log.error(&e);
                    }
                    return;
                }
                TxOutcome::Full => {
                    // Send what is planned, then offer this packet again from slot 0.
                    self.flush(s, table);
                    self.reads.swap(0, i);
                    i = 0;
                }
            }
        }
    }

    /// Seals and sends every planned message, then frees the batch's buffers.
    fn flush(&mut self, s: &Shared, table: &RouteTable) {
        if !self.plan.is_empty() {
            if !T::PASSTHROUGH {
                self.seal(table);
            }
            self.send_all(s);
        }
        self.plan.clear();
        self.used = 0;
    }

    fn seal(&mut self, table: &RouteTable) {
        self.transform.reset();
        self.sealed.clear();
        let peers = table.peers();
        for m in 0..self.plan.messages().len() {
            let (peer, segments) = {
                let msg = &self.plan.messages()[m];
                (msg.peer_index, msg.segments.clone())
            };
            for k in segments {
                let (b, r) = self.plan.payload(k);
                let sealed = match peers.get(peer) {
                    Some(p) => self
                        .transform
                        .seal(p, self.plan.header_mut(k), &self.reads[b][r]),
                    None => Sealed::Refused,
                };
                if sealed == Sealed::Refused {
                    self.io.add(DropReason::NoKey, 1);
                }
                self.sealed.push(sealed);
            }
        }
    }

    fn send_all(&mut self, s: &Shared) {
        let mut iovs: [IoSlice<'_>; 2 * TX_SEGMENTS] = [IoSlice::new(&[]); 2 * TX_SEGMENTS];
        self.gso_msgs.clear();
        self.gso_of.clear();
        let mut n_iov = 0;
        for (i, m) in self.plan.messages().iter().enumerate() {
            let start = n_iov;
            let mut segments = 0;
            for k in m.segments.clone() {
                let sealed = if T::PASSTHROUGH {
                    &Sealed::AsPlanned
                } else {
                    self.sealed.get(k).unwrap_or(&Sealed::Refused)
                };
                match sealed {
                    Sealed::AsPlanned => {
                        let (b, r) = self.plan.payload(k);
                        iovs[n_iov] = IoSlice::new(self.plan.header(k));
                        iovs[n_iov + 1] = IoSlice::new(&self.reads[b][r]);
                        n_iov += 2;
                    }
                    Sealed::Replaced(r) => {
                        iovs[n_iov] = IoSlice::new(&self.transform.output()[r.clone()]);
                        n_iov += 1;
                    }
                    // Counted when sealed. Leaving a segment out keeps the message valid
                    // for GSO: the ones left are still equal-sized but for the last.
                    Sealed::Refused => continue,
                }
                segments += 1;
            }
            if segments == 0 {
                continue;
            }
            self.gso_msgs.push(GsoMsg {
                to: m.to,
                seg_size: m.seg_size,
                segments,
                iov: start..n_iov,
            });
            self.gso_of.push(i);
        }
        let msgs = self.plan.messages();
        let mut done = 0;
        let mut waited = false;
        while done < self.gso_msgs.len() {
            match self
                .sender
                .send(&s.socket, &self.gso_msgs[done..], &iovs[..n_iov])
            {
                Ok(n) => {
                    self.io.batches.udp_sends += n as u64;
                    for (g, &i) in self.gso_msgs[done..done + n]
                        .iter()
                        .zip(&self.gso_of[done..done + n])
                    {
                        let m = &msgs[i];
                        m.peer
                            .tx_packets
                            .fetch_add(g.segments as u64, Ordering::Relaxed);
                        // Refused segments of a message are rare (a key expiring
                        // mid-batch): its bytes are counted in proportion.
                        let bytes = m.inner_bytes * g.segments / m.segments.len();
                        m.peer.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
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
                    let segments = self.gso_msgs[done].segments as u64;
                    if is_full(&e) {
                        self.io.add(DropReason::SocketFull, segments);
                    } else {
                        if e.raw_os_error() == Some(libc::EIO) && segments > 1 {
                            // The route's device cannot checksum GSO sends: stop using GSO.
                            s.gso.store(false, Ordering::Relaxed);
                        }
                        self.io.add(DropReason::UdpSend, segments);
                        self.send_log.error(&e);
                    }
                    done += 1;
                }
            }
        }
    }
}

/// The receive loop: `recvmmsg` -> [`RxPlan`] -> coalesced TUN writes.
struct RxWorker<T: Transform> {
    receiver: Receiver,
    plan: RxPlan,
    transform: T,
    io: DropCounts,
    log: RateLimitedLog,
    tun_log: RateLimitedLog,
    overflows_seen: Option<u32>,
}

impl<T: Transform> RxWorker<T> {
    fn new(s: &Shared, transform: T) -> Self {
        let mut plan = RxPlan::new(RX_PACKETS, s.tun.vnet_hdr(), s.vni);
        if s.tun.vnet_hdr() {
            // Without the virtio header nothing can be handed over for segmenting.
            plan.set_mtu(usize::from(s.tun.mtu()));
        }
        RxWorker {
            receiver: Receiver::new(RX_MSGS),
            plan,
            transform,
            io: DropCounts::default(),
            log: RateLimitedLog::new("receiving from the data socket"),
            tun_log: RateLimitedLog::new("writing to the TUN device"),
            overflows_seen: None,
        }
    }

    /// Receives and forwards one batch from the data socket.
    fn step(&mut self, s: &Shared) -> Step {
        let step = loop {
            match self.receiver.recv(&s.socket) {
                Ok(n) => {
                    self.handle(s, n);
                    break Step::Busy;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.io.add(DropReason::UdpRecv, 1);
                    self.log.error(&e);
                    break Step::Failed;
                }
            }
        };
        s.counters.drain(&mut self.io);
        s.counters.drain(self.plan.counts_mut());
        step
    }

    fn handle(&mut self, s: &Shared, n: usize) {
        self.io.batches.udp_recvs += n as u64;
        let table = s.routes.load();
        self.plan.clear();
        for i in 0..n {
            let meta = self.receiver.meta(i);
            self.plan.ingest(
                &table,
                &mut self.transform,
                i,
                meta.src,
                meta.stride,
                self.receiver.buf_mut(i),
            );
        }
        if let Some(o) = self.receiver.overflows() {
            let prev = self.overflows_seen.unwrap_or(0);
            self.io
                .add(DropReason::RxBufferFull, u64::from(o.wrapping_sub(prev)));
            self.overflows_seen = Some(o);
        }
        self.plan.finish();
        let mut iov: [IoSlice<'_>; 2 + wire::gro::MAX_SEGMENTS] =
            [IoSlice::new(&[]); 2 + wire::gro::MAX_SEGMENTS];
        for j in 0..self.plan.len() {
            let mut k = 0;
            let hdr = self.plan.header(j);
            if !hdr.is_empty() {
                iov[k] = IoSlice::new(hdr);
                k += 1;
            }
            for ((b, off), range) in self.plan.parts(j) {
                let buf = self.receiver.buf(b);
                iov[k] = IoSlice::new(&buf[off + range.start..off + range.end]);
                k += 1;
            }
            self.io.batches.tun_writes += 1;
            if let Err(e) = s.tun.write_vectored(&iov[..k]) {
                let segs = self.plan.segments(j) as u64;
                if is_full(&e) {
                    self.io.add(DropReason::TunFull, segs);
                } else {
                    self.io.add(DropReason::TunWrite, segs);
                    self.tun_log.error(&e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
