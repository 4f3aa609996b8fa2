//! The audit log: append-only JSON lines, each entry chained to the one
//! before by BLAKE3, so editing, removing or reordering any entry breaks the
//! chain. The head (last sequence number and hash) is also kept in a
//! separate file, so cutting entries off the end is detected too.
//!
//! An entry and its head move together or not at all: the line is synced,
//! then the head is replaced; if either fails (a full disk, a read-only
//! store) the line is cut off again before the call returns its error, and
//! the next append starts from the last committed byte. A line cut off
//! mid-write by a crash is removed when the log is next opened.
//!
//! ```text
//! hash(entry) = BLAKE3(prev_hash_bytes || JSON of the entry with "hash": "")
//! ```
//!
//! Entries hold organisations, agreements, rules, counts and hashes, never a
//! data value, a fingerprint or a secret.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use serde::{Deserialize, Serialize};

pub const LOG_FILE: &str = "audit.log";
pub const HEAD_FILE: &str = "audit.head";
const GENESIS: [u8; 32] = [0u8; 32];

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// Unix seconds.
    pub time: i64,
    pub org: String,
    pub agreement: String,
    pub policy_hash: String,
    /// "upload", "overlap", "query".
    pub action: String,
    /// "accepted" or "rejected".
    pub decision: String,
    /// The rule that decided a rejection.
    pub rule: Option<String>,
    /// What the action concerned: a dataset, a version.
    pub subject: Option<String>,
    /// BLAKE3 of the SQL text, for queries.
    pub sql_hash: Option<String>,
    /// Rows stored or returned.
    pub rows: Option<u64>,
    /// Output rows suppressed by the minimum group size.
    pub suppressed: Option<u64>,
    /// Privacy budget the query spent (differential privacy only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// Delta the query spent with it (entries written before delta was
    /// charged have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// The query's id in the budget ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_id: Option<String>,
    /// The approved template a query ran, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// BLAKE3 of the template's bound parameter values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params_hash: Option<String>,
    /// Hex hash of the previous entry (zeros for the first).
    pub prev: String,
    /// Hex hash of this entry.
    pub hash: String,
}

impl Entry {
    /// The entry as `org` may read it: the exact row counts of another
    /// party's uploads, erasures and retention runs are taken out (`rows`,
    /// and the counts in an erasure's subject), so that reading the log
    /// tells nothing exact about another party's data. `owner` names the
    /// organisation that owns a dataset of the agreement. A redacted entry
    /// loses its `hash` too: the reader knows every other field of it and
    /// its `prev`, so the hash would give the count back to anyone who
    /// tries each count in turn (the entry after it loses its `prev` for
    /// the same reason, see [`AuditLog::page_seen_by`]). The chain is
    /// verified whole on the server's machine (`cleanroom audit verify`).
    pub fn as_seen_by<'p>(mut self, org: &str, owner: impl Fn(&str) -> Option<&'p str>) -> Entry {
        if self.redacted_for(org, owner) {
            self.rows = None;
            self.hash = String::new();
            if self.action == "erase" {
                self.subject = self.dataset();
            }
        }
        self
    }

    /// The dataset an entry about data names first in its subject.
    fn dataset(&self) -> Option<String> {
        self.subject
            .as_deref()
            .map(|s| s.split([':', ' ']).next().unwrap_or_default().to_string())
    }

    /// Whether `org` reads this entry with its counts taken out.
    fn redacted_for<'p>(&self, org: &str, owner: impl Fn(&str) -> Option<&'p str>) -> bool {
        let about_data = matches!(
            self.action.as_str(),
            "upload" | "erase" | "retention" | "blinding"
        );
        // An entry with no count (a refused upload) has nothing to take out.
        let counted = self.rows.is_some() || self.action == "erase";
        if !(about_data && counted) {
            return false;
        }
        let own = match self.dataset().as_deref().and_then(&owner) {
            // The party that blinded another's points has counted them.
            Some(o) => o == org || (self.action == "blinding" && self.org == org),
            // A subject naming no dataset (a data key destroyed) holds no count.
            None => self.org == org || self.rows.is_none(),
        };
        !own
    }
}

