//! weft's nftables table, written over netlink (NETLINK_NETFILTER) with
//! `netlink-packet-netfilter` and `netlink-sys`: no `nft` or `iptables` process.
//!
//! The whole table is replaced in one nftables transaction (a netlink batch): create it if
//! absent, delete it, create it again with its chain and rules. The kernel applies the
//! batch atomically, so a restart never leaves two copies, nor a moment without rules.
//! Other tables (kube-proxy's iptables-nft `ip nat`, iptables-legacy's) are untouched.

use crate::core::nat::{self, Action, Cond, Field, NatRule};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_netfilter::nftables::{
    Bitwise, ChainAttribute, ChainMessage, Cmp, DataAttribute, Expressions, Hook, HookNumber,
    Immediate, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator, Payload,
    Register, RuleAttribute, RuleMessage, TableAttribute, TableMessage, Verdict, VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot open a netfilter netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("nftables refused the change ({what}): {source}")]
    Refused {
        what: String,
        source: std::io::Error,
    },
    #[error("nftables did not answer as expected: {0}")]
    Protocol(String),
}

const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NF_ACCEPT: u32 = 1;
/// NFT_PAYLOAD_NETWORK_HEADER
pub(crate) const NETWORK_HEADER: u32 = 1;
pub(crate) const IFNAMSIZ: usize = 16;
/// NFTNL_UDATA_RULE_COMMENT, as nft stores a rule's comment in its user data.
const UDATA_RULE_COMMENT: u8 = 0;

pub(crate) fn message(
    family: NetfilterProtoFamily,
    inner: impl Into<NetfilterMessageInner>,
    flags: u16,
) -> NetlinkMessage<NetfilterMessage> {
    let res_id = 0;
    let mut m = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, res_id),
            inner,
        )),
    );
    m.header.flags = NLM_F_REQUEST | flags;
    m
}

pub(crate) fn batch_control(control: ControlMessage) -> NetlinkMessage<NetfilterMessage> {
    let mut m = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
            control,
        )),
    );
    m.header.flags = NLM_F_REQUEST;
    m
}

fn table_msg(kind: fn(TableMessage) -> NfTablesMessage) -> NfTablesMessage {
    kind(TableMessage {
        attributes: vec![TableAttribute::Name(nat::TABLE.to_string())],
    })
}

/// Loads the IPv4 source or destination into register 1.
fn load_addr(
    field: Field,
) -> ListAttribute<netlink_packet_netfilter::nftables::ExpressionAttribute> {
    let offset = match field {
        Field::Saddr => 12,
        Field::Daddr => 16,
    };
    Expressions::Payload(vec![
        Payload::DestinationRegister(Register::Reg1),
        Payload::Base(NETWORK_HEADER),
        Payload::Offset(offset),
        Payload::Len(4),
    ])
    .into()
}

fn cond_exprs(
    c: &Cond,
) -> Vec<ListAttribute<netlink_packet_netfilter::nftables::ExpressionAttribute>> {
    match c {
        Cond::Net { field, net, negate } => {
            let mask = net.netmask().octets().to_vec();
            vec![
                load_addr(*field),
                Expressions::Bitwise(vec![
                    Bitwise::SourceRegister(Register::Reg1),
                    Bitwise::DestinationRegister(Register::Reg1),
                    Bitwise::Length(4),
                    Bitwise::Mask(DataAttribute::Value(mask)),
                    Bitwise::Xor(DataAttribute::Value(vec![0; 4])),
                ])
                .into(),
                Expressions::Cmp(vec![
                    Cmp::SourceRegister(Register::Reg1),
                    Cmp::Op(if *negate {
                        Operator::NotEqual
                    } else {
                        Operator::Equal
                    }),
                    Cmp::Data(DataAttribute::Value(net.network().octets().to_vec())),
                ])
                .into(),
            ]
        }
        Cond::OutLink { name, prefix } => {
            // An exact name is compared with its NUL padding, a prefix without (as nft
            // compiles `oifname "veth*"`).
            let mut data = name.as_bytes().to_vec();
            if !*prefix {
                data.resize(IFNAMSIZ, 0);
            }
            vec![
                Expressions::Meta(vec![
                    Meta::DestinationRegister(Register::Reg1),
                    Meta::Key(MetaKey::Oifname),
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
    }
}

fn rule_exprs(
    r: &NatRule,
) -> Vec<ListAttribute<netlink_packet_netfilter::nftables::ExpressionAttribute>> {
    let mut e: Vec<_> = r.conds.iter().flat_map(cond_exprs).collect();
    e.push(
        Expressions::Other {
            expression_type: "counter".into(),
            attributes: Vec::new(),
        }
        .into(),
    );
    e.push(match r.action {
        Action::Return => Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                Verdict::Return,
            )])),
        ])
        .into(),
        Action::Masquerade => Expressions::Other {
            expression_type: "masq".into(),
            attributes: Vec::new(),
        }
        .into(),
    });
    e
}

