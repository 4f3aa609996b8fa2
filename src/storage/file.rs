//! Encrypted dataset files.
//!
//! ```text
//! "CRDS" 0x01
//! chunk*: le32(len) || nonce(12) || AES-256-GCM(ciphertext || tag)
//! ```
//!
//! Each chunk's plaintext is one Arrow IPC stream (schema + one batch); the
//! last chunk is empty and marks the end. The associated data binds every
//! chunk to its agreement, dataset, version, position and end flag, so
//! chunks cannot be reordered, moved between files, or cut off unnoticed.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use arrow::ipc::reader::StreamDecoder;
use arrow::record_batch::RecordBatch;

use super::crypto::Key;
use super::{StorageError, io_err};

const MAGIC: &[u8; 5] = b"CRDS\x01";

fn chunk_aad(agreement: &str, dataset: &str, version: &str, index: u64, last: bool) -> Vec<u8> {
    let mut aad = format!("{agreement}/{dataset}/{version}").into_bytes();
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(u8::from(last));
    aad
}

/// A version being written. Dropped without [`StagedVersion::finish_into`],
/// its file is deleted: an abandoned upload leaves nothing.
#[derive(Debug)]
pub struct StagedVersion {
    path: PathBuf,
    out: Option<BufWriter<File>>,
    key: Key,
    /// `key`, sealed for the metadata store.
    sealed_key: Vec<u8>,
    agreement: String,
    dataset: String,
    version: String,
    chunks: u64,
    rows: u64,
}

impl StagedVersion {
    pub(super) fn create(
        path: PathBuf,
        key: Key,
        sealed_key: Vec<u8>,
        agreement: &str,
        dataset: &str,
        version: &str,
    ) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC).map_err(io_err(&path))?;
        Ok(StagedVersion {
            path,
            out: Some(out),
            key,
            sealed_key,
            agreement: agreement.to_string(),
            dataset: dataset.to_string(),
            version: version.to_string(),
            chunks: 0,
            rows: 0,
        })
    }

    pub(super) fn sealed_key(&self) -> &[u8] {
        &self.sealed_key
    }

    pub fn agreement(&self) -> &str {
        &self.agreement
    }
    pub fn dataset(&self) -> &str {
        &self.dataset
    }
    pub fn version(&self) -> &str {
        &self.version
    }
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn write_sealed(&mut self, plaintext: &[u8], last: bool) -> Result<(), StorageError> {
        let aad = chunk_aad(
            &self.agreement,
            &self.dataset,
            &self.version,
            self.chunks,
            last,
        );
        let sealed = self.key.seal(plaintext, &aad)?;
        let out = self
            .out
            .as_mut()
            .expect("staged file is open until finished");
        let len = u32::try_from(sealed.len())
            .map_err(|_| StorageError::Arrow("a chunk exceeds 4 GiB".into()))?;
        out.write_all(&len.to_le_bytes())
            .map_err(io_err(&self.path))?;
        out.write_all(&sealed).map_err(io_err(&self.path))?;
        self.chunks += 1;
        Ok(())
    }

    /// Appends one validated Arrow IPC stream holding `rows` rows.
    pub fn append(&mut self, ipc: &[u8], rows: u64) -> Result<(), StorageError> {
        self.write_sealed(ipc, false)?;
        self.rows += rows;
        Ok(())
    }

    /// Writes the end marker, syncs, and renames into `target` (syncing its
    /// folder). Returns rows and file size.
    pub(super) fn finish_into(mut self, target: &Path) -> Result<(u64, u64), StorageError> {
        self.write_sealed(&[], true)?;
        let out = self.out.take().expect("staged file is open until finished");
        let file = out.into_inner().map_err(|e| StorageError::Io {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io_err(&self.path))?;
        let bytes = file.metadata().map_err(io_err(&self.path))?.len();
        drop(file);
        let parent = target.parent().expect("version files live in a folder");
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        std::fs::rename(&self.path, target).map_err(io_err(target))?;
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io_err(parent))?;
        self.path = PathBuf::new();
        Ok((self.rows, bytes))
    }
}

impl Drop for StagedVersion {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.out.take();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads and decrypts a whole version file, one chunk at a time: the
/// sealed bytes of one chunk are in memory at once, not the whole file's.
/// Each decoded batch is passed to `keep`, and what it returns is kept.
///
/// A batch's columns are slices of its decrypted chunk. When `keep` returns
/// a batch of its own buffers (and drops the one it was given), the chunk's
/// buffer is used again for the next chunk, so reading a version touches
/// fresh memory only for what is kept; otherwise each chunk keeps its own.
pub(super) fn read_version<E: From<StorageError>>(
    path: &Path,
    key: &Key,
    [agreement, dataset, version]: [&str; 3],
    mut keep: impl FnMut(RecordBatch) -> Result<RecordBatch, E>,
) -> Result<Vec<RecordBatch>, E> {
    let damaged = || StorageError::Damaged {
        path: path.to_path_buf(),
    };
    // A committed version's file that is gone is damage, as is one cut.
    let file = match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(damaged().into()),
        opened => opened.map_err(io_err(path))?,
    };
    let size = file.metadata().map_err(io_err(path))?.len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut magic = [0u8; MAGIC.len()];
    input.read_exact(&mut magic).map_err(|_| damaged())?;
    if &magic != MAGIC {
        return Err(damaged().into());
    }
    let mut position = MAGIC.len() as u64;
    let mut batches = Vec::new();
    let mut index = 0u64;
    let mut spare: Vec<u8> = Vec::new();
    loop {
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(|_| damaged())?;
        let len = u64::from(u32::from_le_bytes(len));
        position += 4 + len;
        if position > size {
            return Err(damaged().into());
        }
        let mut sealed = std::mem::take(&mut spare);
        sealed.resize(len as usize, 0);
        input.read_exact(&mut sealed).map_err(io_err(path))?;
        // The end marker is the file's final chunk: each chunk is opened
        // once, under the associated data its place in the file calls for.
        // A file cut after any other chunk fails here (its last chunk was
        // not sealed as the end), as does one with bytes after the end.
        let last = position == size;
        let aad = chunk_aad(agreement, dataset, version, index, last);
        let plain = key.open_owned(sealed, &aad).map_err(|_| damaged())?;
        if last {
            return if plain.is_empty() {
                Ok(batches)
            } else {
                Err(damaged().into())
            };
        }
        // Decoded without a copy: the batch's columns are slices of the
        // decrypted chunk.
        let arrow_err =
            |e: arrow::error::ArrowError| StorageError::Arrow(format!("{}: {e}", path.display()));
        let whole = arrow::buffer::Buffer::from_vec(plain);
        let mut rest = whole.clone();
        let mut decoder = StreamDecoder::new();
        while !rest.is_empty() {
            if let Some(batch) = decoder.decode(&mut rest).map_err(arrow_err)? {
                batches.push(keep(batch)?);
            }
        }
        decoder.finish().map_err(arrow_err)?;
        drop((rest, decoder));
        // Unshared once nothing kept points into it.
        if let Ok(buffer) = whole.into_vec::<u8>() {
            spare = buffer;
        }
        index += 1;
    }
}
