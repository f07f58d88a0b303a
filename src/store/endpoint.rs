//! How to reach Redis: one server, or a Redis Cluster found from any of its
//! nodes. The one place where connections are opened.
//!
//! - [`Conn`]: the connection commands and scripts go on. For one server a
//!   multiplexed connection; for a cluster, redis-rs's cluster connection,
//!   which routes each command by its first key (every script's keys share
//!   one slot), follows `MOVED`/`ASK` and refreshes its slot map.
//! - [`Endpoint::reader`]: a connection of its own for blocking reads of one
//!   stream, to the node that serves the stream's slot (a blocking read on
//!   the shared connection would hold up everything behind it). A reader
//!   that meets `MOVED` is dropped and opened again, which finds the new
//!   node.
//! - With `redis+sentinel://`, the Sentinels are asked for the master on
//!   every connect ([`Endpoint::sentinel`]), so a reconnect after a
//!   failover finds the new master.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisFuture,
    TlsCertificates, Value,
};

use super::reader::StreamReader;
use super::sentinel::{Epoch, SentinelUrl, Sentinels};
use super::{ConnectOptions, StoreError};
use crate::core::route::key_slot;

/// Which kind of deployment `redis.url` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ask the server (`INFO cluster`).
    Auto,
    /// One server (or a Sentinel-managed master).
    Standalone,
    /// A Redis Cluster; the URL names any node.
    Cluster,
}

/// A connection commands and scripts are sent on. Clones share it.
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(MultiplexedConnection),
    /// A cluster: each command goes to the node of its first key's slot.
    Cluster(ClusterConnection),
    /// The master the Sentinels named when it was opened: once they
    /// announce a failover, every command fails with `READONLY` (so its
    /// user reconnects, finding the new master) instead of going to a
    /// server that is about to become a replica.
    Followed(MultiplexedConnection, Epoch),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Followed(_, epoch) if epoch.stale() => Box::pin(async { Err(Epoch::error()) }),
            Conn::Followed(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Followed(_, epoch) if epoch.stale() => Box::pin(async { Err(Epoch::error()) }),
            Conn::Followed(c, _) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) | Conn::Followed(c, _) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Runs a keyless command (`INFO`, `TIME`, `CONFIG GET`) on the master
    /// that serves `key`, so that its answer is about the node that holds
    /// that key's data.
    pub async fn query_at<T: redis::FromRedisValue>(&mut self, key: &str, cmd: &redis::Cmd) -> Result<T, StoreError> {
        match self {
            Conn::Single(_) | Conn::Followed(..) => Ok(cmd.query_async(self).await?),
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::new(key_slot(key.as_bytes()), SlotAddr::Master);
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                let value = c.route_command(cmd.clone(), routing).await?;
                redis::from_redis_value(value).map_err(|e| StoreError::Reply(e.to_string()))
            }
        }
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// How to reach Redis (see the module docs). Cheap to clone; clones share
/// what was learnt about the deployment.
#[derive(Clone)]
pub struct Endpoint {
    /// The configured node (password and database applied). With
    /// Sentinel, the data nodes' credentials and database on the first
    /// Sentinel's address: a template, never connected to.
    client: Client,
    /// Custom TLS material (`redis.tls_*`), for the cluster's nodes too.
    certs: Option<TlsCertificates>,
    /// As configured.
    mode: Mode,
    /// Timeouts.
    opts: ConnectOptions,
    /// The deployment's kind once known, and the cluster client.
    learnt: Arc<Mutex<Option<Learnt>>>,
    /// A cluster's nodes as last seen (`host`, `port`): seeds for new
    /// connections beside the configured node, so that they still find
    /// the cluster when that node is down.
    nodes: Arc<Mutex<Vec<(String, u16)>>>,
    /// `redis+sentinel://`: who names the master.
    sentinels: Option<Arc<Sentinels>>,
}

