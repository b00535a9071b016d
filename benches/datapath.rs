//! Per-packet and per-super-packet costs of the data path's pure parts: the planners the
//! forwarding workers run, the checksum, the route lookup.
//!
//! `cargo bench --bench datapath` (criterion). The end-to-end benchmark with real
//! namespaces, iperf3 and kernel VXLAN for comparison is `benches/iperf.sh`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use weft::core::datapath::{Identity, RxPlan, TxOutcome, TxPlan};
use weft::core::mesh::PeerName;
use weft::core::route::{PeerRoute, PeerState, RouteTable};
use weft::core::wire::virtio::{self, VnetHdr};
use weft::core::wire::{self, csum, icmp, ipv4, VXLAN_OVERHEAD_INNER, WEFT_VNI};

const MTU: usize = 1450;
const MSS: usize = MTU - 20 - 32;
const SRC_MAC: [u8; 6] = [2, 0x77, 0x66, 0, 0, 1];
const DST_MAC: [u8; 6] = [2, 0x77, 0x66, 0, 0, 2];

/// A TCP/IPv4 packet (timestamps option) with `payload` bytes and a valid checksum.
fn tcp_packet(payload: usize, seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; 52 + payload];
    ipv4::Repr {
        src: Ipv4Addr::new(192, 168, 0, 5),
        dst: Ipv4Addr::new(192, 168, 128, 7),
        protocol: ipv4::PROTO_TCP,
        ttl: 64,
        dont_frag: true,
        payload_len: 32 + payload,
    }
    .emit(&mut p)
    .unwrap();
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 8 << 4;
    t[13] = 0x10;
    t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
    for (i, b) in t[32..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let l4 = (p.len() - 20) as u16;
    let c = csum::finish(csum::sum(
        &p[20..],
        csum::pseudo_v4([192, 168, 0, 5], [192, 168, 128, 7], 6, l4),
    ));
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

fn per_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet");
    g.throughput(Throughput::Elements(1));
    let ip = tcp_packet(MSS, 1);
    let mut buf = vec![0u8; VXLAN_OVERHEAD_INNER + ip.len()];
    buf[VXLAN_OVERHEAD_INNER..].copy_from_slice(&ip);
    g.bench_function("encap_1450", |b| {
        b.iter(|| wire::encapsulate(black_box(&mut buf), ip.len(), WEFT_VNI, SRC_MAC, DST_MAC))
    });
    let datagram = buf.clone();
    g.bench_function("decap_1450", |b| {
        b.iter(|| wire::decapsulate(black_box(&datagram), WEFT_VNI))
    });
    g.finish();
}

/// Node 1 owns 192.168.0.0/17 and node 2 (at 10.77.0.2:6784) 192.168.128.0/17; `local`
/// is the table's own node.
fn two_node_table(local: u8) -> RouteTable {
    let name = |i: u8| PeerName::from_bytes([2, 0x77, 0x66, 0, 0, i]);
    let peer = |i: u8| PeerRoute {
        name: name(i),
        nickname: format!("n{i}"),
        data_addr: Some(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, i), 6784)),
        mac: name(i).mac(),
        counters: Arc::new(PeerState::default()),
    };
    let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
    RouteTable::new(
        name(local),
        name(local).mac(),
        &[
            (ip("192.168.0.0"), ip("192.168.127.255"), name(1)),
            (ip("192.168.128.0"), ip("192.168.255.255"), name(2)),
        ],
        vec![peer(1), peer(2)],
    )
}

