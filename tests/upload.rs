//! Partner uploads end to end over mutual TLS, and every way one is refused.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{FixedSizeBinaryBuilder, Float64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use cleanroom::clock::ManualClock;
use cleanroom::identity::{Fingerprinter, country, email, phone};
use cleanroom::prepare::{UploadError, upload};
use cleanroom::storage::Store;
use common::{
    Setup, TestServer, batch_msg, commit, header, raw_upload, refused_batch, secret, synth,
    upload_options, with_cells,
};
use tonic::Code;

fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(all_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn both_parties_upload_and_nothing_identifying_is_stored_in_the_clear() {
    let (files, truth) = synth(3_000, 0.3);
    let mut server = TestServer::start().await;
    let secret = secret();

    let acme = server.client("acme").await;
    let report = upload(
        &acme,
        &secret,
        &upload_options("customers", &files.path().join("acme-customers.csv")),
    )
    .await
    .unwrap();
    let expected_acme = truth.acme_rows - truth.acme_rows_without_valid_identifier;
    assert_eq!(report.response.rows, expected_acme);
    assert_eq!(report.stats.rows_read, truth.acme_rows);
    assert_eq!(
        report.stats.rows_without_identifier,
        truth.acme_rows_without_valid_identifier
    );
    let invalid: u64 = report.stats.invalid.values().sum();
    assert_eq!(invalid, truth.acme_invalid_identifiers);
    assert_eq!(report.dropped, ["customer_id", "signup_date"]);

    let globex = server.client("globex").await;
    let report = upload(
        &globex,
        &secret,
        &upload_options("audience", &files.path().join("globex-audience.csv")),
    )
    .await
    .unwrap();
    let expected_globex = truth.globex_rows - truth.globex_rows_without_valid_identifier;
    assert_eq!(report.response.rows, expected_globex);
    assert!(report.dropped.contains(&"health_interest".to_string()));

    let mut acme = acme;
    let listed = acme.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed.len(), 1, "acme sees only its own dataset");
    assert_eq!(listed[0].dataset, "customers");
    assert_eq!(listed[0].rows, expected_acme);

    let salt: [u8; 32] = {
        let a = acme.get_agreement("retail-media-demo").await.unwrap();
        hex::decode(a.salt).unwrap().try_into().unwrap()
    };
    // Keep the data directory past the server's life.
    let kept = std::mem::replace(&mut server.data_dir, tempfile::tempdir().unwrap());
    let data_dir = kept.path().join("data");
    server.stop().await.unwrap();

    // The stored versions decrypt to the expected rows and shapes.
    let store = Store::open(&data_dir, None).unwrap();
    let customers = store
        .current("retail-media-demo", "customers")
        .unwrap()
        .unwrap();
    let batches = store.read(&customers).unwrap();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows as u64, expected_acme);
    let names: Vec<String> = batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(
        names,
        [
            "email",
            "phone",
            "age_band",
            "region",
            "lifetime_value",
            "purchases",
            "last_purchase",
            "lead_score"
        ]
    );
    let audience = store
        .read(
            &store
                .current("retail-media-demo", "audience")
                .unwrap()
                .unwrap(),
        )
        .unwrap();
    assert!(
        audience[0]
            .schema()
            .field_with_name("health_interest")
            .is_err()
    );
    drop(store);

    // Scan every byte of the data directory.
    let mut disk = Vec::new();
    for f in all_files(&data_dir) {
        disk.extend(std::fs::read(f).unwrap());
    }
    let lower = disk.to_ascii_lowercase();
    for domain in [
        "@gmail.com",
        "@googlemail.com",
        "@example.com",
        "@mail.example.org",
        "@inbox.test",
    ] {
        assert!(
            !contains(&lower, domain.as_bytes()),
            "an email at {domain} is stored in the clear"
        );
    }
    let emails = Fingerprinter::new(&secret, &salt, "email");
    let phones = Fingerprinter::new(&secret, &salt, "phone");
    let us = country("US").unwrap();
    let mut fingerprints: HashSet<[u8; 32]> = HashSet::new();
    let mut phone_texts: HashSet<Vec<u8>> = HashSet::new();
    for file in ["acme-customers.csv", "globex-audience.csv"] {
        let mut reader = csv::Reader::from_path(files.path().join(file)).unwrap();
        for record in reader.records() {
            let record = record.unwrap();
            if let Ok(e) = email(&record[1], true) {
                fingerprints.insert(emails.fingerprint(&e));
            }
            if let Ok(p) = phone(&record[2], us) {
                fingerprints.insert(phones.fingerprint(&p));
                phone_texts.insert(p.as_bytes().to_vec());
                phone_texts.insert(p.as_bytes()[2..].to_vec());
            }
        }
    }
    assert!(fingerprints.len() > 4_000);
    assert!(
        !disk.windows(32).any(|w| fingerprints.contains(w)),
        "a fingerprint is stored in the clear"
    );
    for len in [10, 12] {
        assert!(
            !disk.windows(len).any(|w| phone_texts.contains(w)),
            "a phone number is stored in the clear"
        );
    }
}

