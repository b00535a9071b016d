//! The policy table (`ip weft_policy`, planned by `core::policy::ruleset`) written over
//! netlink in one nftables transaction: the table is created if absent, deleted and made
//! again with its chains, sets, elements and rules, so the kernel swaps the old ruleset
//! for the new one atomically — no packet sees a half-written table, and a restart of the
//! router leaves the last one in place until the next is ready. Nothing here decides.

use super::nft::{dump, message, transact, NftError, IFNAMSIZ, NETWORK_HEADER, NF_ACCEPT};
use crate::core::policy::ruleset::{
    Action, Chain, Element, Field, Load, Match, Rule, Set, Table, Verdict, FORWARD_CHAIN,
    NFLOG_GROUP, TABLE,
};
use netlink_packet_core::{DefaultNla, NetlinkMessage, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions,
    Hook, HookNumber, Immediate, InetHookNumber, ListAttribute, Lookup, Meta, MetaKey,
    NfTablesMessage, Operator, Payload, Register, RuleAttribute, RuleMessage, SetAttribute,
    SetElementAttribute, SetElementFlags, SetElementList, SetElementMessage, SetFlags, SetMessage,
    TableAttribute, TableMessage, VerdictAttribute,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterProtoFamily};

type Msg = (String, NetlinkMessage<NetfilterMessage>);
type Expr = ListAttribute<ExpressionAttribute>;

const NF_DROP: u32 = 0;
const TRANSPORT_HEADER: u32 = 2;
/// NFT_CT_STATE, and the established|related bits of its value.
const CT_STATE: u32 = 0;
const CT_ESTABLISHED_RELATED: u32 = 0x2 | 0x4;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_LOG_GROUP: u16 = 1;
const NFTA_LOG_PREFIX: u16 = 2;
/// nft's data type ids (for `nft list`): ipv4_addr, inet_proto, inet_service, verdict.
const TYPE_ADDR: u32 = 7;
const TYPE_PROTO: u32 = 12;
const TYPE_PORT: u32 = 13;
const TYPE_VERDICT: u32 = 0xffff_ff00;
/// NFTNL_UDATA_SET_KEYBYTEORDER: big endian (how `nft list` prints addresses and ports).
const UDATA_KEY_BYTEORDER: u8 = 0;
const BIG_ENDIAN: u32 = 2;
/// Elements per NEWSETELEM message: its attribute list must stay under 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 500;

fn ip() -> NetfilterProtoFamily {
    NetfilterProtoFamily::IPv4
}

fn field_len(f: Field) -> usize {
    match f {
        Field::Addr => 4,
        Field::Proto => 1,
        Field::Port => 2,
    }
}

fn field_type(f: Field) -> u32 {
    match f {
        Field::Addr => TYPE_ADDR,
        Field::Proto => TYPE_PROTO,
        Field::Port => TYPE_PORT,
    }
}

/// A value of field `f` as the kernel stores it (network order).
fn field_bytes(f: Field, v: u32) -> Vec<u8> {
    match f {
        Field::Addr => v.to_be_bytes().to_vec(),
        Field::Proto => vec![v as u8],
        Field::Port => (v as u16).to_be_bytes().to_vec(),
    }
}

/// A key: one field as it is, a concatenation with each field padded to 4 bytes.
fn key_bytes(fields: &[Field], key: &[u32]) -> Vec<u8> {
    if fields.len() == 1 {
        return field_bytes(fields[0], key[0]);
    }
    let mut out = Vec::new();
    for (f, v) in fields.iter().zip(key) {
        let mut b = field_bytes(*f, *v);
        b.resize(4, 0);
        out.extend(b);
    }
    out
}

fn key_len(fields: &[Field]) -> u32 {
    if fields.len() == 1 {
        field_len(fields[0]) as u32
    } else {
        4 * fields.len() as u32
    }
}

