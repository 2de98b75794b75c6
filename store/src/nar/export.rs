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
use super::{render_nar_keeping_repeats, FdWriter, RenderError, REPEAT_BUDGET};
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
        let writer = render_nar_keeping_repeats(
            &node,
            self.blobs.clone(),
            &*self.directories,
            writer,
            REPEAT_BUDGET,
        )
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

#[cfg(test)]
mod tests {
    use super::*;
    use arca_castore::blobservice::{put_bytes, MemoryBlobService};
    use arca_castore::directoryservice::MemoryDirectoryService;

    fn exporter() -> (NarExport, Arc<dyn BlobService>) {
        let blobs: Arc<dyn BlobService> = Arc::new(MemoryBlobService::default());
        let dirs: Arc<dyn DirectoryService> = Arc::new(MemoryDirectoryService::default());
        (NarExport::new(blobs.clone(), dirs), blobs)
    }

    fn out_file(dir: &tempfile::TempDir) -> (std::path::PathBuf, OwnedFd) {
        let path = dir.path().join("out.nar");
        let file = std::fs::File::create(&path).unwrap();
        (path, file.into())
    }

    #[tokio::test]
    async fn exports_a_file_s_nar_and_refuses_bad_requests() {
        let (export, blobs) = exporter();
        let dir = tempfile::tempdir().unwrap();
        let digest = put_bytes(&*blobs, Bytes::from_static(b"hello"))
            .await
            .unwrap();
        let node = Node::File {
            digest,
            size: 5,
            executable: false,
        };
        let (path, fd) = out_file(&dir);
        let written = export
            .export(export_request(&node).into(), fd)
            .await
            .unwrap();
        let mut expected = Vec::new();
        let mut w = crate::nar::NarWriter::new(&mut expected).await.unwrap();
        w.start_file(None, false, 5).await.unwrap();
        w.write_contents(b"hello").await.unwrap();
        w.end_file().await.unwrap();
        w.finish().await.unwrap();
        assert_eq!(written, expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);

        // A missing blob: NotFound. Garbage, or an invalid node: InvalidRequest.
        let missing = Node::File {
            digest: arca_castore::B3Digest::of(b"gone"),
            size: 4,
            executable: false,
        };
        let (_, fd) = out_file(&dir);
        let err = export.export(export_request(&missing).into(), fd).await;
        assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");
        let (_, fd) = out_file(&dir);
        let err = export.export(Bytes::from_static(b"\xff\xff\xff"), fd).await;
        assert!(matches!(err, Err(Error::InvalidRequest(_))), "{err:?}");
        let (_, fd) = out_file(&dir);
        let empty_node = arca_proto::castore::Node::default().encode_to_vec();
        let err = export.export(empty_node.into(), fd).await;
        assert!(matches!(err, Err(Error::InvalidRequest(_))), "{err:?}");
    }
}
