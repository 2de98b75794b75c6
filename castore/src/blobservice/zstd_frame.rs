//! One zstd frame decoded into a buffer of exactly its declared size, with
//! one decompression context per thread, reused.
use bytes::Bytes;

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses `frame`, one zstd frame that declares its content size, of
/// at most `max` bytes. The output buffer is sized from the frame header
/// (never more than `max`), so a frame claiming more is refused before any
/// allocation. The error says what is wrong with the frame.
pub(crate) fn decompress_frame(frame: &[u8], max: u64) -> Result<Bytes, String> {
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n <= max => n as usize,
        Ok(Some(n)) => return Err(format!("claims {n} bytes, more than {max}")),
        Ok(None) => return Err("no content size".into()),
        Err(e) => return Err(format!("{e:?}")),
    };
    // Uninitialised capacity: zstd writes every byte it reports.
    let mut out = Vec::with_capacity(size);
    let written = DECOMPRESSOR.with(|cell| -> Result<usize, String> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let dec = slot.as_mut().expect("set above");
        dec.decompress_to_buffer(frame, &mut out)
            .map_err(|e| e.to_string())
    })?;
    if written != size {
        return Err(format!("{written} bytes, the frame says {size}"));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_bounded_and_checked() {
        let data = vec![7u8; 100_000];
        let frame = zstd::bulk::compress(&data, 3).unwrap();
        assert_eq!(decompress_frame(&frame, 100_000).unwrap(), data);
        let e = decompress_frame(&frame, 99_999).unwrap_err();
        assert!(e.contains("more than 99999"), "{e}");
        assert!(decompress_frame(b"not a zstd frame", 1 << 20).is_err());
        // A frame cut short is refused, not returned short.
        assert!(decompress_frame(&frame[..frame.len() - 1], 100_000).is_err());
        // A frame without a content size (streamed) is refused.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let streamed = enc.finish().unwrap();
        assert!(decompress_frame(&streamed, 1 << 20).is_err());
    }
}
