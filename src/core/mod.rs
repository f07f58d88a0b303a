//! Pure logic with no I/O and no clock: input parsing, payload encoding,
//! stream entry ids, watermark rules, Redis fault classes and the retry
//! policy.

pub mod backoff;
pub mod codec;
pub mod entry_id;
pub mod fault;
pub mod json;
pub mod op;
pub mod route;
pub mod watermark;

pub use entry_id::EntryId;
pub use fault::{Fault, RetryPolicy};
pub use op::{Limits, Op, Reason, Rejection};
pub use watermark::{Timestamp, Watermark, TS_MAX, TS_MIN};
