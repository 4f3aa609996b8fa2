//! The whole product on embedded defaults, start to finish:
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Creates a development CA and certificates for the demo parties, starts a
//! server on 127.0.0.1 with mutual TLS and the agreements in `policies/`,
//! then shows what each organisation may see, and what an outsider and a
//! caller without a certificate get. Then both partners fingerprint
//! synthetic customer files on "their" side and upload them (one upload is
//! refused), the overlap is counted, acme's analyst runs governed aggregate
//! queries (three refused, with their rules), and the audit log is shown.
//! Everything lives in a temporary folder.

use std::time::Duration;

use cleanroom::client::{Client, ClientConfig, ClientError};
use cleanroom::prepare::{UploadOptions, upload};
use cleanroom::server::ServerOptions;

fn upload_options(dataset: &str, input: &std::path::Path) -> UploadOptions {
    UploadOptions {
        agreement: "retail-media-demo".into(),
        dataset: dataset.into(),
        input: input.to_path_buf(),
        format: None,
        csv: Default::default(),
        mapping: Default::default(),
        upload_id: None,
        progress: false,
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn config(url: &str, certs: &std::path::Path, org: Option<&str>) -> ClientConfig {
    let config = ClientConfig::new(url, certs.join("ca.pem"));
    match org {
        Some(org) => config.with_identity(
            certs.join(format!("{org}.pem")),
            certs.join(format!("{org}-key.pem")),
        ),
        None => config,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = tempfile::tempdir()?;
    let certs = work.path().join("certs");
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");

    step("1. A development CA, a server certificate, and one client certificate per organisation");
    cleanroom::certs::init(&certs, &[], false)?;
    for org in ["acme", "globex", "initech"] {
        let files = cleanroom::certs::issue_client(&certs, org, false)?;
        println!("   {org}: {}", files.cert.display());
    }

    step("2. Policy check of every agreement in policies/");
    let set = cleanroom::agreements::load_dir(&policies).map_err(|errors| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    for p in set.iter() {
        println!(
            "   ok {} ({} parties, hash {})",
            p.id(),
            p.parties().len(),
            p.hash().short()
        );
    }

    step("3. The server, on 127.0.0.1 with mutual TLS");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cleanroom::server::serve(
        listener,
        ServerOptions {
            shutdown_grace: Duration::from_millis(200),
            ..ServerOptions::new(&certs, &policies, &work.path().join("data"))
        },
        async {
            let _ = stopped.await;
        },
    ));
    println!("   listening on {url}");

    step("4. acme (retailer, may query) asks who it is and what it may see");
    let mut acme = Client::connect(&config(&url, &certs, Some("acme"))).await?;
    let me = acme.who_am_i().await?;
    println!(
        "   whoami: {} (party to {} agreement)",
        me.organisation, me.agreement_count
    );
    for a in acme.list_agreements().await? {
        let agreement = acme.get_agreement(&a.id).await?;
        for line in cleanroom::cli::render_agreement(&agreement).lines() {
            println!("   {line}");
        }
    }

    step("5. globex (publisher, may not query) sees only its own dataset");
    let mut globex = Client::connect(&config(&url, &certs, Some("globex"))).await?;
    let agreement = globex.get_agreement("retail-media-demo").await?;
    let names: Vec<&str> = agreement.datasets.iter().map(|d| d.name.as_str()).collect();
    println!("   datasets visible to globex: {}", names.join(", "));

    step("6. initech is party to nothing: the agreement does not exist for it");
    let mut initech = Client::connect(&config(&url, &certs, Some("initech"))).await?;
    match initech.get_agreement("retail-media-demo").await {
        Err(e @ ClientError::Status(_)) => println!("   refused: {e}"),
        other => return Err(format!("expected NOT_FOUND, got {other:?}").into()),
    }

    step("7. A caller without a client certificate");
    let mut anonymous = Client::connect(&config(&url, &certs, None)).await?;
    match anonymous.who_am_i().await {
        Err(e @ ClientError::Status(_)) => println!("   refused: {e}"),
        other => return Err(format!("expected UNAUTHENTICATED, got {other:?}").into()),
    }

    step("8. A shared secret for the partners, and synthetic partner files with messy identifiers");
    let secret = cleanroom::identity::Secret::generate();
    let synth_dir = work.path().join("synth");
    let truth = cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows: 20_000,
        overlap: 0.3,
        seed: 42,
        out: synth_dir.clone(),
    })?;
    println!(
        "   {} rows each, {} people in both; a few identifiers invalid",
        truth.acme_rows, truth.overlap
    );

    step("9. Each partner fingerprints on its own machine and uploads what the agreement allows");
    for (org, dataset, file, client) in [
        ("acme", "customers", cleanroom::synth::ACME_FILE, &acme),
        ("globex", "audience", cleanroom::synth::GLOBEX_FILE, &globex),
    ] {
        let options = upload_options(dataset, &synth_dir.join(file));
        let report = upload(client, &secret, &options).await?;
        let invalid: u64 = report.stats.invalid.values().sum();
        println!(
            "   {org}: {} of {} rows sent to {dataset} in {:.2} s; kept at home: {}; invalid identifiers: {invalid}; rows without any: {}",
            report.stats.rows_sent,
            report.stats.rows_read,
            report.elapsed.as_secs_f64(),
            report.dropped.join(", "),
            report.stats.rows_without_identifier,
        );
    }
    for d in acme.list_datasets("retail-media-demo").await? {
        println!(
            "   server holds for acme: {} = {} rows, version {}",
            d.dataset, d.rows, d.version
        );
    }

    step("10. A refused upload: acme may see globex's dataset, but never write it");
    let options = upload_options("audience", &synth_dir.join(cleanroom::synth::GLOBEX_FILE));
    match upload(&acme, &secret, &options).await {
        Err(e) => println!("   refused: {e}"),
        Ok(_) => return Err("expected PERMISSION_DENIED".into()),
    }

    step(
        "11. The overlap: people in both datasets, matched on email or phone (noised: it spends acme's privacy budget too)",
    );
    let overlap = acme
        .overlap_with_epsilon("retail-media-demo", &[], Some(0.5))
        .await?;
    print!("   {}", cleanroom::cli::render_overlap(&overlap));
    println!("   (the generator's truth: {})", truth.overlap);
    if let Some(p) = &overlap.privacy {
        for line in cleanroom::cli::render_privacy(p, overlap.min_group_size).lines() {
            println!("   {line}");
        }
    }

    step(
        "12. acme's analyst asks aggregate questions: every row stands for at least 50 people, values carry differential privacy noise",
    );
    // The agreement's purpose, as one of its approved templates: exposed
    // against unexposed customers (acme's unmatched ones included).
    let agreement = acme.get_agreement("retail-media-demo").await?;
    println!("   approved templates acme may run:");
    for line in cleanroom::cli::render_templates(&agreement).lines() {
        println!("   {line}");
    }
    println!(
        "   Does globex ad exposure lift acme customer value? (template lift_by_region, min_exposures=1)"
    );
    let params = [("min_exposures".to_string(), "1".to_string())].into();
    let lift = acme
        .run_template("retail-media-demo", "lift_by_region", &params, None)
        .await?;
    let table = cleanroom::cli::render_answer(&lift, cleanroom::cli::OutputFormat::Table)?;
    for line in table.lines() {
        println!("   {line}");
    }
    if let Some(p) = &lift.header.privacy {
        for line in cleanroom::cli::render_privacy(p, lift.header.min_group_size).lines() {
            println!("   {line}");
        }
    }
    println!(
        "   (the generator made exposed customers worth about 25% more: compare avg_value per region)"
    );
    for (question, sql) in [
        (
            "Matched customers' average lifetime value and publisher spend, by region",
            "SELECT c.region, COUNT(*) AS people, AVG(c.lifetime_value) AS avg_ltv, AVG(a.spend) AS avg_spend \
             FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region",
        ),
        (
            "Customers by publisher interest segment, largest first (HAVING and ORDER BY see only noisy values)",
            "SELECT a.interest_segment, COUNT(*) AS people, AVG(c.lifetime_value) AS avg_ltv \
             FROM customers c JOIN audience a ON c.email = a.email \
             GROUP BY a.interest_segment HAVING COUNT(*) > 200 ORDER BY people DESC LIMIT 5",
        ),
    ] {
        println!("   {question}:");
        let answer = acme.query("retail-media-demo", sql).await?;
        let table = cleanroom::cli::render_answer(&answer, cleanroom::cli::OutputFormat::Table)?;
        for line in table.lines() {
            println!("   {line}");
        }
        println!("   {} row(s)", answer.summary.rows);
        if let Some(p) = &answer.header.privacy {
            for line in cleanroom::cli::render_privacy(p, answer.header.min_group_size).lines() {
                println!("   {line}");
            }
        }
    }
    println!("   acme's privacy budget now:");
    let budget = acme.budget("retail-media-demo").await?;
    for line in cleanroom::cli::render_budget("retail-media-demo", &budget).lines() {
        println!("   {line}");
    }

    step(
        "13. Queries that would describe or probe individuals are refused, with the rule they broke",
    );
    let sneaky =
        "SELECT c.email, c.lifetime_value FROM customers c JOIN audience a ON c.email = a.email";
    match acme.query("retail-media-demo", sneaky).await {
        Err(e) => println!("   refused: {e}"),
        Ok(_) => return Err("expected PERMISSION_DENIED".into()),
    }
    let max = "SELECT c.region, MAX(c.lifetime_value) FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region";
    match acme.query("retail-media-demo", max).await {
        Err(e) => println!("   refused: {e}"),
        Ok(_) => return Err("expected PERMISSION_DENIED".into()),
    }
    // An error probe: a cast that fails on large values would say whether
    // some hidden row holds one. Refused before any data is read, free.
    let probe = "SELECT COUNT(*), SUM(CAST(c.lifetime_value AS TINYINT)) FROM customers c JOIN audience a ON c.email = a.email WHERE c.region = 'north'";
    match acme.query("retail-media-demo", probe).await {
        Err(e) => println!("   refused: {e}"),
        Ok(_) => return Err("expected PERMISSION_DENIED".into()),
    }

    step("14. The audit log both partners can read");
    for e in acme.audit_entries("retail-media-demo").await? {
        println!(
            "   #{} {} {} {}{}{}",
            e.seq,
            e.organisation,
            e.action().word(),
            e.decision().word(),
            e.rule.map(|r| format!(" ({r})")).unwrap_or_default(),
            e.epsilon
                .map(|x| format!(" epsilon {x}"))
                .unwrap_or_default()
        );
    }

    step("15. acme's access report, for its data protection officer");
    let report = acme.access_report("retail-media-demo").await?;
    for line in cleanroom::cli::render_report(&report).lines() {
        println!("   {line}");
    }

    step("16. Graceful shutdown: health turns NOT_SERVING, in-flight calls finish");
    let _ = stop.send(());
    server.await??;
    println!("   server stopped cleanly");
    Ok(())
}
