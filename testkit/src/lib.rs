//! tidemark's test and bench harness (dev-only, not published), shared by
//! the integration tests (`tests/it`) and the bench (`benches/tidemark`):
//! private `redis-server` processes (and a local Redis Cluster of them, or
//! a Sentinel-managed master and replica), a TCP proxy for failovers and
//! silent servers, the `tidemark` binary, waiting with deadlines, key
//! names and stream helpers.
//!
//! Every test gets its own Redis on a free port with its own data
//! directory, so tests run in parallel without sharing state; integration
//! tests never mock Redis.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod process;
pub mod proxy;
pub mod sentinel;
pub mod server;
pub mod streams;
pub mod wait;

pub use cluster::RedisCluster;
pub use process::{
    bin_path, describe, free_port, get, http_get, metric, process_cpu, read_file, repo_dir, run_cli, Daemon,
};
pub use proxy::Proxy;
pub use sentinel::{MasterLookup, Passwords, SentinelOptions, SentinelSet, TlsFiles};
pub use server::{RedisOptions, RedisServer};
pub use streams::*;
pub use tidemark::store::Keys;
pub use wait::{wait_until, wait_until_async};
