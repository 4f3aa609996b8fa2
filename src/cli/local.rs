//! Commands that work on local files: policy checks and certificates.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::agreements::load_paths;
use crate::policy::PolicySet;

#[derive(Debug, Subcommand)]
pub(super) enum PolicyCommand {
    /// Validate policy files or folders (default: ./policies).
    Check {
        /// Files or folders of `*.toml` policies.
        paths: Vec<PathBuf>,
    },
    /// Print a fresh random salt for `agreement.salt`.
    Salt,
}

#[derive(Debug, Subcommand)]
pub(super) enum CertsCommand {
    /// Create a development CA and a server certificate.
    Init {
        /// Folder for ca.pem, ca-key.pem, server.pem and server-key.pem.
        #[arg(long, default_value = "cleanroom-data/certs")]
        dir: PathBuf,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for an organisation.
    Issue {
        /// Folder holding the CA; NAME.pem and NAME-key.pem are written there.
        #[arg(long, default_value = "cleanroom-data/certs")]
        dir: PathBuf,
        /// Organisation name, as in the policies' `party.org`.
        #[arg(long, required_unless_present = "worker", conflicts_with = "worker")]
        org: Option<String>,
        /// Issue a certificate of the worker role for worker NAME instead
        /// (worker-NAME.pem): the server's and its workers' identity toward
        /// each other, which no partner certificate has.
        #[arg(long, value_name = "NAME")]
        worker: Option<String>,
        /// Extra DNS name or IP address for a worker's certificate (repeatable).
        #[arg(long = "san", requires = "worker")]
        sans: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

pub(super) fn policy(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { paths } => {
            let paths = if paths.is_empty() {
                vec![PathBuf::from("policies")]
            } else {
                paths
            };
            match load_paths(&paths) {
                Ok(set) => {
                    print_summaries(&set);
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    let problems: usize = errors.iter().map(|e| e.problems.len()).sum();
                    eprintln!(
                        "{problems} problem(s) in {} file(s); nothing was accepted",
                        errors.len()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        PolicyCommand::Salt => {
            let mut salt = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
                .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
            println!("{}", hex::encode(salt));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_summaries(set: &PolicySet) {
    let today = time::OffsetDateTime::now_utc().date();
    if set.is_empty() {
        println!("no policy files found");
    }
    for p in set.iter() {
        let parties: Vec<&str> = p.parties().iter().map(|q| q.org()).collect();
        println!(
            "ok {}: {} parties ({}), {} datasets, min group {}, {}, expires {} ({}), hash {}",
            p.id(),
            parties.len(),
            parties.join(", "),
            p.datasets().len(),
            p.query().min_group_size(),
            match p.privacy() {
                Some(dp) => format!("dp epsilon {}", dp.epsilon_total()),
                None => "no dp".to_string(),
            },
            p.expires_on(),
            p.state_on(today).as_str(),
            p.hash().short(),
        );
    }
}

pub(super) fn certs(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCommand::Init { dir, sans, force } => {
            let files =
                crate::certs::init(&dir, &sans, force).context("creating the development CA")?;
            println!("CA certificate:     {}", files.ca_cert.display());
            println!("CA key (0600):      {}", files.ca_key.display());
            println!("server certificate: {}", files.server_cert.display());
            println!("server key (0600):  {}", files.server_key.display());
        }
        CertsCommand::Issue {
            dir,
            org,
            worker,
            sans,
            force,
        } => match (org, worker) {
            (_, Some(name)) => {
                let files = crate::certs::issue_worker(&dir, &name, &sans, force)
                    .with_context(|| format!("issuing a worker certificate for {name}"))?;
                println!("worker certificate: {}", files.cert.display());
                println!("worker key (0600):  {}", files.key.display());
            }
            (Some(org), None) => {
                let files = crate::certs::issue_client(&dir, &org, force)
                    .with_context(|| format!("issuing a client certificate for {org}"))?;
                println!("client certificate: {}", files.cert.display());
                println!("client key (0600):  {}", files.key.display());
            }
            (None, None) => anyhow::bail!("--org or --worker: one is required"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub(super) struct SynthArgs {
    /// Agreement whose parties to generate (only retail-media-demo is known).
    #[arg(long, default_value = crate::synth::DEMO_AGREEMENT)]
    agreement: String,
    /// Rows per party.
    #[arg(long, default_value_t = 100_000)]
    rows: u64,
    /// Share of acme's customers also in globex's audience (0 to 1).
    #[arg(long, default_value_t = 0.3)]
    overlap: f64,
    /// Random seed; the same seed gives the same files.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output folder.
    #[arg(long, default_value = "synth")]
    out: PathBuf,
}

pub(super) fn synth(args: SynthArgs) -> anyhow::Result<ExitCode> {
    if args.agreement != crate::synth::DEMO_AGREEMENT {
        anyhow::bail!(
            "synth generates the parties of {} only, not {:?}",
            crate::synth::DEMO_AGREEMENT,
            args.agreement
        );
    }
    if !(0.0..=1.0).contains(&args.overlap) {
        anyhow::bail!("--overlap: must be between 0 and 1");
    }
    let truth = crate::synth::generate(&crate::synth::SynthOptions {
        rows: args.rows,
        overlap: args.overlap,
        seed: args.seed,
        out: args.out.clone(),
    })
    .with_context(|| format!("writing synthetic files to {}", args.out.display()))?;
    println!(
        "wrote {} and {} ({} rows each, {} people in both) and truth.json to {}",
        crate::synth::ACME_FILE,
        crate::synth::GLOBEX_FILE,
        truth.acme_rows,
        truth.overlap,
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
