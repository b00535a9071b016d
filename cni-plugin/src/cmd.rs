//! ADD, DEL, CHECK, GC and STATUS: the daemon, the node namespace and the container
//! namespace put together.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use serde_json::Value;
use weft_contract::{ContainerId, HOST_VETH_PREFIX};

use crate::client::{self, Daemon, Readiness};
use crate::config::{is_plugin_container_id, Env, NetConf};
use crate::link::{self, host_veth_name, LinkError, LinkState, Netlink};
use crate::netns::{Netns, NetnsError};
use crate::spec::{
    expected_from_prev_result, format_mac, render_add_result, AddOutcome, Cidr, CniError, ErrorCode,
};

/// The overlay interface the weft router creates on every node.
pub use weft_contract::TUN_NAME as WEAVE_IFNAME;
/// Used only if the kernel does not report the weave interface's MTU.
const FALLBACK_MTU: u32 = 1376;

fn io_error(msg: impl Into<String>) -> impl FnOnce(LinkError) -> CniError {
    let msg = msg.into();
    move |e| CniError::new(ErrorCode::Io, msg, e.to_string())
}

fn netns_error(e: NetnsError) -> CniError {
    match e {
        NetnsError::Open { .. } | NetnsError::Enter { .. } => CniError::new(
            ErrorCode::InvalidEnv,
            "invalid env var CNI_NETNS",
            format!("{e}; CNI_NETNS must name the container's network namespace (e.g. /var/run/netns/<name>)"),
        ),
        NetnsError::Spawn { .. } | NetnsError::Panicked { .. } => {
            CniError::new(ErrorCode::Io, "cannot work inside the container namespace", e.to_string())
        }
    }
}

/// The node's side of the overlay: its own address (the pods' gateway) and MTU.
#[derive(Debug, Clone, Copy)]
struct Overlay {
    addr: Cidr,
    mtu: u32,
}

fn overlay(nl: &Netlink) -> Result<Overlay, CniError> {
    let not_ready = |what: &str| {
        CniError::new(
            ErrorCode::TryAgainLater,
            format!("the weft overlay interface {WEAVE_IFNAME:?} {what}"),
            "the weft router creates and addresses it once it has joined the network; check `weft status` on this node. The runtime will retry",
        )
    };
    let link = nl
        .link(WEAVE_IFNAME)
        .map_err(io_error("cannot look up the weave interface"))?
        .ok_or_else(|| not_ready("does not exist yet"))?;
    let addr = nl
        .ipv4_addrs(link.index)
        .map_err(io_error("cannot read the weave interface's addresses"))?
        .into_iter()
        .next()
        .ok_or_else(|| not_ready("has no IPv4 address yet"))?;
    Ok(Overlay {
        addr,
        mtu: link.mtu.unwrap_or(FALLBACK_MTU),
    })
}

/// The host veth of this container, if it exists. A veth with our name that carries
/// another container's id as alias is a hash collision and must not be touched.
fn own_host_veth(
    nl: &Netlink,
    name: &str,
    container_id: &str,
) -> Result<Option<LinkState>, CniError> {
    let link = nl
        .link(name)
        .map_err(io_error(format!("cannot look up interface {name}")))?;
    match link {
        Some(l) if l.alias.as_deref().is_some_and(|a| a != container_id) => Err(CniError::new(
            ErrorCode::NameCollision,
            format!("host interface {name} belongs to another container"),
            format!(
                "{name} is tagged with container id {:?}; ids whose sha256 begin alike collide. Remove that container first",
                l.alias.unwrap_or_default()
            ),
        )),
        other => Ok(other),
    }
}

/// The pod end of an existing attachment, when it is in `netns` under another name than
/// `ifname`: a second attachment of the same container (weft gives one per container).
fn attached_as_other(
    netns: &Netns,
    host: &LinkState,
    ifname: &str,
) -> Result<Option<String>, CniError> {
    let Some(peer) = host.peer_index else {
        return Ok(None);
    };
    let host_index = host.index;
    let found = netns
        .run(move || -> Result<Option<String>, String> {
            let nl = Netlink::new().map_err(|e| e.to_string())?;
            let link = nl.link_by_index(peer).map_err(|e| e.to_string())?;
            // The index names the pod end only if that end points back at the host end.
            Ok(link
                .filter(|l| l.peer_index == Some(host_index))
                .map(|l| l.name))
        })
        .map_err(netns_error)?
        .map_err(|e| {
            CniError::new(
                ErrorCode::Io,
                "cannot inspect the container's interfaces",
                e,
            )
        })?;
    Ok(found.filter(|name| name != ifname))
}

