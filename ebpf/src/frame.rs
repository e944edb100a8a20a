//! Ethernet frames carrying UDP, built and checked in userspace: what tests and the benchmark
//! feed to `BPF_PROG_TEST_RUN`, and how they check what comes back (addresses, lengths and
//! both checksums verified from scratch).

use std::net::{IpAddr, SocketAddr};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;

/// The MAC addresses of frames built here: (destination, source).
pub const MACS: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]);

/// A UDP datagram found in a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

/// An Ethernet frame with an IPv4 or IPv6 header (by the addresses' family) and UDP, from
/// `src` to `dst` carrying `payload`, with correct checksums; with `vlan`, an 802.1Q tag.
/// `src` and `dst` must be of one family.
pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8], vlan: Option<u16>) -> Vec<u8> {
    let mut frame = Vec::with_capacity(66 + payload.len());
    frame.extend_from_slice(&MACS.0);
    frame.extend_from_slice(&MACS.1);
    if let Some(id) = vlan {
        frame.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
        frame.extend_from_slice(&(id & 0x0fff).to_be_bytes());
    }
    let udp_len = (8 + payload.len()) as u16;
    let mut segment = Vec::with_capacity(usize::from(udp_len));
    segment.extend_from_slice(&src.port().to_be_bytes());
    segment.extend_from_slice(&dst.port().to_be_bytes());
    segment.extend_from_slice(&udp_len.to_be_bytes());
    segment.extend_from_slice(&[0, 0]);
    segment.extend_from_slice(payload);
    let check = udp_checksum(src.ip(), dst.ip(), &segment);
    segment[6..8].copy_from_slice(&check.to_be_bytes());
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
            ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = IPPROTO_UDP;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let check = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&udp_len.to_be_bytes());
            frame.push(IPPROTO_UDP);
            frame.push(64);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => panic!("frame::udp: {src} and {dst} are of different families"),
    }
    frame.extend_from_slice(&segment);
    frame
}

/// The UDP datagram in `frame` if it is an untagged IPv4 or IPv6 UDP frame whose lengths
/// agree and whose checksums (IPv4 header, UDP) are right; otherwise why not.
pub fn parse_udp(frame: &[u8]) -> Result<Datagram, String> {
    let short = || format!("a frame of {} bytes is too short", frame.len());
    let eth = frame.get(..14).ok_or_else(short)?;
    let mut dst_mac = [0; 6];
    let mut src_mac = [0; 6];
    dst_mac.copy_from_slice(&eth[..6]);
    src_mac.copy_from_slice(&eth[6..12]);
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let (src_ip, dst_ip, hop_limit, segment): (IpAddr, IpAddr, u8, &[u8]) = match ethertype {
        ETH_P_IP => {
            let ip = frame.get(14..34).ok_or_else(short)?;
            if ip[0] != 0x45 || ip[9] != IPPROTO_UDP {
                return Err("not a plain IPv4 UDP header".into());
            }
            if checksum(&[ip]) != 0 {
                return Err("IPv4 header checksum is wrong".into());
            }
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let src: [u8; 4] = ip[12..16].try_into().expect("4 bytes");
            let dst: [u8; 4] = ip[16..20].try_into().expect("4 bytes");
            let segment = frame
                .get(34..14 + total)
                .ok_or("IPv4 total length beyond the frame")?;
            (src.into(), dst.into(), ip[8], segment)
        }
        ETH_P_IPV6 => {
            let ip = frame.get(14..54).ok_or_else(short)?;
            if ip[6] != IPPROTO_UDP {
                return Err("not UDP over IPv6".into());
            }
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let src: [u8; 16] = ip[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = ip[24..40].try_into().expect("16 bytes");
            let segment = frame
                .get(54..54 + payload)
                .ok_or("IPv6 payload length beyond the frame")?;
            (src.into(), dst.into(), ip[7], segment)
        }
        other => return Err(format!("ethertype {other:#06x}")),
    };
    if segment.len() < 8 {
        return Err("UDP header cut short".into());
    }
    let udp_len = usize::from(u16::from_be_bytes([segment[4], segment[5]]));
    if udp_len != segment.len() {
        return Err(format!(
            "UDP length {udp_len} but {} bytes in the IP payload",
            segment.len()
        ));
    }
    let stored = u16::from_be_bytes([segment[6], segment[7]]);
    if stored == 0 && dst_ip.is_ipv6() {
        return Err("UDP checksum 0 over IPv6".into());
    }
    if stored != 0 && verify(src_ip, dst_ip, segment) != 0 {
        return Err("UDP checksum is wrong".into());
    }
    Ok(Datagram {
        dst_mac,
        src_mac,
        src: SocketAddr::new(src_ip, u16::from_be_bytes([segment[0], segment[1]])),
        dst: SocketAddr::new(dst_ip, u16::from_be_bytes([segment[2], segment[3]])),
        hop_limit,
        payload: segment[8..].to_vec(),
    })
}

/// The UDP checksum of `segment` (its checksum field taken as it is) with the pseudo-header
/// of `src` and `dst`; 0 comes out as 0xffff (RFC 768).
fn udp_checksum(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    let check = verify(src, dst, segment);
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// The ones'-complement sum over pseudo-header and `segment`, complemented: 0 when the
/// checksum field in `segment` is right.
fn verify(src: IpAddr, dst: IpAddr, segment: &[u8]) -> u16 {
    let addrs = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let (s, d) = (addrs(src), addrs(dst));
    let len = (segment.len() as u32).to_be_bytes();
    let pseudo = [0, 0, 0, IPPROTO_UDP];
    checksum(&[&s, &d, &len, &pseudo, segment])
}

/// The Internet checksum (RFC 1071) of the concatenated parts; each part but the last must
/// have an even length.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            sum += u64::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_valid_checksums() {
        for (src, dst) in [
            ("10.0.0.2:40000", "169.254.20.10:53"),
            ("[fd00::2]:40000", "[fd00::a]:53"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for payload in [&b"odd"[..], b"even", b""] {
                let frame = udp(src, dst, payload, None);
                let d = parse_udp(&frame).unwrap();
                assert_eq!((d.src, d.dst, d.payload.as_slice()), (src, dst, payload));
                let mut broken = frame.clone();
                *broken.last_mut().unwrap() ^= 0x40;
                if !payload.is_empty() {
                    assert!(
                        parse_udp(&broken).is_err(),
                        "a flipped bit must fail the checksum"
                    );
                }
            }
        }
    }

    #[test]
    fn vlan_frames_are_not_plain_udp() {
        let frame = udp(
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.1:53".parse().unwrap(),
            b"x",
            Some(7),
        );
        assert!(parse_udp(&frame).unwrap_err().contains("0x8100"));
    }
}
