//! Address arithmetic. IPv4 addresses are `u32`; a range is half-open `[start, end)` with
//! `end` a `u64`, because a range that ends at 255.255.255.255 has an end of 2^32.

use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// A half-open address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub start: u32,
    pub end: u64,
}

impl Span {
    pub fn new(start: u32, end: u64) -> Span {
        Span { start, end }
    }

    /// The span of an inclusive `[first, last]` pair.
    pub(crate) fn inclusive(first: u32, last: u32) -> Span {
        Span::new(first, u64::from(last) + 1)
    }

    /// Every address of a CIDR block, network and broadcast included.
    pub(crate) fn of_net(net: Ipv4Net) -> Span {
        let start = u32::from(net.network());
        Span::new(start, u64::from(start) + net_size(net))
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(u64::from(self.start))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, addr: u32) -> bool {
        addr >= self.start && u64::from(addr) < self.end
    }

    /// The last address, if the span is not empty.
    pub fn last(&self) -> Option<u32> {
        if self.is_empty() {
            None
        } else {
            // end - 1 < 2^32 because end > start >= 0 and end <= 2^32 for any span we build.
            u32::try_from(self.end - 1).ok()
        }
    }

    pub fn intersect(&self, other: &Span) -> Span {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        if end <= u64::from(start) {
            Span::new(start, u64::from(start))
        } else {
            Span::new(start, end)
        }
    }
}

/// Number of addresses in a CIDR block (2^32 for /0).
pub(crate) fn net_size(net: Ipv4Net) -> u64 {
    1u64 << (32 - u32::from(net.prefix_len()))
}

/// The addresses of `net` that may be handed out: all but the network address (first) and
/// the broadcast address (last), as RFC 1122 and Weave do. Empty for /31 and /32.
pub fn usable(net: Ipv4Net) -> Span {
    let all = Span::of_net(net);
    if all.len() <= 2 {
        return Span::new(all.start, u64::from(all.start));
    }
    Span::new(all.start + 1, all.end - 1)
}

/// How many usable addresses of `net` fall inside `span`.
pub(crate) fn usable_in(net: Ipv4Net, span: Span) -> u64 {
    usable(net).intersect(&span).len()
}

pub fn addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// The smallest list of CIDR blocks that exactly covers `span`, in address order.
pub(crate) fn cidrs_of(span: Span) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    let mut cur = u64::from(span.start);
    while cur < span.end {
        // Largest block aligned at `cur` that still fits before `end`.
        let align = cur.trailing_zeros().min(32);
        let fit = 63 - (span.end - cur).leading_zeros();
        let bits = align.min(fit);
        // cur < 2^32 and bits <= 32, so the conversions are exact.
        let prefix = (32 - bits) as u8;
        if let Ok(base) = u32::try_from(cur) {
            if let Ok(n) = Ipv4Net::new(Ipv4Addr::from(base), prefix) {
                out.push(n);
            }
        }
        cur += 1u64 << bits;
    }
    out
}

/// The largest CIDR-aligned block inside `span` (the lowest one if several tie).
pub(crate) fn largest_aligned_block(span: Span) -> Option<Ipv4Net> {
    cidrs_of(span)
        .into_iter()
        .fold(None, |best: Option<Ipv4Net>, n| match best {
            Some(b) if b.prefix_len() <= n.prefix_len() => Some(b),
            _ => Some(n),
        })
}

/// A set of addresses stored as maximal runs `start -> end (exclusive)`, so that finding
/// the first free address in a range costs O(log n) however densely the range is used.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct AddrSet {
    runs: BTreeMap<u32, u64>,
    len: u64,
}

impl AddrSet {
    pub fn new() -> AddrSet {
        AddrSet::default()
    }

    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The run containing `a`, if any.
    fn run_of(&self, a: u32) -> Option<(u32, u64)> {
        self.runs
            .range(..=a)
            .next_back()
            .filter(|(_, &end)| u64::from(a) < end)
            .map(|(&s, &e)| (s, e))
    }

    pub fn contains(&self, a: u32) -> bool {
        self.run_of(a).is_some()
    }

