//! The listen link (`nodelocaldns`) over raw `NETLINK_ROUTE`: look a link up by name, create it,
//! bring it up, list and add its addresses, delete it. Separate from the policy in
//! [`super`]; the byte layout (message headers, attributes, nesting, reply framing) and the
//! socket are [`agentkit::netlink`]'s, shared with the eBPF crate's interface reads.
//!
//! No iproute2 is needed: the agent speaks rtnetlink itself, one short-lived socket per
//! operation batch, in the network namespace of the calling thread. Every receive has a
//! deadline ([`RECV_TIMEOUT`]) and every receive loop a bound (`agentkit::netlink`'s).

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use agentkit::netlink::{self, attrs, c_string, ifinfomsg, read_u32, Ifinfo, Malformed, Message};

/// How long one netlink receive may block before the request counts as failed.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Linux `IFNAMSIZ` minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// `struct ifaddrmsg`: family u8, prefixlen u8, flags u8, scope u8, index u32.
const IFADDRMSG_LEN: usize = 8;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope, type (u8 each), flags
/// u32.
const RTMSG_LEN: usize = 12;
/// Offset of `rtm_type` in `struct rtmsg`.
const RTMSG_TYPE_OFFSET: usize = 7;
/// `VETH_INFO_PEER` inside `IFLA_INFO_DATA` of a veth.
const VETH_INFO_PEER: u16 = 1;

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

/// Parses the payload of an `RTM_NEWLINK` (ifinfomsg + attributes).
fn parse_link(payload: &[u8]) -> Result<LinkInfo, Malformed> {
    let (info, attributes) = Ifinfo::parse(payload)?;
    let mut kind = None;
    for attr in attrs(attributes) {
        let (t, data) = attr?;
        if t == libc::IFLA_LINKINFO {
            for inner in attrs(data) {
                let (inner, value) = inner?;
                if inner == libc::IFLA_INFO_KIND {
                    kind = Some(c_string(value));
                }
            }
        }
    }
    Ok(LinkInfo {
        index: info.index,
        flags: info.flags,
        kind,
    })
}

/// Parses the payload of an `RTM_NEWADDR` (ifaddrmsg + attributes) into (ifindex, address);
/// `None` for a message without an address of its family.
fn parse_addr(payload: &[u8]) -> Result<Option<(u32, AddrInfo)>, Malformed> {
    let header = payload
        .get(..IFADDRMSG_LEN)
        .ok_or(Malformed("shorter than an ifaddrmsg"))?;
    let (family, prefix_len) = (header[0], header[1]);
    let mut flags = u32::from(header[2]);
    let index = read_u32(header, 4).ok_or(Malformed("shorter than an ifaddrmsg"))?;
    let (mut local, mut address) = (None, None);
    for attr in attrs(&payload[IFADDRMSG_LEN..]) {
        let (t, data) = attr?;
        let ip = match (i32::from(family), data.len()) {
            (libc::AF_INET, 4) => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
            (libc::AF_INET6, 16) => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
            _ => None,
        };
        match t {
            libc::IFA_LOCAL => local = ip,
            libc::IFA_ADDRESS => address = ip,
            libc::IFA_FLAGS => flags = read_u32(data, 0).unwrap_or(flags),
            _ => {}
        }
    }
    Ok(local.or(address).map(|addr| {
        (
            index,
            AddrInfo {
                addr,
                prefix_len,
                flags,
            },
        )
    }))
}

/// The `RTM_NEWLINK` that creates a link of `kind` named `name` (for a veth, with its `peer`).
fn new_link(name: &str, kind: &str, peer: Option<&str>) -> Message {
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
    msg
}

/// A `NETLINK_ROUTE` socket, bound in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: netlink::Socket,
}

impl Netlink {
    /// Opens a socket with a receive deadline of [`RECV_TIMEOUT`].
    pub fn open() -> io::Result<Netlink> {
        Ok(Netlink {
            socket: netlink::Socket::open(RECV_TIMEOUT)?,
        })
    }

    /// Sends one request and returns the payloads of its replies (see
    /// [`netlink::Socket::request`]).
    fn request(&mut self, msg: Message, dump: bool) -> io::Result<Vec<Vec<u8>>> {
        let replies = self.socket.request(msg, dump)?;
        Ok(replies.into_iter().map(|r| r.payload).collect())
    }

