//! Prometheus metrics: what the mount records, and the tiny HTTP endpoint that serves it.
//!
//! The data paths record through the [`metrics`] facade. Until [`install`] puts a recorder in place (a mount with
//! `-o metrics_addr=ADDR`), every record is a no-op costing an atomic load, so tests and mounts without metrics pay
//! nearly nothing. [`install`] binds `ADDR` and answers `GET /metrics` with the Prometheus text format; any other path
//! is a 404. Store requests are measured by wrapping the store in a [`MeteredBackend`], so the layers above never see
//! the difference.
//!
//! Labels are always drawn from small fixed sets (operation kinds, outcome classes, errno names): never object keys,
//! paths or key ids, which would leak names to whoever can scrape and make the number of series unbounded. Nothing
//! on the data paths allocates to record: unlabelled series have static keys and the store-request labels are built
//! once (`static` tables); only the rare FUSE-error and KMS records build their labels each time.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `s3cryptfs_fs_read_bytes_total` | counter | — | plaintext bytes returned to `read()` calls on the mount |
//! | `s3cryptfs_fs_written_bytes_total` | counter | — | plaintext bytes accepted from `write()` calls on the mount |
//! | `s3cryptfs_fuse_lookups_total` | counter | — | LOOKUP requests from the kernel: names it did not know or whose entry expired. A directory read answers with each entry's attributes (READDIRPLUS), so `ls -l` or `find -ls` after it need none for the names it listed |
//! | `s3cryptfs_fuse_errors_total` | counter | `op`, `errno` | FUSE requests answered with an error, by operation (`lookup`, `read`, `rmdir`…) and errno name (`ENOENT`, `EIO`…; `other` for rare ones). Expected answers such as ENOENT on lookup count too. Requests refused without calling the filesystem (xattrs, mknod, link) do not |
//! | `s3cryptfs_store_requests_total` | counter | `kind`, `outcome` | finished store operations. `kind`: `head`, `get`, `get_range`, `put`, `multipart_create`, `multipart_part`, `multipart_complete`, `multipart_abort`, `copy`, `rename`, `update_meta`, `delete`, `list`, `list_page` (one page of a listing from a given key on), `has_children`, `check_access`, and for key rotation `replace_head`, `update_meta_if`, `customer_key_of`, `move_to_writing_key`. `outcome`: `ok`, or the error class `not_found`, `access_denied`, `precondition`, `not_empty`, `unavailable`, `timed_out` (no answer within `timeout=`), `invalid_input`, `missing_bucket`, `encryption_not_confirmed`, `wrong_key`, `unsupported`, `other`; `cancelled` when the caller gave up before the answer |
//! | `s3cryptfs_store_request_duration_seconds` | histogram | `kind` | time from sending a store operation to its answer, whatever the outcome |
//! | `s3cryptfs_store_requests_in_flight` | gauge | — | store operations sent and not yet answered |
//! | `s3cryptfs_store_gets_in_flight_max` | gauge | — | the most object reads (`get`, `get_range`) in flight at once since the process started: shows whether concurrent reads reach the store together or queue behind each other |
//! | `s3cryptfs_store_read_bytes_total` | counter | — | object bytes received from the store (`get`, `get_range`: ciphertext with headers in client-side modes; what key-rotation operations report) |
//! | `s3cryptfs_store_written_bytes_total` | counter | — | object bytes sent to the store (`put` bodies, multipart parts, what key-rotation operations report) |
//! | `s3cryptfs_cache_hits_total` | counter | — | 64 KiB pages a read found in the page cache |
//! | `s3cryptfs_cache_misses_total` | counter | — | pages a read did not find there (fetched now, or by a read-ahead already in flight) |
//! | `s3cryptfs_cache_bytes` | gauge | — | plaintext bytes held in the page cache (at most `cache_size`) |
//! | `s3cryptfs_cache_evictions_total` | counter | — | pages dropped to stay within `cache_size` |
//! | `s3cryptfs_disk_cache_hits_total` | counter | — | pages the disk cache (`cache_dir`, or the scratch without it) served, after the page cache missed |
//! | `s3cryptfs_disk_cache_misses_total` | counter | — | pages looked up in the disk cache and not found there (then fetched from the store) |
//! | `s3cryptfs_disk_cache_bytes` | gauge | — | bytes the disk cache's entries take on disk, as counted against `cache_disk_size` (`scratch_size`) |
//! | `s3cryptfs_disk_cache_written_bytes_total` | counter | — | bytes of entries written to the disk cache |
//! | `s3cryptfs_disk_cache_evictions_total` | counter | — | entries removed to stay within `cache_disk_size` (`scratch_size`) or because the disk ran low |
//! | `s3cryptfs_disk_cache_dropped_total` | counter | — | entries found damaged, truncated, planted or sealed under another key, removed and fetched again |
//! | `s3cryptfs_memory_metadata_bytes` | gauge | — | the filesystem's estimate of what its inode table, the listings held for open directories and the negative-lookup memo take of the `max_memory` budget (counted up to half of it; past that the table is trimmed) |
//! | `s3cryptfs_memory_reserved_bytes` | gauge | — | bytes of the `max_memory` budget held now by buffers in flight (fetches, read-ahead, upload parts, S3EC passes); the page cache holds at most what they leave |
//! | `s3cryptfs_memory_spare_bytes` | gauge | — | bytes of the `max_memory` budget held by buffers kept for reuse (upload parts, at most two, while a streamed upload runs), given up to any reservation that needs the room |
//! | `s3cryptfs_dirty_files` | gauge | — | files with changes staged on local disk and not yet uploaded: the upload backlog (uploads run on close and fsync, so there is no separate queue) |
//! | `s3cryptfs_dirty_bytes` | gauge | — | plaintext size of those files |
//! | `s3cryptfs_uploads_in_flight` | gauge | — | file uploads (encrypt + PUT or multipart upload) running now |
//! | `s3cryptfs_kms_requests_total` | counter | `action`, `outcome` | KMS requests (cse-kms): `action` `generate_data_key`, `decrypt`, and for key rotation `re_encrypt`, `describe_key`; `outcome` `ok`, `disabled`, `not_found`, `access_denied`, `invalid_ciphertext`, `unavailable` or `other`. Data keys served from the mount's key cache cost no request and are not counted |
//! | `s3cryptfs_kms_request_duration_seconds` | histogram | `action` | KMS request latency, retries included |
//!
//! Histogram buckets (seconds): 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60.
//!
//! A store `kind` is one [`Backend`] operation, which may be more than one HTTP request underneath (a `rename` is a
//! copy and a delete on S3; `update_meta` moves the object through the client there, see the README's limits).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::kms::KmsError;
use crate::store::{
    Backend, BodyStream, CustomerKeyOf, Expect, Listing, ObjectInfo, ObjectKey, Page, StoreError, Transfer, Upload,
    UserMeta,
};

