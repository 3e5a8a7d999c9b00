//! UDP control messages, encoded and decoded on plain byte buffers (no socket, no unsafe) so the
//! layout is unit-tested: UDP_SEGMENT (GSO) and IP_PKTINFO / IPV6_PKTINFO on send, UDP_GRO and
//! the packet-info destination address on receive.
//!
//! Layout (Linux, 64-bit): `struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; }`
//! followed by the data; every header and the total are aligned to `size_t`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const SOL_UDP: i32 = 17;
pub const UDP_SEGMENT: i32 = 103;
pub const UDP_GRO: i32 = 104;
const IPPROTO_IP: i32 = 0;
const IP_PKTINFO: i32 = 8;
const IPPROTO_IPV6: i32 = 41;
const IPV6_PKTINFO: i32 = 50;

const ALIGN: usize = std::mem::size_of::<usize>();
const HDR: usize = std::mem::size_of::<usize>() + 8;

/// Room for every control message we send or expect to receive.
pub const SPACE: usize = 128;

const fn align(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// `CMSG_SPACE(data_len)`.
pub const fn space(data_len: usize) -> usize {
    HDR + align(data_len)
}

/// Appends control messages to `buf` starting at `*off`.
pub struct Encoder<'a> {
    buf: &'a mut [u8],
    off: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Encoder { buf, off: 0 }
    }

    fn push(&mut self, level: i32, ty: i32, data: &[u8]) -> bool {
        let total = space(data.len());
        let Some(dst) = self.buf.get_mut(self.off..self.off + total) else {
            return false;
        };
        dst.fill(0);
        dst[..ALIGN].copy_from_slice(&(HDR + data.len()).to_ne_bytes());
        dst[ALIGN..ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
        dst[ALIGN + 4..HDR].copy_from_slice(&ty.to_ne_bytes());
        dst[HDR..HDR + data.len()].copy_from_slice(data);
        self.off += total;
        true
    }

    /// GSO: the kernel cuts the payload into `size`-byte datagrams (the last may be shorter).
    pub fn segment_size(&mut self, size: u16) -> bool {
        self.push(SOL_UDP, UDP_SEGMENT, &size.to_ne_bytes())
    }

    /// Source address for a reply on a wildcard-bound socket, so it leaves from the address
    /// the client sent to.
    pub fn source(&mut self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => {
                // struct in_pktinfo { int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr; }
                let mut d = [0u8; 12];
                d[4..8].copy_from_slice(&v4.octets());
                self.push(IPPROTO_IP, IP_PKTINFO, &d)
            }
            IpAddr::V6(v6) => {
                // struct in6_pktinfo { in6_addr ipi6_addr; int ipi6_ifindex; }
                let mut d = [0u8; 20];
                d[..16].copy_from_slice(&v6.octets());
                self.push(IPPROTO_IPV6, IPV6_PKTINFO, &d)
            }
        }
    }

    pub fn len(&self) -> usize {
        self.off
    }

    pub fn is_empty(&self) -> bool {
        self.off == 0
    }
}

/// What the kernel told us about a received datagram.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecvMeta {
    /// UDP_GRO: the payload is several datagrams of this size (the last may be shorter).
    pub gro_segment: Option<usize>,
    /// The destination address of the datagram (IP_PKTINFO / IPV6_PKTINFO).
    pub dst: Option<IpAddr>,
}

