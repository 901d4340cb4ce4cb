//! The customer key history: the text format of a key file and lookup by fingerprint.
//!
//! A key file lists every customer key still needed to read the bucket, newest
//! first. The first key wraps the data keys of new objects; older keys remain so
//! that objects written before a rotation still open (until they are rewrapped,
//! see `ObjectCipher::rewrap`). Headers name their key by fingerprint, so lookup
//! never needs trial decryption.
//!
//! Format: one key per line, base64 (standard alphabet, padding optional) of
//! exactly 32 bytes, surrounding whitespace ignored; blank lines and lines
//! starting with `#` are ignored. Errors name a line number and never echo the
//! line, because a line that fails to parse may still be most of a key.

use std::fmt;

use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as B64};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use zeroize::Zeroizing;

use super::error::KeyFileError;
use super::secret::{Key256, KeyFingerprint, KEY_LEN};

/// Accepts keys with or without `=` padding: hand-edited files vary, the key bytes do not.
const LENIENT_B64: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Customer keys, newest (encrypting) first. Never empty.
pub struct KeyHistory {
    keys: Vec<Key256>,
}

impl KeyHistory {
    /// Parse a key file. See the module docs for the format.
    pub fn parse(text: &str) -> Result<KeyHistory, KeyFileError> {
        let mut keys: Vec<(usize, Key256)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Decoding into a wiped buffer: a long line may be a key plus typo.
            let mut bytes = Zeroizing::new(Vec::with_capacity(line.len()));
            LENIENT_B64
                .decode_vec(line, &mut bytes)
                .map_err(|_| KeyFileError::InvalidBase64 { line: line_no })?;
            let Ok(array) = <&[u8; KEY_LEN]>::try_from(bytes.as_slice()) else {
                return Err(KeyFileError::WrongLength {
                    line: line_no,
                    len: bytes.len(),
                });
            };
            let key = Key256::from_bytes(array);
            // Equal fingerprints mean equal keys (or a 2^-64 accident); either way
            // lookup by fingerprint would be ambiguous.
            if let Some((first_line, _)) = keys
                .iter()
                .find(|(_, k)| k.fingerprint() == key.fingerprint())
            {
                return Err(KeyFileError::DuplicateKey {
                    line: line_no,
                    first_line: *first_line,
                });
            }
            keys.push((line_no, key));
        }
        if keys.is_empty() {
            return Err(KeyFileError::NoKeys);
        }
        Ok(KeyHistory {
            keys: keys.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// A history holding one key, for callers that got the key from elsewhere.
    pub fn single(key: Key256) -> KeyHistory {
        KeyHistory { keys: vec![key] }
    }

    /// The key that wraps the data keys of new objects: the first in the file.
    pub fn encrypting_key(&self) -> &Key256 {
        self.keys
            .first()
            .expect("invariant broken: a KeyHistory is never empty")
    }

    /// The key with this fingerprint, if the history has it.
    pub fn find(&self, fingerprint: KeyFingerprint) -> Option<&Key256> {
        self.keys.iter().find(|k| k.fingerprint() == fingerprint)
    }

    /// Number of keys (at least one).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false; present because clippy expects it next to `len`.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys in file order, the encrypting key first.
    pub fn keys(&self) -> impl Iterator<Item = &Key256> {
        self.keys.iter()
    }

    /// Fingerprints in file order, for diagnostics.
    pub fn fingerprints(&self) -> Vec<KeyFingerprint> {
        self.keys.iter().map(Key256::fingerprint).collect()
    }
}

impl fmt::Debug for KeyHistory {
    // Fingerprints are public identifiers; the keys are not shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHistory")
            .field("fingerprints", &self.fingerprints())
            .finish_non_exhaustive()
    }
}

/// A key-file line for `key` (base64 and a newline), as written by `keygen`.
pub fn format_new_key(key: &Key256) -> Zeroizing<String> {
    let mut line = Zeroizing::new(String::with_capacity(46));
    B64.encode_string(key.as_bytes(), &mut line);
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="; // 32 x 0x01
    const K2: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="; // 32 x 0x02

    #[test]
    fn parses_comments_blanks_and_whitespace() {
        let text = format!(
            "# keys for bucket x\n\n  {K2}  \r\n\t# old key:\n{}\n\n",
            K1.trim_end_matches('=')
        );
        let h = KeyHistory::parse(&text).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.encrypting_key().as_bytes(), &[2u8; 32]);
        let old = Key256::from_bytes(&[1u8; 32]).fingerprint();
        assert_eq!(h.find(old).unwrap().as_bytes(), &[1u8; 32]);
        assert!(h
            .find(Key256::from_bytes(&[3u8; 32]).fingerprint())
            .is_none());
        assert_eq!(h.fingerprints()[1], old);
    }

    #[test]
    fn format_new_key_round_trips() {
        let key = Key256::generate();
        let line = format_new_key(&key);
        assert!(line.ends_with('\n'));
        assert_eq!(line.len(), 45);
        let h = KeyHistory::parse(&line).unwrap();
        assert_eq!(h.encrypting_key().as_bytes(), key.as_bytes());
    }

    fn assert_error_hides(text: &str, expected: KeyFileError, secret: &str) {
        let err = KeyHistory::parse(text).expect_err("must fail");
        assert_eq!(err, expected);
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(secret), "error shows key text: {shown}");
            assert!(
                !shown.contains(&secret[..8]),
                "error shows key text: {shown}"
            );
        }
    }

    #[test]
    fn errors_name_the_line_but_never_the_key() {
        assert_error_hides(
            &format!("{K1}\n# c\n!{K2}"),
            KeyFileError::InvalidBase64 { line: 3 },
            K2,
        );
        assert_error_hides(
            &format!("\n{}\n", &K2[..40]),
            KeyFileError::WrongLength { line: 2, len: 30 },
            &K2[..40],
        );
        let long = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIC"; // 36 bytes
        assert_error_hides(
            &format!("{K1}\n{long}\n"),
            KeyFileError::WrongLength { line: 2, len: 36 },
            long,
        );
        assert_error_hides(
            &format!("{K2}\n{K1}\n\n {K2} \n"),
            KeyFileError::DuplicateKey {
                line: 4,
                first_line: 1,
            },
            K2,
        );
        assert_error_hides("", KeyFileError::NoKeys, K1);
        assert_error_hides("# only a comment\n\n   \n", KeyFileError::NoKeys, K1);
        // URL-safe alphabet is not the standard one.
        let url = "_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-_-8=";
        assert_error_hides(url, KeyFileError::InvalidBase64 { line: 1 }, url);
    }

    #[test]
    fn debug_shows_fingerprints_not_keys() {
        let h = KeyHistory::parse(&format!("{K1}\n{K2}\n")).unwrap();
        let shown = format!("{h:?} {h:#?}");
        assert!(shown.contains(&Key256::from_bytes(&[1u8; 32]).fingerprint().to_string()));
        assert!(
            !shown.contains("AQEB") && !shown.contains("0101") && !shown.contains("[1, 1"),
            "{shown}"
        );
        assert!(
            !shown.contains("AgIC") && !shown.contains("0202") && !shown.contains("[2, 2"),
            "{shown}"
        );
    }
}
