//! Commands that talk to a server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::client::{Client, ClientConfig};
use crate::proto;

/// How to reach the server; every client command takes these.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server address.
    #[arg(
        long,
        env = "CLEANROOM_SERVER",
        default_value = "https://127.0.0.1:50051"
    )]
    pub server: String,
    /// CA certificate that signed the server's certificate.
    #[arg(
        long,
        env = "CLEANROOM_CA",
        default_value = "cleanroom-data/certs/ca.pem"
    )]
    pub ca: PathBuf,
    /// Client certificate naming your organisation.
    #[arg(long, env = "CLEANROOM_CERT")]
    pub cert: Option<PathBuf>,
    /// Private key of the client certificate.
    #[arg(long, env = "CLEANROOM_KEY")]
    pub key: Option<PathBuf>,
}

impl ConnectArgs {
    pub fn config(&self) -> anyhow::Result<ClientConfig> {
        let config = ClientConfig::new(self.server.clone(), self.ca.clone());
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(config.with_identity(cert, key)),
            (None, None) => Err(super::Usage(
                "no client certificate: pass --cert and --key, or set CLEANROOM_CERT and CLEANROOM_KEY",
            )
            .into()),
            _ => Err(super::Usage("--cert and --key go together").into()),
        }
    }

    pub(super) fn connect(&self, rt: &tokio::runtime::Runtime) -> anyhow::Result<Client> {
        let config = self.config()?;
        Ok(rt.block_on(Client::connect(&config))?)
    }
}

#[derive(Debug, Args)]
pub(super) struct WhoamiArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub(super) struct AgreementsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(subcommand)]
    command: Option<AgreementsCommand>,
}

#[derive(Debug, Subcommand)]
enum AgreementsCommand {
    /// Show one agreement as you may see it.
    Show { id: String },
}

