//! A hard deadline on every request an S3 client sends, retries included.
//!
//! object_store bounds each *attempt* (`ClientOptions` timeout) and stops retrying after `RetryConfig::retry_timeout`,
//! but an attempt that starts just before that budget runs out still gets its full timeout, and a body stream is
//! retried on its own. So a frozen server used to cost one request minutes, and a syscall that chains requests several
//! times that. [`Deadline`] wraps the client as one more `ObjectStore` and puts `tokio::time::timeout` around each
//! request: the call (and, for a GET, the whole body; for a listing, each page) either finishes within the limit or
//! fails with [`RequestTimedOut`], which `object::map_err` turns into `StoreError::TimedOut` and the filesystem into
//! EIO. The wrapper forwards everything else unchanged, so conditional writes, SSE headers and attributes are the
//! inner client's business.
//!
//! It lives at the `ObjectStore` level rather than around `Backend` so that whatever a backend method does with the
//! client (one request or several) stays bounded per request without this file having to know the backend's methods.
//! The local `file://` store is not wrapped: a local disk does not hang the way a network peer does.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};

/// The error a request that outlived its deadline fails with (the source of an `object_store::Error::Generic`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} got no answer within {} s (mount option timeout=)", limit.as_secs_f64())]
pub struct RequestTimedOut {
    pub operation: &'static str,
    pub limit: Duration,
}

/// The [`RequestTimedOut`] somewhere in `e`'s source chain, if the error is a deadline's.
pub(crate) fn timed_out<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a RequestTimedOut> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<RequestTimedOut>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

fn error(operation: &'static str, limit: Duration) -> object_store::Error {
    object_store::Error::Generic { store: "S3", source: Box::new(RequestTimedOut { operation, limit }) }
}

/// `inner`, with every request bounded by `limit`.
#[derive(Debug)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
    /// Bound each part of a multipart upload (the default). Off for clients whose parts go out one after another
    /// and bound each request themselves (GCS's resumable uploads): a part's wait for the parts before it is not
    /// its request's time.
    bound_parts: bool,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Deadline { inner, limit, bound_parts: true }
    }

    /// Parts of multipart uploads are left to the inner client's own bounds (see `bound_parts`).
    pub fn with_serial_parts(mut self) -> Self {
        self.bound_parts = false;
        self
    }
}

/// One page of a listing (`Backend::list_page`), bounded like every other request.
#[async_trait]
impl<S: object_store::list::PaginatedListStore> object_store::list::PaginatedListStore for Deadline<S> {
    async fn list_paginated(
        &self,
        prefix: Option<&str>,
        opts: object_store::list::PaginatedListOptions,
    ) -> object_store::Result<object_store::list::PaginatedListResult> {
        bounded("LIST", self.limit, self.inner.list_paginated(prefix, opts)).await
    }
}

/// The inner store's name: error messages (a missing bucket) name the store the user gave, not the wrapper.
impl<S: fmt::Display> fmt::Display for Deadline<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

/// Runs `fut` within `limit`.
async fn bounded<T>(
    operation: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = object_store::Result<T>>,
) -> object_store::Result<T> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| Err(error(operation, limit)))
}

/// A stream whose every item must arrive within `limit` of the previous one (listing pages; delete batches).
fn per_item<T: Send + 'static>(
    operation: &'static str,
    limit: Duration,
    stream: BoxStream<'static, object_store::Result<T>>,
) -> BoxStream<'static, object_store::Result<T>> {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(limit, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            // Yield the error, then end: the inner request is abandoned.
            Err(_) => Some((Err(error(operation, limit)), None)),
        }
    })
    // Callers may poll a finished stream again (object_store's own `delete` does); `unfold` would panic.
    .fuse()
    .boxed()
}

