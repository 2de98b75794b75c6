//! gRPC server wrapper exposing any [PathInfoService] as
//! `tvix.store.v1.PathInfoService`.
use crate::nar::calculate_nar;
use crate::pathinfo::{calculate_nar_node, PathInfo};
use crate::pathinfoservice::PathInfoService;
use crate::store_path::DIGEST_LEN;
use arca_castore::{BlobService, DirectoryService, Error};
use arca_proto::castore as cproto;
use arca_proto::store as proto;
use arca_proto::store::path_info_service_server::PathInfoServiceServer;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::instrument;

/// Serves a [PathInfoService] as `tvix.store.v1.PathInfoService`;
/// `CalculateNAR` renders from the given castore services.
///
/// Put validates the PathInfo (`INVALID_ARGUMENT` otherwise) and returns
/// what the service stored. Referential integrity is the service's business:
/// give the daemon's wrapper a
/// [CheckedPathInfoService](crate::pathinfoservice::CheckedPathInfoService).
pub struct GrpcPathInfoServiceWrapper {
    svc: Arc<dyn PathInfoService>,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
}

impl GrpcPathInfoServiceWrapper {
    /// Wraps `svc`, with the castore services `CalculateNAR` reads.
    pub fn new(
        svc: Arc<dyn PathInfoService>,
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
    ) -> Self {
        Self {
            svc,
            blobs,
            directories,
        }
    }

    /// The tonic server, with Arca's message limits.
    pub fn into_server(self) -> PathInfoServiceServer<Self> {
        PathInfoServiceServer::new(self)
            .max_decoding_message_size(arca_castore::MAX_BLOB_MESSAGE_SIZE)
            .max_encoding_message_size(arca_castore::MAX_BLOB_MESSAGE_SIZE)
    }
}

fn out(info: &PathInfo) -> Result<proto::PathInfo, Status> {
    Ok(info.to_proto()?)
}

#[tonic::async_trait]
impl proto::path_info_service_server::PathInfoService for GrpcPathInfoServiceWrapper {
    type ListStream = BoxStream<'static, Result<proto::PathInfo, Status>>;

    #[instrument(skip_all, err(level = "debug"))]
    async fn get(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let digest: [u8; DIGEST_LEN] = match &request.into_inner().by_what {
            Some(proto::get_path_info_request::ByWhat::ByOutputHash(h)) => {
                h.as_ref().try_into().map_err(|_| {
                    Status::invalid_argument(format!(
                        "by_output_hash is {} bytes long, expected {DIGEST_LEN}",
                        h.len()
                    ))
                })?
            }
            None => return Err(Status::invalid_argument("no by_output_hash given")),
        };
        match self.svc.get(digest).await? {
            Some(info) => Ok(Response::new(out(&info)?)),
            None => Err(Status::not_found(format!(
                "path info {}",
                crate::nixbase32::encode(&digest)
            ))),
        }
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn put(
        &self,
        request: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let info = PathInfo::try_from(request.into_inner()).map_err(Error::from)?;
        let stored = self.svc.put(info).await?;
        Ok(Response::new(out(&stored)?))
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn calculate_nar(
        &self,
        request: Request<cproto::Node>,
    ) -> Result<Response<proto::CalculateNarResponse>, Status> {
        let node = calculate_nar_node(request.into_inner())?;
        let (nar_size, sha) = calculate_nar(&node, self.blobs.clone(), self.directories.as_ref())
            .await
            .map_err(|e| match e {
                crate::nar::RenderError::MissingBlob(d) => Status::not_found(format!("blob {d}")),
                crate::nar::RenderError::MissingDirectory(d) => {
                    Status::not_found(format!("directory {d}"))
                }
                crate::nar::RenderError::Directory(e)
                | crate::nar::RenderError::Blob { source: e, .. } => Status::from(e),
                other => Status::internal(other.to_string()),
            })?;
        Ok(Response::new(proto::CalculateNarResponse {
            nar_size,
            nar_sha256: Bytes::copy_from_slice(&sha),
        }))
    }

    #[instrument(skip_all, err(level = "debug"))]
    async fn list(
        &self,
        _request: Request<proto::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let svc = self.svc.clone();
        let stream = async_stream::try_stream! {
            let mut inner = svc.list();
            while let Some(i) = inner.next().await {
                yield out(&i.map_err(Status::from)?)?;
            }
        };
        Ok(Response::new(stream.boxed()))
    }
}