#[derive(Clone)]
enum Learnt {
    Standalone,
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.client.get_connection_info().addr().to_string())
            .field("mode", &self.mode)
            .field("sentinel_master", &self.sentinels.as_ref().map(|s| s.name().to_owned()))
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint for the server `client` points at (a cluster node, if
    /// `mode` says so or the server does).
    pub fn new(client: Client, certs: Option<TlsCertificates>, mode: Mode, opts: ConnectOptions) -> Self {
        let learnt = match mode {
            Mode::Standalone => Some(Learnt::Standalone),
            Mode::Auto | Mode::Cluster => None,
        };
        Endpoint {
            client,
            certs,
            mode,
            opts,
            learnt: Arc::new(Mutex::new(learnt)),
            nodes: Arc::default(),
            sentinels: None,
        }
    }

    /// An endpoint for the master that the Sentinels of `url` monitor
    /// (`redis+sentinel://`): every connect asks them which server it is.
    /// `sentinel_password` authenticates to the Sentinels; `certs` (TLS)
    /// is trusted by both the Sentinels' and the data nodes' connections.
    pub fn sentinel(
        url: &SentinelUrl,
        sentinel_password: Option<&str>,
        certs: Option<TlsCertificates>,
        opts: ConnectOptions,
    ) -> Result<Self, StoreError> {
        let sentinels = Sentinels::new(url, sentinel_password, certs.as_ref())?;
        let (host, port) = url.sentinels.first().cloned().ok_or_else(|| {
            StoreError::from(redis::RedisError::from((redis::ErrorKind::EmptySentinelList, "no Sentinel address")))
        })?;
        let addr = match url.tls {
            false => ConnectionAddr::Tcp(host, port),
            true => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
        };
        let mut settings = RedisConnectionInfo::default().set_db(url.db);
        if let Some(user) = &url.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &url.password {
            settings = settings.set_password(password);
        }
        let info = "redis://127.0.0.1".into_connection_info()?.set_addr(addr).set_redis_settings(settings);
        let client = match &certs {
            Some(certs) if url.tls => Client::build_with_tls(info, certs.clone())?,
            _ => Client::open(info)?,
        };
        Ok(Endpoint {
            client,
            certs,
            mode: Mode::Standalone,
            opts,
            learnt: Arc::new(Mutex::new(Some(Learnt::Standalone))),
            nodes: Arc::default(),
            sentinels: Some(Arc::new(sentinels)),
        })
    }

    /// The same endpoint with other timeouts.
    pub fn with_options(&self, opts: ConnectOptions) -> Self {
        Endpoint { opts, ..self.clone() }
    }

    /// The configured node's client (with Sentinel: a template holding the
    /// data nodes' credentials; connect through [`Endpoint::server`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the Sentinels name the master (`redis+sentinel://`).
    pub fn is_sentinel(&self) -> bool {
        self.sentinels.is_some()
    }

    /// A client for the server that commands without a key go to: the
    /// configured server, the master the Sentinels name now, or the
    /// configured node of a cluster.
    pub async fn server(&self) -> Result<Client, StoreError> {
        match &self.sentinels {
            Some(s) => {
                let (host, port) = s.master(self.opts.connect_timeout).await?;
                self.node_client(host, port)
            }
            None => Ok(self.client.clone()),
        }
    }

    /// With Sentinel, the master's epoch now, for a connection about to be
    /// opened (see [`Conn::Followed`]).
    fn epoch(&self) -> Option<Epoch> {
        self.sentinels.as_ref().map(|s| s.epoch())
    }

    /// The timeouts.
    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// Whether this is a cluster (asks the server on first use in `auto`
    /// mode).
    pub async fn is_cluster(&self) -> Result<bool, StoreError> {
        Ok(matches!(self.learn().await?, Learnt::Cluster(_)))
    }

    /// The cluster client, if this is a cluster (for rslock).
    pub async fn cluster_client(&self) -> Result<Option<ClusterClient>, StoreError> {
        Ok(match self.learn().await? {
            Learnt::Cluster(c) => Some(*c),
            Learnt::Standalone => None,
        })
    }

    async fn learn(&self) -> Result<Learnt, StoreError> {
        if let Some(l) = self.learnt.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Ok(l);
        }
        let cluster = match self.mode {
            Mode::Cluster => true,
            Mode::Standalone => false,
            Mode::Auto => {
                let mut c = single(&self.client, &self.opts, self.opts.response_timeout).await?;
                let info: String = redis::cmd("INFO").arg("cluster").query_async(&mut c).await?;
                info.lines().any(|l| l.trim() == "cluster_enabled:1")
            }
        };
        let learnt =
            if cluster { Learnt::Cluster(Box::new(self.cluster_builder()?.build()?)) } else { Learnt::Standalone };
        *self.learnt.lock().unwrap_or_else(PoisonError::into_inner) = Some(learnt.clone());
        Ok(learnt)
    }

    fn cluster_builder(&self) -> Result<ClusterClientBuilder, StoreError> {
        let configured = self.client.get_connection_info().clone();
        let mut seeds = vec![configured.clone()];
        for (host, port) in self.nodes.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            seeds.push(configured.clone().set_addr(self.node_addr(host.clone(), *port)));
        }
        let mut b = ClusterClientBuilder::new(seeds)
            .connection_timeout(self.opts.connect_timeout)
            .response_timeout(self.opts.response_timeout)
            // A failover or slot migration settles within seconds: retry
            // soon and a few times, then let the caller's policy take over.
            .retries(6)
            .min_retry_wait(50)
            .max_retry_wait(1000);
        if let Some(certs) = &self.certs {
            b = b.certs(certs.clone());
        }
        Ok(b)
    }

    /// A connection for commands and scripts whose replies time out after
    /// `response`.
    pub async fn connect(&self, response: Duration) -> Result<Conn, StoreError> {
        match self.learn().await? {
            Learnt::Standalone => {
                let epoch = self.epoch();
                let conn = single(&self.server().await?, &self.opts, response).await?;
                Ok(match epoch {
                    Some(epoch) => Conn::Followed(conn, epoch),
                    None => Conn::Single(conn),
                })
            }
            Learnt::Cluster(_) => {
                let client = self.cluster_builder()?.response_timeout(response).build()?;
                let mut conn = tokio::time::timeout(self.opts.connect_timeout * 2, client.get_async_connection())
                    .await
                    .map_err(|_| StoreError::io(std::io::ErrorKind::TimedOut, "connecting to the cluster"))??;
                // Remember the nodes, as seeds for the next connections.
                if let Ok(nodes) = redis::cmd("CLUSTER").arg("NODES").query_async::<String>(&mut conn).await {
                    let seen = cluster_nodes(&nodes);
                    if !seen.is_empty() {
                        *self.nodes.lock().unwrap_or_else(PoisonError::into_inner) = seen;
                    }
                }
                Ok(Conn::Cluster(conn))
            }
        }
    }

    /// A client for the server that serves `key` (the configured one, or
    /// the cluster master of its slot).
    pub async fn client_for(&self, key: &str) -> Result<Client, StoreError> {
        match self.learn().await? {
            Learnt::Standalone => self.server().await,
            Learnt::Cluster(_) => {
                let mut conn = self.connect(self.opts.response_timeout).await?;
                let (host, port) = master_of(&mut conn, key_slot(key.as_bytes())).await?;
                Ok(self.node_client(host, port)?)
            }
        }
    }

    /// A dedicated connection for blocking reads of stream `key`, to the
    /// server that serves it; replies time out after `response` (a blocking
    /// read should add its block time).
    pub async fn reader(&self, key: &str, response: Duration) -> Result<StreamReader, StoreError> {
        let epoch = self.epoch();
        let client = self.client_for(key).await?;
        Ok(StreamReader::connect(&client, &self.opts, response).await?.followed(epoch))
    }

    /// The configured client pointed at another node (same credentials,
    /// database and TLS).
    fn node_client(&self, host: String, port: u16) -> Result<Client, StoreError> {
        // The template's TLS parameters (custom certificates) carry over.
        let info = self.client.get_connection_info().clone();
        Ok(Client::open(info.set_addr(self.node_addr(host, port)))?)
    }

    /// The address of node `host:port`, with the configured TLS settings.
    fn node_addr(&self, host: String, port: u16) -> ConnectionAddr {
        match self.client.get_connection_info().addr() {
            ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() }
            }
            _ => ConnectionAddr::Tcp(host, port),
        }
    }
}

