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
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
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
    let url = format!("https://{}", server.addr);
    let ca = pki.path().join("ca.pem");
    let cert = pki.path().join("acme.pem");
    let key = pki.path().join("acme-key.pem");
    let env: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("CLEANROOM_SERVER", url.as_ref()),
        ("CLEANROOM_CA", ca.as_os_str()),
        ("CLEANROOM_CERT", cert.as_os_str()),
        ("CLEANROOM_KEY", key.as_os_str()),
    ];

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
    assert!(text(&out).contains("no shared secret"), "{}", text(&out));

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
        printed.contains("spent     epsilon 0 in 0 queries"),
        "{printed}"
    );
    assert!(printed.contains("remaining epsilon 10 of 10"), "{printed}");
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
