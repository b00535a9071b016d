//! The contract between the weft daemon and the programs that talk to it on the same node:
//! the CNI plugin, the CLI and the test harness. Each fact lives here once, so the two
//! sides cannot drift apart: how a container id looks, where the API listens and what its
//! paths and status codes mean, how pod interfaces are named and tagged, the name of the
//! overlay interface, and the one HTTP client all of them use.

mod client;
mod container_id;
mod http;
mod names;

pub use client::{Answer, Client, ClientError, Method};
pub use container_id::{BadContainerId, ContainerId, MAX_CONTAINER_ID_LEN};
pub use http::{paths, IpStatus, DEFAULT_HTTP_ADDR, DEFAULT_METRICS_ADDR};
pub use names::{host_veth_name, EXPOSE_ID, HOST_VETH_PREFIX, TUN_NAME};
