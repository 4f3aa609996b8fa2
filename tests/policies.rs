//! Policy files: every shipped example parses, and broken ones are explained
//! with the file, the field path and the rule.

use std::path::{Path, PathBuf};

use cleanroom::agreements::{load_dir, parse_policy};

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

fn demo_text() -> String {
    std::fs::read_to_string(policies_dir().join("retail-media-demo.toml")).unwrap()
}

#[test]
fn the_test_agreements_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies");
    let set = load_dir(&dir).unwrap();
    assert!(set.get("retail-coalition-demo").is_some());
}

#[test]
fn every_file_in_policies_parses() {
    let mut count = 0;
    for entry in std::fs::read_dir(policies_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = parse_policy(&text, &path) {
                panic!("{e}");
            }
            count += 1;
        }
    }
    assert!(count >= 1);
    let set = load_dir(&policies_dir()).unwrap();
    assert_eq!(set.len(), count);
}

#[test]
fn the_demo_agreement_has_what_the_product_relies_on() {
    let set = load_dir(&policies_dir()).unwrap();
    let p = set.get("retail-media-demo").unwrap();
    assert!(p.allows("acme", cleanroom::policy::Right::Query));
    assert!(!p.allows("globex", cleanroom::policy::Right::Query));
    let customers = p.dataset("customers").unwrap();
    assert_eq!(customers.owner(), "acme");
    for col in ["email", "phone", "age_band", "region", "lifetime_value"] {
        assert!(customers.column(col).is_some(), "customers.{col}");
    }
    let audience = p.dataset("audience").unwrap();
    for col in [
        "email",
        "phone",
        "interest_segment",
        "ad_exposures",
        "spend",
    ] {
        assert!(audience.column(col).is_some(), "audience.{col}");
    }
    assert!(p.query().min_group_size() >= 2);
}