pub(super) fn whoami(args: WhoamiArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let me = rt.block_on(client.who_am_i())?;
    println!(
        "{} (party to {} agreement(s))",
        me.organisation, me.agreement_count
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn agreements(args: AgreementsArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    match args.command {
        None => {
            let list = rt.block_on(client.list_agreements())?;
            if list.is_empty() {
                println!("you are a party to no agreement");
            }
            for a in list {
                println!(
                    "{}  {}  expires {}  rights: {}\n    {}",
                    a.id,
                    proto::state(a.state),
                    a.expires_on,
                    proto::rights(&a.my_rights),
                    a.purpose
                );
            }
        }
        Some(AgreementsCommand::Show { id }) => {
            let a = rt.block_on(client.get_agreement(&id))?;
            print!("{}", render_agreement(&a));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn column_line(c: &proto::Column) -> String {
    let role = proto::ColumnRole::try_from(c.role).unwrap_or(proto::ColumnRole::Unspecified);
    match role {
        proto::ColumnRole::Identifier => format!("{}: identifier ({})", c.name, c.identity_kind),
        proto::ColumnRole::Dimension if !c.allowed_values.is_empty() => {
            format!(
                "{}: dimension, one of {}",
                c.name,
                c.allowed_values.join(" | ")
            )
        }
        proto::ColumnRole::Dimension => format!(
            "{}: dimension, at most {} values",
            c.name,
            c.max_cardinality.unwrap_or_default()
        ),
        proto::ColumnRole::Metric => {
            let bound = |x: Option<f64>| {
                let x = x.unwrap_or_default();
                match proto::ValueType::try_from(c.value_type) {
                    // Julian day 2,440,588 is 1970-01-01.
                    Ok(proto::ValueType::Date) => time::Date::from_julian_day(2_440_588 + x as i32)
                        .map(crate::policy::format_date)
                        .unwrap_or_else(|_| x.to_string()),
                    Ok(proto::ValueType::Timestamp) => {
                        time::OffsetDateTime::from_unix_timestamp_nanos(x as i128 * 1_000)
                            .ok()
                            .and_then(|t| {
                                t.format(&time::format_description::well_known::Rfc3339)
                                    .ok()
                            })
                            .unwrap_or_else(|| x.to_string())
                    }
                    _ => x.to_string(),
                }
            };
            format!(
                "{}: metric in [{}, {}]{}",
                c.name,
                bound(c.min),
                bound(c.max),
                if c.compare { ", comparable" } else { "" }
            )
        }
        proto::ColumnRole::Sensitive => format!("{}: sensitive (never uploaded)", c.name),
        proto::ColumnRole::Unspecified => format!("{}: unknown role", c.name),
    }
}

/// A readable page for one agreement.
pub fn render_agreement(a: &proto::Agreement) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(s) = &a.summary {
        let _ = writeln!(out, "agreement {} ({})", s.id, proto::state(s.state));
        let _ = writeln!(out, "  purpose:   {}", s.purpose);
        let _ = writeln!(
            out,
            "  in force:  {} to {}",
            if s.starts_on.is_empty() {
                "signature"
            } else {
                &s.starts_on
            },
            s.expires_on
        );
        let _ = writeln!(out, "  policy:    {}", s.policy_hash);
        let _ = writeln!(out, "  my rights: {}", proto::rights(&s.my_rights));
    }
    let _ = writeln!(out, "  retention: {} days", a.retention_days);
    let _ = writeln!(out, "parties:");
    for p in &a.parties {
        let _ = writeln!(out, "  {}: {}", p.organisation, proto::rights(&p.rights));
    }
    let _ = writeln!(out, "identity kinds:");
    for k in &a.identity_kinds {
        let mut extra = String::new();
        if k.gmail_canonical {
            extra.push_str(", gmail canonical");
        }
        if !k.default_country.is_empty() {
            let _ = write!(extra, ", default country {}", k.default_country);
        }
        let _ = writeln!(out, "  {}: {} profile{}", k.name, k.profile().word(), extra);
    }
    for d in &a.datasets {
        let _ = writeln!(out, "dataset {} (owner {}):", d.name, d.owner);
        for c in &d.columns {
            let _ = writeln!(out, "  {}", column_line(c));
        }
    }
    if let Some(q) = &a.query {
        let _ = writeln!(
            out,
            "queries: aggregates {}; at least {} people per output row",
            q.aggregates()
                .map(|a| a.word())
                .collect::<Vec<_>>()
                .join(", "),
            q.min_group_size
        );
    }
    if let Some(p) = &a.privacy {
        let _ = writeln!(
            out,
            "differential privacy: epsilon {} and delta {} per {} (epsilon {} to {} a query, delta {} each); a person counts in at most {} group(s) and {} row(s) per group",
            p.epsilon_total,
            p.delta_total,
            if p.refresh() == proto::BudgetRefresh::Monthly {
                "month"
            } else {
                "agreement"
            },
            p.epsilon_per_query_min,
            p.epsilon_per_query_max,
            p.delta,
            p.max_groups_per_person,
            p.max_rows_per_person
        );
    }
    out
}

#[derive(Debug, Args)]
pub(super) struct OverlapArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// The two datasets to match (comma-separated); optional when the agreement has two.
    #[arg(long, value_delimiter = ',')]
    datasets: Vec<String>,
    /// Privacy budget to spend (agreements with differential privacy);
    /// defaults to the agreement's largest per-query epsilon.
    #[arg(long)]
    epsilon: Option<f64>,
}

pub(super) fn overlap(args: OverlapArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let r =
        rt.block_on(client.overlap_with_epsilon(&args.agreement, &args.datasets, args.epsilon))?;
    print!("{}", render_overlap(&r));
    if let Some(p) = &r.privacy {
        eprint!("{}", render_privacy(p, r.min_group_size));
    }
    Ok(ExitCode::SUCCESS)
}

/// An overlap answer as a sentence.
pub fn render_overlap(r: &crate::proto::OverlapResponse) -> String {
    let pair = r.datasets.join(" and ");
    let noisy = if r.privacy.is_some() { "about " } else { "" };
    match r.overlap {
        Some(n) => format!(
            "{noisy}{n} people are in both {pair} (matched on {})\n",
            r.matched_on.join(" or ")
        ),
        None => format!(
            "too few people are in both {pair} to show: the count is held back by the agreement's minimum group size of {}\n",
            r.min_group_size
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Args)]
pub(super) struct QueryArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// The aggregate query; tables are the agreement's dataset names.
    /// `-` reads it from standard input.
    #[arg(
        long,
        required_unless_present = "sql_file",
        conflicts_with = "sql_file"
    )]
    sql: Option<String>,
    /// Read the query from this file (`-`: standard input).
    #[arg(long)]
    sql_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Privacy budget to spend (agreements with differential privacy);
    /// defaults to the agreement's largest per-query epsilon.
    #[arg(long)]
    epsilon: Option<f64>,
}

pub(super) fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let answer =
        rt.block_on(client.query_with_epsilon(&args.agreement, &sql_text(&args)?, args.epsilon))?;
    print_answer(&answer, args.format)
}

#[derive(Debug, Args)]
pub(super) struct TemplatesArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
}

/// Lists the approved templates the caller may run, with their parameters.
pub(super) fn templates(args: TemplatesArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let a = rt.block_on(client.get_agreement(&args.agreement))?;
    print!("{}", render_templates(&a));
    Ok(ExitCode::SUCCESS)
}

