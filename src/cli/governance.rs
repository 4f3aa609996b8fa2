//! `cleanroom report` and `cleanroom admin status`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::ConnectArgs;
use crate::proto;

#[derive(Debug, Args)]
pub(super) struct ReportArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
}

pub(super) fn report(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let report = rt.block_on(client.access_report(&args.agreement))?;
    print!("{}", render_report(&report));
    Ok(ExitCode::SUCCESS)
}

fn when(t: &Option<prost_types::Timestamp>) -> String {
    proto::when(t.as_ref(), "never")
}

/// An access report as text for a data protection officer.
pub fn render_report(r: &proto::AccessReportResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Access report for {} in agreement {}\ngenerated {}\npurpose: {}\nstate: {}; policy {}\nretention: {} days per upload; everything is deleted after {}",
        r.organisation,
        r.agreement_id,
        when(&r.generated_at),
        r.purpose,
        r.state().word(),
        r.policy_hash,
        r.retention_days,
        r.expires
    );
    let _ = writeln!(out, "\nData held");
    if r.datasets.iter().all(|d| d.versions.is_empty()) {
        let _ = writeln!(out, "  nothing");
    }
    for d in &r.datasets {
        let _ = writeln!(
            out,
            "  dataset {}: columns {}",
            d.dataset,
            d.columns.join(", ")
        );
        for v in &d.versions {
            let _ = writeln!(
                out,
                "    version {}{}: {} rows, uploaded {} by {}, deleted by {}",
                v.version,
                if v.current { " (current)" } else { "" },
                v.rows,
                when(&v.uploaded_at),
                v.uploaded_by,
                when(&v.delete_by)
            );
        }
    }
    let _ = writeln!(out, "\nUse of the agreement (from the audit log)");
    if r.access.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for a in &r.access {
        let _ = write!(
            out,
            "  {} {}: {} accepted, {} refused, last {}",
            a.organisation,
            a.action().word(),
            a.accepted,
            a.rejected,
            when(&a.last_at)
        );
        if a.epsilon > 0.0 {
            let _ = write!(out, ", epsilon {}", a.epsilon);
        }
        out.push('\n');
    }
    if let Some(b) = &r.budget {
        let _ = writeln!(
            out,
            "\nPrivacy budget\n  window {}: spent epsilon {} in {} queries, {} of {} remains; refreshes {}",
            b.window,
            b.epsilon_spent,
            b.queries,
            b.epsilon_remaining,
            b.epsilon_total,
            proto::when(b.next_refresh.as_ref(), "never")
        );
    }
    out
}

#[derive(Debug, Subcommand)]
pub(super) enum AdminCommand {
    /// Agreements you administer: state, data, budgets, last policy reload.
    /// With --data-dir, read a stopped server's data directory instead.
    Status {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Read this data directory directly (the server must be stopped:
        /// the metadata store admits one process at a time).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Policy folder, with --data-dir.
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// The server's master key file, with --data-dir, if it is not
        /// DATA_DIR/master.key. Nothing is created or changed.
        #[arg(long)]
        master_key: Option<PathBuf>,
    },
    /// Starts a data directory again after its metadata database was lost
    /// or damaged and no backup exists: the old metadata and dataset files
    /// are moved to DATA_DIR/quarantine/, and every privacy budget charge
    /// the audit log records is kept. The parties upload again. The server
    /// must be stopped.
    Recover {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Policy folder (for each agreement's budget windows).
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// The server's master key file, if it is not DATA_DIR/master.key.
        #[arg(long)]
        master_key: Option<PathBuf>,
    },
    /// Confirms that this machine's clock is right after the server paused
    /// deletion for a clock jump: retention and expiry act on it from the
    /// next start. The server must be stopped.
    TrustClock {
        /// The server's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The server's master key file, if it is not DATA_DIR/master.key.
        #[arg(long)]
        master_key: Option<PathBuf>,
    },
}

pub(super) fn admin(cmd: AdminCommand) -> anyhow::Result<ExitCode> {
    let (connect, data_dir, policies, master_key) = match cmd {
        AdminCommand::Status {
            connect,
            data_dir,
            policies,
            master_key,
        } => (connect, data_dir, policies, master_key),
        AdminCommand::Recover {
            data_dir,
            policies,
            master_key,
        } => return recover(&data_dir, &policies, master_key.as_deref()),
        AdminCommand::TrustClock {
            data_dir,
            master_key,
        } => return trust_clock(&data_dir, master_key.as_deref()),
    };
    let status = match data_dir {
        Some(dir) => local_status(&dir, &policies, master_key.as_deref())?,
        None => {
            let rt = super::runtime()?;
            let mut client = connect.connect(&rt)?;
            rt.block_on(client.admin_status())?
        }
    };
    print!("{}", render_status(&status));
    Ok(ExitCode::SUCCESS)
}

fn trust_clock(
    data_dir: &std::path::Path,
    master_key: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let store = crate::storage::Store::open_existing(data_dir, master_key).with_context(|| {
        format!(
            "opening {} (is the server still running? stop it first)",
            data_dir.display()
        )
    })?;
    let before = store.time_seen()?;
    let now = time::OffsetDateTime::now_utc();
    let show = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| t.to_string())
    };
    // Audited for every agreement the log knows, before the clock moves.
    let mut agreements = std::collections::BTreeSet::new();
    crate::audit::each_entry(data_dir, |e| {
        agreements.insert(e.agreement.clone());
    })?;
    let log = crate::audit::AuditLog::open(data_dir)?;
    for agreement in agreements {
        log.append(
            crate::audit::Event {
                org: crate::room::OPERATOR.into(),
                agreement,
                action: "retention",
                accepted: true,
                rule: Some("clock.jump".into()),
                subject: Some(format!(
                    "operator confirmed the clock: deletion acts on it again (latest time seen {} -> {})",
                    before.map(show).unwrap_or_else(|| "none".into()),
                    show(now.unix_timestamp())
                )),
                ..Default::default()
            },
            now.unix_timestamp(),
        )?;
    }
    store.see_time(now.unix_timestamp(), true)?;
    println!(
        "latest time seen: {} -> {}\nretention and expiry act on this clock from the next start",
        before.map(show).unwrap_or_else(|| "none".into()),
        show(now.unix_timestamp())
    );
    Ok(ExitCode::SUCCESS)
}

