//! The agent's wire protocol, version 1 (byte tables in docs/AGENT.md).
//!
//! Each message, in both directions, is a frame: a 4-byte big-endian body length, then that many bytes of UTF-8
//! JSON. Requests are `{"v":1,"op":...}`; replies are `{"v":1,"ok":true,...}` or
//! `{"v":1,"ok":false,"code":...,"error":...}`. One connection may carry several request/reply pairs, strictly in
//! turn.
//!
//! Limits and failure handling, the invariants the server relies on:
//! - A body is at most [`MAX_BODY_LEN`] bytes. A larger length prefix is rejected from the 4 prefix bytes alone, so a
//!   hostile length never makes the agent allocate or read more; after that the stream cannot be resynchronised and
//!   the server closes it. Encoding refuses to produce an oversized frame too.
//! - Anything that fails to parse as a version-1 request becomes a [`ProtocolError`] that the server sends back as an
//!   error reply; since the frame boundary is known, the connection stays usable.
//!
//! Key material: frame bodies are read into and written from [`Zeroizing`] buffers that are allocated once at their
//! final size (a growing `Vec` would leave copies behind in freed memory). Keys travel as JSON strings of base64,
//! which never need escaping; they are deserialised as [`KeyText`], a string *borrowed* from the wiped frame buffer,
//! so decoding makes no copy. A key string that contains a JSON escape cannot be borrowed and is rejected. Error
//! messages never quote request content: serde_json's messages for wrong types can contain the offending value, so
//! they are replaced by a position.

use std::borrow::Cow;
use std::fmt;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroizing;

use crate::crypto::{KeyFileError, KeyHistory};

/// The protocol version this code speaks, in every message's `v`.
pub const PROTOCOL_VERSION: u64 = 1;

/// Length of the frame prefix: a big-endian u32 body length.
pub const LEN_PREFIX_LEN: usize = 4;

/// Largest body in either direction. A key history is 45 bytes of JSON per key, so this holds over a thousand keys
/// in one history or a listing of several hundred names, while bounding what one connection can make the agent
/// hold (see `server::ServerConfig::max_connections`).
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// Longest key name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// What went wrong with a message. Never contains message content beyond a short, sanitised operation name.
#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("message of {len} bytes is larger than the {MAX_BODY_LEN}-byte limit")]
    TooLarge { len: u64 },
    #[error("empty message (a body length of 0)")]
    Empty,
    #[error("the connection closed in the middle of a message")]
    Truncated,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unsupported protocol version {found} (this side speaks version {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u64 },
    #[error("unknown operation {op}")]
    UnknownOp { op: String },
    #[error("operation '{op}' needs the field '{field}'")]
    MissingField { op: &'static str, field: &'static str },
    #[error("invalid key name: {0}")]
    BadName(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// The code an error reply carries for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::UnknownOp { .. } => ErrorCode::UnknownOp,
            ProtocolError::Empty
            | ProtocolError::Truncated
            | ProtocolError::Malformed(_)
            | ProtocolError::MissingField { .. }
            | ProtocolError::BadName(_)
            | ProtocolError::Io(_) => ErrorCode::BadRequest,
        }
    }

    /// Whether the stream is still at a frame boundary after this error (so the server can keep serving it).
    pub fn stream_usable(&self) -> bool {
        !matches!(self, ProtocolError::TooLarge { .. } | ProtocolError::Truncated | ProtocolError::Io(_))
    }

    /// A serde_json error without its text: for type errors that text can quote the value, which may be a key.
    fn from_json(e: serde_json::Error) -> ProtocolError {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => "not valid JSON",
            Category::Data => "a field is missing or has the wrong type (key strings must be base64 without escapes)",
        };
        ProtocolError::Malformed(format!("{what} at line {} column {}", e.line(), e.column()))
    }
}