    /// Looks a link up by name; `Ok(None)` when there is none.
    pub fn link_by_name(&mut self, name: &str) -> io::Result<Option<LinkInfo>> {
        let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, name);
        match self.request(msg, false) {
            Ok(replies) => match replies.first() {
                Some(payload) => Ok(Some(parse_link(payload)?)),
                None => Ok(None),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link of `kind` named `name`; for `veth`, `peer` names the other end.
    pub fn create_link(&mut self, name: &str, kind: &str, peer: Option<&str>) -> io::Result<()> {
        self.request(new_link(name, kind, peer), false).map(drop)
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
        let mut out = Vec::new();
        for payload in self.request(msg, true)? {
            if let Some((i, addr)) = parse_addr(&payload)? {
                if i == index {
                    out.push(addr);
                }
            }
        }
        Ok(out)
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
            .attr(libc::IFA_FLAGS, &ifa_flags.to_ne_bytes());
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
    use agentkit::netlink::{IFINFOMSG_LEN, NLMSG_HDR_LEN};

    fn walk(b: &[u8]) -> Vec<(u16, &[u8])> {
        attrs(b).collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn a_veth_is_created_with_its_peer_nested_in_the_link_info() {
        let bytes = new_link("nodelocaldns", "veth", Some("nodelocaldns-p")).finish(1);
        let (_, rest) = Ifinfo::parse(&bytes[NLMSG_HDR_LEN..]).unwrap();
        let top = walk(rest);
        assert_eq!(top[0], (libc::IFLA_IFNAME, &b"nodelocaldns\0"[..]));
        assert_eq!(top[1].0, libc::IFLA_LINKINFO);
        let inner = walk(top[1].1);
        assert_eq!(c_string(inner[0].1), "veth");
        assert_eq!(inner[1].0, libc::IFLA_INFO_DATA);
        let peer = walk(inner[1].1);
        assert_eq!(peer[0].0, VETH_INFO_PEER);
        let peer_attrs = walk(&peer[0].1[IFINFOMSG_LEN..]);
        assert_eq!(c_string(peer_attrs[0].1), "nodelocaldns-p");
        // A dummy has a kind and nothing else.
        let bytes = new_link("nodelocaldns", "dummy", None).finish(1);
        let (_, rest) = Ifinfo::parse(&bytes[NLMSG_HDR_LEN..]).unwrap();
        let info = walk(rest)[1].1;
        assert_eq!(walk(info), vec![(libc::IFLA_INFO_KIND, &b"dummy\0"[..])]);
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
            .attr(libc::IFA_FLAGS, &libc::IFA_F_TENTATIVE.to_ne_bytes());
        let bytes = msg.finish(1);
        let (index, addr) = parse_addr(&bytes[NLMSG_HDR_LEN..]).unwrap().unwrap();
        assert_eq!(index, u32::from_ne_bytes([9, 0, 0, 0]));
        assert_eq!(addr.addr, v6);
        assert_eq!(addr.prefix_len, 128);
        assert!(!addr.is_usable());

        let mut msg = Message::new(0, 0);
        msg.fixed(&[libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0])
            .attr(libc::IFA_ADDRESS, &[10, 0, 0, 1])
            .attr(libc::IFA_LOCAL, &[169, 254, 20, 10]);
        let bytes = msg.finish(1);
        let (_, addr) = parse_addr(&bytes[NLMSG_HDR_LEN..]).unwrap().unwrap();
        // IFA_LOCAL wins over IFA_ADDRESS (the peer on point-to-point links).
        assert_eq!(addr.addr, IpAddr::from([169, 254, 20, 10]));
        assert!(addr.is_usable());

        // An address of a family we do not read is skipped, not an error.
        let mut msg = Message::new(0, 0);
        msg.fixed(&[libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0])
            .attr(libc::IFA_ADDRESS, &[1, 2, 3]);
        assert_eq!(parse_addr(&msg.finish(1)[NLMSG_HDR_LEN..]).unwrap(), None);
    }

    #[test]
    fn malformed_replies_are_errors() {
        // An address whose attribute claims 8 bytes and has 6.
        let mut payload = vec![libc::AF_INET as u8, 32, 0, 0, 1, 0, 0, 0];
        payload.extend_from_slice(&[8, 0, 1, 0, 10, 0]);
        assert_eq!(
            parse_addr(&payload),
            Err(Malformed("attribute length out of bounds"))
        );
        assert_eq!(
            parse_addr(&payload[..5]),
            Err(Malformed("shorter than an ifaddrmsg"))
        );
        // A link whose kind nest is cut short.
        let mut payload = ifinfomsg(3, 0, 0).to_vec();
        payload.extend_from_slice(&[
            12,
            0,
            libc::IFLA_LINKINFO as u8,
            0,
            9,
            0,
            1,
            0,
            b'v',
            0,
            0,
            0,
        ]);
        assert_eq!(
            parse_link(&payload),
            Err(Malformed("attribute length out of bounds"))
        );
        assert!(parse_link(&payload[..IFINFOMSG_LEN - 1]).is_err());
    }
}