fn comment(text: &str) -> Vec<u8> {
    let mut v = vec![UDATA_RULE_COMMENT];
    let bytes = &text.as_bytes()[..text.len().min(250)];
    v.push(bytes.len() as u8 + 1);
    v.extend_from_slice(bytes);
    v.push(0);
    v
}

/// The batch that replaces weft's table with one holding `rules` (None: removes it).
fn replace_batch(rules: Option<&[NatRule]>) -> Vec<(String, NetlinkMessage<NetfilterMessage>)> {
    let ip = NetfilterProtoFamily::IPv4;
    let mut msgs = vec![
        (
            "create table".to_string(),
            message(
                ip,
                table_msg(NfTablesMessage::NewTable),
                NLM_F_CREATE | NLM_F_ACK,
            ),
        ),
        (
            "delete table".to_string(),
            message(ip, table_msg(NfTablesMessage::DeleteTable), NLM_F_ACK),
        ),
    ];
    if let Some(rules) = rules {
        msgs.push((
            "create table".into(),
            message(
                ip,
                table_msg(NfTablesMessage::NewTable),
                NLM_F_CREATE | NLM_F_ACK,
            ),
        ));
        msgs.push((
            "create chain".into(),
            message(
                ip,
                NfTablesMessage::NewChain(ChainMessage {
                    attributes: vec![
                        ChainAttribute::Table(nat::TABLE.into()),
                        ChainAttribute::Name(nat::POSTROUTING_CHAIN.into()),
                        ChainAttribute::Hook(vec![
                            Hook::Number(HookNumber::Inet(InetHookNumber::PostRouting)),
                            Hook::Priority(nat::POSTROUTING_PRIORITY as u32),
                        ]),
                        ChainAttribute::Policy(NF_ACCEPT),
                        ChainAttribute::Type("nat".into()),
                    ],
                }),
                NLM_F_CREATE | NLM_F_ACK,
            ),
        ));
        for r in rules {
            msgs.push((
                format!("add rule `{r}`"),
                message(
                    ip,
                    NfTablesMessage::NewRule(RuleMessage {
                        attributes: vec![
                            RuleAttribute::Table(nat::TABLE.into()),
                            RuleAttribute::Chain(nat::POSTROUTING_CHAIN.into()),
                            RuleAttribute::Expressions(rule_exprs(r)),
                            RuleAttribute::UserData(comment(r.why)),
                        ],
                    }),
                    NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                ),
            ));
        }
    }
    msgs
}