/// Machine-readable error kinds of an error reply. Unknown codes from a newer agent read as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or lacks a field.
    BadRequest,
    /// The length prefix exceeds [`MAX_BODY_LEN`]; the agent closes the connection.
    TooLarge,
    /// `v` is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// `op` is not one this agent knows.
    UnknownOp,
    /// No key of that name (never added, or removed).
    NoSuchKey,
    /// No key of that name because `agent lock` dropped it.
    Locked,
    /// The peer's uid is not served; the agent closes the connection.
    Refused,
    /// No complete request arrived in time; the agent closes the connection.
    Timeout,
    #[serde(other)]
    Other,
}

/// Key material as it travels: one base64 key (a key-file line without the newline), borrowed from a wiped buffer.
#[derive(Clone, Copy, Serialize)]
#[serde(transparent)]
pub struct KeyText<'a>(pub &'a str);

impl fmt::Debug for KeyText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyText([redacted])")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for KeyText<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Borrowed;
        impl<'de> serde::de::Visitor<'de> for Borrowed {
            type Value = KeyText<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a base64 key string without JSON escapes")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<KeyText<'de>, E> {
                Ok(KeyText(v))
            }
            // An escaped string would be unescaped into an unwiped scratch buffer: refuse it (base64 never needs one).
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<KeyText<'de>, E> {
                Err(E::custom("key strings must be base64 without JSON escapes"))
            }
        }
        d.deserialize_str(Borrowed)
    }
}

/// A request, as the client builds it and the server receives it.
#[derive(Debug)]
pub enum Request<'a> {
    /// Is an agent there? Replies with its pid.
    Ping,
    /// The key history named `name`.
    Get { name: Cow<'a, str> },
    /// Store (or replace) `name`: base64 keys, the encrypting key first.
    Add { name: Cow<'a, str>, keys: Vec<KeyText<'a>> },
    /// Names and fingerprints of every key held.
    List,
    /// Drop key `name`.
    Remove { name: Cow<'a, str> },
    /// Drop every key; keep running.
    Lock,
    /// Drop every key, remove the socket, exit.
    Stop,
}

impl Request<'_> {
    /// The `op` string of this request.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Get { .. } => "get",
            Request::Add { .. } => "add",
            Request::List => "list",
            Request::Remove { .. } => "remove",
            Request::Lock => "lock",
            Request::Stop => "stop",
        }
    }
}

/// The JSON shape of a request: every field a version-1 request can carry. Unknown fields are ignored, so a later
/// minor addition does not break this agent.
#[derive(Serialize, Deserialize)]
struct WireRequest<'a> {
    v: u64,
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<KeyText<'a>>>,
}

/// Just the version, read first so that a request of another version is reported as such rather than as malformed.
#[derive(Deserialize)]
struct Envelope {
    v: Option<u64>,
}

/// One entry of a `list` reply: public identifiers only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub name: String,
    /// Fingerprints in history order (hex), the encrypting key first.
    pub fingerprints: Vec<String>,
}

/// A reply: `ok` plus the fields of the operation, or `ok: false` with `code` and `error` (one sentence for a human).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply<'a> {
    pub v: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Cow<'a, str>>,
    /// `get`: the key history, base64 keys, the encrypting key first.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<KeyText<'a>>>,
    /// `list`: one entry per name, sorted by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<ListEntry>>,
    /// `ping`: the agent's process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `add`: whether a key of that name was replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<bool>,
    /// `lock`: how many names were dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<usize>,
}

impl<'a> Reply<'a> {
    /// A success reply with no fields; set the operation's field on it.
    pub fn ok() -> Reply<'a> {
        Reply { v: PROTOCOL_VERSION, ok: true, ..Reply::default() }
    }

    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<Cow<'a, str>>) -> Reply<'a> {
        Reply { v: PROTOCOL_VERSION, ok: false, code: Some(code), error: Some(message.into()), ..Reply::default() }
    }
}