fn key_type(fields: &[Field]) -> u32 {
    // nft's concatenated type: each type shifted in 6 bits at a time.
    fields.iter().fold(0, |acc, f| (acc << 6) | field_type(*f))
}

fn verdict_data(v: &Verdict) -> DataAttribute {
    let attrs = match v {
        Verdict::Accept => vec![VerdictAttribute::Code(
            netlink_packet_netfilter::nftables::Verdict::Other(NF_ACCEPT),
        )],
        Verdict::Drop => vec![VerdictAttribute::Code(
            netlink_packet_netfilter::nftables::Verdict::Other(NF_DROP),
        )],
        Verdict::Return => vec![VerdictAttribute::Code(
            netlink_packet_netfilter::nftables::Verdict::Return,
        )],
        Verdict::Jump(c) => vec![
            VerdictAttribute::Code(netlink_packet_netfilter::nftables::Verdict::Jump),
            VerdictAttribute::Chain(c.clone()),
        ],
        Verdict::Goto(c) => vec![
            VerdictAttribute::Code(netlink_packet_netfilter::nftables::Verdict::Goto),
            VerdictAttribute::Chain(c.clone()),
        ],
    };
    DataAttribute::Verdict(attrs)
}

fn load(l: Load, reg: Register) -> Expr {
    match l {
        Load::Saddr | Load::Daddr => Expressions::Payload(vec![
            Payload::DestinationRegister(reg),
            Payload::Base(NETWORK_HEADER),
            Payload::Offset(if l == Load::Saddr { 12 } else { 16 }),
            Payload::Len(4),
        ])
        .into(),
        Load::Dport => Expressions::Payload(vec![
            Payload::DestinationRegister(reg),
            Payload::Base(TRANSPORT_HEADER),
            Payload::Offset(2),
            Payload::Len(2),
        ])
        .into(),
        Load::L4proto => Expressions::Meta(vec![
            Meta::DestinationRegister(reg),
            Meta::Key(MetaKey::L4Proto),
        ])
        .into(),
    }
}

/// The loads of a lookup key into registers, and the register the lookup reads.
fn loads(ls: &[Load]) -> (Vec<Expr>, Register) {
    if ls.len() == 1 {
        return (vec![load(ls[0], Register::Reg1)], Register::Reg1);
    }
    let regs = [
        Register::Reg32_00,
        Register::Reg32_01,
        Register::Reg32_02,
        Register::Reg32_03,
    ];
    (
        ls.iter().zip(regs).map(|(l, r)| load(*l, r)).collect(),
        Register::Reg32_00,
    )
}

fn link_prefix(key: MetaKey, prefix: &str) -> Vec<Expr> {
    let data = prefix.as_bytes()[..prefix.len().min(IFNAMSIZ - 1)].to_vec();
    vec![
        Expressions::Meta(vec![
            Meta::DestinationRegister(Register::Reg1),
            Meta::Key(key),
        ])
        .into(),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(Register::Reg1),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(data)),
        ])
        .into(),
    ]
}

fn u32_attr(kind: u16, v: u32) -> DefaultNla {
    DefaultNla::new(kind, v.to_be_bytes().to_vec())
}