/// A multiplexed connection to one server whose replies time out after
/// `response`.
pub async fn single(
    client: &Client,
    opts: &ConnectOptions,
    response: Duration,
) -> Result<MultiplexedConnection, StoreError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(response));
    Ok(client.get_multiplexed_async_connection_with_config(&config).await?)
}

/// The addresses of the nodes `CLUSTER NODES` lists that are not failed:
/// `<id> <ip:port@cport[,hostname]> <flags> …` per line.
fn cluster_nodes(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (_, addr, flags) = (parts.next()?, parts.next()?, parts.next()?);
            if flags.contains("fail") || flags.contains("noaddr") || flags.contains("handshake") {
                return None;
            }
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// The address of the master serving `slot`, from `CLUSTER SLOTS`.
async fn master_of(conn: &mut Conn, slot: u16) -> Result<(String, u16), StoreError> {
    let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let bad = |what: &str| StoreError::Reply(format!("CLUSTER SLOTS: {what}"));
    let Value::Array(ranges) = reply else { return Err(bad("not an array")) };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        if (*start..=*end).contains(&i64::from(slot)) {
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad("no master host")),
            };
            let Some(Value::Int(port)) = master.get(1) else { return Err(bad("no master port")) };
            let port = u16::try_from(*port).map_err(|_| bad("bad port"))?;
            return Ok((host, port));
        }
    }
    Err(StoreError::io(std::io::ErrorKind::NotConnected, "no cluster node serves the slot (CLUSTERDOWN?)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lists_the_live_ones() {
        let text = "07c3 127.0.0.1:30004@31004 slave e7d1 0 1426238317239 4 connected\n\
                    67ed 127.0.0.1:30002@31002,node-2 master - 0 1426238316232 2 connected 5461-10922\n\
                    292f 127.0.0.1:30003@31003 master,fail - 0 1426238318243 3 connected\n";
        assert_eq!(cluster_nodes(text), [("127.0.0.1".to_owned(), 30004), ("127.0.0.1".to_owned(), 30002)],);
    }
}
