//! Retry tokens (RFC 9000 §8.1.2): stateless proof that a client owns its address. Sans-IO.
//!
//! Layout: `version(1) | expiry unix secs(8, BE) | odcid_len(1) | odcid | tag(32)` where
//! `tag = HMAC-SHA256(key, version | expiry | odcid_len | odcid | client ip | client port |
//! retry scid)`. The key is derived from the reset/cluster secret under its own label, so a
//! reset token can never be replayed as a Retry token. The tag is compared in constant time.

use std::net::SocketAddr;

use boring::hash::hmac_sha256;

use crate::cid::Secret;

const VERSION: u8 = 1;
const TAG: usize = 32;
/// A token is only good for the round trip right after the Retry.
pub const LIFETIME_SECS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadTag,
    Expired,
}

fn tag(key: &[u8; 32], body: &[u8], client: SocketAddr, retry_scid: &[u8]) -> [u8; TAG] {
    let mut msg = Vec::with_capacity(body.len() + 18 + 2 + retry_scid.len());
    msg.extend_from_slice(body);
    match client {
        SocketAddr::V4(a) => msg.extend_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => msg.extend_from_slice(&a.ip().octets()),
    }
    msg.extend_from_slice(&client.port().to_be_bytes());
    msg.extend_from_slice(retry_scid);
    // Allocation failure inside BoringSSL is the only error; an all-zero tag then simply never
    // validates (tokens fail closed).
    hmac_sha256(key, &msg).unwrap_or([0u8; TAG])
}

/// Mints the token sent in a Retry to `client`, whose Initial had DCID `odcid`; `retry_scid` is
/// the SCID of our Retry packet (the client's next DCID).
pub fn mint(
    secret: &Secret,
    unix_now: u64,
    client: SocketAddr,
    odcid: &[u8],
    retry_scid: &[u8],
) -> Vec<u8> {
    let key = secret.derive(b"h3gate retry token v1");
    let mut t = Vec::with_capacity(10 + odcid.len() + TAG);
    t.push(VERSION);
    t.extend_from_slice(&(unix_now + LIFETIME_SECS).to_be_bytes());
    t.push(odcid.len() as u8);
    t.extend_from_slice(odcid);
    let mac = tag(&key, &t, client, retry_scid);
    t.extend_from_slice(&mac);
    t
}

/// Checks a token from an Initial sent by `client` to DCID `retry_scid`; returns the original
/// DCID it certifies.
pub fn validate(
    secret: &Secret,
    unix_now: u64,
    client: SocketAddr,
    retry_scid: &[u8],
    token: &[u8],
) -> Result<Vec<u8>, TokenError> {
    if token.len() < 10 + TAG || token.first() != Some(&VERSION) {
        return Err(TokenError::Malformed);
    }
    let odcid_len = usize::from(*token.get(9).ok_or(TokenError::Malformed)?);
    if odcid_len > quiche::MAX_CONN_ID_LEN || token.len() != 10 + odcid_len + TAG {
        return Err(TokenError::Malformed);
    }
    let (body, mac) = token.split_at(10 + odcid_len);
    let key = secret.derive(b"h3gate retry token v1");
    let want = tag(&key, body, client, retry_scid);
    if !boring::memcmp::eq(&want, mac) {
        return Err(TokenError::BadTag);
    }
    let mut exp = [0u8; 8];
    exp.copy_from_slice(body.get(1..9).ok_or(TokenError::Malformed)?);
    if unix_now > u64::from_be_bytes(exp) {
        return Err(TokenError::Expired);
    }
    Ok(body.get(10..).ok_or(TokenError::Malformed)?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Secret, SocketAddr, Vec<u8>, Vec<u8>) {
        let s = Secret::from_bytes([9; 32]);
        let client: SocketAddr = "192.0.2.1:4433".parse().unwrap();
        (s, client, vec![0xaa; 8], vec![0x01; 16])
    }

    #[test]
    fn valid_token_returns_odcid() {
        let (s, client, odcid, scid) = setup();
        let t = mint(&s, 1000, client, &odcid, &scid);
        assert_eq!(validate(&s, 1005, client, &scid, &t), Ok(odcid));
    }

    #[test]
    fn expired_token_is_refused() {
        let (s, client, odcid, scid) = setup();
        let t = mint(&s, 1000, client, &odcid, &scid);
        assert_eq!(
            validate(&s, 1000 + LIFETIME_SECS + 1, client, &scid, &t),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn wrong_address_or_port_is_refused() {
        let (s, client, odcid, scid) = setup();
        let t = mint(&s, 1000, client, &odcid, &scid);
        let other_ip: SocketAddr = "192.0.2.2:4433".parse().unwrap();
        let other_port: SocketAddr = "192.0.2.1:4434".parse().unwrap();
        assert_eq!(
            validate(&s, 1000, other_ip, &scid, &t),
            Err(TokenError::BadTag)
        );
        assert_eq!(
            validate(&s, 1000, other_port, &scid, &t),
            Err(TokenError::BadTag)
        );
    }

    #[test]
    fn forged_or_foreign_tokens_are_refused() {
        let (s, client, odcid, scid) = setup();
        let mut t = mint(&s, 1000, client, &odcid, &scid);
        // Extending the expiry breaks the tag.
        t[1] = 0xff;
        assert_eq!(
            validate(&s, 1000, client, &scid, &t),
            Err(TokenError::BadTag)
        );
        // Another secret (another cluster) does not validate.
        let t = mint(&Secret::from_bytes([1; 32]), 1000, client, &odcid, &scid);
        assert_eq!(
            validate(&s, 1000, client, &scid, &t),
            Err(TokenError::BadTag)
        );
        // A different retry SCID (token replayed to another connection attempt).
        let t = mint(&s, 1000, client, &odcid, &scid);
        assert_eq!(
            validate(&s, 1000, client, &[2; 16], &t),
            Err(TokenError::BadTag)
        );
        for junk in [&[][..], &[1][..], &[1; 41][..], &[2; 60][..]] {
            assert!(validate(&s, 1000, client, &scid, junk).is_err());
        }
    }
}
