//! weft: a user-space overlay network for Kubernetes, compatible with Weave Net.
//!
//! Layout: `core` is pure (no sockets, no clock, no syscalls) and holds every decision;
//! `io` holds thin adapters; `datapath` holds the forwarding backends; `router` wires the
//! daemon together; `api` serves HTTP and metrics; `demo` builds a local cluster in network
//! namespaces with the `weft-testbed` crate.

pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod datapath;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod install;
pub mod io;
pub mod k8s;
pub mod policy;
pub mod router;
