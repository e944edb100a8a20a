//! rtnetlink (`NETLINK_ROUTE`) spoken directly, for the few link, address and route requests
//! the agents and the eBPF crate make (node-local-dns's `nodelocaldns` link, the veth peer
//! check before `XDP_TX`). The workspace has no netlink crate, and these are short requests.
//!
//! Two halves, so that the byte layout is in one place and tested without privileges:
//! - sans-IO: [`Message`] builds a request (`nlmsghdr`, a fixed header such as
//!   [`ifinfomsg`], attributes, nesting); [`attrs`] walks the `rtattr`s of a reply and
//!   [`Ifinfo::parse`] reads an `ifinfomsg`; [`Replies`] frames the reply datagrams of one
//!   request and tells the ack, an error (as its errno) and the end of a dump apart. A
//!   malformed message is a [`Malformed`] error, never a panic and never a silently short
//!   answer.
//! - [`Socket`]: one `NETLINK_ROUTE` socket in the calling thread's network namespace, a
//!   receive deadline on every read and a bound on the datagrams read for one request.
//!
//! Everything here blocks: call it before the runtime serves or on the blocking pool.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
pub const NLMSG_HDR_LEN: usize = 16;
/// `struct ifinfomsg`: family u8, pad u8, type u16, index i32, flags u32, change u32.
pub const IFINFOMSG_LEN: usize = 16;
/// `struct rtattr`: len u16, type u16.
pub const RTA_HDR_LEN: usize = 4;
/// `NLA_F_NESTED`: marks a nested attribute.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER`.
const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// Mask of the attribute type without the nested/byte-order flags.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

/// Upper bound on reply datagrams read for one request (a dump of a busy node's addresses is a
/// few datagrams; this only stops a runaway loop).
const MAX_DATAGRAMS: usize = 4096;
/// Receive buffer for one datagram (the kernel sizes dump datagrams to at most a page or
/// 32 KiB).
const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// `n` rounded up to netlink's 4-byte alignment.
pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A message that does not have the layout netlink promises: what was wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed rtnetlink message: {0}")]
pub struct Malformed(pub &'static str);

impl From<Malformed> for io::Error {
    fn from(m: Malformed) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, m)
    }
}

