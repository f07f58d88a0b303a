//! The store's one error type and its classification into [`Fault`]s.

use crate::core::Fault;

/// Errors from Redis I/O.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A Redis command or connection failed. Credential and permission
    /// errors carry a hint saying what to check.
    #[error("redis: {0}{hint}", hint = credentials_hint(.0))]
    Redis(#[from] redis::RedisError),
    /// Redis answered something we could not decode.
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
    /// The server is older than [`super::MIN_REDIS`].
    #[error("redis {0} is too old: tidemark needs Redis >= 6.2 (XAUTOCLAIM, ZRANGE BYSCORE)")]
    TooOld(String),
    /// A request Redis cannot satisfy as asked, e.g. an unknown dead-letter
    /// id. The message is for the user.
    #[error("{0}")]
    Rejected(String),
    /// The namespace's layout disagrees with the configuration.
    #[error(transparent)]
    Layout(#[from] super::LayoutError),
    /// This daemon no longer owns the partition it was working on.
    #[error("this daemon no longer owns partition {0}")]
    Deposed(u16),
    /// Asking the Sentinels for the master failed.
    #[error("Sentinel: {0}{hint}", hint = sentinel_hint(.0))]
    Sentinel(redis::RedisError),
}

impl StoreError {
    /// An I/O error of `kind` saying `what` (a closed subscription, a
    /// deadline of our own).
    pub fn io(kind: std::io::ErrorKind, what: &'static str) -> StoreError {
        StoreError::Redis(redis::RedisError::from(std::io::Error::new(kind, what)))
    }

    /// `READONLY`: the server is a replica now (we found out ourselves).
    pub fn replica() -> StoreError {
        let e = redis::parse_redis_value(b"-READONLY the server is a replica now (failover): reconnecting\r\n")
            .and_then(|v| v.extract_error().map(|_| ()))
            .expect_err("an error reply");
        StoreError::Redis(e)
    }

    /// The class of the failure, which decides the log line, the `/readyz`
    /// reason, the metric label and the retry pace.
    pub fn fault(&self) -> Fault {
        let (StoreError::Redis(e) | StoreError::Sentinel(e)) = self else { return Fault::Other };
        if e.kind() == redis::ErrorKind::AuthenticationFailed {
            return Fault::Auth;
        }
        if e.is_timeout() {
            return Fault::Unresponsive;
        }
        // During a failover the Sentinels may name no usable master for a
        // moment (it is down, or not yet promoted).
        if matches!(
            e.kind(),
            redis::ErrorKind::MasterNameNotFoundBySentinel | redis::ErrorKind::NoValidReplicasFoundBySentinel
        ) {
            return Fault::ClusterDown;
        }
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            return Fault::Disconnected;
        }
        // The most telling of the server's codes (a pipeline may carry several).
        let detail = e.detail().unwrap_or_default();
        server_codes(e)
            .iter()
            .map(|code| Fault::from_server(code, detail))
            .min_by_key(|f| match f {
                f if f.is_fatal() => 0,
                Fault::Other => 2,
                _ => 1,
            })
            .unwrap_or(Fault::Other)
    }

    /// The connection is gone or unusable: reconnect and retry.
    pub fn is_connection(&self) -> bool {
        matches!(self.fault(), Fault::Disconnected | Fault::Unresponsive | Fault::Loading)
    }

    /// Retrying cannot help (wrong or missing password, an ACL user without
    /// a permission we need, server too old, bad URL).
    pub fn is_fatal(&self) -> bool {
        match self {
            StoreError::Redis(e) | StoreError::Sentinel(e) if e.kind() == redis::ErrorKind::InvalidClientConfig => true,
            StoreError::TooOld(_) | StoreError::Layout(super::LayoutError::Mismatch { .. }) => true,
            // A repartition under way ends: long-running processes wait.
            StoreError::Layout(super::LayoutError::Repartitioning { .. }) => false,
            _ => self.fault().is_fatal(),
        }
    }
}

/// The server's error codes in `e`: its own, or those of each failed
/// command of a pipeline (where `RedisError::code` sees none).
fn server_codes(e: &redis::RedisError) -> Vec<String> {
    match e.clone().into_server_errors() {
        Some(errors) => errors.iter().map(|(_, err)| err.code().to_owned()).collect(),
        None => e.code().map(str::to_owned).into_iter().collect(),
    }
}

/// What to check when the Sentinels refuse our credentials.
fn sentinel_hint(e: &redis::RedisError) -> &'static str {
    let codes = server_codes(e);
    if e.kind() == redis::ErrorKind::AuthenticationFailed || codes.iter().any(|c| c == "WRONGPASS" || c == "NOAUTH") {
        " (the Sentinels refused the password: check redis.sentinel_password or REDIS_SENTINEL_PASSWORD)"
    } else {
        ""
    }
}

/// What the operator should check when Redis refuses our credentials or
/// permissions (empty for every other error).
fn credentials_hint(e: &redis::RedisError) -> &'static str {
    let codes = server_codes(e);
    let has = |code: &str| codes.iter().any(|c| c == code);
    if e.kind() == redis::ErrorKind::AuthenticationFailed || has("WRONGPASS") {
        " (wrong user name or password: check redis.url, redis.password_file or REDIS_PASSWORD)"
    } else if has("NOAUTH") {
        " (Redis requires a password: give it in redis.url, redis.password_file or REDIS_PASSWORD)"
    } else if has("NOPERM") {
        " (the Redis ACL user lacks a permission tidemark needs: see the README, section Security)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> StoreError {
        let e: redis::RedisError = redis::parse_redis_value(format!("-{code} {detail}\r\n").as_bytes())
            .map(|v| v.extract_error().unwrap_err())
            .unwrap_or_else(|e| e);
        StoreError::Redis(e)
    }

    #[test]
    fn client_errors_are_classified() {
        let dropped = StoreError::io(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(dropped.fault(), Fault::Disconnected);
        assert!(dropped.is_connection() && !dropped.is_fatal());
        let slow = StoreError::io(std::io::ErrorKind::TimedOut, "no answer");
        assert_eq!(slow.fault(), Fault::Unresponsive);
        assert_eq!(StoreError::Reply("?".into()).fault(), Fault::Other);
        assert!(StoreError::TooOld("6.0.0".into()).is_fatal());
    }

    #[test]
    fn server_errors_are_classified() {
        assert_eq!(server("OOM", "command not allowed when used memory > 'maxmemory'.").fault(), Fault::OutOfMemory);
        assert_eq!(server("READONLY", "You can't write against a read only replica.").fault(), Fault::ReadOnly);
        assert_eq!(server("LOADING", "Redis is loading the dataset in memory").fault(), Fault::Loading);
        let wrongpass = server("WRONGPASS", "invalid username-password pair or user is disabled.");
        assert_eq!(wrongpass.fault(), Fault::Auth);
        assert!(wrongpass.is_fatal());
        assert!(wrongpass.to_string().contains("check redis.url"), "{wrongpass}");
        assert!(!server("BUSY", "Redis is busy running a script.").is_fatal());
    }
}
