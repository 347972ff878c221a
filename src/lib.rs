//! flagsmith-sse: Flagsmith's real-time flag updates over server-sent events.
//!
//! Flagsmith's task processor POSTs "environment X changed at time T"; every SDK subscribed to
//! X gets that time as an `environment_updated` event, on whichever instance it is connected
//! to. One thread runs a mio event loop over all sockets; a helper thread talks to the store
//! (Redis, or an embedded in-memory one). `docs/ARCHITECTURE.md` explains how the pieces meet.

#![deny(missing_docs, rust_2018_idioms)]

pub mod config;
pub mod conn;
pub mod http;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod slab;
pub mod sse;
pub mod store;
pub mod sys;
pub mod timestamp;

pub use config::Config;
pub use server::Server;
