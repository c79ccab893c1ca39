//! `moby.filesync.v1.FileSend/DiffCopy` on the session tunnel: how the daemon's tar exporter
//! hands us the image.
//!
//! The daemon opens one client-streaming call per exporter, sends the tar as `BytesMessage`s of
//! up to 3 MiB, half-closes, and waits for our OK trailer. Each message is forwarded to the
//! unpacker as it arrives (back-pressure through its bounded channel); nothing is buffered here.

use std::pin::Pin;
use std::sync::Mutex;

use bytes::Bytes;
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::buildkit::export::ExportSink;
use crate::buildkit::proto::filesync::{BytesMessage, FileSend};

/// Serves exactly one DiffCopy (we request exactly one exporter) into an [`ExportSink`].
#[derive(Debug)]
pub(crate) struct FileSendService {
    sink: Mutex<Option<ExportSink>>,
    /// Cancelled when the session ends, so a transfer cut off mid-way releases the sink (and the
    /// unpacker sees the end of its input) even if the h2 stream is never told.
    session_end: CancellationToken,
}

impl FileSendService {
    pub(crate) fn new(sink: ExportSink, session_end: CancellationToken) -> Self {
        Self {
            sink: Mutex::new(Some(sink)),
            session_end,
        }
    }
}

#[tonic::async_trait]
impl FileSend for FileSendService {
    type DiffCopyStream = Pin<Box<dyn Stream<Item = Result<BytesMessage, Status>> + Send>>;

    async fn diff_copy(
        &self,
        request: Request<Streaming<BytesMessage>>,
    ) -> Result<Response<Self::DiffCopyStream>, Status> {
        let sink = self
            .sink
            .lock()
            .map_err(|_| Status::internal("export sink lock poisoned"))?
            .take()
            .ok_or_else(|| Status::failed_precondition("this session accepts a single export"))?;
        let mut stream = request.into_inner();
        let ended = || Status::cancelled("session ended during the export");
        loop {
            let msg = tokio::select! {
                () = self.session_end.cancelled() => return Err(ended()),
                msg = stream.message() => msg?,
            };
            let Some(msg) = msg else { break };
            tokio::select! {
                () = self.session_end.cancelled() => return Err(ended()),
                sent = sink.send(Bytes::from(msg.data)) => {
                    sent.map_err(|()| Status::aborted("perfbox stopped unpacking the export"))?;
                }
            }
        }
        // Dropping the sink tells the unpacker the tar is complete.
        drop(sink);
        Ok(Response::new(Box::pin(futures::stream::empty())))
    }
}
