//! A connection the policy table dropped, as NFLOG hands it over (the table's prefix and
//! the packet's first bytes): decoded, and told with its reason — Weave's log line, then
//! which pod refused it in which direction and which policies isolate that pod.

use super::compile::Compiled;
use super::model::Key;
use super::ruleset::{PREFIX_IN, PREFIX_OUT};
use std::fmt;
use std::net::Ipv4Addr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// The destination pod's ingress refused it (else the source's egress).
    pub ingress: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// The first packet of a refused connection, from the table's NFLOG prefix and the packet
/// (IPv4 header on); `None` for anything else.
pub fn decode(prefix: &str, packet: &[u8]) -> Option<Denied> {
    let ingress = if prefix == PREFIX_IN {
        true
    } else if prefix == PREFIX_OUT {
        false
    } else {
        return None;
    };
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl {
        return None;
    }
    let proto = packet[9];
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let l4 = &packet[ihl..];
    let (sport, dport) = match proto {
        6 | 17 | 132 if l4.len() >= 4 => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        _ => (0, 0),
    };
    Some(Denied {
        ingress,
        src,
        dst,
        proto,
        sport,
        dport,
    })
}

impl Denied {
    /// Weave's protocol label (`tcp`, `udp`, ...).
    pub fn protocol(&self) -> String {
        match self.proto {
            6 => "tcp".into(),
            17 => "udp".into(),
            132 => "sctp".into(),
            1 => "icmp".into(),
            n => n.to_string(),
        }
    }

    /// The node's pod whose policy refused it.
    pub fn pod_addr(&self) -> Ipv4Addr {
        if self.ingress {
            self.dst
        } else {
            self.src
        }
    }

    /// Why, from the rules the node enforces: the pod, its direction, the policies that
    /// isolate it (none of which allows this).
    pub fn reason(&self, compiled: &Compiled) -> Reason {
        let pod = compiled.pods.get(&self.pod_addr());
        Reason {
            ingress: self.ingress,
            pod: pod.map(|p| p.key.clone()),
            policies: pod
                .map(|p| {
                    if self.ingress {
                        p.ingress_policies.clone()
                    } else {
                        p.egress_policies.clone()
                    }
                })
                .unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    pub ingress: bool,
    pub pod: Option<Key>,
    pub policies: Vec<Key>,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = if self.ingress { "ingress" } else { "egress" };
        let pod = self
            .pod
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_else(|| "a pod no longer known".into());
        if self.policies.is_empty() {
            return write!(f, "{dir} of {pod}: no policy allows it");
        }
        let names: Vec<String> = self.policies.iter().map(|k| k.to_string()).collect();
        write!(
            f,
            "{dir} of {pod} is isolated by {}, and no rule of {} allows it",
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" }
        )
    }
}

impl fmt::Display for Denied {
    /// Weave's line: `TCP connection from A:p to B:q blocked by Weave NPC.`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = self.protocol().to_ascii_uppercase();
        match self.proto {
            6 | 17 | 132 => write!(
                f,
                "{proto} connection from {}:{} to {}:{} blocked by Weave NPC.",
                self.src, self.sport, self.dst, self.dport
            ),
            _ => write!(
                f,
                "{proto} packet from {} to {} blocked by Weave NPC.",
                self.src, self.dst
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0; 16]);
        p
    }

    #[test]
    fn a_refused_syn_reads_as_weave_printed_it() {
        let d = decode(
            PREFIX_IN,
            &syn([192, 168, 1, 6], [192, 168, 0, 5], 40000, 81),
        )
        .unwrap();
        assert_eq!(
            d.to_string(),
            "TCP connection from 192.168.1.6:40000 to 192.168.0.5:81 blocked by Weave NPC."
        );
        assert!(d.ingress);
        assert_eq!(d.pod_addr(), Ipv4Addr::new(192, 168, 0, 5));
        assert_eq!(d.protocol(), "tcp");
        assert!(decode("someone else ", &syn([1, 1, 1, 1], [2, 2, 2, 2], 1, 2)).is_none());
        assert!(decode(PREFIX_OUT, &[0x45, 0]).is_none(), "truncated");
        let r = Reason {
            ingress: true,
            pod: Some(Key::new("x", "a")),
            policies: vec![Key::new("x", "allow-b")],
        };
        assert_eq!(
            r.to_string(),
            "ingress of x/a is isolated by x/allow-b, and no rule of it allows it"
        );
    }
}
