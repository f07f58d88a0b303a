//! Redis Sentinel: what a `redis+sentinel://` URL names (parsed without
//! I/O), and asking the Sentinels which server is the master now.
//!
//! A failover is followed in two ways. Every (re)connect asks all the
//! Sentinels and takes the answer with the highest configuration epoch (a
//! Sentinel that has not heard of the latest failover yet names the old
//! master, which still answers as a master until Sentinel reconfigures it,
//! some 8 s later: redis-rs's own lookup, which takes the first Sentinel
//! that answers, can land there). And a subscription to `+switch-master`
//! on every Sentinel marks every connection opened before a failover as
//! stale ([`Epoch`]): its next command fails with `READONLY`, and its user
//! reconnects, as it does when its server turns into a replica or goes
//! away.

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use futures::future::join_all;
use futures::StreamExt;
use percent_encoding::percent_decode_str;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, TlsCertificates};
use tokio::sync::watch;
use tracing::{debug, info};

use super::StoreError;

/// The Sentinels' port when a URL gives none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;

/// A parsed `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER[/db]`
/// (or `rediss+sentinel://`, TLS to the Sentinels and to the data nodes).
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel://`: TLS everywhere.
    pub tls: bool,
    /// The Sentinels, in the order given (asked in that order).
    pub sentinels: Vec<(String, u16)>,
    /// The name the Sentinels monitor the master under.
    pub master: String,
    /// The database on the data nodes.
    pub db: i64,
    /// The data nodes' ACL user, if any.
    pub username: Option<String>,
    /// The data nodes' password, if any.
    pub password: Option<String>,
}

impl std::fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SentinelUrl {
    /// Whether `url` has a Sentinel scheme.
    pub fn is_sentinel(url: &str) -> bool {
        scheme(url).is_some()
    }

    /// Parses a Sentinel URL. The message says what is wrong and never
    /// holds the password.
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
        let (tls, rest) = scheme(url).ok_or("the scheme is not redis+sentinel:// or rediss+sentinel://")?;
        if rest.contains(['?', '#']) {
            return Err("query strings and fragments are not supported in a Sentinel URL".into());
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, pass) = match u.split_once(':') {
                    Some((user, pass)) => (user, Some(pass)),
                    None => (u, None),
                };
                let user = decode(user, "the user name")?;
                let pass = pass.map(|p| decode(p, "the password")).transpose()?;
                (Some(user).filter(|u| !u.is_empty()), pass.filter(|p| !p.is_empty()))
            }
        };
        let sentinels = hosts.split(',').map(host_port).collect::<Result<Vec<_>, _>>()?;
        let (master, db) = match path.split_once('/') {
            Some((m, db)) => (m, db.trim_end_matches('/')),
            None => (path, ""),
        };
        let master = decode(master, "the master name")?;
        if master.is_empty() {
            return Err("no master name: the path must be /MASTER_NAME (the name the Sentinels monitor)".into());
        }
        let db = match db {
            "" => 0,
            n => n.parse::<i64>().ok().filter(|d| *d >= 0).ok_or(format!("database {n:?} is not a number"))?,
        };
        Ok(SentinelUrl { tls, sentinels, master, db, username, password })
    }
}

/// `Some((tls, rest after "://"))` for the two Sentinel schemes.
fn scheme(url: &str) -> Option<(bool, &str)> {
    let (scheme, rest) = url.trim().split_once("://")?;
    match scheme.to_ascii_lowercase().as_str() {
        "redis+sentinel" => Some((false, rest)),
        "rediss+sentinel" => Some((true, rest)),
        _ => None,
    }
}

fn decode(text: &str, what: &str) -> Result<String, String> {
    percent_decode_str(text).decode_utf8().map(|s| s.into_owned()).map_err(|_| format!("{what} is not valid UTF-8"))
}

/// `host`, `host:port` or `[v6]:port`.
fn host_port(text: &str) -> Result<(String, u16), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("an empty Sentinel address (a stray comma, or no host at all)".into());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(format!("{text:?}: unclosed [ of an IPv6 address"))?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or(format!("{text:?}: expected :PORT after ]"))?)),
        }
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() || (host.contains([':', '/', '@']) && !text.starts_with('[')) {
        return Err(format!("{text:?} is not HOST:PORT"));
    }
    let port = match port {
        None => DEFAULT_SENTINEL_PORT,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("{text:?}: port {p:?} is not a number"))?,
    };
    Ok((host.to_owned(), port))
}

