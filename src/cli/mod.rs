//! The `cleanroom` command line. `main.rs` only calls [`main`].

mod audit;
mod connect;
mod console;
mod governance;
mod local;
mod matching;
mod serve;
mod upload;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use connect::{
    ConnectArgs, OutputFormat, render_agreement, render_answer, render_budget, render_overlap,
    render_privacy, render_templates,
};
pub use governance::{render_report, render_status};

#[derive(Debug, Parser)]
#[command(name = "cleanroom", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("CLEANROOM_COMMIT"), ")"), about = "A self-hosted data clean room", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Run an execution worker of the server's distributed engine, in the
    /// operator's trust domain (the server lists it under [cluster]).
    Worker(worker::WorkerArgs),
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
    /// A web console on this machine for your agreements: templates and
    /// queries with charts, datasets, budget, audit log and access report.
    Console(console::ConsoleArgs),
    /// Show the organisation your client certificate names.
    Whoami(connect::WhoamiArgs),
    /// List your agreements, or show one.
    Agreements(connect::AgreementsArgs),
    /// Print shell completions to standard output, e.g.
    /// `cleanroom completions bash > /etc/bash_completion.d/cleanroom`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output, e.g.
    /// `cleanroom man > cleanroom.1 && man ./cleanroom.1`.
    Man,
}

/// Parses the command line, runs the command and turns its outcome into an
/// exit status. Errors are printed with their context chain.
/// One example for each command's `--help` (and the manual page), by
/// the command's path; a test runs each through the parser.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "serve",
        "cleanroom serve --config /etc/cleanroom/config.toml --log-format json",
    ),
    (
        "worker",
        "cleanroom worker --name w1 --listen 0.0.0.0:50061 --certs-dir cleanroom-data/certs",
    ),
    ("policy", "cleanroom policy check policies/"),
    ("policy check", "cleanroom policy check policies/"),
    ("policy salt", "cleanroom policy salt"),
    ("certs", "cleanroom certs issue --org acme"),
    (
        "certs init",
        "cleanroom certs init --dir cleanroom-data/certs --san cleanroom.example.com",
    ),
    (
        "certs issue",
        "cleanroom certs issue --dir cleanroom-data/certs --org acme",
    ),
    ("secret", "cleanroom secret new --out shared.secret"),
    ("secret new", "cleanroom secret new --out shared.secret"),
    ("key", "cleanroom key new --out acme.key"),
    ("key new", "cleanroom key new --out acme.key"),
    (
        "match",
        "cleanroom match --agreement retail-media-ecdh --key-file acme.key",
    ),
    (
        "upload",
        "cleanroom upload --agreement retail-media-demo --dataset customers --input customers.csv --secret-file shared.secret",
    ),
    (
        "datasets",
        "cleanroom datasets --agreement retail-media-demo",
    ),
    (
        "erase",
        "cleanroom erase --agreement retail-media-demo --dataset customers --input withdrawn.csv --secret-file shared.secret",
    ),
    (
        "synth",
        "cleanroom synth --rows 20000 --overlap 0.3 --out synth",
    ),
    ("overlap", "cleanroom overlap --agreement retail-media-demo"),
    (
        "query",
        "cleanroom query --agreement retail-media-demo --epsilon 0.5 --sql-file question.sql --format csv",
    ),
    (
        "templates",
        "cleanroom templates --agreement retail-media-demo",
    ),
    (
        "run",
        "cleanroom run --agreement retail-media-demo lift_by_region --param min_exposures=1",
    ),
    ("budget", "cleanroom budget --agreement retail-media-demo"),
    ("report", "cleanroom report --agreement retail-media-demo"),
    ("admin", "cleanroom admin status"),
    ("admin status", "cleanroom admin status"),
    (
        "admin recover",
        "cleanroom admin recover --data-dir cleanroom-data",
    ),
    (
        "admin trust-clock",
        "cleanroom admin trust-clock --data-dir cleanroom-data",
    ),
    ("audit", "cleanroom audit verify --data-dir cleanroom-data"),
    (
        "audit verify",
        "cleanroom audit verify --data-dir cleanroom-data",
    ),
    (
        "audit show",
        "cleanroom audit show --agreement retail-media-demo",
    ),
    (
        "console",
        "cleanroom console --cert cleanroom-data/certs/acme.pem --key cleanroom-data/certs/acme-key.pem --listen 127.0.0.1:8787",
    ),
    (
        "whoami",
        "cleanroom whoami --server https://cleanroom.example.com:50051",
    ),
    ("agreements", "cleanroom agreements"),
    (
        "agreements show",
        "cleanroom agreements show retail-media-demo",
    ),
    (
        "completions",
        "cleanroom completions bash > /etc/bash_completion.d/cleanroom",
    ),
    ("man", "cleanroom man > cleanroom.1"),
];

