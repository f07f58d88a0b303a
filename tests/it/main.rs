//! The single integration-test binary (`cargo test --test it`).

mod harness;
mod harness_selftest;

mod cli;
mod malformed;
mod seed;
