//! The packets coalesced in one QUIC datagram (RFC 9000 §12.2, §17), read the way a middlebox
//! can (long headers are in the clear): for the test relays and the simulation's judge.

/// A packet's type, from its first byte (and, for long headers, its version: QUIC v2 rotates the
/// type bits, RFC 9369 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
    /// A short header (1-RTT): always the last packet of a datagram.
    Short,
}

const QUIC_V2: u32 = 0x6b33_43cf;

/// The type of every packet coalesced in `datagram`, in order; `None` if a long header does not
/// parse (or its length runs past the datagram).
pub fn packet_types(mut datagram: &[u8]) -> Option<Vec<PacketType>> {
    let mut types = Vec::new();
    while let Some(&first) = datagram.first() {
        if first & 0x80 == 0 {
            types.push(PacketType::Short);
            break;
        }
        let ty = skip_long_header_packet(&mut datagram)?;
        types.push(ty);
    }
    Some(types)
}

/// Skips one long-header packet at the front of `d` and returns its type.
fn skip_long_header_packet(d: &mut &[u8]) -> Option<PacketType> {
    let first = *d.first()?;
    let version = u32::from_be_bytes(d.get(1..5)?.try_into().ok()?);
    let bits = (first >> 4) & 0x03;
    // v1: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry; v2: 1, 2, 3, 0.
    let bits = if version == QUIC_V2 {
        (bits + 3) % 4
    } else {
        bits
    };
    let ty = [
        PacketType::Initial,
        PacketType::ZeroRtt,
        PacketType::Handshake,
        PacketType::Retry,
    ][usize::from(bits)];
    skip(d, 5)?;
    let dcid = usize::from(*d.first()?);
    skip(d, 1 + dcid)?;
    let scid = usize::from(*d.first()?);
    skip(d, 1 + scid)?;
    if ty == PacketType::Initial {
        let token = varint(d)?;
        skip(d, token)?;
    }
    let len = varint(d)?;
    skip(d, len)?;
    Some(ty)
}

fn varint(d: &mut &[u8]) -> Option<usize> {
    let first = *d.first()?;
    let len = 1usize << (first >> 6);
    let bytes = d.get(..len)?;
    let v = bytes[1..]
        .iter()
        .fold(u64::from(first & 0x3f), |v, b| (v << 8) | u64::from(*b));
    *d = &d[len..];
    usize::try_from(v).ok()
}

fn skip(d: &mut &[u8], n: usize) -> Option<()> {
    *d = d.get(n..)?;
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_coalesced_long_headers_then_a_short_one() {
        // Initial (v1, 1-byte CIDs, no token, 2-byte payload), Handshake, then 1-RTT.
        let mut d = vec![0xc0, 0, 0, 0, 1, 1, 0xaa, 1, 0xbb, 0, 2, 0, 0];
        d.extend_from_slice(&[0xe0, 0, 0, 0, 1, 1, 0xaa, 1, 0xbb, 1, 0]);
        d.extend_from_slice(&[0x40, 1, 2, 3]);
        assert_eq!(
            packet_types(&d),
            Some(vec![
                PacketType::Initial,
                PacketType::Handshake,
                PacketType::Short
            ])
        );
        // A length that runs past the datagram.
        assert_eq!(packet_types(&d[..12]), None);
    }
}
