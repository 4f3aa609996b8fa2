//! `cleanroom secret new`, `cleanroom upload`, `cleanroom datasets`,
//! `cleanroom erase`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::ConnectArgs;
use crate::identity::{BlindingKey, Secret};
use crate::prepare::{CsvOptions, InputFormat, Keys, UploadOptions, upload};

#[derive(Debug, Subcommand)]
pub(super) enum SecretCommand {
    /// Write a new random shared secret (hex) to a file with owner-only permissions.
    New {
        /// File to create.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn secret(cmd: SecretCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SecretCommand::New { out, force } => {
            let secret = Secret::generate();
            crate::certs::write_file(
                &out,
                format!("{}\n", secret.to_hex()).as_bytes(),
                true,
                force,
            )
            .context("writing the secret")?;
            println!(
                "wrote a 32-byte secret to {} (mode 0600); share it with your partner out of band, never with the server",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What makes this party's identifiers comparable: the shared secret, or
/// its own blinding key.
pub(super) enum OwnKeys {
    Shared(Secret),
    Blinding(BlindingKey),
}

impl OwnKeys {
    fn keys(&self) -> Keys<'_> {
        match self {
            OwnKeys::Shared(s) => Keys::Shared(s),
            OwnKeys::Blinding(k) => Keys::Blinding(k),
        }
    }
}

/// Reads the blinding key from `--key-file`, or else the shared secret from
/// `--secret-file` or `CLEANROOM_SECRET` (hex).
fn load_keys(secret_file: Option<&PathBuf>, key_file: Option<&PathBuf>) -> anyhow::Result<OwnKeys> {
    match (secret_file, key_file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "give --secret-file (matching = \"keyed\") or --key-file (matching = \"ecdh\"), not both"
        ),
        (None, Some(path)) => Ok(OwnKeys::Blinding(BlindingKey::from_file(path)?)),
        (Some(path), None) => Ok(OwnKeys::Shared(Secret::from_file(path)?)),
        (None, None) => match std::env::var("CLEANROOM_SECRET") {
            Ok(hex) => Ok(OwnKeys::Shared(Secret::from_hex(&hex, "CLEANROOM_SECRET")?)),
            Err(_) => anyhow::bail!(
                "no key: pass --secret-file FILE or set CLEANROOM_SECRET (matching = \"keyed\"), or pass --key-file FILE (matching = \"ecdh\"); keys are never taken on the command line"
            ),
        },
    }
}

fn parse_mapping(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in pairs {
        let (policy, input) = pair
            .split_once('=')
            .filter(|(p, i)| !p.is_empty() && !i.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("--map {pair:?}: expected POLICY_COLUMN=INPUT_COLUMN")
            })?;
        if out.insert(policy.to_string(), input.to_string()).is_some() {
            anyhow::bail!("--map: policy column {policy:?} is mapped twice");
        }
    }
    Ok(out)
}

fn single_byte(name: &str, value: &str) -> anyhow::Result<u8> {
    let value = if value == "\\t" { "\t" } else { value };
    match value.as_bytes() {
        [b] => Ok(*b),
        _ => anyhow::bail!("{name}: must be a single character"),
    }
}

#[derive(Debug, Args)]
pub(super) struct UploadArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// Dataset name in the agreement.
    #[arg(long)]
    dataset: String,
    /// CSV (with a header row) or Parquet file.
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    reading: ReadingArgs,
    /// Upload id; reuse one to retry safely [default: random].
    #[arg(long)]
    upload_id: Option<String>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// How a partner file is read and fingerprinted, for upload and erase.
#[derive(Debug, Args)]
pub(super) struct ReadingArgs {
    /// File holding the shared secret (hex), or set CLEANROOM_SECRET
    /// (agreements with matching = "keyed").
    #[arg(long, env = "CLEANROOM_SECRET_FILE")]
    secret_file: Option<PathBuf>,
    /// File holding your own blinding key, from `cleanroom key new`
    /// (agreements with matching = "ecdh").
    #[arg(long, env = "CLEANROOM_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Input format [default: from the file name].
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// CSV field delimiter (one character; \t for tab).
    #[arg(long, default_value = ",")]
    delimiter: String,
    /// CSV quote character.
    #[arg(long, default_value = "\"")]
    quote: String,
    /// Policy column read from a differently named input column (repeatable).
    #[arg(long = "map", value_name = "POLICY_COLUMN=INPUT_COLUMN")]
    map: Vec<String>,
}

