//! The overlay's L3 TUN device (`IFF_TUN | IFF_NO_PI`: each read or write is one bare
//! IPv4 packet).
//!
//! Both the device and the interface it creates belong to the network namespace of the
//! thread that calls [`create`]; afterwards the handle works from any thread. Addresses
//! and routes on the interface are the netlink code's business, not this module's.
//!
//! The handle is cheap to clone and shared by the data-plane threads.
//!
//! By default the device is opened with offloads (`IFF_VNET_HDR` and `TUNSETOFFLOAD`
//! CSUM|TSO4|TSO6|USO4|USO6): every read and write then starts with a
//! `virtio_net_hdr`, reads can be TCP/UDP super-packets of up to 64 KiB, and writes can be
//! coalesced super-packets (see `core::wire::{gso, gro}`). It is also opened with
//! `IFF_MULTI_QUEUE`, so [`Tun::add_queue`] can give each data-plane worker its own
//! queue; the kernel picks the queue of a packet by its flow hash, so one flow always
//! reaches the same worker.

use std::io::{self, IoSlice};
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
    /// Ask for `IFF_VNET_HDR` and segmentation offloads. If the kernel refuses, the
    /// device is created without them ([`Tun::vnet_hdr`] tells which).
    pub offload: bool,
}

/// A shared handle on the TUN device.
#[derive(Clone)]
pub struct Tun {
    dev: Arc<tun_rs::SyncDevice>,
    name: String,
    mtu: u16,
    vnet_hdr: bool,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("vnet_hdr", &self.vnet_hdr)
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
        offload: true,
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
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(cfg.name.clone())
            .layer(tun_rs::Layer::L3)
            .packet_information(false)
            .offload(offload)
            .multi_queue(true)
            .mtu(mtu)
            .enable(true)
            .build_sync()
    };
    let dev = match build(cfg.offload) {
        Err(e) if cfg.offload => {
            tracing::warn!("TUN offloads unavailable ({e}); forwarding packet by packet");
            build(false)
        }
        other => other,
    }
    .map_err(|source| TunError::Create {
        name: cfg.name.clone(),
        source,
    })?;
    let vnet_hdr = dev.tcp_gso();
    // The kernel may have picked another name (e.g. if given a pattern); report the real one.
    let name = dev.name().map_err(|source| TunError::Configure {
        name: cfg.name.clone(),
        source,
    })?;
    Ok(Tun {
        dev: Arc::new(dev),
        name,
        mtu,
        vnet_hdr,
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

    /// Whether reads and writes carry a `virtio_net_hdr` (offloads on).
    pub fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    /// Opens another queue of the same device (its own file descriptor, same offloads).
    /// Must run in the device's network namespace: the device is attached by name.
    pub fn add_queue(&self) -> io::Result<Tun> {
        Ok(Tun {
            dev: Arc::new(self.dev.try_clone()?),
            name: self.name.clone(),
            mtu: self.mtu,
            vnet_hdr: self.vnet_hdr,
        })
    }

    /// Writes one packet gathered from `parts` (with offloads, the first part must be the
    /// `virtio_net_hdr`). Returns the bytes written.
    pub fn write_vectored(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = parts.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and every slice is
        // borrowed for the duration of the call.
        let rc = unsafe { libc::writev(self.as_raw_fd(), parts.as_ptr().cast(), n) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Reads one packet (with offloads: `virtio_net_hdr` + packet) into `buf`.
    pub fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let rc = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }

    /// Writes one bare IPv4 packet, adding an empty `virtio_net_hdr` when offloads are on.
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<usize> {
        if self.vnet_hdr {
            let hdr = [0u8; crate::core::wire::virtio::LEN];
            self.write_vectored(&[IoSlice::new(&hdr), IoSlice::new(packet)])
        } else {
            self.dev.send(packet)
        }
    }

    /// Reads one packet as the device frames it (with offloads, behind a
    /// `virtio_net_hdr`). Blocks unless [`Tun::set_nonblocking`] was called, in which
    /// case an empty queue is `ErrorKind::WouldBlock`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.dev.recv(buf)
    }

    /// Writes one packet as the device frames it (with offloads, the caller supplies
    /// the `virtio_net_hdr`; [`Tun::send_packet`] adds an empty one).
    pub fn send(&self, packet: &[u8]) -> io::Result<usize> {
        self.dev.send(packet)
    }

    /// Applies to every clone of this handle (they share one file descriptor), not to
    /// other queues.
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
