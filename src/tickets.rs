//! TLS session ticket keys: one set per process, given to every worker's TLS context, so a
//! ticket issued on one worker resumes on any other. Sans-IO apart from `install` (which hands
//! BoringSSL a callback) and `load` (which reads the file).
//!
//! Two sources:
//! - By default, keys derived from a random process secret and the current 12-hour period: a key
//!   encrypts during its period and still decrypts during the next one (its ticket then gets
//!   renewed), so a ticket is good for 12 to 24 hours and no key lives longer than 24. Every
//!   worker derives the same key from the same time without sharing any state.
//! - `tls-ticket-keys FILE` (HAProxy's format): base64 keys, one a line, each 48 bytes (16 name,
//!   16 AES-128, 16 HMAC) or 80 bytes (16 name, 32 AES-256, 32 HMAC), all the same size. As in
//!   HAProxy, the last three decrypt and the second-to-last encrypts, so an operator rotates by
//!   appending a key and restarting every node, and nodes (or a restarted process) that share
//!   the file resume each other's sessions.
//!
//! Tickets are AES-CBC + HMAC-SHA256 keyed as HAProxy keys them, so a key file written for
//! HAProxy loads unchanged (each program still decrypts only its own tickets: the session
//! inside is BoringSSL's serialisation).

use crate::cid::Secret;
use boring::hash::MessageDigest;
use boring::hmac::HmacCtxRef;
use boring::ssl::{SslContextBuilder, SslRef, TicketKeyCallbackResult};
use boring::symm::{Cipher, CipherCtxRef};
use std::path::Path;
use std::sync::Arc;

/// How long a derived key encrypts (HAProxy's documentation suggests rotating every 12 h).
pub const ROTATION_SECS: u64 = 12 * 3600;
/// How many of a file's last keys still decrypt (HAProxy's TLS_TICKETS_NO).
pub const FILE_KEYS_USED: usize = 3;

/// One ticket key: a public name (sent in clear at the start of each ticket) and two secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct TicketKey {
    pub name: [u8; 16],
    /// 16 bytes (AES-128-CBC) or 32 (AES-256-CBC).
    aes: Vec<u8>,
    hmac: Vec<u8>,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secrets.
        write!(
            f,
            "TicketKey({:02x?}, aes-{})",
            &self.name[..4],
            self.aes.len() * 8
        )
    }
}

impl TicketKey {
    /// A key in HAProxy's binary layout: name, AES key, HMAC key.
    fn from_bytes(b: &[u8]) -> Option<TicketKey> {
        let half = match b.len() {
            48 => 16,
            80 => 32,
            _ => return None,
        };
        let mut name = [0u8; 16];
        name.copy_from_slice(&b[..16]);
        Some(TicketKey {
            name,
            aes: b[16..16 + half].to_vec(),
            hmac: b[16 + half..].to_vec(),
        })
    }

    fn cipher(&self) -> Cipher {
        if self.aes.len() == 32 {
            Cipher::aes_256_cbc()
        } else {
            Cipher::aes_128_cbc()
        }
    }
}

enum Source {
    Rotating {
        master: Secret,
    },
    /// At most `FILE_KEYS_USED` keys, oldest first; `encrypt` is the one that encrypts.
    File {
        keys: Vec<TicketKey>,
        encrypt: usize,
    },
}

/// The process's ticket keys.
pub struct TicketKeys {
    source: Source,
}

impl TicketKeys {
    /// Keys derived from a fresh random secret (the default).
    pub fn random() -> TicketKeys {
        TicketKeys {
            source: Source::Rotating {
                master: Secret::random(),
            },
        }
    }

    /// Derived keys from a given secret: tests, and `random`.
    pub fn rotating(master: [u8; 32]) -> TicketKeys {
        TicketKeys {
            source: Source::Rotating {
                master: Secret::from_bytes(master),
            },
        }
    }