/// One broken policy: a textual edit of the demo, and what the error must say.
struct Case {
    name: &'static str,
    from: &'static str,
    to: &'static str,
    field: &'static str,
    rule: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "date bound that is a number",
        from: "min = 2020-01-01\nmax = 2027-12-31\ncompare = true\n\n# acme",
        to: "min = 0\nmax = 2027-12-31\ncompare = true\n\n# acme",
        field: "dataset[0].column[6].min",
        rule: "must be a date like 2026-01-31",
    },
    Case {
        name: "date bound beyond the years dates may take",
        from: "min = 2020-01-01\nmax = 2027-12-31\ncompare = true\n\n# acme",
        to: "min = 2020-01-01\nmax = 2999-12-31\ncompare = true\n\n# acme",
        field: "dataset[0].column[6].max",
        rule: "must be a valid date in the years 1900 to 2200",
    },
    Case {
        name: "compare on a dimension",
        from: "values = [\"north\", \"south\", \"east\", \"west\"]",
        to: "values = [\"north\", \"south\", \"east\", \"west\"]\ncompare = true",
        field: "dataset[0].column[3].compare",
        rule: "does not apply to a dimension column",
    },
    Case {
        name: "column pair naming an identifier",
        from: r#"column_pairs = [["customers.last_purchase", "audience.first_exposure"]]"#,
        to: r#"column_pairs = [["customers.email", "audience.first_exposure"]]"#,
        field: "query.column_pairs[0]",
        rule: "identifiers and sensitive columns are never compared",
    },
    Case {
        name: "column pair naming no column",
        from: r#"column_pairs = [["customers.last_purchase", "audience.first_exposure"]]"#,
        to: r#"column_pairs = [["customers.last_purchase", "audience.last_seen"]]"#,
        field: "query.column_pairs[0]",
        rule: "is not a declared column",
    },
    Case {
        name: "unknown query mode",
        from: "min_group_size = 50\n",
        to: "min_group_size = 50\nmode = \"sql_only\"\n",
        field: "query.mode",
        rule: "is not a query mode",
    },
    Case {
        name: "template placeholder without a parameter",
        from: "WHERE c.region IN (:regions)",
        to: "WHERE c.region IN (:region_list)",
        field: "template[1].sql",
        rule: ":region_list is not a declared parameter",
    },
    Case {
        name: "template parameter over a dimension without declared values",
        from: "column = \"customers.region\"",
        to: "column = \"customers.lifetime_value\"",
        field: "template[1].param[0].column",
        rule: "is not a dimension column with declared `values`",
    },
    Case {
        name: "template run by a party without the query right",
        from: "parties = [\"acme\"]\nsql = \"\"\"\nSELECT a.interest_segment, COUNT(*) AS customers",
        to: "parties = [\"globex\"]\nsql = \"\"\"\nSELECT a.interest_segment, COUNT(*) AS customers",
        field: "template[1].parties[0]",
        rule: "lacks the \"query\" right",
    },
    Case {
        name: "template integer range upside down",
        from: "name = \"min_exposures\"\ntype = \"integer\"\nmin = 1\nmax = 100",
        to: "name = \"min_exposures\"\ntype = \"integer\"\nmin = 100\nmax = 1",
        field: "template[0].param[0].max",
        rule: "must not be less than min",
    },
    Case {
        name: "template the checker refuses",
        from: "SELECT a.interest_segment, COUNT(*) AS customers\nFROM customers c JOIN audience a ON c.email = a.email\nWHERE c.region IN (:regions)",
        to: "SELECT a.interest_segment, COUNT(*) AS customers\nFROM customers c JOIN audience a ON c.email = a.email\nWHERE c.region IN (:regions) AND c.phone IS NULL",
        field: "template[1].sql",
        rule: "with sample parameter values the query is refused",
    },
    Case {
        name: "unknown right",
        from: r#"rights = ["upload", "see_overlap"]"#,
        to: r#"rights = ["upload", "querry"]"#,
        field: "party[1].rights",
        rule: r#""querry" is not a known right"#,
    },
    Case {
        name: "organisation twice",
        from: r#"org = "globex""#,
        to: r#"org = "acme""#,
        field: "party[1].org",
        rule: "is already a party",
    },
    Case {
        name: "dataset owner is not a party",
        from: r#"owner = "globex""#,
        to: r#"owner = "initech""#,
        field: "dataset[1].owner",
        rule: r#""initech" is not a declared party"#,
    },
    Case {
        name: "minimum group size below 2",
        from: "min_group_size = 50",
        to: "min_group_size = 1",
        field: "query.min_group_size",
        rule: "must be at least 2",
    },
    Case {
        name: "expiry before start",
        from: "expires = 2027-12-31",
        to: "expires = 2025-06-30",
        field: "agreement.expires",
        rule: "must be later than agreement.starts",
    },
    Case {
        name: "expiry with a time of day",
        from: "expires = 2027-12-31",
        to: "expires = 2027-12-31T10:00:00Z",
        field: "agreement.expires",
        rule: "must be a date like 2027-12-31, without a time",
    },
    Case {
        name: "unknown key",
        from: "retention_days = 180",
        to: "retention_days = 180\nretain = 3",
        field: "agreement.retain",
        rule: "unknown field `retain`",
    },
    Case {
        name: "salt of the wrong length",
        from: "salt = \"",
        to: "salt = \"00",
        field: "agreement.salt",
        rule: "must be 64 hex digits",
    },
    Case {
        name: "salt not hex",
        from: "retention_days = 180\nsalt = \"",
        to: "retention_days = 180\nsalt = \"zz",
        field: "agreement.salt",
        rule: "must be 64 hex digits",
    },
    Case {
        name: "unknown column role",
        from: "role = \"sensitive\"",
        to: "role = \"secret\"",
        field: "dataset[1].column[6].role",
        rule: r#""secret" is not a known role"#,
    },
    Case {
        name: "column with two roles",
        from: "name = \"spend\"",
        to: "name = \"ad_exposures\"",
        field: "dataset[1].column[5].name",
        rule: "a column has exactly one role",
    },
    Case {
        name: "identifier of an undeclared kind",
        from: "kind = \"phone\"",
        to: "kind = \"fax\"",
        field: "dataset[0].column[1].kind",
        rule: r#""fax" is not declared under [identity]"#,
    },
    Case {
        name: "metric without an upper bound",
        from: "max = 5000.0",
        to: "",
        field: "dataset[0].column[4]",
        rule: "needs both `min` and `max` bounds",
    },
    Case {
        name: "metric bounds reversed",
        from: "max = 2000.0",
        to: "max = -1.0",
        field: "dataset[1].column[5].max",
        rule: "min < max",
    },
    Case {
        name: "dimension with both a list and a cap",
        from: "values = [\"north\", \"south\", \"east\", \"west\"]",
        to: "values = [\"north\", \"south\", \"east\", \"west\"]\nmax_cardinality = 10",
        field: "dataset[0].column[3]",
        rule: "exactly one of `values` or `max_cardinality`",
    },
    Case {
        name: "dimension value listed twice",
        from: "\"east\", \"west\"]",
        to: "\"east\", \"east\"]",
        field: "dataset[0].column[3].values[3]",
        rule: "is listed twice",
    },
    Case {
        name: "aggregate that is never allowed",
        from: r#"aggregates = ["count", "count_distinct", "sum", "avg"]"#,
        to: r#"aggregates = ["count", "max"]"#,
        field: "query.aggregates",
        rule: r#""max" is not an aggregate an agreement can allow"#,
    },
    Case {
        name: "per-query epsilon above the budget",
        from: "epsilon_per_query_max = 1.0",
        to: "epsilon_per_query_max = 20.0",
        field: "privacy.epsilon_per_query_max",
        rule: "must not exceed privacy.epsilon_total",
    },
    Case {
        name: "epsilon floor above the per-query maximum",
        from: "epsilon_per_query_max = 1.0",
        to: "epsilon_per_query_max = 1.0\nepsilon_per_query_min = 2.0",
        field: "privacy.epsilon_per_query_min",
        rule: "must not exceed privacy.epsilon_per_query_max",
    },
    Case {
        name: "delta total below one query's delta",
        from: "delta = 1e-7",
        to: "delta = 1e-7\ndelta_total = 1e-8",
        field: "privacy.delta_total",
        rule: "must be at least privacy.delta",
    },
    Case {
        name: "privacy without delta",
        from: "delta = 1e-7",
        to: "",
        field: "privacy.delta",
        rule: "is required",
    },
    Case {
        name: "rows per person out of range",
        from: "max_groups_per_person = 1",
        to: "max_groups_per_person = 1\nmax_rows_per_person = 0",
        field: "privacy.max_rows_per_person",
        rule: "must be between 1 and 1000",
    },
    Case {
        name: "unknown refresh window",
        from: "refresh = \"monthly\"",
        to: "refresh = \"weekly\"",
        field: "privacy.refresh",
        rule: r#""weekly" is not a known refresh window"#,
    },
    Case {
        name: "unsupported phone country",
        from: "default_country = \"US\"",
        to: "default_country = \"ZZ\"",
        field: "identity.phone.default_country",
        rule: "is not an ISO 3166 alpha-2 country code libphonenumber has metadata for",
    },
    Case {
        name: "phone metadata not named",
        from: "metadata = \"9.0.42\"\n",
        to: "",
        field: "identity.phone.metadata",
        rule: "is required for the phone profile",
    },
    Case {
        name: "phone metadata of another build",
        from: "metadata = \"9.0.42\"",
        to: "metadata = \"9.0.10\"",
        field: "identity.phone.metadata",
        rule: "is not the libphonenumber metadata of this build",
    },
    Case {
        name: "unknown standard",
        from: "gmail_canonical = true",
        to: "standard = \"linkedin\"",
        field: "identity.email.standard",
        rule: r#""linkedin" is not a known standard (known: cleanroom, google, meta, uid2)"#,
    },
    Case {
        name: "our gmail rule beside another standard",
        from: "gmail_canonical = true",
        to: "gmail_canonical = true\nstandard = \"google\"",
        field: "identity.email.gmail_canonical",
        rule: "only applies under the cleanroom standard; google has its own gmail rule",
    },
    Case {
        name: "a standard for an undeclared kind",
        from: "org = \"globex\"",
        to: "org = \"globex\"\nstandards = { maid = \"google\" }",
        field: "party[1].standards.maid",
        rule: "names an identity kind the agreement does not declare",
    },
    Case {
        name: "id differs from the file name",
        from: "id = \"retail-media-demo\"",
        to: "id = \"retail-media-2\"",
        field: "agreement.id",
        rule: "must match the file name",
    },
    Case {
        name: "querying party that cannot receive results",
        from: r#"rights = ["upload", "query", "receive_results", "see_overlap"]"#,
        to: r#"rights = ["upload", "query", "see_overlap"]"#,
        field: "party[0].rights",
        rule: "\"query\" needs \"receive_results\"",
    },
    Case {
        name: "nobody may query",
        from: r#"rights = ["upload", "query", "receive_results", "see_overlap"]"#,
        to: r#"rights = ["upload", "see_overlap"]"#,
        field: "party",
        rule: "no party has the \"query\" right",
    },
    Case {
        name: "wrong value type",
        from: "retention_days = 180",
        to: "retention_days = \"180 days\"",
        field: "agreement.retention_days",
        rule: "invalid type",
    },
    Case {
        name: "sensitive column with a type",
        from: "role = \"sensitive\"",
        to: "role = \"sensitive\"\ntype = \"string\"",
        field: "dataset[1].column[6].type",
        rule: "does not apply to a sensitive column",
    },
    Case {
        name: "unknown profile",
        from: "profile = \"email\"",
        to: "profile = \"e-mail\"",
        field: "identity.email.profile",
        rule: r#""e-mail" is not a known profile"#,
    },
    Case {
        name: "option of another profile",
        from: "default_country = \"US\"",
        to: "default_country = \"US\"\ngmail_canonical = true",
        field: "identity.phone.gmail_canonical",
        rule: "only applies to the email profile",
    },
    Case {
        name: "TOML syntax error",
        from: "[query]",
        to: "[query",
        field: "line ",
        rule: "TOML syntax",
    },
    Case {
        name: "retention out of range",
        from: "retention_days = 180",
        to: "retention_days = 0",
        field: "agreement.retention_days",
        rule: "must be between 1 and 3650",
    },
];