/// What the workers run per 64 KiB of TCP: the transmit planner on one TSO read (route,
/// split into MSS segments with checksums, VXLAN headers, GSO grouping; payload left in
/// place for the scatter-gather send), and the receive planner on one GRO read of the
/// same data (source check, 46 datagrams decapsulated and coalesced).
fn super_packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("super_packet_64k");
    let segments = 46;
    let payload = segments * MSS;
    let total = 52 + payload;
    g.throughput(Throughput::Bytes(payload as u64));
    let mut read = vec![0u8; virtio::LEN];
    VnetHdr {
        flags: virtio::F_NEEDS_CSUM,
        gso_type: virtio::GSO_TCPV4,
        hdr_len: 52,
        gso_size: MSS as u16,
        csum_start: 20,
        csum_offset: 16,
    }
    .emit((&mut read[..]).try_into().unwrap());
    let mut pkt = tcp_packet(payload, 1);
    // As the kernel hands it over: total length of the super-packet, partial checksum.
    pkt[2..4].copy_from_slice(&(total.min(65_535) as u16).to_be_bytes());
    read.extend_from_slice(&pkt);
    let sender = two_node_table(1);
    let mut tx: TxPlan<Identity> = TxPlan::new(1024, true, MTU, WEFT_VNI);
    let mut icmp = [0u8; icmp::MAX_LEN];
    g.bench_function("tx_plan", |b| {
        b.iter(|| {
            tx.clear();
            let o = tx.push(&sender, 0, black_box(&mut read), &mut icmp);
            assert_eq!(o, TxOutcome::Queued(segments));
        })
    });

    // The same data as it arrives: 46 datagrams back to back in one GRO message.
    let template = wire::encap::header(WEFT_VNI, SRC_MAC, DST_MAC).unwrap();
    let mut gro_buf = Vec::new();
    let mut stride = 0;
    for i in 0..segments {
        let ip = tcp_packet(MSS, 1 + (i * MSS) as u32);
        let mut d = template.to_vec();
        d.extend_from_slice(&ip);
        stride = d.len();
        gro_buf.extend_from_slice(&d);
    }
    let receiver = two_node_table(2);
    let from = Some(SocketAddr::from(([10, 77, 0, 1], 6784)));
    let mut rx = RxPlan::new(1024, true, WEFT_VNI);
    g.bench_function("rx_plan", |b| {
        b.iter(|| {
            rx.clear();
            rx.ingest(&receiver, &mut Identity, 0, from, stride, &mut gro_buf);
            rx.finish();
            assert_eq!(rx.len(), 1);
        })
    });
    let data = vec![0x5au8; 65_536];
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("checksum", |b| b.iter(|| csum::sum(black_box(&data), 0)));
    g.finish();
}

fn route_lookup(c: &mut Criterion) {
    let name = |i: u32| {
        let b = i.to_be_bytes();
        PeerName::from_bytes([0x02, 0x77, b[0], b[1], b[2], b[3]])
    };
    let peers: Vec<PeerRoute> = (0..1000u32)
        .map(|i| PeerRoute {
            name: name(i),
            nickname: format!("node{i}"),
            data_addr: Some(SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 6784)),
            mac: name(i).mac(),
            counters: Arc::new(PeerState::default()),
        })
        .collect();
    // 10.32.0.0/12 split into 4 ranges per peer, as a ring after some churn.
    let base = u32::from(Ipv4Addr::new(10, 32, 0, 0));
    let per = (1u32 << 20) / 4000;
    let ranges: Vec<(u32, u32, PeerName)> = (0..4000u32)
        .map(|r| {
            (
                base + r * per,
                base + (r + 1) * per - 1,
                name((r * 7919) % 1000),
            )
        })
        .collect();
    let table = RouteTable::new(name(0), name(0).mac(), &ranges, peers);
    let dsts: Vec<Ipv4Addr> = (0..1024u32)
        .map(|i| Ipv4Addr::from(base + (i * 1021) % (4000 * per)))
        .collect();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(dsts.len() as u64));
    g.bench_function("lookup_1000_peers", |b| {
        b.iter_batched(
            || (),
            |_| {
                let mut remote = 0;
                for d in &dsts {
                    if matches!(table.lookup(*d), weft::core::route::Lookup::Remote(_)) {
                        remote += 1;
                    }
                }
                remote
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, per_packet, super_packet, route_lookup);
criterion_main!(benches);