/// What a caller records; the log adds sequence, chain and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub org: String,
    pub agreement: String,
    pub policy_hash: String,
    pub action: &'static str,
    pub accepted: bool,
    pub rule: Option<String>,
    pub subject: Option<String>,
    pub sql_hash: Option<String>,
    pub rows: Option<u64>,
    pub suppressed: Option<u64>,
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    pub query_id: Option<String>,
    pub template: Option<String>,
    pub params_hash: Option<String>,
    /// A query a crash interrupted after its budget was charged.
    pub interrupted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log broken at line {line} (entry {seq}): {reason}")]
    Broken { line: u64, seq: u64, reason: String },
    #[error("audit log: {0}")]
    Head(String),
    #[error("{}: no audit log here; is this the server's data directory (--data-dir)?", .0.display())]
    Missing(PathBuf),
}

impl AuditError {
    /// Whether the store could not take the write (full, over quota or
    /// read-only): nothing was changed and the call may be retried later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuditError::Io { source, .. } if crate::disk::is_out_of_space(source))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn entry_hash(entry: &Entry, prev: &[u8; 32]) -> [u8; 32] {
    let mut unhashed = entry.clone();
    unhashed.hash = String::new();
    let json = serde_json::to_vec(&unhashed).expect("entries serialise");
    let mut hasher = blake3::Hasher::new();
    hasher.update(prev);
    hasher.update(&json);
    *hasher.finalize().as_bytes()
}

/// The result of checking a log: entry count and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub head: [u8; 32],
}

/// Checks the whole chain of the log in `dir` and that it ends at the
/// recorded head. The error names the first broken line.
pub fn verify(dir: &Path) -> Result<Verified, AuditError> {
    // A server creates its log when it opens the data directory: no log
    // means a wrong path, and an intact chain of nothing would hide it.
    if !dir.join(LOG_FILE).is_file() {
        return Err(AuditError::Missing(dir.to_path_buf()));
    }
    let (verified, _) = read_chain(dir, |_| {})?;
    match read_head(dir)? {
        Some((seq, hash)) if seq != verified.entries || hash != verified.head => {
            Err(AuditError::Head(format!(
                "the log ends at entry {} but the recorded head is entry {seq}: entries were removed or added outside the server",
                verified.entries
            )))
        }
        None if verified.entries > 0 => Err(AuditError::Head(
            "the head file is missing but the log has entries".into(),
        )),
        _ => Ok(verified),
    }
}

/// Calls `each` on every entry of the log in `dir`, oldest first, after
/// checking the chain up to it; fails at the first broken entry.
pub fn each_entry(dir: &Path, each: impl FnMut(&Entry)) -> Result<u64, AuditError> {
    read_chain(dir, each).map(|(v, _)| v.entries)
}

fn read_chain(dir: &Path, each: impl FnMut(&Entry)) -> Result<(Verified, u64), AuditError> {
    read_chain_upto(dir, u64::MAX, each)
}

/// As [`read_chain`], stopping after entry `last`: entries appended while
/// it reads are left alone, so it needs no lock.
fn read_chain_upto(
    dir: &Path,
    last: u64,
    mut each: impl FnMut(&Entry),
) -> Result<(Verified, u64), AuditError> {
    let path = dir.join(LOG_FILE);
    let mut prev = GENESIS;
    let mut entries = 0u64;
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((
                Verified {
                    entries: 0,
                    head: GENESIS,
                },
                0,
            ));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let mut bytes = 0u64;
    let mut reader = BufReader::new(file);
    let mut raw = Vec::new();
    for i in 0.. {
        if entries >= last {
            break;
        }
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(io(&path))? == 0 {
            break;
        }
        bytes += raw.len() as u64;
        let line_no = i as u64 + 1;
        let broken = |reason: &str| AuditError::Broken {
            line: line_no,
            seq: entries + 1,
            reason: reason.to_string(),
        };
        if raw.pop() != Some(b'\n') {
            return Err(broken(
                "the last entry was cut off mid-write (a crash or a full disk); the server removes it when it starts",
            ));
        }
        let line = std::str::from_utf8(&raw).map_err(|_| broken("not a well-formed entry"))?;
        let entry: Entry =
            serde_json::from_str(line).map_err(|_| broken("not a well-formed entry"))?;
        // The hash covers the entry's fields; its bytes must be those the
        // server writes for them, so no byte of the line goes unchecked
        // (a renamed empty field would otherwise parse to the same entry).
        if serde_json::to_vec(&entry).ok().as_deref() != Some(raw.as_slice()) {
            return Err(broken("not as the server writes it: the entry was edited"));
        }
        if entry.seq != entries + 1 {
            return Err(broken(
                "sequence number out of order: an entry was removed or moved",
            ));
        }
        if entry.prev != hex::encode(prev) {
            return Err(broken("does not chain to the entry before it"));
        }
        let hash = entry_hash(&entry, &prev);
        if entry.hash != hex::encode(hash) {
            return Err(broken(
                "content does not match its hash: the entry was edited",
            ));
        }
        each(&entry);
        prev = hash;
        entries += 1;
    }
    Ok((
        Verified {
            entries,
            head: prev,
        },
        bytes,
    ))
}

