//! The nftables table that enforces a node's compiled policy, as data: sets, verdict maps
//! and chains in a small vocabulary that `io::nft_policy` turns into netlink, that
//! `Display` prints in nft's syntax, and that [`Table::judge`] interprets the way the
//! kernel does (so tests prove the table means what the compiled policy means).
//!
//! Shape (one table `ip weft_policy`, hooked on forward, beside kube-proxy's and weft's NAT
//! table, touching no other):
//!
//! ```text
//! chain forward { type filter hook forward priority filter; policy accept;
//!     ct state established,related accept            # replies, and connections let in
//!     ip daddr 224.0.0.0/4 accept                    # --allow-mcast (default)
//!     iifname "vethwepl*" ip saddr vmap @egress      # a local pod isolated for egress
//!     oifname "vethwepl*" ip daddr vmap @ingress     # a local pod isolated for ingress
//! }
//! chain in_c0a80005 {                                # pod 192.168.0.5, ingress
//!     ip saddr @in_c0a80005_any return               # rules without ports
//!     ip saddr . meta l4proto . th dport @in_c0a80005_exact return
//!     meta l4proto vmap @in_c0a80005_proto           # goto in_c0a80005_tcp, ...
//!     counter log prefix "weft-policy in " group 86 drop
//! }
//! chain in_c0a80005_tcp { th dport vmap @in_c0a80005_tcp_ports; counter log ... drop }
//! chain in_c0a80005_tcp_0 { ip saddr @in_c0a80005_tcp_0 return; counter log ... drop }
//! ```
//!
//! Every lookup is a hash or an interval tree: a packet costs the same few lookups however
//! many policies and pods there are. Traffic between a pod and its own node never crosses
//! forward (it is input or output), so it is always allowed; only new connections are
//! judged (conntrack lets the rest through).

use super::compile::{Allow, Compiled, RangeSet};
use super::model::Proto;
use ipnet::Ipv4Net;
use std::fmt;
use std::net::Ipv4Addr;

pub const TABLE: &str = "weft_policy";
/// weave-npc's NFLOG group: a denied new connection is logged there, then dropped.
pub const NFLOG_GROUP: u16 = 86;
pub const FORWARD_CHAIN: &str = "forward";
/// At the filter priority, as iptables' FORWARD: after kube-proxy's DNAT (prerouting), so
/// policy sees the pod behind a Service.
pub const FORWARD_PRIORITY: i32 = 0;
pub const INGRESS_MAP: &str = "ingress";
pub const EGRESS_MAP: &str = "egress";
/// The NFLOG prefixes: which side denied.
pub const PREFIX_IN: &str = "weft-policy in ";
pub const PREFIX_OUT: &str = "weft-policy out ";

/// A key field's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// ipv4_addr, 4 bytes
    Addr,
    /// inet_proto, 1 byte
    Proto,
    /// inet_service, 2 bytes (network order)
    Port,
}

/// What a lookup reads from the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    Saddr,
    Daddr,
    L4proto,
    Dport,
}