pub fn add(conf: &NetConf, env: &Env) -> Result<Value, CniError> {
    let netns = Netns::open(&env.netns).map_err(netns_error)?;
    if netns.is_current() {
        return Err(CniError::new(
            ErrorCode::InvalidEnv,
            "invalid env var CNI_NETNS",
            format!(
                "{} is the node's own network namespace; CNI_NETNS must name the container's",
                env.netns
            ),
        ));
    }
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the node namespace"))?;
    let overlay = overlay(&nl)?;
    let mtu = conf.mtu.unwrap_or(overlay.mtu);
    let host_name = host_veth_name(env.container_id.as_str());

    // Runtimes normally DEL before a repeated ADD; if they did not, start over. The
    // address stays the same because allocation is idempotent per container id.
    if let Some(stale) = own_host_veth(&nl, &host_name, env.container_id.as_str())? {
        if let Some(other) = attached_as_other(&netns, &stale, &env.ifname)? {
            return Err(CniError::new(
                ErrorCode::AlreadyAttached,
                format!(
                    "container {} is already attached to weft as {other}",
                    env.container_id
                ),
                format!(
                    "weft gives a container one interface; ADD with CNI_IFNAME={} would replace {other}. DEL it first",
                    env.ifname
                ),
            ));
        }
        eprintln!(
            "weft-cni: ADD {}: removing leftover {host_name}",
            env.container_id
        );
        nl.delete(stale.index).map_err(io_error(format!(
            "cannot remove leftover interface {host_name}"
        )))?;
    }

    let daemon = Daemon::new(conf.daemon_address);
    let address = match conf.subnet {
        Some(subnet) => daemon.allocate_in(&env.container_id, subnet)?,
        None => daemon.allocate(&env.container_id)?,
    };

    let plumbed = plumb(
        &nl,
        &netns,
        env,
        &host_name,
        address,
        overlay.addr.addr,
        mtu,
    )
    .and_then(|outcome| {
        // The pod is isolated before its containers start: the ADD returns only once its
        // policy rules are in place.
        match &env.pod {
            Some((ns, name)) => daemon
                .admit_policy(ns, name, address.addr)
                .map(|()| outcome)
                .map_err(CniError::from),
            None => Ok(outcome),
        }
    });
    match plumbed {
        Ok(outcome) => match daemon.confirm(&env.container_id) {
            Ok(confirmed) if confirmed.addr == address.addr => {
                let outcome = AddOutcome {
                    dns: conf.dns.clone(),
                    ..outcome
                };
                Ok(render_add_result(&outcome, conf.version))
            }
            Ok(other) => {
                rollback(&nl, &daemon, &host_name, env);
                Err(CniError::new(
                    ErrorCode::DaemonProtocol,
                    "the weft daemon confirmed another address",
                    format!("allocated {}, confirmed {other}", address.addr),
                ))
            }
            Err(e) => {
                // Unconfirmed, the daemon frees the address soon: the pod must not keep it.
                rollback(&nl, &daemon, &host_name, env);
                Err(e.into())
            }
        },
        Err(e) => {
            rollback(&nl, &daemon, &host_name, env);
            Err(e)
        }
    }
}

/// Undoes a failed ADD: the pair goes with its host end, the address back to the pool.
fn rollback(nl: &Netlink, daemon: &Daemon, host_name: &str, env: &Env) {
    // Through the alias check: never remove a colliding container's interface.
    match own_host_veth(nl, host_name, env.container_id.as_str()) {
        Ok(Some(l)) => {
            if let Err(e) = nl.delete(l.index) {
                eprintln!("weft-cni: rollback: {e}");
            }
        }
        Ok(None) => {}
        Err(e) => eprintln!("weft-cni: rollback: {e}"),
    }
    if let Err(e) = daemon.release(&env.container_id) {
        eprintln!("weft-cni: rollback: {e}");
    }
}