fn read_head(dir: &Path) -> Result<Option<(u64, [u8; 32])>, AuditError> {
    let path = dir.join(HEAD_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut parts = text.split_whitespace();
    let parsed = (|| {
        let seq = parts.next()?.parse().ok()?;
        let hash: [u8; 32] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
        Some((seq, hash))
    })();
    parsed
        .map(Some)
        .ok_or_else(|| AuditError::Head(format!("{} is malformed", path.display())))
}

fn write_head(dir: &Path, seq: u64, hash: &[u8; 32]) -> Result<(), AuditError> {
    let path = dir.join(HEAD_FILE);
    let tmp = dir.join(format!("{HEAD_FILE}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    writeln!(f, "{seq} {}", hex::encode(hash)).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Cuts the log back to `len` bytes, durably.
fn cut_to(file: &File, len: u64) -> std::io::Result<()> {
    file.set_len(len)?;
    file.sync_data()
}

/// Removes a last line without its newline: an append that a crash or a
/// full disk stopped before it was synced, so never committed.
fn cut_torn_tail(dir: &Path) -> Result<(), AuditError> {
    use std::io::{Read, Seek, SeekFrom};
    let path = dir.join(LOG_FILE);
    let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(&path)(e)),
    };
    let len = file.metadata().map_err(io(&path))?.len();
    // Find the last newline, reading backwards in blocks.
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start)).map_err(io(&path))?;
        file.read_exact(&mut block[..n]).map_err(io(&path))?;
        if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    if keep < len {
        tracing::warn!(
            bytes = len - keep,
            "audit log: removed an entry cut off mid-write"
        );
        cut_to(&file, keep).map_err(io(&path))?;
    }
    Ok(())
}

#[derive(Debug)]
struct State {
    file: File,
    seq: u64,
    head: [u8; 32],
    /// Bytes of the log up to the last committed entry.
    len: u64,
}

/// The server's audit log. Cheap to clone; appends are serialised.
#[derive(Debug, Clone)]
pub struct AuditLog {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

impl AuditLog {
    /// Opens the log in `dir`, checking its whole chain first. A log that
    /// holds one entry more than its head (a crash between the two writes)
    /// has its head brought forward; any other mismatch refuses to open.
    pub fn open(dir: &Path) -> Result<Self, AuditError> {
        cut_torn_tail(dir)?;
        let (verified, len) = read_chain(dir, |_| {})?;
        match read_head(dir)? {
            Some((seq, hash)) if seq == verified.entries && hash == verified.head => {}
            Some((seq, _)) if seq + 1 == verified.entries => {
                tracing::warn!(
                    entry = verified.entries,
                    "audit head was one entry behind; recovered"
                );
                write_head(dir, verified.entries, &verified.head)?;
            }
            None if verified.entries <= 1 => write_head(dir, verified.entries, &verified.head)?,
            _ => {
                return Err(AuditError::Head(
                    "the log and its recorded head disagree; run `cleanroom audit verify`".into(),
                ));
            }
        }
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Ok(AuditLog {
            dir: dir.to_path_buf(),
            state: Arc::new(Mutex::new(State {
                file,
                seq: verified.entries,
                head: verified.head,
                len,
            })),
        })
    }