impl Load {
    pub fn field(self) -> Field {
        match self {
            Load::Saddr | Load::Daddr => Field::Addr,
            Load::L4proto => Field::Proto,
            Load::Dport => Field::Port,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

/// A set or map element; interval sets give `key_end` (inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u32>,
    pub key_end: Option<Vec<u32>>,
    pub verdict: Option<Verdict>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub fields: Vec<Field>,
    pub interval: bool,
    /// A verdict map.
    pub map: bool,
    pub elements: Vec<Element>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `ct state established,related`
    Established,
    DaddrIn(Ipv4Net),
    IifPrefix(String),
    OifPrefix(String),
    /// `LOADS @set`
    InSet {
        loads: Vec<Load>,
        set: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Verdict(Verdict),
    /// `LOADS vmap @map`: no element, no verdict (the next rule).
    VMap {
        loads: Vec<Load>,
        map: String,
    },
    /// `counter log prefix PREFIX group 86 drop`
    Deny {
        prefix: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// A base chain on forward at this priority (policy accept), or a regular chain.
    pub base: Option<i32>,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// How the node's table is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// weave-npc's `--allow-mcast`: multicast (224.0.0.0/4) passes whatever the policies.
    pub allow_mcast: bool,
    /// The prefix of pods' host-side veths.
    pub pod_link_prefix: String,
}

fn hex(ip: Ipv4Addr) -> String {
    format!("{:08x}", u32::from(ip))
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Sctp => "sctp",
    }
}

fn rule(matches: Vec<Match>, action: Action) -> Rule {
    Rule { matches, action }
}

fn addr_set(name: String, ranges: &RangeSet) -> Set {
    Set {
        name,
        fields: vec![Field::Addr],
        interval: true,
        map: false,
        elements: ranges
            .ranges()
            .iter()
            .map(|&(lo, hi)| Element {
                key: vec![lo],
                key_end: Some(vec![hi]),
                verdict: None,
            })
            .collect(),
    }
}

/// The chains and sets of one pod's isolated direction; returns the entry chain's name.
fn pod_direction(t: &mut Table, ip: Ipv4Addr, allow: &Allow, ingress: bool) -> String {
    let (dir, peer, prefix) = if ingress {
        ("in", Load::Saddr, PREFIX_IN)
    } else {
        ("out", Load::Daddr, PREFIX_OUT)
    };
    let base = format!("{dir}_{}", hex(ip));
    let deny = || rule(Vec::new(), Action::Deny { prefix });
    let mut rules = Vec::new();
    if !allow.any.is_empty() {
        let name = format!("{base}_any");
        t.sets.push(addr_set(name.clone(), &allow.any));
        rules.push(rule(
            vec![Match::InSet {
                loads: vec![peer],
                set: name,
            }],
            Action::Verdict(Verdict::Return),
        ));
    }
    if !allow.exact.is_empty() {
        let name = format!("{base}_exact");
        t.sets.push(Set {
            name: name.clone(),
            fields: vec![Field::Addr, Field::Proto, Field::Port],
            interval: false,
            map: false,
            elements: allow
                .exact
                .iter()
                .map(|&(a, p, port)| Element {
                    key: vec![u32::from(a), u32::from(p.number()), u32::from(port)],
                    key_end: None,
                    verdict: None,
                })
                .collect(),
        });
        rules.push(rule(
            vec![Match::InSet {
                loads: vec![peer, Load::L4proto, Load::Dport],
                set: name,
            }],
            Action::Verdict(Verdict::Return),
        ));
    }
    if !allow.ports.is_empty() {
        let proto_map = format!("{base}_proto");
        let mut proto_elements = Vec::new();
        for (proto, ranges) in &allow.ports {
            let pchain = format!("{base}_{}", proto_name(*proto));
            let ports_map = format!("{pchain}_ports");
            let mut port_elements = Vec::new();
            for (k, (lo, hi, peers)) in ranges.iter().enumerate() {
                let leaf = format!("{pchain}_{k}");
                t.sets.push(addr_set(leaf.clone(), peers));
                t.chains.push(Chain {
                    name: leaf.clone(),
                    base: None,
                    rules: vec![
                        rule(
                            vec![Match::InSet {
                                loads: vec![peer],
                                set: leaf.clone(),
                            }],
                            Action::Verdict(Verdict::Return),
                        ),
                        deny(),
                    ],
                });
                port_elements.push(Element {
                    key: vec![u32::from(*lo)],
                    key_end: Some(vec![u32::from(*hi)]),
                    verdict: Some(Verdict::Goto(leaf)),
                });
            }
            t.sets.push(Set {
                name: ports_map.clone(),
                fields: vec![Field::Port],
                interval: true,
                map: true,
                elements: port_elements,
            });
            t.chains.push(Chain {
                name: pchain.clone(),
                base: None,
                rules: vec![
                    rule(
                        Vec::new(),
                        Action::VMap {
                            loads: vec![Load::Dport],
                            map: ports_map,
                        },
                    ),
                    deny(),
                ],
            });
            proto_elements.push(Element {
                key: vec![u32::from(proto.number())],
                key_end: None,
                verdict: Some(Verdict::Goto(pchain)),
            });
        }
        t.sets.push(Set {
            name: proto_map.clone(),
            fields: vec![Field::Proto],
            interval: false,
            map: true,
            elements: proto_elements,
        });
        rules.push(rule(
            Vec::new(),
            Action::VMap {
                loads: vec![Load::L4proto],
                map: proto_map,
            },
        ));
    }
    rules.push(deny());
    t.chains.push(Chain {
        name: base.clone(),
        base: None,
        rules,
    });
    base
}

/// The table that enforces `compiled` on this node.
pub fn build(compiled: &Compiled, opts: &Options) -> Table {
    let mut t = Table::default();
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for (ip, pod) in &compiled.pods {
        if let Some(a) = &pod.ingress {
            let chain = pod_direction(&mut t, *ip, a, true);
            ingress.push(Element {
                key: vec![u32::from(*ip)],
                key_end: None,
                verdict: Some(Verdict::Jump(chain)),
            });
        }
        if let Some(a) = &pod.egress {
            let chain = pod_direction(&mut t, *ip, a, false);
            egress.push(Element {
                key: vec![u32::from(*ip)],
                key_end: None,
                verdict: Some(Verdict::Jump(chain)),
            });
        }
    }
    for (name, elements) in [(INGRESS_MAP, ingress), (EGRESS_MAP, egress)] {
        t.sets.push(Set {
            name: name.to_string(),
            fields: vec![Field::Addr],
            interval: false,
            map: true,
            elements,
        });
    }
    let mut fwd = vec![rule(
        vec![Match::Established],
        Action::Verdict(Verdict::Accept),
    )];
    if opts.allow_mcast {
        fwd.push(rule(
            vec![Match::DaddrIn(
                Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4).expect("valid"),
            )],
            Action::Verdict(Verdict::Accept),
        ));
    }
    fwd.push(rule(
        vec![Match::IifPrefix(opts.pod_link_prefix.clone())],
        Action::VMap {
            loads: vec![Load::Saddr],
            map: EGRESS_MAP.into(),
        },
    ));
    fwd.push(rule(
        vec![Match::OifPrefix(opts.pod_link_prefix.clone())],
        Action::VMap {
            loads: vec![Load::Daddr],
            map: INGRESS_MAP.into(),
        },
    ));
    // The base chain first: nft lists it first, and jumps refer to chains added later in
    // the same batch by name.
    t.chains.insert(
        0,
        Chain {
            name: FORWARD_CHAIN.into(),
            base: Some(FORWARD_PRIORITY),
            rules: fwd,
        },
    );
    t
}

// ---------------------------------------------------------------------------------------
// The kernel's reading of the table, for tests.

/// A packet at the forward hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    /// Destination port (TCP, UDP, SCTP).
    pub dport: u16,
    pub iif: String,
    pub oif: String,
    pub established: bool,
}

impl Table {
    fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }

