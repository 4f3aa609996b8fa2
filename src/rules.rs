//! Every rule a refusal can name, with one sentence of advice each: what
//! the caller does next. The server sends the rule as the reason of a
//! `google.rpc.ErrorInfo`; the command line prints the advice beside the
//! refusal; `docs/rules.md` is this table, checked by a test.

/// A rule and what to do when a request breaks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub name: &'static str,
    pub advice: &'static str,
}

const fn rule(name: &'static str, advice: &'static str) -> Rule {
    Rule { name, advice }
}

/// The rules, grouped by what they govern.
pub const RULES: &[Rule] = &[
    // Who may call, and on what.
    rule(
        "auth.certificate",
        "Connect with a client certificate from the server's CA that names your organisation; the operator issues one with `cleanroom certs issue --org NAME`.",
    ),
    rule(
        "agreement.party",
        "Check the agreement id with `cleanroom agreements`: an agreement you are not a party of is reported as not found.",
    ),
    rule(
        "agreement.dates",
        "The agreement is pending or expired; `cleanroom agreements show ID` gives its dates, and only its admins can change them.",
    ),
    rule(
        "agreement.matching",
        "This agreement matches keyed fingerprints, so there is nothing to blind: upload with `cleanroom upload` instead.",
    ),
    rule(
        "party.rights",
        "Your organisation lacks the right this needs; `cleanroom agreements show ID` lists your rights, and the agreement's admins grant others.",
    ),
    rule(
        "policy.hash",
        "The agreement's policy changed since your client read it: run the command again, which reads the current policy.",
    ),
    rule(
        "policy.invalid",
        "A policy file failed its check when it changed and the last good version stays in force: run `cleanroom policy check` on it and fix the fields it names.",
    ),
    // Requests.
    rule(
        "request.agreement_id",
        "Name an agreement: `--agreement ID`, or the x-cleanroom-agreement header over Flight SQL.",
    ),
    rule(
        "request.x-cleanroom-agreement",
        "Over Flight SQL, name the agreement in the x-cleanroom-agreement call header.",
    ),
    rule(
        "request.x-cleanroom-epsilon",
        "Over Flight SQL, give x-cleanroom-epsilon as a positive number, or leave the header out.",
    ),
    rule(
        "request.ticket",
        "Over Flight SQL, fetch results with the ticket GetFlightInfo returned, unchanged.",
    ),
    rule(
        "flight.unsupported",
        "Over Flight SQL, send governed SELECT statements (prepared or not) and read the catalogue calls; everything else is refused.",
    ),
    rule(
        "request.datasets",
        "Name datasets the agreement has, each once; `cleanroom agreements show ID` lists them.",
    ),
    rule(
        "request.epsilon",
        "Give epsilon as a positive number within the agreement's per-query range, or leave it out to use the agreement's default.",
    ),
    rule(
        "request.job_id",
        "Run `cleanroom match` again: the blinding job it answered is no longer current.",
    ),
    rule(
        "request.key_id",
        "Blind with your current key (`cleanroom key new` made it) and run `cleanroom match` again.",
    ),
    rule(
        "request.page_size",
        "Ask for between 1 and the server's page limit of entries per page.",
    ),
    rule(
        "request.page_token",
        "Pass back the page token the previous page returned, unchanged.",
    ),
    rule(
        "request.params",
        "Give each template parameter as NAME=VALUE, once; `cleanroom templates` lists them.",
    ),
    rule(
        "request.points",
        "Send the points `cleanroom match` computed, unchanged and in the order received.",
    ),
    rule(
        "request.sql",
        "Give the SQL text: `--sql`, `--sql-file PATH`, or `--sql-file -` to read it from standard input.",
    ),
    rule(
        "request.dataset",
        "Name a dataset of the agreement that your organisation owns; `cleanroom datasets` lists them.",
    ),
    rule(
        "request.header",
        "Upload with `cleanroom upload` or the Rust client: an upload stream starts with exactly one header.",
    ),
    rule(
        "request.upload_id",
        "Upload with `cleanroom upload`, which names each upload with 1 to 64 letters, digits, '-' and '_'.",
    ),
    rule(
        "request.commit",
        "The upload ended without its commit and nothing was stored: upload again.",
    ),
    rule(
        "request.batch",
        "The upload stream broke or sent a malformed batch and nothing was stored: upload again.",
    ),
    rule("request.sets", "Name at least one identifier to erase."),
    rule(
        "request.sets.kind",
        "Send erasure fingerprints under an identity kind the dataset has; `cleanroom erase` does this for you.",
    ),
    rule(
        "request.sets.fingerprints",
        "Send fingerprints as `cleanroom erase` makes them: 32 bytes each.",
    ),
    rule(
        "request.template",
        "Name a template: `cleanroom templates --agreement ID` lists those you may run.",
    ),
    // Datasets and their versions.
    rule(
        "dataset.uploaded",
        "The dataset has no upload yet: its owner runs `cleanroom upload`, then ask again.",
    ),
    rule(
        "dataset.blinding",
        "Your partner has not yet blinded this dataset's current upload: they run `cleanroom match`; ask again after.",
    ),
    rule(
        "dataset.changed",
        "Another upload or erasure committed first and nothing of yours was stored: send it again.",
    ),
    rule(
        "dataset.reupload",
        "The agreement's identity settings changed since this dataset was made: its owner uploads it again.",
    ),
    rule(
        "dataset.damaged",
        "The stored version is damaged and the operator has been told: its owner uploads the dataset again.",
    ),
    rule(
        "blinding.job",
        "A newer version of the dataset arrived since this job was issued: run `cleanroom match` again.",
    ),
    rule(
        "blinding.key",
        "Blind with the key your current upload was made with, or upload again with this key.",
    ),
    // Uploads.
    rule(
        "upload.schema",
        "Make the file's columns match the dataset in the policy (`cleanroom agreements show ID` lists them); rename with `--map` or set `--delimiter`.",
    ),
    rule(
        "upload.empty",
        "The upload held no rows: check the input file and its delimiter.",
    ),
    rule(
        "upload.identifier_required",
        "Every row needs at least one identifier: fill it in or leave those rows out.",
    ),
    rule(
        "upload.max_rows",
        "Split the file, or ask the operator to raise `max_upload_rows`.",
    ),
    rule(
        "upload.max_bytes",
        "Split the file, or ask the operator to raise `max_upload_bytes`.",
    ),
    rule(
        "upload.batch",
        "Upload with `cleanroom upload` or the Rust client: a batch of the stream did not decode as the dataset's Arrow schema.",
    ),
    rule(
        "upload.idle",
        "The upload stalled; check the connection and upload again (the operator sets `upload_idle_timeout_seconds`).",
    ),
    rule(
        "upload.duration",
        "The upload ran past the server's limit; split the file or ask the operator to raise `upload_max_seconds`.",
    ),
    rule(
        "identifier.repeats",
        "Too many rows share one identifier: remove duplicate rows, or ask the operator about `max_rows_per_identifier`.",
    ),
    rule(
        "identifier.plaintext",
        "An identifier column holds something other than fingerprints: upload with `cleanroom upload`, which fingerprints on your machine.",
    ),
    rule(
        "dimension.values",
        "A dimension holds a value the policy does not list: map it to a listed value or leave those rows out.",
    ),
    rule(
        "dimension.plaintext",
        "A dimension holds values that look like identifiers: upload only the values the policy lists.",
    ),
    rule(
        "dimension.max_cardinality",
        "A dimension has more distinct values than the policy allows: bucket it into fewer values.",
    ),
    rule(
        "metric.bounds",
        "A metric lies outside the bounds the policy declares: clip those values or leave the rows out.",
    ),
    rule(
        "column.sensitive",
        "The policy marks this column sensitive, barred from upload and analysis: leave it out.",
    ),
    // The shape of a governed query.
    rule("sql.syntax", "Fix the SQL at the line and column given."),
    rule(
        "sql.columns",
        "Use a column the query's datasets have (`cleanroom agreements show ID` lists them); the error names the nearest one when there is one.",
    ),
    rule(
        "sql.plan",
        "Check the query's names and types: it parsed but could not be planned.",
    ),
    rule(
        "sql.limits",
        "Shorten the query: it passes the server's limits on length, tokens or nesting.",
    ),
    rule(
        "sql.placeholder",
        "Write values into the SQL, or run an approved template with `cleanroom run`, which takes parameters.",
    ),
    rule("query.statement", "Only SELECT queries run."),
    rule(
        "query.tables",
        "Read only the agreement's datasets; `cleanroom agreements show ID` lists them.",
    ),
    rule(
        "query.aggregate",
        "Select only aggregates (COUNT, SUM, AVG as the agreement allows) and the columns you GROUP BY.",
    ),
    rule(
        "query.aggregates",
        "Use an aggregate function the agreement allows; `cleanroom agreements show ID` lists them.",
    ),
    rule(
        "query.aggregate_argument",
        "Aggregate a metric the agreement allows that function on, or COUNT(DISTINCT) an identifier.",
    ),
    rule(
        "query.group_by",
        "Group by dimensions, or by buckets of metrics the agreement lets you bucket.",
    ),
    rule(
        "query.filter",
        "Filter (WHERE) on dimensions, and on metrics only where the agreement allows it.",
    ),
    rule(
        "query.expression",
        "Use only the expressions docs/queries.md lists beneath the aggregate (CASE, comparisons, arithmetic, COALESCE, date functions).",
    ),
    rule(
        "query.functions",
        "Use only the functions docs/queries.md lists.",
    ),
    rule(
        "query.cast",
        "Write the literal in the column's own type, or compare with a value that converts exactly.",
    ),
    rule(
        "query.compare",
        "Combine two parties' columns only in the pairs the policy lists (`query.column_pairs`).",
    ),
    rule(
        "query.join",
        "Join on identifiers of one kind, as an inner join or a LEFT JOIN that keeps your own dataset; under thresholds alone at most one LEFT JOIN, and under differential privacy at most one that reaches the partner's data, with one of its datasets on the right.",
    ),
    rule("query.alias", "Give each dataset its own alias."),
    rule(
        "query.subquery",
        "Write the question as one SELECT over the datasets, without subqueries or WITH.",
    ),
    rule("query.union", "Ask each part as a query of its own."),
    rule(
        "query.window",
        "Aggregate with GROUP BY: window functions are not allowed.",
    ),
    rule(
        "query.distinct",
        "Use COUNT(DISTINCT ...) inside the aggregate instead of SELECT DISTINCT.",
    ),
    rule(
        "query.order",
        "Put ORDER BY and LIMIT on the aggregated result's columns only.",
    ),
    rule(
        "query.shape",
        "Rewrite the query as one SELECT ... GROUP BY over the datasets; this construct is not supported.",
    ),
    rule(
        "query.output",
        "Guard expressions over the aggregates, for example with NULLIF(COUNT(*), 0) as a divisor.",
    ),
    rule(
        "query.mode",
        "This agreement answers approved templates only: `cleanroom templates` lists them and `cleanroom run` runs one.",
    ),
    rule(
        "template.unknown",
        "Run a template you may run; `cleanroom templates --agreement ID` lists them, and the error names the nearest one.",
    ),
    rule(
        "template.param",
        "Give every parameter of the template once, within its domain; `cleanroom templates` shows each domain.",
    ),
    // Differential privacy.
    rule(
        "privacy.budget",
        "The budget for this window is spent: wait for the refresh the error names, or ask with a smaller epsilon (`cleanroom budget` shows what is left).",
    ),
    rule(
        "privacy.epsilon",
        "Give an epsilon within the agreement's per-query range; `cleanroom budget` shows it.",
    ),
    rule(
        "privacy.delta",
        "Give a delta strictly between 0 and 1, within the agreement's per-query limit.",
    ),
    rule(
        "privacy.noise",
        "Ask with a larger epsilon, or about a metric with narrower bounds: the noise would drown the answer.",
    ),
    rule(
        "privacy.count_distinct",
        "Under differential privacy COUNT(DISTINCT ...) counts people: give it an identifier column.",
    ),
    rule(
        "privacy.parties",
        "Under differential privacy ask about one partner's data per query.",
    ),
    rule(
        "privacy.disabled",
        "This agreement has no differential privacy: leave `--epsilon` out.",
    ),
    rule(
        "privacy.input",
        "The server could not add up the query's partial results; tell the operator the time of the query.",
    ),
    // The server's limits and state.
    rule(
        "query.timeout",
        "Ask a narrower question, or ask the operator about `query_timeout_seconds`.",
    ),
    rule(
        "query.memory",
        "Ask about fewer groups or columns, or ask the operator about `max_query_memory_bytes`.",
    ),
    rule(
        "query.concurrency",
        "Wait for your other queries to finish, then ask again.",
    ),
    rule(
        "server.stopping",
        "The server is restarting: send the request again in a moment.",
    ),
    rule(
        "storage.unavailable",
        "The server's storage is full or read-only and nothing was changed: try again later; the operator has been told.",
    ),
    rule(
        "storage.damaged",
        "Stored data the request needs is damaged and the operator has been told; try again after they restore it.",
    ),
    rule(
        "clock.jump",
        "Deletion paused because the clock moved further than allowed: check the clock, then `cleanroom admin trust-clock`.",
    ),
    rule(
        "internal",
        "The server failed; tell the operator the time of the request.",
    ),
];