/// The command line's definition, each command's help ending in its
/// example.
fn command() -> clap::Command {
    use clap::CommandFactory;
    fn with_examples(cmd: clap::Command, path: &str) -> clap::Command {
        let example = EXAMPLES.iter().find(|(p, _)| *p == path).map(|(_, e)| *e);
        let mut cmd = match example {
            Some(e) => cmd.after_help(format!("Example:\n  {e}")),
            None => cmd,
        };
        let names: Vec<String> = cmd
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        for name in names {
            let sub_path = match path {
                "" => name.clone(),
                _ => format!("{path} {name}"),
            };
            cmd = cmd.mut_subcommand(&name, |c| with_examples(c, &sub_path));
        }
        cmd
    }
    with_examples(Cli::command(), "")
}

pub fn main() -> ExitCode {
    use clap::FromArgMatches;
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => worker::run(args),
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
        Command::Console(args) => console::run(args),
        Command::Whoami(args) => connect::whoami(args),
        Command::Agreements(args) => connect::agreements(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "cleanroom", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}{}", what_to_do(&e));
            ExitCode::from(exit_code(&e) as u8)
        }
    }
}

#[cfg(test)]
mod exit_tests {
    use super::Exit;
    use tonic::Code;

    #[test]
    fn every_status_code_has_its_kind() {
        let cases = [
            (Code::PermissionDenied, Exit::Refused),
            (Code::InvalidArgument, Exit::Refused),
            (Code::FailedPrecondition, Exit::Refused),
            (Code::NotFound, Exit::NotFound),
            (Code::Unavailable, Exit::RetryLater),
            (Code::Aborted, Exit::RetryLater),
            (Code::ResourceExhausted, Exit::RetryLater),
            (Code::Unauthenticated, Exit::Authentication),
            (Code::DataLoss, Exit::Server),
            (Code::Internal, Exit::Server),
        ];
        for (code, exit) in cases {
            assert_eq!(Exit::of_status(code), exit, "{code:?}");
        }
    }
}

/// What a failed command's exit status says, so scripts can tell "fix the
/// request" from "try again later" (docs/cli.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Anything not below, including faults of this program.
    Other = 1,
    /// The command line is wrong (clap's own code).
    Usage = 2,
    /// A local file (input, certificate, key, secret) is missing or malformed.
    Input = 3,
    /// The server refused the request: the policy forbids it, or the
    /// request or its SQL is malformed, or the agreement is not in force.
    Refused = 4,
    /// The agreement or what it names does not exist for this caller.
    NotFound = 5,
    /// Try again later: the server is unreachable, stopping, busy, out of
    /// budget until the next window, or its storage is full; or the
    /// dataset changed while an upload ran.
    RetryLater = 6,
    /// The caller's certificate was not accepted.
    Authentication = 7,
    /// The server failed (an internal error, or damaged stored data).
    Server = 8,
}

impl Exit {
    fn of_status(code: tonic::Code) -> Exit {
        use tonic::Code;
        match code {
            Code::InvalidArgument
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unimplemented => Exit::Refused,
            Code::NotFound => Exit::NotFound,
            Code::Unavailable
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
            | Code::Cancelled => Exit::RetryLater,
            Code::Unauthenticated => Exit::Authentication,
            Code::Internal | Code::DataLoss | Code::Unknown => Exit::Server,
            Code::Ok => Exit::Other,
        }
    }

    fn of_client(e: &crate::client::ClientError) -> Exit {
        use crate::client::ClientError;
        match e {
            ClientError::Status(s) => Exit::of_status(s.code()),
            ClientError::Io { .. } => Exit::Input,
            ClientError::BadServer(_) => Exit::Usage,
            ClientError::Certificate(_) => Exit::Authentication,
            ClientError::Connect { detail, .. } => {
                let d = detail.to_ascii_lowercase();
                if d.contains("certificate")
                    || d.contains("decrypterror")
                    || d.contains("handshake")
                {
                    Exit::Authentication
                } else {
                    Exit::RetryLater
                }
            }
        }
    }
}

