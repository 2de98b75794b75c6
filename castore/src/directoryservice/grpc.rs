//! gRPC client for a remote directory service. Every directory received is
//! validated and its digest checked against what was asked for or referred to.
use super::{
    order_leaves_first, ClosureValidator, DirectoryService, RecursiveReceiveValidator,
    ValidatedClosure,
};
use crate::{B3Digest, Directory, Error};
use arca_proto::castore as proto;
use arca_proto::castore::directory_service_client::DirectoryServiceClient;
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use tonic::transport::Channel;
use tonic::Code;

/// A directory service reached over gRPC.
#[derive(Clone)]
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<Channel>,
}

impl GrpcDirectoryService {
    /// A client over an established (or lazy) channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            client: DirectoryServiceClient::new(channel)
                .max_decoding_message_size(crate::MAX_DIRECTORY_MESSAGE_SIZE)
                .max_encoding_message_size(crate::MAX_DIRECTORY_MESSAGE_SIZE),
        }
    }
}

fn req(digest: &B3Digest, recursive: bool) -> proto::GetDirectoryRequest {
    proto::GetDirectoryRequest {
        by_what: Some(proto::get_directory_request::ByWhat::Digest(
            digest.to_bytes(),
        )),
        recursive,
    }
}

fn received(p: proto::Directory) -> Result<Directory, Error> {
    Directory::try_from(p)
        .map_err(|e| Error::Storage(format!("server sent an invalid directory: {e}")))
}

#[async_trait]
impl DirectoryService for GrpcDirectoryService {
    #[tracing::instrument(skip(self), level = "debug")]
    async fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, Error> {
        let mut stream = match self.client.clone().get(req(digest, false)).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        let first = match stream.message().await {
            Ok(Some(d)) => received(d)?,
            Ok(None) => {
                return Err(Error::Storage(format!(
                    "server sent nothing for directory {digest}"
                )))
            }
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        if first.digest() != *digest {
            return Err(Error::Storage(format!(
                "asked for directory {digest}, got {}",
                first.digest()
            )));
        }
        if stream.message().await?.is_some() {
            return Err(Error::Storage(format!(
                "server sent more than directory {digest}"
            )));
        }
        Ok(Some(first))
    }

    #[tracing::instrument(skip_all, fields(root = %closure.root()), level = "debug")]
    async fn put_closure(&self, closure: ValidatedClosure) -> Result<B3Digest, Error> {
        let root = closure.root();
        let msgs: Vec<proto::Directory> = closure
            .into_directories()
            .into_iter()
            .map(|(_, d)| d.to_proto())
            .collect();
        let resp = self
            .client
            .clone()
            .put(futures::stream::iter(msgs))
            .await?
            .into_inner();
        let returned = B3Digest::try_from(&resp.root_digest)
            .map_err(|e| Error::Storage(format!("server returned an invalid root digest: {e}")))?;
        if returned != root {
            return Err(Error::Storage(format!(
                "server returned root {returned}, expected {root}"
            )));
        }
        Ok(root)
    }

    /// The server wants whole closures, so the children's closures are
    /// fetched from it and sent along.
    async fn put(&self, directory: Directory) -> Result<B3Digest, Error> {
        let root = directory.digest();
        let mut all = vec![directory.clone()];
        for (name, child, size) in directory.child_directories() {
            let closure = super::get_closure(self, &child)
                .await
                .map_err(|e| match e {
                    Error::NotFound(_) => Error::InvalidRequest(format!(
                        "entry {name:?} refers to directory {child}, which is not stored"
                    )),
                    e => e,
                })?;
            if closure.first().map(|c| c.size()) != Some(size) {
                return Err(Error::InvalidRequest(format!(
                    "entry {name:?} has the wrong size {size}"
                )));
            }
            all.extend(closure);
        }
        let mut v = ClosureValidator::new();
        for d in order_leaves_first(root, all)? {
            v.add(d)?;
        }
        self.put_closure(v.finalize()?).await
    }

    fn get_recursive(&self, root: &B3Digest) -> BoxStream<'_, Result<Directory, Error>> {
        let root = *root;
        let mut client = self.client.clone();
        async_stream::try_stream! {
            let mut stream = client.get(req(&root, true)).await.map_err(Error::from)?.into_inner();
            let mut v = RecursiveReceiveValidator::new(root);
            while let Some(p) = stream.message().await.map_err(Error::from)? {
                let dir = received(p)?;
                v.check(&dir)?;
                yield dir;
            }
            if v.is_empty() {
                Err(Error::NotFound(format!("directory {root}")))?;
            }
            v.finish()?;
        }
        .boxed()
    }
}
