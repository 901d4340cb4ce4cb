//! User metadata: the POSIX attributes and extra fields stored beside each object.
//!
//! Both backends store the same flat `name → value` map: S3 sends it as `x-amz-meta-<name>`
//! headers, the local backend keeps it in one extended attribute. The names for the POSIX
//! fields are the ones s3fs-fuse writes (`mode`, `uid`, `gid`, `mtime`), so buckets stay readable
//! by s3fs, rclone and the AWS console:
//!
//! | name                 | value                                                         |
//! |----------------------|---------------------------------------------------------------|
//! | `mode`               | decimal `st_mode` including file type bits, e.g. `33188`      |
//! | `uid`, `gid`         | decimal                                                       |
//! | `mtime`              | integer seconds since the epoch (s3fs format)                 |
//! | `s3cryptfs-mtime-ns` | nanoseconds part of `mtime` (ours; s3fs ignores it)           |
//! | anything else        | `UserMeta::extra`, verbatim                                   |
//!
//! Validation happens here, once, so a name or value that S3 would mangle (upper case names are
//! lower-cased by S3, non-ASCII values are RFC 2047 encoded, surrounding blanks are trimmed by
//! HTTP) is refused up front instead of coming back different. AWS limits user metadata to
//! 2 KiB (sum of name and value bytes) and no local test server enforces that, so we do, for
//! both backends alike.

use std::collections::BTreeMap;

use super::error::StoreError;
use super::UserMeta;

pub(crate) const NAME_MODE: &str = "mode";
pub(crate) const NAME_UID: &str = "uid";
pub(crate) const NAME_GID: &str = "gid";
pub(crate) const NAME_MTIME: &str = "mtime";
pub(crate) const NAME_MTIME_NS: &str = "s3cryptfs-mtime-ns";

/// AWS: "the user-defined metadata is limited to 2 KB in size", measured as the sum of the
/// UTF-8 bytes of every name and value.
pub(crate) const USER_META_MAX_BYTES: usize = 2048;

const RESERVED: [&str; 5] = [NAME_MODE, NAME_UID, NAME_GID, NAME_MTIME, NAME_MTIME_NS];

const NANOS_PER_SEC: u32 = 1_000_000_000;

/// Turn `meta` into the flat name/value map both backends store, refusing anything that would
/// not survive a round trip through S3.
pub(crate) fn encode(meta: &UserMeta) -> Result<BTreeMap<String, String>, StoreError> {
    let mut out = BTreeMap::new();
    if let Some(mode) = meta.mode {
        out.insert(NAME_MODE.to_owned(), mode.to_string());
    }
    if let Some(uid) = meta.uid {
        out.insert(NAME_UID.to_owned(), uid.to_string());
    }
    if let Some(gid) = meta.gid {
        out.insert(NAME_GID.to_owned(), gid.to_string());
    }
    if let Some((secs, nsecs)) = meta.mtime {
        if nsecs >= NANOS_PER_SEC {
            return Err(StoreError::invalid(format!(
                "mtime nanoseconds must be below one second, got {nsecs}"
            )));
        }
        out.insert(NAME_MTIME.to_owned(), secs.to_string());
        out.insert(NAME_MTIME_NS.to_owned(), nsecs.to_string());
    }
    for (name, value) in &meta.extra {
        check_name(name)?;
        if RESERVED.contains(&name.as_str()) {
            return Err(StoreError::invalid(format!(
                "metadata name {name:?} is reserved for the typed UserMeta fields"
            )));
        }
        check_value(name, value)?;
        out.insert(name.clone(), value.clone());
    }
    let total: usize = out.iter().map(|(n, v)| n.len() + v.len()).sum();
    if total > USER_META_MAX_BYTES {
        return Err(StoreError::invalid(format!(
            "object metadata is {total} bytes, more than the {USER_META_MAX_BYTES} bytes S3 allows"
        )));
    }
    Ok(out)
}