    /// Appends an event durably (the line is synced before the head moves).
    pub fn append(&self, event: Event, time: i64) -> Result<Entry, AuditError> {
        let mut state = self.state.lock();
        let mut entry = Entry {
            seq: state.seq + 1,
            time,
            org: event.org,
            agreement: event.agreement,
            policy_hash: event.policy_hash,
            action: event.action.to_string(),
            decision: match (event.interrupted, event.accepted) {
                (true, _) => "interrupted",
                (false, true) => "accepted",
                (false, false) => "rejected",
            }
            .to_string(),
            rule: event.rule,
            subject: event.subject,
            sql_hash: event.sql_hash,
            rows: event.rows,
            suppressed: event.suppressed,
            epsilon: event.epsilon,
            delta: event.delta,
            query_id: event.query_id,
            template: event.template,
            params_hash: event.params_hash,
            prev: hex::encode(state.head),
            hash: String::new(),
        };
        let hash = entry_hash(&entry, &state.head);
        entry.hash = hex::encode(hash);
        let mut line = serde_json::to_vec(&entry).expect("entries serialise");
        line.push(b'\n');
        let path = self.dir.join(LOG_FILE);
        // A write that failed before may have left part of a line behind.
        if state.file.metadata().map_err(io(&path))?.len() != state.len {
            cut_to(&state.file, state.len).map_err(io(&path))?;
        }
        let written = state
            .file
            .write_all(&line)
            .and_then(|()| state.file.sync_data())
            .map_err(io(&path))
            .and_then(|()| {
                crate::crash::point("audit.written");
                write_head(&self.dir, entry.seq, &hash)
            });
        if let Err(e) = written {
            // Not committed: the line goes again, so the next append
            // takes this sequence number and chains to the same head. If
            // cutting fails too, the next append cuts before it writes.
            if let Err(cut) = cut_to(&state.file, state.len) {
                tracing::warn!(error = %cut, "audit log: could not cut off an unfinished entry yet");
            }
            return Err(e);
        }
        state.seq = entry.seq;
        state.head = hash;
        state.len += line.len() as u64;
        Ok(entry)
    }

    /// Ids of every audited query that charged a privacy budget.
    pub fn query_ids(&self) -> Result<std::collections::HashSet<String>, AuditError> {
        let _guard = self.state.lock();
        let mut out = std::collections::HashSet::new();
        read_chain(&self.dir, |e| {
            if let Some(id) = &e.query_id {
                out.insert(id.clone());
            }
        })?;
        Ok(out)
    }

    /// A page of [`AuditLog::page_for`] as `org` may read it: each entry
    /// [`Entry::as_seen_by`], and an entry whose predecessor in the chain
    /// was redacted for `org` without its `prev` (the redacted entry's
    /// hash).
    pub fn page_seen_by<'p>(
        &self,
        agreement: &str,
        after: u64,
        limit: usize,
        org: &str,
        owner: impl Fn(&str) -> Option<&'p str> + Copy,
    ) -> Result<Vec<Entry>, AuditError> {
        let last = self.state.lock().seq;
        let mut out = Vec::new();
        // The last entry of this agreement read so far, redacted for `org`.
        let mut before: Option<(u64, bool)> = None;
        read_chain_upto(&self.dir, last, |e| {
            if e.agreement != agreement {
                return;
            }
            let redacted = e.redacted_for(org, owner);
            if e.seq > after && out.len() < limit {
                let mut seen = e.clone().as_seen_by(org, owner);
                if before == Some((e.seq.wrapping_sub(1), true)) {
                    seen.prev = String::new();
                }
                out.push(seen);
            }
            before = Some((e.seq, redacted));
        })?;
        Ok(out)
    }

    /// Entries about one agreement, oldest first.
    pub fn entries_for(&self, agreement: &str) -> Result<Vec<Entry>, AuditError> {
        self.page_for(agreement, 0, usize::MAX)
    }

    /// At most `limit` entries about one agreement with a sequence number
    /// above `after`, oldest first. Reads the entries written before the
    /// call without holding the append lock, so appends go on meanwhile.
    pub fn page_for(
        &self,
        agreement: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Entry>, AuditError> {
        let last = self.state.lock().seq;
        let mut out = Vec::new();
        read_chain_upto(&self.dir, last, |e| {
            if e.seq > after && e.agreement == agreement && out.len() < limit {
                out.push(e.clone());
            }
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
