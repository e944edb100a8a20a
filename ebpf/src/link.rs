//! What the kernel says about a network interface, read over rtnetlink (`RTM_GETLINK`): its
//! kind (`veth`), its peer (`IFLA_LINK`, and `IFLA_LINK_NETNSID` when the peer lives in another
//! network namespace), whether it is up, and the XDP programs attached to it (`IFLA_XDP`).
//!
//! A veth's peer is usually in a pod's namespace. Its attributes are read from here with
//! `IFLA_TARGET_NETNSID` (Linux 4.20+), without entering that namespace. This is what
//! [`crate::dns::xdp_tx_delivery`] needs to decide whether an `XDP_TX` reply can reach the pod.
//! GRO can be read and set too (`ETHTOOL_GGRO`/`ETHTOOL_SGRO`), for the tests that show it is
//! not enough.
//! Raw netlink with `libc`, because the workspace has no netlink crate and this is one request.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_XDP: u16 = 43;
const IFLA_TARGET_NETNSID: u16 = 46;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
/// `XDP_ATTACHED_*` of `IFLA_XDP_ATTACHED`.
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_MULTI: u8 = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

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
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    get_link(0, &[(IFLA_IFNAME, &attr)])
}

/// The interface with `index` in the namespace `netnsid` (an id as this namespace knows it,
/// from [`Link::link_netnsid`]), or in this namespace for None.
pub fn by_index(index: u32, netnsid: Option<i32>) -> io::Result<Link> {
    let nsid = netnsid.map(i32::to_ne_bytes);
    let attrs: Vec<(u16, &[u8])> = nsid
        .as_ref()
        .map(|n| (IFLA_TARGET_NETNSID, &n[..]))
        .into_iter()
        .collect();
    let index = i32::try_from(index)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    get_link(index, &attrs)
}

fn get_link(index: i32, attrs: &[(u16, &[u8])]) -> io::Result<Link> {
    let mut msg = vec![0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
    msg[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    msg[6..8].copy_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // ifinfomsg: family AF_UNSPEC, type 0, index, flags 0, change 0.
    msg[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&index.to_ne_bytes());
    for (kind, value) in attrs {
        let len = 4 + value.len();
        msg.extend_from_slice(&(len as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(value);
        msg.resize(msg.len().next_multiple_of(4), 0);
    }
    let total = msg.len() as u32;
    msg[0..4].copy_from_slice(&total.to_ne_bytes());

    parse_reply(&request(&msg)?)
}

/// Sends one request and returns the reply.
fn request(msg: &[u8]) -> io::Result<Vec<u8>> {
    let socket = socket()?;
    // SAFETY: send(2) of an initialised buffer on a socket we own.
    let sent = unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: recv(2) into a buffer of the length given, on a socket we own.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
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
    // SAFETY: a fresh descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: setsockopt(2) with a timeval of the size given; a failure only loses the
    // deadline, and the kernel answers a GETLINK at once.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(socket)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("rtnetlink reply: {what}"),
    )
}

/// The attributes in `b`: (type without the nested/byte-order bits, payload).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let kind = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

fn parse_reply(b: &[u8]) -> io::Result<Link> {
    let len = u32_at(b, 0).ok_or_else(|| malformed("short"))? as usize;
    let kind = u16_at(b, 4).ok_or_else(|| malformed("short"))?;
    let b = b.get(..len).ok_or_else(|| malformed("truncated"))?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(b, NLMSG_HDRLEN).ok_or_else(|| malformed("short error"))? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != RTM_NEWLINK {
        return Err(malformed(&format!("message type {kind}")));
    }
    let info = b
        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + IFINFOMSG_LEN)
        .ok_or_else(|| malformed("no ifinfomsg"))?;
    let mut link = Link {
        index: u32_at(info, 4).unwrap_or(0),
        up: u32_at(info, 8).unwrap_or(0) & libc::IFF_UP as u32 != 0,
        ..Link::default()
    };
    for (kind, payload) in attributes(&b[NLMSG_HDRLEN + IFINFOMSG_LEN..]) {
        match kind {
            IFLA_IFNAME => {
                let end = payload
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(payload.len());
                link.name = String::from_utf8_lossy(&payload[..end]).into_owned();
            }
            IFLA_LINK => link.link = u32_at(payload, 0),
            IFLA_LINK_NETNSID => link.link_netnsid = u32_at(payload, 0).map(|n| n as i32),
            IFLA_LINKINFO => {
                for (k, p) in attributes(payload) {
                    if k == IFLA_INFO_KIND {
                        let end = p.iter().position(|&c| c == 0).unwrap_or(p.len());
                        link.kind = Some(String::from_utf8_lossy(&p[..end]).into_owned());
                    }
                }
            }
            IFLA_XDP => {
                let (mut attached, mut prog) = (0u8, None);
                for (k, p) in attributes(payload) {
                    match k {
                        IFLA_XDP_ATTACHED => attached = p.first().copied().unwrap_or(0),
                        IFLA_XDP_PROG_ID => prog = u32_at(p, 0),
                        IFLA_XDP_DRV_PROG_ID => link.xdp_drv_prog = u32_at(p, 0),
                        IFLA_XDP_SKB_PROG_ID => link.xdp_skb_prog = u32_at(p, 0),
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

    #[test]
    fn attributes_walk_aligned_and_stop_on_garbage() {
        let mut b = Vec::new();
        for (kind, payload) in [(3u16, &b"ab\0"[..]), (0x8000 | 18, &b"x"[..])] {
            b.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
            b.extend_from_slice(&kind.to_ne_bytes());
            b.extend_from_slice(payload);
            b.resize(b.len().next_multiple_of(4), 0);
        }
        b.extend_from_slice(&[200, 0, 1, 0]);
        let got: Vec<(u16, &[u8])> = attributes(&b).collect();
        assert_eq!(got, vec![(3, &b"ab\0"[..]), (18, &b"x"[..])]);
    }
}
