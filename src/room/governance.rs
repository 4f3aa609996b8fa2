//! Governance views: a party's budget, its access report, the admin view
//! of an agreement, and the audit log as a party may read it. The views are
//! built by plain functions over the policies and the store, so
//! `cleanroom admin status` can build the same view locally.

use std::collections::BTreeMap;

use time::OffsetDateTime;

use super::{ReloadStatus, Room, RoomError};
use crate::audit::Entry;
use crate::policy::{AgreementState, Policy, PolicySet, Right};
use crate::privacy::{from_micros, to_micros, window};
use crate::storage::{StorageError, Store, delta_from_units, delta_to_units};

/// A party's privacy budget in the current window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    pub epsilon_total: f64,
    pub epsilon_spent: f64,
    pub epsilon_remaining: f64,
    pub epsilon_per_query_max: f64,
    pub epsilon_per_query_min: f64,
    pub delta: f64,
    pub delta_total: f64,
    pub delta_spent: f64,
    pub delta_remaining: f64,
    pub window: String,
    /// Unix seconds of the next refresh; None for never.
    pub next_refresh: Option<i64>,
    /// Queries charged in the window.
    pub queries: u64,
}

/// One agreement's state, data and budgets, for its administrators.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementStatus {
    pub agreement_id: String,
    pub state: AgreementState,
    pub policy_hash: String,
    pub datasets: Vec<DatasetStatus>,
    pub budgets: Vec<BudgetUse>,
    /// Whether the agreement's data key exists.
    pub data_key: bool,
}

/// One dataset in the admin view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetStatus {
    pub dataset: String,
    pub owner: String,
    /// Empty before the first upload.
    pub current_version: String,
    /// None where the viewer may not see another party's count.
    pub rows: Option<u64>,
    pub versions: u32,
    pub uploaded_at: i64,
    pub needs_upload: bool,
    pub damaged: bool,
}

/// One party's spending in the admin view.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetUse {
    pub organisation: String,
    pub window: String,
    pub epsilon_spent: f64,
    pub epsilon_total: f64,
    pub queries: u64,
    pub delta_spent: f64,
    pub delta_total: f64,
}

/// The admin view: every agreement the caller administers.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminStatus {
    pub generated_at: i64,
    pub agreements: Vec<AgreementStatus>,
    pub reload: ReloadStatus,
}

/// What the room holds of a party and what was done in its agreement.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessReport {
    pub organisation: String,
    pub agreement_id: String,
    pub purpose: String,
    pub generated_at: i64,
    pub policy_hash: String,
    pub state: AgreementState,
    pub retention_days: u32,
    /// The last day in force, as a date.
    pub expires: String,
    pub datasets: Vec<DatasetHolding>,
    pub access: Vec<AccessCount>,
    pub budget: Option<Budget>,
}

/// One of the party's datasets and the versions held of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetHolding {
    pub dataset: String,
    /// "name (role)" per uploaded column.
    pub columns: Vec<String>,
    pub versions: Vec<HeldVersion>,
}

/// One version held, and when it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldVersion {
    pub version: String,
    pub rows: u64,
    pub uploaded_at: i64,
    pub uploaded_by: String,
    pub current: bool,
    /// Unix seconds by which retention or expiry deletes it.
    pub delete_by: i64,
}

/// Calls of one kind by one organisation, from the audit log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessCount {
    pub organisation: String,
    pub action: String,
    pub accepted: u64,
    pub rejected: u64,
    pub epsilon: f64,
    pub last_at: i64,
}

/// Most audit entries in one page.
pub const MAX_PAGE: usize = 1_000;

/// `org`'s privacy budget in `policy` at `now`.
pub fn budget_view(
    store: &Store,
    policy: &Policy,
    org: &str,
    now: OffsetDateTime,
) -> Result<Option<Budget>, StorageError> {
    let Some(privacy) = policy.privacy() else {
        return Ok(None);
    };
    let window = window(privacy.refresh(), now);
    let spent = store.spent(policy.id(), org, &window.id)?;
    let total = to_micros(privacy.epsilon_total());
    let delta_total = delta_to_units(privacy.delta_total());
    Ok(Some(Budget {
        epsilon_total: privacy.epsilon_total(),
        epsilon_spent: from_micros(spent.micros),
        epsilon_remaining: from_micros(total.saturating_sub(spent.micros)),
        epsilon_per_query_max: privacy.epsilon_per_query_max(),
        delta: privacy.delta(),
        window: window.id,
        next_refresh: window.next_refresh.map(|t| t.unix_timestamp()),
        queries: spent.queries,
        epsilon_per_query_min: privacy.epsilon_per_query_min(),
        delta_total: delta_from_units(delta_total),
        delta_spent: delta_from_units(spent.delta_units),
        delta_remaining: delta_from_units(delta_total.saturating_sub(spent.delta_units)),
    }))
}

