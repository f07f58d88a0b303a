//! tidemark: releases timestamped elements into a Redis stream once a
//! watermark has reached their timestamp. See DESIGN.md for the contract.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod consume;
pub mod core;
pub mod daemon;
pub mod dead;
pub mod health;
pub mod http;
pub mod metrics;
pub mod produce;
pub mod repartition;
pub mod store;
