//! Connection IDs we issue, stateless reset tokens and stateless reset packets. Sans-IO.
//!
//! Layout of our CIDs (DESIGN.md): `CID_LEN` bytes, byte 0 = the owning worker's index in the
//! SO_REUSEPORT group (the kernel's BPF steering program reads it), the rest random.
//! Reset tokens are `HMAC-SHA256(secret, cid)[..16]` (RFC 9000 §10.3.2), so any worker that shares
//! the secret can answer a datagram for a CID it has lost track of, without keeping state.

use boring::hash::hmac_sha256;

pub const CID_LEN: usize = 16;

/// Smallest stateless reset we send: 5 bytes of unpredictable bits + 16 bytes of token (§10.3).
const MIN_RESET_LEN: usize = 21;

/// Secret behind reset tokens (and, later, Retry tokens).
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn random() -> Self {
        let mut s = [0u8; 32];
        fill_random(&mut s);
        Secret(s)
    }

    /// A fixed secret: `cluster-secret` (every node sharing it can answer for another), tests
    /// and fuzzing (reproducible tokens). Without `cluster-secret`, production uses `random`.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Secret(b)
    }

    /// A key for one purpose, so material minted for one use never validates for another.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.0, label).unwrap_or_else(|_| {
            let mut r = [0u8; 32];
            fill_random(&mut r);
            r
        })
    }

    /// RFC 9000 §10.3.2: a token that is a function of the CID and a static key.
    pub fn reset_token(&self, cid: &[u8]) -> u128 {
        // hmac_sha256 only fails on allocation failure inside BoringSSL; fall back to a keyed
        // value that is still unpredictable to a peer rather than aborting.
        let mac = hmac_sha256(&self.0, cid).unwrap_or_else(|_| {
            let mut r = [0u8; 32];
            fill_random(&mut r);
            r
        });
        let mut t = [0u8; 16];
        t.copy_from_slice(&mac[..16]);
        u128::from_be_bytes(t)
    }
}

pub fn fill_random(buf: &mut [u8]) {
    // BoringSSL's RAND_bytes cannot fail short of a broken process; treat it as an invariant.
    boring::rand::rand_bytes(buf).expect("BoringSSL RNG failed");
}

/// A fresh CID owned by `worker`.
pub fn new_cid(worker: u8) -> [u8; CID_LEN] {
    let mut cid = [0u8; CID_LEN];
    fill_random(&mut cid);
    cid[0] = worker;
    cid
}

/// The worker byte of a CID we issued (None for a CID of the wrong length, e.g. a client's
/// initial DCID).
pub fn owner_of(dcid: &[u8]) -> Option<u8> {
    if dcid.len() == CID_LEN {
        dcid.first().copied()
    } else {
        None
    }
}

/// Whether a short-header datagram of `trigger_len` bytes is big enough to be answered with a
/// stateless reset (see [`stateless_reset`]).
pub fn reset_fits(trigger_len: usize) -> bool {
    reset_len(trigger_len).is_some()
}

/// The length of the reset answering `trigger_len` bytes: smaller than the trigger so two
/// endpoints cannot loop (RFC 9000 §10.3.3), at most 43, at least `MIN_RESET_LEN`.
fn reset_len(trigger_len: usize) -> Option<usize> {
    let len = trigger_len.checked_sub(1)?.min(43);
    (len >= MIN_RESET_LEN).then_some(len)
}

/// Builds a stateless reset answering a short-header datagram of `trigger_len` bytes for `dcid`.
/// Returns None when the trigger is too small: a reset must be smaller than what caused it so two
/// endpoints cannot loop (RFC 9000 §10.3.3), and at least `MIN_RESET_LEN`.
pub fn stateless_reset(
    secret: &Secret,
    dcid: &[u8],
    trigger_len: usize,
    out: &mut [u8],
) -> Option<usize> {
    // A caller's buffer may be shorter than 43: the reset shrinks to it, down to the minimum.
    let len = reset_len(trigger_len)?.min(out.len());
    if len < MIN_RESET_LEN {
        return None;
    }
    let pkt = out.get_mut(..len)?;
    fill_random(pkt);
    // Short header form: fixed bit set, form bit clear (§10.3).
    pkt[0] = (pkt[0] & 0x3f) | 0x40;
    pkt[len - 16..].copy_from_slice(&secret.reset_token(dcid).to_be_bytes());
    debug_assert!(len < trigger_len);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_carries_worker_byte() {
        let c = new_cid(3);
        assert_eq!(c[0], 3);
        assert_eq!(owner_of(&c), Some(3));
        assert_eq!(owner_of(&c[..8]), None);
        assert_ne!(new_cid(3), c, "random part differs");
    }

    #[test]
    fn reset_token_is_keyed_and_stable() {
        let a = Secret::from_bytes([1; 32]);
        let b = Secret::from_bytes([2; 32]);
        let cid = new_cid(0);
        assert_eq!(a.reset_token(&cid), a.reset_token(&cid));
        assert_ne!(a.reset_token(&cid), b.reset_token(&cid));
    }

    #[test]
    fn reset_is_smaller_than_trigger_and_ends_with_token() {
        let s = Secret::from_bytes([7; 32]);
        let cid = new_cid(1);
        let mut out = [0u8; 1500];
        for trigger in [0usize, 10, 21, 22, 40, 100, 1200] {
            match stateless_reset(&s, &cid, trigger, &mut out) {
                Some(n) => {
                    assert!(n < trigger && n >= MIN_RESET_LEN);
                    assert_eq!(out[0] & 0xc0, 0x40);
                    assert_eq!(&out[n - 16..n], &s.reset_token(&cid).to_be_bytes());
                }
                None => assert!(trigger <= MIN_RESET_LEN),
            }
        }
        // The cheap pre-check the frontend runs before paying for a reset agrees with it.
        for trigger in 0..100 {
            assert_eq!(
                reset_fits(trigger),
                stateless_reset(&s, &cid, trigger, &mut out).is_some(),
                "trigger {trigger}"
            );
        }
    }
}
