//! Uploads, as `nix copy --to http://…` sends them: `PUT /nix-cache-info`,
//! `PUT /nar/<filehash>.nar.<ext>` (streamed through the decompressor into
//! castore), `PUT /<hash>.narinfo` (checked against the uploaded NAR, then
//! stored as a path info through the checked stack).
use super::{no_content, parse_hash_part, parse_nar_file, Answer, HttpError, Inner, Req};
use crate::compression::{sniff_gzip, Decoder, RawFailure, RawTap};
use crate::nar::{ingest_nar, IngestError, NarError};
use crate::nar_index::NarUpload;
use crate::narinfo::{Compression, NarInfo};
use crate::pathinfo::PathInfo;
use crate::pathinfoservice::PathInfoService;
use crate::{NixHash, MAX_NARINFO_SIZE};
use axum::body::Body;
use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Read buffer between the request body and the decompressor.
const READ_BUFFER: usize = 256 * 1024;
/// Bytes accepted after the end of a compressed stream.
const MAX_TRAILING: u64 = 1024 * 1024;
/// Largest `nix-cache-info` accepted.
const MAX_CACHE_INFO: usize = 64 * 1024;

fn too_large(what: &str, limit: usize) -> HttpError {
    HttpError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("{what} is larger than {limit} bytes"),
    )
}

/// The whole body of `req`, at most `limit` bytes (else 413; a body
/// declared larger is left unread).
pub(crate) async fn read_body(req: &mut Req, limit: usize, what: &str) -> Result<Bytes, HttpError> {
    if req.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large(what, limit));
    }
    let mut stream = req.take_body().into_data_stream();
    let mut body = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| HttpError::bad_request(format!("reading {what} failed: {e}")))?;
        if body.len() + chunk.len() > limit {
            // Let the client finish sending (up to a point) so it reads the answer.
            super::drain(Body::from_stream(stream), super::DRAIN_LIMIT).await;
            return Err(too_large(what, limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn check_uploads(inner: &Inner) -> Result<(), HttpError> {
    if inner.options.uploads {
        Ok(())
    } else {
        Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "this binary cache does not accept uploads",
        ))
    }
}

/// `PUT /nix-cache-info`: accepted (Nix sends one to a cache without it)
/// and ignored: the served one describes this store.
pub(crate) async fn put_cache_info(inner: &Arc<Inner>, req: &mut Req) -> Answer {
    check_uploads(inner)?;
    read_body(req, MAX_CACHE_INFO, "nix-cache-info").await?;
    Ok(no_content())
}

/// `PUT /<hash>.ls`: NAR listings are accepted (so `write-nar-listing=true`
/// works) and discarded, without buffering them.
pub(crate) async fn put_listing(inner: &Arc<Inner>, hash: &str, req: &mut Req) -> Answer {
    check_uploads(inner)?;
    parse_hash_part(hash, "listing name")?;
    let mut stream = req.take_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        chunk.map_err(|e| HttpError::bad_request(format!("reading the listing failed: {e}")))?;
    }
    Ok(no_content())
}