/// Sends one transaction and waits for the kernel's answer to each of its messages.
pub(crate) fn transact(
    msgs: Vec<(String, NetlinkMessage<NetfilterMessage>)>,
) -> Result<(), NftError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    socket.bind_auto().map_err(NftError::Socket)?;
    let mut all = Vec::with_capacity(msgs.len() + 2);
    all.push((String::new(), batch_control(ControlMessage::BatchBegin)));
    all.extend(msgs);
    all.push((String::new(), batch_control(ControlMessage::BatchEnd)));
    let mut buf = Vec::new();
    let mut expecting = std::collections::BTreeMap::new();
    for (seq, (what, m)) in all.iter_mut().enumerate() {
        m.header.sequence_number = seq as u32 + 1;
        m.finalize();
        let start = buf.len();
        buf.resize(start + m.buffer_len(), 0);
        m.serialize(&mut buf[start..]);
        if m.header.flags & NLM_F_ACK != 0 {
            expecting.insert(m.header.sequence_number, what.clone());
        }
    }
    // A policy table with thousands of elements is a batch of megabytes, answered by an
    // acknowledgement per message: the default socket buffers hold neither (root may
    // force larger ones, as nft does).
    size_buffers(&socket, buf.len() * 2, expecting.len() * 128);
    socket.send(&buf, 0).map_err(NftError::Socket)?;
    if expecting.is_empty() {
        return Ok(());
    }
    replies(&socket, |m| {
        let seq = m.header.sequence_number;
        if let NetlinkPayload::Error(e) = m.payload {
            let what = expecting
                .remove(&seq)
                .unwrap_or_else(|| format!("message {seq}"));
            if let Some(code) = e.code {
                return Err(NftError::Refused {
                    what,
                    source: std::io::Error::from_raw_os_error(-code.get()),
                });
            }
        }
        Ok(!expecting.is_empty())
    })
}

/// Reads the kernel's answers, one message at a time, until `f` says it has all it waits
/// for (`Ok(false)`), fails, or the kernel sends nothing more.
fn replies(
    socket: &Socket,
    mut f: impl FnMut(NetlinkMessage<NetfilterMessage>) -> Result<bool, NftError>,
) -> Result<(), NftError> {
    let mut rx = Vec::with_capacity(1 << 16);
    loop {
        rx.clear();
        let n = socket.recv(&mut rx, 0).map_err(NftError::Socket)?;
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[off..n])
                .map_err(|e| NftError::Protocol(e.to_string()))?;
            let len = m.header.length as usize;
            if len == 0 {
                return Ok(());
            }
            off += (len + 3) & !3;
            if !f(m)? {
                return Ok(());
            }
        }
    }
}

fn size_buffers(socket: &Socket, send: usize, recv: usize) {
    use std::os::fd::AsRawFd;
    let set = |opt: libc::c_int, size: usize| {
        let size = size.clamp(1 << 18, 1 << 28) as libc::c_int;
        // SAFETY: a valid socket and a pointer to a live c_int of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    set(libc::SO_SNDBUFFORCE, send);
    set(libc::SO_RCVBUFFORCE, recv);
}

/// Puts weft's table in place with `rules`, replacing whatever version of it was there.
pub fn install(rules: &[NatRule]) -> Result<(), NftError> {
    transact(replace_batch(Some(rules)))
}

/// Removes weft's table (nothing if it is not there).
pub fn remove() -> Result<(), NftError> {
    transact(replace_batch(None))
}

/// A GET dump of the IPv4 family's objects of one kind.
pub(crate) fn dump(request: NfTablesMessage) -> Result<Vec<NfTablesMessage>, NftError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NftError::Socket)?;
    socket.bind_auto().map_err(NftError::Socket)?;
    let mut m = message(NetfilterProtoFamily::IPv4, request, NLM_F_DUMP);
    m.header.flags |= NLM_F_REQUEST;
    m.header.sequence_number = 1;
    m.finalize();
    let mut buf = vec![0u8; m.buffer_len()];
    m.serialize(&mut buf);
    socket.send(&buf, 0).map_err(NftError::Socket)?;
    let mut out = Vec::new();
    replies(&socket, |m| match m.payload {
        NetlinkPayload::Done(_) => Ok(false),
        NetlinkPayload::Error(e) => match e.code {
            Some(code) => Err(NftError::Refused {
                what: "list".into(),
                source: std::io::Error::from_raw_os_error(-code.get()),
            }),
            None => Ok(true),
        },
        NetlinkPayload::InnerMessage(NetfilterMessage {
            inner: NetfilterMessageInner::NfTables(t),
            ..
        }) => {
            out.push(t);
            Ok(true)
        }
        _ => Ok(true),
    })?;
    Ok(out)
}
