//! `cleanroom audit verify` and `cleanroom audit show`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::ConnectArgs;

#[derive(Debug, Subcommand)]
pub(super) enum AuditCommand {
    /// Check the whole hash chain of a server's audit log (on the server's machine).
    Verify {
        /// The server's data directory.
        #[arg(long, default_value = "cleanroom-data")]
        data_dir: PathBuf,
    },
    /// The audit entries of one of your agreements.
    Show {
        #[command(flatten)]
        connect: ConnectArgs,
        /// Agreement id.
        #[arg(long)]
        agreement: String,
    },
}

pub(super) fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { data_dir } => match crate::audit::verify(&data_dir) {
            Ok(v) => {
                println!(
                    "audit log intact: {} entries, head {}",
                    v.entries,
                    hex::encode(v.head)
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e @ crate::audit::AuditError::Missing(_)) => Err(e.into()),
            Err(e) => {
                let log = data_dir.join(crate::audit::LOG_FILE);
                Err(anyhow::Error::new(e).context(log.display().to_string()))
            }
        },
        AuditCommand::Show { connect, agreement } => {
            let rt = super::runtime()?;
            let mut client = connect.connect(&rt)?;
            let entries = rt.block_on(client.audit_entries(&agreement))?;
            if entries.is_empty() {
                println!("no audit entries for {agreement}");
            }
            for e in entries {
                let when = e
                    .time
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let mut line = format!(
                    "#{} {when} {} {} {}",
                    e.seq,
                    e.organisation,
                    e.action().word(),
                    e.decision().word()
                );
                for (label, value) in [
                    ("rule", e.rule),
                    ("subject", e.subject),
                    ("sql", e.sql_hash.map(|h| h[..12.min(h.len())].to_string())),
                    ("rows", e.rows.map(|r| r.to_string())),
                    ("suppressed", e.suppressed.map(|r| r.to_string())),
                    ("epsilon", e.epsilon.map(|r| r.to_string())),
                ] {
                    if let Some(v) = value {
                        line.push_str(&format!(" {label}={v}"));
                    }
                }
                line.push_str(&format!(
                    " policy={}",
                    &e.policy_hash[..12.min(e.policy_hash.len())]
                ));
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
