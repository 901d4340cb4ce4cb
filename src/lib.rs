//! s3cryptfs: mount an object store as an encrypted directory.
pub mod crypto;
pub mod store;
