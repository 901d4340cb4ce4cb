//! Secret key types: the customer key (KEK) and the per-object data key.
//!
//! Why newtypes: a key must never reach a log line, an error message or a
//! panic message by accident, so `Debug`/`Display` print `[redacted]`, there is
//! no `Clone` (a copy is a second place to wipe) and the bytes live in one heap
//! allocation that is zeroed on drop. Boxing keeps moves of the owning struct
//! from leaving stale copies of the key on the stack and gives a stable address
//! that a later change can `mlock`.
//!
//! The only non-secret here is [`KeyFingerprint`], which identifies a key in
//! headers and error messages and is shown as hex.

use std::fmt;

use rand::TryRngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of every key in this format: AES-256.
pub const KEY_LEN: usize = 32;

/// Length of a key fingerprint: 64 bits is plenty to pick a key among a
/// handful in a history; it is not a security boundary (unwrap is).
pub const FINGERPRINT_LEN: usize = 8;

/// Domain separation so the fingerprint can never equal any other hash of the key.
const FINGERPRINT_DOMAIN: &[u8] = b"s3cryptfs-key-fingerprint-v1";

/// Fill `buf` from the operating system's random source.
///
/// Why the OS source and not a user-space generator: it is fork-safe (a FUSE
/// daemon forks when it detaches), and one `getrandom` per 64 KiB chunk costs
/// far less than encrypting the chunk.
///
/// # Panics
/// If the OS random source fails. Nothing safe can be done without randomness.
pub(crate) fn fill_random(buf: &mut [u8]) {
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .expect("invariant broken: the operating system random source failed");
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name(Box<Zeroizing<[u8; KEY_LEN]>>);

        impl $name {
            /// Copy `bytes` into a new key. The caller should wipe its own copy.
            pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
                let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
                key.copy_from_slice(bytes);
                Self(key)
            }

            /// A fresh random key from the OS random source.
            pub fn generate() -> Self {
                let mut key = Box::new(Zeroizing::new([0u8; KEY_LEN]));
                fill_random(&mut key[..]);
                Self(key)
            }

            /// The raw key bytes, for handing to a cipher. Never format them.
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "([redacted])"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[redacted]")
            }
        }
    };
}

secret_key!(
    /// A customer key: the key-encryption key (KEK) that wraps data keys.
    Key256
);

secret_key!(
    /// A per-object data key: encrypts the object's chunks and keys its path binding.
    DataKey
);

secret_key!(
    /// The key of one write journal (docs/FORMAT.md, "The write journal"): seals its records and keys its staged
    /// files. Derived from a customer key, unwrapped by KMS, or read from the journal's local key file.
    JournalKey
);

impl Key256 {
    /// The key's public identifier, stored in headers to find the KEK without trial decryption.
    pub fn fingerprint(&self) -> KeyFingerprint {
        let digest = Sha256::new()
            .chain_update(FINGERPRINT_DOMAIN)
            .chain_update(self.as_bytes())
            .finalize();
        let mut fp = [0u8; FINGERPRINT_LEN];
        fp.copy_from_slice(&digest[..FINGERPRINT_LEN]);
        KeyFingerprint(fp)
    }
}

/// First 8 bytes of SHA-256(`"s3cryptfs-key-fingerprint-v1"` || key). Not secret.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub [u8; FINGERPRINT_LEN]);

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyFingerprint(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

/// Lower-case hex without a dependency; only ever used for non-secret values.
pub(crate) fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_key_bytes() {
        let key = Key256::from_bytes(&[0xab; 32]);
        let data = DataKey::from_bytes(&[0xcd; 32]);
        for text in [
            format!("{key:?}"),
            format!("{key}"),
            format!("{data:?}"),
            format!("{data}"),
            format!("{key:#?}"),
        ] {
            assert!(text.contains("[redacted]"), "{text}");
            assert!(!text.to_lowercase().contains("abab"), "{text}");
            assert!(!text.to_lowercase().contains("cdcd"), "{text}");
            assert!(!text.contains("171"), "{text}"); // 0xab in decimal
        }
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(Key256::generate().as_bytes(), Key256::generate().as_bytes());
        assert_ne!(
            DataKey::generate().as_bytes(),
            DataKey::generate().as_bytes()
        );
    }

    #[test]
    fn fingerprint_is_pinned_and_shown_as_hex() {
        // SHA-256("s3cryptfs-key-fingerprint-v1" || 32 zero bytes)[..8], computed independently
        // (see docs/FORMAT.md); a change here breaks key lookup for every existing object.
        let fp = Key256::from_bytes(&[0u8; 32]).fingerprint();
        assert_eq!(fp.to_string().len(), 16);
        assert_eq!(format!("{fp:?}"), format!("KeyFingerprint({fp})"));
        assert_eq!(
            fp.to_string(),
            FP_OF_ZERO_KEY,
            "format changed: bump FORMAT_VERSION"
        );
        assert_ne!(Key256::from_bytes(&[1u8; 32]).fingerprint(), fp);
    }

    const FP_OF_ZERO_KEY: &str = "fea19f1f7f03501a";
}