/// Checks a key name: 1 to [`MAX_NAME_LEN`] bytes, no whitespace or control characters (names are printed one per
/// line, as the first column of `key list`).
pub fn check_name(name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(ProtocolError::BadName("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ProtocolError::BadName("it is longer than 128 bytes"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ProtocolError::BadName("it contains whitespace or control characters"));
    }
    Ok(())
}

/// Parses a request body. Checks the version before anything else.
pub fn parse_request(body: &[u8]) -> Result<Request<'_>, ProtocolError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(ProtocolError::from_json)?;
    match envelope.v {
        Some(PROTOCOL_VERSION) => {}
        Some(found) => return Err(ProtocolError::UnsupportedVersion { found }),
        None => return Err(ProtocolError::Malformed("the field 'v' (protocol version) is missing".into())),
    }
    let wire: WireRequest<'_> = serde_json::from_slice(body).map_err(ProtocolError::from_json)?;
    let name = |op: &'static str| -> Result<Cow<'_, str>, ProtocolError> {
        let name = wire.name.clone().ok_or(ProtocolError::MissingField { op, field: "name" })?;
        check_name(&name)?;
        Ok(name)
    };
    Ok(match wire.op.as_ref() {
        "ping" => Request::Ping,
        "get" => Request::Get { name: name("get")? },
        "add" => {
            let name = name("add")?;
            let keys = wire.keys.ok_or(ProtocolError::MissingField { op: "add", field: "keys" })?;
            Request::Add { name, keys }
        }
        "list" => Request::List,
        "remove" => Request::Remove { name: name("remove")? },
        "lock" => Request::Lock,
        "stop" => Request::Stop,
        other => return Err(ProtocolError::UnknownOp { op: shown_op(other) }),
    })
}

/// Parses a reply body and checks its version.
pub fn parse_reply(body: &[u8]) -> Result<Reply<'_>, ProtocolError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(ProtocolError::from_json)?;
    match envelope.v {
        Some(PROTOCOL_VERSION) => serde_json::from_slice(body).map_err(ProtocolError::from_json),
        Some(found) => Err(ProtocolError::UnsupportedVersion { found }),
        None => Err(ProtocolError::Malformed("the field 'v' (protocol version) is missing".into())),
    }
}

/// An unknown operation name as an error message and a log line may show it: only if it looks like an operation
/// name (short, lower-case letters, digits, `_`, `-`), so that nothing pasted there by mistake, like a key, is echoed.
fn shown_op(op: &str) -> String {
    let plain =
        op.len() <= 24 && op.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if plain {
        format!("'{op}'")
    } else {
        "(not shown: not a short lower-case name)".to_string()
    }
}

/// Encodes a request into a complete frame.
pub fn encode_request(req: &Request<'_>) -> Result<Zeroizing<Vec<u8>>, ProtocolError> {
    let (name, keys) = match req {
        Request::Get { name } | Request::Remove { name } => (Some(name.clone()), None),
        Request::Add { name, keys } => (Some(name.clone()), Some(keys.clone())),
        Request::Ping | Request::List | Request::Lock | Request::Stop => (None, None),
    };
    encode(&WireRequest { v: PROTOCOL_VERSION, op: Cow::Borrowed(req.op()), name, keys })
}

/// Encodes a reply into a complete frame.
pub fn encode_reply(reply: &Reply<'_>) -> Result<Zeroizing<Vec<u8>>, ProtocolError> {
    encode(reply)
}

/// Serialises `msg` after a length prefix, into one wiped buffer allocated at the largest frame size so that it never
/// reallocates; a body that would exceed [`MAX_BODY_LEN`] is an error.
fn encode<T: Serialize>(msg: &T) -> Result<Zeroizing<Vec<u8>>, ProtocolError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(LEN_PREFIX_LEN + MAX_BODY_LEN));
    buf.extend_from_slice(&[0; LEN_PREFIX_LEN]);
    let mut w = BoundedWriter { buf: &mut buf, limit: LEN_PREFIX_LEN + MAX_BODY_LEN };
    serde_json::to_writer(&mut w, msg).map_err(|e| {
        if e.is_io() {
            ProtocolError::TooLarge { len: u64::try_from(MAX_BODY_LEN).unwrap_or(u64::MAX) + 1 }
        } else {
            ProtocolError::Malformed("cannot encode the message".into())
        }
    })?;
    let body_len = u32::try_from(buf.len() - LEN_PREFIX_LEN).expect("invariant broken: body bounded by MAX_BODY_LEN");
    buf[..LEN_PREFIX_LEN].copy_from_slice(&body_len.to_be_bytes());
    Ok(buf)
}

