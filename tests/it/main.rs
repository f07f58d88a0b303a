//! The single integration-test binary (`cargo test --test it`).

mod harness;
mod harness_selftest;

mod cli;
mod crash;
mod malformed;
mod model;
mod order;
mod redelivery;
mod seed;
