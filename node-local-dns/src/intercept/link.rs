//! The listen link (`nodelocaldns`) over raw `NETLINK_ROUTE`: look a link up by name, create it,
//! bring it up, list and add its addresses, delete it. Separate from the policy in
//! [`super`] so that the byte layout (message headers, attributes, nesting) is in one place and
//! unit-tested without privileges.
//!
//! No iproute2 is needed: the agent speaks rtnetlink itself, one short-lived socket per
//! operation batch, in the network namespace of the calling thread. Every receive has a
//! deadline ([`RECV_TIMEOUT`]) and every receive loop a bound ([`MAX_REPLIES`]).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How long one netlink receive may block before the request counts as failed.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on reply datagrams read for one request (a dump of a busy node's addresses is a
/// few datagrams; this only stops a runaway loop).
const MAX_REPLIES: usize = 4096;
/// Receive buffer for one datagram (the kernel sizes dump datagrams to at most a page or 32 KiB).
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Linux `IFNAMSIZ` minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDR_LEN: usize = 16;
/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
const IFINFOMSG_LEN: usize = 16;
/// `struct ifaddrmsg`: family u8, prefixlen u8, flags u8, scope u8, index u32.
const IFADDRMSG_LEN: usize = 8;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type (u8 each), flags
/// u32.
const RTMSG_LEN: usize = 12;
/// Offset of `rtm_type` in `struct rtmsg`.
const RTMSG_TYPE_OFFSET: usize = 7;
/// `struct rtattr`: len u16, type u16.
const RTA_HDR_LEN: usize = 4;
/// `IFA_FLAGS` (u32 flags attribute; `ifa_flags` in the header is only 8 bits wide).
const IFA_FLAGS: u16 = 8;
/// `VETH_INFO_PEER` inside `IFLA_INFO_DATA` of a veth.
const VETH_INFO_PEER: u16 = 1;
/// `NLA_F_NESTED`: marks a nested attribute.
const NLA_F_NESTED: u16 = 1 << 15;
/// Mask of the attribute type without the nested/byte-order flags.
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index.
    pub index: u32,
    /// `IFF_*` flags (`IFF_UP` = administratively up).
    pub flags: u32,
    /// `IFLA_INFO_KIND` (`dummy`, `ifb`, `bridge`, `veth`, ...); `None` for kinds without one
    /// (a physical NIC).
    pub kind: Option<String>,
}

impl LinkInfo {
    /// Whether the link is administratively up.
    pub fn is_up(&self) -> bool {
        self.flags & libc::IFF_UP as u32 != 0
    }

    /// Whether the link is operationally up (`IFF_RUNNING`: up and carrier reported).
    pub fn is_running(&self) -> bool {
        self.flags & libc::IFF_RUNNING as u32 != 0
    }
}

/// One address of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrInfo {
    /// The local address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// `IFA_F_*` flags (`IFA_F_TENTATIVE` while IPv6 DAD runs, `IFA_F_NODAD`, ...).
    pub flags: u32,
}

impl AddrInfo {
    /// Whether the address is usable for `bind` (not tentative and DAD did not fail).
    pub fn is_usable(&self) -> bool {
        self.flags & (libc::IFA_F_TENTATIVE | libc::IFA_F_DADFAILED) == 0
    }
}