/// `PUT /nar/<file>`: streams the body through the decompressor its
/// extension names (a `.nar` body starting like gzip is gunzipped: Nix names
/// gzip NARs `.nar`) into castore, then records the upload and its NarHash.
/// The name must be the SHA-256 of the file (as Nix names them) or of the
/// NAR inside.
pub(crate) async fn put_nar(inner: &Arc<Inner>, file: &str, req: &mut Req) -> Answer {
    check_uploads(inner)?;
    let file = parse_nar_file(file)?;
    let stream = req
        .take_body()
        .into_data_stream()
        .map_err(std::io::Error::other);
    let tap = RawTap::new(tokio_util::io::StreamReader::new(stream), None);
    let mut raw = BufReader::with_capacity(READ_BUFFER, tap);
    let compression = match file.compression {
        Compression::None => {
            let head = raw.fill_buf().await.map_err(|e| {
                HttpError::bad_request(format!("reading the NAR upload failed: {e}"))
            })?;
            if sniff_gzip(head) {
                Compression::Gzip
            } else {
                Compression::None
            }
        }
        other => other,
    };
    let mut decoder = Decoder::new(compression, raw);
    let result = ingest_nar(
        &mut decoder,
        inner.blobs.clone(),
        inner.directories.as_ref(),
    )
    .await;
    let name = &file.url_path;
    let (node, nar_size, nar_sha256) = match result {
        Ok(done) => done,
        Err(e) => {
            return Err(match (&decoder.get_ref().get_ref().failure, e) {
                (Some(RawFailure::Read(why)), _) => {
                    HttpError::bad_request(format!("reading the upload of {name} failed: {why}"))
                }
                (_, IngestError::Nar(NarError::Truncated)) => HttpError::bad_request(format!(
                    "truncated NAR: the upload of {name} ended before the NAR did"
                )),
                (_, IngestError::Nar(NarError::Io(io))) if compression != Compression::None => {
                    HttpError::bad_request(format!(
                        "decompressing ({compression}) the upload of {name} failed: {io}"
                    ))
                }
                (_, IngestError::Nar(other)) => {
                    HttpError::bad_request(format!("invalid NAR uploaded to {name}: {other}"))
                }
                (_, IngestError::Blob(e)) => HttpError::from(e),
                (_, IngestError::Directory(e)) => HttpError::from(e),
                (_, other) => HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("ingesting the NAR uploaded to {name}: {other}"),
                ),
            });
        }
    };
    // Whatever follows the compressed stream counts into the file's hash and size.
    let mut raw = decoder.into_inner();
    let trailing = (&mut raw)
        .take(MAX_TRAILING + 1)
        .read_to_end(&mut Vec::new())
        .await
        .map_err(|e| HttpError::bad_request(format!("reading the upload of {name} failed: {e}")))?;
    if trailing as u64 > MAX_TRAILING {
        return Err(HttpError::bad_request(format!(
            "the upload of {name} has more than {MAX_TRAILING} bytes after the NAR"
        )));
    }
    let (file_size, file_sha256) = raw.into_inner().finalize();
    if file.hash != file_sha256 && file.hash != nar_sha256 {
        return Err(HttpError::bad_request(format!(
            "hash mismatch: {name} is named after {}, but the file has {} and the NAR inside {}",
            NixHash::sha256(file.hash),
            NixHash::sha256(file_sha256),
            NixHash::sha256(nar_sha256)
        )));
    }
    inner.index.put_nar(&nar_sha256, &node, nar_size).await?;
    let upload = NarUpload {
        node: node.clone(),
        nar_sha256,
        nar_size,
        file_sha256,
        file_size,
        compression,
    };
    inner.index.put_upload(&file.url_path, &upload).await?;
    inner.nars.lock().put(nar_sha256, (node, nar_size));
    tracing::info!(file = %file.url_path, %compression, file_size, nar_size, "NAR uploaded");
    Ok(no_content())
}

/// `PUT /<hash>.narinfo`: parsed (at most 64 KiB), its StorePath must have
/// the hash of the URL, its `URL` must name an uploaded NAR whose NarHash,
/// NarSize (and FileHash, FileSize, compression, when given) match; then
/// the path info is stored through the checked stack (its castore closure
/// and references must be stored).
pub(crate) async fn put_narinfo(inner: &Arc<Inner>, hash: &str, req: &mut Req) -> Answer {
    check_uploads(inner)?;
    let digest = parse_hash_part(hash, "narinfo name")?;
    let body = read_body(req, MAX_NARINFO_SIZE, "the narinfo").await?;
    let narinfo = NarInfo::parse(&body)
        .map_err(|e| HttpError::bad_request(format!("invalid narinfo {hash}.narinfo: {e}")))?;
    let path = narinfo.store_path().clone();
    if *path.digest() != digest {
        return Err(HttpError::bad_request(format!(
            "StorePath mismatch: {hash}.narinfo describes {path}, not a path with hash {hash}"
        )));
    }
    let url = narinfo.url();
    let Some(upload) = inner.index.get_upload(url).await? else {
        return Err(HttpError::bad_request(format!(
            "the narinfo of {path} names the NAR {url}, which was never uploaded here (upload the NAR first)"
        )));
    };
    let mismatch = |what: &str, says: String, has: String| {
        HttpError::bad_request(format!("{what} mismatch for {path}: the narinfo says {says}, the NAR uploaded to {url} has {has}"))
    };
    if upload.nar_sha256 != narinfo.nar_sha256() {
        return Err(mismatch(
            "NarHash",
            narinfo.nar_hash().to_string(),
            NixHash::sha256(upload.nar_sha256).to_string(),
        ));
    }
    if upload.nar_size != narinfo.nar_size() {
        return Err(mismatch(
            "NarSize",
            narinfo.nar_size().to_string(),
            upload.nar_size.to_string(),
        ));
    }
    if let Some(fh) = narinfo.file_hash() {
        if fh.as_sha256() != Some(upload.file_sha256) {
            return Err(mismatch(
                "FileHash",
                fh.to_string(),
                NixHash::sha256(upload.file_sha256).to_string(),
            ));
        }
    }
    if let Some(fs) = narinfo.file_size() {
        if fs != upload.file_size {
            return Err(mismatch(
                "FileSize",
                fs.to_string(),
                upload.file_size.to_string(),
            ));
        }
    }
    if narinfo.compression() != upload.compression {
        return Err(mismatch(
            "Compression",
            narinfo.compression().to_string(),
            upload.compression.to_string(),
        ));
    }
    let info = PathInfo::from_narinfo(&narinfo, upload.node);
    inner.checked.put(info).await?;
    if let Some(cache) = &inner.narinfos {
        cache.lock().pop(&digest);
    }
    tracing::info!(%path, "narinfo uploaded");
    Ok(no_content())
}