/// The templates of an agreement as the caller sees them.
pub fn render_templates(a: &crate::proto::Agreement) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if a.templates.is_empty() {
        out.push_str("no template you may run in this agreement\n");
    }
    for t in &a.templates {
        let _ = writeln!(out, "{}\n    {}", t.name, t.description);
        for p in &t.params {
            let _ = writeln!(
                out,
                "    --param {}=...   {} ({})",
                p.name,
                p.domain,
                p.r#type().word()
            );
        }
    }
    out
}

#[derive(Debug, Args)]
pub(super) struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
    /// The template's name (`cleanroom templates` lists them).
    template: String,
    /// A parameter value, NAME=VALUE; repeat for each parameter.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Privacy budget to spend (agreements with differential privacy).
    #[arg(long)]
    epsilon: Option<f64>,
}

/// Runs one approved template.
pub(super) fn run_template(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut params = std::collections::BTreeMap::new();
    for pair in &args.params {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--param: expected NAME=VALUE"))?;
        if params
            .insert(name.trim().to_string(), value.to_string())
            .is_some()
        {
            anyhow::bail!("--param {}: given twice", name.trim());
        }
    }
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let answer =
        rt.block_on(client.run_template(&args.agreement, &args.template, &params, args.epsilon))?;
    print_answer(&answer, args.format)
}