/// Builds a netlink message: header, fixed part, attributes (with nesting).
#[derive(Debug)]
struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    fn new(msg_type: u16, flags: u16) -> Message {
        let mut buf = vec![0u8; NLMSG_HDR_LEN];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Message {
            buf,
            nests: Vec::new(),
        }
    }

    fn fixed(&mut self, bytes: &[u8]) -> &mut Message {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    fn attr(&mut self, attr_type: u16, data: &[u8]) -> &mut Message {
        let len = (RTA_HDR_LEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn attr_str(&mut self, attr_type: u16, value: &str) -> &mut Message {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.attr(attr_type, &data)
    }

    fn begin_nest(&mut self, attr_type: u16) -> &mut Message {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn end_nest(&mut self) -> &mut Message {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut m = [0u8; IFINFOMSG_LEN];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Iterates the `rtattr`s of `b` as (type without flags, payload). Stops at the first
/// malformed attribute.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = read_u16(b, at)? as usize;
        let attr_type = read_u16(b, at + 2)? & NLA_TYPE_MASK;
        if len < RTA_HDR_LEN || at + len > b.len() {
            return None;
        }
        let payload = &b[at + RTA_HDR_LEN..at + len];
        at += align4(len);
        Some((attr_type, payload))
    })
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Parses the payload of an `RTM_NEWLINK` (ifinfomsg + attributes).
fn parse_link(payload: &[u8]) -> Option<LinkInfo> {
    let index = read_u32(payload, 4)?;
    let flags = read_u32(payload, 8)?;
    let mut kind = None;
    for (t, data) in attrs(payload.get(IFINFOMSG_LEN..)?) {
        if t == libc::IFLA_LINKINFO {
            for (inner, value) in attrs(data) {
                if inner == libc::IFLA_INFO_KIND {
                    kind = Some(c_string(value));
                }
            }
        }
    }
    Some(LinkInfo { index, flags, kind })
}

/// Parses the payload of an `RTM_NEWADDR` (ifaddrmsg + attributes) into (ifindex, address).
fn parse_addr(payload: &[u8]) -> Option<(u32, AddrInfo)> {
    let family = *payload.first()?;
    let prefix_len = *payload.get(1)?;
    let mut flags = u32::from(*payload.get(2)?);
    let index = read_u32(payload, 4)?;
    let (mut local, mut address) = (None, None);
    for (t, data) in attrs(payload.get(IFADDRMSG_LEN..)?) {
        let ip = match (i32::from(family), data.len()) {
            (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => None,
        };
        match t {
            libc::IFA_LOCAL => local = ip,
            libc::IFA_ADDRESS => address = ip,
            IFA_FLAGS => flags = read_u32(data, 0).unwrap_or(flags),
            _ => {}
        }
    }
    let addr = local.or(address)?;
    Some((
        index,
        AddrInfo {
            addr,
            prefix_len,
            flags,
        },
    ))
}

/// A `NETLINK_ROUTE` socket, bound in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a socket with a receive deadline of [`RECV_TIMEOUT`].
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a correctly sized timeval on a valid socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_nl is valid (kernel assigns the port id).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind with a correctly sized sockaddr_nl on a valid socket.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd, seq: 0 })
    }

    /// Sends one request and collects the payloads of its replies (after the netlink header)
    /// until the ack, the error, or `NLMSG_DONE` of a dump.
    fn request(&mut self, msg: Message, dump: bool) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: send from a valid buffer of the given length on a valid socket.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        for _ in 0..MAX_REPLIES {
            // SAFETY: recv into a valid buffer of the given length on a valid socket.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            let datagram = &buf[..n as usize];
            let mut at = 0usize;
            while at + NLMSG_HDR_LEN <= datagram.len() {
                let len = read_u32(datagram, at).unwrap_or(0) as usize;
                if len < NLMSG_HDR_LEN || at + len > datagram.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed netlink reply",
                    ));
                }
                let msg_type = read_u16(datagram, at + 4).unwrap_or(0);
                let msg_seq = read_u32(datagram, at + 8).unwrap_or(0);
                let payload = &datagram[at + NLMSG_HDR_LEN..at + len];
                at += align4(len);
                if msg_seq != seq {
                    continue;
                }
                match i32::from(msg_type) {
                    libc::NLMSG_ERROR => {
                        let code = read_u32(payload, 0).unwrap_or(0) as i32;
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    libc::NLMSG_DONE => return Ok(out),
                    _ => {
                        out.push(payload.to_vec());
                        if !dump {
                            // A non-dump GET answers with exactly one message and no ack.
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "netlink reply did not end",
        ))
    }

    /// Looks a link up by name; `Ok(None)` when there is none.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<LinkInfo>> {
        let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, name);
        match self.request(msg, false) {
            Ok(replies) => Ok(replies.first().and_then(|p| parse_link(p))),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link of `kind` named `name`; for `veth`, `peer` names the other end.
    pub fn create_link(&mut self, name: &str, kind: &str, peer: Option<&str>) -> io::Result<()> {
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        let mut msg = Message::new(libc::RTM_NEWLINK, flags as u16);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, name)
            .begin_nest(libc::IFLA_LINKINFO)
            .attr_str(libc::IFLA_INFO_KIND, kind);
        if let Some(peer) = peer {
            msg.begin_nest(libc::IFLA_INFO_DATA)
                .begin_nest(VETH_INFO_PEER)
                .fixed(&ifinfomsg(0, 0, 0))
                .attr_str(libc::IFLA_IFNAME, peer)
                .end_nest()
                .end_nest();
        }
        msg.end_nest();
        self.request(msg, false).map(drop)
    }

    /// Sets a link administratively up.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let up = libc::IFF_UP as u32;
        let mut msg = Message::new(
            libc::RTM_NEWLINK,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        );
        msg.fixed(&ifinfomsg(index, up, up));
        self.request(msg, false).map(drop)
    }

    /// Deletes a link (a veth takes its peer with it).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = Message::new(
            libc::RTM_DELLINK,
            (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
        );
        msg.fixed(&ifinfomsg(index, 0, 0));
        self.request(msg, false).map(drop)
    }

    /// The addresses of link `index` (both families).
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<AddrInfo>> {
        let mut msg = Message::new(
            libc::RTM_GETADDR,
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        );
        msg.fixed(&[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0]);
        let replies = self.request(msg, true)?;
        Ok(replies
            .iter()
            .filter_map(|p| parse_addr(p))
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| a)
            .collect())
    }

    /// Adds `ip` as a host address (/32 or /128) to link `index`; IPv6 with `IFA_F_NODAD`, so
    /// it is usable at once. `EEXIST` is returned as an error; callers treat it as present.
    pub fn add_host_address(&mut self, index: u32, ip: IpAddr) -> io::Result<()> {
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        let mut msg = Message::new(libc::RTM_NEWADDR, flags as u16);
        let (family, prefix, bytes, ifa_flags) = match ip {
            IpAddr::V4(v4) => (libc::AF_INET, 32u8, v4.octets().to_vec(), 0u32),
            IpAddr::V6(v6) => (
                libc::AF_INET6,
                128u8,
                v6.octets().to_vec(),
                libc::IFA_F_NODAD,
            ),
        };
        let mut header = [0u8; IFADDRMSG_LEN];
        header[0] = family as u8;
        header[1] = prefix;
        header[2] = ifa_flags as u8;
        header[3] = 0; // RT_SCOPE_UNIVERSE
        header[4..8].copy_from_slice(&index.to_ne_bytes());
        msg.fixed(&header)
            .attr(libc::IFA_LOCAL, &bytes)
            .attr(libc::IFA_ADDRESS, &bytes)
            .attr(IFA_FLAGS, &ifa_flags.to_ne_bytes());
        self.request(msg, false).map(drop)
    }
}