    fn lookup(&self, name: &str, key: &[u32]) -> Option<&Element> {
        let set = self.set(name)?;
        set.elements.iter().find(|e| match &e.key_end {
            Some(end) => key
                .iter()
                .zip(e.key.iter().zip(end))
                .all(|(k, (lo, hi))| lo <= k && k <= hi),
            None => e.key == key,
        })
    }

    /// Whether the table lets `p` through (the verdict of the forward hook).
    pub fn judge(&self, p: &Packet) -> bool {
        let load = |l: Load| match l {
            Load::Saddr => u32::from(p.src),
            Load::Daddr => u32::from(p.dst),
            Load::L4proto => u32::from(p.proto),
            Load::Dport => u32::from(p.dport),
        };
        let has_ports = matches!(p.proto, 6 | 17 | 132);
        // (chain, next rule) frames pushed by jump.
        let mut stack: Vec<(String, usize)> = Vec::new();
        let mut chain = FORWARD_CHAIN.to_string();
        let mut i = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 10_000, "the table loops");
            let Some(c) = self.chain(&chain) else {
                panic!("no chain {chain}");
            };
            let Some(r) = c.rules.get(i) else {
                // The end of a chain: a base chain's policy (accept), or back to the caller.
                match stack.pop() {
                    Some((c, n)) => {
                        chain = c;
                        i = n;
                        continue;
                    }
                    None => return true,
                }
            };
            i += 1;
            let loads_ok =
                |loads: &[Load]| has_ports || !loads.iter().any(|l| matches!(l, Load::Dport));
            let matched = r.matches.iter().all(|m| match m {
                Match::Established => p.established,
                Match::DaddrIn(net) => net.contains(&p.dst),
                Match::IifPrefix(s) => p.iif.starts_with(s.as_str()),
                Match::OifPrefix(s) => p.oif.starts_with(s.as_str()),
                Match::InSet { loads, set } => {
                    loads_ok(loads) && {
                        let key: Vec<u32> = loads.iter().map(|l| load(*l)).collect();
                        self.lookup(set, &key).is_some()
                    }
                }
            });
            if !matched {
                continue;
            }
            let verdict = match &r.action {
                Action::Verdict(v) => v.clone(),
                Action::Deny { .. } => Verdict::Drop,
                Action::VMap { loads, map } => {
                    if !loads_ok(loads) {
                        continue;
                    }
                    let key: Vec<u32> = loads.iter().map(|l| load(*l)).collect();
                    match self.lookup(map, &key).and_then(|e| e.verdict.clone()) {
                        Some(v) => v,
                        None => continue,
                    }
                }
            };
            match verdict {
                Verdict::Accept => return true,
                Verdict::Drop => return false,
                Verdict::Return => match stack.pop() {
                    Some((c, n)) => {
                        chain = c;
                        i = n;
                    }
                    None => return true,
                },
                Verdict::Jump(to) => {
                    stack.push((chain.clone(), i));
                    chain = to;
                    i = 0;
                }
                Verdict::Goto(to) => {
                    chain = to;
                    i = 0;
                }
            }
        }
    }

    /// The number of set and map elements (what the kernel holds).
    pub fn elements(&self) -> usize {
        self.sets.iter().map(|s| s.elements.len()).sum()
    }
}

