//! What Weave Net's router and weave-npc leave in a node's firewall, removed at take-over:
//! on a node that ran Weave with weave-npc (its default), FORWARD sends every packet into
//! or out of the `weave` interface through `WEAVE-NPC*` chains and ends in `-o weave -j
//! DROP`. weft's overlay interface has the same name, so those rules would drop weft's
//! traffic (and enforce stale ipsets) after the switch. Over netlink only: the rules as
//! iptables-nft stores them in nftables' `ip filter` table, and the `weave-*` ipsets.
//!
//! Rules iptables-legacy holds are out of nftables' reach; when Weave's ipsets are still
//! referenced afterwards, the router says so (see the README's migration notes).

use super::nft::{dump, message, transact, NftError};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, DataAttribute, ExpressionAttribute, Expressions, Immediate,
    ListAttribute, Meta, MetaKey, NfTablesMessage, RuleAttribute, RuleMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::NetfilterProtoFamily;
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

const FILTER: &str = "filter";
const NFNL_SUBSYS_IPSET: u16 = 6;
const IPSET_CMD_DESTROY: u16 = 3;
const IPSET_CMD_LIST: u16 = 7;
const IPSET_ATTR_PROTOCOL: u16 = 1;
const IPSET_ATTR_SETNAME: u16 = 2;
const IPSET_PROTOCOL: u8 = 7;

/// What was removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub rules: usize,
    pub chains: Vec<String>,
    pub ipsets: Vec<String>,
    /// Weave ipsets that could not go: still referenced, by iptables-legacy rules.
    pub still_referenced: Vec<String>,
}

impl Removed {
    pub fn is_empty(&self) -> bool {
        self.rules == 0 && self.chains.is_empty() && self.ipsets.is_empty()
    }
}

fn weave_chain(name: &str) -> bool {
    name.starts_with("WEAVE-NPC") || name == "WEAVE-EXPOSE"
}