impl Netlink {
    /// Whether the kernel's route lookup for `ip` (`ip route get`) answers `local`, i.e. a
    /// packet to it is delivered to a socket on this host.
    pub fn routes_locally(&mut self, ip: IpAddr) -> io::Result<bool> {
        let (family, len, bytes) = match ip {
            IpAddr::V4(v4) => (libc::AF_INET, 32u8, v4.octets().to_vec()),
            IpAddr::V6(v6) => (libc::AF_INET6, 128u8, v6.octets().to_vec()),
        };
        let mut msg = Message::new(libc::RTM_GETROUTE, libc::NLM_F_REQUEST as u16);
        let mut rtmsg = [0u8; RTMSG_LEN];
        rtmsg[0] = family as u8;
        rtmsg[1] = len;
        msg.fixed(&rtmsg).attr(libc::RTA_DST, &bytes);
        match self.request(msg, false) {
            Ok(replies) => Ok(replies
                .first()
                .and_then(|p| p.get(RTMSG_TYPE_OFFSET))
                .is_some_and(|&t| t == libc::RTN_LOCAL)),
            // No route at all (ENETUNREACH, EHOSTUNREACH): not local.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn message_has_length_seq_and_aligned_attributes() {
        let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
        msg.fixed(&ifinfomsg(7, 0, 0))
            .attr_str(libc::IFLA_IFNAME, "nodelocaldns");
        let bytes = msg.finish(42);
        // header 16 + ifinfomsg 16 + rtattr 4 + "nodelocaldns\0" 13 -> padded to 16
        assert_eq!(bytes.len(), 16 + 16 + 4 + 16);
        assert_eq!(read_u32(&bytes, 0).unwrap() as usize, bytes.len());
        assert_eq!(read_u16(&bytes, 4).unwrap(), libc::RTM_GETLINK);
        assert_eq!(read_u32(&bytes, 8).unwrap(), 42);
        assert_eq!(read_u32(&bytes, 16 + 4).unwrap(), 7);
        let parsed: Vec<_> = attrs(&bytes[32..]).collect();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, libc::IFLA_IFNAME);
        assert_eq!(c_string(parsed[0].1), "nodelocaldns");
    }

