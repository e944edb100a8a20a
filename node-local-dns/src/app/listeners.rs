//! The sockets: a DNS listener is a UDP socket read by its own batched worker thread
//! ([`crate::udp`]) and a TCP listener on the runtime, both bound with SO_REUSEPORT so that a
//! surge instance can bind beside this one; an HTTP listener serves agentkit's admin
//! endpoints. [`super::handover`] takes them apart when the agent leaves.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use agentkit::admin::{AdminServer, Endpoints};
use agentkit::net::Sharing;
use agentkit::Shutdown;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::server::{Served, Server};
use crate::udp;

/// Listen backlog of the DNS TCP sockets.
const TCP_BACKLOG: i32 = 1024;
/// Listen backlog of the HTTP (metrics, health) sockets.
const HTTP_BACKLOG: i32 = 128;

/// What one listening address serves and the handles to stop it.
pub(super) struct DnsListener {
    pub server: Server,
    pub udp: Arc<socket2::Socket>,
    pub udp_control: Arc<udp::Control>,
    pub udp_thread: Option<std::thread::JoinHandle<()>>,
    pub tcp: Arc<TcpListener>,
    pub tcp_task: JoinHandle<()>,
}

impl DnsListener {
    /// Binds `addr` (UDP and TCP) and starts serving `zones` on it: the UDP worker on its own
    /// thread, the TCP accept loop on `tasks`, misses and TCP connections on `work`. Removes
    /// any steering a leaving instance left on the port.
    pub fn bind(
        addr: SocketAddr,
        zones: Vec<Served>,
        metrics: &Metrics,
        tasks: &Shutdown,
        work: &Shutdown,
    ) -> anyhow::Result<DnsListener> {
        let server = Server::with_metrics(zones, Some(metrics.clone()), addr.is_ipv6(), work);
        let udp_socket = udp::bind(addr)?;
        udp::detach_steering(&*udp_socket);
        let tcp = Arc::new(agentkit::net::tcp_listener(
            addr,
            Sharing::ReusePort,
            TCP_BACKLOG,
        )?);
        udp::detach_steering(&*tcp);
        let control = Arc::new(udp::Control::default());
        let thread = udp::spawn(
            Arc::clone(&udp_socket),
            server.clone(),
            tokio::runtime::Handle::current(),
            Arc::clone(&control),
        )?;
        let tcp_task = tasks.spawn(server.clone().serve_tcp_shared(Arc::clone(&tcp)));
        Ok(DnsListener {
            server,
            udp: udp_socket,
            udp_control: control,
            udp_thread: Some(thread),
            tcp,
            tcp_task,
        })
    }

    /// Stops serving at once (a reload removed the address); queries already handed to the
    /// runtime are still answered.
    pub fn stop(mut self) {
        self.udp_control.stop.store(true, Ordering::Release);
        self.tcp_task.abort();
        drop(self.udp_thread.take());
    }
}

/// Binds `addr` (SO_REUSEPORT, for the surge hand-over) and serves `endpoints` on it, on a
/// child of `tasks`; stopping the returned shutdown stops this server alone.
pub(super) fn serve_http(
    addr: SocketAddr,
    endpoints: Endpoints,
    tasks: &Shutdown,
) -> std::io::Result<Shutdown> {
    let listener = agentkit::net::tcp_listener(addr, Sharing::ReusePort, HTTP_BACKLOG)?;
    let server = tasks.child();
    tasks.spawn(AdminServer::new(listener, endpoints).serve(server.clone()));
    Ok(server)
}