/// A `Write` into a Vec that fails instead of growing past `limit` (the Vec's capacity).
struct BoundedWriter<'a> {
    buf: &'a mut Vec<u8>,
    limit: usize,
}

impl Write for BoundedWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other("message too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body length a prefix announces, or why it is refused. Decided from the 4 bytes alone.
pub fn body_len(prefix: [u8; LEN_PREFIX_LEN]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(prefix);
    match usize::try_from(len) {
        Ok(0) => Err(ProtocolError::Empty),
        Ok(n) if n <= MAX_BODY_LEN => Ok(n),
        _ => Err(ProtocolError::TooLarge { len: u64::from(len) }),
    }
}

/// Reads one frame's body. `Ok(None)` when the stream ends cleanly before a frame starts.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, ProtocolError> {
    let mut prefix = [0u8; LEN_PREFIX_LEN];
    let mut got = 0;
    while got < LEN_PREFIX_LEN {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = body_len(prefix)?;
    let mut body = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Ok(Some(body))
}

/// [`read_frame`] for tokio streams.
pub async fn read_frame_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Zeroizing<Vec<u8>>>, ProtocolError> {
    let mut prefix = [0u8; LEN_PREFIX_LEN];
    let mut got = 0;
    while got < LEN_PREFIX_LEN {
        match r.read(&mut prefix[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(ProtocolError::Truncated),
            n => got += n,
        }
    }
    let len = body_len(prefix)?;
    let mut body = Zeroizing::new(vec![0u8; len]);
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    })?;
    Ok(Some(body))
}

/// Length of one key in base64 with padding: a key-file line without its newline.
pub const KEY_TEXT_LEN: usize = 44;

/// The keys of a history as base64 texts, in wiped fixed-size buffers (encoding straight into them: the base64
/// crate's `encode_string` goes through an unwiped stack buffer).
pub struct EncodedKeys(Vec<Zeroizing<[u8; KEY_TEXT_LEN]>>);

impl EncodedKeys {
    pub fn new(history: &KeyHistory) -> EncodedKeys {
        use base64::Engine;
        let mut out = Vec::with_capacity(history.len());
        for key in history.keys() {
            let mut buf = Zeroizing::new([0u8; KEY_TEXT_LEN]);
            let n = base64::engine::general_purpose::STANDARD
                .encode_slice(key.as_bytes(), &mut buf[..])
                .expect("invariant broken: 32 bytes are 44 base64 characters");
            debug_assert_eq!(n, KEY_TEXT_LEN);
            out.push(buf);
        }
        EncodedKeys(out)
    }

    /// The texts, borrowing from this value, for a request or reply.
    pub fn texts(&self) -> Vec<KeyText<'_>> {
        self.0
            .iter()
            .map(|b| KeyText(std::str::from_utf8(&b[..]).expect("invariant broken: base64 is ASCII")))
            .collect()
    }
}

