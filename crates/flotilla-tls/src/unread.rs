//! Request bodies a handler answered without reading to the end (a 401 before the body, a 413
//! part way through) are read and dropped before the answer goes out, up to [`DRAIN_LIMIT`]
//! bytes within [`DRAIN_TIME`], as Go's net/http does. Otherwise the connection closes while the
//! client is still sending, the kernel resets it, and the client never sees the answer (Python:
//! "EOF occurred in violation of protocol"). A body too long or too slow to drain gets its
//! answer with `Connection: close`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http_body::{Body as _, Frame, SizeHint};

/// At most this much of an unread body is read after the handler answered.
pub const DRAIN_LIMIT: usize = 4 * 1024 * 1024;
/// For at most this long.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The request's body, shared between the handler and [`Unread`].
struct Shared(Arc<Mutex<Body>>);

impl http_body::Body for Shared {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut body = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).size_hint()
    }
}

/// What is left of a request's body once its handler has answered.
pub struct Unread(Arc<Mutex<Body>>);

/// Splits `body` into the body the handler reads and the handle that drains what it left.
pub fn share(body: Body) -> (Body, Unread) {
    let shared = Arc::new(Mutex::new(body));
    (Body::new(Shared(shared.clone())), Unread(shared))
}

impl Unread {
    /// Reads what the handler left; false when the body was too long or too slow to finish
    /// (or the handler still holds it, e.g. in a task streaming it).
    pub async fn drain(self) -> bool {
        let Ok(body) = Arc::try_unwrap(self.0) else {
            return true;
        };
        let mut body = body.into_inner().unwrap_or_else(|p| p.into_inner());
        if body.is_end_stream() {
            return true;
        }
        let mut read = 0usize;
        let drained = async {
            loop {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    None => return true,
                    Some(Err(_)) => return false,
                    Some(Ok(frame)) => {
                        read += frame.data_ref().map_or(0, bytes::Bytes::len);
                        if read > DRAIN_LIMIT {
                            return false;
                        }
                    }
                }
            }
        };
        tokio::time::timeout(DRAIN_TIME, drained)
            .await
            .unwrap_or(false)
    }
}
