//! Lease locks (`lock.lua`) and the daemon registry (`registry.lua`).

use std::time::Duration;

use super::Scripts;
use crate::store::{Conn, StoreError};

impl Scripts {
    /// The lease lock `key`: takes it if free or extends it if `token`
    /// holds it (`Some(ttl)`), or releases it if `token` holds it
    /// (`None`). Returns whether `token` holds (or held) it.
    pub async fn lock(
        &self,
        conn: &mut Conn,
        key: &str,
        token: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, StoreError> {
        let ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let held: i64 = self.sources.lock.key(key).arg(token).arg(ms).invoke_async(conn).await?;
        Ok(held == 1)
    }

    /// Registers daemon `name` in the registry `key` for `ttl` (or removes
    /// it, with `None`), drops registrations that expired, and returns the
    /// names of the live daemons, sorted.
    pub async fn register(
        &self,
        conn: &mut Conn,
        key: &str,
        name: &str,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>, StoreError> {
        let ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        let mut live: Vec<String> = self.sources.registry.key(key).arg(name).arg(ms).invoke_async(conn).await?;
        live.sort();
        Ok(live)
    }
}