/// Rebuilds a key history from base64 texts (encrypting key first), with the key-file rules: errors name the
/// position ("line N" is the N-th key) and never the text.
pub fn history_from_texts(texts: &[KeyText<'_>]) -> Result<KeyHistory, KeyFileError> {
    let mut joined = Zeroizing::new(String::with_capacity(texts.iter().map(|t| t.0.len() + 1).sum()));
    for (i, t) in texts.iter().enumerate() {
        // Only the base64 alphabet: anything else could change the meaning of the joined text (a `#` would make the
        // key a comment, a newline would split it).
        if t.0.is_empty() || !t.0.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')) {
            return Err(KeyFileError::InvalidBase64 { line: i + 1 });
        }
        joined.push_str(t.0);
        joined.push('\n');
    }
    KeyHistory::parse(&joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const K2: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    fn body_of(frame: &[u8]) -> &[u8] {
        let len = body_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(frame.len(), 4 + len, "prefix must announce the exact body length");
        &frame[4..]
    }

    #[test]
    fn request_frames_round_trip() {
        let keys = vec![KeyText(K1), KeyText(K2)];
        let requests = [
            Request::Ping,
            Request::Get { name: "work".into() },
            Request::Add { name: "work".into(), keys },
            Request::List,
            Request::Remove { name: "work".into() },
            Request::Lock,
            Request::Stop,
        ];
        for req in &requests {
            let f = encode_request(req).unwrap();
            let parsed = parse_request(body_of(&f)).unwrap();
            assert_eq!(parsed.op(), req.op());
            match (req, &parsed) {
                (Request::Get { name: a }, Request::Get { name: b })
                | (Request::Remove { name: a }, Request::Remove { name: b }) => {
                    assert_eq!(a, b)
                }
                (Request::Add { name: a, keys: ka }, Request::Add { name: b, keys: kb }) => {
                    assert_eq!(a, b);
                    assert_eq!(ka.iter().map(|k| k.0).collect::<Vec<_>>(), kb.iter().map(|k| k.0).collect::<Vec<_>>());
                }
                _ => {}
            }
        }
    }

    #[test]
    fn the_wire_format_is_pinned() {
        let f = encode_request(&Request::Get { name: "work".into() }).unwrap();
        assert_eq!(
            &f[..],
            b"\x00\x00\x00\x20{\"v\":1,\"op\":\"get\",\"name\":\"work\"}",
            "protocol changed: bump the version"
        );
        let mut r = Reply::ok();
        r.pid = Some(7);
        let f = encode_reply(&r).unwrap();
        assert_eq!(&f[..], b"\x00\x00\x00\x19{\"v\":1,\"ok\":true,\"pid\":7}");
        let f = encode_reply(&Reply::error(ErrorCode::NoSuchKey, "no")).unwrap();
        assert_eq!(body_of(&f), b"{\"v\":1,\"ok\":false,\"code\":\"no_such_key\",\"error\":\"no\"}");
    }

    #[test]
    fn replies_round_trip_and_borrow_keys_from_the_buffer() {
        let mut r = Reply::ok();
        r.keys = Some(vec![KeyText(K1), KeyText(K2)]);
        r.entries = Some(vec![ListEntry { name: "a".into(), fingerprints: vec!["00".into()] }]);
        let f = encode_reply(&r).unwrap();
        let body = body_of(&f);
        let parsed = parse_reply(body).unwrap();
        assert!(parsed.ok);
        let keys = parsed.keys.unwrap();
        assert_eq!(keys[0].0, K1);
        // Borrowed: the key string points into the frame buffer, no copy was made.
        let range = body.as_ptr_range();
        assert!(range.contains(&keys[1].0.as_ptr()));
        assert_eq!(parsed.entries.unwrap()[0].name, "a");

        let f = encode_reply(&Reply::error(ErrorCode::Locked, "locked")).unwrap();
        let e = parse_reply(body_of(&f)).unwrap();
        assert!(!e.ok);
        assert_eq!(e.code, Some(ErrorCode::Locked));
        // A code from a newer agent still parses.
        let newer = parse_reply(br#"{"v":1,"ok":false,"code":"quota","error":"x"}"#).unwrap();
        assert_eq!(newer.code, Some(ErrorCode::Other));
    }

    #[test]
    fn an_oversized_length_is_refused_without_reading_the_body() {
        for len in [MAX_BODY_LEN as u32 + 1, u32::MAX] {
            let mut input = len.to_be_bytes().to_vec();
            input.extend_from_slice(b"{\"v\":1}");
            let mut cursor = std::io::Cursor::new(input);
            let err = read_frame(&mut cursor).unwrap_err();
            assert!(matches!(err, ProtocolError::TooLarge { len: l } if l == u64::from(len)), "{err:?}");
            assert_eq!(cursor.position(), 4, "nothing past the prefix may be read");
            assert_eq!(err.code(), ErrorCode::TooLarge);
            assert!(!err.stream_usable());
        }
        // The largest allowed length is accepted.
        let body = vec![b' '; MAX_BODY_LEN];
        assert_eq!(read_frame(&mut &frame(&body)[..]).unwrap().unwrap().len(), MAX_BODY_LEN);
    }

    #[tokio::test]
    async fn async_reader_applies_the_same_rules() {
        let mut input: &[u8] = &(MAX_BODY_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(read_frame_async(&mut input).await, Err(ProtocolError::TooLarge { .. })));
        let two = [frame(b"{\"v\":1,\"op\":\"ping\"}"), frame(b"xyz")].concat();
        let mut input: &[u8] = &two;
        assert_eq!(&read_frame_async(&mut input).await.unwrap().unwrap()[..], b"{\"v\":1,\"op\":\"ping\"}");
        assert_eq!(&read_frame_async(&mut input).await.unwrap().unwrap()[..], b"xyz");
        assert!(read_frame_async(&mut input).await.unwrap().is_none());
        let mut short: &[u8] = &[0, 0];
        assert!(matches!(read_frame_async(&mut short).await, Err(ProtocolError::Truncated)));
        let cut = frame(b"{\"v\":1}");
        let mut cut: &[u8] = &cut[..6];
        assert!(matches!(read_frame_async(&mut cut).await, Err(ProtocolError::Truncated)));
        let mut empty: &[u8] = &[0, 0, 0, 0];
        assert!(matches!(read_frame_async(&mut empty).await, Err(ProtocolError::Empty)));
    }

    #[test]
    fn framing_errors() {
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
        assert!(matches!(read_frame(&mut &b"\x00\x00"[..]), Err(ProtocolError::Truncated)));
        assert!(matches!(read_frame(&mut &b"\x00\x00\x00\x09{\"v\":1}"[..]), Err(ProtocolError::Truncated)));
        let err = read_frame(&mut &b"\x00\x00\x00\x00"[..]).unwrap_err();
        assert!(matches!(err, ProtocolError::Empty));
        assert!(err.stream_usable());
    }

    #[test]
    fn encoding_refuses_an_oversized_message() {
        let long = "A".repeat(MAX_BODY_LEN);
        let err = encode_request(&Request::Add { name: "n".into(), keys: vec![KeyText(&long)] }).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { .. }), "{err:?}");
        // Just under the limit is fine.
        let fits = "A".repeat(MAX_BODY_LEN - 100);
        assert!(encode_request(&Request::Add { name: "n".into(), keys: vec![KeyText(&fits)] }).is_ok());
    }

    fn parse_err(body: &str) -> ProtocolError {
        parse_request(body.as_bytes()).expect_err(body)
    }

    #[test]
    fn malformed_requests_are_errors_with_codes() {
        let cases: &[(&str, ErrorCode)] = &[
            ("{not json", ErrorCode::BadRequest),
            ("", ErrorCode::BadRequest),
            ("[1,2]", ErrorCode::BadRequest),
            ("{\"op\":\"list\"}", ErrorCode::BadRequest),
            ("{\"v\":\"1\",\"op\":\"list\"}", ErrorCode::BadRequest),
            ("{\"v\":2,\"op\":\"list\"}", ErrorCode::UnsupportedVersion),
            ("{\"v\":2,\"whatever\":[}", ErrorCode::BadRequest),
            ("{\"v\":1}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"fly\"}", ErrorCode::UnknownOp),
            ("{\"v\":1,\"op\":\"get\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"get\",\"name\":\"\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"get\",\"name\":\"a b\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"get\",\"name\":\"a\\nb\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"add\",\"name\":\"a\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":\"AQEB\"}", ErrorCode::BadRequest),
            ("{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":[1]}", ErrorCode::BadRequest),
        ];
        for (body, code) in cases {
            assert_eq!(parse_err(body).code(), *code, "{body}");
            assert!(parse_err(body).stream_usable());
        }
        let long = format!("{{\"v\":1,\"op\":\"get\",\"name\":\"{}\"}}", "n".repeat(MAX_NAME_LEN + 1));
        assert!(matches!(parse_err(&long), ProtocolError::BadName(_)));
        let max = format!("{{\"v\":1,\"op\":\"get\",\"name\":\"{}\"}}", "n".repeat(MAX_NAME_LEN));
        assert!(parse_request(max.as_bytes()).is_ok());
        // Unknown fields are ignored (a later minor addition must not break this agent); escaped names are fine.
        assert!(matches!(
            parse_request(br#"{"v":1,"op":"get","name":"\u0077ork","extra":{"x":[1]}}"#).unwrap(),
            Request::Get { name } if name == "work"
        ));
    }

    #[test]
    fn errors_never_quote_request_content() {
        let secret = K1;
        for body in [
            format!("{{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":\"{secret}\"}}"),
            format!("{{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":[\"{secret}\\/\"]}}"),
            format!("{{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":[{{\"k\":\"{secret}\"}}]}}"),
            format!("{{\"v\":1,\"op\":\"add\",\"name\":\"a\",\"keys\":[\"{secret}\"]"),
            format!("{{\"v\":\"{secret}\"}}"),
            format!("{{\"v\":1,\"op\":\"{secret}\"}}"),
            format!("{{\"v\":1,\"op\":\"get\",\"name\":{{\"{secret}\":1}}}}"),
        ] {
            let err = parse_err(&body);
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(!shown.contains(&secret[..16]), "error shows request content: {shown}");
            }
        }
        // An unknown op is echoed only when it looks like an operation name.
        assert_eq!(parse_err("{\"v\":1,\"op\":\"rotate\"}").to_string(), "unknown operation 'rotate'");
        let err = parse_err("{\"v\":1,\"op\":\"\\u0007bell\"}");
        assert_eq!(err.to_string(), "unknown operation (not shown: not a short lower-case name)");
    }

    #[test]
    fn key_text_debug_is_redacted() {
        let shown = format!("{:?}", Request::Add { name: "a".into(), keys: vec![KeyText(K1)] });
        assert!(!shown.contains("AQEB"), "{shown}");
    }

    #[test]
    fn key_histories_travel_as_base64_texts() {
        let h = KeyHistory::parse(&format!("# comment\n{K2}\n\n{K1}\n")).unwrap();
        let enc = EncodedKeys::new(&h);
        let texts = enc.texts();
        assert_eq!(texts.iter().map(|t| t.0).collect::<Vec<_>>(), [K2, K1]);
        let back = history_from_texts(&texts).unwrap();
        assert_eq!(back.fingerprints(), h.fingerprints());

        assert_eq!(history_from_texts(&[]).unwrap_err(), KeyFileError::NoKeys);
        for bad in ["", "#comment", "AQEB AQEB", "AQEB\nAQEB", "AQEB-_"] {
            assert_eq!(
                history_from_texts(&[KeyText(K1), KeyText(bad)]).unwrap_err(),
                KeyFileError::InvalidBase64 { line: 2 },
                "{bad:?}"
            );
        }
        assert!(matches!(
            history_from_texts(&[KeyText("AQEB")]).unwrap_err(),
            KeyFileError::WrongLength { line: 1, .. }
        ));
        assert!(matches!(
            history_from_texts(&[KeyText(K1), KeyText(K1)]).unwrap_err(),
            KeyFileError::DuplicateKey { .. }
        ));
    }
}
