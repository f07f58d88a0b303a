//! Redis's memory limit as it matters to tidemark (`INFO memory`, which the
//! least-privilege ACL allows, unlike `CONFIG GET`): the eviction policy,
//! since any policy but `noeviction` lets Redis silently drop scheduled
//! elements, their payloads or whole streams when it is full; and how full
//! it is.

use super::{Conn, StoreError};

/// What `INFO memory` says about the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    /// `maxmemory_policy`, e.g. `noeviction` or `allkeys-lru`.
    pub policy: String,
    /// `maxmemory` in bytes (0: no limit).
    pub max: u64,
    /// `used_memory` in bytes.
    pub used: u64,
}

impl Memory {
    /// Reads the fields from an `INFO memory` reply.
    pub fn parse(info: &str) -> Option<Memory> {
        let field = |name: &str| {
            info.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':'))).map(str::trim)
        };
        Some(Memory {
            policy: field("maxmemory_policy")?.to_owned(),
            max: field("maxmemory")?.parse().ok()?,
            used: field("used_memory")?.parse().ok()?,
        })
    }

    /// Whether Redis evicts keys when full: anything but `noeviction`
    /// (`volatile-*` policies only evict keys with a lifetime, which for
    /// tidemark are the leases and locks; `allkeys-*` any key).
    pub fn evicting(&self) -> bool {
        self.policy != "noeviction"
    }

    /// Over 90% of a configured limit.
    pub fn nearly_full(&self) -> bool {
        self.max > 0 && self.used >= self.max / 10 * 9
    }
}

/// `INFO memory` of the server that serves `key`.
pub async fn read(conn: &mut Conn, key: &str) -> Result<Memory, StoreError> {
    let info: String = conn.query_at(key, redis::cmd("INFO").arg("memory")).await?;
    Memory::parse(&info).ok_or_else(|| StoreError::Reply("INFO memory lacks maxmemory_policy or maxmemory".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limit_and_the_policy() {
        let info = "# Memory\r\nused_memory:1000\r\nused_memory_human:1000B\r\nmaxmemory:2000\r\n\
                    maxmemory_human:2K\r\nmaxmemory_policy:allkeys-lru\r\n";
        let m = Memory::parse(info).unwrap();
        assert_eq!(m, Memory { policy: "allkeys-lru".into(), max: 2000, used: 1000 });
        assert!(m.evicting() && !m.nearly_full());
        let full = Memory { policy: "noeviction".into(), max: 2000, used: 1900 };
        assert!(!full.evicting() && full.nearly_full());
        assert!(!Memory { policy: "noeviction".into(), max: 0, used: 1 << 40 }.nearly_full(), "no limit");
        assert_eq!(Memory::parse("# Memory\r\nused_memory:1\r\n"), None);
    }
}