fn match_exprs(m: &Match) -> Vec<Expr> {
    match m {
        Match::Established => vec![
            Expressions::Other {
                expression_type: "ct".into(),
                attributes: vec![u32_attr(NFTA_CT_DREG, 1), u32_attr(NFTA_CT_KEY, CT_STATE)],
            }
            .into(),
            // The state is a host-order bit mask.
            Expressions::Bitwise(vec![
                Bitwise::SourceRegister(Register::Reg1),
                Bitwise::DestinationRegister(Register::Reg1),
                Bitwise::Length(4),
                Bitwise::Mask(DataAttribute::Value(
                    CT_ESTABLISHED_RELATED.to_ne_bytes().to_vec(),
                )),
                Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
            ])
            .into(),
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(Operator::NotEqual),
                Cmp::Data(DataAttribute::Value(vec![0; 4])),
            ])
            .into(),
        ],
        Match::DaddrIn(net) => vec![
            load(Load::Daddr, Register::Reg1),
            Expressions::Bitwise(vec![
                Bitwise::SourceRegister(Register::Reg1),
                Bitwise::DestinationRegister(Register::Reg1),
                Bitwise::Length(4),
                Bitwise::Mask(DataAttribute::Value(net.netmask().octets().to_vec())),
                Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
            ])
            .into(),
            Expressions::Cmp(vec![
                Cmp::SourceRegister(Register::Reg1),
                Cmp::Op(Operator::Equal),
                Cmp::Data(DataAttribute::Value(net.network().octets().to_vec())),
            ])
            .into(),
        ],
        Match::IifPrefix(p) => link_prefix(MetaKey::Iifname, p),
        Match::OifPrefix(p) => link_prefix(MetaKey::Oifname, p),
        Match::InSet { loads: ls, set } => {
            let (mut e, reg) = loads(ls);
            e.push(
                Expressions::Lookup(vec![Lookup::Set(set.clone()), Lookup::SourceRegister(reg)])
                    .into(),
            );
            e
        }
    }
}

fn immediate(v: &Verdict) -> Expr {
    Expressions::Immediate(vec![
        Immediate::DestinationRegister(Register::Verdict),
        Immediate::Data(verdict_data(v)),
    ])
    .into()
}

fn rule_exprs(r: &Rule) -> Vec<Expr> {
    let mut e: Vec<Expr> = r.matches.iter().flat_map(match_exprs).collect();
    match &r.action {
        Action::Verdict(v) => e.push(immediate(v)),
        Action::VMap { loads: ls, map } => {
            let (l, reg) = loads(ls);
            e.extend(l);
            e.push(
                Expressions::Lookup(vec![
                    Lookup::Set(map.clone()),
                    Lookup::SourceRegister(reg),
                    Lookup::DestinationRegister(Register::Verdict),
                ])
                .into(),
            );
        }
        Action::Deny { prefix } => {
            e.push(
                Expressions::Other {
                    expression_type: "counter".into(),
                    attributes: Vec::new(),
                }
                .into(),
            );
            let mut p = prefix.as_bytes().to_vec();
            p.push(0);
            e.push(
                Expressions::Other {
                    expression_type: "log".into(),
                    attributes: vec![
                        DefaultNla::new(NFTA_LOG_GROUP, NFLOG_GROUP.to_be_bytes().to_vec()),
                        DefaultNla::new(NFTA_LOG_PREFIX, p),
                    ],
                }
                .into(),
            );
            e.push(immediate(&Verdict::Drop));
        }
    }
    e
}

fn chain_msg(c: &Chain) -> Msg {
    let mut attributes = vec![
        ChainAttribute::Table(TABLE.into()),
        ChainAttribute::Name(c.name.clone()),
    ];
    if let Some(prio) = c.base {
        attributes.push(ChainAttribute::Hook(vec![
            Hook::Number(HookNumber::Inet(InetHookNumber::Forward)),
            Hook::Priority(prio as u32),
        ]));
        attributes.push(ChainAttribute::Policy(NF_ACCEPT));
        attributes.push(ChainAttribute::Type("filter".into()));
    }
    (
        format!("create chain {}", c.name),
        message(
            ip(),
            NfTablesMessage::NewChain(ChainMessage { attributes }),
            NLM_F_CREATE | NLM_F_ACK,
        ),
    )
}