/// Where the master is and when that changes (see the module docs).
/// Shared by the clones of an endpoint.
pub(super) struct Sentinels {
    /// A client per Sentinel (its password and TLS applied), in order.
    clients: Vec<Client>,
    /// The monitored name.
    master: String,
    /// Bumped on every `+switch-master` of our master that a Sentinel
    /// announces: connections opened before are stale.
    epoch: watch::Sender<u64>,
    /// The watchers, started with the first lookup (a runtime is needed).
    watching: OnceLock<()>,
    /// The address found last, to log when it changes.
    last: std::sync::Mutex<Option<String>>,
}

/// A connection's view of the master's epoch: stale once a Sentinel
/// announced a failover after the connection was opened.
#[derive(Clone)]
pub struct Epoch {
    /// The Sentinels' epoch.
    rx: watch::Receiver<u64>,
    /// Its value when the connection was opened.
    born: u64,
}

impl Epoch {
    /// Whether a failover was announced since.
    pub fn stale(&self) -> bool {
        *self.rx.borrow() != self.born
    }

    /// Returns once a failover is announced (never if the Sentinels'
    /// watcher is gone).
    pub async fn changed(&self) {
        let mut rx = self.rx.clone();
        if rx.wait_for(|e| *e != self.born).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The error a stale connection answers with: `READONLY`, so that its
    /// user reconnects at a failover's pace.
    pub fn error() -> redis::RedisError {
        redis::parse_redis_value(
            b"-READONLY the Sentinels moved the master (+switch-master): reconnecting to the new master\r\n",
        )
        .and_then(|v| v.extract_error().map(|_| ()))
        .expect_err("an error reply")
    }
}

impl Sentinels {
    /// The Sentinels of `url`, authenticating with `sentinel_password` and
    /// trusting `certs` (TLS) if given.
    pub(super) fn new(
        url: &SentinelUrl,
        sentinel_password: Option<&str>,
        certs: Option<&TlsCertificates>,
    ) -> Result<Sentinels, redis::RedisError> {
        let mut settings = RedisConnectionInfo::default();
        if let Some(p) = sentinel_password {
            settings = settings.set_password(p);
        }
        let clients = url
            .sentinels
            .iter()
            .map(|(host, port)| {
                let addr = match url.tls {
                    false => ConnectionAddr::Tcp(host.clone(), *port),
                    true => {
                        ConnectionAddr::TcpTls { host: host.clone(), port: *port, insecure: false, tls_params: None }
                    }
                };
                let info =
                    "redis://127.0.0.1".into_connection_info()?.set_addr(addr).set_redis_settings(settings.clone());
                match certs {
                    Some(certs) if url.tls => Client::build_with_tls(info, certs.clone()),
                    _ => Client::open(info),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Sentinels {
            clients,
            master: url.master.clone(),
            epoch: watch::Sender::new(0),
            watching: OnceLock::new(),
            last: Default::default(),
        })
    }

    /// The monitored name.
    pub(super) fn name(&self) -> &str {
        &self.master
    }

    /// The current epoch, for a connection opened now.
    pub(super) fn epoch(&self) -> Epoch {
        let rx = self.epoch.subscribe();
        let born = *rx.borrow();
        Epoch { rx, born }
    }

    /// The master's address: every Sentinel is asked at once (within
    /// `limit`) and the answer with the highest configuration epoch wins,
    /// so a Sentinel that has not heard of the latest failover yet is
    /// outvoted. Masters a Sentinel sees as down are left out.
    pub(super) async fn master(self: &Arc<Self>, limit: Duration) -> Result<(String, u16), StoreError> {
        self.watching.get_or_init(|| self.watch());
        let asks = self.clients.iter().map(|client| async move {
            let config =
                AsyncConnectionConfig::new().set_connection_timeout(Some(limit)).set_response_timeout(Some(limit));
            let ask = async {
                let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(&self.master)
                    .query_async::<HashMap<String, String>>(&mut conn)
                    .await
            };
            tokio::time::timeout(limit, ask).await.unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from a Sentinel",
                )))
            })
        });
        let mut best: Option<(u64, String, u16)> = None;
        let (mut answered, mut last_error) = (false, None);
        for answer in join_all(asks).await {
            match answer {
                Ok(info) => {
                    answered = true;
                    let Some((epoch, host, port)) = usable(&info) else { continue };
                    if best.as_ref().is_none_or(|(e, ..)| epoch > *e) {
                        best = Some((epoch, host, port));
                    }
                }
                Err(e) => last_error = Some(e),
            }
        }
        let Some((_, host, port)) = best else {
            return Err(StoreError::Sentinel(match last_error {
                // No Sentinel could be asked (or all refused us).
                Some(e) if !answered => e,
                _ => redis::RedisError::from((
                    redis::ErrorKind::MasterNameNotFoundBySentinel,
                    "no Sentinel names a master that is up (a failover in progress?)",
                    self.master.clone(),
                )),
            }));
        };
        let addr = format!("{host}:{port}");
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match last.as_deref() {
            Some(before) if before == addr => {}
            Some(before) => {
                info!(master = %self.master, from = %before, to = %addr, "Sentinel: the master moved (failover)")
            }
            None => info!(master = %self.master, addr = %addr, "Sentinel: found the master"),
        }
        *last = Some(addr);
        Ok((host, port))
    }

    /// Starts one watcher per Sentinel: a subscription to `+switch-master`
    /// that bumps the epoch when our master moves, so every connection
    /// opened before reconnects at once rather than when Sentinel turns
    /// the old master into a replica (seconds later; until then it takes
    /// writes that the failover discards).
    fn watch(self: &Arc<Self>) {
        for client in self.clients.clone() {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let result: redis::RedisResult<()> = async {
                        let mut pubsub = tokio::time::timeout(Duration::from_secs(5), client.get_async_pubsub())
                            .await
                            .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
                        pubsub.subscribe("+switch-master").await?;
                        let mut messages = pubsub.into_on_message();
                        loop {
                            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
                            let Some(sentinels) = me.upgrade() else { return Ok(()) };
                            match next {
                                Err(_) => continue,
                                Ok(None) => return Ok(()),
                                Ok(Some(msg)) => {
                                    let text: String = msg.get_payload().unwrap_or_default();
                                    if text.split(' ').next() == Some(sentinels.master.as_str()) {
                                        info!(master = %sentinels.master, switch = %text, "Sentinel announced a failover: reconnecting");
                                        sentinels.epoch.send_modify(|e| *e += 1);
                                    }
                                }
                            }
                        }
                    }
                    .await;
                    if let Err(e) = result {
                        debug!(error = %e, "Sentinel watcher: reconnecting");
                    }
                    if me.strong_count() == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
    }
}

