//! The `cleanroom` command line against the real binary server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::{Pki, RealServer};

fn cleanroom(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cleanroom"));
    cmd.args(args);
    for var in [
        "CLEANROOM_SERVER",
        "CLEANROOM_CA",
        "CLEANROOM_CERT",
        "CLEANROOM_KEY",
        "CLEANROOM_SECRET",
        "CLEANROOM_SECRET_FILE",
        "CLEANROOM_KEY_FILE",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The environment that points the command line at `server` as acme.
fn acme_env(pki: &Pki, server: &RealServer) -> Vec<(&'static str, std::ffi::OsString)> {
    vec![
        (
            "CLEANROOM_SERVER",
            format!("https://{}", server.addr).into(),
        ),
        ("CLEANROOM_CA", pki.path().join("ca.pem").into()),
        ("CLEANROOM_CERT", pki.path().join("acme.pem").into()),
        ("CLEANROOM_KEY", pki.path().join("acme-key.pem").into()),
    ]
}

fn borrowed<'a>(
    env: &'a [(&'static str, std::ffi::OsString)],
) -> Vec<(&'static str, &'a std::ffi::OsStr)> {
    env.iter().map(|(k, v)| (*k, v.as_os_str())).collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn secret_new_writes_an_owner_only_hex_secret_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.secret");
    let out = cleanroom(&["secret", "new", "--out", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let content = std::fs::read_to_string(&path).unwrap();
    assert_eq!(content.trim().len(), 64);
    assert!(hex::decode(content.trim()).is_ok());
    assert!(
        !text(&out).contains(content.trim()),
        "the secret is never printed"
    );
    let again = cleanroom(&["secret", "new", "--out", path.to_str().unwrap()], &[]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_agreements_synth_upload_and_datasets_from_the_command_line() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let server = RealServer::spawn(&pki, &data.path().join("data"), "0.1");
    let owned = acme_env(&pki, &server);
    let env = borrowed(&owned);

    let out = cleanroom(&["whoami"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).starts_with("acme (party to 1 agreement(s))"),
        "{}",
        text(&out)
    );

    let out = cleanroom(&["agreements", "show", "retail-media-demo"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dataset customers (owner acme)"),
        "{}",
        text(&out)
    );

    let out = cleanroom(&["agreements", "show", "nope"], &env);
    assert!(!out.status.success());
    assert!(text(&out).contains("NOT_FOUND"), "{}", text(&out));

    let work = tempfile::tempdir().unwrap();
    let synth_dir = work.path().join("synth");
    let out = cleanroom(
        &[
            "synth",
            "--rows",
            "2000",
            "--overlap",
            "0.25",
            "--out",
            synth_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("500 people in both"), "{}", text(&out));
    let input = synth_dir.join("acme-customers.csv");
    let upload_args = [
        "upload",
        "--agreement",
        "retail-media-demo",
        "--dataset",
        "customers",
        "--input",
        input.to_str().unwrap(),
        "--no-progress",
    ];

    // No secret: a clear refusal before anything is read or sent.
    let out = cleanroom(&upload_args, &env);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no key: pass --secret-file"),
        "{}",
        text(&out)
    );

    // The secret from the environment.
    let secret_hex = "3c".repeat(32);
    let mut with_secret = env.clone();
    with_secret.push(("CLEANROOM_SECRET", secret_hex.as_ref()));
    let out = cleanroom(&upload_args, &with_secret);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("kept on this machine (not in the agreement): customer_id, signup_date"),
        "{printed}"
    );
    assert!(
        printed.contains("rows to retail-media-demo/customers"),
        "{printed}"
    );
    assert!(!printed.contains(&secret_hex));

    let out = cleanroom(&["datasets", "--agreement", "retail-media-demo"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("customers: "), "{}", text(&out));

    // Erasure: five customers withdraw; only fingerprints leave.
    let text_in = std::fs::read_to_string(&input).unwrap();
    let withdrawn = work.path().join("withdrawn.csv");
    let five: Vec<&str> = text_in.lines().take(6).collect();
    std::fs::write(&withdrawn, five.join("\n") + "\n").unwrap();
    let out = cleanroom(
        &[
            "erase",
            "--agreement",
            "retail-media-demo",
            "--dataset",
            "customers",
            "--input",
            withdrawn.to_str().unwrap(),
        ],
        &with_secret,
    );
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("row(s) from retail-media-demo/customers"),
        "{printed}"
    );
    assert!(printed.contains("1 older version(s) deleted"), "{printed}");
    assert!(!printed.contains('@'), "no identifier is echoed: {printed}");

    // The privacy budget, before any query.
    let out = cleanroom(&["budget", "--agreement", "retail-media-demo"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("spent     epsilon 0 and delta 0 in 0 queries"),
        "{printed}"
    );
    // The default delta total: 1,000 queries at the floor of 0.01.
    assert!(
        printed.contains("remaining epsilon 10 of 10, delta 0.0001 of 0.0001"),
        "{printed}"
    );
    assert!(printed.contains("refreshes 20"), "{printed}");
    let out = cleanroom(&["budget", "--agreement", "no-such-agreement"], &env);
    assert!(!out.status.success());
    assert!(text(&out).contains("NOT_FOUND"), "{}", text(&out));

    // Approved templates: listed with their parameters; a value outside a
    // parameter's domain is refused naming the parameter and rule.
    let out = cleanroom(&["templates", "--agreement", "retail-media-demo"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(printed.contains("lift_by_region"), "{printed}");
    assert!(
        printed.contains("--param as_of=...   a date (YYYY-MM-DD) from 2026-01-01 to 2027-12-31"),
        "{printed}"
    );
    let run = |param: &str| {
        cleanroom(
            &[
                "run",
                "--agreement",
                "retail-media-demo",
                "churn_risk",
                "--param",
                param,
            ],
            &env,
        )
    };
    let out = run("as_of=2031-01-01");
    assert!(!out.status.success());
    assert!(
        text(&out).contains("rule template.param: parameter as_of: must be a date"),
        "{}",
        text(&out)
    );
    let out = run("as_of");
    assert!(!out.status.success());
    assert!(text(&out).contains("expected NAME=VALUE"), "{}", text(&out));

    // A bad mapping names the flag.
    let mut mapped: Vec<&str> = upload_args.to_vec();
    mapped.extend(["--map", "email"]);
    let out = cleanroom(&mapped, &with_secret);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("expected POLICY_COLUMN=INPUT_COLUMN"),
        "{}",
        text(&out)
    );
    drop(server);
}

/// `matching = "ecdh"` from the command line: each party makes its own key,
/// uploads with it, does its partner's blinding, and sees the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_party_keeps_its_own_key_and_matches_from_the_command_line() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let policies = common::both_matching_modes();
    let server = RealServer::spawn_with(&pki, &data.path().join("data"), "0.1", policies.path());
    let url = format!("https://{}", server.addr);
    let ca = pki.path().join("ca.pem");
    let work = tempfile::tempdir().unwrap();
    let files: Vec<_> = ["acme", "globex"]
        .iter()
        .map(|org| {
            (
                pki.path().join(format!("{org}.pem")),
                pki.path().join(format!("{org}-key.pem")),
                work.path().join(format!("{org}.key")),
            )
        })
        .collect();
    let env_of = |i: usize| -> Vec<(&str, &std::ffi::OsStr)> {
        vec![
            ("CLEANROOM_SERVER", url.as_ref()),
            ("CLEANROOM_CA", ca.as_os_str()),
            ("CLEANROOM_CERT", files[i].0.as_os_str()),
            ("CLEANROOM_KEY", files[i].1.as_os_str()),
        ]
    };
    for (_, _, key) in &files {
        let out = cleanroom(&["key", "new", "--out", key.to_str().unwrap()], &[]);
        assert!(out.status.success(), "{}", text(&out));
        let hex = std::fs::read_to_string(key).unwrap();
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!text(&out).contains(hex.trim()), "the key is never printed");
        let again = cleanroom(&["key", "new", "--out", key.to_str().unwrap()], &[]);
        assert!(!again.status.success());
        assert_eq!(std::fs::read_to_string(key).unwrap(), hex);
    }
    let synth = work.path().join("synth");
    let out = cleanroom(
        &[
            "synth",
            "--rows",
            "1000",
            "--overlap",
            "0.3",
            "--out",
            synth.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let upload = |i: usize, dataset: &str, file: &str, key: &std::path::Path| {
        let input = synth.join(file);
        cleanroom(
            &[
                "upload",
                "--agreement",
                common::ECDH,
                "--dataset",
                dataset,
                "--input",
                input.to_str().unwrap(),
                "--no-progress",
                "--key-file",
                key.to_str().unwrap(),
            ],
            &env_of(i),
        )
    };

    // The other party's key file is no shared secret: the wrong flag is
    // refused before anything is sent.
    let secret = work.path().join("shared.secret");
    std::fs::write(&secret, "3c".repeat(32)).unwrap();
    let input = synth.join("acme-customers.csv");
    let out = cleanroom(
        &[
            "upload",
            "--agreement",
            common::ECDH,
            "--dataset",
            "customers",
            "--input",
            input.to_str().unwrap(),
            "--no-progress",
            "--secret-file",
            secret.to_str().unwrap(),
        ],
        &env_of(0),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("--key-file"), "{}", text(&out));

    let out = upload(0, "customers", "acme-customers.csv", &files[0].2);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("nothing of your partner's is waiting"),
        "{printed}"
    );
    assert!(
        printed.contains("your dataset customers: uploaded, waiting for globex's blinding"),
        "{printed}"
    );
    let out = cleanroom(&["datasets", "--agreement", common::ECDH], &env_of(0));
    assert!(
        text(&out).contains("waiting for globex's blinding"),
        "{}",
        text(&out)
    );
    let out = cleanroom(&["overlap", "--agreement", common::ECDH], &env_of(0));
    assert!(!out.status.success());
    assert!(text(&out).contains("dataset.blinding"), "{}", text(&out));

    // globex's upload does its share at once: it blinds acme's points.
    let out = upload(1, "audience", "globex-audience.csv", &files[1].2);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("point(s) of acme's dataset customers (version v"),
        "{printed}"
    );
    assert!(
        printed.contains("your dataset audience: uploaded, waiting for acme's blinding"),
        "{printed}"
    );

    // acme's `match` finishes it; a file that is no key is refused.
    let matching = |key: &std::path::Path| {
        cleanroom(
            &[
                "match",
                "--agreement",
                common::ECDH,
                "--key-file",
                key.to_str().unwrap(),
            ],
            &env_of(0),
        )
    };
    let out = matching(&secret);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("a blinding key is 64 hex digits"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(&"3c".repeat(32)));
    let out = matching(&files[0].2);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(
        printed.contains("point(s) of globex's dataset audience (version v"),
        "{printed}"
    );
    assert!(
        printed.contains("your dataset customers: matched"),
        "{printed}"
    );
    let out = cleanroom(&["datasets", "--agreement", common::ECDH], &env_of(1));
    assert!(text(&out).contains("audience: "), "{}", text(&out));
    assert!(text(&out).ends_with("matched\n"), "{}", text(&out));
    let out = cleanroom(&["overlap", "--agreement", common::ECDH], &env_of(0));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).starts_with("300 people are in both customers and audience"),
        "{}",
        text(&out)
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_what_kind_of_failure_it_was_and_errors_print_once() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let server = RealServer::spawn(&pki, &data.path().join("data"), "0.1");
    let owned = acme_env(&pki, &server);
    let env = borrowed(&owned);
    let code = |args: &[&str], env: &[(&str, &std::ffi::OsStr)]| {
        let out = cleanroom(args, env);
        (out.status.code(), text(&out))
    };

    // 2: the command line.
    assert_eq!(code(&["query", "--no-such-flag"], &env).0, Some(2));
    // 3: a local file.
    let (c, t) = code(
        &[
            "upload",
            "--agreement",
            "retail-media-demo",
            "--dataset",
            "customers",
            "--input",
            "/no/such/file.csv",
            "--secret-file",
            "/no/such/secret",
        ],
        &env,
    );
    assert_eq!(c, Some(3), "{t}");
    // 4: refused by the policy.
    let (c, t) = code(
        &[
            "query",
            "--agreement",
            "retail-media-demo",
            "--sql",
            "SELECT c.email FROM customers c",
        ],
        &env,
    );
    assert_eq!(c, Some(4), "{t}");
    // Printed once, as the server's code and message, without tonic's
    // rendering of the status.
    assert_eq!(t.matches("rule query.aggregate").count(), 1, "{t}");
    assert!(!t.contains("metadata"), "{t}");
    assert!(!t.contains("Status {"), "{t}");
    // One line: the refusal, then what to do about it.
    assert_eq!(t.trim_end().lines().count(), 1, "{t}");
    assert!(t.contains("; what to do: Select only aggregates"), "{t}");
    // A misspelt column: where it is, the column meant, what to do.
    let (c, t) = code(
        &[
            "query",
            "--agreement",
            "retail-media-demo",
            "--sql",
            "SELECT c.regoin, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.regoin",
        ],
        &env,
    );
    assert_eq!(c, Some(4), "{t}");
    assert_eq!(t.trim_end().lines().count(), 1, "{t}");
    assert!(
        t.contains("did you mean c.region? (at line 1, column 8); what to do: Use a column"),
        "{t}"
    );
    // 5: not found.
    assert_eq!(code(&["agreements", "show", "nope"], &env).0, Some(5));
    // 6: retry later (nothing listens there).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut away = env.clone();
    away[0] = ("CLEANROOM_SERVER", gone.as_ref());
    assert_eq!(code(&["whoami"], &away).0, Some(6));
    // A client certificate not given is the command line's fault.
    let (c, t) = code(&["whoami"], &env[..2]);
    assert_eq!(c, Some(2), "{t}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_answer_says_why_and_json_is_an_empty_array() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let policies = common::demo_policies(None);
    let server = RealServer::spawn_with(&pki, &data.path().join("data"), "0.1", policies.path());
    let (files, _) = common::synth(600, 0.5);
    for (org, dataset, file) in [
        ("acme", "customers", cleanroom::synth::ACME_FILE),
        ("globex", "audience", cleanroom::synth::GLOBEX_FILE),
    ] {
        let client = cleanroom::client::Client::connect(&server.config(&pki, org))
            .await
            .unwrap();
        cleanroom::prepare::upload(
            &client,
            &common::secret(),
            &common::upload_options(dataset, &files.path().join(file)),
        )
        .await
        .unwrap();
    }
    let owned = acme_env(&pki, &server);
    let env = borrowed(&owned);
    let sql = "SELECT c.region, COUNT(*) AS n FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
    let query = |sql: &str| {
        cleanroom(
            &[
                "query",
                "--agreement",
                "retail-media-demo",
                "--format",
                "json",
                "--sql",
                sql,
            ],
            &env,
        )
    };
    let some = query(sql);
    assert!(some.status.success(), "{}", text(&some));
    let rows: serde_json::Value = serde_json::from_slice(&some.stdout).unwrap();
    assert!(!rows.as_array().unwrap().is_empty(), "{}", text(&some));
    let none = query(&format!("{sql} HAVING COUNT(*) > 1000000"));
    assert!(none.status.success(), "{}", text(&none));
    assert_eq!(String::from_utf8_lossy(&none.stdout), "[]\n");
    let stderr = String::from_utf8_lossy(&none.stderr);
    assert!(stderr.contains("no rows:"), "{stderr}");
    assert!(stderr.contains("never shown"), "{stderr}");

    // The query from a file, and from standard input.
    let file = data.path().join("query.sql");
    std::fs::write(&file, sql).unwrap();
    let base = [
        "query",
        "--agreement",
        "retail-media-demo",
        "--format",
        "json",
    ];
    let from_file = cleanroom(
        &[&base[..], &["--sql-file", file.to_str().unwrap()]].concat(),
        &env,
    );
    assert_eq!(from_file.stdout, some.stdout, "{}", text(&from_file));
    let mut piped = Command::new(env!("CARGO_BIN_EXE_cleanroom"));
    piped.args(base).args(["--sql", "-"]);
    for (k, v) in &env {
        piped.env(k, v);
    }
    let mut child = piped
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(sql.as_bytes())
            .unwrap();
    }
    let from_stdin = child.wait_with_output().unwrap();
    assert_eq!(from_stdin.stdout, some.stdout, "{}", text(&from_stdin));
    let missing = cleanroom(&[&base[..], &["--sql-file", "/no/such.sql"]].concat(), &env);
    assert_eq!(missing.status.code(), Some(3), "{}", text(&missing));
    let neither = cleanroom(&base, &env);
    assert_eq!(neither.status.code(), Some(2), "{}", text(&neither));
}

#[test]
fn the_suite_serves_the_demo_agreement_alone_whatever_policies_holds() {
    let names: Vec<String> = std::fs::read_dir(common::policies_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names, ["retail-media-demo.toml"]);
    assert_eq!(
        std::fs::read(common::policies_dir().join("retail-media-demo.toml")).unwrap(),
        std::fs::read(common::demo_policy_file()).unwrap(),
        "the copy is the shipped file"
    );
}

#[test]
fn completions_and_a_manual_page_come_from_the_binary() {
    for shell in ["bash", "zsh", "fish"] {
        let out = cleanroom(&["completions", shell], &[]);
        assert!(out.status.success(), "{shell}: {}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["cleanroom", "query", "upload", "agreement"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let out = cleanroom(&["man"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH cleanroom"),
        "{page}"
    );
    assert!(page.contains("clean room"), "{page}");
    assert_eq!(
        cleanroom(&["completions", "tcsh"], &[]).status.code(),
        Some(2)
    );
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let out = cleanroom(&["--version"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let expected_commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string());
    let prefix = format!("cleanroom {} (", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&prefix), "{text}");
    match expected_commit {
        // Built from a checkout: its commit, perhaps marked modified.
        Some(commit) => assert!(text.contains(&commit), "{text} lacks {commit}"),
        None => assert!(text.contains("unknown commit"), "{text}"),
    }
}

/// A client certificate for `org` signed by the CA in `ca_dir`, valid from
/// `from` to `until`, written as `name.pem` and `name-key.pem` in `out`.
fn client_cert(
    ca_dir: &std::path::Path,
    org: &str,
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
    out: &std::path::Path,
    name: &str,
) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, org);
    params
        .distinguished_name
        .push(DnType::OrganizationName, org);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = from;
    params.not_after = until;
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(out.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(out.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_would_be_refused_are_explained_before_connecting() {
    let pki = Pki::new();
    let other = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let server = RealServer::spawn(&pki, &data.path().join("data"), "0.1");
    let certs = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let days = time::Duration::days;
    client_cert(
        pki.path(),
        "acme",
        now - days(30),
        now - days(2),
        certs.path(),
        "expired",
    );
    client_cert(
        pki.path(),
        "acme",
        now + days(2),
        now + days(30),
        certs.path(),
        "early",
    );
    client_cert(
        other.path(),
        "acme",
        now - days(1),
        now + days(30),
        certs.path(),
        "foreign",
    );
    let expired_on = (now - days(2)).date();

    let mut owned = acme_env(&pki, &server);
    for (name, expected) in [
        ("expired", format!("expired on {expired_on}T")),
        ("early", "is not valid until ".to_string()),
        ("foreign", "was not issued by the CA in ".to_string()),
    ] {
        owned[2].1 = certs.path().join(format!("{name}.pem")).into();
        owned[3].1 = certs.path().join(format!("{name}-key.pem")).into();
        let out = cleanroom(&["whoami"], &borrowed(&owned));
        let t = text(&out);
        assert_eq!(out.status.code(), Some(7), "{name}: {t}");
        assert!(t.contains(&expected), "{name}: {t}");
        assert!(
            t.contains("`cleanroom certs issue --org acme`"),
            "{name}: {t}"
        );
        assert_eq!(t.trim_end().lines().count(), 1, "{name}: {t}");
    }
    // A good certificate goes through.
    let good = acme_env(&pki, &server);
    let out = cleanroom(&["whoami"], &borrowed(&good));
    assert!(out.status.success(), "{}", text(&out));

    // The server logs the handshakes it refuses, with the peer's address
    // and why: here a client that skips the check above.
    for name in ["expired", "foreign"] {
        let config = cleanroom::client::ClientConfig::new(
            format!("https://{}", server.addr),
            pki.path().join("ca.pem"),
        );
        let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(&config.ca).unwrap()),
        );
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(certs.path().join(format!("{name}.pem"))).unwrap(),
            std::fs::read(certs.path().join(format!("{name}-key.pem"))).unwrap(),
        ));
        let channel = tonic::transport::Channel::from_shared(config.server.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        if let Ok(channel) = channel {
            let mut agreements =
                cleanroom::proto::agreements_service_client::AgreementsServiceClient::new(channel);
            assert!(
                agreements
                    .who_am_i(cleanroom::proto::WhoAmIRequest {})
                    .await
                    .is_err()
            );
        }
    }
    // Each refused handshake is logged (a client may try more than once).
    let mut refusals: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let both = |r: &[String]| {
        r.iter().any(|l| l.contains("(Expired)"))
            && r.iter()
                .any(|l| l.contains("UnknownIssuer") || l.contains("BadSignature"))
    };
    while !both(&refusals) && std::time::Instant::now() < deadline {
        let line = server
            .log
            .recv_timeout(std::time::Duration::from_millis(200));
        if let Some(line) = line.ok().filter(|l| l.contains("TLS handshake failed")) {
            refusals.push(line);
        }
    }
    assert!(both(&refusals), "{refusals:?}");
    assert!(
        refusals
            .iter()
            .all(|l| l.contains("\"peer\":\"127.0.0.1:") && l.contains("\"level\":\"INFO\"")),
        "{refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.contains(&format!("expired on {expired_on}T"))),
        "{refusals:?}"
    );
}

/// The README's "Using it by hand" lists commands examples/by_hand.sh
/// runs: each `$B` line there is the start of one the script runs.
#[test]
fn the_readme_by_hand_commands_are_the_ones_the_script_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = std::fs::read_to_string(root.join("examples/by_hand.sh")).unwrap();
    let section = readme
        .split("## Using it by hand")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("a sh block in Using it by hand");
    let runs: Vec<&str> = script
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("run "))
        .collect();
    let mut checked = 0;
    for line in section.lines().filter_map(|l| l.strip_prefix("$B ")) {
        let command = line.split(" # ").next().unwrap().trim_end();
        if command == "serve &" {
            assert!(
                script.contains("\"$B\" serve "),
                "the script starts a server"
            );
            continue;
        }
        assert!(
            runs.iter().any(|r| r.starts_with(command)),
            "README runs `{command}`; examples/by_hand.sh does not"
        );
        checked += 1;
    }
    assert!(checked >= 25, "{checked}");
    // Plain shell lines of the README block are in the script as they are.
    for line in section.lines().filter(|l| l.starts_with("head ")) {
        let command = line.split("   #").next().unwrap().trim_end();
        assert!(script.contains(command), "{command}");
    }
}