fn plumb(
    nl: &Netlink,
    netns: &Netns,
    env: &Env,
    host_name: &str,
    address: Cidr,
    gateway: Ipv4Addr,
    mtu: u32,
) -> Result<AddOutcome, CniError> {
    nl.create_veth(host_name, &env.ifname, netns.file().as_raw_fd(), mtu)
        .map_err(|e| {
            if e.already_exists() {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("interface {} already exists in the container", env.ifname),
                    format!("{e}; the runtime must DEL the previous attachment first or pick another CNI_IFNAME"),
                )
            } else {
                io_error("cannot create the veth pair")(e)
            }
        })?;
    let host = nl
        .link(host_name)
        .map_err(io_error(format!("cannot look up {host_name}")))?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Io,
                format!("{host_name} vanished right after creation"),
                "",
            )
        })?;
    link::disable_ipv6(host_name);
    // The pod sees its whole range as on-link and ARPs for peers and the gateway;
    // the host answers them all and then routes.
    link::write_sysctl(
        &format!("/proc/sys/net/ipv4/conf/{host_name}/proxy_arp"),
        "1",
    )
    .map_err(io_error("cannot enable proxy ARP on the host veth"))?;
    // The kernel delays proxy-ARP answers randomly by up to 0.8 s by default, which
    // stalls every new pod's first connection.
    link::write_sysctl(
        &format!("/proc/sys/net/ipv4/neigh/{host_name}/proxy_delay"),
        "0",
    )
    .map_err(io_error(
        "cannot disable the proxy ARP delay on the host veth",
    ))?;
    // The alias (IFALIASZ = 256) lets DEL and later ADDs tell a hash collision apart.
    // A ContainerId always fits IFALIASZ.
    let alias = Some(env.container_id.as_str());
    nl.set_up(host.index, alias)
        .map_err(io_error(format!("cannot bring up {host_name}")))?;
    nl.add_host_route(host.index, address.addr)
        .map_err(io_error(format!(
            "cannot route {} to {host_name}",
            address.addr
        )))?;

    let ifname = env.ifname.clone();
    let pod_mac = netns
        .run(move || configure_pod(&ifname, address, gateway))
        .map_err(netns_error)??;

    Ok(AddOutcome {
        host_ifname: host_name.to_string(),
        host_mac: format_mac(&host.mac),
        pod_ifname: env.ifname.clone(),
        pod_mac: format_mac(&pod_mac),
        sandbox: netns.path().to_string(),
        address,
        gateway,
        dns: Default::default(),
    })
}

/// Runs inside the container namespace; returns the pod interface's MAC.
fn configure_pod(ifname: &str, address: Cidr, gateway: Ipv4Addr) -> Result<Vec<u8>, CniError> {
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the container namespace"))?;
    let link = nl
        .link(ifname)
        .map_err(io_error(format!(
            "cannot look up {ifname} in the container"
        )))?
        .ok_or_else(|| {
            CniError::new(
                ErrorCode::Io,
                format!("{ifname} did not appear in the container namespace"),
                "",
            )
        })?;
    // Before the link goes up, so it never solicits or accepts IPv6 routers.
    link::disable_ipv6(ifname);
    nl.add_address(link.index, address)
        .map_err(io_error(format!("cannot add {address} to {ifname}")))?;
    if let Some(lo) = nl.link("lo").map_err(io_error("cannot look up lo"))? {
        if !lo.up {
            nl.set_up(lo.index, None)
                .map_err(io_error("cannot bring up lo"))?;
        }
    }
    nl.set_up(link.index, None)
        .map_err(io_error(format!("cannot bring up {ifname}")))?;
    nl.add_default_route(link.index, gateway, !link::in_subnet(address, gateway))
        .map_err(|e| {
            if e.already_exists() {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "the container already has a default route",
                    format!("{e}; weft must be the container's only (or first) network"),
                )
            } else {
                io_error(format!("cannot add the default route via {gateway}"))(e)
            }
        })?;
    Ok(link.mac)
}

pub fn del(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the node namespace"))?;
    let host_name = host_veth_name(env.container_id.as_str());
    match own_host_veth(&nl, &host_name, env.container_id.as_str()) {
        Ok(Some(l)) => {
            nl.delete(l.index)
                .map_err(io_error(format!("cannot delete {host_name}")))?;
        }
        Ok(None) => {}
        // Someone else's interface: leave it, but still free our address.
        Err(e) if e.code == ErrorCode::NameCollision => {
            eprintln!("weft-cni: DEL {}: {e}", env.container_id)
        }
        Err(e) => return Err(e),
    }
    // Only after the veth (and with it the /32 route) is gone: the daemon hands out
    // the lowest free address, so a pod created next would get this one and clash
    // with a route still in place.
    Daemon::new(conf.daemon_address).release(&env.container_id)?;
    Ok(())
}

fn mismatch(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::CheckMismatch, msg, details)
}