    /// Parses a key file's text; an error names the file's line.
    pub fn from_file_text(text: &str) -> Result<TicketKeys, String> {
        let mut keys: Vec<TicketKey> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes = boring::base64::decode_block(line)
                .map_err(|_| format!("line {}: not a base64 key", i + 1))?;
            let key = TicketKey::from_bytes(&bytes).ok_or_else(|| {
                format!(
                    "line {}: a key is 48 or 80 bytes once decoded, this one is {}",
                    i + 1,
                    bytes.len()
                )
            })?;
            if let Some(first) = keys.first() {
                if first.aes.len() != key.aes.len() {
                    return Err(format!(
                        "line {}: all keys must be the same size (the first is {} bytes)",
                        i + 1,
                        16 + 2 * first.aes.len()
                    ));
                }
            }
            keys.push(key);
        }
        if keys.len() < FILE_KEYS_USED {
            return Err(format!(
                "needs at least {FILE_KEYS_USED} keys (the last {FILE_KEYS_USED} decrypt, the \
                 second-to-last encrypts), found {}",
                keys.len()
            ));
        }
        let keys = keys.split_off(keys.len() - FILE_KEYS_USED);
        let encrypt = keys.len() - 2;
        Ok(TicketKeys {
            source: Source::File { keys, encrypt },
        })
    }

    /// Reads and parses a key file; the error is the reason, without the path.
    pub fn load(path: &Path) -> Result<TicketKeys, String> {
        crate::config::check_readable(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        TicketKeys::from_file_text(&text)
    }

    /// Keys derived from a fresh random secret, or the last keys of `tls-ticket-keys`.
    pub fn from_config(g: &crate::config::Global) -> Result<TicketKeys, String> {
        match &g.tls_ticket_keys {
            None => Ok(TicketKeys::random()),
            Some((path, _)) => TicketKeys::load(path).map_err(|reason| {
                format!("cannot read tls-ticket-keys {}: {reason}", path.display())
            }),
        }
    }

    /// The key that encrypts new tickets at `unix_secs`.
    pub fn encrypting(&self, unix_secs: u64) -> TicketKey {
        match &self.source {
            Source::Rotating { master } => derive(master, unix_secs / ROTATION_SECS),
            Source::File { keys, encrypt } => keys[*encrypt].clone(),
        }
    }

    /// The key a ticket named `name` was made with, if it still decrypts at `unix_secs`, and
    /// whether the client should get a fresh ticket (its key no longer encrypts).
    pub fn decrypting(&self, name: &[u8; 16], unix_secs: u64) -> Option<(TicketKey, bool)> {
        match &self.source {
            Source::Rotating { master } => {
                let period = unix_secs / ROTATION_SECS;
                [period, period.wrapping_sub(1)].iter().find_map(|&p| {
                    let k = derive(master, p);
                    (k.name == *name).then_some((k, p != period))
                })
            }
            Source::File { keys, encrypt } => keys
                .iter()
                .position(|k| k.name == *name)
                .map(|i| (keys[i].clone(), i != *encrypt)),
        }
    }
}