/// One agreement's state, data and budgets, for its administrators.
pub fn agreement_status(
    set: &PolicySet,
    policy: &Policy,
    store: &Store,
    now: OffsetDateTime,
) -> Result<AgreementStatus, StorageError> {
    let mut datasets = Vec::new();
    for d in policy.datasets() {
        let versions = store.versions(policy.id(), d.name())?;
        let current = store.current(policy.id(), d.name())?;
        datasets.push(DatasetStatus {
            dataset: d.name().to_string(),
            owner: d.owner().to_string(),
            current_version: current
                .as_ref()
                .map(|v| v.version.clone())
                .unwrap_or_default(),
            rows: Some(current.as_ref().map_or(0, |v| v.rows)),
            versions: u32::try_from(versions.len()).unwrap_or(u32::MAX),
            uploaded_at: current.as_ref().map_or(0, |v| v.committed_at),
            needs_upload: current
                .as_ref()
                .is_some_and(|v| !policy.made_now(d, &v.form)),
            damaged: match &current {
                Some(v) => store.is_damaged(v)?,
                None => false,
            },
        });
    }
    let mut budgets = Vec::new();
    if policy.privacy().is_some() {
        for party in policy.parties().iter().filter(|p| p.has(Right::Query)) {
            let Some(b) = budget_view(store, policy, party.org(), now)? else {
                continue;
            };
            budgets.push(BudgetUse {
                organisation: party.org().to_string(),
                window: b.window,
                epsilon_spent: b.epsilon_spent,
                epsilon_total: b.epsilon_total,
                queries: b.queries,
                delta_spent: b.delta_spent,
                delta_total: b.delta_total,
            });
        }
    }
    Ok(AgreementStatus {
        agreement_id: policy.id().to_string(),
        state: set.state_of(policy, now.date()),
        policy_hash: policy.hash().to_hex(),
        datasets,
        budgets,
        data_key: store.has_data_key(policy.id())?,
    })
}

/// The reload record as admins of `agreements` may see it: counts, and the
/// refusals of their own agreements' files.
pub fn reload_view(status: &ReloadStatus, agreements: &[String]) -> ReloadStatus {
    ReloadStatus {
        reloads: status.reloads,
        failures: status.failures,
        last_at: status.last_at,
        last_errors: status
            .last_errors
            .iter()
            .filter(|line| {
                agreements.iter().any(|id| {
                    line.contains(&format!("/{id}.toml:"))
                        || line.starts_with(&format!("{id}.toml:"))
                })
            })
            .cloned()
            .collect(),
    }
}

