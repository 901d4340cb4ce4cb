//! s3cryptfs: mount an object store (S3, S3-compatible, or a local directory) as an ordinary directory whose content
//! is encrypted on the client with keys the user controls.
//!
//! Architecture, top to bottom (dependencies point down only):
//!
//! ```text
//! main → unmount (waits for a daemon's final uploads through its state file)
//! main → run ─→ fuse (thin adapter: kernel request → fs call → reply/errno)
//!              └→ fs (POSIX semantics as async methods; inodes, handles, staging, errno mapping)
//!                   ├→ read   (cache lookup → ranged GET → open chunks → cache fill; read-ahead; S3EC objects:
//!                   │          verification pass → chunk-digest index → checked ranged reads)
//!                   ├→ journal (staged files and their sealed records: owned, locked, crash-recoverable)
//!                   ├→ upload (staged content → sealed chunks → conditional PUT / multipart)
//!                   ├→ inplace (pure: which parts of a large object's new version are copied in the store and which
//!                   │          are uploaded; for in-place updates, not wired yet)
//!                   ├→ object (mode-specific size and chunk maths)
//!                   ├→ cache  (byte-bounded LRU of decrypted pages, keyed by key + ETag)
//!                   ├→ memory (the max_memory budget: reservations for buffers in flight; the cache takes the rest)
//!                   ├→ crypto (pure: object format, key wrap, AEAD; no I/O)
//!                   ├→ kms    (KMS GenerateDataKey/Decrypt for cse-kms, with a bounded data-key cache)
//!                   └→ store  (facade over object_store and the local directory store)
//! kms, store → aws   (SigV4-signed requests to APIs object_store does not cover)
//! keys → crypto      (where keys come from)
//! ```
//!
//! `fs` can be driven directly (tests do), so FUSE stays a translation layer.

pub mod agent;
pub mod aws;
pub mod cache;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod error_text;
pub mod fs;
pub mod fuse;
pub mod inplace;
pub mod iobuf;
pub mod journal;
pub mod keys;
pub mod kmount;
pub mod kms;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod object;
pub mod read;
pub mod rekey;
pub mod run;
pub mod store;
pub mod tools;
pub mod unmount;
pub mod upload;
