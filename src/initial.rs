//! The one Initial packet h3gate sends without a connection: CONNECTION_CLOSE with
//! INVALID_TOKEN (RFC 9000 §8.1.3), protected with the Initial keys of RFC 9001 §5.2. Sans-IO.
//!
//! A client whose Retry token we cannot validate (it expired, or its NAT rebound between our
//! Retry and its next Initial, so the token names another address) will not accept a second
//! Retry. Dropping its Initials leaves it hanging until its handshake timeout; this close makes
//! it fail at once, and a browser starts over. Creating a quiche connection just to close it
//! would run a TLS handshake for an address nobody validated, which is what Retry exists to
//! avoid, so the packet is built here: about 60 bytes, no state, answered under the same rate
//! bound as stateless resets.

use boring::hash::MessageDigest;
use boring::hkdf::HkdfSuite;
use boring::symm::{self, Cipher};

const VERSION_1: u32 = 1;
const VERSION_2: u32 = quiche::PROTOCOL_VERSION_V2;
/// RFC 9001 §5.2.
const INITIAL_SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
/// RFC 9369 §3.3.1.
const INITIAL_SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];

/// What differs between the versions here (RFC 9369 §3): the salt, the HKDF labels (key, IV,
/// header protection) and the long-header type bits of an Initial.
struct VersionParams {
    salt: &'static [u8; 20],
    labels: [&'static [u8]; 3],
    initial_bits: u8,
}

fn version_params(version: u32) -> Option<VersionParams> {
    match version {
        VERSION_1 => Some(VersionParams {
            salt: &INITIAL_SALT_V1,
            labels: [b"quic key", b"quic iv", b"quic hp"],
            initial_bits: 0b00,
        }),
        VERSION_2 => Some(VersionParams {
            salt: &INITIAL_SALT_V2,
            labels: [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
            initial_bits: 0b01,
        }),
        _ => None,
    }
}
/// RFC 9000 §20.1.
pub const INVALID_TOKEN: u64 = 0x0b;
const CONNECTION_CLOSE: u8 = 0x1c;
const REASON: &[u8] = b"retry token invalid";
const TAG_LEN: usize = 16;
const MAX_CID: usize = 20;

/// Server-side Initial keys: AEAD key, IV and header protection key.
#[derive(Debug, PartialEq, Eq)]
pub struct Keys {
    pub key: [u8; 16],
    pub iv: [u8; 12],
    pub hp: [u8; 16],
}

/// HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
fn expand_label(prk: &[u8], label: &[u8], out: &mut [u8]) -> Option<()> {
    let mut info = Vec::with_capacity(4 + 6 + label.len());
    info.extend_from_slice(&(out.len() as u16).to_be_bytes());
    info.push((6 + label.len()) as u8);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(0);
    HkdfSuite::new(MessageDigest::sha256())
        .expand(prk, &info, out)
        .ok()
}

/// The server's Initial keys for a connection in `version` whose client chose `dcid` (RFC 9001
/// §5.2, RFC 9369 §3.3).
pub fn server_keys(version: u32, dcid: &[u8]) -> Option<Keys> {
    let v = version_params(version)?;
    let hkdf = HkdfSuite::new(MessageDigest::sha256());
    let initial = hkdf.extract(v.salt, dcid).ok()?;
    let mut secret = [0u8; 32];
    expand_label(&initial, b"server in", &mut secret)?;
    let mut k = Keys {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(&secret, v.labels[0], &mut k.key)?;
    expand_label(&secret, v.labels[1], &mut k.iv)?;
    expand_label(&secret, v.labels[2], &mut k.hp)?;
    Some(k)
}

/// AES-128-GCM: ciphertext followed by its tag.
fn aes_gcm_seal(k: &Keys, nonce: &[u8; 12], aad: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let mut tag = [0u8; TAG_LEN];
    let mut out = symm::encrypt_aead(
        Cipher::aes_128_gcm(),
        &k.key,
        Some(nonce),
        aad,
        data,
        &mut tag,
    )
    .ok()?;
    out.extend_from_slice(&tag);
    Some(out)
}

/// Header protection mask (RFC 9001 §5.4.3): AES-ECB of the 16-byte sample.
fn hp_mask(hp: &[u8; 16], sample: &[u8]) -> Option<[u8; 16]> {
    // `encrypt` pads, so it returns two blocks; the first is the sample's.
    let out = symm::encrypt(Cipher::aes_128_ecb(), hp, None, sample).ok()?;
    out.get(..16)?.try_into().ok()
}

/// Builds the server Initial that answers a client Initial (`version`, its `dcid` and `scid`)
/// with CONNECTION_CLOSE(INVALID_TOKEN). `None` for a version other than 1 and 2 or CIDs longer
/// than QUIC allows (the caller then just drops the packet).
pub fn invalid_token_close(version: u32, dcid: &[u8], scid: &[u8]) -> Option<Vec<u8>> {
    if dcid.len() > MAX_CID || scid.len() > MAX_CID {
        return None;
    }
    let initial_bits = version_params(version)?.initial_bits;
    let keys = server_keys(version, dcid)?;
    // Frame: type, error code, frame type (0: none in particular), reason.
    let mut plain = vec![CONNECTION_CLOSE, INVALID_TOKEN as u8, 0, REASON.len() as u8];
    plain.extend_from_slice(REASON);
    debug_assert!(
        plain.len() >= 4,
        "header protection samples 4 bytes past the PN"
    );

    // Long header, Initial, 1-byte packet number 0. Our DCID is the client's SCID; our SCID is
    // the CID the client addressed (the SCID of our Retry, so already one of ours).
    let pn_len = 1;
    let mut pkt = Vec::with_capacity(64 + dcid.len() + scid.len());
    pkt.push(0xc0 | (initial_bits << 4) | (pn_len as u8 - 1));
    pkt.extend_from_slice(&version.to_be_bytes());
    pkt.push(scid.len() as u8);
    pkt.extend_from_slice(scid);
    pkt.push(dcid.len() as u8);
    pkt.extend_from_slice(dcid);
    pkt.push(0); // token length
    let len = pn_len + plain.len() + TAG_LEN;
    debug_assert!(len < 16384);
    pkt.extend_from_slice(&(0x4000 | len as u16).to_be_bytes()); // 2-byte varint
    let pn_off = pkt.len();
    pkt.push(0); // packet number 0

    let nonce = keys.iv; // the IV XOR packet number 0
    let sealed = aes_gcm_seal(&keys, &nonce, &pkt, &plain)?;
    pkt.extend_from_slice(&sealed);

    let sample = pkt.get(pn_off + 4..pn_off + 20)?;
    let mask = hp_mask(&keys.hp, sample)?;
    pkt[0] ^= mask[0] & 0x0f;
    for i in 0..pn_len {
        pkt[pn_off + i] ^= mask[1 + i];
    }
    Some(pkt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 9001 Appendix A.1.
    #[test]
    fn server_keys_match_rfc9001_vectors() {
        let k = server_keys(VERSION_1, &hex("8394c8f03e515708")).unwrap();
        assert_eq!(k.key.to_vec(), hex("cf3a5331653c364c88f0f379b6067e37"));
        assert_eq!(k.iv.to_vec(), hex("0ac1493ca1905853b0bba03e"));
        assert_eq!(k.hp.to_vec(), hex("c206b8d9b9f0f37644430b490eeaa314"));
    }

    /// RFC 9369 Appendix A.1 (the same values as aioquic derives).
    #[test]
    fn server_keys_match_rfc9369_vectors() {
        let k = server_keys(VERSION_2, &hex("8394c8f03e515708")).unwrap();
        assert_eq!(k.key.to_vec(), hex("82db637861d55e1d011f19ea71d5d2a7"));
        assert_eq!(k.iv.to_vec(), hex("dd13c276499c0249d3310652"));
        assert_eq!(k.hp.to_vec(), hex("edf6d05c83121201b436e16877593c3a"));
    }

    #[test]
    fn other_versions_and_oversize_cids_get_nothing() {
        assert!(invalid_token_close(0xff00_001d, &[1; 8], &[2; 8]).is_none());
        assert!(invalid_token_close(1, &[1; 21], &[2; 8]).is_none());
        assert!(invalid_token_close(1, &[1; 8], &[2; 21]).is_none());
    }

    /// A real quiche client, after a Retry, takes our packet as the server's close with
    /// INVALID_TOKEN and stops at once.
    #[test]
    fn quiche_client_sees_invalid_token_close() {
        for version in [VERSION_1, VERSION_2] {
            client_sees_invalid_token_close(version);
        }
    }

    fn client_sees_invalid_token_close(version: u32) {
        let client: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
        let (mut q, mut first) = testing::client_v(version, &[7; 16], client, server);
        let retry_scid = [9u8; 16];
        let mut retry = testing::retry(&mut first, &retry_scid, b"some token");
        let info = quiche::RecvInfo {
            from: server,
            to: client,
        };
        q.recv(&mut retry, info).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = q.send(&mut buf).unwrap();
        let hdr = quiche::Header::from_slice(&mut buf[..n], 16).unwrap();
        assert_eq!(hdr.version, version);
        assert_eq!(hdr.ty, quiche::Type::Initial);
        assert_eq!(hdr.token.as_deref(), Some(&b"some token"[..]));
        assert_eq!(hdr.dcid.as_ref(), &retry_scid);

        let mut close = invalid_token_close(hdr.version, &hdr.dcid, &hdr.scid).unwrap();
        assert!(close.len() < 100, "{} bytes", close.len());
        q.recv(&mut close, info).unwrap();
        assert!(q.is_draining() || q.is_closed());
        let e = q.peer_error().expect("peer error");
        assert!(!e.is_app);
        assert_eq!(e.error_code, INVALID_TOKEN);
        assert_eq!(e.reason, REASON);
    }

    /// The same packet under a different client's keys is garbage to it (the keys really
    /// come from the DCID): quiche drops it and the connection lives on.
    #[test]
    fn wrong_keys_are_dropped_by_the_client() {
        let client: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
        let cscid = [7u8; 16];
        let (mut q, _) = testing::client(&cscid, client, server);
        let mut close = invalid_token_close(1, &[3u8; 16], &cscid).unwrap();
        let info = quiche::RecvInfo {
            from: server,
            to: client,
        };
        let _ = q.recv(&mut close, info);
        assert!(!q.is_draining() && !q.is_closed());
        assert!(q.peer_error().is_none());
    }
}

/// A quiche client for the tests of this module and of `frontend`: its first Initial, and the
/// Retry a server would answer it with.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;

    /// A client with source CID `scid` at `local`, and the first Initial it sends to `peer`.
    pub(crate) fn client(
        scid: &[u8],
        local: SocketAddr,
        peer: SocketAddr,
    ) -> (quiche::Connection, Vec<u8>) {
        client_v(quiche::PROTOCOL_VERSION, scid, local, peer)
    }

    /// The same in QUIC `version`.
    pub(crate) fn client_v(
        version: u32,
        scid: &[u8],
        local: SocketAddr,
        peer: SocketAddr,
    ) -> (quiche::Connection, Vec<u8>) {
        let mut cfg = quiche::Config::new(version).expect("config");
        cfg.set_application_protos(&[b"h3"]).expect("alpn");
        cfg.verify_peer(false);
        let scid = quiche::ConnectionId::from_ref(scid);
        let mut q = quiche::connect(None, &scid, local, peer, &mut cfg).expect("connect");
        let mut buf = vec![0u8; 1500];
        let (n, _) = q.send(&mut buf).expect("send");
        buf.truncate(n);
        (q, buf)
    }

    /// The Retry answering the client Initial `initial`, moving it to `retry_scid` with `token`.
    pub(crate) fn retry(initial: &mut [u8], retry_scid: &[u8], token: &[u8]) -> Vec<u8> {
        let hdr = quiche::Header::from_slice(initial, 16).expect("hdr");
        let mut out = vec![0u8; 1500];
        let n = quiche::retry(
            &hdr.scid,
            &hdr.dcid,
            &quiche::ConnectionId::from_ref(retry_scid),
            token,
            hdr.version,
            &mut out,
        )
        .expect("retry");
        out.truncate(n);
        out
    }
}
