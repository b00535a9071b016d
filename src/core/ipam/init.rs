//! `IPALLOC_INIT` / `--ipalloc-init`: how the range is first divided.

use crate::core::mesh::PeerName;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpallocInit {
    /// Paxos among `N` peers: allocation waits until a quorum `N/2 + 1` agrees on the
    /// initial member set.
    Consensus(usize),
    /// The ring is seeded with exactly these peers (by name); every node computes it alone.
    Seed(Vec<PeerName>),
    /// Holds no space until it asks for some; never proposes nor seeds.
    Observer,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpallocInitError {
    #[error("invalid ipalloc-init {0:?}: expected consensus=N, seed=NAME,NAME,... or observer")]
    Syntax(String),
    #[error("invalid ipalloc-init consensus count {0:?}: expected a positive integer")]
    Count(String),
    #[error(
        "invalid ipalloc-init seed {0:?}: seeds are peer names like 02:77:66:00:00:01 \
         (nicknames are not accepted)"
    )]
    SeedName(String),
    #[error("invalid ipalloc-init: seed list is empty")]
    NoSeeds,
}

impl IpallocInit {
    /// Parses Weave's syntax: `consensus=3`, `seed=02:..:01,02:..:02`, `observer`.
    pub fn parse(s: &str) -> Result<IpallocInit, IpallocInitError> {
        let s = s.trim();
        if s == "observer" {
            return Ok(IpallocInit::Observer);
        }
        let Some((mode, arg)) = s.split_once('=') else {
            return Err(IpallocInitError::Syntax(s.to_string()));
        };
        match mode {
            "consensus" => match arg.parse::<usize>() {
                Ok(n) if n > 0 => Ok(IpallocInit::Consensus(n)),
                _ => Err(IpallocInitError::Count(arg.to_string())),
            },
            "seed" => {
                let mut names = Vec::new();
                for part in arg.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let n = PeerName::parse(part)
                        .map_err(|_| IpallocInitError::SeedName(part.to_string()))?;
                    names.push(n);
                }
                if names.is_empty() {
                    return Err(IpallocInitError::NoSeeds);
                }
                names.sort();
                names.dedup();
                Ok(IpallocInit::Seed(names))
            }
            _ => Err(IpallocInitError::Syntax(s.to_string())),
        }
    }
}

impl std::str::FromStr for IpallocInit {
    type Err = IpallocInitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        IpallocInit::parse(s)
    }
}

impl fmt::Display for IpallocInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpallocInit::Consensus(n) => write!(f, "consensus={n}"),
            IpallocInit::Seed(v) => {
                let names: Vec<&str> = v.iter().map(PeerName::as_str).collect();
                write!(f, "seed={}", names.join(","))
            }
            IpallocInit::Observer => f.write_str("observer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weave_syntax() {
        assert_eq!(
            IpallocInit::parse("consensus=3"),
            Ok(IpallocInit::Consensus(3))
        );
        assert_eq!(IpallocInit::parse("observer"), Ok(IpallocInit::Observer));
        let s = IpallocInit::parse("seed=02:77:66:00:00:02, 02:77:66:00:00:01").unwrap();
        assert_eq!(s.to_string(), "seed=02:77:66:00:00:01,02:77:66:00:00:02");
        assert_eq!(IpallocInit::parse(&s.to_string()), Ok(s));
        for bad in [
            "",
            "consensus",
            "consensus=0",
            "consensus=x",
            "seed=",
            "paxos=3",
        ] {
            assert!(IpallocInit::parse(bad).is_err(), "{bad}");
        }
        let e = IpallocInit::parse("seed=node1,02:77:66:00:00:01").unwrap_err();
        assert!(e.to_string().contains("nicknames are not accepted"), "{e}");
    }
}