pub fn check(conf: &NetConf, env: &Env) -> Result<(), CniError> {
    if !conf.version.supports_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("CHECK is not defined for cniVersion {}", conf.version),
            "CHECK needs cniVersion 0.4.0 or later",
        ));
    }
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "CHECK needs prevResult",
            "the runtime must pass the result of ADD as prevResult",
        )
    })?;
    let expected = expected_from_prev_result(prev)?;
    let netns = Netns::open(&env.netns).map_err(netns_error)?;
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the node namespace"))?;
    let overlay = overlay(&nl)?;
    let gateway = expected.gateway.unwrap_or(overlay.addr.addr);
    if gateway != overlay.addr.addr {
        return Err(mismatch(
            format!("gateway {gateway} is no longer this node's overlay address"),
            format!(
                "the weave interface now has {}; recreate the pod",
                overlay.addr
            ),
        ));
    }

    let host_name = host_veth_name(env.container_id.as_str());
    let host = own_host_veth(&nl, &host_name, env.container_id.as_str())?.ok_or_else(|| {
        mismatch(
            format!("host interface {host_name} is missing"),
            "recreate the pod",
        )
    })?;
    if !host.up {
        return Err(mismatch(
            format!("host interface {host_name} is down"),
            "recreate the pod",
        ));
    }
    let routes = nl
        .main_routes()
        .map_err(io_error("cannot list node routes"))?;
    let host_route = link::has_host_route(&routes, host.index, expected.address.addr);
    if !host_route {
        return Err(mismatch(
            format!(
                "the node has no route {}/32 via {host_name}",
                expected.address.addr
            ),
            "recreate the pod",
        ));
    }

    let ifname = env.ifname.clone();
    netns
        .run(move || check_pod(&ifname, expected.address, gateway))
        .map_err(netns_error)??;

    // The daemon answers with its range's prefix; with ipam.subnet the pod's is the
    // subnet's, which the pod side checked above.
    match Daemon::new(conf.daemon_address).lookup(&env.container_id)? {
        Some(held) if held.addr == expected.address.addr => Ok(()),
        Some(held) => Err(mismatch(
            format!(
                "the weft daemon holds {held} for this container, not {}",
                expected.address
            ),
            "recreate the pod",
        )),
        None => Err(mismatch(
            format!(
                "the weft daemon holds no address for container {}",
                env.container_id
            ),
            format!(
                "{} may be handed to another pod; recreate this one",
                expected.address
            ),
        )),
    }
}

fn check_pod(ifname: &str, address: Cidr, gateway: Ipv4Addr) -> Result<(), CniError> {
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the container namespace"))?;
    let link = nl
        .link(ifname)
        .map_err(io_error(format!(
            "cannot look up {ifname} in the container"
        )))?
        .ok_or_else(|| {
            mismatch(
                format!("{ifname} is missing in the container"),
                "recreate the pod",
            )
        })?;
    if !link.up {
        return Err(mismatch(
            format!("{ifname} is down in the container"),
            "recreate the pod",
        ));
    }
    let addrs = nl
        .ipv4_addrs(link.index)
        .map_err(io_error(format!("cannot list addresses of {ifname}")))?;
    if !addrs.contains(&address) {
        let have: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        return Err(mismatch(
            format!("{ifname} does not have {address}"),
            format!("it has [{}]", have.join(", ")),
        ));
    }
    let routes = nl
        .main_routes()
        .map_err(io_error("cannot list container routes"))?;
    if !link::has_default_route(&routes, link.index, gateway) {
        return Err(mismatch(
            format!("the container has no default route via {gateway} on {ifname}"),
            "recreate the pod",
        ));
    }
    Ok(())
}

fn needs_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.version.supports_gc_and_status() {
        return Ok(());
    }
    Err(CniError::new(
        ErrorCode::IncompatibleVersion,
        format!("{command} is not defined for cniVersion {}", conf.version),
        format!("{command} needs cniVersion 1.1.0 or later"),
    ))
}