/// A body stream that must be complete by `deadline` (counted from the start of its GET).
fn until(
    deadline: tokio::time::Instant,
    limit: Duration,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
) -> BoxStream<'static, object_store::Result<Bytes>> {
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((Err(error("GET (body)", limit)), None)),
        }
    })
    .fuse()
    .boxed()
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Deadline<S> {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        bounded("PUT", self.limit, self.inner.put_opts(location, payload, opts)).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let upload = bounded("CreateMultipartUpload", self.limit, self.inner.put_multipart_opts(location, opts)).await?;
        Ok(Box::new(DeadlineUpload { inner: upload, limit: self.limit, bound_parts: self.bound_parts }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let operation = if options.head { "HEAD" } else { "GET" };
        let mut result = bounded(operation, self.limit, self.inner.get_opts(location, options)).await?;
        result.payload = match result.payload {
            GetResultPayload::Stream(s) => GetResultPayload::Stream(until(deadline, self.limit, s)),
            #[allow(unreachable_patterns)] // `File` exists only with object_store's `fs` feature.
            other => other,
        };
        Ok(result)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        bounded("GET (ranges)", self.limit, self.inner.get_ranges(location, ranges)).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        per_item("DELETE", self.limit, self.inner.delete_stream(locations))
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        per_item("LIST", self.limit, self.inner.list(prefix))
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        per_item("LIST", self.limit, self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        bounded("LIST", self.limit, self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        bounded("COPY", self.limit, self.inner.copy_opts(from, to, options)).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        // Two requests (copy, then delete): each gets the limit.
        bounded("RENAME", self.limit * 2, self.inner.rename_opts(from, to, options)).await
    }
}

/// A multipart upload whose every request is bounded too.
#[derive(Debug)]
struct DeadlineUpload {
    inner: Box<dyn MultipartUpload>,
    limit: Duration,
    bound_parts: bool,
}

#[async_trait]
impl MultipartUpload for DeadlineUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if !self.bound_parts {
            return self.inner.put_part(data);
        }
        let limit = self.limit;
        bounded("UploadPart", limit, self.inner.put_part(data)).boxed()
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        bounded("CompleteMultipartUpload", self.limit, self.inner.complete()).await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        bounded("AbortMultipartUpload", self.limit, self.inner.abort()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    /// A store whose every request hangs forever (a frozen server).
    #[derive(Debug)]
    struct Frozen;

    impl fmt::Display for Frozen {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("Frozen")
        }
    }

    #[async_trait]
    impl ObjectStore for Frozen {
        async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> object_store::Result<PutResult> {
            futures::future::pending().await
        }
        async fn put_multipart_opts(&self, _: &Path, _: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
            futures::future::pending().await
        }
        async fn get_opts(&self, _: &Path, _: GetOptions) -> object_store::Result<GetResult> {
            futures::future::pending().await
        }
        fn delete_stream(
            &self,
            _: BoxStream<'static, object_store::Result<Path>>,
        ) -> BoxStream<'static, object_store::Result<Path>> {
            futures::stream::pending().boxed()
        }
        fn list(&self, _: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            futures::stream::pending().boxed()
        }
        async fn list_with_delimiter(&self, _: Option<&Path>) -> object_store::Result<ListResult> {
            futures::future::pending().await
        }
        async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
            futures::future::pending().await
        }
    }

    #[tokio::test]
    async fn every_request_of_a_frozen_store_fails_at_the_deadline() {
        let limit = Duration::from_millis(100);
        let store = Deadline::new(Frozen, limit);
        let p = Path::from("a");
        let start = tokio::time::Instant::now();
        let is_timeout = |e: object_store::Error| timed_out(&e).is_some_and(|t| t.limit == limit);
        assert!(is_timeout(store.put(&p, PutPayload::from_static(b"x")).await.unwrap_err()));
        assert!(is_timeout(store.get(&p).await.unwrap_err()));
        let head = store.head(&p).await.unwrap_err();
        assert_eq!(timed_out(&head).map(|t| t.operation), Some("HEAD"));
        assert!(is_timeout(head));
        assert!(is_timeout(store.list_with_delimiter(None).await.unwrap_err()));
        assert!(is_timeout(store.copy(&p, &Path::from("b")).await.unwrap_err()));
        let listed: Vec<_> = store.list(None).collect().await;
        assert_eq!(listed.len(), 1, "one error, then the stream ends");
        assert!(is_timeout(listed.into_iter().next().unwrap().unwrap_err()));
        assert!(is_timeout(store.put_multipart(&p).await.unwrap_err()));
        // Seven requests, each cut at the limit.
        let took = start.elapsed();
        assert!(took >= limit * 7 && took < limit * 7 + Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn a_store_that_answers_is_unchanged() {
        let store = Deadline::new(InMemory::new(), Duration::from_secs(5));
        assert_eq!(store.to_string(), InMemory::new().to_string(), "messages name the inner store");
        let p = Path::from("dir/a");
        store.put(&p, PutPayload::from_static(b"hello")).await.unwrap();
        assert_eq!(store.get(&p).await.unwrap().bytes().await.unwrap().as_ref(), b"hello");
        let mut up = store.put_multipart(&Path::from("dir/b")).await.unwrap();
        up.put_part(PutPayload::from_static(b"part")).await.unwrap();
        up.complete().await.unwrap();
        let listed: Vec<_> = store.list(Some(&Path::from("dir"))).collect().await;
        assert_eq!(listed.len(), 2);
        // Finished streams may be polled again (the mount did, through object_store's `delete`).
        let mut listing = store.list(None);
        while listing.next().await.is_some() {}
        assert!(listing.next().await.is_none());
        store.delete(&p).await.unwrap();
        assert!(matches!(store.get(&Path::from("none")).await, Err(object_store::Error::NotFound { .. })));
    }
}