/// Each party may say which standard its uploads of a kind follow; two
/// that differ would fingerprint one person two ways, and `policy check`
/// names both. Where they agree, the kind follows it.
#[test]
fn parties_on_different_standards_for_one_kind_are_refused() {
    let path = Path::new("policies/retail-media-demo.toml");
    let with = |acme: &str, globex: &str| {
        demo_text()
            .replacen("gmail_canonical = true\n", "", 1)
            .replacen(
                "org = \"acme\"",
                &format!("org = \"acme\"\nstandards = {{ email = \"{acme}\" }}"),
                1,
            )
            .replacen(
                "org = \"globex\"",
                &format!("org = \"globex\"\nstandards = {{ email = \"{globex}\" }}"),
                1,
            )
    };
    let message = parse_policy(&with("google", "meta"), path)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("policies/retail-media-demo.toml: party[1].standards.email: globex declares the meta standard for email but acme the google: one identity kind has one profile"),
        "{message}"
    );
    let agreed = parse_policy(&with("uid2", "uid2"), path).unwrap();
    assert_eq!(
        agreed.identities()["email"].profile().standard(),
        cleanroom::policy::Standard::Uid2
    );
}

#[test]
fn broken_policies_name_the_file_field_and_rule() {
    assert!(CASES.len() >= 12);
    let path = Path::new("policies/retail-media-demo.toml");
    let demo = demo_text();
    for case in CASES {
        assert!(
            demo.contains(case.from),
            "{}: edit does not apply",
            case.name
        );
        let text = demo.replacen(case.from, case.to, 1);
        let err = match parse_policy(&text, path) {
            Ok(_) => panic!("{}: accepted a broken policy", case.name),
            Err(e) => e,
        };
        let message = err.to_string();
        let expected_prefix = format!("policies/retail-media-demo.toml: {}", case.field);
        let hit = message
            .lines()
            .any(|l| l.starts_with(&expected_prefix) && l.contains(case.rule));
        assert!(
            hit,
            "{}: expected `{expected_prefix}...{}` in:\n{message}",
            case.name, case.rule
        );
    }
}