/// A customers batch with one row per given email fingerprint bytes.
fn customers_batch(fps: &[[u8; 32]], region: &str, value: f64) -> RecordBatch {
    let mut email = FixedSizeBinaryBuilder::new(32);
    let mut phone = FixedSizeBinaryBuilder::new(32);
    for fp in fps {
        email.append_value(fp).unwrap();
        phone.append_null();
    }
    let n = fps.len();
    let schema = Schema::new(vec![
        Field::new("email", DataType::FixedSizeBinary(32), true),
        Field::new("phone", DataType::FixedSizeBinary(32), true),
        Field::new("age_band", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("lifetime_value", DataType::Float64, true),
        Field::new("purchases", DataType::Int64, true),
        Field::new("last_purchase", DataType::Date32, true),
        Field::new("lead_score", DataType::Int64, true),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(email.finish()),
            Arc::new(phone.finish()),
            Arc::new(StringArray::from(vec!["25-34"; n])),
            Arc::new(StringArray::from(vec![region; n])),
            Arc::new(Float64Array::from(vec![value; n])),
            Arc::new(arrow::array::Int64Array::from(vec![1i64; n])),
            Arc::new(arrow::array::Date32Array::from(vec![20_513; n])),
            Arc::new(arrow::array::Int64Array::from(vec![50i64; n])),
        ],
    )
    .unwrap()
}

fn random_fp(i: u8) -> [u8; 32] {
    *blake3::hash(&[i]).as_bytes()
}

fn status_of(e: &UploadError) -> (Code, String) {
    match e {
        UploadError::Server(cleanroom::client::ClientError::Status(s)) => {
            (s.code(), s.message().to_string())
        }
        other => panic!("expected a server refusal, got: {other}"),
    }
}

#[tokio::test]
async fn refused_uploads_name_the_rule_and_keep_the_previous_version() {
    let clock = ManualClock::new(time::OffsetDateTime::now_utc());
    let server = TestServer::start_with(Setup {
        clock: Arc::new(clock.clone()),
        // The clock visits a date past expiry below; retention must not
        // run then, or it deletes what the test checks is kept.
        maintenance_interval: std::time::Duration::from_secs(3600),
        limits: cleanroom::upload::Limits {
            max_rows: 2_500,
            max_bytes: 64 << 20,
            ..cleanroom::upload::Limits::default()
        },
        ..Setup::default()
    })
    .await;
    let (files, _) = synth(1_000, 0.3);
    let secret = secret();
    let mut acme = server.client("acme").await;
    let good = upload(
        &acme,
        &secret,
        &upload_options("customers", &files.path().join("acme-customers.csv")),
    )
    .await
    .unwrap();
    let version = good.response.version.clone();
    let hash = acme
        .get_agreement("retail-media-demo")
        .await
        .unwrap()
        .summary
        .unwrap()
        .policy_hash;

    let work = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(files.path().join("acme-customers.csv")).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&str) -> String| {
        let path = work.path().join(name);
        std::fs::write(&path, edit(&original)).unwrap();
        path
    };

    // Values outside the agreement, refused by the server by rule and
    // column, never echoing the value: a region the agreement does not
    // list, a metric past its bounds, a date before its bound.
    let region = |t: &str| t.replacen(",north,", ",central,", 1);
    let value = |t: &str| with_cells(t, 1..=3, 5, "98765.43");
    let date = |t: &str| with_cells(t, 1..=2, 7, "2019-12-31");
    type Edit<'e> = &'e dyn Fn(&str) -> String;
    let refusals: [(&str, Edit<'_>, &str, &str); 3] = [
        (
            "region.csv",
            &region,
            "column \"region\": rule dimension.values: 1 row(s)",
            "central",
        ),
        (
            "ltv.csv",
            &value,
            "column \"lifetime_value\": rule metric.bounds: 3 row(s) outside [0, 5000]",
            "98765",
        ),
        (
            "early.csv",
            &date,
            "column \"last_purchase\": rule metric.bounds: 2 row(s) outside",
            "2019-12-31",
        ),
    ];
    for (name, edit, expected, value) in refusals {
        let path = variant(name, edit);
        let err = upload(&acme, &secret, &upload_options("customers", &path))
            .await
            .unwrap_err();
        let (code, msg) = status_of(&err);
        assert_eq!(code, Code::InvalidArgument, "{name}");
        assert!(msg.contains(expected), "{name}: {msg}");
        assert!(!msg.contains(value), "{name} echoed a value: {msg}");
    }

    // Not a date at all: stopped on the partner's machine, with its place.
    let path = variant("baddate.csv", &|t| with_cells(t, 4..=4, 7, "2026-13-45"));
    let err = upload(&acme, &secret, &upload_options("customers", &path))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UploadError::Prepare(_)), "{msg}");
    assert!(
        msg.contains("last_purchase") && msg.contains("is not a date"),
        "{msg}"
    );
    assert!(!msg.contains("2026-13-45"), "{msg}");

    // Malformed CSV: reported with its line, client side; nothing sent is kept.
    let path = variant("broken.csv", &|t| {
        let mut lines: Vec<String> = t.lines().map(String::from).collect();
        lines[17].push_str(",surplus");
        lines.join("\n") + "\n"
    });
    let err = upload(&acme, &secret, &upload_options("customers", &path))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UploadError::Prepare(_)), "{msg}");
    assert!(
        msg.contains("line 18: malformed CSV: 11 fields where the header has 10"),
        "{msg}"
    );
    assert!(!msg.contains("surplus"));

    // A metric cell that is not a number: row and column, never the content.
    let path = variant("nan.csv", &|t| with_cells(t, 5..=5, 5, "twelve"));
    let err = upload(&acme, &secret, &upload_options("customers", &path))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(
        msg,
        "row 5: column \"lifetime_value\" is not a finite number"
    );

    // Oversized upload: more rows than the server's limit.
    let big = tempfile::tempdir().unwrap();
    cleanroom::synth::generate(&cleanroom::synth::SynthOptions {
        rows: 3_000,
        overlap: 0.1,
        seed: 3,
        out: big.path().to_path_buf(),
    })
    .unwrap();
    let err = upload(
        &acme,
        &secret,
        &upload_options("customers", &big.path().join("acme-customers.csv")),
    )
    .await
    .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::ResourceExhausted);
    assert!(msg.contains("rule upload.max_rows"), "{msg}");

    // Wrong party: acme may see globex's dataset but never upload it.
    let err = raw_upload(&acme, vec![header(&hash, "audience", "x1"), commit(0, 0)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("rule party.rights"),
        "{}",
        err.message()
    );

    // Schema mismatch: a column missing.
    let full = customers_batch(&[random_fp(1), random_fp(2)], "north", 10.0);
    let short = full.project(&[0, 1, 2, 3]).unwrap();
    let err = refused_batch(&acme, &hash, "customers", "x2", &short).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("rule upload.schema"),
        "{}",
        err.message()
    );

    // A sensitive attribute sent anyway, by a hand-made client.
    let globex = server.client("globex").await;
    let globex_hash = hash.clone();
    let n = 2;
    let mut email = FixedSizeBinaryBuilder::new(32);
    let mut phone = FixedSizeBinaryBuilder::new(32);
    for i in 0..n {
        email.append_value(random_fp(40 + i)).unwrap();
        phone.append_null();
    }
    let policies = cleanroom::agreements::load_dir(&common::policies_dir()).unwrap();
    let policy = policies.get("retail-media-demo").unwrap();
    let mut fields: Vec<Field> =
        cleanroom::upload::upload_schema(policy.dataset("audience").unwrap())
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
    fields.push(Field::new("health_interest", DataType::Utf8, true));
    let with_health = RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        vec![
            Arc::new(email.finish()),
            Arc::new(phone.finish()),
            Arc::new(StringArray::from(vec!["sports"; 2])),
            Arc::new(arrow::array::Int64Array::from(vec![1i64; 2])),
            Arc::new(arrow::array::Date32Array::from(vec![20_513; 2])),
            Arc::new(Float64Array::from(vec![1.0; 2])),
            Arc::new(StringArray::from(vec!["diabetes"; 2])),
        ],
    )
    .unwrap();
    let err = refused_batch(&globex, &globex_hash, "audience", "x-health", &with_health).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("column \"health_interest\": rule column.sensitive"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("diabetes"));

    // A plaintext email in a fingerprint column.
    let mut fake = [b' '; 32];
    fake[..24].copy_from_slice(b"jane.saoirse@example.com");
    let plain = customers_batch(&[random_fp(3), fake], "north", 10.0);
    let err = refused_batch(&acme, &hash, "customers", "x3", &plain).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("column \"email\": rule identifier.plaintext: 1 row(s)"),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("jane"));
    assert!(
        err.message().contains("the first is uploaded row 2"),
        "{}",
        err.message()
    );

    // A refusal names the first uploaded row that breaks the rule,
    // counted across batches, and never the value.
    let first = customers_batch(&[random_fp(6), random_fp(7)], "north", 10.0);
    let second = customers_batch(&[random_fp(8), random_fp(9)], "nowhere", 10.0);
    let err = raw_upload(
        &acme,
        vec![
            header(&hash, "customers", "x-rows"),
            batch_msg(&first),
            batch_msg(&second),
            commit(4, 2),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains(
            "column \"region\": rule dimension.values: 2 row(s) hold a value outside the agreement's list; the first is uploaded row 3"
        ),
        "{}",
        err.message()
    );
    assert!(!err.message().contains("nowhere"));
    {
        use tonic_types::StatusExt;
        let details = err.get_error_details();
        let info = details.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "dimension.values");
        assert_eq!(info.metadata["row"], "3");
        assert_eq!(info.metadata["column"], "region");
        let bad = details.bad_request().expect("a field violation");
        assert_eq!(bad.field_violations[0].field, "region");
    }

    // A stream that ends without its commit stores nothing.
    let ok_batch = customers_batch(&[random_fp(4), random_fp(5)], "north", 10.0);
    let err = raw_upload(
        &acme,
        vec![header(&hash, "customers", "x4"), batch_msg(&ok_batch)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A commit whose counts disagree stores nothing.
    let err = raw_upload(
        &acme,
        vec![
            header(&hash, "customers", "x5"),
            batch_msg(&ok_batch),
            commit(3, 1),
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A policy hash the server does not hold.
    let err = raw_upload(
        &acme,
        vec![header(&"0".repeat(64), "customers", "x6"), commit(0, 0)],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Expired agreement.
    clock.set(time::macros::datetime!(2028-06-01 00:00 UTC));
    let err = upload(
        &acme,
        &secret,
        &upload_options("customers", &files.path().join("acme-customers.csv")),
    )
    .await
    .unwrap_err();
    let (code, msg) = status_of(&err);
    assert_eq!(code, Code::FailedPrecondition);
    assert!(msg.contains("expired"), "{msg}");
    clock.set(time::OffsetDateTime::now_utc());

    // After every refusal the first version is still the current one, alone.
    let listed = acme.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed[0].version, version);
    assert_eq!(listed[0].versions, 1);
    assert_eq!(listed[0].rows, good.response.rows);
    let staging = server.data_dir.path().join("data/staging");
    assert_eq!(
        std::fs::read_dir(&staging).unwrap().count(),
        0,
        "staging is left clean"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn resending_an_upload_id_is_idempotent() {
    let server = TestServer::start().await;
    let (files, _) = synth(800, 0.3);
    let secret = secret();
    let mut acme = server.client("acme").await;
    let mut options = upload_options("customers", &files.path().join("acme-customers.csv"));
    options.upload_id = Some("crm-export-2026-11-24".into());
    let first = upload(&acme, &secret, &options).await.unwrap();
    assert!(!first.response.already_committed);
    let again = upload(&acme, &secret, &options).await.unwrap();
    assert!(again.response.already_committed);
    assert_eq!(again.response.version, first.response.version);
    let listed = acme.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed[0].versions, 1);

    // A new upload id makes a new current version.
    options.upload_id = Some("crm-export-2026-11-25".into());
    let second = upload(&acme, &secret, &options).await.unwrap();
    assert_ne!(second.response.version, first.response.version);
    let listed = acme.list_datasets("retail-media-demo").await.unwrap();
    assert_eq!(listed[0].version, second.response.version);
    assert_eq!(listed[0].versions, 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn parquet_input_and_column_mapping() {
    use parquet::arrow::ArrowWriter;
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("E-Mail", DataType::Utf8, true),
        Field::new("mobile", DataType::Utf8, true),
        Field::new("age_band", DataType::Utf8, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("lifetime_value", DataType::Float64, true),
        Field::new("purchases", DataType::Int64, true),
        Field::new("last_purchase", DataType::Date32, true),
        Field::new("lead_score", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from(vec![
                Some("Jane.Saoirse@gmail.com"),
                None,
                Some("bad-address"),
            ])),
            Arc::new(StringArray::from(vec![None, Some("(415) 555-0132"), None])),
            Arc::new(StringArray::from(vec!["25-34", "65+", "18-24"])),
            Arc::new(StringArray::from(vec!["north", "west", "east"])),
            Arc::new(Float64Array::from(vec![10.5, 20.0, 30.0])),
            Arc::new(arrow::array::Int64Array::from(vec![1, 0, 2])),
            Arc::new(arrow::array::Date32Array::from(vec![
                Some(20_513),
                None,
                Some(20_000),
            ])),
            Arc::new(arrow::array::Int64Array::from(vec![10, 90, 55])),
        ],
    )
    .unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();

    let acme = server.client("acme").await;
    let mut options = upload_options("customers", &path);
    options.mapping.insert("email".into(), "E-Mail".into());
    options.mapping.insert("phone".into(), "mobile".into());
    let report = upload(&acme, &secret(), &options).await.unwrap();
    assert_eq!(report.response.rows, 2);
    assert_eq!(report.stats.invalid.get("email"), Some(&1));
    assert_eq!(report.stats.rows_without_identifier, 1);

    // Without the mapping, the missing column is named.
    let err = upload(&acme, &secret(), &upload_options("customers", &path))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("the input has no column \"email\""),
        "{err}"
    );
    server.stop().await.unwrap();
}
