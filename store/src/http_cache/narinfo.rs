//! Narinfos: generated from path infos, signed on the fly, kept rendered in
//! an LRU (re-rendered whenever the path info changed); the batch lookup.
use super::{
    answer, parse_hash_part, Answer, HttpError, Inner, Req, MAX_BATCH, MAX_BATCH_BODY,
    NARINFO_CACHE_CONTROL, NARINFO_TYPE,
};
use crate::pathinfo::PathInfo;
use crate::store_path::DIGEST_LEN;
use arca_castore::Error;
use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use std::sync::Arc;

/// The URL served narinfos give the NAR of `nar_sha256`.
pub(crate) fn nar_url(nar_sha256: &[u8; 32], compression: crate::Compression) -> String {
    format!(
        "nar/{}.nar{}",
        crate::nixbase32::encode(nar_sha256),
        crate::compression::nar_extension(compression)
    )
}

impl Inner {
    /// The narinfo text of a path info (rendered and signed, or from the LRU
    /// when the path info is unchanged).
    pub(crate) async fn render_narinfo(&self, info: PathInfo) -> Result<Bytes, Error> {
        let digest = *info.digest();
        if let Some(cache) = &self.narinfos {
            if let Some((cached, text)) = cache.lock().get(&digest) {
                if *cached == info {
                    return Ok(text.clone());
                }
            }
        }
        self.remember_nar(info.nar_sha256, &info.node, info.nar_size)
            .await;
        let compression = self.options.nar_compression;
        let mut narinfo = info
            .to_narinfo(&nar_url(&info.nar_sha256, compression), compression)
            .map_err(|e| {
                Error::Storage(format!(
                    "cannot describe {} as a narinfo: {e}",
                    info.store_path
                ))
            })?;
        if let Some(key) = &self.options.signing_key {
            narinfo.sign(key);
        }
        let text = Bytes::from(narinfo.to_string());
        if let Some(cache) = &self.narinfos {
            cache.lock().put(digest, (info, text.clone()));
        }
        Ok(text)
    }

    /// The narinfo of the path with this digest, `None` if absent.
    pub(crate) async fn narinfo(&self, digest: [u8; DIGEST_LEN]) -> Result<Option<Bytes>, Error> {
        match self.path_info.get(digest).await? {
            None => Ok(None),
            Some(info) => Ok(Some(self.render_narinfo(info).await?)),
        }
    }
}

/// `GET`/`HEAD /<hash>.narinfo`.
pub(crate) async fn get(inner: &Arc<Inner>, hash: &str) -> Answer {
    let digest = parse_hash_part(hash, "narinfo name")?;
    match inner.narinfo(digest).await? {
        Some(text) => Ok(answer(
            StatusCode::OK,
            NARINFO_TYPE,
            NARINFO_CACHE_CONTROL,
            Body::from(text),
        )),
        None => Err(HttpError::not_found(format!(
            "no path with hash {hash} in this binary cache"
        ))),
    }
}

/// The hash parts of a batch request: a JSON list of strings, or one per
/// line (blank lines ignored).
fn parse_batch(body: &[u8]) -> Result<Vec<String>, HttpError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| HttpError::bad_request("the batch request is not UTF-8"))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        serde_json::from_str::<Vec<String>>(trimmed).map_err(|e| {
            HttpError::bad_request(format!(
                "the batch request is not a JSON list of hash parts: {e}"
            ))
        })
    } else {
        Ok(text.split_whitespace().map(str::to_string).collect())
    }
}

/// `POST /_arca/narinfos`: which of the listed hash parts exist, with their
/// narinfos: `{"<hash>": "<narinfo text>" | null}`.
pub(crate) async fn batch(inner: &Arc<Inner>, req: &mut Req) -> Answer {
    let body = super::upload::read_body(req, MAX_BATCH_BODY, "the batch request").await?;
    let hashes = parse_batch(&body)?;
    if hashes.len() > MAX_BATCH {
        return Err(HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the batch request lists {} hash parts, at most {MAX_BATCH} are accepted",
                hashes.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut wanted = Vec::with_capacity(hashes.len());
    for h in hashes {
        let digest = parse_hash_part(&h, "hash part")?;
        if seen.insert(digest) {
            wanted.push((h, digest));
        }
    }
    let digests: Vec<[u8; DIGEST_LEN]> = wanted.iter().map(|(_, d)| *d).collect();
    let infos = inner.path_info.get_many(&digests).await?;
    let mut out = serde_json::Map::with_capacity(wanted.len());
    for ((hash, _), info) in wanted.into_iter().zip(infos) {
        let value = match info {
            Some(info) => {
                let text = inner.render_narinfo(info).await?;
                serde_json::Value::String(String::from_utf8_lossy(&text).into_owned())
            }
            None => serde_json::Value::Null,
        };
        out.insert(hash, value);
    }
    let json = serde_json::to_vec(&serde_json::Value::Object(out)).map_err(|e| {
        HttpError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
    })?;
    Ok(answer(
        StatusCode::OK,
        "application/json",
        super::NO_CACHE,
        Body::from(json),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_bodies() {
        let a = "0".repeat(32);
        let b = "1".repeat(32);
        assert_eq!(
            parse_batch(format!("[\"{a}\", \"{b}\"]").as_bytes()).unwrap(),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(
            parse_batch(format!("{a}\n{b}\n\n").as_bytes()).unwrap(),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(parse_batch(b"").unwrap(), Vec::<String>::new());
        assert!(parse_batch(b"[1, 2]").is_err());
        assert!(parse_batch(b"[\"x\"").is_err());
        assert!(parse_batch(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn nar_urls() {
        assert_eq!(
            nar_url(&[0; 32], crate::Compression::Zstd),
            format!("nar/{}.nar.zst", "0".repeat(52))
        );
        assert_eq!(
            nar_url(&[0; 32], crate::Compression::None),
            format!("nar/{}.nar", "0".repeat(52))
        );
    }
}
