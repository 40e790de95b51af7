//! A TCP proxy in front of a shared broker, so that a test can drop the daemon's connections
//! (and refuse new ones for a while) without touching a server other tests use.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards connections from a local port to `upstream`.
pub struct TcpProxy {
    address: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    /// Cancelled to drop every connection open now.
    live: CancellationToken,
    /// New connections are closed at once while this is set.
    refusing: bool,
}

impl TcpProxy {
    /// A proxy on a free port of 127.0.0.1 to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            live: CancellationToken::new(),
            refusing: false,
        }));
        let upstream = upstream.to_owned();
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let live = {
                    let state = shared.lock().unwrap();
                    if state.refusing {
                        drop(client);
                        continue;
                    }
                    state.live.clone()
                };
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = live.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        TcpProxy {
            address,
            state,
            task,
        }
    }

    /// `host:port` of the proxy.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Drops every open connection and refuses new ones until [`TcpProxy::resume`].
    pub fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.refusing = true;
        state.live.cancel();
        state.live = CancellationToken::new();
    }

    /// Accepts connections again.
    pub fn resume(&self) {
        self.state.lock().unwrap().refusing = false;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap().live.cancel();
    }
}