/// The advice for `rule`, if it is one of ours.
pub fn advice(rule: &str) -> Option<&'static str> {
    RULES.iter().find(|r| r.name == rule).map(|r| r.advice)
}

/// The error domain every refusal's `ErrorInfo` names.
pub const DOMAIN: &str = "cleanroom";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Literals in the sources that look like rules but are not: files,
    /// crash points, mail domains of the normalisation rules.
    fn not_rules() -> BTreeSet<&'static str> {
        let mut set: BTreeSet<&str> = crate::crash::POINTS.iter().copied().collect();
        set.extend([
            "audit.log",
            "audit.head",
            "server.pem",
            "ca.pem",
            "master.key",
            "example.com",
            "gmail.com",
            "googlemail.com",
            "mail.example.org",
            "inbox.test",
            "meta.redb",
            "truth.json",
            // Config file keys.
            "cluster.health_interval_seconds",
            // Flight SQL metadata keys.
            "cleanroom.agreement",
            "cleanroom.min_group_size",
            "cleanroom.privacy",
            "cleanroom.role",
        ]);
        set
    }

    fn sources(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push((
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
    }

    /// The code of `src/`, test modules (inline or in a `tests.rs`) left
    /// out.
    fn code() -> Vec<(String, String)> {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        files
            .into_iter()
            .map(|(path, text)| {
                let code = text.split("#[cfg(test)]\nmod ").next().unwrap().to_string();
                (path, code)
            })
            .collect()
    }

    /// Every literal `"word.word"` in `text`.
    fn dotted_literals(text: &str, out: &mut BTreeSet<String>) {
        let bytes = text.as_bytes();
        for (start, _) in text.match_indices('"') {
            let rest = &bytes[start + 1..];
            let len = rest
                .iter()
                .take_while(|b| b.is_ascii_lowercase() || **b == b'_' || **b == b'.')
                .count();
            if rest.get(len) != Some(&b'"') {
                continue;
            }
            let piece = &text[start + 1..start + 1 + len];
            let parts: Vec<&str> = piece.split('.').collect();
            if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) {
                out.insert(piece.to_string());
            }
        }
    }

    /// Literals shaped like rules, outside the policy loader (whose
    /// literals are a policy file's field paths) but inside its templates.
    fn rule_literals() -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for (path, code) in code() {
            let policy_file = (path.contains("/src/policy/") || path.contains("/src/agreements/"))
                && !path.ends_with("template.rs");
            if !policy_file && !path.ends_with("rules.rs") {
                dotted_literals(&code, &mut found);
            }
        }
        found
    }

    /// `request.FIELD` for every request field the transport and the
    /// room's use cases can name.
    fn request_rules() -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        for (path, code) in code() {
            if !(path.contains("/src/server/") || path.contains("/src/room/")) {
                continue;
            }
            for opener in ["field:", "bounded_name(", "bad(", "invalid("] {
                for (at, _) in code.match_indices(opener) {
                    let before = code[..at].chars().next_back();
                    if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                        continue;
                    }
                    let rest = code[at + opener.len()..].trim_start();
                    if let Some(quoted) = rest.strip_prefix('"') {
                        let field = quoted.split('"').next().unwrap();
                        if !field.contains(' ') {
                            found.insert(format!("request.{field}"));
                        }
                    }
                }
            }
        }
        found
    }

    #[test]
    fn every_rule_the_code_can_name_has_advice() {
        let skip = not_rules();
        let requests = request_rules();
        let missing: Vec<String> = rule_literals()
            .into_iter()
            .filter(|r| !skip.contains(r.as_str()) && !requests.contains(&format!("request.{r}")))
            .chain(requests.iter().cloned())
            .filter(|r| advice(r).is_none())
            .collect();
        assert!(missing.is_empty(), "rules without advice: {missing:?}");
    }

    #[test]
    fn every_rule_in_the_table_is_one_the_code_names() {
        let literals = rule_literals();
        let requests = request_rules();
        let mut names = BTreeSet::new();
        for r in RULES {
            assert!(names.insert(r.name), "{} twice", r.name);
            assert!(
                literals.contains(r.name) || requests.contains(r.name) || r.name == "internal",
                "{} is in the table but no code names it",
                r.name
            );
            assert!(r.advice.ends_with('.'), "{}: one sentence", r.name);
        }
    }

    #[test]
    fn docs_rules_md_is_this_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/rules.md");
        let text = std::fs::read_to_string(&path).unwrap();
        let rows: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|l| {
                let (name, rest) = l.split_once("` | ").unwrap();
                (name.to_string(), rest.trim_end_matches(" |").to_string())
            })
            .collect();
        let table: Vec<(String, String)> = RULES
            .iter()
            .map(|r| (r.name.to_string(), r.advice.replace('|', "\\|")))
            .collect();
        assert_eq!(rows, table, "regenerate docs/rules.md from src/rules.rs");
    }
}
