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
use boring::symm::{Cipher, Crypter, Mode};

/// QUIC version 1: the only version quiche 0.30 speaks.
const VERSION_1: u32 = 1;
/// RFC 9001 §5.2.
const INITIAL_SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
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

/// The server's Initial keys for a connection whose client chose `dcid` (RFC 9001 §5.2).
pub fn server_keys(dcid: &[u8]) -> Option<Keys> {
    let hkdf = HkdfSuite::new(MessageDigest::sha256());
    let initial = hkdf.extract(&INITIAL_SALT_V1, dcid).ok()?;
    let mut secret = [0u8; 32];
    expand_label(&initial, b"server in", &mut secret)?;
    let mut k = Keys {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(&secret, b"quic key", &mut k.key)?;
    expand_label(&secret, b"quic iv", &mut k.iv)?;
    expand_label(&secret, b"quic hp", &mut k.hp)?;
    Some(k)
}

fn aes_gcm_seal(k: &Keys, nonce: &[u8; 12], aad: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let mut c = Crypter::new(Cipher::aes_128_gcm(), Mode::Encrypt, &k.key, Some(nonce)).ok()?;
    c.aad_update(aad).ok()?;
    let mut out = vec![0u8; data.len() + 16];
    let n = c.update(data, &mut out).ok()?;
    let m = c.finalize(&mut out[n..]).ok()?;
    out.truncate(n + m);
    let mut tag = [0u8; TAG_LEN];
    c.get_tag(&mut tag).ok()?;
    out.extend_from_slice(&tag);
    Some(out)
}

fn hp_mask(hp: &[u8; 16], sample: &[u8]) -> Option<[u8; 16]> {
    let mut c = Crypter::new(Cipher::aes_128_ecb(), Mode::Encrypt, hp, None).ok()?;
    c.pad(false);
    let mut out = [0u8; 32];
    let n = c.update(sample, &mut out).ok()?;
    debug_assert_eq!(n, 16);
    let mut mask = [0u8; 16];
    mask.copy_from_slice(out.get(..16)?);
    Some(mask)
}

/// Builds the server Initial that answers a client Initial (`version`, its `dcid` and `scid`)
/// with CONNECTION_CLOSE(INVALID_TOKEN). `None` for a version other than 1 or CIDs longer than
/// QUIC allows (the caller then just drops the packet).
pub fn invalid_token_close(version: u32, dcid: &[u8], scid: &[u8]) -> Option<Vec<u8>> {
    if version != VERSION_1 || dcid.len() > MAX_CID || scid.len() > MAX_CID {
        return None;
    }
    let keys = server_keys(dcid)?;
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
    pkt.push(0xc0 | (pn_len as u8 - 1));
    pkt.extend_from_slice(&VERSION_1.to_be_bytes());
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
        let k = server_keys(&hex("8394c8f03e515708")).unwrap();
        assert_eq!(k.key.to_vec(), hex("cf3a5331653c364c88f0f379b6067e37"));
        assert_eq!(k.iv.to_vec(), hex("0ac1493ca1905853b0bba03e"));
        assert_eq!(k.hp.to_vec(), hex("c206b8d9b9f0f37644430b490eeaa314"));
    }

    #[test]
    fn other_versions_and_oversize_cids_get_nothing() {
        assert!(invalid_token_close(0xff00_001d, &[1; 8], &[2; 8]).is_none());
        assert!(invalid_token_close(1, &[1; 21], &[2; 8]).is_none());
        assert!(invalid_token_close(1, &[1; 8], &[2; 21]).is_none());
    }

    fn client_config() -> quiche::Config {
        let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
        c.set_application_protos(&[b"h3"]).unwrap();
        c.verify_peer(false);
        c
    }

    /// A real quiche client, after a Retry, takes our packet as the server's close with
    /// INVALID_TOKEN and stops at once.
    #[test]
    fn quiche_client_sees_invalid_token_close() {
        let mut cfg = client_config();
        let client: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
        let cscid = [7u8; 16];
        let cscid = quiche::ConnectionId::from_ref(&cscid);
        let mut q = quiche::connect(None, &cscid, client, server, &mut cfg).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = q.send(&mut buf).unwrap();
        let hdr = quiche::Header::from_slice(&mut buf[..n], 16).unwrap();

        let retry_scid = [9u8; 16];
        let mut out = [0u8; 1500];
        let n = quiche::retry(
            &hdr.scid,
            &hdr.dcid,
            &quiche::ConnectionId::from_ref(&retry_scid),
            b"some token",
            hdr.version,
            &mut out,
        )
        .unwrap();
        let info = quiche::RecvInfo {
            from: server,
            to: client,
        };
        q.recv(&mut out[..n], info).unwrap();
        let (n, _) = q.send(&mut buf).unwrap();
        let hdr = quiche::Header::from_slice(&mut buf[..n], 16).unwrap();
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
        let mut cfg = client_config();
        let client: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
        let cscid = [7u8; 16];
        let mut q = quiche::connect(
            None,
            &quiche::ConnectionId::from_ref(&cscid),
            client,
            server,
            &mut cfg,
        )
        .unwrap();
        let mut buf = [0u8; 1500];
        q.send(&mut buf).unwrap();
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