/// A command line that cannot work as given, found after parsing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(pub(crate) &'static str);

/// The exit status for `e`: the first error in its chain that says.
fn exit_code(e: &anyhow::Error) -> Exit {
    use crate::prepare::{PrepareError, UploadError};
    for cause in e.chain() {
        if cause.downcast_ref::<Usage>().is_some() {
            return Exit::Usage;
        }
        if let Some(c) = cause.downcast_ref::<crate::client::ClientError>() {
            return Exit::of_client(c);
        }
        if let Some(u) = cause.downcast_ref::<UploadError>() {
            return match u {
                UploadError::Server(c) => Exit::of_client(c),
                UploadError::Prepare(_) => Exit::Input,
            };
        }
        if let Some(a) = cause.downcast_ref::<crate::audit::AuditError>() {
            use crate::audit::AuditError;
            return match a {
                AuditError::Missing(_) | AuditError::Io { .. } => Exit::Input,
                AuditError::Broken { .. } | AuditError::Head(_) => Exit::Server,
            };
        }
        if cause.downcast_ref::<PrepareError>().is_some()
            || cause.downcast_ref::<std::io::Error>().is_some()
        {
            return Exit::Input;
        }
    }
    Exit::Other
}

/// "; what to do: ..." for a refusal whose rule the server named, in the
/// same line as the refusal.
fn what_to_do(e: &anyhow::Error) -> String {
    use tonic_types::StatusExt;
    let status = e.chain().find_map(|cause| {
        if let Some(c) = cause.downcast_ref::<crate::client::ClientError>() {
            return c.status();
        }
        match cause.downcast_ref::<crate::prepare::UploadError>() {
            Some(crate::prepare::UploadError::Server(c)) => c.status(),
            _ => None,
        }
    });
    status
        .and_then(|s| s.get_error_details().error_info().map(|i| i.reason.clone()))
        .and_then(|rule| crate::rules::advice(&rule))
        .map(|advice| format!("; what to do: {advice}"))
        .unwrap_or_default()
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
        command().debug_assert();
    }

    /// The commands the web console shows for uploads and erasures are
    /// ones this command line accepts.
    #[test]
    fn the_consoles_commands_parse() {
        for line in crate::console::commands("retail-media-demo") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let Err(e) = Cli::try_parse_from(&words) {
                panic!("{line}: {e}");
            }
        }
    }

    /// Every command a user can run has an example in its help, and the
    /// example is a command line the parser accepts.
    #[test]
    fn every_command_has_an_example_that_parses() {
        fn leaves(cmd: &clap::Command, path: &str, out: &mut Vec<(String, bool)>) {
            for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
                let p = match path {
                    "" => sub.get_name().to_string(),
                    _ => format!("{path} {}", sub.get_name()),
                };
                out.push((p.clone(), sub.get_after_help().is_some()));
                leaves(sub, &p, out);
            }
        }
        let mut all = Vec::new();
        leaves(&command(), "", &mut all);
        assert!(all.len() >= 25, "{all:?}");
        let missing: Vec<&String> = all.iter().filter(|(_, has)| !has).map(|(p, _)| p).collect();
        assert!(
            missing.is_empty(),
            "commands without an example: {missing:?}"
        );
        for (path, example) in EXAMPLES {
            assert!(
                all.iter().any(|(p, _)| p == path),
                "{path} is not a command"
            );
            let argv: Vec<&str> = example
                .split(" > ")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            assert_eq!(argv[0], "cleanroom");
            let matches = command()
                .try_get_matches_from(&argv)
                .unwrap_or_else(|e| panic!("{example}: {e}"));
            let mut found = Vec::new();
            let mut m = &matches;
            while let Some((name, sub)) = m.subcommand() {
                found.push(name);
                m = sub;
            }
            let found = found.join(" ");
            assert!(
                found == *path || found.starts_with(&format!("{path} ")),
                "{example} runs {found}, not {path}"
            );
        }
    }
}
