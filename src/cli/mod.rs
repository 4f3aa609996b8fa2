//! The `cleanroom` command line. `main.rs` only calls [`main`].

mod audit;
mod connect;
mod governance;
mod local;
mod matching;
mod serve;
mod upload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use connect::{
    ConnectArgs, OutputFormat, render_agreement, render_answer, render_budget, render_overlap,
    render_privacy, render_templates,
};
pub use governance::{render_report, render_status};

#[derive(Debug, Parser)]
#[command(name = "cleanroom", version, about = "A self-hosted data clean room", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Check and create policy files.
    #[command(subcommand)]
    Policy(local::PolicyCommand),
    /// Create development certificates for mutual TLS.
    #[command(subcommand)]
    Certs(local::CertsCommand),
    /// Create the shared secret partners fingerprint with.
    #[command(subcommand)]
    Secret(upload::SecretCommand),
    /// Create your own blinding key, for agreements that match without a
    /// shared secret (matching = "ecdh").
    #[command(subcommand)]
    Key(matching::KeyCommand),
    /// Blind your partner's relayed points with your key (matching =
    /// "ecdh"), and see what your own datasets wait for.
    Match(matching::MatchArgs),
    /// Fingerprint a file on this machine and upload what the agreement allows.
    Upload(upload::UploadArgs),
    /// Show what the server holds of your datasets.
    Datasets(upload::DatasetsArgs),
    /// Remove people from your dataset (erasure, opt-out): their
    /// identifiers are fingerprinted here and only fingerprints are sent.
    Erase(upload::EraseArgs),
    /// Generate synthetic partner files for the demo agreement.
    Synth(local::SynthArgs),
    /// How many people two datasets of an agreement share.
    Overlap(connect::OverlapArgs),
    /// Run governed aggregate SQL.
    Query(connect::QueryArgs),
    /// List the approved query templates you may run in an agreement.
    Templates(connect::TemplatesArgs),
    /// Run an approved query template with its parameters.
    Run(connect::RunArgs),
    /// Show your privacy budget in an agreement: spent, remaining, next refresh.
    Budget(connect::BudgetArgs),
    /// What the service holds of your data in an agreement, who used the
    /// agreement and how often, and your budget use.
    Report(governance::ReportArgs),
    /// Administration: agreements you administer, or a stopped server's data directory.
    #[command(subcommand)]
    Admin(governance::AdminCommand),
    /// Check the audit chain, or read your agreements' audit entries.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Show the organisation your client certificate names.
    Whoami(connect::WhoamiArgs),
    /// List your agreements, or show one.
    Agreements(connect::AgreementsArgs),
}

/// Parses the command line, runs the command and turns its outcome into an
/// exit status. Errors are printed with their context chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Policy(cmd) => local::policy(cmd),
        Command::Certs(cmd) => local::certs(cmd),
        Command::Secret(cmd) => upload::secret(cmd),
        Command::Key(cmd) => matching::key(cmd),
        Command::Match(args) => matching::run(args),
        Command::Upload(args) => upload::run_upload(args),
        Command::Erase(args) => upload::run_erase(args),
        Command::Datasets(args) => upload::datasets(args),
        Command::Synth(args) => local::synth(args),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Overlap(args) => connect::overlap(args),
        Command::Query(args) => connect::query(args),
        Command::Templates(args) => connect::templates(args),
        Command::Run(args) => connect::run_template(args),
        Command::Budget(args) => connect::budget(args),
        Command::Report(args) => governance::report(args),
        Command::Admin(cmd) => governance::admin(cmd),
        Command::Whoami(args) => connect::whoami(args),
        Command::Agreements(args) => connect::agreements(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A Tokio runtime for one command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