pub const FS_READ_BYTES: &str = "s3cryptfs_fs_read_bytes_total";
pub const FS_WRITTEN_BYTES: &str = "s3cryptfs_fs_written_bytes_total";
pub const FUSE_ERRORS: &str = "s3cryptfs_fuse_errors_total";
pub const FUSE_LOOKUPS: &str = "s3cryptfs_fuse_lookups_total";
pub const STORE_REQUESTS: &str = "s3cryptfs_store_requests_total";
pub const STORE_REQUEST_DURATION: &str = "s3cryptfs_store_request_duration_seconds";
pub const STORE_IN_FLIGHT: &str = "s3cryptfs_store_requests_in_flight";
pub const STORE_GETS_IN_FLIGHT_MAX: &str = "s3cryptfs_store_gets_in_flight_max";
pub const STORE_READ_BYTES: &str = "s3cryptfs_store_read_bytes_total";
pub const STORE_WRITTEN_BYTES: &str = "s3cryptfs_store_written_bytes_total";
pub const CACHE_HITS: &str = "s3cryptfs_cache_hits_total";
pub const CACHE_MISSES: &str = "s3cryptfs_cache_misses_total";
pub const CACHE_BYTES: &str = "s3cryptfs_cache_bytes";
pub const CACHE_EVICTIONS: &str = "s3cryptfs_cache_evictions_total";
pub const DISK_CACHE_HITS: &str = "s3cryptfs_disk_cache_hits_total";
pub const DISK_CACHE_MISSES: &str = "s3cryptfs_disk_cache_misses_total";
pub const DISK_CACHE_BYTES: &str = "s3cryptfs_disk_cache_bytes";
pub const DISK_CACHE_WRITTEN_BYTES: &str = "s3cryptfs_disk_cache_written_bytes_total";
pub const DISK_CACHE_EVICTIONS: &str = "s3cryptfs_disk_cache_evictions_total";
pub const DISK_CACHE_DROPPED: &str = "s3cryptfs_disk_cache_dropped_total";
pub const MEMORY_RESERVED: &str = "s3cryptfs_memory_reserved_bytes";
pub const MEMORY_METADATA: &str = "s3cryptfs_memory_metadata_bytes";
pub const MEMORY_SPARE: &str = "s3cryptfs_memory_spare_bytes";
pub const DIRTY_FILES: &str = "s3cryptfs_dirty_files";
pub const DIRTY_BYTES: &str = "s3cryptfs_dirty_bytes";
pub const UPLOADS_IN_FLIGHT: &str = "s3cryptfs_uploads_in_flight";
pub const KMS_REQUESTS: &str = "s3cryptfs_kms_requests_total";
pub const KMS_REQUEST_DURATION: &str = "s3cryptfs_kms_request_duration_seconds";

/// Latency buckets in seconds: from a local-store request (about a millisecond) to a large multipart part on a slow
/// link (tens of seconds).
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// How often histogram samples are folded into their buckets when nobody scrapes, so memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Longest request head the endpoint reads, and how long a connection may take from accept to its last byte
/// written: a scrape sends one short line and a few headers and reads the answer at once, so anything bigger or
/// slower is not a Prometheus server.
const MAX_REQUEST_HEAD: usize = 8 << 10;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the endpoint holds at once; the next wait in the listen backlog until one ends. Any local user can
/// connect to the address, so without a cap, connections opened and left silent (each kept up to
/// [`REQUEST_TIMEOUT`]) would take the daemon's descriptors and its staged files, journal and store connections
/// would fail with EMFILE. A scraper opens one at a time.
const MAX_CONNECTIONS: usize = 8;

/// The content type of the Prometheus text exposition format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

static METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

// ----- recording -----

fn counter(name: &'static str, labels: &'static [Label]) -> Counter {
    let key = Key::from_static_parts(name, labels);
    metrics::with_recorder(|r| r.register_counter(&key, &METADATA))
}

fn gauge(name: &'static str) -> Gauge {
    let key = Key::from_static_name(name);
    metrics::with_recorder(|r| r.register_gauge(&key, &METADATA))
}

fn histogram(name: &'static str, labels: &'static [Label]) -> Histogram {
    let key = Key::from_static_parts(name, labels);
    metrics::with_recorder(|r| r.register_histogram(&key, &METADATA))
}

fn add_signed(g: Gauge, delta: i64) {
    if delta >= 0 {
        g.increment(delta as f64);
    } else {
        g.decrement(delta.unsigned_abs() as f64);
    }
}

/// A `read()` on the mount returned `bytes` bytes.
pub fn fs_read(bytes: usize) {
    counter(FS_READ_BYTES, &[]).increment(bytes as u64);
}

/// A `write()` on the mount accepted `bytes` bytes.
pub fn fs_written(bytes: usize) {
    counter(FS_WRITTEN_BYTES, &[]).increment(bytes as u64);
}

/// The kernel sent a LOOKUP: it did not know a name, or its entry had expired.
pub fn fuse_lookup() {
    counter(FUSE_LOOKUPS, &[]).increment(1);
}

/// A FUSE request `op` was answered with `errno`.
pub fn fuse_error(op: &'static str, errno: i32) {
    metrics::counter!(FUSE_ERRORS, "op" => op, "errno" => errno_name(errno)).increment(1);
}

/// The name of an errno value as in `errno.h`; `other` for those the filesystem does not normally return.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENOTSUP => "ENOTSUP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::EINTR => "EINTR",
        libc::ENOTTY => "ENOTTY",
        _ => "other",
    }
}

/// One read looked up `hits + misses` pages in the page cache.
pub fn cache_lookups(hits: u64, misses: u64) {
    if hits > 0 {
        counter(CACHE_HITS, &[]).increment(hits);
    }
    if misses > 0 {
        counter(CACHE_MISSES, &[]).increment(misses);
    }
}

/// The page cache grew (positive) or shrank by `delta` bytes, `evicted` pages of it to stay within budget. Deltas
/// rather than totals, so they can be recorded outside the cache's lock and still add up.
pub fn cache_changed(delta: i64, evicted: u64) {
    if delta != 0 {
        add_signed(gauge(CACHE_BYTES), delta);
    }
    if evicted > 0 {
        counter(CACHE_EVICTIONS, &[]).increment(evicted);
    }
}

/// The disk cache served `hits` pages and missed `misses`.
pub fn disk_cache_lookups(hits: u64, misses: u64) {
    if hits > 0 {
        counter(DISK_CACHE_HITS, &[]).increment(hits);
    }
    if misses > 0 {
        counter(DISK_CACHE_MISSES, &[]).increment(misses);
    }
}

/// The disk cache's entries now take `bytes`; `written` bytes of entries were written, `evicted` entries removed to
/// make room and `dropped` found damaged since the last call.
pub fn disk_cache_changed(bytes: u64, written: u64, evicted: u64, dropped: u64) {
    gauge(DISK_CACHE_BYTES).set(bytes as f64);
    for (name, n) in [(DISK_CACHE_WRITTEN_BYTES, written), (DISK_CACHE_EVICTIONS, evicted), (DISK_CACHE_DROPPED, dropped)] {
        if n > 0 {
            counter(name, &[]).increment(n);
        }
    }
}

/// Reservations of the memory budget grew (positive) or shrank by `delta` bytes.
pub fn memory_reserved(delta: i64) {
    add_signed(gauge(MEMORY_RESERVED), delta);
}

/// Bytes of the budget held by kept buffers changed by `delta` (see `memory`).
pub fn memory_spare(delta: i64) {
    add_signed(gauge(MEMORY_SPARE), delta);
}

/// The filesystem's metadata estimate is now `bytes` (see `memory`).
pub fn memory_metadata(bytes: u64) {
    gauge(MEMORY_METADATA).set(bytes as f64);
}