#[test]
fn all_problems_of_a_file_are_reported_at_once() {
    let text = demo_text()
        .replace("min_group_size = 50", "min_group_size = 0")
        .replace(r#"owner = "globex""#, r#"owner = "initech""#)
        .replace("refresh = \"monthly\"", "refresh = \"weekly\"");
    let err = parse_policy(&text, Path::new("policies/retail-media-demo.toml")).unwrap_err();
    let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
    for expected in [
        "query.min_group_size",
        "dataset[1].owner",
        "privacy.refresh",
    ] {
        assert!(
            fields.contains(&expected),
            "{expected} missing from {fields:?}"
        );
    }
}

#[test]
fn two_files_with_one_agreement_id_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("retail-media-demo.toml"), demo_text()).unwrap();
    let sub = dir.path().join("more");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("retail-media-demo.toml"), demo_text()).unwrap();
    let errors = cleanroom::agreements::load_paths(&[dir.path().to_path_buf(), sub]).unwrap_err();
    assert!(
        errors[0].to_string().contains("is already declared by"),
        "{}",
        errors[0]
    );
}

#[test]
fn policy_errors_never_echo_the_salt() {
    let demo = demo_text();
    let salt_line = demo.lines().find(|l| l.starts_with("salt")).unwrap();
    let salt = salt_line.split('"').nth(1).unwrap();
    let broken = demo.replace("[query]", "[query");
    let err = parse_policy(&broken, Path::new("policies/retail-media-demo.toml")).unwrap_err();
    assert!(!err.to_string().contains(salt));
}