/// The epoch, host and port of a `SENTINEL MASTER` reply, unless the
/// master is down (or the reply incomplete).
fn usable(info: &HashMap<String, String>) -> Option<(u64, String, u16)> {
    let flags = info.get("flags")?;
    if !flags.split(',').any(|f| f == "master") || flags.contains("s_down") || flags.contains("o_down") {
        return None;
    }
    let epoch = info.get("config-epoch").and_then(|e| e.parse().ok()).unwrap_or(0);
    Some((epoch, info.get("ip")?.clone(), info.get("port")?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_design_s_form() {
        let u =
            SentinelUrl::parse("redis+sentinel://app:s%40cret@10.0.0.1:26379,10.0.0.2,[::1]:5000/mymaster/2").unwrap();
        assert!(!u.tls);
        assert_eq!(
            u.sentinels,
            [("10.0.0.1".to_owned(), 26379), ("10.0.0.2".to_owned(), DEFAULT_SENTINEL_PORT), ("::1".to_owned(), 5000)]
        );
        assert_eq!((u.master.as_str(), u.db), ("mymaster", 2));
        assert_eq!((u.username.as_deref(), u.password.as_deref()), (Some("app"), Some("s@cret")));
        assert!(!format!("{u:?}").contains("cret"), "the password never shows in Debug");

        let u = SentinelUrl::parse("rediss+sentinel://:pw@s1:1/m").unwrap();
        assert!(u.tls);
        assert_eq!((u.username, u.password.as_deref(), u.db), (None, Some("pw"), 0));
        let u = SentinelUrl::parse("REDIS+SENTINEL://s1/m/").unwrap();
        assert_eq!((u.master.as_str(), u.db, u.password), ("m", 0, None));
        assert!(SentinelUrl::is_sentinel("redis+sentinel://x/m"));
        assert!(!SentinelUrl::is_sentinel("redis://x:1"));
    }

    #[test]
    fn bad_urls_say_what_is_wrong_without_the_password() {
        for (url, says) in [
            ("redis+sentinel://s1:1", "no master name"),
            ("redis+sentinel://s1:1/", "no master name"),
            ("redis+sentinel://u:secret@s1:1,/m", "empty Sentinel address"),
            ("redis+sentinel://u:secret@s1:port/m", "port \"port\""),
            ("redis+sentinel://s1:1/m/x", "database \"x\""),
            ("redis+sentinel://s1:1/m?db=1", "query strings"),
            ("redis+sentinel://[::1:1/m", "unclosed ["),
            ("redis+sentinel://s1:0/m", "port \"0\""),
            ("redis://s1:1/m", "scheme"),
        ] {
            let e = SentinelUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: {e}");
        }
    }
}
