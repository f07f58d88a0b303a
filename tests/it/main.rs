//! The single integration-test binary (`cargo test --test it`).

mod cli;
mod clock;
mod consume;
mod crash;
mod dead;
mod harness;
mod harness_selftest;
mod housekeeping;
mod malformed;
mod model;
mod order;
mod redelivery;
mod seed;
mod status;