/// The key of one rotation period: name and AES-128 key from one HMAC, the HMAC key from another.
fn derive(master: &Secret, period: u64) -> TicketKey {
    let block = |n: u8| {
        let mut label = b"h3gate ticket key ".to_vec();
        label.extend_from_slice(&period.to_be_bytes());
        label.push(n);
        master.derive(&label)
    };
    let (a, b) = (block(0), block(1));
    let mut name = [0u8; 16];
    name.copy_from_slice(&a[..16]);
    TicketKey {
        name,
        aes: a[16..].to_vec(),
        hmac: b.to_vec(),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the BoringSSL callback does, with the clock passed in.
fn on_ticket(
    keys: &TicketKeys,
    unix_secs: u64,
    name: &mut [u8; 16],
    iv: &mut [u8; 16],
    cipher: &mut CipherCtxRef,
    hmac: &mut HmacCtxRef,
    encrypt: bool,
) -> TicketKeyCallbackResult {
    if encrypt {
        let key = keys.encrypting(unix_secs);
        *name = key.name;
        crate::cid::fill_random(iv);
        let ok = cipher.init_encrypt(&key.cipher(), &key.aes, iv).is_ok()
            && hmac.init(&key.hmac, &MessageDigest::sha256()).is_ok();
        // No ticket rather than a broken one.
        return if ok {
            TicketKeyCallbackResult::Success
        } else {
            TicketKeyCallbackResult::Noop
        };
    }
    let Some((key, renew)) = keys.decrypting(name, unix_secs) else {
        // Unknown or expired: a full handshake, no error.
        return TicketKeyCallbackResult::Noop;
    };
    if cipher.init_decrypt(&key.cipher(), &key.aes, iv).is_err()
        || hmac.init(&key.hmac, &MessageDigest::sha256()).is_err()
    {
        return TicketKeyCallbackResult::Noop;
    }
    if renew {
        TicketKeyCallbackResult::DecryptSuccessRenew
    } else {
        TicketKeyCallbackResult::Success
    }
}

/// Makes `ctx` encrypt and decrypt its session tickets with `keys`.
pub fn install(ctx: &mut SslContextBuilder, keys: Arc<TicketKeys>) {
    let callback = move |_: &SslRef,
                         name: &mut [u8; 16],
                         iv: &mut [u8; 16],
                         cipher: &mut CipherCtxRef,
                         hmac: &mut HmacCtxRef,
                         encrypt: bool| {
        on_ticket(&keys, unix_now(), name, iv, cipher, hmac, encrypt)
    };
    // SAFETY: `on_ticket` sets the name and a fresh IV, and initialises both contexts with the
    // key of that name (or returns Noop), which is what SSL_CTX_set_tlsext_ticket_key_cb asks.
    unsafe { ctx.set_ticket_key_callback(callback) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_key(fill: u8, len: usize) -> String {
        boring::base64::encode_block(&vec![fill; len])
    }

    #[test]
    fn derived_keys_rotate_and_the_previous_one_still_decrypts() {
        let keys = TicketKeys::rotating([7; 32]);
        let t0 = 1_000 * ROTATION_SECS + 5;
        let k0 = keys.encrypting(t0);
        assert_eq!(keys.encrypting(t0 + 100), k0, "same period, same key");
        assert_eq!(keys.decrypting(&k0.name, t0), Some((k0.clone(), false)));
        let t1 = t0 + ROTATION_SECS;
        let k1 = keys.encrypting(t1);
        assert_ne!(k1.name, k0.name);
        assert_ne!(k1.aes, k0.aes);
        // Next period: still decrypts, and asks for a renewed ticket.
        assert_eq!(keys.decrypting(&k0.name, t1), Some((k0.clone(), true)));
        // Two periods on: gone.
        assert_eq!(keys.decrypting(&k0.name, t1 + ROTATION_SECS), None);
        // Another process (another secret) shares nothing.
        let other = TicketKeys::rotating([8; 32]);
        assert_eq!(other.decrypting(&k0.name, t0), None);
        // Two workers of one process derive the same key (the point of this module).
        assert_eq!(TicketKeys::rotating([7; 32]).encrypting(t0), k0);
    }

    #[test]
    fn key_file_uses_the_last_three_and_encrypts_with_the_second_to_last() {
        let text = [1u8, 2, 3, 4]
            .iter()
            .map(|&b| file_key(b, 48))
            .collect::<Vec<_>>()
            .join("\n");
        let keys = TicketKeys::from_file_text(&format!("# rotated by cron\n{text}\n")).unwrap();
        let enc = keys.encrypting(0);
        assert_eq!(enc.name, [3; 16]);
        assert_eq!(enc.aes, vec![3; 16]);
        assert_eq!(enc.hmac, vec![3; 16]);
        assert_eq!(keys.decrypting(&[3; 16], 0).map(|(_, r)| r), Some(false));
        assert_eq!(keys.decrypting(&[4; 16], 0).map(|(_, r)| r), Some(true));
        assert_eq!(keys.decrypting(&[2; 16], 0).map(|(_, r)| r), Some(true));
        // The first key has dropped out of the window.
        assert_eq!(keys.decrypting(&[1; 16], 0), None);
        // Time does not matter for file keys.
        assert_eq!(keys.encrypting(u64::MAX), enc);

        let big = [5u8, 6, 7].map(|b| file_key(b, 80)).join("\n");
        let keys = TicketKeys::from_file_text(&big).unwrap();
        assert_eq!(keys.encrypting(0).aes.len(), 32);
        assert_eq!(keys.encrypting(0).hmac, vec![6; 32]);
    }

    #[test]
    fn bad_key_files_are_refused_with_the_line() {
        let two = [file_key(1, 48), file_key(2, 48)].join("\n");
        let e = TicketKeys::from_file_text(&two).err().unwrap();
        assert!(e.contains("at least 3 keys"), "{e}");
        let bad = format!("{}\n%%%\n", two);
        let e = TicketKeys::from_file_text(&bad).err().unwrap();
        assert!(e.starts_with("line 3: not a base64 key"), "{e}");
        let short = format!("{}\n{}\n", two, file_key(3, 47));
        let e = TicketKeys::from_file_text(&short).err().unwrap();
        assert!(e.starts_with("line 3: a key is 48 or 80 bytes"), "{e}");
        let mixed = format!("{}\n{}\n", two, file_key(3, 80));
        let e = TicketKeys::from_file_text(&mixed).err().unwrap();
        assert!(
            e.starts_with("line 3: all keys must be the same size"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_hides_the_secrets() {
        let k = TicketKeys::rotating([9; 32]).encrypting(0);
        let shown = format!("{k:?}");
        assert!(!shown.contains(&format!("{:?}", k.aes)), "{shown}");
    }
}
