//! gRPC client for a remote `tvix.store.v1.PathInfoService`. Everything
//! received is validated, and answers are checked against what was asked.
use super::PathInfoService;
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::{Error, Node};
use arca_proto::store as proto;
use arca_proto::store::path_info_service_client::PathInfoServiceClient;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use tonic::transport::Channel;
use tonic::Code;

/// A path-info service reached over gRPC.
#[derive(Clone)]
pub struct GrpcPathInfoService {
    client: PathInfoServiceClient<Channel>,
}

impl GrpcPathInfoService {
    /// A client over an established (or lazy) channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            client: PathInfoServiceClient::new(channel)
                .max_decoding_message_size(arca_castore::MAX_BLOB_MESSAGE_SIZE)
                .max_encoding_message_size(arca_castore::MAX_BLOB_MESSAGE_SIZE),
        }
    }

    /// Asks the server for the NAR size and SHA-256 of `node` (`CalculateNAR`).
    #[tracing::instrument(skip_all, level = "debug")]
    pub async fn calculate_nar(&self, node: &Node) -> Result<(u64, [u8; 32]), Error> {
        let resp = self
            .client
            .clone()
            .calculate_nar(node.clone().into_proto(Bytes::new()))
            .await?
            .into_inner();
        let sha: [u8; 32] = resp.nar_sha256.as_ref().try_into().map_err(|_| {
            Error::Storage(format!(
                "server sent a nar_sha256 of {} bytes",
                resp.nar_sha256.len()
            ))
        })?;
        Ok((resp.nar_size, sha))
    }
}

fn received(p: proto::PathInfo) -> Result<PathInfo, Error> {
    PathInfo::try_from(p)
        .map_err(|e| Error::Storage(format!("server sent an invalid PathInfo: {e}")))
}

#[async_trait]
impl PathInfoService for GrpcPathInfoService {
    #[tracing::instrument(skip(self), fields(digest = %crate::nixbase32::encode(&digest)), level = "debug")]
    async fn get(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<PathInfo>, Error> {
        let req = proto::GetPathInfoRequest {
            by_what: Some(proto::get_path_info_request::ByWhat::ByOutputHash(
                Bytes::copy_from_slice(&digest),
            )),
        };
        let p = match self.client.clone().get(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        let info = received(p)?;
        if *info.digest() != digest {
            return Err(Error::Storage(format!(
                "asked for {}, server sent {}",
                crate::nixbase32::encode(&digest),
                info.store_path
            )));
        }
        Ok(Some(info))
    }

    #[tracing::instrument(skip_all, fields(path = %info.store_path), level = "debug")]
    async fn put(&self, info: PathInfo) -> Result<PathInfo, Error> {
        let stored = received(
            self.client
                .clone()
                .put(info.to_proto()?)
                .await?
                .into_inner(),
        )?;
        // The server may add signatures; everything else must be what we sent.
        let mut cmp = stored.clone();
        cmp.signatures = info.signatures.clone();
        if cmp != info
            || !info
                .signatures
                .iter()
                .all(|s| stored.signatures.contains(s))
        {
            return Err(Error::Storage(format!(
                "server stored something else than {}",
                info.store_path
            )));
        }
        Ok(stored)
    }

    fn list(&self) -> BoxStream<'_, Result<PathInfo, Error>> {
        let mut client = self.client.clone();
        async_stream::try_stream! {
            let mut stream = client.list(proto::ListPathInfoRequest {}).await.map_err(Error::from)?.into_inner();
            while let Some(p) = stream.message().await.map_err(Error::from)? {
                yield received(p)?;
            }
        }
        .boxed()
    }
}
