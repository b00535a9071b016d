//! The overlay's L3 TUN device (`IFF_TUN | IFF_NO_PI`: each read or write is one bare
//! IPv4 packet).
//!
//! Both the device and the interface it creates belong to the network namespace of the
//! thread that calls [`create`]; afterwards the handle works from any thread. Addresses
//! and routes on the interface are the netlink code's business, not this module's.
//!
//! The handle is cheap to clone and shared by the data-plane threads. A later version
//! with offloads (IFF_VNET_HDR) and several queues (IFF_MULTI_QUEUE) extends [`TunConfig`]
//! and gives each worker its own queue; the loops only see [`Tun::recv`] and [`Tun::send`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("MTU {0} is outside 68..=65535")]
    BadMtu(u32),
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("cannot create TUN device {name}: {source}")]
    Create { name: String, source: io::Error },
    #[error("cannot configure TUN device {name}: {source}")]
    Configure { name: String, source: io::Error },
}

/// How to create the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    pub name: String,
    pub mtu: u32,
}

/// A shared handle on the TUN device.
#[derive(Clone)]
pub struct Tun {
    dev: Arc<tun_rs::SyncDevice>,
    name: String,
    mtu: u16,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("fd", &self.dev.as_raw_fd())
            .finish()
    }
}

/// Creates (or attaches to an existing, non-busy) TUN device `name`, sets its MTU and
/// brings it up, in the calling thread's network namespace.
pub fn create(name: &str, mtu: u32) -> Result<Tun, TunError> {
    create_with(&TunConfig {
        name: name.to_string(),
        mtu,
    })
}

pub fn create_with(cfg: &TunConfig) -> Result<Tun, TunError> {
    // 68 is the IPv4 minimum link MTU (RFC 791).
    let mtu = u16::try_from(cfg.mtu)
        .ok()
        .filter(|m| *m >= 68)
        .ok_or(TunError::BadMtu(cfg.mtu))?;
    if cfg.name.is_empty() || cfg.name.len() > 15 || cfg.name.contains(['/', '\0']) {
        return Err(TunError::BadName(cfg.name.clone()));
    }
    let dev = tun_rs::DeviceBuilder::new()
        .name(cfg.name.clone())
        .layer(tun_rs::Layer::L3)
        .packet_information(false)
        .mtu(mtu)
        .enable(true)
        .build_sync()
        .map_err(|source| TunError::Create {
            name: cfg.name.clone(),
            source,
        })?;
    // The kernel may have picked another name (e.g. if given a pattern); report the real one.
    let name = dev.name().map_err(|source| TunError::Configure {
        name: cfg.name.clone(),
        source,
    })?;
    Ok(Tun {
        dev: Arc::new(dev),
        name,
        mtu,
    })
}

impl Tun {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU set at creation. Cached rather than queried: an ioctl by interface name
    /// resolves in the calling thread's namespace, which may not be the device's.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Reads one packet. Blocks unless [`Tun::set_nonblocking`] was called, in which case
    /// an empty queue is `ErrorKind::WouldBlock`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet.
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet)
    }

    /// Applies to every clone of this handle (they share one file descriptor).
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.dev.set_nonblocking(nonblocking)
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config_before_touching_the_kernel() {
        assert!(matches!(create("weave", 67), Err(TunError::BadMtu(67))));
        assert!(matches!(
            create("weave", 70_000),
            Err(TunError::BadMtu(70_000))
        ));
        assert!(matches!(create("", 1400), Err(TunError::BadName(_))));
        assert!(matches!(
            create("a-name-longer-than-15", 1400),
            Err(TunError::BadName(_))
        ));
    }
}