    #[test]
    fn nested_veth_peer_lengths_cover_their_children() {
        let mut msg = Message::new(libc::RTM_NEWLINK, 0);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .begin_nest(libc::IFLA_LINKINFO)
            .attr_str(libc::IFLA_INFO_KIND, "veth")
            .begin_nest(libc::IFLA_INFO_DATA)
            .begin_nest(VETH_INFO_PEER)
            .fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, "nodelocaldns-p")
            .end_nest()
            .end_nest()
            .end_nest();
        let bytes = msg.finish(1);
        let top: Vec<_> = attrs(&bytes[32..]).collect();
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].0, libc::IFLA_LINKINFO);
        let inner: Vec<_> = attrs(top[0].1).collect();
        assert_eq!(inner[0].0, libc::IFLA_INFO_KIND);
        assert_eq!(c_string(inner[0].1), "veth");
        assert_eq!(inner[1].0, libc::IFLA_INFO_DATA);
        let peer: Vec<_> = attrs(inner[1].1).collect();
        assert_eq!(peer[0].0, VETH_INFO_PEER);
        let peer_attrs: Vec<_> = attrs(&peer[0].1[IFINFOMSG_LEN..]).collect();
        assert_eq!(c_string(peer_attrs[0].1), "nodelocaldns-p");
        // The whole message is consumed by the top-level attribute.
        assert_eq!(32 + align4(top[0].1.len() + RTA_HDR_LEN), bytes.len());
    }

    #[test]
    fn parses_link_kind_and_flags() {
        let mut msg = Message::new(0, 0);
        msg.fixed(&ifinfomsg(3, libc::IFF_UP as u32, 0))
            .attr_str(libc::IFLA_IFNAME, "x")
            .begin_nest(libc::IFLA_LINKINFO)
            .attr_str(libc::IFLA_INFO_KIND, "ifb")
            .end_nest();
        let bytes = msg.finish(1);
        let link = parse_link(&bytes[NLMSG_HDR_LEN..]).unwrap();
        assert_eq!(link.index, 3);
        assert!(link.is_up());
        assert_eq!(link.kind.as_deref(), Some("ifb"));
    }

    #[test]
    fn parses_addresses_with_extended_flags() {
        let v6: IpAddr = "fd30:1319:f1e:230b::1".parse().unwrap();
        let IpAddr::V6(octets) = v6 else { panic!() };
        let mut msg = Message::new(0, 0);
        msg.fixed(&[libc::AF_INET6 as u8, 128, 0, 0, 9, 0, 0, 0])
            .attr(libc::IFA_ADDRESS, &octets.octets())
            .attr(IFA_FLAGS, &libc::IFA_F_TENTATIVE.to_ne_bytes());
        let bytes = msg.finish(1);
        let (index, addr) = parse_addr(&bytes[NLMSG_HDR_LEN..]).unwrap();
        assert_eq!(index, u32::from_ne_bytes([9, 0, 0, 0]));
        assert_eq!(addr.addr, v6);
        assert_eq!(addr.prefix_len, 128);
        assert!(!addr.is_usable());

        let mut msg = Message::new(0, 0);
        msg.fixed(&[libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0])
            .attr(libc::IFA_ADDRESS, &[10, 0, 0, 1])
            .attr(libc::IFA_LOCAL, &[169, 254, 20, 10]);
        let bytes = msg.finish(1);
        let (_, addr) = parse_addr(&bytes[NLMSG_HDR_LEN..]).unwrap();
        // IFA_LOCAL wins over IFA_ADDRESS (the peer on point-to-point links).
        assert_eq!(addr.addr, IpAddr::from([169, 254, 20, 10]));
        assert!(addr.is_usable());
    }

    #[test]
    fn truncated_attributes_stop_iteration() {
        let bytes = [8u8, 0, 3, 0, 1, 2]; // claims 8 bytes, has 6
        assert_eq!(attrs(&bytes).count(), 0);
    }
}