/// Walks the control messages in `buf` (the `msg_controllen` bytes the kernel wrote).
pub fn decode(buf: &[u8]) -> RecvMeta {
    let mut meta = RecvMeta::default();
    let mut off = 0;
    while let Some(hdr) = buf.get(off..off + HDR) {
        let mut len_bytes = [0u8; ALIGN];
        len_bytes.copy_from_slice(&hdr[..ALIGN]);
        let len = usize::from_ne_bytes(len_bytes);
        let level =
            i32::from_ne_bytes([hdr[ALIGN], hdr[ALIGN + 1], hdr[ALIGN + 2], hdr[ALIGN + 3]]);
        let ty = i32::from_ne_bytes([
            hdr[ALIGN + 4],
            hdr[ALIGN + 5],
            hdr[ALIGN + 6],
            hdr[ALIGN + 7],
        ]);
        if len < HDR {
            break; // malformed: stop rather than loop
        }
        let Some(data) = buf.get(off + HDR..off + len) else {
            break;
        };
        match (level, ty) {
            (SOL_UDP, UDP_GRO) if data.len() >= 4 => {
                let v = i32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                if v > 0 {
                    meta.gro_segment = Some(v as usize);
                }
            }
            (IPPROTO_IP, IP_PKTINFO) if data.len() >= 12 => {
                // ipi_addr: the header destination address.
                meta.dst = Some(IpAddr::V4(Ipv4Addr::new(
                    data[8], data[9], data[10], data[11],
                )));
            }
            (IPPROTO_IPV6, IPV6_PKTINFO) if data.len() >= 16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(&data[..16]);
                meta.dst = Some(IpAddr::V6(Ipv6Addr::from(a)));
            }
            _ => {}
        }
        off += align(len);
    }
    meta
}

/// Splits a (possibly GRO-coalesced) payload into datagrams of `stride` bytes; the last may be
/// shorter. A stride of 0 or larger than the payload yields the payload whole.
pub fn segments(payload: &mut [u8], stride: Option<usize>) -> impl Iterator<Item = &mut [u8]> {
    let stride = match stride {
        Some(s) if s > 0 && s < payload.len() => s,
        _ => payload.len().max(1),
    };
    payload.chunks_mut(stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a received control buffer the way the kernel lays it out.
    fn kernel_cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; space(data.len())];
        let mut e = Encoder::new(&mut b);
        assert!(e.push(level, ty, data));
        b
    }

    #[test]
    fn gro_and_pktinfo_decode() {
        let mut buf = kernel_cmsg(SOL_UDP, UDP_GRO, &1350i32.to_ne_bytes());
        let mut pi = [0u8; 12];
        pi[8..12].copy_from_slice(&[127, 0, 0, 2]);
        buf.extend(kernel_cmsg(IPPROTO_IP, IP_PKTINFO, &pi));
        let m = decode(&buf);
        assert_eq!(m.gro_segment, Some(1350));
        assert_eq!(m.dst, Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));
    }

    #[test]
    fn ipv6_pktinfo_decode() {
        let mut pi = [0u8; 20];
        pi[15] = 1;
        let m = decode(&kernel_cmsg(IPPROTO_IPV6, IPV6_PKTINFO, &pi));
        assert_eq!(m.dst, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn encode_segment_and_source() {
        let mut b = [0u8; SPACE];
        let mut e = Encoder::new(&mut b);
        assert!(e.segment_size(1200));
        assert!(e.source("10.0.0.1".parse().unwrap()));
        let n = e.len();
        assert_eq!(n, space(2) + space(12));
        // Our own decoder reads what we wrote (the pktinfo source is ipi_spec_dst, not ipi_addr,
        // so only the segment is visible to it).
        assert_eq!(decode(&b[..n]).gro_segment, None);
        assert_eq!(u16::from_ne_bytes([b[HDR], b[HDR + 1]]), 1200);
    }

    #[test]
    fn malformed_control_data_is_ignored() {
        assert_eq!(decode(&[]), RecvMeta::default());
        assert_eq!(decode(&[0xff; 7]), RecvMeta::default());
        let mut b = kernel_cmsg(SOL_UDP, UDP_GRO, &5i32.to_ne_bytes());
        b[0] = 3; // cmsg_len smaller than the header: must not loop or panic
        assert_eq!(decode(&b), RecvMeta::default());
        let mut b = kernel_cmsg(SOL_UDP, UDP_GRO, &5i32.to_ne_bytes());
        b[0] = 200; // longer than the buffer
        assert_eq!(decode(&b).gro_segment, None);
    }

    #[test]
    fn segments_split_by_stride() {
        let mut p: Vec<u8> = (0..10).collect();
        let parts: Vec<Vec<u8>> = segments(&mut p, Some(4)).map(|s| s.to_vec()).collect();
        assert_eq!(parts, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
        let whole: Vec<usize> = segments(&mut p, None).map(|s| s.len()).collect();
        assert_eq!(whole, vec![10]);
        let whole: Vec<usize> = segments(&mut p, Some(0)).map(|s| s.len()).collect();
        assert_eq!(whole, vec![10]);
    }
}