/// Rebuild `UserMeta` from stored pairs. Lenient: objects written by other tools may carry
/// values we cannot parse, and a listing must not fail because of one odd header, so unparsable
/// typed fields are dropped with a warning.
pub(crate) fn decode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> UserMeta {
    let mut meta = UserMeta::default();
    let mut mtime_secs: Option<i64> = None;
    let mut mtime_frac_ns: u32 = 0;
    let mut mtime_ns: Option<u32> = None;
    for (name, value) in pairs {
        // S3 lower-cases header names; other stores may not.
        let name = name.to_ascii_lowercase();
        let value = value.trim();
        match name.as_str() {
            NAME_MODE => meta.mode = parse_u32(&name, value),
            NAME_UID => meta.uid = parse_u32(&name, value),
            NAME_GID => meta.gid = parse_u32(&name, value),
            NAME_MTIME => match parse_mtime(value) {
                Some((s, frac)) => {
                    mtime_secs = Some(s);
                    mtime_frac_ns = frac;
                }
                None => tracing::warn!(value, "ignoring unparsable mtime metadata"),
            },
            NAME_MTIME_NS => match value.parse::<u32>() {
                Ok(ns) if ns < NANOS_PER_SEC => mtime_ns = Some(ns),
                _ => tracing::warn!(value, "ignoring unparsable {NAME_MTIME_NS} metadata"),
            },
            _ => {
                meta.extra.insert(name, value.to_owned());
            }
        }
    }
    // Our nanosecond field wins over a fractional s3fs value; it is only meaningful together
    // with `mtime` (another tool may have rewritten `mtime` alone, then ns is stale but harmless).
    meta.mtime = mtime_secs.map(|s| (s, mtime_ns.unwrap_or(mtime_frac_ns)));
    meta
}

fn parse_u32(name: &str, value: &str) -> Option<u32> {
    match value.parse::<u32>() {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::warn!(name, value, "ignoring unparsable numeric metadata");
            None
        }
    }
}

/// s3fs writes integer seconds; some tools write `secs.fraction`. Accept both.
fn parse_mtime(value: &str) -> Option<(i64, u32)> {
    let (secs, frac) = match value.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (value, None),
    };
    let secs = secs.parse::<i64>().ok()?;
    let ns = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            // Keep at most 9 digits and right-pad, so "5" means 500 ms.
            let digits: String = f.chars().take(9).collect();
            let padded = format!("{digits:0<9}");
            padded.parse::<u32>().ok()?
        }
        Some(_) => return None,
    };
    Some((secs, ns))
}

/// `name` (a checked name: lower-case letters, digits, `-`, `_`, `.`) as a C# identifier, which is what Azure Blob
/// Storage takes as a metadata name: `_` becomes `__`, `-` `_h`, `.` `_d`, and a leading digit gets `_n` in front.
/// Reversed by [`from_identifier`].
pub(crate) fn to_identifier(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push_str("_n");
    }
    for c in name.chars() {
        match c {
            '_' => out.push_str("__"),
            '-' => out.push_str("_h"),
            '.' => out.push_str("_d"),
            c => out.push(c),
        }
    }
    out
}