/// A staged file's `(dirty, size)` went from `before` to `after`; a file counts in the dirty gauges while dirty.
pub fn dirty_changed(before: (bool, u64), after: (bool, u64)) {
    let share = |(dirty, size): (bool, u64)| if dirty { (1i64, size as i64) } else { (0, 0) };
    let (files_before, bytes_before) = share(before);
    let (files_after, bytes_after) = share(after);
    if files_after != files_before {
        add_signed(gauge(DIRTY_FILES), files_after - files_before);
    }
    if bytes_after != bytes_before {
        add_signed(gauge(DIRTY_BYTES), bytes_after - bytes_before);
    }
}

/// Counts one file upload as in flight until dropped (so an upload abandoned half-way is not counted forever).
#[must_use = "the upload counts as in flight only while this guard lives"]
pub struct UploadInFlight(());

impl UploadInFlight {
    pub fn start() -> UploadInFlight {
        gauge(UPLOADS_IN_FLIGHT).increment(1.0);
        UploadInFlight(())
    }
}

impl Drop for UploadInFlight {
    fn drop(&mut self) {
        gauge(UPLOADS_IN_FLIGHT).decrement(1.0);
    }
}

/// Records one KMS request: `action` as sent (`GenerateDataKey`, `Decrypt`, `ReEncrypt`, `DescribeKey`), its result and how long it took
/// (retries included). Called from `KmsClient::call`.
pub fn kms_request(action: &str, result: Result<(), &KmsError>, elapsed: Duration) {
    let action = match action {
        "GenerateDataKey" => "generate_data_key",
        "Decrypt" => "decrypt",
        "ReEncrypt" => "re_encrypt",
        "DescribeKey" => "describe_key",
        _ => "other",
    };
    let outcome = match result {
        Ok(()) => "ok",
        Err(KmsError::Disabled { .. }) => "disabled",
        Err(KmsError::NotFound { .. }) => "not_found",
        Err(KmsError::AccessDenied { .. }) => "access_denied",
        Err(KmsError::InvalidCiphertext { .. }) => "invalid_ciphertext",
        Err(KmsError::Unavailable { .. }) => "unavailable",
        // Not exhaustive on purpose: a new KMS error should not have to wait for a label to compile.
        Err(_) => "other",
    };
    // KMS requests are rare (one per file written, one per file first opened), so these labels may allocate.
    metrics::counter!(KMS_REQUESTS, "action" => action, "outcome" => outcome).increment(1);
    metrics::histogram!(KMS_REQUEST_DURATION, "action" => action).record(elapsed.as_secs_f64());
}

// ----- store requests -----

/// Defines an enum of label values with its `as_str` and the list of all its values.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),* }
            }
        }
    };
}

label_enum! {
    /// The `kind` label: which [`Backend`] operation a store request was.
    RequestKind {
        Head => "head",
        Get => "get",
        GetRange => "get_range",
        Put => "put",
        MultipartCreate => "multipart_create",
        MultipartPart => "multipart_part",
        MultipartComplete => "multipart_complete",
        MultipartAbort => "multipart_abort",
        Copy => "copy",
        Rename => "rename",
        UpdateMeta => "update_meta",
        UpdateMetaIf => "update_meta_if",
        Delete => "delete",
        List => "list",
        ListPage => "list_page",
        HasChildren => "has_children",
        CheckAccess => "check_access",
        ReplaceHead => "replace_head",
        CustomerKeyOf => "customer_key_of",
        MoveToWritingKey => "move_to_writing_key",
    }
}

label_enum! {
    /// The `outcome` label: `ok` or the class of the error.
    Outcome {
        Ok => "ok",
        NotFound => "not_found",
        AccessDenied => "access_denied",
        Precondition => "precondition",
        NotEmpty => "not_empty",
        Unavailable => "unavailable",
        TimedOut => "timed_out",
        InvalidInput => "invalid_input",
        MissingBucket => "missing_bucket",
        EncryptionNotConfirmed => "encryption_not_confirmed",
        WrongKey => "wrong_key",
        Unsupported => "unsupported",
        Other => "other",
        Cancelled => "cancelled",
    }
}

impl Outcome {
    pub fn of(e: &StoreError) -> Outcome {
        match e {
            StoreError::NotFound { .. } => Outcome::NotFound,
            StoreError::AccessDenied { .. } => Outcome::AccessDenied,
            StoreError::Precondition { .. } => Outcome::Precondition,
            StoreError::NotEmpty { .. } => Outcome::NotEmpty,
            StoreError::Unavailable { .. } => Outcome::Unavailable,
            StoreError::TimedOut { .. } => Outcome::TimedOut,
            StoreError::InvalidInput { .. } | StoreError::NameTooLong { .. } => Outcome::InvalidInput,
            StoreError::MissingBucket { .. } => Outcome::MissingBucket,
            StoreError::XattrUnsupported { .. } => Outcome::Unsupported,
            StoreError::EncryptionNotConfirmed { .. } => Outcome::EncryptionNotConfirmed,
            StoreError::WrongKey { .. } => Outcome::WrongKey,
            StoreError::Unsupported { .. } => Outcome::Unsupported,
            StoreError::Other { .. } => Outcome::Other,
        }
    }
}

/// `[kind]` labels of the latency histogram, one per kind, built on first use.
fn kind_labels(kind: RequestKind) -> &'static [Label] {
    static TABLE: OnceLock<Vec<[Label; 1]>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        RequestKind::ALL.iter().map(|k| [Label::from_static_parts("kind", k.as_str())]).collect()
    });
    &table[kind as usize]
}

/// `[kind, outcome]` labels of the request counter, one per combination, built on first use.
fn request_labels(kind: RequestKind, outcome: Outcome) -> &'static [Label] {
    static TABLE: OnceLock<Vec<[Label; 2]>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        RequestKind::ALL
            .iter()
            .flat_map(|k| {
                Outcome::ALL.iter().map(move |o| {
                    [Label::from_static_parts("kind", k.as_str()), Label::from_static_parts("outcome", o.as_str())]
                })
            })
            .collect()
    });
    &table[kind as usize * Outcome::ALL.len() + outcome as usize]
}

/// Object reads in flight now, and the most there were at once: a high-water mark cannot be derived from the
/// in-flight gauge by scraping (a scrape sees one instant), so it is kept here. Process-wide, like the recorder.
static GETS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
static GETS_IN_FLIGHT_MAX: AtomicU64 = AtomicU64::new(0);

/// Counts one object read as in flight until dropped, and raises the high-water mark when it is a new one.
struct GetInFlight(());

impl GetInFlight {
    fn start() -> GetInFlight {
        let now = GETS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed) + 1;
        if GETS_IN_FLIGHT_MAX.fetch_max(now, Ordering::Relaxed) < now {
            gauge(STORE_GETS_IN_FLIGHT_MAX).set(now as f64);
        }
        GetInFlight(())
    }
}