fn set_msg(s: &Set, id: u32) -> Msg {
    let mut flags = SetFlags::empty();
    if s.interval {
        flags |= SetFlags::Interval;
    }
    if s.map {
        flags |= SetFlags::Map;
    }
    let mut attributes = vec![
        SetAttribute::Table(TABLE.into()),
        SetAttribute::Name(s.name.clone()),
        SetAttribute::Flags(flags),
        SetAttribute::KeyType(key_type(&s.fields)),
        SetAttribute::KeyLen(key_len(&s.fields)),
        SetAttribute::Id(id),
    ];
    if s.map {
        attributes.push(SetAttribute::DataType(TYPE_VERDICT));
        attributes.push(SetAttribute::DataLen(0));
    }
    if s.fields.len() == 1 && s.fields[0] != Field::Proto {
        let mut ud = vec![UDATA_KEY_BYTEORDER, 4];
        ud.extend(BIG_ENDIAN.to_le_bytes());
        attributes.push(SetAttribute::UserData(ud));
    }
    (
        format!("create set {}", s.name),
        message(
            ip(),
            NfTablesMessage::NewSet(SetMessage { attributes }),
            NLM_F_CREATE | NLM_F_ACK,
        ),
    )
}

/// A set's elements as the kernel takes them: for an interval set, each range as a start
/// element (carrying the verdict, in a map) and an end element one past it, flagged —
/// unless the next range starts there — with an end at 0 first when nothing starts there.
fn kernel_elements(s: &Set) -> Vec<Vec<SetElementAttribute>> {
    let mut out = Vec::new();
    if !s.interval {
        for e in &s.elements {
            let mut attrs = vec![SetElementAttribute::Key(DataAttribute::Value(key_bytes(
                &s.fields, &e.key,
            )))];
            if let Some(v) = &e.verdict {
                attrs.push(SetElementAttribute::Data(verdict_data(v)));
            }
            out.push(attrs);
        }
        return out;
    }
    let f = s.fields[0];
    let max = match f {
        Field::Addr => u64::from(u32::MAX),
        Field::Port => u64::from(u16::MAX),
        Field::Proto => u64::from(u8::MAX),
    };
    let mut sorted: Vec<&Element> = s.elements.iter().collect();
    sorted.sort_by_key(|e| e.key[0]);
    let end = |v: u64| {
        vec![
            SetElementAttribute::Key(DataAttribute::Value(field_bytes(f, v as u32))),
            SetElementAttribute::Flags(SetElementFlags::IntervalEnd),
        ]
    };
    if sorted.first().is_some_and(|e| e.key[0] > 0) {
        out.push(end(0));
    }
    for (i, e) in sorted.iter().enumerate() {
        let lo = e.key[0];
        let hi = e.key_end.as_ref().map(|k| k[0]).unwrap_or(lo);
        let mut start = vec![SetElementAttribute::Key(DataAttribute::Value(field_bytes(
            f, lo,
        )))];
        if let Some(v) = &e.verdict {
            start.push(SetElementAttribute::Data(verdict_data(v)));
        }
        out.push(start);
        let next = u64::from(hi) + 1;
        let touches_next = sorted
            .get(i + 1)
            .is_some_and(|n| u64::from(n.key[0]) == next);
        if next <= max && !touches_next {
            out.push(end(next));
        }
    }
    out
}

fn element_msgs(s: &Set, id: u32) -> Vec<Msg> {
    kernel_elements(s)
        .chunks(ELEMENTS_PER_MESSAGE)
        .map(|chunk| {
            (
                format!("add elements to {}", s.name),
                message(
                    ip(),
                    NfTablesMessage::NewSetElement(SetElementMessage {
                        attributes: vec![
                            SetElementList::Table(TABLE.into()),
                            SetElementList::Set(s.name.clone()),
                            SetElementList::SetId(id),
                            SetElementList::Elements(
                                chunk.iter().cloned().map(ListAttribute::Element).collect(),
                            ),
                        ],
                    }),
                    NLM_F_CREATE | NLM_F_ACK,
                ),
            )
        })
        .collect()
}

