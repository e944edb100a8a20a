//! What the kernel says about a network interface, read over rtnetlink (`RTM_GETLINK`): its
//! kind (`veth`), its peer (`IFLA_LINK`, and `IFLA_LINK_NETNSID` when the peer lives in another
//! network namespace), whether it is up, and the XDP programs attached to it (`IFLA_XDP`).
//!
//! A veth's peer is usually in a pod's namespace. Its attributes are read from here with
//! `IFLA_TARGET_NETNSID` (Linux 4.20+), without entering that namespace. This is what
//! [`crate::dns::xdp_tx_delivery`] needs to decide whether an `XDP_TX` reply can reach the pod.
//! GRO can be read and set too (`ETHTOOL_GGRO`/`ETHTOOL_SGRO`), for the tests that show it is
//! not enough.
//! The request and reply bytes and the socket are [`agentkit::netlink`]'s, shared with
//! node-local-dns's link set-up; what is here is what an interface's attributes mean.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use agentkit::netlink::{self, attrs, c_string, read_u32, Ifinfo, Malformed, Message};

/// How long one rtnetlink receive may block (the kernel answers a GETLINK at once).
const RECV_TIMEOUT: Duration = Duration::from_secs(2);

const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
/// `XDP_ATTACHED_*` of `IFLA_XDP_ATTACHED`.
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_MULTI: u8 = 4;

/// An interface as rtnetlink describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    /// ifindex (in the namespace it was read in).
    pub index: u32,
    /// `IFLA_IFNAME`.
    pub name: String,
    /// `IFF_UP` is set.
    pub up: bool,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...); None for a physical NIC.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's ifindex in the peer's namespace.
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the peer's namespace as seen from the namespace this was read
    /// in; None when the peer is in the same namespace.
    pub link_netnsid: Option<i32>,
    /// Id of the XDP program attached in driver (native) mode.
    pub xdp_drv_prog: Option<u32>,
    /// Id of the XDP program attached in generic (SKB) mode.
    pub xdp_skb_prog: Option<u32>,
}

/// The interface called `name` in this thread's namespace.
pub fn by_name(name: &str) -> io::Result<Link> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let mut msg = get_link(0);
    msg.attr_str(libc::IFLA_IFNAME, name);
    read_link(msg)
}

/// The interface with `index` in the namespace `netnsid` (an id as this namespace knows it,
/// from [`Link::link_netnsid`]), or in this namespace for None.
pub fn by_index(index: u32, netnsid: Option<i32>) -> io::Result<Link> {
    if i32::try_from(index).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ifindex out of range",
        ));
    }
    let mut msg = get_link(index);
    if let Some(nsid) = netnsid {
        msg.attr(libc::IFLA_TARGET_NETNSID, &nsid.to_ne_bytes());
    }
    read_link(msg)
}

/// An `RTM_GETLINK` request for `index` (0: by the name attribute that follows).
fn get_link(index: u32) -> Message {
    let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
    msg.fixed(&netlink::ifinfomsg(index, 0, 0));
    msg
}

fn read_link(msg: Message) -> io::Result<Link> {
    let replies = netlink::Socket::open(RECV_TIMEOUT)?.request(msg, false)?;
    let reply = replies
        .first()
        .ok_or(Malformed("no answer to RTM_GETLINK"))?;
    if reply.msg_type != libc::RTM_NEWLINK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("rtnetlink reply: message type {}", reply.msg_type),
        ));
    }
    Ok(parse_link(&reply.payload)?)
}