/// Whether a rule of a chain that is not Weave's is Weave's: it jumps to one of Weave's
/// chains, or matches Weave's interface by name.
fn is_weaves(exprs: &[ListAttribute<ExpressionAttribute>]) -> bool {
    let mut names_iface = false;
    for e in exprs {
        let ListAttribute::Element(attrs) = e else {
            continue;
        };
        for a in attrs {
            match a {
                ExpressionAttribute::Data(Expressions::Meta(m))
                    if m.iter().any(|x| {
                        matches!(x, Meta::Key(MetaKey::Iifname) | Meta::Key(MetaKey::Oifname))
                    }) =>
                {
                    names_iface = true;
                }
                ExpressionAttribute::Data(Expressions::Cmp(c)) if names_iface => {
                    let weave = c.iter().any(|x| match x {
                        netlink_packet_netfilter::nftables::Cmp::Data(DataAttribute::Value(v)) => {
                            v.starts_with(b"weave") && v.get(5).is_none_or(|b| *b == 0)
                        }
                        _ => false,
                    });
                    if weave {
                        return true;
                    }
                    names_iface = false;
                }
                ExpressionAttribute::Data(Expressions::Immediate(i)) => {
                    for x in i {
                        if let Immediate::Data(DataAttribute::Verdict(v)) = x {
                            let jumps = v.iter().any(|y| {
                                matches!(y, VerdictAttribute::Code(Verdict::Jump | Verdict::Goto))
                            });
                            let to_weave = v
                                .iter()
                                .any(|y| matches!(y, VerdictAttribute::Chain(c) if weave_chain(c)));
                            if jumps && to_weave {
                                return true;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    false
}

/// A dump of `ip filter`'s objects; none when the table does not exist (no iptables-nft).
fn dump_filter(request: NfTablesMessage) -> Result<Vec<NfTablesMessage>, NftError> {
    match dump(request) {
        Err(NftError::Refused { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(Vec::new())
        }
        other => other,
    }
}

/// Removes Weave's rules and chains from iptables-nft's `ip filter` table, then the
/// `weave-*` ipsets that are no longer referenced.
pub fn remove_leftovers() -> Result<Removed, NftError> {
    let mut removed = Removed::default();
    let chains: Vec<String> = dump_filter(NfTablesMessage::GetChain(ChainMessage {
        attributes: vec![ChainAttribute::Table(FILTER.into())],
    }))?
    .into_iter()
    .filter_map(|m| match m {
        NfTablesMessage::NewChain(c) => c.attributes.iter().find_map(|a| match a {
            ChainAttribute::Name(n) if weave_chain(n) => Some(n.clone()),
            _ => None,
        }),
        _ => None,
    })
    .collect();
    let mut msgs = Vec::new();
    {
        let rules = dump_filter(NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(FILTER.into())],
        }))?;
        for m in rules {
            let NfTablesMessage::NewRule(r) = m else {
                continue;
            };
            let mut chain = None;
            let mut handle = None;
            let mut table = None;
            let mut exprs: &[ListAttribute<ExpressionAttribute>] = &[];
            for a in &r.attributes {
                match a {
                    RuleAttribute::Chain(c) => chain = Some(c.clone()),
                    RuleAttribute::Handle(h) => handle = Some(*h),
                    RuleAttribute::Table(t) => table = Some(t.clone()),
                    RuleAttribute::Expressions(e) => exprs = e,
                    _ => {}
                }
            }
            let (Some(chain), Some(handle)) = (chain, handle) else {
                continue;
            };
            if table.as_deref() != Some(FILTER) || weave_chain(&chain) || !is_weaves(exprs) {
                continue;
            }
            removed.rules += 1;
            msgs.push((
                format!("delete Weave's rule {handle} in {chain}"),
                message(
                    NetfilterProtoFamily::IPv4,
                    NfTablesMessage::DeleteRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(FILTER.into()),
                            RuleAttribute::Chain(chain),
                            RuleAttribute::Handle(handle),
                        ],
                    }),
                    NLM_F_ACK,
                ),
            ));
        }
    }
    for c in &chains {
        msgs.push((
            format!("flush chain {c}"),
            message(
                NetfilterProtoFamily::IPv4,
                NfTablesMessage::DeleteRule(RuleMessage {
                    attributes: vec![
                        RuleAttribute::Table(FILTER.into()),
                        RuleAttribute::Chain(c.clone()),
                    ],
                }),
                NLM_F_ACK,
            ),
        ));
    }
    for c in &chains {
        msgs.push((
            format!("delete chain {c}"),
            message(
                NetfilterProtoFamily::IPv4,
                NfTablesMessage::DeleteChain(ChainMessage {
                    attributes: vec![
                        ChainAttribute::Table(FILTER.into()),
                        ChainAttribute::Name(c.clone()),
                    ],
                }),
                NLM_F_ACK,
            ),
        ));
    }
    if !msgs.is_empty() {
        transact(msgs)?;
    }
    removed.chains = chains;
    for set in list_ipsets()?
        .into_iter()
        .filter(|s| s.starts_with("weave-"))
    {
        match destroy_ipset(&set) {
            Ok(()) => removed.ipsets.push(set),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => removed.still_referenced.push(set),
            Err(e) => {
                return Err(NftError::Refused {
                    what: format!("destroy ipset {set}"),
                    source: e,
                })
            }
        }
    }
    Ok(removed)
}

/// An ipset request: the netlink and nfnetlink headers, and attributes.
fn ipset_request(cmd: u16, flags: u16, setname: Option<&str>) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut put = |kind: u16, value: &[u8]| {
        let len = 4 + value.len();
        attrs.extend((len as u16).to_ne_bytes());
        attrs.extend(kind.to_ne_bytes());
        attrs.extend(value);
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
    };
    put(IPSET_ATTR_PROTOCOL, &[IPSET_PROTOCOL]);
    if let Some(name) = setname {
        let mut v = name.as_bytes().to_vec();
        v.push(0);
        put(IPSET_ATTR_SETNAME, &v);
    }
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend((len as u32).to_ne_bytes());
    m.extend(((NFNL_SUBSYS_IPSET << 8) | cmd).to_ne_bytes());
    m.extend((NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend(1u32.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    // nfgenmsg: family AF_INET, version 0, resource id 0.
    m.extend([libc::AF_INET as u8, 0, 0, 0]);
    m.extend(attrs);
    m
}

/// The names of the ipsets in this network namespace (none where the module is absent).
fn list_ipsets() -> Result<Vec<String>, NftError> {
    let socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    socket
        .send(&ipset_request(IPSET_CMD_LIST, NLM_F_DUMP, None), 0)
        .map_err(NftError::Socket)?;
    let mut names = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0).map_err(NftError::Socket)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes(rx[off..off + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
            if len < 16 || off + len > n {
                return Ok(names);
            }
            match kind {
                // NLMSG_DONE, or NLMSG_ERROR (no ip_set support: nothing to remove).
                3 | 2 => return Ok(names),
                _ => {
                    let mut a = off + 20;
                    while a + 4 <= off + len {
                        let alen = u16::from_ne_bytes([rx[a], rx[a + 1]]) as usize;
                        let akind = u16::from_ne_bytes([rx[a + 2], rx[a + 3]]) & 0x3fff;
                        if alen < 4 || a + alen > off + len {
                            break;
                        }
                        if akind == IPSET_ATTR_SETNAME {
                            let v = &rx[a + 4..a + alen];
                            let name =
                                String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v));
                            if !names.contains(&name.to_string()) {
                                names.push(name.into_owned());
                            }
                        }
                        a += (alen + 3) & !3;
                    }
                }
            }
            off += (len + 3) & !3;
        }
    }
}

fn destroy_ipset(name: &str) -> std::io::Result<()> {
    let socket = Socket::new(NETLINK_NETFILTER)?;
    socket.send(&ipset_request(IPSET_CMD_DESTROY, NLM_F_ACK, Some(name)), 0)?;
    let mut rx = vec![0u8; 4096];
    let n = socket.recv(&mut &mut rx[..], 0)?;
    if n >= 20 && u16::from_ne_bytes([rx[4], rx[5]]) == 2 {
        let code = i32::from_ne_bytes(rx[16..20].try_into().expect("4 bytes"));
        if code != 0 {
            return Err(std::io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}