fn recover(
    data_dir: &std::path::Path,
    policies: &std::path::Path,
    master_key: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let set = crate::agreements::load_dir(policies).map_err(|errors| {
        anyhow::anyhow!(
            "{}: the policies must load to know each budget's windows:\n{}",
            policies.display(),
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let done = crate::storage::recover(data_dir, master_key, &set).with_context(|| {
        format!(
            "recovering {} (is the server still running? stop it first)",
            data_dir.display()
        )
    })?;
    println!(
        "set aside {} file(s) in {}\nkept {} privacy budget charge(s) from the audit log\nthe parties upload their datasets again; the server can start",
        done.files,
        done.quarantine.display(),
        done.charges
    );
    Ok(ExitCode::SUCCESS)
}

/// The admin view of every agreement, from a stopped server's files.
fn local_status(
    data_dir: &std::path::Path,
    policies: &std::path::Path,
    master_key: Option<&std::path::Path>,
) -> anyhow::Result<proto::AdminStatusResponse> {
    let (set, errors) = match crate::agreements::load_dir(policies) {
        Ok(set) => (set, Vec::new()),
        Err(errors) => (
            crate::policy::PolicySet::default(),
            errors
                .iter()
                .flat_map(|e| e.to_string().lines().map(String::from).collect::<Vec<_>>())
                .collect(),
        ),
    };
    if !data_dir.join("meta.redb").exists() {
        anyhow::bail!(
            "{}: not a cleanroom data directory (no meta.redb)",
            data_dir.display()
        );
    }
    let store = crate::storage::Store::open_existing(data_dir, master_key).with_context(|| {
        format!(
            "opening {} (is the server still running? stop it, or ask it with cleanroom admin status and an admin certificate; a master key kept elsewhere is given with --master-key)",
            data_dir.display()
        )
    })?;
    let now = time::OffsetDateTime::now_utc();
    let mut agreements = Vec::new();
    for p in set.iter() {
        agreements.push(crate::room::governance::agreement_status(&set, p, &store, now)?.into());
    }
    Ok(proto::AdminStatusResponse {
        generated_at: Some(proto::timestamp(now.unix_timestamp())),
        agreements,
        reload: Some(proto::PolicyReloadStatus {
            last_errors: errors,
            ..proto::PolicyReloadStatus::default()
        }),
    })
}

/// The admin view as text.
pub fn render_status(s: &proto::AdminStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "status at {}", when(&s.generated_at));
    for a in &s.agreements {
        let _ = writeln!(
            out,
            "agreement {}: {}; policy {}; data key {}",
            a.agreement_id,
            a.state().word(),
            &a.policy_hash[..12.min(a.policy_hash.len())],
            if a.data_key { "present" } else { "none" }
        );
        for d in &a.datasets {
            if d.current_version.is_empty() {
                let _ = writeln!(out, "  dataset {} (owner {}): no data", d.dataset, d.owner);
            } else {
                let rows = match d.rows {
                    Some(n) => format!("{n} rows"),
                    None => "rows not shown to other parties".to_string(),
                };
                let _ = writeln!(
                    out,
                    "  dataset {} (owner {}): {rows} in {}, uploaded {}; {} version(s) held{}",
                    d.dataset,
                    d.owner,
                    d.current_version,
                    when(&d.uploaded_at),
                    d.versions,
                    if d.damaged {
                        "; DAMAGED: its owner must upload it again"
                    } else if d.needs_upload {
                        "; NEEDS A NEW UPLOAD: made under identity settings the policy no longer has"
                    } else {
                        ""
                    }
                );
            }
        }
        for b in &a.budgets {
            let _ = writeln!(
                out,
                "  budget {} window {}: epsilon {} of {} in {} queries",
                b.organisation, b.window, b.epsilon_spent, b.epsilon_total, b.queries
            );
        }
    }
    if let Some(r) = &s.reload {
        match &r.last_at {
            Some(_) => {
                let _ = writeln!(
                    out,
                    "policy reloads: {} ({} with refused files), last {}",
                    r.reloads,
                    r.failures,
                    when(&r.last_at)
                );
            }
            None => {
                let _ = writeln!(out, "policy reloads: none since start");
            }
        }
        if r.last_errors.is_empty() {
            let _ = writeln!(out, "policies: all files valid");
        } else {
            let _ = writeln!(
                out,
                "policy files refused (the last good policy stays in force):"
            );
            for e in &r.last_errors {
                let _ = writeln!(out, "  {e}");
            }
        }
    }
    out
}