impl Drop for GetInFlight {
    fn drop(&mut self) {
        GETS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One store request from start to answer. Dropped without [`Request::finish`] (the caller's future was dropped),
/// it is recorded as `cancelled`; either way it leaves the in-flight gauge.
struct Request {
    kind: RequestKind,
    start: Instant,
    finished: bool,
}

impl Request {
    fn start(kind: RequestKind) -> Request {
        gauge(STORE_IN_FLIGHT).increment(1.0);
        Request { kind, start: Instant::now(), finished: false }
    }

    fn finish<T>(self, result: &Result<T, StoreError>) {
        self.finish_as(match result {
            Ok(_) => Outcome::Ok,
            Err(e) => Outcome::of(e),
        });
    }

    fn finish_as(mut self, outcome: Outcome) {
        self.record(outcome);
        self.finished = true;
    }

    fn record(&self, outcome: Outcome) {
        counter(STORE_REQUESTS, request_labels(self.kind, outcome)).increment(1);
        histogram(STORE_REQUEST_DURATION, kind_labels(self.kind)).record(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Outcome::Cancelled);
        }
        gauge(STORE_IN_FLIGHT).decrement(1.0);
    }
}

/// Runs one store request and records it.
async fn measure<T>(kind: RequestKind, request: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let r = Request::start(kind);
    let result = request.await;
    r.finish(&result);
    result
}

fn received(bytes: &Bytes) {
    counter(STORE_READ_BYTES, &[]).increment(bytes.len() as u64);
}

fn sent(bytes: u64) {
    counter(STORE_WRITTEN_BYTES, &[]).increment(bytes);
}

/// Body bytes a maintenance operation (key rotation) reports having moved.
fn moved(t: &Transfer) {
    counter(STORE_READ_BYTES, &[]).increment(t.bytes_down);
    sent(t.bytes_up);
}

/// A [`Backend`] that forwards every operation to `inner` and records it (count by kind and outcome, latency,
/// bytes). Multipart uploads are wrapped too, so each part is a request of its own.
pub struct MeteredBackend {
    inner: Arc<dyn Backend>,
}

impl MeteredBackend {
    pub fn new(inner: Arc<dyn Backend>) -> MeteredBackend {
        MeteredBackend { inner }
    }
}

/// A streamed GET recorded as one request of `kind` from the call to the end of its body (or its first failed
/// piece; a body dropped half read is `cancelled`), in flight all that time.
async fn metered_stream(
    kind: RequestKind,
    answer: impl std::future::Future<Output = Result<(BodyStream, ObjectInfo, UserMeta), StoreError>>,
) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
    let get = GetInFlight::start();
    let request = Request::start(kind);
    let (body, info, meta) = match answer.await {
        Ok(answer) => answer,
        Err(e) => {
            request.finish_as(Outcome::of(&e));
            return Err(e);
        }
    };
    let body = futures::stream::unfold((body, Some(request), get), |(mut body, mut request, get)| async move {
        let piece = body.next().await;
        match &piece {
            Some(Ok(bytes)) => received(bytes),
            Some(Err(e)) => {
                if let Some(r) = request.take() {
                    r.finish_as(Outcome::of(e));
                }
            }
            None => {
                if let Some(r) = request.take() {
                    r.finish_as(Outcome::Ok);
                }
            }
        }
        piece.map(|p| (p, (body, request, get)))
    });
    Ok((Box::pin(body), info, meta))
}

#[async_trait]
impl Backend for MeteredBackend {
    async fn head(&self, key: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
        measure(RequestKind::Head, self.inner.head(key)).await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let _get = GetInFlight::start();
        let result = measure(RequestKind::GetRange, self.inner.get_range(key, range)).await;
        if let Ok((bytes, _, _)) = &result {
            received(bytes);
        }
        result
    }

    /// Recorded like `get_range`: one request from the call to the end of its body (or its first failed piece; a
    /// body dropped half read is `cancelled`), in flight all that time.
    async fn get_range_stream(
        &self,
        key: &ObjectKey,
        range: Range<u64>,
    ) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        metered_stream(RequestKind::GetRange, self.inner.get_range_stream(key, range)).await
    }

    async fn get(&self, key: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
        let _get = GetInFlight::start();
        let result = measure(RequestKind::Get, self.inner.get(key)).await;
        if let Ok((bytes, _, _)) = &result {
            received(bytes);
        }
        result
    }

    /// Recorded like `get`, from the call to the end of its body (as `get_range_stream`).
    async fn get_stream(&self, key: &ObjectKey) -> Result<(BodyStream, ObjectInfo, UserMeta), StoreError> {
        metered_stream(RequestKind::Get, self.inner.get_stream(key)).await
    }

    async fn put(&self, key: &ObjectKey, body: Bytes, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
        let len = body.len() as u64;
        let result = measure(RequestKind::Put, self.inner.put(key, body, meta)).await;
        if result.is_ok() {
            sent(len);
        }
        result
    }

    async fn put_expect(
        &self,
        key: &ObjectKey,
        body: Bytes,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<ObjectInfo, StoreError> {
        let len = body.len() as u64;
        let result = measure(RequestKind::Put, self.inner.put_expect(key, body, meta, expect)).await;
        if result.is_ok() {
            sent(len);
        }
        result
    }

    async fn put_multipart(&self, key: &ObjectKey, meta: &UserMeta) -> Result<Box<dyn Upload>, StoreError> {
        let inner = measure(RequestKind::MultipartCreate, self.inner.put_multipart(key, meta)).await?;
        Ok(Box::new(MeteredUpload { inner }))
    }

    async fn put_multipart_expect(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        expect: &Expect,
    ) -> Result<Box<dyn Upload>, StoreError> {
        let inner =
            measure(RequestKind::MultipartCreate, self.inner.put_multipart_expect(key, meta, expect)).await?;
        Ok(Box::new(MeteredUpload { inner }))
    }

    async fn abort_multipart(&self, key: &ObjectKey, upload_id: &str) -> Result<(), StoreError> {
        measure(RequestKind::MultipartAbort, self.inner.abort_multipart(key, upload_id)).await
    }

    async fn copy(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
        measure(RequestKind::Copy, self.inner.copy(from, to, meta)).await
    }

    // Forwarded rather than left to the trait's default, which would bypass the inner backend's native rename.
    async fn rename(&self, from: &ObjectKey, to: &ObjectKey, meta: Option<&UserMeta>) -> Result<(), StoreError> {
        measure(RequestKind::Rename, self.inner.rename(from, to, meta)).await
    }

    async fn rename_if(
        &self,
        from: &ObjectKey,
        to: &ObjectKey,
        meta: Option<&UserMeta>,
        etag: &str,
    ) -> Result<bool, StoreError> {
        measure(RequestKind::Rename, self.inner.rename_if(from, to, meta, etag)).await
    }

    async fn update_meta(&self, key: &ObjectKey, meta: &UserMeta) -> Result<ObjectInfo, StoreError> {
        measure(RequestKind::UpdateMeta, self.inner.update_meta(key, meta)).await
    }

    async fn update_meta_if(
        &self,
        key: &ObjectKey,
        meta: &UserMeta,
        etag: &str,
    ) -> Result<(ObjectInfo, Transfer), StoreError> {
        let result = measure(RequestKind::UpdateMetaIf, self.inner.update_meta_if(key, meta, etag)).await;
        if let Ok((_, t)) = &result {
            moved(t);
        }
        result
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        measure(RequestKind::Delete, self.inner.delete(key)).await
    }

    /// Counted as a `delete`: one request wherever the store checks the condition itself.
    async fn delete_if(&self, key: &ObjectKey, etag: &str) -> Result<(), StoreError> {
        measure(RequestKind::Delete, self.inner.delete_if(key, etag)).await
    }

    /// Counted as one `delete`: one DeleteObjects request for up to 1,000 keys.
    async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        measure(RequestKind::Delete, self.inner.delete_many(keys)).await
    }

