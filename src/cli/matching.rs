//! `cleanroom key new` and `cleanroom match`: matching without a shared
//! secret (`matching = "ecdh"`, docs/matching.md).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::ConnectArgs;
use crate::identity::BlindingKey;
use crate::prepare::MatchReport;
use crate::proto;

#[derive(Debug, Subcommand)]
pub(super) enum KeyCommand {
    /// Write a new random blinding key (hex) to a file with owner-only
    /// permissions. It never leaves this machine: not for the server, not
    /// for the partner.
    New {
        /// File to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file. Upload again with the new key; the
        /// server sees the change and your partner runs `cleanroom match`
        /// once more.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn key(cmd: KeyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeyCommand::New { out, force } => {
            let key = BlindingKey::generate();
            crate::certs::write_file(&out, format!("{}\n", key.to_hex()).as_bytes(), true, force)
                .context("writing the blinding key")?;
            println!(
                "wrote a blinding key to {} (mode 0600); keep it on this machine, share it with no one",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(super) struct MatchArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// File holding your blinding key, from `cleanroom key new`.
    #[arg(long, env = "CLEANROOM_KEY_FILE")]
    key_file: PathBuf,
}

/// Does the blinding the caller owes its partner, then says what is left.
pub(super) fn run(args: MatchArgs) -> anyhow::Result<ExitCode> {
    let key = BlindingKey::from_file(&args.key_file)?;
    let rt = super::runtime()?;
    let client = args.connect.connect(&rt)?;
    let report = rt.block_on(crate::prepare::match_pending(
        &client,
        &key,
        &args.agreement,
    ))?;
    print_report(&report);
    Ok(ExitCode::SUCCESS)
}

pub(super) fn print_report(report: &MatchReport) {
    if report.done.is_empty() {
        println!("nothing of your partner's is waiting for your blinding");
    }
    for d in &report.done {
        println!(
            "blinded {} point(s) of {}'s dataset {} (version {})",
            d.points, d.owner, d.dataset, d.version
        );
    }
    for d in &report.own {
        println!("your dataset {}: {}", d.dataset, proto::dataset_state(d));
    }
}