/// The name [`to_identifier`] made `id` from; `None` for a name it cannot have made (another tool's metadata, which
/// is then not ours to read). Azure may return names in other case: compared lower-cased.
pub(crate) fn from_identifier(id: &str) -> Option<String> {
    let id = id.to_ascii_lowercase();
    let mut out = String::with_capacity(id.len());
    let mut chars = id.chars();
    while let Some(c) = chars.next() {
        match c {
            '_' => match chars.next()? {
                '_' => out.push('_'),
                'h' => out.push('-'),
                'd' => out.push('.'),
                'n' if out.is_empty() => {}
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// Names become HTTP header suffixes that S3 lower-cases, and local-store lines `name=value`.
fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "metadata name {name:?} must be non-empty lower-case ASCII letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Values must come back byte-identical from S3: printable ASCII without surrounding blanks.
fn check_value(name: &str, value: &str) -> Result<(), StoreError> {
    let printable = value.bytes().all(|b| (0x20..=0x7e).contains(&b));
    let trimmed = value.trim() == value;
    if printable && trimmed {
        Ok(())
    } else {
        Err(StoreError::invalid(format!(
            "metadata value of {name:?} must be printable ASCII without leading or trailing spaces (encode binary values, e.g. base64)"
        )))
    }
}

/// The local backend's on-disk form of the map: one `name=value` per line. Names cannot contain
/// `=` or newlines and values cannot contain newlines (see the checks above), so this is
/// unambiguous.
pub(crate) fn to_lines(map: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (n, v) in map {
        s.push_str(n);
        s.push('=');
        s.push_str(v);
        s.push('\n');
    }
    s
}

/// Inverse of [`to_lines`]; lines without `=` are ignored rather than failing the read.
pub(crate) fn from_lines(text: &str) -> UserMeta {
    decode(text.lines().filter_map(|l| l.split_once('=')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> UserMeta {
        let mut extra = BTreeMap::new();
        extra.insert("s3cryptfs-bind".to_owned(), "abc+/=".to_owned());
        UserMeta {
            mode: Some(0o100644),
            uid: Some(1000),
            gid: Some(100),
            mtime: Some((1_700_000_000, 123_456_789)),
            extra,
        }
    }

    #[test]
    fn round_trip_through_lines() {
        let m = full();
        let map = encode(&m).unwrap();
        assert_eq!(map["mode"], "33188");
        assert_eq!(map["mtime"], "1700000000");
        assert_eq!(map["s3cryptfs-mtime-ns"], "123456789");
        assert_eq!(from_lines(&to_lines(&map)), m);
    }

    #[test]
    fn reads_s3fs_plain_and_fractional_mtime() {
        let m = decode([("mtime", "1700000000"), ("Mode", "16877")]);
        assert_eq!(m.mtime, Some((1_700_000_000, 0)));
        assert_eq!(m.mode, Some(0o40755));
        let m = decode([("mtime", "1700000000.5")]);
        assert_eq!(m.mtime, Some((1_700_000_000, 500_000_000)));
        let m = decode([("mtime", "-5"), ("uid", "x")]);
        assert_eq!(m.mtime, Some((-5, 0)));
        assert_eq!(m.uid, None);
    }

    #[test]
    fn refuses_what_s3_would_mangle() {
        for (n, v) in [
            ("Upper", "x"),
            ("a b", "x"),
            ("", "x"),
            ("ok", " pad"),
            ("ok", "é"),
            ("ok", "a\nb"),
            ("mode", "1"),
        ] {
            let mut m = UserMeta::default();
            m.extra.insert(n.to_owned(), v.to_owned());
            assert!(
                matches!(encode(&m), Err(StoreError::InvalidInput { .. })),
                "{n:?}={v:?}"
            );
        }
        let mut m = UserMeta::default();
        m.extra
            .insert("big".to_owned(), "x".repeat(USER_META_MAX_BYTES));
        assert!(matches!(encode(&m), Err(StoreError::InvalidInput { .. })));
        let m = UserMeta {
            mtime: Some((0, NANOS_PER_SEC)),
            ..UserMeta::default()
        };
        assert!(encode(&m).is_err());
    }
}

#[cfg(test)]
mod identifier_tests {
    use super::*;

    #[test]
    fn identifier_names_round_trip_and_are_identifiers() {
        let names = ["mode", "s3cryptfs-mtime-ns", "s3cryptfs-bind", "x-amz-meta-x", "a_b", "a__b-", "x.y", "9lives"];
        for name in names.into_iter().chain(["_"]) {
            check_name(name).unwrap();
            let id = to_identifier(name);
            assert!(
                id.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{name} -> {id} is not an identifier"
            );
            assert_eq!(from_identifier(&id).as_deref(), Some(name), "{name} -> {id}");
            assert_eq!(from_identifier(&id.to_ascii_uppercase()).as_deref(), Some(name), "upper-cased {id}");
        }
        // Distinct names stay distinct.
        assert_ne!(to_identifier("a-b"), to_identifier("a_hb"));
        assert_ne!(to_identifier("a_b"), to_identifier("a__b"));
        // Names no s3cryptfs wrote are not read as ours.
        for foreign in ["a_x", "trailing_"] {
            assert_eq!(from_identifier(foreign), None, "{foreign}");
        }
    }
}
