//! NAR ("Nix ARchive"): the canonical serialisation of a file system tree that
//! Nix hashes (NarHash), signs and ships through binary caches.
//!
//! Every token is a string: a little-endian u64 length, the bytes, and zero
//! padding to a multiple of 8.
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! - [reader]: a streaming pull parser that rejects every malformation.
//! - [writer]: a streaming writer, byte-identical to `nix-store --dump`.
//! - [ingest]: a NAR into castore (blobs uploaded as they stream by, the
//!   directory closure stored only once the whole NAR proved valid).
//! - [render]: a castore node back into a NAR, or just its size and SHA-256.
//! - [export]: the daemon's local NAR export (a NAR rendered into a file
//!   descriptor a client on its machine passes).
//! - [fd_writer]: a NAR written to a file descriptor from a thread of its
//!   own (`arca nar dump`, and the daemon's local NAR export).
//! - [seekable]: a castore node as a seekable NAR reader whose length is
//!   known without reading any blob (for HTTP Range requests).
//!
//! Entries are ordered by the raw bytes of their names, in NARs and in castore
//! directories alike, so a tree's NAR order and castore order agree.

pub mod export;
pub mod fd_writer;
pub mod ingest;
pub mod reader;
pub mod render;
pub mod seekable;
pub mod writer;

mod hashing;

pub use export::{export_request, NarExport};
pub use fd_writer::FdWriter;
pub use hashing::{HashingReader, HashingWriter};
pub use ingest::{ingest_nar, ingest_nar_expecting, ExpectedNar, IngestError};
pub use reader::{Event, NarError, NarReader};
pub use render::{
    calculate_nar, render_nar, render_nar_keeping_repeats, tree_entries, RenderError, REPEAT_BUDGET,
};
pub use seekable::SeekableNar;
pub use writer::{
    dump_path, dump_path_observed, DumpError, DumpedEntry, EntryObserver, NarOutput, NarWriter,
    WriteError,
};

/// The first token of every NAR.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest entry name accepted, in bytes (castore's limit, and `NAME_MAX`).
pub const MAX_NAME_LEN: u64 = 255;

/// Longest symlink target accepted, in bytes (castore's limit, `PATH_MAX - 1`).
pub const MAX_TARGET_LEN: u64 = 4095;

/// Longest keyword token accepted (the longest keyword, `nix-archive-1`, has 13 bytes).
pub const MAX_TOKEN_LEN: u64 = 16;

/// Size of the pieces file contents are moved in.
pub(crate) const CHUNK_SIZE: usize = 1024 * 1024;

/// Number of zero bytes that pad a string of `len` bytes to a multiple of 8.
pub(crate) fn padding_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}
