//! The room's upkeep between calls: re-reading the policy folder,
//! deleting what retention and expiry no longer allow, once the clock is
//! believable, and checking stored versions for damage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{OPERATOR, Room};
use crate::audit::Event;
use crate::storage::StorageError;

/// When retention and expiry may delete.
#[derive(Debug, Clone, Copy)]
pub struct Deletion {
    /// A clock this far ahead of the latest time the store has seen is not
    /// believed: nothing is deleted until an operator confirms it
    /// (`cleanroom admin trust-clock`).
    pub max_clock_jump: Duration,
    /// How long after an agreement expires its data and key are kept
    /// (unreadable, as the agreement is not in force), so that an expiry
    /// extended in time finds the agreement whole.
    pub grace: Duration,
}

impl Default for Deletion {
    fn default() -> Self {
        Deletion {
            max_clock_jump: Duration::from_secs(86_400),
            grace: Duration::from_secs(86_400),
        }
    }
}

/// How stored versions are checked for damage in the background.
#[derive(Debug, Clone, Copy)]
pub struct Scrub {
    /// Time from the start of one pass over every current version to the
    /// next (the first starts with the server).
    pub every: Duration,
    /// Reading pace: a pass sleeps so as to read at most this many bytes a
    /// second, leaving the disk to the calls.
    pub bytes_per_second: u64,
}

impl Default for Scrub {
    fn default() -> Self {
        Scrub {
            every: Duration::from_secs(86_400),
            bytes_per_second: 64 << 20,
        }
    }
}

impl Room {
    /// Re-reads the policy folder and puts the result in force: valid
    /// edits apply, broken files keep their last good policy, removed
    /// files suspend their agreement. Every change and refusal is logged
    /// and audited. Blocking: call off the async runtime.
    pub fn reload_policies(&self, dir: &Path) {
        let current = self.policies();
        let outcome = crate::agreements::reload::reload(dir, &current);
        let now = self.clock.now().unix_timestamp();
        for c in &outcome.changes {
            tracing::info!(
                agreement = %c.id,
                change = c.kind.as_str(),
                old = c.old_hash.as_deref().unwrap_or("-"),
                new = c.new_hash.as_deref().unwrap_or("-"),
                "policy reloaded"
            );
            let event = Event {
                org: OPERATOR.into(),
                agreement: c.id.clone(),
                policy_hash: c
                    .new_hash
                    .clone()
                    .or(c.old_hash.clone())
                    .unwrap_or_default(),
                action: "policy_reload",
                accepted: true,
                subject: Some(format!(
                    "{} {} -> {}",
                    c.kind.as_str(),
                    c.old_hash.as_deref().unwrap_or("none"),
                    c.new_hash.as_deref().unwrap_or("none")
                )),
                ..Event::default()
            };
            if let Err(e) = self.audit.append(event, now) {
                tracing::error!(error = %e, "auditing a policy reload");
            }
        }
        let mut messages = Vec::new();
        for e in &outcome.errors {
            for line in e.to_string().lines() {
                tracing::warn!(problem = %line, "policy file refused; the last good policy stays in force");
                messages.push(line.to_string());
            }
            let agreement = e
                .file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let event = Event {
                org: OPERATOR.into(),
                policy_hash: current
                    .get(&agreement)
                    .map(|p| p.hash().to_hex())
                    .unwrap_or_default(),
                agreement,
                action: "policy_reload",
                accepted: false,
                rule: Some("policy.invalid".into()),
                subject: e.file.file_name().map(|n| n.to_string_lossy().into_owned()),
                ..Event::default()
            };
            if let Err(e) = self.audit.append(event, now) {
                tracing::error!(error = %e, "auditing a refused policy reload");
            }
        }
        *self.policies.write() = Arc::new(outcome.set);
        self.query_tables.clear();
        let mut status = self.reload.lock();
        status.reloads += 1;
        if !outcome.errors.is_empty() {
            status.failures += 1;
        }
        status.last_at = Some(now);
        status.last_errors = messages;
    }

    /// Deletes what retention and expiry no longer allow: every version
    /// older than the agreement's retention period, and everything of an
    /// agreement once the grace period after its expiry has passed. When
    /// nothing of an agreement is left, its data key is destroyed. Each
    /// deletion is audited. Nothing is deleted while the clock reads more
    /// than the allowed jump past the latest time the store has seen.
    /// Blocking: call off the async runtime.
    pub fn run_maintenance(&self) -> Result<(), StorageError> {
        self.finish_erasures()?;
        let now = self.clock.now();
        let unix = now.unix_timestamp();
        let jump = i64::try_from(self.deletion.max_clock_jump.as_secs()).unwrap_or(i64::MAX);
        if let Some(seen) = self.store.time_seen()?
            && unix > seen.saturating_add(jump)
        {
            self.deletion_paused(seen, unix);
            return Ok(());
        }
        self.store.see_time(unix, false)?;
        *self.paused_at.lock() = None;
        let grace = time::Duration::try_from(self.deletion.grace).unwrap_or(time::Duration::MAX);
        for policy in self.policies().iter() {
            let id = policy.id();
            // Expired from the midnight (UTC) after the expiry date.
            let ended = policy
                .expires_on()
                .next_day()
                .map(|d| d.midnight().assume_utc());
            let expired = ended.is_some_and(|e| now >= e + grace);
            let keep_after = unix - i64::from(policy.retention_days()) * 86_400;
            let mut remaining = 0usize;
            for d in policy.datasets() {
                let versions = self.store.versions(id, d.name())?;
                let (doomed, kept): (Vec<_>, Vec<_>) = versions
                    .into_iter()
                    .partition(|v| expired || v.committed_at <= keep_after);
                remaining += kept.len();
                if doomed.is_empty() {
                    continue;
                }
                self.store.delete_versions(&doomed)?;
                self.query_tables.forget(id);
                let why = if expired {
                    "the agreement expired".to_string()
                } else {
                    format!("older than {} days", policy.retention_days())
                };
                tracing::info!(agreement = %id, dataset = %d.name(), versions = doomed.len(), reason = %why, "data deleted");
                self.audit_maintenance(Event {
                    rows: Some(doomed.iter().map(|v| v.rows).sum()),
                    ..operator_event(
                        policy,
                        "retention",
                        format!("{}: {} version(s) deleted, {why}", d.name(), doomed.len()),
                    )
                });
            }
            if (expired || remaining == 0)
                && self.store.has_data_key(id)?
                && self.store.shred_data_key_if_unused(id)?
            {
                tracing::info!(agreement = %id, "data key destroyed");
                self.audit_maintenance(operator_event(
                    policy,
                    "retention",
                    "data key destroyed: no data of the agreement remains".into(),
                ));
            }
        }
        Ok(())
    }