    /// Adds `a`; false if it was already present.
    pub fn insert(&mut self, a: u32) -> bool {
        if self.contains(a) {
            return false;
        }
        let a64 = u64::from(a);
        let mut start = a;
        let mut end = a64 + 1;
        // Join the run ending right before `a`.
        if let Some((&s, &e)) = self.runs.range(..a).next_back() {
            if e == a64 {
                start = s;
            }
        }
        // Join the run starting right after `a`.
        if let Ok(next) = u32::try_from(a64 + 1) {
            if let Some(e) = self.runs.remove(&next) {
                end = e;
            }
        }
        self.runs.insert(start, end);
        self.len += 1;
        true
    }

    /// Removes `a`; false if it was absent.
    pub fn remove(&mut self, a: u32) -> bool {
        let Some((s, e)) = self.run_of(a) else {
            return false;
        };
        self.runs.remove(&s);
        if s < a {
            self.runs.insert(s, u64::from(a));
        }
        let after = u64::from(a) + 1;
        if after < e {
            // after < e <= 2^32, so it fits.
            if let Ok(after) = u32::try_from(after) {
                self.runs.insert(after, e);
            }
        }
        self.len -= 1;
        true
    }

    /// The lowest address of `span` not in the set.
    pub(crate) fn first_free_in(&self, span: Span) -> Option<u32> {
        if span.is_empty() {
            return None;
        }
        let candidate = match self.run_of(span.start) {
            Some((_, end)) => end,
            None => u64::from(span.start),
        };
        // Runs are maximal, so the address right after a run is free.
        if candidate < span.end {
            u32::try_from(candidate).ok()
        } else {
            None
        }
    }

    /// The lowest member >= `a`, if any.
    pub(crate) fn next_member_from(&self, a: u32) -> Option<u32> {
        if self.contains(a) {
            return Some(a);
        }
        self.runs.range(a..).next().map(|(&s, _)| s)
    }