/// `cleanroom policy check DIR` from the real binary.
fn policy_check(dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["policy", "check"])
        .arg(dir)
        .output()
        .unwrap()
}

#[test]
fn policy_check_command_exits_non_zero_and_lists_problems() {
    let dir = tempfile::tempdir().unwrap();
    let bad = demo_text().replace(
        r#"rights = ["upload", "see_overlap"]"#,
        r#"rights = ["upload", "querry"]"#,
    );
    std::fs::write(dir.path().join("retail-media-demo.toml"), bad).unwrap();
    let out = policy_check(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains(r#"retail-media-demo.toml: party[1].rights: "querry" is not a known right"#),
        "{stderr}"
    );

    let ok = policy_check(&policies_dir());
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok retail-media-demo:"));
}

#[test]
fn deeply_nested_or_huge_policy_files_are_refused_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.toml");
    for text in [
        format!("x = {}1{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!("x = {}", "{ a = ".repeat(100_000)),
        format!("{}\n", "[a.".repeat(50_000)),
        "x = \"".to_string() + &"a".repeat(5_000_000),
    ] {
        // Run where a stack overflow would abort the test process too.
        let (text, path) = (text.clone(), path.clone());
        let result = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                parse_policy(&text, &path)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .unwrap();
        let err = result.unwrap_err();
        assert!(err.len() < 4_096, "{}", err.len());
    }
}

#[test]
fn policy_check_points_into_a_templates_sql_and_names_the_column_meant() {
    let dir = tempfile::tempdir().unwrap();
    let demo = demo_text();
    assert!(demo.contains("       AVG(c.lifetime_value) AS avg_value,"));
    let bad = demo.replacen(
        "       AVG(c.lifetime_value) AS avg_value,",
        "       AVG(c.lifetime_valeu) AS avg_value,",
        1,
    );
    std::fs::write(dir.path().join("retail-media-demo.toml"), bad).unwrap();
    let out = policy_check(dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The template's SQL starts on its own line after `sql = """`: the
    // fourth line of it holds the column, at column 12.
    assert!(
        stderr.contains(
            "template[0].sql: with sample parameter values the query is refused: rule sql.columns: column c.lifetime_valeu does not exist in the query's tables; did you mean c.lifetime_value? (at line 4, column 12)"
        ),
        "{stderr}"
    );
}