    /// Deletes the versions older than a current one an erasure wrote: the
    /// erasure's last step, which a stop between its commit and its
    /// deletions leaves undone. Not a matter of time: done even while
    /// deletion waits for the clock.
    fn finish_erasures(&self) -> Result<(), StorageError> {
        for policy in self.policies().iter() {
            for d in policy.datasets() {
                let Some(current) = self.store.current(policy.id(), d.name())? else {
                    continue;
                };
                if !current
                    .upload_id
                    .starts_with(crate::storage::ERASURE_ID_PREFIX)
                {
                    continue;
                }
                let older: Vec<_> = self
                    .store
                    .versions(policy.id(), d.name())?
                    .into_iter()
                    .filter(|v| v.version != current.version)
                    .collect();
                if older.is_empty() {
                    continue;
                }
                self.store.delete_versions(&older)?;
                self.query_tables.forget(policy.id());
                tracing::warn!(agreement = %policy.id(), dataset = %d.name(), versions = older.len(), "finished an erasure a stop interrupted");
                self.audit_maintenance(operator_event(
                    policy,
                    "erase",
                    format!(
                        "{}: {} older version(s) deleted, finishing an erasure a stop interrupted",
                        d.name(),
                        older.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Audits, once per pause, that deletion waits for the clock.
    fn deletion_paused(&self, seen: i64, now: i64) {
        let mut paused = self.paused_at.lock();
        if paused.is_some() {
            return;
        }
        *paused = Some(now);
        let ahead = now - seen;
        tracing::warn!(
            ahead_seconds = ahead,
            "deletion paused: the clock is further ahead of the latest time this store has seen than max_clock_jump_seconds allows; if the clock is right, stop the server and run `cleanroom admin trust-clock`"
        );
        for policy in self.policies().iter() {
            self.audit_maintenance(Event {
                accepted: false,
                rule: Some("clock.jump".into()),
                ..operator_event(
                    policy,
                    "retention",
                    format!(
                        "deletion paused: the server's clock reads {ahead} s past the latest time its store has seen; an operator confirms the clock"
                    ),
                )
            });
        }
    }

    fn audit_maintenance(&self, event: Event) {
        if let Err(e) = self.audit.append(event, self.clock.now().unix_timestamp()) {
            tracing::error!(error = %e, "auditing a deletion");
        }
    }

    /// One pass of the scrub: opens every sealed chunk of every current
    /// version not already known damaged, at most `pace` bytes a second.
    /// A damaged one is recorded ([`crate::storage::Store::read_with`]),
    /// dropped from memory and audited for its agreement. Returns how many
    /// were found. Blocking: call off the async runtime; `stop` ends the
    /// pass early.
    pub fn run_scrub(&self, pace: u64, stop: &dyn Fn() -> bool) -> Result<usize, StorageError> {
        let store = self.store();
        let mut found = 0;
        for v in store.current_versions()? {
            if stop() {
                break;
            }
            if store.is_damaged(&v)? {
                if store.clear_if_whole(&v)? {
                    tracing::info!(agreement = %v.agreement, dataset = %v.dataset, "a damaged version reads back whole again");
                    self.query_tables.forget(&v.agreement);
                }
                continue;
            }
            let started = std::time::Instant::now();
            match store.verify_version(&v) {
                Ok(()) => {}
                Err(StorageError::VersionDamaged { .. }) => {
                    found += 1;
                    self.query_tables.forget(&v.agreement);
                    let policies = self.policies();
                    self.audit_maintenance(Event {
                        org: OPERATOR.into(),
                        agreement: v.agreement.clone(),
                        policy_hash: policies
                            .get(&v.agreement)
                            .map(|p| p.hash().to_hex())
                            .unwrap_or_default(),
                        action: "scrub",
                        accepted: false,
                        rule: Some("dataset.damaged".into()),
                        subject: Some(format!(
                            "{}: damaged on the server; its owner uploads it again",
                            v.dataset
                        )),
                        ..Event::default()
                    });
                }
                Err(e) => return Err(e),
            }
            let due = Duration::from_secs_f64(v.bytes as f64 / pace.max(1) as f64);
            while started.elapsed() < due && !stop() {
                std::thread::sleep((due - started.elapsed()).min(Duration::from_millis(100)));
            }
        }
        Ok(found)
    }
}

/// An accepted event of the operator's about `policy`'s agreement.
fn operator_event(policy: &crate::policy::Policy, action: &'static str, subject: String) -> Event {
    Event {
        org: OPERATOR.into(),
        agreement: policy.id().to_string(),
        policy_hash: policy.hash().to_hex(),
        action,
        accepted: true,
        subject: Some(subject),
        ..Event::default()
    }
}