/// The resolved reading options.
struct Reading {
    keys: OwnKeys,
    format: Option<InputFormat>,
    csv: CsvOptions,
    mapping: BTreeMap<String, String>,
}

impl ReadingArgs {
    fn resolve(&self) -> anyhow::Result<Reading> {
        Ok(Reading {
            keys: load_keys(self.secret_file.as_ref(), self.key_file.as_ref())?,
            format: self.format,
            csv: CsvOptions {
                delimiter: single_byte("--delimiter", &self.delimiter)?,
                quote: single_byte("--quote", &self.quote)?,
            },
            mapping: parse_mapping(&self.map)?,
        })
    }
}

pub(super) fn run_upload(args: UploadArgs) -> anyhow::Result<ExitCode> {
    let Reading {
        keys,
        format,
        csv,
        mapping,
    } = args.reading.resolve()?;
    let options = UploadOptions {
        agreement: args.agreement,
        dataset: args.dataset,
        input: args.input,
        format,
        csv,
        mapping,
        upload_id: args.upload_id,
        progress: !args.no_progress,
    };
    let rt = super::runtime()?;
    let client = args.connect.connect(&rt)?;
    let report = rt.block_on(upload(&client, keys.keys(), &options))?;
    let s = &report.stats;
    let secs = report.elapsed.as_secs_f64();
    if !report.dropped.is_empty() {
        println!(
            "kept on this machine (not in the agreement): {}",
            report.dropped.join(", ")
        );
    }
    if report.response.already_committed {
        println!(
            "upload {} was already committed as version {} ({} rows); nothing stored again",
            report.upload_id, report.response.version, report.response.rows
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "uploaded {} of {} rows to {}/{} as version {} (upload id {})",
        s.rows_sent,
        s.rows_read,
        options.agreement,
        options.dataset,
        report.response.version,
        report.upload_id
    );
    for (column, n) in &s.invalid {
        println!("  {n} invalid {column} value(s) left out");
    }
    if s.rows_without_identifier > 0 {
        println!(
            "  {} row(s) without any valid identifier left out",
            s.rows_without_identifier
        );
    }
    println!(
        "  {} duplicate row(s) (same first identifier)",
        s.duplicates
    );
    println!(
        "  {} batches, {:.1} MiB, {:.2} s, {:.0} rows/s",
        report.batches,
        report.bytes_sent as f64 / (1 << 20) as f64,
        secs,
        s.rows_read as f64 / secs.max(1e-9)
    );
    if let OwnKeys::Blinding(key) = &keys {
        // Do this party's share of the matching now: blind what the
        // partner has uploaded, and say what this upload waits for.
        let report = rt.block_on(crate::prepare::match_pending(
            &client,
            key,
            &options.agreement,
        ))?;
        super::matching::print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(super) struct DatasetsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
}

pub(super) fn datasets(args: DatasetsArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let list = rt.block_on(client.list_datasets(&args.agreement))?;
    if list.is_empty() {
        println!("no dataset of yours is stored under {}", args.agreement);
    }
    for d in list {
        let when = d
            .committed_at
            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
            .map(|t| t.to_string())
            .unwrap_or_default();
        println!(
            "{}: {} rows, version {} (upload {}), committed {}, {} version(s) kept, {}",
            d.dataset,
            d.rows,
            d.version,
            d.upload_id,
            when,
            d.versions,
            crate::proto::dataset_state(&d)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(super) struct EraseArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// Your dataset to erase from.
    #[arg(long)]
    dataset: String,
    /// CSV or Parquet file with one or more of the dataset's identifier
    /// columns (other columns are ignored); fingerprinted on this machine.
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    reading: ReadingArgs,
}

pub(super) fn run_erase(args: EraseArgs) -> anyhow::Result<ExitCode> {
    let Reading {
        keys,
        format,
        csv,
        mapping,
    } = args.reading.resolve()?;
    let options = crate::prepare::EraseOptions {
        agreement: args.agreement,
        dataset: args.dataset,
        input: args.input,
        format,
        csv,
        mapping,
    };
    let rt = super::runtime()?;
    let client = args.connect.connect(&rt)?;
    let report = rt.block_on(crate::prepare::erase(&client, keys.keys(), &options))?;
    println!(
        "sent {} fingerprint(s) ({} invalid value(s) left out); removed {} row(s) from {}/{}, {} remain; {} older version(s) deleted",
        report.fingerprints,
        report.invalid,
        report.rows_removed,
        options.agreement,
        options.dataset,
        report.rows_kept,
        report.versions_deleted
    );
    Ok(ExitCode::SUCCESS)
}
