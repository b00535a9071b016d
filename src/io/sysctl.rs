//! Kernel settings the node needs, written through /proc/sys (never by running `sysctl`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("cannot set {path}: {source}")]
pub struct SysctlError {
    path: String,
    source: std::io::Error,
}

/// `key` is given as path components so that interface names containing dots
/// (`eth0.100`) stay one component.
fn write(key: &[&str], value: &str) -> Result<(), SysctlError> {
    let mut path = PathBuf::from("/proc/sys");
    path.extend(key);
    std::fs::write(&path, value).map_err(|source| SysctlError {
        path: path.display().to_string(),
        source,
    })
}

/// Forwarding between pods' veths and the TUN device.
pub fn enable_ip_forward() -> Result<(), SysctlError> {
    write(&["net", "ipv4", "ip_forward"], "1")
}

/// Packets from remote pods arrive on the TUN with source addresses the kernel may not
/// route back the same way (asymmetric paths through local veths): loose mode avoids
/// silent drops. IPv6 is switched off on the TUN so that router solicitations and the
/// like never enter the overlay.
pub fn configure_overlay_link(link: &str) -> Result<(), SysctlError> {
    write(&["net", "ipv4", "conf", link, "rp_filter"], "2")?;
    match write(&["net", "ipv6", "conf", link, "disable_ipv6"], "1") {
        // No IPv6 in this kernel or namespace: nothing to switch off.
        Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