// ---------------------------------------------------------------------------------------
// nft's syntax, for people: `weft policy table` and the documentation.

fn field_type(f: Field) -> &'static str {
    match f {
        Field::Addr => "ipv4_addr",
        Field::Proto => "inet_proto",
        Field::Port => "inet_service",
    }
}

fn value(f: Field, v: u32) -> String {
    match f {
        Field::Addr => Ipv4Addr::from(v).to_string(),
        Field::Proto => Proto::from_number(v as u8)
            .map(|p| proto_name(p).to_string())
            .unwrap_or_else(|| v.to_string()),
        Field::Port => v.to_string(),
    }
}

fn load_name(l: Load) -> &'static str {
    match l {
        Load::Saddr => "ip saddr",
        Load::Daddr => "ip daddr",
        Load::L4proto => "meta l4proto",
        Load::Dport => "th dport",
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(c) => write!(f, "jump {c}"),
            Verdict::Goto(c) => write!(f, "goto {c}"),
        }
    }
}

fn loads(ls: &[Load]) -> String {
    ls.iter()
        .map(|l| load_name(*l))
        .collect::<Vec<_>>()
        .join(" . ")
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table ip {TABLE} {{")?;
        for s in &self.sets {
            let kind = if s.map { "map" } else { "set" };
            let ty = s
                .fields
                .iter()
                .map(|x| field_type(*x))
                .collect::<Vec<_>>()
                .join(" . ");
            writeln!(f, "\t{kind} {} {{", s.name)?;
            if s.map {
                writeln!(f, "\t\ttype {ty} : verdict")?;
            } else {
                writeln!(f, "\t\ttype {ty}")?;
            }
            if s.interval {
                writeln!(f, "\t\tflags interval")?;
            }
            if !s.elements.is_empty() {
                let els: Vec<String> = s
                    .elements
                    .iter()
                    .map(|e| {
                        let key = |k: &[u32]| {
                            s.fields
                                .iter()
                                .zip(k)
                                .map(|(fl, v)| value(*fl, *v))
                                .collect::<Vec<_>>()
                                .join(" . ")
                        };
                        let mut t = match &e.key_end {
                            Some(end) if *end != e.key => {
                                if s.fields == [Field::Addr] {
                                    range_text(e.key[0], end[0])
                                } else {
                                    format!("{}-{}", key(&e.key), key(end))
                                }
                            }
                            _ => key(&e.key),
                        };
                        if let Some(v) = &e.verdict {
                            t.push_str(&format!(" : {v}"));
                        }
                        t
                    })
                    .collect();
                writeln!(f, "\t\telements = {{ {} }}", els.join(", "))?;
            }
            writeln!(f, "\t}}")?;
        }
        for c in &self.chains {
            writeln!(f, "\n\tchain {} {{", c.name)?;
            if let Some(prio) = c.base {
                writeln!(
                    f,
                    "\t\ttype filter hook forward priority {prio}; policy accept;"
                )?;
            }
            for r in &c.rules {
                let mut words: Vec<String> = r
                    .matches
                    .iter()
                    .map(|m| match m {
                        Match::Established => "ct state established,related".to_string(),
                        Match::DaddrIn(n) => format!("ip daddr {n}"),
                        Match::IifPrefix(s) => format!("iifname \"{s}*\""),
                        Match::OifPrefix(s) => format!("oifname \"{s}*\""),
                        Match::InSet { loads: l, set } => format!("{} @{set}", loads(l)),
                    })
                    .collect();
                words.push(match &r.action {
                    Action::Verdict(v) => v.to_string(),
                    Action::VMap { loads: l, map } => format!("{} vmap @{map}", loads(l)),
                    Action::Deny { prefix } => {
                        format!("counter log prefix \"{prefix}\" group {NFLOG_GROUP} drop")
                    }
                });
                writeln!(f, "\t\t{}", words.join(" "))?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}

/// An address range as a prefix where it is one.
fn range_text(lo: u32, hi: u32) -> String {
    let size = u64::from(hi - lo) + 1;
    if size.is_power_of_two() && u64::from(lo) % size == 0 {
        let len = 32 - size.trailing_zeros();
        if len == 32 {
            return Ipv4Addr::from(lo).to_string();
        }
        return format!("{}/{len}", Ipv4Addr::from(lo));
    }
    format!("{}-{}", Ipv4Addr::from(lo), Ipv4Addr::from(hi))
}