    fn deletes_are_conditional(&self) -> bool {
        self.inner.deletes_are_conditional()
    }

    fn conditions_checked_by_head(&self) -> bool {
        self.inner.conditions_checked_by_head()
    }

    async fn list(&self, dir: &str, recursive: bool) -> Result<Listing, StoreError> {
        measure(RequestKind::List, self.inner.list(dir, recursive)).await
    }

    async fn list_page(&self, dir: &str, start_after: &str) -> Result<Page, StoreError> {
        measure(RequestKind::ListPage, self.inner.list_page(dir, start_after)).await
    }

    fn lists_from_keys(&self) -> bool {
        self.inner.lists_from_keys()
    }

    fn streams_bodies(&self) -> bool {
        self.inner.streams_bodies()
    }

    fn copies_parts(&self) -> bool {
        self.inner.copies_parts()
    }

    async fn list_children_page(
        &self,
        dir: &str,
        after: Option<&str>,
        token: Option<&str>,
    ) -> Result<crate::store::ChildPage, StoreError> {
        measure(RequestKind::ListPage, self.inner.list_children_page(dir, after, token)).await
    }

    async fn has_children(&self, dir: &str) -> Result<bool, StoreError> {
        measure(RequestKind::HasChildren, self.inner.has_children(dir)).await
    }

    async fn check_access(&self) -> Result<(), StoreError> {
        measure(RequestKind::CheckAccess, self.inner.check_access()).await
    }

    async fn probe_conditional_writes(&self) -> Result<(), StoreError> {
        // Its requests (four puts and deletes at mount) go to the store directly and are not counted here.
        self.inner.probe_conditional_writes().await
    }

    fn max_path_len(&self, dir: bool) -> usize {
        self.inner.max_path_len(dir)
    }

    fn heads_are_cheap(&self) -> bool {
        self.inner.heads_are_cheap()
    }

    async fn replace_head(&self, key: &ObjectKey, etag: &str, head: Bytes) -> Result<Transfer, StoreError> {
        let result = measure(RequestKind::ReplaceHead, self.inner.replace_head(key, etag, head)).await;
        if let Ok(t) = &result {
            moved(t);
        }
        result
    }

    async fn customer_key_of(&self, key: &ObjectKey) -> Result<CustomerKeyOf, StoreError> {
        let result = measure(RequestKind::CustomerKeyOf, self.inner.customer_key_of(key)).await;
        if let Ok(of) = &result {
            moved(&of.cost);
        }
        result
    }

    async fn move_to_writing_key(
        &self,
        key: &ObjectKey,
        of: &CustomerKeyOf,
        etag: &str,
        size: u64,
    ) -> Result<Transfer, StoreError> {
        let result =
            measure(RequestKind::MoveToWritingKey, self.inner.move_to_writing_key(key, of, etag, size)).await;
        if let Ok(t) = &result {
            moved(t);
        }
        result
    }
}

/// A multipart upload whose parts, completion and abort are recorded.
struct MeteredUpload {
    inner: Box<dyn Upload>,
}

#[async_trait]
impl Upload for MeteredUpload {
    fn upload_id(&self) -> Option<String> {
        self.inner.upload_id()
    }

    fn copies_parts(&self) -> bool {
        self.inner.copies_parts()
    }

    fn put_part(&mut self, part: Bytes) -> BoxFuture<'static, Result<(), StoreError>> {
        let len = part.len() as u64;
        let send = self.inner.put_part(part);
        Box::pin(async move {
            // Timed from the first poll: the caller may create several parts' futures before it runs them.
            let result = measure(RequestKind::MultipartPart, send).await;
            if result.is_ok() {
                sent(len);
            }
            result
        })
    }

    fn copy_part(&mut self, range: std::ops::Range<u64>, etag: &str) -> BoxFuture<'static, Result<(), StoreError>> {
        // A part request like any other, but its bytes stay in the store: nothing is counted as sent.
        let copy = self.inner.copy_part(range, etag);
        Box::pin(measure(RequestKind::MultipartPart, copy))
    }

    async fn complete(self: Box<Self>) -> Result<ObjectInfo, StoreError> {
        measure(RequestKind::MultipartComplete, self.inner.complete()).await
    }

    async fn abort(self: Box<Self>) -> Result<(), StoreError> {
        measure(RequestKind::MultipartAbort, self.inner.abort()).await
    }
}

// ----- exporter -----

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics at metrics_addr={addr} (pick a free port on a local address)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics can only be served from inside the tokio runtime (a bug in s3cryptfs)")]
    NoRuntime,
    #[error("metrics are already being served by this process (a bug in s3cryptfs)")]
    AlreadyInstalled,
}

/// A recorder with this module's histogram buckets and metric descriptions; [`install`] makes it global, tests use
/// it locally (`metrics::with_local_recorder`).
pub fn recorder() -> PrometheusRecorder {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .expect("LATENCY_BUCKETS is a non-empty constant, the only thing set_buckets_for_metric checks")
        .build_recorder();
    metrics::with_local_recorder(&recorder, describe);
    recorder
}

