//! The proof that IPAM never loses or duplicates an address: random runs of the
//! deterministic cluster simulation (`weft_sim`) with a faulty network,
//! partitions, restarts, deaths, rmpeer, comebacks of removed peers and late joiners,
//! checking the invariants as they go (see `Sim::check`).
//!
//! Replay a failure with `SIM_SEED=<seed> cargo test --test ipam_sim`.

use weft::core::ipam::IpallocInit;
use weft_sim::{run_scenario, Faults, Scenario, Sim, TICK};

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("SIM_SEED") {
        Ok(s) => vec![s.parse().expect("SIM_SEED must be a number")],
        Err(_) => default.to_vec(),
    }
}

fn run(sc: Scenario) {
    let t = std::time::Instant::now();
    match run_scenario(&sc) {
        Ok(sim) => {
            let owned: u64 = sim.ownership().iter().map(|&(_, n)| n).sum();
            eprintln!(
                "seed {}: {} nodes, {} ops in {:?}: {:?}; live pods {}, owned by live nodes {}",
                sc.seed,
                sim.nodes.len(),
                sc.ops,
                t.elapsed(),
                sim.stats,
                sim.containers.len(),
                owned
            );
        }
        Err(e) => panic!(
            "simulation failed with seed {} (replay: SIM_SEED={} cargo test --test ipam_sim): {e}",
            sc.seed, sc.seed
        ),
    }
}

fn faulty() -> Faults {
    Faults {
        drop: 30,
        dup: 20,
        save_fail: 5,
        max_delay: TICK,
    }
}

#[test]
fn fifty_peers_hundred_thousand_operations() {
    for seed in seeds(&[1]) {
        run(Scenario {
            seed,
            range: "10.32.0.0/20".parse().unwrap(),
            initial: 50,
            max_nodes: 56,
            ops: 100_000,
            faults: faulty(),
            check_every: 1,
            full_check_every: 64,
            byzantine: false,
        });
    }
}

/// A Byzantine participant injects rings that remove live peers (forged tombstones),
/// amid the usual faults: every address still has at most one holder, and no live pod
/// loses its address.
#[test]
fn forged_tombstones_of_live_peers_change_nothing() {
    for seed in seeds(&(200..210).collect::<Vec<_>>()) {
        run(Scenario {
            seed,
            range: "10.44.0.0/24".parse().unwrap(),
            initial: 4,
            max_nodes: 8,
            ops: 20_000,
            faults: faulty(),
            check_every: 1,
            full_check_every: 64,
            byzantine: true,
        });
    }
}

#[test]
fn small_clusters_many_seeds() {
    for seed in seeds(&(100..120).collect::<Vec<_>>()) {
        run(Scenario {
            seed,
            range: "10.40.0.0/24".parse().unwrap(),
            initial: 3,
            max_nodes: 8,
            ops: 5_000,
            faults: faulty(),
            check_every: 1,
            full_check_every: 64,
            byzantine: false,
        });
    }
}

#[test]
#[ignore = "long run: cargo test --release --test ipam_sim -- --ignored"]
fn long_run() {
    for seed in seeds(&(1000..1010).collect::<Vec<_>>()) {
        run(Scenario {
            seed,
            range: "10.32.0.0/19".parse().unwrap(),
            initial: 100,
            max_nodes: 120,
            ops: 1_000_000,
            faults: faulty(),
            check_every: 1,
            full_check_every: 64,
            byzantine: false,
        });
    }
}

/// Nodes started one at a time with long pauses agree on one ring (no "seeded by
/// different peers"), over a lossy network.
#[test]
fn staggered_start_agrees_on_one_ring() {
    for seed in seeds(&(0..30).collect::<Vec<_>>()) {
        let mut sim = Sim::new(seed, "10.32.0.0/16".parse().unwrap(), faulty());
        for _ in 0..5 {
            sim.add_node(IpallocInit::Consensus(5));
            let pause = sim.rng.below(20 * TICK);
            sim.run(pause);
            sim.check().unwrap();
        }
        sim.quiesce(2000 * TICK)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let ring = sim.node(0).ipam().ring().unwrap().clone();
        assert!(
            ring.seeds.len() >= 3,
            "seed {seed}: a quorum of 3 of 5 decided"
        );
        for i in sim.up() {
            assert_eq!(sim.node(i).counters().bad_gossip, 0, "seed {seed}");
        }
        // A late joiner owns nothing, asks, and gets space.
        let j = sim.add_node(IpallocInit::Consensus(5));
        sim.run(2 * TICK);
        let mut got = None;
        for _ in 0..200 {
            if let Ok(a) = sim.allocate(j) {
                if !a.is_unspecified() {
                    got = Some(a);
                    break;
                }
            }
            sim.run(TICK);
        }
        assert!(got.is_some(), "seed {seed}: late joiner never got space");
        sim.check().unwrap();
    }
}

#[test]
fn seed_and_observer_modes() {
    let mut sim = Sim::new(7, "10.32.0.0/24".parse().unwrap(), Faults::none());
    let names = vec![Sim::name_of(0), Sim::name_of(1)];
    sim.add_node(IpallocInit::Seed(names.clone()));
    // Seed nodes need nobody: the ring is computed alone.
    assert!(sim.node(0).can_allocate());
    sim.add_node(IpallocInit::Seed(names));
    sim.add_node(IpallocInit::Observer);
    sim.run(4 * TICK);
    assert!(sim.converged());
    let ring = sim.node(2).ipam().ring().unwrap().clone();
    assert_eq!(
        ring.total_owned(&Sim::name_of(2)),
        0,
        "observer holds nothing"
    );
    for _ in 0..100 {
        let a = sim.allocate(2).unwrap();
        if !a.is_unspecified() {
            break;
        }
        sim.run(TICK);
    }
    assert!(
        sim.node(2).ipam().active_count() > 0,
        "observer got space on demand"
    );
    sim.check().unwrap();
}