fn rule_msg(chain: &str, r: &Rule) -> Msg {
    (
        format!("add rule to {chain}"),
        message(
            ip(),
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(TABLE.into()),
                    RuleAttribute::Chain(chain.into()),
                    RuleAttribute::Expressions(rule_exprs(r)),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
        ),
    )
}

fn table_msg(kind: fn(TableMessage) -> NfTablesMessage, tag: Option<&str>) -> NfTablesMessage {
    let mut attributes = vec![TableAttribute::Name(TABLE.to_string())];
    if let Some(t) = tag {
        attributes.push(TableAttribute::UserData(t.as_bytes().to_vec()));
    }
    kind(TableMessage { attributes })
}

/// The batch that replaces the policy table with `t`, tagged `tag` (what [`installed`]
/// reads back), or removes it (`None`).
fn replace_batch(t: Option<(&Table, &str)>) -> Vec<Msg> {
    let mut msgs = vec![
        (
            "create table".to_string(),
            message(
                ip(),
                table_msg(NfTablesMessage::NewTable, None),
                NLM_F_CREATE | NLM_F_ACK,
            ),
        ),
        (
            "delete table".to_string(),
            message(
                ip(),
                table_msg(NfTablesMessage::DeleteTable, None),
                NLM_F_ACK,
            ),
        ),
    ];
    let Some((t, tag)) = t else { return msgs };
    msgs.push((
        "create table".into(),
        message(
            ip(),
            table_msg(NfTablesMessage::NewTable, Some(tag)),
            NLM_F_CREATE | NLM_F_ACK,
        ),
    ));
    // Chains first (map elements name them), then sets and their elements, then rules.
    for c in &t.chains {
        msgs.push(chain_msg(c));
    }
    for (i, s) in t.sets.iter().enumerate() {
        msgs.push(set_msg(s, i as u32 + 1));
        msgs.extend(element_msgs(s, i as u32 + 1));
    }
    for c in &t.chains {
        for r in &c.rules {
            msgs.push(rule_msg(&c.name, r));
        }
    }
    msgs
}

/// Puts `t` in place of the policy table, atomically, tagged `tag`.
pub fn install(t: &Table, tag: &str) -> Result<(), NftError> {
    transact(replace_batch(Some((t, tag))))
}

/// Removes the policy table (nothing if it is not there).
pub fn remove() -> Result<(), NftError> {
    transact(replace_batch(None))
}

/// What the kernel has of the policy table: its tag and the number of rules in its
/// forward chain, or `None` when the table is gone (someone flushed the ruleset).
pub fn installed() -> Result<Option<(String, usize)>, NftError> {
    let tables = dump(NfTablesMessage::GetTable(TableMessage {
        attributes: Vec::new(),
    }))?;
    let mut tag = None;
    for m in tables {
        if let NfTablesMessage::NewTable(t) = m {
            let named = t
                .attributes
                .iter()
                .any(|a| matches!(a, TableAttribute::Name(n) if n == TABLE));
            if named {
                tag = Some(
                    t.attributes
                        .iter()
                        .find_map(|a| match a {
                            TableAttribute::UserData(u) => {
                                Some(String::from_utf8_lossy(u).into_owned())
                            }
                            _ => None,
                        })
                        .unwrap_or_default(),
                );
            }
        }
    }
    let Some(tag) = tag else { return Ok(None) };
    let rules = dump(NfTablesMessage::GetRule(RuleMessage {
        attributes: vec![
            RuleAttribute::Table(TABLE.into()),
            RuleAttribute::Chain(FORWARD_CHAIN.into()),
        ],
    }))?;
    let n = rules
        .iter()
        .filter(|m| {
            matches!(m, NfTablesMessage::NewRule(r) if r.attributes.iter().any(
                |a| matches!(a, RuleAttribute::Chain(c) if c == FORWARD_CHAIN)
            ) && r.attributes.iter().any(|a| matches!(a, RuleAttribute::Table(t) if t == TABLE)))
        })
        .count();
    Ok(Some((tag, n)))
}