/// The query's text: `--sql`, or the file `--sql-file` names, with `-`
/// standing for standard input in either.
fn sql_text(args: &QueryArgs) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::Read;
    let from_stdin = || -> anyhow::Result<String> {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the query from standard input")?;
        Ok(text)
    };
    match (&args.sql, &args.sql_file) {
        (Some(sql), _) if sql == "-" => from_stdin(),
        (Some(sql), _) => Ok(sql.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => from_stdin(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the query from {}", path.display())),
        (None, None) => Err(super::Usage("give the query with --sql or --sql-file").into()),
    }
}

fn print_answer(
    answer: &crate::client::QueryAnswer,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    print!("{}", render_answer(answer, format)?);
    let rows: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
    if rows == 0 {
        eprintln!(
            "no rows: {}",
            match answer.header.privacy {
                Some(_) =>
                    "every group either matched nothing or fell under the noisy threshold, and groups under it are never shown",
                None =>
                    "every group either matched nothing or stood for fewer people than the agreement's minimum, and such groups are never shown",
            }
        );
    }
    if !answer.summary.template.is_empty() {
        eprintln!(
            "template {} (parameter values hash {})",
            answer.summary.template,
            &answer.summary.params_hash[..12.min(answer.summary.params_hash.len())]
        );
    }
    if let Some(p) = &answer.header.privacy {
        eprint!("{}", render_privacy(p, answer.header.min_group_size));
    } else {
        eprintln!(
            "every row stands for at least {} people; groups under that minimum are never shown, nor counted",
            answer.header.min_group_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The noise an answer carries, for the analyst.
pub fn render_privacy(p: &crate::proto::PrivacyReport, min_group_size: u32) -> String {
    let values: f64 = p.columns.iter().map(|c| c.epsilon).sum();
    let threshold_epsilon = (p.epsilon - values).max(0.0);
    let margin = p.threshold.saturating_sub(u64::from(min_group_size));
    let mut out = format!(
        "differential privacy ({}):\n  spent epsilon {} and delta {}: epsilon {} on the threshold below, {} on the values; epsilon {} left, budget refreshes {}\n  a group is shown only if its noisy count of people reaches {}: the agreement's minimum of {} plus {} for noise of scale {}, so that a smaller group shows with probability at most delta\n  a person counts in at most {} group(s), {} row(s) each\n",
        p.mechanism().word(),
        number(p.epsilon),
        number(p.delta),
        number(threshold_epsilon),
        number(values),
        number(p.epsilon_remaining),
        proto::when(p.next_refresh.as_ref(), "never"),
        p.threshold,
        min_group_size,
        margin,
        number(p.threshold_scale),
        p.max_groups_per_person,
        p.max_rows_per_person
    );
    for c in &p.columns {
        out.push_str(&format!(
            "  {}: epsilon {}, ",
            c.aggregate,
            number(c.epsilon)
        ));
        match c.count_scale {
            // An average: the noise on its sum spread over the group's
            // people, widest in the smallest group the threshold shows.
            Some(_) => out.push_str(&format!(
                "95% within about +/-{} in a group of {} people, +/-{}/n in a group of n\n",
                number(c.half_width_95 / p.threshold.max(1) as f64),
                p.threshold,
                number(c.half_width_95)
            )),
            None => out.push_str(&format!(
                "noise scale {}, 95% within +/-{}\n",
                number(c.scale),
                number(c.half_width_95)
            )),
        }
    }
    out
}

/// A number as every privacy line spells it: no exponent, no trailing
/// zeros; whole from 100 up, two decimals from 1, four from 0.001, and
/// exact to 1e-12 below (a delta).
fn number(x: f64) -> String {
    let places = match x.abs() {
        a if a >= 100.0 => 0,
        a if a >= 1.0 => 2,
        a if a >= 0.001 => 4,
        _ => 12,
    };
    let scale = 10f64.powi(places);
    format!("{}", (x * scale).round() / scale)
}

#[derive(Debug, Args)]
pub(super) struct BudgetArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Agreement id.
    #[arg(long)]
    agreement: String,
}

pub(super) fn budget(args: BudgetArgs) -> anyhow::Result<ExitCode> {
    let rt = super::runtime()?;
    let mut client = args.connect.connect(&rt)?;
    let b = rt.block_on(client.budget(&args.agreement))?;
    print!("{}", render_budget(&args.agreement, &b));
    Ok(ExitCode::SUCCESS)
}

/// A privacy budget as text.
pub fn render_budget(agreement: &str, b: &crate::proto::BudgetResponse) -> String {
    if !b.enabled {
        return format!("agreement {agreement} has no differential privacy: no budget applies\n");
    }
    format!(
        "agreement {agreement}, window {}\n  spent     epsilon {} and delta {} in {} quer{}\n  remaining epsilon {} of {}, delta {} of {}\n  per query epsilon {} to {}, delta {}\n  refreshes {}\n",
        b.window,
        b.epsilon_spent,
        b.delta_spent,
        b.queries,
        if b.queries == 1 { "y" } else { "ies" },
        b.epsilon_remaining,
        b.epsilon_total,
        b.delta_remaining,
        b.delta_total,
        b.epsilon_per_query_min,
        b.epsilon_per_query_max,
        b.delta,
        proto::when(b.next_refresh.as_ref(), "never")
    )
}

/// A query answer as a text table, CSV or JSON lines.
pub fn render_answer(
    answer: &crate::client::QueryAnswer,
    format: OutputFormat,
) -> anyhow::Result<String> {
    Ok(match format {
        OutputFormat::Table => {
            format!(
                "{}\n",
                arrow::util::pretty::pretty_format_batches(&answer.batches)?
            )
        }
        OutputFormat::Csv => {
            let mut out = Vec::new();
            {
                let mut w = arrow::csv::Writer::new(&mut out);
                for b in &answer.batches {
                    w.write(b)?;
                }
            }
            String::from_utf8(out)?
        }
        OutputFormat::Json => {
            // One JSON array of row objects: `[]` when no row is released.
            let mut out = Vec::new();
            {
                let mut w = arrow::json::ArrayWriter::new(&mut out);
                for b in &answer.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            out.push(b'\n');
            String::from_utf8(out)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_privacy_report_explains_itself_in_the_querys_words() {
        let column = |name: &str, epsilon: f64, scale: f64, count: Option<f64>, half: f64| {
            crate::proto::ColumnNoise {
                aggregate: name.into(),
                epsilon,
                scale,
                count_scale: count,
                half_width_95: half,
            }
        };
        let report = crate::proto::PrivacyReport {
            mechanism: crate::proto::NoiseMechanism::DiscreteLaplace as i32,
            epsilon: 1.0,
            delta: 1e-7,
            threshold: 114,
            threshold_scale: 4.0,
            max_groups_per_person: 1,
            max_rows_per_person: 1,
            columns: vec![
                column("customers", 0.25, 4.0, None, 12.0),
                column("ltv", 0.5, 10_000.0, Some(4.0), 29_956.0),
            ],
            epsilon_remaining: 8.0,
            next_refresh: Some(crate::proto::timestamp(1_798_761_600)),
        };
        let text = render_privacy(&report, 50);
        for expected in [
            "spent epsilon 1 and delta 0.0000001: epsilon 0.25 on the threshold below, 0.75 on the values; epsilon 8 left",
            "reaches 114: the agreement's minimum of 50 plus 64 for noise of scale 4, so that",
            "  customers: epsilon 0.25, noise scale 4, 95% within +/-12\n",
            "  ltv: epsilon 0.5, 95% within about +/-263 in a group of 114 people, +/-29956/n in a group of n\n",
        ] {
            assert!(text.contains(expected), "{expected}\nnot in\n{text}");
        }
        assert!(
            !text.contains("Int64") && !text.contains("0.5000"),
            "{text}"
        );
    }
}