/// HELP lines, and zero values for the unlabelled series so that they exist before their first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(FS_READ_BYTES, Unit::Bytes, "Plaintext bytes returned to read() calls on the mount.");
    describe_counter!(FS_WRITTEN_BYTES, Unit::Bytes, "Plaintext bytes accepted from write() calls on the mount.");
    describe_counter!(FUSE_ERRORS, "FUSE requests answered with an error, by operation and errno.");
    describe_counter!(FUSE_LOOKUPS, "LOOKUP requests from the kernel (names READDIRPLUS answered need none).");
    describe_counter!(STORE_REQUESTS, "Store operations finished, by kind and outcome.");
    describe_histogram!(STORE_REQUEST_DURATION, Unit::Seconds, "Store operation latency, by kind.");
    describe_gauge!(STORE_IN_FLIGHT, "Store operations sent and not yet answered.");
    describe_gauge!(STORE_GETS_IN_FLIGHT_MAX, "The most object reads in flight at once since the start.");
    describe_counter!(STORE_READ_BYTES, Unit::Bytes, "Object bytes received from the store.");
    describe_counter!(STORE_WRITTEN_BYTES, Unit::Bytes, "Object bytes sent to the store.");
    describe_counter!(CACHE_HITS, "Pages a read found in the page cache.");
    describe_counter!(CACHE_MISSES, "Pages a read did not find in the page cache.");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Plaintext bytes held in the page cache.");
    describe_counter!(CACHE_EVICTIONS, "Pages evicted from the page cache to stay within its budget.");
    describe_counter!(DISK_CACHE_HITS, "Pages the disk cache (or the scratch) served.");
    describe_counter!(DISK_CACHE_MISSES, "Pages not found in the disk cache.");
    describe_gauge!(DISK_CACHE_BYTES, Unit::Bytes, "Bytes the disk cache's (or scratch's) entries take, as counted against cache_disk_size (scratch_size).");
    describe_counter!(DISK_CACHE_WRITTEN_BYTES, Unit::Bytes, "Bytes of entries written to the disk cache.");
    describe_counter!(DISK_CACHE_EVICTIONS, "Disk cache entries removed to make room.");
    describe_counter!(DISK_CACHE_DROPPED, "Disk cache entries found damaged and removed.");
    describe_gauge!(MEMORY_RESERVED, Unit::Bytes, "Bytes of max_memory held by buffers in flight.");
    describe_gauge!(MEMORY_SPARE, Unit::Bytes, "Bytes of max_memory held by buffers kept for reuse.");
    describe_gauge!(MEMORY_METADATA, Unit::Bytes, "Bytes of max_memory taken by the inode table and held listings (estimate).");
    describe_gauge!(DIRTY_FILES, "Files with changes staged locally and not yet uploaded.");
    describe_gauge!(DIRTY_BYTES, Unit::Bytes, "Plaintext size of the files with changes not yet uploaded.");
    describe_gauge!(UPLOADS_IN_FLIGHT, "File uploads running now.");
    describe_counter!(KMS_REQUESTS, "KMS requests, by action and outcome.");
    describe_histogram!(KMS_REQUEST_DURATION, Unit::Seconds, "KMS request latency, by action.");
    for name in [FS_READ_BYTES, FS_WRITTEN_BYTES, FUSE_LOOKUPS, STORE_READ_BYTES, STORE_WRITTEN_BYTES] {
        counter(name, &[]).absolute(0);
    }
    for name in [CACHE_HITS, CACHE_MISSES, CACHE_EVICTIONS] {
        counter(name, &[]).absolute(0);
    }
    for name in [DISK_CACHE_HITS, DISK_CACHE_MISSES, DISK_CACHE_WRITTEN_BYTES, DISK_CACHE_EVICTIONS, DISK_CACHE_DROPPED] {
        counter(name, &[]).absolute(0);
    }
    for name in [
        STORE_IN_FLIGHT, STORE_GETS_IN_FLIGHT_MAX, MEMORY_RESERVED, MEMORY_METADATA, MEMORY_SPARE, CACHE_BYTES,
        DISK_CACHE_BYTES, DIRTY_FILES, DIRTY_BYTES, UPLOADS_IN_FLIGHT,
    ] {
        gauge(name).increment(0.0);
    }
}

/// Serves `http://addr/metrics` for the rest of the process, from the current tokio runtime. Fails if `addr` cannot
/// be bound (port taken, address not local), before anything is installed.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| MetricsError::NoRuntime)?;
    let bind = |addr| -> std::io::Result<TcpListener> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let _entered = runtime.enter();
        TcpListener::from_std(listener)
    };
    let listener = bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let recorder = recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    let upkeep = handle.clone();
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    runtime.spawn(serve(listener, handle));
    tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
    Ok(())
}

/// Answers scrapes on `listener` until the runtime stops: one request per connection, each on its own task, at most
/// [`MAX_CONNECTIONS`] at once (the next is accepted only when one ends) and each within [`REQUEST_TIMEOUT`].
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    serve_within(listener, handle, MAX_CONNECTIONS, REQUEST_TIMEOUT).await
}

