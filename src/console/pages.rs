//! The console's pages as server-side HTML (maud escapes every value it
//! splices). No script: forms and links do the work, and a chart's values
//! show in its hover titles.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::chart::{Point, Shape, svg};
use super::results::{cells, numbers};
use crate::client::QueryAnswer;
use crate::proto;

const STYLE: &str = r#"
:root { font-family: system-ui, sans-serif; color: #1b1f24; background: #fff; }
body { margin: 0 auto; max-width: 72rem; padding: 0 1rem 3rem; line-height: 1.45; }
header { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; align-items: baseline; border-bottom: 1px solid #ccd; padding: .75rem 0; }
header strong { font-size: 1.15rem; }
nav a, header a { margin-right: .9rem; white-space: nowrap; display: inline-block; }
a { color: #0b4fb3; }
a:focus, button:focus, input:focus, select:focus, textarea:focus { outline: 3px solid #f0a500; outline-offset: 2px; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border-bottom: 1px solid #dde; padding: .3rem .6rem; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
form.card, section.card { border: 1px solid #ccd; border-radius: 6px; padding: .75rem 1rem; margin: 1rem 0; }
label { display: block; font-weight: 600; margin-top: .5rem; }
.hint { color: #555; font-size: .9rem; margin: .1rem 0 .4rem; }
input, select, textarea { font: inherit; padding: .35rem; max-width: 100%; box-sizing: border-box; }
textarea { width: 100%; min-height: 7rem; font-family: ui-monospace, monospace; }
button { font: inherit; padding: .4rem 1rem; margin-top: .75rem; cursor: pointer; }
.refusal { border-left: 5px solid #b3261e; background: #fdf0ef; padding: .6rem 1rem; margin: 1rem 0; }
.refusal code { font-weight: 700; }
.ok { border-left: 5px solid #1e7b34; background: #eef8f0; padding: .6rem 1rem; }
svg.chart { width: 100%; max-width: 40rem; height: auto; }
svg.chart rect { fill: #3d6fb6; }
svg.chart .interval { stroke: #1b1f24; stroke-width: 2; fill: none; }
svg.chart .band { fill: #3d6fb6; fill-opacity: .18; stroke: none; }
svg.chart .line { stroke: #3d6fb6; stroke-width: 2.5; fill: none; }
svg.chart circle { fill: #3d6fb6; }
svg.chart text { font-size: 12px; fill: #1b1f24; }
dl { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .2rem 1rem; }
dt { font-weight: 600; }
dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
code, pre { overflow-wrap: anywhere; word-break: break-all; white-space: pre-wrap; }
p, li { overflow-wrap: anywhere; }
.scroll th, .scroll td, .scroll code { white-space: nowrap; overflow-wrap: normal; word-break: normal; }
@media (max-width: 600px) {
  body { padding: 0 .6rem 2rem; }
  dl { grid-template-columns: minmax(0, 1fr); }
  dd { margin-bottom: .4rem; }
}
"#;

/// A whole page: the organisation, the navigation of an agreement if one
/// is open, and `body`.
pub(super) fn page(title: &str, org: &str, agreement: Option<&str>, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " - Cleanroom console" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "Cleanroom" }
                    span { "signed in as " b #org { (org) } }
                    a href="/agreements" { "Agreements" }
                    a href="/admin" { "Administration" }
                }
                @if let Some(id) = agreement {
                    nav aria-label="Agreement" {
                        a href={ "/agreements/" (id) } { "Overview" }
                        a href={ "/agreements/" (id) "/datasets" } { "Datasets" }
                        a href={ "/agreements/" (id) "/overlap" } { "Overlap" }
                        a href={ "/agreements/" (id) "/budget" } { "Budget" }
                        a href={ "/agreements/" (id) "/audit" } { "Audit log" }
                        a href={ "/agreements/" (id) "/access" } { "Access report" }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

pub(super) fn agreements(list: &[proto::AgreementSummary]) -> Markup {
    html! {
        @if list.is_empty() {
            p { "Your organisation is party to no agreement on this server." }
        } @else {
            div.scroll { table {
                thead { tr { th { "Agreement" } th { "Purpose" } th { "State" } th { "Expires" } th { "Your rights" } th { "Policy" } } }
                tbody {
                    @for a in list {
                        tr {
                            td { a href={ "/agreements/" (a.id) } { (a.id) } }
                            td { (a.purpose) }
                            td { (proto::state(a.state)) }
                            td { (a.expires_on) }
                            td { (proto::rights(&a.my_rights)) }
                            td { code { (a.policy_hash.get(..12).unwrap_or(&a.policy_hash)) } }
                        }
                    }
                }
            } }
        }
    }
}

/// The agreement, and the questions the caller may ask in it.
pub(super) fn agreement(a: &proto::Agreement, sql: &str) -> Markup {
    let summary = a.summary.clone().unwrap_or_default();
    let may_sql = a
        .query
        .as_ref()
        .is_some_and(|q| q.mode() != proto::QueryMode::Templates);
    let private = a.privacy.is_some();
    html! {
        dl {
            dt { "Purpose" } dd { (summary.purpose) }
            dt { "State" } dd { (proto::state(summary.state)) }
            dt { "In force" } dd { (if summary.starts_on.is_empty() { "from signing" } else { summary.starts_on.as_str() }) " to " (summary.expires_on) }
            dt { "Policy hash" } dd { code { (summary.policy_hash) } }
            dt { "Retention" } dd { (a.retention_days) " days per upload" }
            @if let Some(q) = &a.query {
                dt { "Each output row" } dd { "stands for at least " (q.min_group_size) " people" }
            }
            @if let Some(p) = &a.privacy {
                dt { "Differential privacy" } dd { "epsilon " (p.epsilon_total) " per " (if p.refresh() == proto::BudgetRefresh::Monthly { "month" } else { "agreement" }) ", at most " (p.epsilon_per_query_max) " a query" }
            }
        }
        h2 { "Parties" }
        ul { @for p in &a.parties { li { b { (p.organisation) } ": " (proto::rights(&p.rights)) } } }
        h2 { "Datasets" }
        ul { @for d in &a.datasets { li { b { (d.name) } " (owner " (d.owner) "): " (d.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")) } } }
        h2 { "Templates" }
        @if a.templates.is_empty() { p { "No approved template you may run." } }
        @for t in &a.templates {
            form.card method="post" action={ "/agreements/" (summary.id) "/run" } {
                h3 { (t.name) }
                p.hint { (t.description) }
                input type="hidden" name="template" value=(t.name);
                @for p in &t.params {
                    @let id = format!("{}-{}", t.name, p.name);
                    label for=(id) { (p.name) }
                    p.hint id={ (id) "-hint" } { (p.r#type().word()) ": " (p.domain) }
                    input id=(id) name={ "param." (p.name) } required
                        type=(match p.r#type() { proto::ParamType::Integer => "number", proto::ParamType::Date => "date", _ => "text" })
                        aria-describedby={ (id) "-hint" };
                }
                @if private { (epsilon_field(&t.name)) }
                button type="submit" { "Run " (t.name) }
            }
        }
        @if may_sql {
            h2 { "Your own question" }
            form.card method="post" action={ "/agreements/" (summary.id) "/run" } {
                label for="sql" { "SQL" }
                p.hint id="sql-hint" { "One aggregate SELECT over the datasets, joined on identifiers; the agreement's rules decide what is answered." }
                textarea id="sql" name="sql" required aria-describedby="sql-hint" { (sql) }
                @if private { (epsilon_field("sql")) }
                button type="submit" { "Run query" }
            }
        }
    }
}

fn epsilon_field(form: &str) -> Markup {
    let id = format!("{form}-epsilon");
    html! {
        label for=(id) { "Epsilon to spend" }
        p.hint id={ (id) "-hint" } { "Leave empty for the agreement's largest per-query epsilon." }
        input id=(id) name="epsilon" type="number" step="any" min="0" aria-describedby={ (id) "-hint" };
    }
}

/// A refusal beside the question that was refused.
pub(super) fn refusal(rule: Option<&str>, message: &str, advice: Option<&str>) -> Markup {
    html! {
        div.refusal role="alert" {
            p { "Refused" @if let Some(rule) = rule { " by rule " code #rule { (rule) } } ": " (message) }
            @if let Some(advice) = advice { p { b { "What to do: " } (advice) } }
        }
    }
}

/// No answer from the server: unreachable, or the connection dropped.
pub(super) fn unreachable(detail: &str) -> Markup {
    html! {
        div.refusal role="alert" #unreachable {
            p { "The server did not answer: " (detail) }
            p { b { "What to do: " } "check that the server runs and that this machine reaches it, then reload this page. A question cut off this way may still have run on the server: the budget and audit log pages say whether it did." }
        }
    }
}

/// An answer: the privacy it carries, a chart, the table and downloads.
pub(super) fn answer(agreement: &str, id: &str, answer: &QueryAnswer) -> Markup {
    let schema = &answer.schema;
    let rows = cells(&answer.batches);
    let header = &answer.header;
    let noise = header.privacy.as_ref();
    html! {
        p.ok { (rows.len()) " row(s), each standing for at least " (header.min_group_size) " people; datasets " (header.datasets.join(", ")) "." }
        @if let Some(p) = noise {
            section.card aria-labelledby="noise" {
                h2 #noise { "Differential privacy" }
                p { "Spent epsilon " (p.epsilon) " and delta " (p.delta) "; epsilon " (p.epsilon_remaining) " left, refreshes " (proto::when(p.next_refresh.as_ref(), "never")) "." }
                p { "A group is shown only if its noisy count of people reaches " (p.threshold) "." }
                ul { @for c in &p.columns {
                    li { code { (c.aggregate) } ": 95% of the noise within ±" (format!("{:.2}", c.half_width_95)) @if c.count_scale.is_some() { " over the group's people (an average: divide by its people)" } }
                } }
            }
        }
        @if let Some(chart) = chart(answer) { figure { (PreEscaped(chart)) } }
        div.scroll { table {
            thead { tr { @for f in schema.fields() { th scope="col" { (f.name()) } } } }
            tbody { @for row in &rows { tr { @for (i, cell) in row.iter().enumerate() {
                @if schema.field(i).data_type().is_numeric() { td.n { (cell) } } @else { td { (cell) } }
            } } } }
        } }
        p {
            a href={ "/results/" (id) ".csv" } download={ (agreement) ".csv" } { "Download CSV" }
            " · "
            a href={ "/results/" (id) ".parquet" } download={ (agreement) ".parquet" } { "Download Parquet" }
        }
    }
}

/// The chart of an answer: its first numeric column by its other columns
/// (bars, or a line over a day or time column), with each value's 95%
/// interval where the noise of that column is known per value.
fn chart(answer: &QueryAnswer) -> Option<String> {
    let fields = answer.schema.fields();
    let numeric: Vec<usize> = (0..fields.len())
        .filter(|i| fields[*i].data_type().is_numeric())
        .collect();
    let labels: Vec<usize> = (0..fields.len())
        .filter(|i| !fields[*i].data_type().is_numeric())
        .collect();
    let &measure = numeric.first()?;
    let values = numbers(&answer.batches, measure)?;
    let rows = cells(&answer.batches);
    // Aggregates and numeric columns in the same order: the noise of the
    // measure, if it is a count or a sum (an average's depends on n).
    let noise = answer.header.privacy.as_ref().and_then(|p| {
        (p.columns.len() == numeric.len())
            .then(|| &p.columns[0])
            .filter(|c| c.count_scale.is_none())
            .map(|c| c.half_width_95)
    });
    let points: Vec<Point> = rows
        .iter()
        .zip(values)
        .filter_map(|(row, v)| {
            Some(Point {
                label: labels
                    .iter()
                    .map(|i| row[*i].as_str())
                    .collect::<Vec<_>>()
                    .join(" / "),
                value: v?,
                half_width: noise,
            })
        })
        .collect();
    if points.is_empty() {
        return None;
    }
    let shape = match labels.as_slice() {
        [one] if fields[*one].data_type().is_temporal() => Shape::Line,
        _ => Shape::Bars,
    };
    let measure_name = fields[measure].name();
    let title = match labels.is_empty() {
        true => measure_name.to_string(),
        false => format!(
            "{measure_name} by {}",
            labels
                .iter()
                .map(|i| fields[*i].name().as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    };
    Some(svg(&points, shape, measure_name, &title))
}

pub(super) fn datasets(agreement: &str, list: &[proto::DatasetVersion]) -> Markup {
    html! {
        @if list.is_empty() { p { "You hold no dataset in this agreement yet." } }
        @else {
            div.scroll { table {
                thead { tr { th { "Dataset" } th { "Version" } th.n { "Rows" } th { "Committed" } th { "Versions kept" } th { "Matching" } } }
                tbody { @for d in list { tr {
                    td { (d.dataset) } td { code { (d.version) } } td.n { (d.rows) }
                    td { (proto::when(d.committed_at.as_ref(), "-")) } td.n { (d.versions) }
                    td { (proto::dataset_state(d)) }
                } } }
            } }
        }
        section.card {
            h2 { "Uploads and erasures" }
            p { "Your files and secret stay on your machine: upload and erase with the command line (where the agreement matches without a shared secret, " code { "--key-file KEY" } " takes the place of " code { "--secret-file" } ")." }
            pre { code { (commands(agreement).join("\n")) } }
        }
    }
}

/// The commands that upload to and erase from a dataset of `agreement`,
/// as the datasets page shows them (a test parses them with the command
/// line's own parser).
pub(crate) fn commands(agreement: &str) -> [String; 2] {
    [
        format!(
            "cleanroom upload --agreement {agreement} --dataset NAME --input FILE --secret-file SECRET"
        ),
        format!(
            "cleanroom erase --agreement {agreement} --dataset NAME --input IDENTIFIERS --secret-file SECRET"
        ),
    ]
}

pub(super) fn overlap_form(agreement: &str, private: bool) -> Markup {
    html! {
        form.card method="post" action={ "/agreements/" (agreement) "/overlap" } {
            p { "The number of people both parties' datasets hold, at least the agreement's minimum group size." }
            @if private { p.hint { "Under differential privacy this spends budget." } (epsilon_field("overlap")) }
            button type="submit" { "Compute the overlap" }
        }
    }
}

pub(super) fn overlap(o: &proto::OverlapResponse) -> Markup {
    html! {
        dl {
            dt { "Datasets" } dd { (o.datasets.join(" and ")) }
            dt { "Matched on" } dd { (o.matched_on.join(", ")) }
            dt { "People in both" } dd #overlap { @match o.overlap { Some(n) => { (n) } None => { "fewer than " (o.min_group_size) " (not shown)" } } }
        }
        @if let Some(p) = &o.privacy {
            p { "Noised: 95% within ±" (p.columns.first().map(|c| format!("{:.2}", c.half_width_95)).unwrap_or_default()) "; epsilon " (p.epsilon) " spent, " (p.epsilon_remaining) " left." }
        }
    }
}

pub(super) fn budget(b: &proto::BudgetResponse) -> Markup {
    html! {
        @if !b.enabled { p { "This agreement has no differential privacy: no budget applies." } }
        @else {
            dl #budget {
                dt { "Window" } dd { (b.window) }
                dt { "Epsilon spent" } dd { (b.epsilon_spent) " of " (b.epsilon_total) " in " (b.queries) " quer" (if b.queries == 1 { "y" } else { "ies" }) }
                dt { "Epsilon left" } dd #left { (b.epsilon_remaining) }
                dt { "Delta" } dd { (b.delta_spent) " spent of " (b.delta_total) ", " (b.delta) " a query" }
                dt { "Per query" } dd { "epsilon " (b.epsilon_per_query_min) " to " (b.epsilon_per_query_max) }
                dt { "Next refresh" } dd { (proto::when(b.next_refresh.as_ref(), "never")) }
            }
            meter min="0" max=(b.epsilon_total) value=(b.epsilon_spent) aria-label="epsilon spent" { (b.epsilon_spent) }
        }
    }
}

/// One page of the audit log, and what the page shows of its chain: each
/// entry names the hash of the one before it in the server's log, so two
/// entries with consecutive numbers must link.
pub(super) fn audit(
    agreement: &str,
    page: &proto::ListAuditEntriesResponse,
    after: &str,
) -> Markup {
    let entries = &page.entries;
    let pairs: Vec<_> = entries
        .windows(2)
        .filter(|w| w[1].seq == w[0].seq + 1)
        .collect();
    let linked = pairs.iter().filter(|w| w[1].prev == w[0].hash).count();
    html! {
        p #chain {
            @if pairs.is_empty() { "No consecutive entries on this page to check." }
            @else if linked == pairs.len() { "Chain: every one of the " (pairs.len()) " consecutive pairs on this page links." }
            @else { b { "Chain broken: " } (pairs.len() - linked) " of " (pairs.len()) " consecutive pairs on this page do not link; tell the operator." }
            " The whole log is verified on the server with " code { "cleanroom audit verify" } "."
        }
        div.scroll { table {
            thead { tr { th { "#" } th { "Time" } th { "Organisation" } th { "Action" } th { "Decision" } th { "Rule" } th { "Subject" } th.n { "Rows" } th.n { "Epsilon" } } }
            tbody { @for e in entries { tr {
                td.n { (e.seq) } td { (proto::when(e.time.as_ref(), "-")) } td { (e.organisation) }
                td { (e.action().word()) } td { (e.decision().word()) }
                td { (e.rule.clone().unwrap_or_default()) } td { (e.subject.clone().unwrap_or_default()) }
                td.n { (e.rows.map(|r| r.to_string()).unwrap_or_default()) }
                td.n { (e.epsilon.map(|x| x.to_string()).unwrap_or_default()) }
            } } }
        } }
        p {
            @if !after.is_empty() { a href={ "/agreements/" (agreement) "/audit" } { "First page" } " " }
            @if !page.next_page_token.is_empty() { a href={ "/agreements/" (agreement) "/audit?after=" (page.next_page_token) } { "Next page" } }
        }
    }
}

pub(super) fn access(r: &proto::AccessReportResponse) -> Markup {
    html! {
        dl {
            dt { "Purpose" } dd { (r.purpose) }
            dt { "State" } dd { (r.state().word()) }
            dt { "Generated" } dd { (proto::when(r.generated_at.as_ref(), "-")) }
            dt { "Retention" } dd { (r.retention_days) " days per upload; everything is deleted after " (r.expires) }
        }
        h2 { "Data held of you" }
        @for d in &r.datasets {
            h3 { (d.dataset) }
            p.hint { (d.columns.join(", ")) }
            div.scroll { table {
                thead { tr { th { "Version" } th.n { "Rows" } th { "Uploaded" } th { "By" } th { "Deleted by" } } }
                tbody { @for v in &d.versions { tr {
                    td { code { (v.version) } @if v.current { " (current)" } } td.n { (v.rows) }
                    td { (proto::when(v.uploaded_at.as_ref(), "-")) } td { (v.uploaded_by) } td { (proto::when(v.delete_by.as_ref(), "-")) }
                } } }
            } }
        }
        h2 { "Use of the agreement" }
        div.scroll { table {
            thead { tr { th { "Organisation" } th { "Action" } th.n { "Accepted" } th.n { "Refused" } th.n { "Epsilon" } th { "Last" } } }
            tbody { @for a in &r.access { tr {
                td { (a.organisation) } td { (a.action().word()) } td.n { (a.accepted) } td.n { (a.rejected) } td.n { (a.epsilon) }
                td { (proto::when(a.last_at.as_ref(), "-")) }
            } } }
        } }
    }
}

/// The agreements the caller administers: state, data and budgets, and
/// the policy folder's last re-read.
pub(super) fn admin(s: &proto::AdminStatusResponse) -> Markup {
    html! {
        p { "As of " (proto::when(s.generated_at.as_ref(), "-")) "." }
        @for a in &s.agreements {
            section.card {
                h2 { a href={ "/agreements/" (a.agreement_id) } { (a.agreement_id) } }
                dl {
                    dt { "State" } dd { (a.state().word()) }
                    dt { "Policy hash" } dd { code { (a.policy_hash) } }
                    dt { "Data key" } dd { (if a.data_key { "present" } else { "none" }) }
                }
                div.scroll { table {
                    thead { tr { th { "Dataset" } th { "Owner" } th { "Version" } th.n { "Rows" } th.n { "Versions" } th { "Uploaded" } th { "Needs" } } }
                    tbody { @for d in &a.datasets { tr {
                        td { (d.dataset) } td { (d.owner) } td { code { (d.current_version) } }
                        td.n { (d.rows.map(|r| r.to_string()).unwrap_or_else(|| "another party's".into())) }
                        td.n { (d.versions) } td { (proto::when(d.uploaded_at.as_ref(), "-")) }
                        td { (if d.damaged { "a new upload (damaged)" } else if d.needs_upload { "a new upload (settings changed)" } else { "" }) }
                    } } }
                } }
                @if !a.budgets.is_empty() {
                    div.scroll { table {
                        thead { tr { th { "Organisation" } th { "Window" } th.n { "Epsilon spent" } th.n { "of" } th.n { "Queries" } } }
                        tbody { @for b in &a.budgets { tr {
                            td { (b.organisation) } td { (b.window) } td.n { (b.epsilon_spent) } td.n { (b.epsilon_total) } td.n { (b.queries) }
                        } } }
                    } }
                }
            }
        }
        @if let Some(r) = &s.reload {
            h2 { "Policy files" }
            p { (r.reloads) " re-read(s), " (r.failures) " with refused files; last " (proto::when(r.last_at.as_ref(), "none since start")) "." }
            @if !r.last_errors.is_empty() { ul { @for e in &r.last_errors { li { code { (e) } } } } }
        }
    }
}

pub(super) fn unauthorised() -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Cleanroom console" } }
            body { h1 { "Not signed in" } p { "Open the address " code { "cleanroom console" } " printed, with its token, to use this console." } }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_view_hides_another_partys_rows_and_escapes_names() {
        let status = proto::AdminStatusResponse {
            generated_at: Some(proto::timestamp(1_796_083_200)),
            agreements: vec![proto::AgreementStatus {
                agreement_id: "retail".into(),
                state: proto::AgreementState::Active as i32,
                policy_hash: "ab".into(),
                datasets: vec![
                    proto::DatasetStatus {
                        dataset: "customers".into(),
                        owner: "acme".into(),
                        current_version: "v1".into(),
                        rows: Some(1_234),
                        versions: 1,
                        ..Default::default()
                    },
                    proto::DatasetStatus {
                        dataset: "<i>audience</i>".into(),
                        owner: "globex".into(),
                        current_version: "v2".into(),
                        rows: None,
                        versions: 2,
                        damaged: true,
                        ..Default::default()
                    },
                ],
                budgets: vec![],
                data_key: true,
            }],
            reload: None,
        };
        let html = admin(&status).into_string();
        assert!(html.contains("1234"), "{html}");
        assert!(
            html.contains("another party&#39;s") || html.contains("another party's"),
            "{html}"
        );
        assert!(html.contains("&lt;i&gt;audience&lt;/i&gt;"), "{html}");
        assert!(!html.contains("<i>"), "{html}");
        assert!(html.contains("a new upload (damaged)"), "{html}");
        assert!(html.contains("2026-12-01T00:00:00Z"), "{html}");
    }
}