    /// How many members fall inside `span`.
    pub(crate) fn count_in(&self, span: Span) -> u64 {
        if span.is_empty() {
            return 0;
        }
        let mut total = 0;
        if let Some((s, e)) = self.run_of(span.start) {
            if s < span.start {
                total += Span::new(s, e).intersect(&span).len();
            }
        }
        for (&s, &e) in self.runs.range(span.start..) {
            if u64::from(s) >= span.end {
                break;
            }
            total += Span::new(s, e).intersect(&span).len();
        }
        total
    }

    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.runs
            .iter()
            .flat_map(|(&s, &e)| (u64::from(s)..e).filter_map(|a| u32::try_from(a).ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> u32 {
        u32::from(s.parse::<Ipv4Addr>().unwrap())
    }

    #[test]
    fn sizes_and_usable() {
        assert_eq!(net_size(net("192.168.0.0/16")), 65536);
        assert_eq!(net_size(net("0.0.0.0/0")), 1 << 32);
        let u = usable(net("192.168.0.0/16"));
        assert_eq!(u.start, ip("192.168.0.1"));
        assert_eq!(u.last(), Some(ip("192.168.255.254")));
        assert_eq!(u.len(), 65534);
        assert!(usable(net("10.0.0.0/31")).is_empty());
        assert!(usable(net("10.0.0.0/32")).is_empty());
        assert_eq!(usable(net("10.0.0.0/30")).len(), 2);
        let top = usable(net("255.255.255.0/24"));
        assert_eq!(top.last(), Some(ip("255.255.255.254")));
        assert_eq!(Span::of_net(net("255.255.255.0/24")).end, 1 << 32);
        assert_eq!(Span::of_net(net("0.0.0.0/0")).last(), Some(u32::MAX));
    }

    #[test]
    fn usable_in_counts_only_inner_addresses() {
        let n = net("10.0.0.0/24");
        assert_eq!(
            usable_in(n, Span::new(ip("10.0.0.0"), u64::from(ip("10.0.0.128")))),
            127
        );
        assert_eq!(usable_in(n, Span::of_net(n)), 254);
        assert_eq!(
            usable_in(n, Span::new(ip("10.0.1.0"), u64::from(ip("10.0.2.0")))),
            0
        );
    }

    #[test]
    fn span_ops() {
        let a = Span::new(10, 20);
        assert!(a.contains(10) && a.contains(19) && !a.contains(20));
        assert_eq!(a.intersect(&Span::new(15, 30)), Span::new(15, 20));
        assert!(a.intersect(&Span::new(20, 30)).is_empty());
        assert!(a.intersect(&Span::new(0, 5)).is_empty());
        assert_eq!(Span::inclusive(1, 1).len(), 1);
        assert_eq!(Span::new(5, 5).last(), None);
    }

    #[test]
    fn cidr_cover() {
        let c = cidrs_of(Span::new(ip("10.0.0.0"), u64::from(ip("10.0.1.0"))));
        assert_eq!(c, vec![net("10.0.0.0/24")]);
        let c = cidrs_of(Span::new(ip("10.0.0.1"), u64::from(ip("10.0.0.8"))));
        assert_eq!(
            c,
            vec![net("10.0.0.1/32"), net("10.0.0.2/31"), net("10.0.0.4/30")]
        );
        assert_eq!(
            cidrs_of(Span::of_net(net("0.0.0.0/0"))),
            vec![net("0.0.0.0/0")]
        );
        assert_eq!(
            cidrs_of(Span::of_net(net("255.255.255.252/30"))),
            vec![net("255.255.255.252/30")]
        );
        assert!(cidrs_of(Span::new(7, 7)).is_empty());
        assert_eq!(
            largest_aligned_block(Span::new(ip("10.0.0.3"), u64::from(ip("10.0.0.13")))),
            Some(net("10.0.0.4/30"))
        );
        assert_eq!(largest_aligned_block(Span::new(3, 3)), None);
    }

    #[test]
    fn addr_set_runs() {
        let mut s = AddrSet::new();
        assert_eq!(s.first_free_in(Span::new(1, 10)), Some(1));
        for a in [1, 2, 3, 5] {
            assert!(s.insert(a));
        }
        assert!(!s.insert(2));
        assert_eq!(s.len(), 4);
        assert_eq!(s.first_free_in(Span::new(1, 10)), Some(4));
        assert_eq!(s.first_free_in(Span::new(5, 10)), Some(6));
        assert_eq!(s.first_free_in(Span::new(1, 4)), None);
        assert!(s.insert(4));
        assert_eq!(s.runs.len(), 1);
        assert_eq!(s.first_free_in(Span::new(1, 10)), Some(6));
        assert_eq!(s.count_in(Span::new(2, 5)), 3);
        assert!(s.remove(3));
        assert!(!s.remove(3));
        assert_eq!(s.runs.len(), 2);
        assert_eq!(s.first_free_in(Span::new(1, 10)), Some(3));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert!(s.insert(u32::MAX));
        assert!(s.contains(u32::MAX));
        assert_eq!(s.first_free_in(Span::new(u32::MAX, 1 << 32)), None);
        assert!(s.remove(u32::MAX));
    }

    #[test]
    fn addr_set_matches_brute_force() {
        // A fixed pseudo-random sequence keeps the test deterministic.
        let mut x: u32 = 12345;
        let mut s = AddrSet::new();
        let mut model = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let a = (x >> 8) % 200;
            if x & 1 == 0 {
                assert_eq!(s.insert(a), model.insert(a));
            } else {
                assert_eq!(s.remove(a), model.remove(&a));
            }
            let lo = (x >> 3) % 200;
            let span = Span::new(lo, u64::from(lo) + u64::from((x >> 12) % 50));
            let want = (span.start..span.end as u32).find(|a| !model.contains(a));
            assert_eq!(s.first_free_in(span), want);
            let cnt = model.range(span.start..span.end as u32).count() as u64;
            assert_eq!(s.count_in(span), cnt);
        }
        assert_eq!(s.len(), model.len() as u64);
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            model.into_iter().collect::<Vec<_>>()
        );
    }
}