/// The native-endian `u16` at `at`, if `b` is long enough.
pub fn read_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        b.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The native-endian `u32` at `at`, if `b` is long enough.
pub fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// A NUL-terminated string attribute (without the NUL; the whole payload if there is none).
pub fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Builds a netlink message: header, fixed part, attributes (with nesting).
#[derive(Debug)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    /// A message of `msg_type` (`RTM_*`) with `flags` (`NLM_F_*`).
    pub fn new(msg_type: u16, flags: u16) -> Message {
        let mut buf = vec![0u8; NLMSG_HDR_LEN];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Message {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends a fixed header (`ifinfomsg`, `ifaddrmsg`, `rtmsg`), padded.
    pub fn fixed(&mut self, bytes: &[u8]) -> &mut Message {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn pad(&mut self) {
        let aligned = align4(self.buf.len());
        self.buf.resize(aligned, 0);
    }

    /// Appends an attribute, padded.
    pub fn attr(&mut self, attr_type: u16, data: &[u8]) -> &mut Message {
        let len = (RTA_HDR_LEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// Appends a string attribute with its terminating NUL.
    pub fn attr_str(&mut self, attr_type: u16, value: &str) -> &mut Message {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        self.attr(attr_type, &data)
    }

    /// Opens a nested attribute; what follows is inside it until [`Message::end_nest`].
    pub fn begin_nest(&mut self, attr_type: u16) -> &mut Message {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(attr_type | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost open nest (its length now covers its children).
    pub fn end_nest(&mut self) -> &mut Message {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The bytes to send, with the total length and `seq` filled in.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A `struct ifinfomsg` for a request: family `AF_UNSPEC`, `index`, `flags` and the mask of
/// the flags to `change`.
pub fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut m = [0u8; IFINFOMSG_LEN];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// The `struct ifinfomsg` at the start of an `RTM_NEWLINK` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ifinfo {
    /// Interface index.
    pub index: u32,
    /// `IFF_*` flags.
    pub flags: u32,
}

impl Ifinfo {
    /// Reads the `ifinfomsg` of `payload` (a message after its `nlmsghdr`) and returns it with
    /// the attribute bytes that follow.
    pub fn parse(payload: &[u8]) -> Result<(Ifinfo, &[u8]), Malformed> {
        let attributes = payload
            .get(IFINFOMSG_LEN..)
            .ok_or(Malformed("shorter than an ifinfomsg"))?;
        let info = Ifinfo {
            index: read_u32(payload, 4).ok_or(Malformed("shorter than an ifinfomsg"))?,
            flags: read_u32(payload, 8).ok_or(Malformed("shorter than an ifinfomsg"))?,
        };
        Ok((info, attributes))
    }
}

/// Walks the `rtattr`s of `b` as (type without the nested/byte-order flags, payload). An
/// attribute whose length is below its header or past the end of `b` is an error, and the
/// walk ends there; padding after the last attribute is not.
pub fn attrs(b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Malformed>> {
    let mut rest = b;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (Some(len), Some(attr_type)) = (read_u16(rest, 0), read_u16(rest, 2)) else {
            rest = &[];
            return Some(Err(Malformed("attribute header truncated")));
        };
        let len = usize::from(len);
        if len < RTA_HDR_LEN || len > rest.len() {
            rest = &[];
            return Some(Err(Malformed("attribute length out of bounds")));
        }
        let payload = &rest[RTA_HDR_LEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((attr_type & NLA_TYPE_MASK, payload)))
    })
}

/// One reply message: its type (`RTM_NEWLINK`, ...) and the bytes after its `nlmsghdr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// The message after its header.
    pub payload: Vec<u8>,
}

/// The replies to one request, framed from the datagrams that arrive (the sans-IO half of
/// [`Socket::request`]). Messages of other sequence numbers are skipped.
#[derive(Debug)]
pub struct Replies {
    seq: u32,
    dump: bool,
    messages: Vec<Reply>,
}

impl Replies {
    /// Expects the replies to request `seq`; a `dump` ends with `NLMSG_DONE`, a GET without
    /// `NLM_F_ACK` with its one answer, anything else with the ack.
    pub fn new(seq: u32, dump: bool) -> Replies {
        Replies {
            seq,
            dump,
            messages: Vec::new(),
        }
    }

    /// Reads one datagram. `Ok(Some(messages))` once the request is answered; `Ok(None)` while
    /// more is to come; the kernel's error as its errno (`ENODEV`, `EEXIST`, ...).
    pub fn feed(&mut self, datagram: &[u8]) -> io::Result<Option<Vec<Reply>>> {
        let mut at = 0usize;
        while at < datagram.len() {
            let len = read_u32(datagram, at).ok_or(Malformed("message header truncated"))? as usize;
            if len < NLMSG_HDR_LEN || len > datagram.len() - at {
                return Err(Malformed("message length out of bounds").into());
            }
            let msg_type = read_u16(datagram, at + 4).unwrap_or(0);
            let msg_seq = read_u32(datagram, at + 8).unwrap_or(0);
            let payload = &datagram[at + NLMSG_HDR_LEN..at + len];
            at = at.saturating_add(align4(len));
            if msg_seq != self.seq {
                continue;
            }
            match i32::from(msg_type) {
                libc::NLMSG_ERROR => {
                    let code = read_u32(payload, 0)
                        .ok_or(Malformed("error message without its code"))?
                        as i32;
                    if code == 0 {
                        return Ok(Some(std::mem::take(&mut self.messages)));
                    }
                    return Err(io::Error::from_raw_os_error(code.saturating_neg()));
                }
                libc::NLMSG_DONE => return Ok(Some(std::mem::take(&mut self.messages))),
                _ => {
                    self.messages.push(Reply {
                        msg_type,
                        payload: payload.to_vec(),
                    });
                    if !self.dump {
                        // A non-dump GET answers with exactly one message and no ack.
                        return Ok(Some(std::mem::take(&mut self.messages)));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// A `NETLINK_ROUTE` socket, bound in the calling thread's network namespace.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a socket whose every receive gives up after `recv_timeout` (whole seconds).
    pub fn open(recv_timeout: Duration) -> io::Result<Socket> {
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
            tv_sec: recv_timeout.as_secs().max(1) as libc::time_t,
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
        // SAFETY: an all-zero sockaddr_nl is valid (the kernel assigns the port id).
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
        Ok(Socket { fd, seq: 0 })
    }

    /// Sends `msg` and collects its replies (see [`Replies`]): the messages before the ack or
    /// `NLMSG_DONE`, or the one answer of a GET; the kernel's error as its errno.
    pub fn request(&mut self, msg: Message, dump: bool) -> io::Result<Vec<Reply>> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        // SAFETY: send from a valid buffer of the given length on a valid socket.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Replies::new(self.seq, dump);
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        for _ in 0..MAX_DATAGRAMS {
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
            if let Some(messages) = replies.feed(&buf[..n as usize])? {
                return Ok(messages);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "netlink reply did not end",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reply datagram: one message of `msg_type` and `seq` with `payload`.
    fn message(msg_type: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut msg = Message::new(msg_type, 0);
        msg.fixed(payload);
        msg.finish(seq)
    }

    fn collect(b: &[u8]) -> Result<Vec<(u16, &[u8])>, Malformed> {
        attrs(b).collect()
    }

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
        let (info, rest) = Ifinfo::parse(&bytes[NLMSG_HDR_LEN..]).unwrap();
        assert_eq!(info, Ifinfo { index: 7, flags: 0 });
        let parsed = collect(rest).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, libc::IFLA_IFNAME);
        assert_eq!(c_string(parsed[0].1), "nodelocaldns");
    }

    #[test]
    fn nested_lengths_cover_their_children() {
        let mut msg = Message::new(libc::RTM_NEWLINK, 0);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .begin_nest(libc::IFLA_LINKINFO)
            .attr_str(libc::IFLA_INFO_KIND, "veth")
            .begin_nest(libc::IFLA_INFO_DATA)
            .attr(1, &[1, 2, 3, 4, 5])
            .end_nest()
            .end_nest();
        let bytes = msg.finish(1);
        let top = collect(&bytes[32..]).unwrap();
        assert_eq!(top.len(), 1);
        // The flag is masked off when read.
        assert_eq!(top[0].0, libc::IFLA_LINKINFO);
        assert_ne!(read_u16(&bytes, 34).unwrap() & NLA_F_NESTED, 0);
        let inner = collect(top[0].1).unwrap();
        assert_eq!(inner[0], (libc::IFLA_INFO_KIND, &b"veth\0"[..]));
        assert_eq!(inner[1].0, libc::IFLA_INFO_DATA);
        assert_eq!(
            collect(inner[1].1).unwrap(),
            vec![(1, &[1u8, 2, 3, 4, 5][..])]
        );
        // The whole message is consumed by the top-level attribute.
        assert_eq!(32 + align4(top[0].1.len() + RTA_HDR_LEN), bytes.len());
    }

    #[test]
    fn attributes_walk_aligned_and_mask_the_flags() {
        let mut msg = Message::new(0, 0);
        msg.attr(3, b"ab\0")
            .attr(0x8000 | 18, b"x")
            .attr(0x4000 | 5, b"");
        let bytes = msg.finish(0);
        assert_eq!(
            collect(&bytes[NLMSG_HDR_LEN..]).unwrap(),
            vec![(3, &b"ab\0"[..]), (18, &b"x"[..]), (5, &b""[..])]
        );
        assert_eq!(collect(&[]).unwrap(), vec![]);
    }

    #[test]
    fn malformed_attributes_are_errors_and_end_the_walk() {
        // Claims 8 bytes, has 6.
        assert_eq!(
            collect(&[8, 0, 3, 0, 1, 2]),
            Err(Malformed("attribute length out of bounds"))
        );
        // Shorter than its own header.
        assert_eq!(
            collect(&[2, 0, 3, 0]),
            Err(Malformed("attribute length out of bounds"))
        );
        // A good attribute, then three bytes of a header.
        let mut b = vec![5, 0, 3, 0, b'a', 0, 0, 0];
        b.extend_from_slice(&[8, 0, 1]);
        let walked: Vec<_> = attrs(&b).collect();
        assert_eq!(
            walked,
            vec![
                Ok((3, &b"a"[..])),
                Err(Malformed("attribute header truncated"))
            ]
        );
        // Every prefix of a real message walks without a panic.
        let mut msg = Message::new(0, 0);
        msg.begin_nest(1)
            .attr_str(2, "nested")
            .end_nest()
            .attr(3, &[9; 7]);
        let bytes = msg.finish(0);
        for end in NLMSG_HDR_LEN..bytes.len() {
            let _ = attrs(&bytes[NLMSG_HDR_LEN..end]).count();
        }
    }

    #[test]
    fn ifinfo_needs_the_whole_header() {
        let m = ifinfomsg(9, libc::IFF_UP as u32, 0);
        let (info, rest) = Ifinfo::parse(&m).unwrap();
        assert_eq!(
            (info.index, info.flags, rest.len()),
            (9, libc::IFF_UP as u32, 0)
        );
        let err = Ifinfo::parse(&m[..IFINFOMSG_LEN - 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "malformed rtnetlink message: shorter than an ifinfomsg"
        );
    }

    #[test]
    fn a_get_ends_with_its_one_answer_and_skips_other_sequences() {
        let mut replies = Replies::new(5, false);
        let mut datagram = message(libc::RTM_NEWLINK, 4, &[1; 4]);
        datagram.extend(message(libc::RTM_NEWLINK, 5, &[2; 8]));
        let got = replies.feed(&datagram).unwrap().unwrap();
        assert_eq!(
            got,
            vec![Reply {
                msg_type: libc::RTM_NEWLINK,
                payload: vec![2; 8]
            }]
        );
    }

    #[test]
    fn a_dump_spans_datagrams_until_done() {
        let mut replies = Replies::new(1, true);
        assert_eq!(
            replies
                .feed(&message(libc::RTM_NEWADDR, 1, &[1; 8]))
                .unwrap(),
            None
        );
        let mut last = message(libc::RTM_NEWADDR, 1, &[2; 8]);
        last.extend(message(libc::NLMSG_DONE as u16, 1, &[0; 4]));
        let got = replies.feed(&last).unwrap().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].payload, vec![2; 8]);
    }

    #[test]
    fn the_ack_ends_a_request_and_an_error_is_its_errno() {
        let ack = message(libc::NLMSG_ERROR as u16, 3, &0i32.to_ne_bytes());
        assert_eq!(Replies::new(3, false).feed(&ack).unwrap(), Some(vec![]));
        let nack = message(libc::NLMSG_ERROR as u16, 3, &(-libc::EEXIST).to_ne_bytes());
        let err = Replies::new(3, false).feed(&nack).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn malformed_replies_are_clear_errors() {
        let cases: [(&[u8], &str); 3] = [
            (&[16, 0, 0], "message header truncated"),
            (&[200, 0, 0, 0, 0, 0, 0, 0], "message length out of bounds"),
            (&[4, 0, 0, 0], "message length out of bounds"),
        ];
        for (datagram, what) in cases {
            let err = Replies::new(0, false).feed(datagram).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(
                err.to_string(),
                format!("malformed rtnetlink message: {what}")
            );
        }
        let short_error = message(libc::NLMSG_ERROR as u16, 0, &[]);
        let err = Replies::new(0, false).feed(&short_error).unwrap_err();
        assert!(
            err.to_string().contains("error message without its code"),
            "{err}"
        );
        // Every prefix of a real reply is an error or more to come, never a panic.
        let mut datagram = message(libc::RTM_NEWADDR, 0, &[7; 12]);
        datagram.extend(message(libc::NLMSG_DONE as u16, 0, &[0; 4]));
        for end in 0..datagram.len() {
            let _ = Replies::new(0, true).feed(&datagram[..end]);
        }
    }

    #[test]
    fn loopback_answers_a_get_and_a_missing_link_is_enodev() {
        let mut socket = Socket::open(Duration::from_secs(2)).unwrap();
        let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, "lo");
        let replies = socket.request(msg, false).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].msg_type, libc::RTM_NEWLINK);
        let (info, _) = Ifinfo::parse(&replies[0].payload).unwrap();
        assert!(info.index >= 1);
        let mut msg = Message::new(libc::RTM_GETLINK, libc::NLM_F_REQUEST as u16);
        msg.fixed(&ifinfomsg(0, 0, 0))
            .attr_str(libc::IFLA_IFNAME, "nld-no-such0");
        let err = socket.request(msg, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV), "{err}");
    }
}