/// GC: frees what this node holds for attachments of this network that the runtime no
/// longer knows (`cni.dev/valid-attachments`), and removes their host veths.
///
/// Which allocations are the plugin's is told by their id: the plugin allocates under
/// `CNI_CONTAINERID`, so an id of the spec's container-id form is taken for one; any
/// other id (the node's own `weave:expose`, ids with `:`) is never touched. With
/// `ipam.subnet` only allocations inside it count as this network's. A container is
/// kept if it is listed under any interface name (weft gives a container one address).
/// Host veths (`vethwepl...` tagged with a container id) of freed containers go, and so
/// do those of unlisted containers that hold no address at all (leftovers of a DEL that
/// never came). Allocations the daemon marks tentative (an ADD under way) are left
/// alone. Errors do not stop the sweep; the first one is answered at the end.
pub fn gc(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1(conf, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            ErrorCode::InvalidConfig,
            "GC needs cni.dev/valid-attachments",
            "the runtime must list the attachments still in use; without the list nothing is freed",
        )
    })?;
    let keep: HashSet<&str> = valid.iter().map(|a| a.container_id.as_str()).collect();
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the node namespace"))?;
    // Links before allocations: an ADD allocates before it creates its veth, so a veth
    // seen here whose container holds nothing in the list taken next is no ADD under way.
    let veths: Vec<(String, String)> = nl
        .links()
        .map_err(io_error("cannot list the node's interfaces"))?
        .into_iter()
        .filter(|l| l.name.starts_with(HOST_VETH_PREFIX))
        .filter_map(|l| {
            let id = l.alias?;
            (is_plugin_container_id(&id)
                && host_veth_name(&id) == l.name
                && !keep.contains(id.as_str()))
            .then_some((l.name, id))
        })
        .collect();
    let daemon = Daemon::new(conf.daemon_address);
    let held = daemon.held()?;
    let held_ids: HashSet<&str> = held.iter().map(|h| h.container_id.as_str()).collect();

    let mut first_error: Option<CniError> = None;
    let mut note = |e: CniError| {
        eprintln!("weft-cni: GC: {e}");
        first_error.get_or_insert(e);
    };
    for h in &held {
        let id = h.container_id.as_str();
        // A tentative address belongs to an ADD under way, which the runtime may not
        // list yet: its veth and address are that ADD's to keep or give back.
        if !is_plugin_container_id(id) || keep.contains(id) || h.tentative {
            continue;
        }
        if let Some(subnet) = conf.subnet {
            if !h.addrs.iter().any(|a| subnet.contains(a.addr)) {
                continue;
            }
        }
        let Ok(container_id) = ContainerId::parse(id) else {
            continue;
        };
        // As DEL: the veth (and its /32 route) before the address.
        if let Err(e) = remove_host_veth(&nl, id) {
            note(e);
            continue;
        }
        match daemon.release(&container_id) {
            Ok(()) => {
                let addrs: Vec<String> = h.addrs.iter().map(|a| a.to_string()).collect();
                eprintln!(
                    "weft-cni: GC: freed [{}] of container {id}: not among the runtime's valid attachments",
                    addrs.join(", ")
                );
            }
            Err(e) => note(e.into()),
        }
    }
    for (name, id) in &veths {
        if held_ids.contains(id.as_str()) {
            continue;
        }
        match remove_host_veth(&nl, id) {
            Ok(()) => eprintln!(
                "weft-cni: GC: removed {name} of container {id}: it holds no address and is not among the runtime's valid attachments"
            ),
            Err(e) => note(e),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Deletes the container's host veth if it is there and tagged as its own.
fn remove_host_veth(nl: &Netlink, container_id: &str) -> Result<(), CniError> {
    let name = host_veth_name(container_id);
    match own_host_veth(nl, &name, container_id) {
        Ok(Some(l)) => nl
            .delete(l.index)
            .map(|_| ())
            .map_err(io_error(format!("cannot delete {name}"))),
        Ok(None) => Ok(()),
        // Another container's interface (a hash collision): not ours to remove.
        Err(e) if e.code == ErrorCode::NameCollision => Ok(()),
        Err(e) => Err(e),
    }
}

/// STATUS: ready when the daemon answers `GET /status` with 200 and the overlay
/// interface has its address (what ADD needs); otherwise code 50.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    needs_1_1(conf, "STATUS")?;
    let addr = conf.daemon_address;
    let unavailable =
        |msg: String, details: String| CniError::new(ErrorCode::Unavailable, msg, details);
    match client::readiness(addr) {
        Readiness::Ready => {}
        Readiness::NotReady(why) => {
            return Err(unavailable(
                format!("the weft daemon at {addr} is not ready"),
                format!("{why}; it cannot allocate pod addresses until it is (see `weft status`)"),
            ))
        }
        Readiness::Unreachable(why) => {
            return Err(unavailable(
                format!("the weft daemon at {addr} is not running"),
                format!("{why}; check that the weft router runs on this node"),
            ))
        }
    }
    let nl = Netlink::new().map_err(io_error("cannot open netlink in the node namespace"))?;
    overlay(&nl).map_err(|e| {
        if e.code == ErrorCode::TryAgainLater {
            unavailable(e.msg, e.details)
        } else {
            e
        }
    })?;
    Ok(())
}
