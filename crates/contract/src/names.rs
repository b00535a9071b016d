//! Interface names and tags both sides rely on.

use sha2::{Digest, Sha256};

/// The overlay interface on every node (Weave's bridge had the same name, so operators'
/// tooling and the plugin's "is the daemon up" check keep working).
pub const TUN_NAME: &str = "weave";

/// Weave's prefix for host-side pod veths, kept so operators' tooling still matches. The
/// daemon treats every link with this prefix whose alias is a container id as a pod it
/// must not forget (re-claimed after a restart).
pub const HOST_VETH_PREFIX: &str = "vethwepl";

/// The container id under which a node's own overlay address is allocated (Weave's).
pub const EXPOSE_ID: &str = "weave:expose";

/// Host end of a container's veth: the prefix plus 7 hex digits of sha256(id), 15
/// characters (the kernel's limit). Derived from the id alone so that DEL finds it
/// without a prevResult or a netns. The plugin tags the link with the container id as its
/// alias (`IFLA_IFALIAS`), which tells a hash collision apart and lets the daemon map the
/// pod's /32 route back to the container.
pub fn host_veth_name(container_id: &str) -> String {
    let digest = Sha256::digest(container_id.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("{HOST_VETH_PREFIX}{}", &hex[..7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_fit_the_kernel_and_are_stable() {
        let n = host_veth_name("abc");
        assert_eq!(n.len(), 15);
        assert!(n.starts_with(HOST_VETH_PREFIX));
        // sha256("abc") = ba7816bf...
        assert_eq!(n, "vethweplba7816b");
        assert_ne!(host_veth_name("abd"), n);
    }
}