/// Reads an `RTM_NEWLINK` payload (after its `nlmsghdr`).
fn parse_link(payload: &[u8]) -> Result<Link, Malformed> {
    let (info, attributes) = Ifinfo::parse(payload)?;
    let mut link = Link {
        index: info.index,
        up: info.flags & libc::IFF_UP as u32 != 0,
        ..Link::default()
    };
    for attr in attrs(attributes) {
        let (kind, payload) = attr?;
        match kind {
            libc::IFLA_IFNAME => link.name = c_string(payload),
            libc::IFLA_LINK => link.link = read_u32(payload, 0),
            libc::IFLA_LINK_NETNSID => link.link_netnsid = read_u32(payload, 0).map(|n| n as i32),
            libc::IFLA_LINKINFO => {
                for attr in attrs(payload) {
                    let (k, p) = attr?;
                    if k == libc::IFLA_INFO_KIND {
                        link.kind = Some(c_string(p));
                    }
                }
            }
            libc::IFLA_XDP => {
                let (mut attached, mut prog) = (0u8, None);
                for attr in attrs(payload) {
                    let (k, p) = attr?;
                    match k {
                        IFLA_XDP_ATTACHED => attached = p.first().copied().unwrap_or(0),
                        IFLA_XDP_PROG_ID => prog = read_u32(p, 0),
                        IFLA_XDP_DRV_PROG_ID => link.xdp_drv_prog = read_u32(p, 0),
                        IFLA_XDP_SKB_PROG_ID => link.xdp_skb_prog = read_u32(p, 0),
                        _ => {}
                    }
                }
                // With one program attached the kernel names only its mode and IFLA_XDP_PROG_ID.
                match attached {
                    XDP_ATTACHED_DRV => link.xdp_drv_prog = link.xdp_drv_prog.or(prog),
                    XDP_ATTACHED_SKB => link.xdp_skb_prog = link.xdp_skb_prog.or(prog),
                    XDP_ATTACHED_MULTI | 0 => {}
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(link)
}

/// Whether GRO is on for `name` in this thread's namespace (`ETHTOOL_GGRO`).
pub fn gro_enabled(name: &str) -> io::Result<bool> {
    ethtool_value(name, ETHTOOL_GGRO, 0)
}

/// Turns GRO on or off for `name` in this thread's namespace (`ETHTOOL_SGRO`, what
/// `ethtool -K <name> gro on|off` does); returns the state now.
pub fn set_gro(name: &str, on: bool) -> io::Result<bool> {
    ethtool_value(name, ETHTOOL_SGRO, u32::from(on))?;
    gro_enabled(name)
}

const ETHTOOL_GGRO: u32 = 0x2b;
const ETHTOOL_SGRO: u32 = 0x2c;

/// One `SIOCETHTOOL` call whose argument is a `struct ethtool_value`; returns its data != 0.
fn ethtool_value(name: &str, cmd: u32, data: u32) -> io::Result<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut EthtoolValue,
        pad: [u8; 16],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name",
        ));
    }
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data: &mut value,
        pad: [0; 16],
    };
    for (slot, &c) in req.name.iter_mut().zip(name.as_bytes()) {
        *slot = c as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL with an ifreq whose data points at an ethtool_value that outlives
    // the call (the ioctl ABI of ETHTOOL_GGRO and ETHTOOL_SGRO).
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCETHTOOL as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data != 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_read_by_name_and_index() {
        let lo = by_name("lo").unwrap();
        assert_eq!(lo.name, "lo");
        assert!(lo.index >= 1);
        assert_eq!(lo.kind, None, "not a virtual link kind");
        let again = by_index(lo.index, None).unwrap();
        assert_eq!(again, lo);
        let missing = by_name("nld-no-such0").unwrap_err();
        assert_eq!(missing.raw_os_error(), Some(libc::ENODEV), "{missing}");
    }

    /// An `RTM_NEWLINK` payload for ifindex 4, up, named `veth0`, with `extra` attributes.
    fn newlink(extra: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut msg = Message::new(libc::RTM_NEWLINK, 0);
        msg.fixed(&netlink::ifinfomsg(4, libc::IFF_UP as u32, 0))
            .attr_str(libc::IFLA_IFNAME, "veth0");
        extra(&mut msg);
        msg.finish(1)[netlink::NLMSG_HDR_LEN..].to_vec()
    }

    #[test]
    fn a_veth_with_its_peer_elsewhere_and_a_native_program() {
        let payload = newlink(|m| {
            m.begin_nest(libc::IFLA_LINKINFO)
                .attr_str(libc::IFLA_INFO_KIND, "veth")
                .end_nest()
                .attr(libc::IFLA_LINK, &9u32.to_ne_bytes())
                .attr(libc::IFLA_LINK_NETNSID, &3i32.to_ne_bytes())
                .begin_nest(libc::IFLA_XDP)
                .attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_DRV])
                .attr(IFLA_XDP_PROG_ID, &77u32.to_ne_bytes())
                .end_nest();
        });
        let link = parse_link(&payload).unwrap();
        assert_eq!(
            link,
            Link {
                index: 4,
                name: "veth0".into(),
                up: true,
                kind: Some("veth".into()),
                link: Some(9),
                link_netnsid: Some(3),
                xdp_drv_prog: Some(77),
                xdp_skb_prog: None,
            }
        );
    }

    #[test]
    fn both_xdp_modes_are_named_by_their_own_ids() {
        let payload = newlink(|m| {
            m.begin_nest(libc::IFLA_XDP)
                .attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_MULTI])
                .attr(IFLA_XDP_DRV_PROG_ID, &5u32.to_ne_bytes())
                .attr(IFLA_XDP_SKB_PROG_ID, &6u32.to_ne_bytes())
                .end_nest();
        });
        let link = parse_link(&payload).unwrap();
        assert_eq!((link.xdp_drv_prog, link.xdp_skb_prog), (Some(5), Some(6)));
        assert_eq!(link.kind, None, "no IFLA_LINKINFO: a physical NIC");
    }

    #[test]
    fn a_malformed_reply_is_an_error_not_a_short_link() {
        // IFLA_LINKINFO whose inner attribute claims more bytes than the nest holds.
        let payload = newlink(|m| {
            m.attr(libc::IFLA_LINKINFO, &[40, 0, 1, 0, b'v', b'e', b't', b'h']);
        });
        let err = parse_link(&payload).unwrap_err();
        assert_eq!(err, Malformed("attribute length out of bounds"));
        assert!(parse_link(&payload[..netlink::IFINFOMSG_LEN - 2]).is_err());
        // Every truncation parses or fails; none panics.
        for end in 0..payload.len() {
            let _ = parse_link(&payload[..end]);
        }
    }
}
