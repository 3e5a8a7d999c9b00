//! h3gate: HTTP/3 (QUIC) edge proxy and load balancer for HTTP/1.1 services.
//!
//! The library holds everything but the command line, so unit tests, fuzz targets and the
//! simulation can drive the sans-IO pieces directly. See docs/ARCHITECTURE.md.

pub mod backend;
pub mod budget;
pub mod cid;
pub mod cmsg;
pub mod config;
pub mod core;
pub mod diag;
pub mod frontend;
pub mod http1;
pub mod initial;
pub mod logger;
pub mod metrics;
pub mod notify;
pub mod privdrop;
pub mod request;
pub mod ring;
pub mod stream;
pub mod table;
pub mod tickets;
pub mod token;
pub mod worker;
