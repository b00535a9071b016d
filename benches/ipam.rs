//! IPAM core benchmarks: allocate+free throughput, merging a 1000-peer ring, and the
//! gossip bytes a node sends per anti-entropy round at 10, 100 and 1000 peers (printed:
//! criterion measures time, not bytes).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::hint;
use weft::core::ipam::{IpallocInit, Ipam, Ring};
use weft::core::mesh::PeerName;
use weft_sim::{Faults, Sim, TICK};

fn peer(i: usize) -> PeerName {
    PeerName::from_bytes([2, 0x42, 0, 0, (i >> 8) as u8, i as u8])
}

fn alloc_free(c: &mut Criterion) {
    let me = peer(0);
    let mut ipam = Ipam::new(me.clone(), "10.0.0.0/12".parse().unwrap());
    ipam.seed(&[me, peer(1), peer(2), peer(3)]).unwrap();
    // A realistically busy node: 10k pods, with holes.
    for i in 0..10_000 {
        ipam.allocate(&format!("bg{i}")).unwrap();
    }
    for i in (0..10_000).step_by(3) {
        ipam.free(&format!("bg{i}"));
    }
    c.bench_function("ipam allocate+free (10k pods held)", |b| {
        b.iter(|| {
            let a = ipam.allocate("pod").unwrap();
            hint::black_box(a);
            ipam.free("pod");
        })
    });
}

fn merge_1000(c: &mut Criterion) {
    let names: Vec<PeerName> = (0..1000).map(peer).collect();
    let base = Ring::seeded("10.0.0.0/8".parse().unwrap(), &names).unwrap();
    // Every peer changed its entry once and half of them cut it in two.
    let mut newer = base.clone();
    for (i, n) in names.iter().enumerate() {
        let (first, _last, e) = newer
            .ranges()
            .find(|(_, _, e)| &e.owner == n)
            .map(|(f, l, e)| (f, l, e.clone()))
            .unwrap();
        newer.report_free(n, &[(first, e.free - 1)]).unwrap();
        if i % 2 == 0 {
            newer.split(n, first + 4096, n).unwrap();
        }
    }
    eprintln!(
        "merge bench: rings of {} and {} entries",
        base.entries.len(),
        newer.entries.len()
    );
    c.bench_function("ring merge, 1000 peers", |b| {
        b.iter(|| {
            let mut r = base.clone();
            r.merge(black_box(&newer)).unwrap();
            r
        })
    });
    c.bench_function("ring digest, 1000 peers", |b| b.iter(|| newer.digest()));
}

/// Bytes sent per node per tick (one anti-entropy round) in steady state, with `busy`
/// nodes each allocating one address per tick.
fn gossip_bytes(n: usize, degree: usize, busy: bool) -> (f64, f64) {
    let names: Vec<PeerName> = (0..n).map(Sim::name_of).collect();
    let mut sim = Sim::new(42, "10.0.0.0/8".parse().unwrap(), Faults::none());
    for _ in 0..n {
        sim.add_node_linked(IpallocInit::Seed(names.clone()), degree);
    }
    let mut steps = 0;
    while !sim.converged() {
        sim.run(TICK);
        steps += 1;
        assert!(steps < 1000, "no convergence");
    }
    sim.measure_bytes = true;
    for b in &mut sim.bytes_sent {
        *b = 0;
    }
    let rounds = 10;
    for _ in 0..rounds {
        if busy {
            for i in 0..n {
                sim.allocate(i).unwrap();
            }
        }
        sim.run(TICK);
    }
    let total: u64 = sim.bytes_sent.iter().sum();
    let max = *sim.bytes_sent.iter().max().unwrap();
    let per = total as f64 / (n as f64 * rounds as f64);
    (per, max as f64 / rounds as f64)
}

fn report_gossip_bytes(_c: &mut Criterion) {
    for (n, degree) in [(10, usize::MAX), (100, usize::MAX), (1000, 100)] {
        let (quiet, quiet_max) = gossip_bytes(n, degree, false);
        let (busy, busy_max) = gossip_bytes(n, degree, true);
        let mesh = if degree == usize::MAX {
            "full mesh".to_string()
        } else {
            format!("{degree} neighbours each")
        };
        eprintln!(
            "gossip bytes per node per anti-entropy round, {n} peers ({mesh}): quiet {quiet:.0} \
             (max {quiet_max:.0}); every node allocating each round {busy:.0} (max {busy_max:.0})"
        );
    }
}

criterion_group!(benches, report_gossip_bytes, alloc_free, merge_1000);
criterion_main!(benches);
