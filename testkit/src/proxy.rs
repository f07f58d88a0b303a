//! A small TCP proxy on loopback for failure tests: one address in front of
//! a Redis server, as managed Redis puts one DNS name in front of whichever
//! server is the master now.
//!
//! - [`Proxy::switch`]: new connections go to another backend; existing
//!   ones stay with the server they were opened to (a failover behind one
//!   endpoint: the old server, now a replica, keeps its clients).
//! - [`Proxy::blackhole`]: nothing is forwarded any more, in either
//!   direction, and no socket is closed (a wedged server, or a vanished
//!   host whose packets are dropped); [`Proxy::restore`] forwards again,
//!   what was held back first.
//! - Every connection is recorded: when it was opened, to which backend,
//!   and when the client closed it, so a test can tell when each client
//!   noticed.
//!
//! It runs on a runtime of its own (a thread), so sync and async tests
//! alike can use it; dropping it stops it and closes every connection.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied connection, as recorded.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The backend port it was opened to.
    pub backend: u16,
    /// When the proxy accepted it.
    pub opened: Instant,
    /// When the client closed it (or reset it), if it has.
    pub closed_by_client: Option<Instant>,
}

struct Shared {
    backend: AtomicU16,
    /// `true` while nothing is forwarded.
    blackholed: watch::Sender<bool>,
    connections: Mutex<Vec<Connection>>,
}

/// A running proxy (see the module docs).
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free loopback port in front of `127.0.0.1:backend`.
    pub fn start(backend: u16) -> Proxy {
        Self::bind(std::net::Ipv4Addr::LOCALHOST, 0, backend).expect("bind the proxy")
    }

    /// A proxy on `ip:port` (port 0: a free one) in front of
    /// `127.0.0.1:backend`, e.g. on another loopback address (127.0.0.2)
    /// for a test that moves a host name between servers.
    pub fn bind(ip: std::net::Ipv4Addr, port: u16, backend: u16) -> std::io::Result<Proxy> {
        let listener = std::net::TcpListener::bind((ip, port))?;
        listener.set_nonblocking(true).expect("non-blocking listener");
        let port = listener.local_addr().expect("proxy address").port();
        let (blackholed, _) = watch::channel(false);
        let shared =
            Arc::new(Shared { backend: AtomicU16::new(backend), blackholed, connections: Mutex::new(Vec::new()) });
        let (stop, stop_rx) = watch::channel(false);
        let task_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
                rt.block_on(serve(listener, task_shared, stop_rx));
            })
            .expect("spawn the proxy thread");
        Ok(Proxy { port, shared, stop, thread: Some(thread) })
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// New connections go to `127.0.0.1:backend` from now on.
    pub fn switch(&self, backend: u16) {
        self.shared.backend.store(backend, Ordering::SeqCst);
    }

    /// Stops forwarding anything, closing nothing.
    pub fn blackhole(&self) {
        self.shared.blackholed.send_replace(true);
    }

    /// Forwards again (what was held back first).
    pub fn restore(&self) {
        self.shared.blackholed.send_replace(false);
    }

    /// Every connection so far, in the order accepted.
    pub fn connections(&self) -> Vec<Connection> {
        self.shared.connections.lock().unwrap().clone()
    }

    /// The connections to `backend` that clients still hold open.
    pub fn open_to(&self, backend: u16) -> usize {
        self.connections().iter().filter(|c| c.backend == backend && c.closed_by_client.is_none()).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let backend = shared.backend.load(Ordering::SeqCst);
                let index = {
                    let mut all = shared.connections.lock().unwrap();
                    all.push(Connection { backend, opened: Instant::now(), closed_by_client: None });
                    all.len() - 1
                };
                tasks.spawn(proxy_one(client, backend, index, shared.clone()));
            }
        }
    }
    tasks.abort_all();
}

/// Forwards one connection until either side closes it.
async fn proxy_one(client: TcpStream, backend: u16, index: usize, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    // While blackholed, a new connection is accepted and left hanging, like
    // a SYN answered by a load balancer in front of a dead host.
    let mut holes = shared.blackholed.subscribe();
    while *holes.borrow_and_update() {
        if holes.changed().await.is_err() {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", backend)).await else {
        mark_closed(&shared, index);
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(client_read, server_write, shared.blackholed.subscribe());
    let down = pump(server_read, client_write, shared.blackholed.subscribe());
    tokio::pin!(up, down);
    // The client closing its side ends the connection; the server closing
    // its side is passed on to the client, whose close then ends it.
    tokio::select! {
        _ = &mut up => {
            mark_closed(&shared, index);
        }
        _ = &mut down => {
            let _ = tokio::time::timeout(Duration::from_secs(30), up).await;
            mark_closed(&shared, index);
        }
    }
}

fn mark_closed(shared: &Shared, index: usize) {
    let mut all = shared.connections.lock().unwrap();
    if all[index].closed_by_client.is_none() {
        all[index].closed_by_client = Some(Instant::now());
    }
}

/// Copies `from` to `to`, holding everything back while blackholed (but
/// still reading, so that a close is noticed at once). Returns when `from`
/// is closed or fails.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut holes: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut held: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => held.extend_from_slice(&buf[..n]),
            },
            changed = holes.changed(), if !held.is_empty() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if !*holes.borrow_and_update() && !held.is_empty() {
            if to.write_all(&held).await.is_err() {
                return;
            }
            held.clear();
        }
    }
}