/// [`serve`] with its limits given (tests use a short deadline).
async fn serve_within(listener: TcpListener, handle: PrometheusHandle, connections: usize, deadline: Duration) {
    let slots = Arc::new(tokio::sync::Semaphore::new(connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handle = handle.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(deadline, answer(stream, &handle)).await {
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                        Err(_) => tracing::debug!("metrics request: connection dropped at its deadline"),
                        Ok(Ok(())) => {}
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let head = read_head(&mut stream).await?;
    let line = head.as_deref().and_then(|h| h.lines().next()).unwrap_or("");
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", TEXT_FORMAT, handle.render()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "not found: metrics are at /metrics\n".to_string()),
        _ if head.is_none() => ("400 Bad Request", "text/plain", "bad request\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET and HEAD are served\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// The request line and headers, up to the blank line; `None` if they are too long or not text.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8(buf).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    use crate::store::ObjectStoreBackend;

    /// Runs `f` on a current-thread runtime with `recorder` as this thread's recorder, so that every record made by
    /// the future lands in it (a multi-thread runtime would record from other threads into the global recorder).
    fn recorded<T>(recorder: &PrometheusRecorder, f: impl Future<Output = T>) -> T {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        metrics::with_local_recorder(recorder, || rt.block_on(f))
    }

    /// The value of one series (`name{labels}` exactly as rendered), if present.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn memory() -> Arc<dyn Backend> {
        Arc::new(ObjectStoreBackend::new(Arc::new(InMemory::new()), "").unwrap())
    }

    fn key(k: &str) -> ObjectKey {
        ObjectKey::new(k).unwrap()
    }

    #[test]
    fn metered_backend_records_requests_outcomes_latency_and_bytes() {
        let recorder = recorder();
        recorded(&recorder, async {
            let store = MeteredBackend::new(memory());
            let meta = UserMeta::default();
            store.put(&key("a"), Bytes::from_static(b"0123456789"), &meta).await.unwrap();
            store.head(&key("a")).await.unwrap();
            let (got, _, _) = store.get_range(&key("a"), 2..6).await.unwrap();
            assert_eq!(&got[..], b"2345");
            store.get(&key("a")).await.unwrap();
            assert!(store.head(&key("missing")).await.unwrap_err().is_not_found());
            assert!(store.get(&key("missing")).await.unwrap_err().is_not_found());
            store.copy(&key("a"), &key("b"), None).await.unwrap();
            store.list("", false).await.unwrap();
            store.delete(&key("b")).await.unwrap();

            let mut upload = store.put_multipart(&key("m"), &meta).await.unwrap();
            upload.put_part(Bytes::from(vec![1u8; 100])).await.unwrap();
            upload.put_part(Bytes::from(vec![2u8; 50])).await.unwrap();
            upload.complete().await.unwrap();
            let (whole, _, _) = store.get(&key("m")).await.unwrap();
            assert_eq!(whole.len(), 150);
        });
        let text = recorder.handle().render();
        let req = |kind: &str, outcome: &str| {
            value(&text, &format!("{STORE_REQUESTS}{{kind=\"{kind}\",outcome=\"{outcome}\"}}")).unwrap_or(0.0)
        };
        assert_eq!(req("put", "ok"), 1.0, "{text}");
        assert_eq!(req("head", "ok"), 1.0);
        assert_eq!(req("head", "not_found"), 1.0);
        assert_eq!(req("get", "ok"), 2.0);
        assert_eq!(req("get", "not_found"), 1.0);
        assert_eq!(req("get_range", "ok"), 1.0);
        assert_eq!(req("copy", "ok"), 1.0);
        assert_eq!(req("list", "ok"), 1.0);
        assert_eq!(req("delete", "ok"), 1.0);
        assert_eq!(req("multipart_create", "ok"), 1.0);
        assert_eq!(req("multipart_part", "ok"), 2.0);
        assert_eq!(req("multipart_complete", "ok"), 1.0);
        // Latency of every request, failed ones included, in buckets.
        let count = |kind: &str| value(&text, &format!("{STORE_REQUEST_DURATION}_count{{kind=\"{kind}\"}}"));
        assert_eq!(count("head"), Some(2.0), "{text}");
        assert_eq!(count("multipart_part"), Some(2.0));
        assert!(text.contains(&format!("{STORE_REQUEST_DURATION}_bucket{{kind=\"head\",le=\"0.001\"}}")), "{text}");
        // Bytes: 10 put + 100 + 50 in parts; 4 (range) + 10 + 150 received.
        assert_eq!(value(&text, STORE_WRITTEN_BYTES), Some(160.0));
        assert_eq!(value(&text, STORE_READ_BYTES), Some(164.0));
        assert_eq!(value(&text, STORE_IN_FLIGHT), Some(0.0));
        assert!(text.contains(&format!("# HELP {STORE_REQUESTS} ")), "{text}");
    }

    /// A store that never answers, to see what a request abandoned by its caller leaves behind.
    struct Silent;

    #[async_trait]
    impl Backend for Silent {
        async fn head(&self, _: &ObjectKey) -> Result<(ObjectInfo, UserMeta), StoreError> {
            std::future::pending().await
        }
        async fn get_range(&self, _: &ObjectKey, _: Range<u64>) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            std::future::pending().await
        }
        async fn get(&self, _: &ObjectKey) -> Result<(Bytes, ObjectInfo, UserMeta), StoreError> {
            std::future::pending().await
        }
        async fn put_expect(&self, _: &ObjectKey, _: Bytes, _: &UserMeta, _: &Expect) -> Result<ObjectInfo, StoreError> {
            std::future::pending().await
        }
        async fn put_multipart_expect(
            &self,
            _: &ObjectKey,
            _: &UserMeta,
            _: &Expect,
        ) -> Result<Box<dyn Upload>, StoreError> {
            std::future::pending().await
        }
        async fn copy(&self, _: &ObjectKey, _: &ObjectKey, _: Option<&UserMeta>) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn update_meta(&self, _: &ObjectKey, _: &UserMeta) -> Result<ObjectInfo, StoreError> {
            std::future::pending().await
        }
        async fn delete(&self, _: &ObjectKey) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn list(&self, _: &str, _: bool) -> Result<Listing, StoreError> {
            std::future::pending().await
        }
        async fn check_access(&self) -> Result<(), StoreError> {
            std::future::pending().await
        }
    }

    #[test]
    fn an_abandoned_request_is_cancelled_and_leaves_the_in_flight_gauge() {
        let recorder = recorder();
        recorded(&recorder, async {
            let store = MeteredBackend::new(Arc::new(Silent));
            let r = tokio::time::timeout(Duration::from_millis(10), store.head(&key("a"))).await;
            assert!(r.is_err());
        });
        let text = recorder.handle().render();
        assert_eq!(value(&text, &format!("{STORE_REQUESTS}{{kind=\"head\",outcome=\"cancelled\"}}")), Some(1.0), "{text}");
        assert_eq!(value(&text, STORE_IN_FLIGHT), Some(0.0));
    }

    #[test]
    fn every_store_error_has_an_outcome_label() {
        let errors = [
            StoreError::NotFound { key: "k".into() },
            StoreError::AccessDenied { key: "k".into(), detail: "d".into() },
            StoreError::Unavailable { detail: "d".into(), source: None },
            StoreError::TimedOut { key: "k".into(), after: std::time::Duration::from_secs(3), detail: "GET".into() },
            StoreError::invalid("bad"),
        ];
        let labels: Vec<_> = errors.iter().map(|e| Outcome::of(e).as_str()).collect();
        assert_eq!(labels, ["not_found", "access_denied", "unavailable", "timed_out", "invalid_input"]);
        // The label tables line up with the enums.
        for &k in RequestKind::ALL {
            assert_eq!(kind_labels(k)[0].value(), k.as_str());
            for &o in Outcome::ALL {
                let l = request_labels(k, o);
                assert_eq!((l[0].value(), l[1].value()), (k.as_str(), o.as_str()));
            }
        }
    }

    #[test]
    fn cache_dirty_upload_and_fuse_series() {
        let recorder = recorder();
        let tmp = tempfile::tempdir().unwrap();
        metrics::with_local_recorder(&recorder, || {
            use crate::cache::{ObjectId, PageCache};
            let cache = PageCache::new(10);
            let id = ObjectId { key: "k".into(), etag: "e".into() };
            cache.put(&id, 0, Bytes::from_static(b"0123"));
            cache.put(&id, 1, Bytes::from_static(b"4567"));
            cache.put(&id, 2, Bytes::from_static(b"89ab")); // evicts page 0
            cache.invalidate_key("k");
            cache.put(&id, 3, Bytes::from_static(b"cd"));

            let journal = std::sync::Arc::new(
                tokio::runtime::Runtime::new()
                    .unwrap()
                    .block_on(crate::journal::Journal::open(
                        &tmp.path().join("journal"),
                        "file:///metrics-test",
                        crate::journal::Keying::Local,
                        crate::crypto::AeadBackend::AwsLc,
                    ))
                    .unwrap(),
            );
            use crate::journal::BaseVersion;
            let mut staged = crate::fs::write::Staged::create(&journal, true, false, BaseVersion::Absent).unwrap();
            staged.write_at(0, b"hello").unwrap();
            staged.write_at(3, b"lo, world").unwrap();
            let created = crate::fs::write::Staged::create(&journal, true, true, BaseVersion::Absent).unwrap();
            let in_flight = UploadInFlight::start();
            let text = recorder.handle().render();
            assert_eq!(value(&text, DIRTY_FILES), Some(2.0), "{text}");
            assert_eq!(value(&text, DIRTY_BYTES), Some(12.0));
            assert_eq!(value(&text, UPLOADS_IN_FLIGHT), Some(1.0));
            drop(in_flight);
            staged.mark_clean();
            staged.truncate(3).unwrap();
            let text = recorder.handle().render();
            assert_eq!(value(&text, DIRTY_FILES), Some(2.0));
            assert_eq!(value(&text, DIRTY_BYTES), Some(3.0));
            staged.mark_clean();
            drop(created);
            drop(cache);

            fuse_error("rmdir", libc::ENOTEMPTY);
            fuse_error("lookup", libc::ENOENT);
            fuse_error("lookup", libc::ENOENT);
            fuse_error("read", 1234);
            fs_read(100);
            fs_written(7);
        });
        let text = recorder.handle().render();
        assert_eq!(value(&text, CACHE_EVICTIONS), Some(1.0), "{text}");
        assert_eq!(value(&text, CACHE_BYTES), Some(0.0), "a dropped cache holds nothing");
        assert_eq!(value(&text, DIRTY_FILES), Some(0.0));
        assert_eq!(value(&text, DIRTY_BYTES), Some(0.0));
        assert_eq!(value(&text, UPLOADS_IN_FLIGHT), Some(0.0));
        assert_eq!(value(&text, &format!("{FUSE_ERRORS}{{op=\"rmdir\",errno=\"ENOTEMPTY\"}}")), Some(1.0));
        assert_eq!(value(&text, &format!("{FUSE_ERRORS}{{op=\"lookup\",errno=\"ENOENT\"}}")), Some(2.0));
        assert_eq!(value(&text, &format!("{FUSE_ERRORS}{{op=\"read\",errno=\"other\"}}")), Some(1.0));
        assert_eq!(value(&text, FS_READ_BYTES), Some(100.0));
        assert_eq!(value(&text, FS_WRITTEN_BYTES), Some(7.0));
    }

    #[test]
    fn cache_bytes_follow_puts_and_invalidation() {
        let recorder = recorder();
        metrics::with_local_recorder(&recorder, || {
            use crate::cache::{ObjectId, PageCache};
            let cache = PageCache::new(100);
            let id = ObjectId { key: "k".into(), etag: "e".into() };
            cache.put(&id, 0, Bytes::from_static(b"abc"));
            cache.put(&id, 0, Bytes::from_static(b"abcdef")); // replaced, not added
            cache.put(&ObjectId { key: "other".into(), etag: "e".into() }, 0, Bytes::from_static(b"xy"));
            assert_eq!(value(&recorder.handle().render(), CACHE_BYTES), Some(8.0));
            cache.invalidate_key("k");
            assert_eq!(value(&recorder.handle().render(), CACHE_BYTES), Some(2.0));
            assert_eq!(cache.stats().bytes, 2);
            std::mem::forget(cache); // keep its bytes counted for the last check
        });
        assert_eq!(value(&recorder.handle().render(), CACHE_EVICTIONS), Some(0.0));
    }

    #[test]
    fn kms_requests_are_counted_by_action_and_outcome() {
        let recorder = recorder();
        metrics::with_local_recorder(&recorder, || {
            kms_request("Decrypt", Ok(()), Duration::from_millis(3));
            let denied = KmsError::AccessDenied { key_id: "k".into(), message: "no".into() };
            kms_request("GenerateDataKey", Err(&denied), Duration::from_millis(3));
        });
        let text = recorder.handle().render();
        assert_eq!(value(&text, &format!("{KMS_REQUESTS}{{action=\"decrypt\",outcome=\"ok\"}}")), Some(1.0), "{text}");
        assert_eq!(
            value(&text, &format!("{KMS_REQUESTS}{{action=\"generate_data_key\",outcome=\"access_denied\"}}")),
            Some(1.0)
        );
        assert_eq!(value(&text, &format!("{KMS_REQUEST_DURATION}_count{{action=\"decrypt\"}}")), Some(1.0));
    }

    async fn http(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn endpoint_serves_metrics_and_refuses_other_paths() {
        let recorder = recorder();
        metrics::with_local_recorder(&recorder, || fs_written(42));
        let handle = recorder.handle();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(listener, handle));
            let ok = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
            let body = ok.split("\r\n\r\n").nth(1).unwrap();
            assert_eq!(value(body, FS_WRITTEN_BYTES), Some(42.0), "{body}");
            let len: usize = ok.lines().find_map(|l| l.strip_prefix("Content-Length: ")).unwrap().parse().unwrap();
            assert_eq!(len, body.len());
            let head = http(addr, "HEAD /metrics?x=1 HTTP/1.1\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");
            assert!(http(addr, "GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404 "));
            assert!(http(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405 "));
            let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST_HEAD * 2));
            assert!(http(addr, &huge).await.starts_with("HTTP/1.1 400 "));
        });
    }

    /// A local user who opens connections and sends nothing holds at most `connections` of them (each one a
    /// descriptor of the daemon's): the next is not accepted until one ends, each ends at its deadline, and a scrape
    /// waiting behind them is then answered.
    #[test]
    fn silent_connections_are_capped_and_dropped_at_their_deadline() {
        let handle = recorder().handle();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let deadline = Duration::from_millis(800);
            tokio::spawn(serve_within(listener, handle, 3, deadline));
            let mut silent = Vec::new();
            for _ in 0..3 {
                silent.push(TcpStream::connect(addr).await.unwrap());
            }
            let opened = Instant::now();
            let scrape = tokio::spawn(http(addr, "GET /metrics HTTP/1.1\r\n\r\n"));
            tokio::time::sleep(deadline / 2).await;
            assert!(!scrape.is_finished(), "a fourth connection was answered while three silent ones were held");
            let answer = tokio::time::timeout(deadline * 4, scrape).await.expect("the scrape was never answered");
            assert!(answer.unwrap().starts_with("HTTP/1.1 200 OK\r\n"));
            // Not before the silent ones ended: they were accepted before `opened`, give or take the connects.
            assert!(opened.elapsed() >= deadline * 9 / 10, "answered after {:?}", opened.elapsed());
            for mut s in silent {
                let mut rest = Vec::new();
                let read = tokio::time::timeout(deadline, s.read_to_end(&mut rest)).await;
                assert!(matches!(read, Ok(Ok(0))), "a silent connection was not closed at its deadline: {read:?}");
            }
        });
    }

    #[test]
    fn install_fails_clearly_on_a_taken_port_and_outside_a_runtime() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(matches!(install(addr), Err(MetricsError::NoRuntime)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(async { install(addr) }).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&addr.to_string()) && text.contains("metrics_addr="), "{text}");
    }

    /// A `Backend` method a wrapper (MeteredBackend, LaterDeletes) does not forward would silently run the trait's
    /// default instead of the inner backend's own (a native rename, say, or "unsupported"): check that every one is.
    #[test]
    fn store_wrappers_forward_every_backend_method() {
        let block = |text: &'static str, start: &str| -> &'static str {
            let from = text.find(start).unwrap_or_else(|| panic!("{start:?} not found"));
            let len = text[from..].find("\n}\n").expect("end of block");
            &text[from..from + len]
        };
        let trait_block = block(include_str!("store/mod.rs"), "pub trait Backend");
        let methods: Vec<&str> = trait_block
            .split("fn ")
            .skip(1)
            .filter_map(|rest| rest.split(['(', '<']).next())
            .collect();
        assert!(methods.len() >= 12, "could not read the Backend trait: {methods:?}");
        // The other layer that wraps the whole store: the filesystem's write-behind deletes.
        for (wrapper, text) in [
            ("MeteredBackend", include_str!("metrics.rs")),
            ("LaterDeletes", include_str!("fs/deletes.rs")),
        ] {
            let impl_block = block(text, &format!("impl Backend for {wrapper}"));
            for m in &methods {
                assert!(impl_block.contains(&format!("fn {m}(")), "{wrapper} does not forward Backend::{m}");
            }
        }
    }

    #[test]
    fn every_metric_is_in_the_table() {
        let docs = include_str!("metrics.rs");
        for name in [
            FS_READ_BYTES, FS_WRITTEN_BYTES, FUSE_ERRORS, STORE_REQUESTS, STORE_REQUEST_DURATION, STORE_IN_FLIGHT,
            STORE_READ_BYTES, STORE_WRITTEN_BYTES, CACHE_HITS, CACHE_MISSES, CACHE_BYTES, CACHE_EVICTIONS, DIRTY_FILES,
            DIRTY_BYTES, UPLOADS_IN_FLIGHT, KMS_REQUESTS, KMS_REQUEST_DURATION, STORE_GETS_IN_FLIGHT_MAX,
            MEMORY_RESERVED, MEMORY_METADATA, MEMORY_SPARE,
        ] {
            assert!(docs.contains(&format!("//! | `{name}` |")), "{name} is missing from the table in the module docs");
        }
        for kind in RequestKind::ALL {
            assert!(docs.contains(&format!("`{}`", kind.as_str())), "kind {kind:?} is not documented");
        }
        for outcome in Outcome::ALL {
            assert!(docs.contains(&format!("`{}`", outcome.as_str())), "outcome {outcome:?} is not documented");
        }
    }
}
