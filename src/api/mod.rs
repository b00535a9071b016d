//! The HTTP API (Weave's paths on 127.0.0.1:6784), Prometheus metrics, and the
//! human-readable status pages.

pub mod assemble;
pub mod http;
pub mod metrics;
pub mod report;
pub mod status;
pub mod telemetry;
pub mod template;
