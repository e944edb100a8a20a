//! The one socket binder every agent uses. Listening sockets that a surge instance must be
//! able to bind beside this one (a rolling update with `maxSurge`, a hand-over) are bound with
//! SO_REUSEPORT; the rest exclusively, so that two agents configured on one port fail loudly.
//! IPv6 sockets are always IPv6-only: an agent that serves both families binds both.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Whether another process may bind the same address at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// SO_REUSEPORT: a second instance binds beside this one and the kernel spreads new
    /// connections or datagrams between them.
    ReusePort,
    /// Only SO_REUSEADDR (a restart may rebind while old connections linger in TIME_WAIT);
    /// a second bind fails with `EADDRINUSE`.
    Exclusive,
}

/// Binds and listens on a TCP address, non-blocking, registered with the current runtime.
pub fn tcp_listener(addr: SocketAddr, sharing: Sharing, backlog: i32) -> io::Result<TcpListener> {
    let socket = socket(addr, Type::STREAM, Protocol::TCP, sharing)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// Binds a UDP socket and leaves it blocking, for a caller that reads it on its own threads or
/// turns it into a tokio socket (`set_nonblocking(true)` first).
pub fn udp_socket(addr: SocketAddr, sharing: Sharing) -> io::Result<Socket> {
    let socket = socket(addr, Type::DGRAM, Protocol::UDP, sharing)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn socket(addr: SocketAddr, ty: Type, protocol: Protocol, sharing: Sharing) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if sharing == Sharing::ReusePort {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuse_port_shares_and_exclusive_refuses() {
        let first = tcp_listener("127.0.0.1:0".parse().unwrap(), Sharing::ReusePort, 16).unwrap();
        let addr = first.local_addr().unwrap();
        let second = tcp_listener(addr, Sharing::ReusePort, 16).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);

        let only = tcp_listener("127.0.0.1:0".parse().unwrap(), Sharing::Exclusive, 16).unwrap();
        let error = tcp_listener(only.local_addr().unwrap(), Sharing::Exclusive, 16).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);

        let udp = udp_socket("127.0.0.1:0".parse().unwrap(), Sharing::ReusePort).unwrap();
        let udp_addr = udp.local_addr().unwrap().as_socket().unwrap();
        udp_socket(udp_addr, Sharing::ReusePort).unwrap();
        assert_eq!(
            udp_socket(udp_addr, Sharing::Exclusive).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
    }

    #[tokio::test]
    async fn ipv6_sockets_are_ipv6_only() {
        // Skips where the machine has no IPv6 loopback.
        let Ok(v6) = tcp_listener("[::1]:0".parse().unwrap(), Sharing::Exclusive, 16) else {
            return;
        };
        let sock = socket2::SockRef::from(&v6);
        assert!(sock.only_v6().unwrap());
    }
}