impl Room {
    /// What the room holds of `org` in agreement `id`, when it goes, and
    /// what every party did there. Blocking.
    pub fn access_report(&self, org: &str, id: &str) -> Result<AccessReport, RoomError> {
        let policy = self.agreement_for(org, id)?;
        let set = self.policies();
        let store = self.store();
        let now = self.clock().now();
        let expires_end = policy
            .expires_on()
            .next_day()
            .map(|d| d.midnight().assume_utc().unix_timestamp())
            .unwrap_or(i64::MAX);
        let retention = i64::from(policy.retention_days()) * 86_400;
        let mut datasets = Vec::new();
        for d in policy.datasets().iter().filter(|d| d.owner() == org) {
            let current = store.current(policy.id(), d.name())?.map(|v| v.version);
            let versions = store
                .versions(policy.id(), d.name())?
                .into_iter()
                .map(|v| HeldVersion {
                    current: current.as_deref() == Some(v.version.as_str()),
                    delete_by: (v.committed_at + retention).min(expires_end),
                    version: v.version,
                    rows: v.rows,
                    uploaded_at: v.committed_at,
                    uploaded_by: v.uploaded_by,
                })
                .collect();
            datasets.push(DatasetHolding {
                dataset: d.name().to_string(),
                columns: d
                    .uploaded_columns()
                    .map(|c| format!("{} ({})", c.name(), c.role().name()))
                    .collect(),
                versions,
            });
        }
        let mut access: BTreeMap<(String, String), AccessCount> = BTreeMap::new();
        for e in self.audit_log().entries_for(policy.id())? {
            let a = access
                .entry((e.org.clone(), e.action.clone()))
                .or_insert_with(|| AccessCount {
                    organisation: e.org.clone(),
                    action: e.action.clone(),
                    ..AccessCount::default()
                });
            if e.decision == "rejected" {
                a.rejected += 1;
            } else {
                a.accepted += 1;
            }
            a.epsilon += e.epsilon.unwrap_or(0.0);
            a.last_at = a.last_at.max(e.time);
        }
        let budget = budget_view(store, &policy, org, now)?;
        Ok(AccessReport {
            organisation: org.to_string(),
            agreement_id: policy.id().to_string(),
            purpose: policy.purpose().to_string(),
            generated_at: now.unix_timestamp(),
            policy_hash: policy.hash().to_hex(),
            state: set.state_of(&policy, now.date()),
            retention_days: policy.retention_days(),
            expires: policy.expires_on().to_string(),
            datasets,
            access: access.into_values().collect(),
            budget,
        })
    }

    /// Every agreement `org` administers, with the reload record of their
    /// files. Blocking.
    pub fn admin_status(&self, org: &str) -> Result<AdminStatus, RoomError> {
        let set = self.policies();
        let mine: Vec<_> = set
            .for_org(org)
            .filter(|p| p.allows(org, Right::Admin))
            .collect();
        if mine.is_empty() {
            return Err(RoomError::PermissionDenied {
                rule: "party.rights",
                detail: format!("{org} has the admin right in no agreement"),
            });
        }
        let now = self.clock().now();
        let mut agreements = Vec::new();
        for p in &mine {
            let mut status = agreement_status(&set, p, self.store(), now)?;
            // Another party's exact row count is its data, not the admin's.
            for d in &mut status.datasets {
                if d.owner != org {
                    d.rows = None;
                }
            }
            agreements.push(status);
        }
        let ids: Vec<String> = mine.iter().map(|p| p.id().to_string()).collect();
        Ok(AdminStatus {
            generated_at: now.unix_timestamp(),
            agreements,
            reload: reload_view(&self.reload_status(), &ids),
        })
    }

    /// `org`'s budget in agreement `id` now; None without differential
    /// privacy. Blocking.
    pub fn budget(&self, org: &str, id: &str) -> Result<Option<Budget>, RoomError> {
        let policy = self.agreement_for(org, id)?;
        Ok(budget_view(self.store(), &policy, org, self.clock().now())?)
    }

    /// A page of agreement `id`'s audit log as `org` may read it: at most
    /// `size` entries (0 for the most) after the page token `after` (empty
    /// for the first), and the token of the next page (empty at the end).
    pub async fn audit_page(
        &self,
        org: &str,
        id: &str,
        size: u32,
        after: &str,
    ) -> Result<(Vec<Entry>, String), RoomError> {
        let policy = self.agreement_for(org, id)?;
        let size = match size {
            0 => MAX_PAGE,
            n if n as usize <= MAX_PAGE => n as usize,
            _ => {
                return Err(RoomError::invalid(
                    "page_size",
                    format!("at most {MAX_PAGE}"),
                ));
            }
        };
        let after: u64 = match after {
            "" => 0,
            token => token.parse().map_err(|_| {
                RoomError::invalid(
                    "page_token",
                    "must be a next_page_token this service returned",
                )
            })?,
        };
        let log = self.audit_log().clone();
        let id = policy.id().to_string();
        let owners: std::collections::HashMap<String, String> = policy
            .datasets()
            .iter()
            .map(|d| (d.name().to_string(), d.owner().to_string()))
            .collect();
        let reader = org.to_string();
        let entries = tokio::task::spawn_blocking(move || {
            log.page_seen_by(&id, after, size, &reader, |d| {
                owners.get(d).map(String::as_str)
            })
        })
        .await
        .map_err(|e| RoomError::Internal(format!("audit read task: {e}")))??;
        let next = match entries.last() {
            Some(e) if entries.len() == size => e.seq.to_string(),
            _ => String::new(),
        };
        Ok((entries, next))
    }
}
