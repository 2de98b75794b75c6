//! The daemon's local NAR export: a client on its machine passes a file
//! descriptor over the local socket ([arca_castore::local_ingest]) with a
//! root node, and the daemon renders the NAR straight into it.
//!
//! Out of a daemon over gRPC, every byte of a NAR is read from the store,
//! framed and sent by the daemon, then received, decoded, verified and
//! written by the client: two processes and a socket for what one process
//! with the store at hand can do alone. Rendered in the daemon, the blobs
//! are read, decoded and verified as for any read of its store, and the
//! client's only work is to wait for the answer.
use super::{render_nar, FdWriter, RenderError};
use arca_castore::local_ingest::LocalExport;
use arca_castore::{BlobService, DirectoryService, Error, Node};
use bytes::Bytes;
use prost::Message;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tracing::instrument;

/// Renders the NAR of the root node a request names (a `tvix.castore.v1.Node`,
/// its name ignored) from these services.
pub struct NarExport {
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
}

impl NarExport {
    /// Exports from `blobs` and `directories`.
    pub fn new(blobs: Arc<dyn BlobService>, directories: Arc<dyn DirectoryService>) -> Self {
        Self { blobs, directories }
    }
}

/// The request for the NAR of `node`.
pub fn export_request(node: &Node) -> Vec<u8> {
    node.clone().into_proto(Bytes::new()).encode_to_vec()
}

#[async_trait::async_trait]
impl LocalExport for NarExport {
    #[instrument(skip_all, fields(request_len = request.len()), err)]
    async fn export(&self, request: Bytes, out: OwnedFd) -> Result<u64, Error> {
        let node = arca_proto::castore::Node::decode(request)
            .map_err(|e| Error::InvalidRequest(format!("export request: {e}")))?;
        let (_, node) = Node::try_from_proto(node)
            .map_err(|e| Error::InvalidRequest(format!("export request: {e}")))?;
        let writer = FdWriter::new(out).map_err(Error::storage)?;
        let writer = render_nar(&node, self.blobs.clone(), &*self.directories, writer)
            .await
            .map_err(|e| match e {
                RenderError::Directory(e) => e,
                RenderError::MissingDirectory(d) => {
                    Error::NotFound(format!("directory {d} is missing"))
                }
                RenderError::MissingBlob(d) => Error::NotFound(format!("blob {d} is missing")),
                RenderError::Write(e) => Error::Storage(format!("writing the NAR: {e}")),
                other => Error::Storage(other.to_string()),
            })?;
        writer
            .finish()
            .await
            .map_err(|e| Error::Storage(format!("writing the NAR: {e}")))
    }
}
