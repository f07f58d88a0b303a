//! The single integration-test binary (`cargo test --test it`).

mod alerts;
mod cli;
mod clock;
mod cluster;
mod consume;
mod crash;
mod dashboard;
mod dead;
mod dedup;
mod deploy;
mod docs;
mod failover;
mod fast_paths;
mod first_hour;
mod harness_selftest;
mod housekeeping;
mod http;
mod malformed;
mod memory;
mod model;
mod order;
mod redelivery;
mod security;
mod seed;
mod silence;
mod status;
