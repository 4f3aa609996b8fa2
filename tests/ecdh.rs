//! Matching without a shared secret (`matching = "ecdh"`) on a real server:
//! two parties with their own keys, the blinding exchange, answers equal to
//! the keyed mode on the same data, what each party receives, and what the
//! data directory holds.

mod common;

use std::collections::HashSet;
use std::path::Path;

use cleanroom::client::Client;
use cleanroom::identity::BlindingKey;
use cleanroom::identity::blinding::{POINT_LEN, hash_to_point, reblind};
use cleanroom::prepare::{
    CsvOptions, EraseOptions, InputFormat, InputReader, Keys, Plan, Preparer, UploadOptions,
    complete_job, erase, fetch_work, match_pending, upload,
};
use cleanroom::proto;
use cleanroom::proto::matching_service_client::MatchingServiceClient;
use common::{Setup, TestServer, secret, synth};
use prost::Message;
use tonic::Code;

use common::{ECDH, KEYED};

fn setup(policies: &Path) -> Setup {
    Setup {
        policies: policies.to_path_buf(),
        ..Setup::default()
    }
}

fn options(agreement: &str, org: &str, dir: &Path) -> UploadOptions {
    let (dataset, file) = dataset_of(org);
    UploadOptions {
        agreement: agreement.into(),
        ..common::upload_options(dataset, &dir.join(file))
    }
}

fn dataset_of(org: &str) -> (&'static str, &'static str) {
    match org {
        "acme" => ("customers", cleanroom::synth::ACME_FILE),
        _ => ("audience", cleanroom::synth::GLOBEX_FILE),
    }
}

/// The distinct points a party's client computes from its own file, as
/// the upload does: the values only that party can make.
async fn own_points(client: &Client, org: &str, dir: &Path, keys: Keys<'_>) -> HashSet<[u8; 32]> {
    let (dataset, file) = dataset_of(org);
    let agreement = client.clone().get_agreement(ECDH).await.unwrap();
    let mut reader = InputReader::open(
        &dir.join(file),
        InputFormat::Csv,
        CsvOptions::default(),
        4096,
    )
    .unwrap();
    let plan = Plan::new(
        &agreement,
        dataset,
        keys,
        reader.header(),
        &Default::default(),
    )
    .unwrap();
    let kinds = plan.identity_kinds();
    let indices = plan.input_indices();
    let mut preparer = Preparer::new(plan);
    let mut points = HashSet::new();
    while let Some(chunk) = reader.next_chunk(4096, &indices).unwrap() {
        let batch = preparer.prepare(&chunk).unwrap();
        for (i, kind) in kinds.iter().enumerate() {
            if kind.is_some() {
                let col = batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<arrow::array::FixedSizeBinaryArray>()
                    .unwrap();
                points.extend(
                    col.iter()
                        .flatten()
                        .map(|v| <[u8; 32]>::try_from(v).unwrap()),
                );
            }
        }
    }
    points
}

fn points_of(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .chunks_exact(POINT_LEN)
        .map(|c| c.try_into().unwrap())
        .collect()
}

/// Whether any 32-byte window of `bytes` is one of `values`.
fn holds_any(bytes: &[u8], values: &HashSet<[u8; 32]>) -> bool {
    bytes
        .windows(32)
        .any(|w| values.contains(<&[u8; 32]>::try_from(w).unwrap()))
}

async fn overlap(client: &mut Client, agreement: &str) -> u64 {
    client
        .overlap(agreement, &[])
        .await
        .unwrap()
        .overlap
        .unwrap()
}

async fn state_of(client: &mut Client, agreement: &str) -> (proto::DatasetState, String) {
    let d = client.list_datasets(agreement).await.unwrap().remove(0);
    (d.state(), d.waiting_for)
}

const BY_REGION: &str = "SELECT c.region, COUNT(DISTINCT c.email) AS people, AVG(c.lifetime_value) AS avg_ltv \
     FROM customers c JOIN audience a ON c.email = a.email GROUP BY c.region ORDER BY c.region";

#[tokio::test]
async fn two_parties_match_without_a_shared_secret_as_the_keyed_mode_does() {
    let policies = common::both_matching_modes();
    let server = TestServer::start_with(setup(policies.path())).await;
    let (dir, truth) = synth(3_000, 0.4);
    let (acme_key, globex_key) = (BlindingKey::generate(), BlindingKey::generate());
    let mut acme = server.client("acme").await;
    let mut globex = server.client("globex").await;
    assert_eq!(
        acme.get_agreement(ECDH).await.unwrap().matching,
        proto::MatchingMode::Ecdh as i32
    );

    // The keyed mode on the same files, for comparison.
    upload(&acme, &secret(), &options(KEYED, "acme", dir.path()))
        .await
        .unwrap();
    upload(&globex, &secret(), &options(KEYED, "globex", dir.path()))
        .await
        .unwrap();

    // A shared secret is refused under ecdh, before anything is sent.
    let err = upload(&acme, &secret(), &options(ECDH, "acme", dir.path()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--key-file"), "{err}");

    // acme uploads first: its dataset waits for globex's blinding.
    upload(&acme, &acme_key, &options(ECDH, "acme", dir.path()))
        .await
        .unwrap();
    assert_eq!(
        state_of(&mut acme, ECDH).await,
        (proto::DatasetState::Waiting, "globex".to_string())
    );
    let err = acme.overlap(ECDH, &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("dataset.blinding"), "{err}");
    let err = acme.query(ECDH, BY_REGION).await.unwrap_err();
    assert!(err.to_string().contains("dataset.blinding"), "{err}");
    let report = match_pending(&acme, &acme_key, ECDH).await.unwrap();
    assert!(report.done.is_empty(), "globex has uploaded nothing yet");

    // globex uploads, then blinds acme's points.
    upload(&globex, &globex_key, &options(ECDH, "globex", dir.path()))
        .await
        .unwrap();
    let acme_singles = own_points(&acme, "acme", dir.path(), (&acme_key).into()).await;
    let globex_singles = own_points(&globex, "globex", dir.path(), (&globex_key).into()).await;
    let singles: Vec<[u8; 32]> = globex_singles.iter().copied().collect();
    let globex_doubles: HashSet<[u8; 32]> =
        reblind(&acme_key, &singles).unwrap().into_iter().collect();
    let jobs = fetch_work(&globex, &globex_key, ECDH).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].header.dataset, "customers");
    let received = points_of(&jobs[0].points);
    // Exactly acme's distinct singly blinded points, none of globex's own
    // (single or double), in an order that is not acme's sorted one.
    assert_eq!(
        received.iter().copied().collect::<HashSet<_>>(),
        acme_singles
    );
    assert_eq!(received.len(), acme_singles.len());
    assert!(!received.iter().any(|p| globex_doubles.contains(p)));
    assert!(!received.iter().any(|p| globex_singles.contains(p)));
    let mut sorted = received.clone();
    sorted.sort_unstable();
    assert_ne!(received, sorted, "the relayed order is shuffled");
    // A second fetch shuffles afresh and withdraws the first job.
    let again = fetch_work(&globex, &globex_key, ECDH).await.unwrap();
    assert_ne!(again[0].points, jobs[0].points);
    let stale = complete_job(&globex, &globex_key, ECDH, jobs[0].clone())
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Some(Code::InvalidArgument), "{stale}");
    let done = complete_job(&globex, &globex_key, ECDH, again[0].clone())
        .await
        .unwrap();
    assert_eq!(done.points as usize, acme_singles.len());
    assert_eq!(
        state_of(&mut acme, ECDH).await.0,
        proto::DatasetState::Matched
    );
    // globex's own dataset still waits for acme.
    assert_eq!(
        state_of(&mut globex, ECDH).await,
        (proto::DatasetState::Waiting, "acme".to_string())
    );

    // acme blinds globex's points, received the same way.
    let acme_doubles: HashSet<[u8; 32]> = reblind(
        &globex_key,
        &acme_singles.iter().copied().collect::<Vec<_>>(),
    )
    .unwrap()
    .into_iter()
    .collect();
    let jobs = fetch_work(&acme, &acme_key, ECDH).await.unwrap();
    let received = points_of(&jobs[0].points);
    assert_eq!(
        received.iter().copied().collect::<HashSet<_>>(),
        globex_singles
    );
    assert!(
        !received
            .iter()
            .any(|p| acme_doubles.contains(p) || acme_singles.contains(p))
    );
    let report = match_pending(&acme, &acme_key, ECDH).await.unwrap();
    assert_eq!(report.done.len(), 1);
    assert!(
        report
            .own
            .iter()
            .all(|d| d.state() == proto::DatasetState::Matched)
    );
    assert!(
        fetch_work(&acme, &acme_key, ECDH).await.unwrap().is_empty(),
        "nothing is left to do"
    );
    assert!(
        fetch_work(&globex, &globex_key, ECDH)
            .await
            .unwrap()
            .is_empty()
    );

    // Same overlap as the synthetic truth and the keyed mode; same answer.
    assert_eq!(overlap(&mut acme, ECDH).await, truth.overlap);
    assert_eq!(overlap(&mut acme, KEYED).await, truth.overlap);
    let keyed = acme.query(KEYED, BY_REGION).await.unwrap();
    let ecdh = acme.query(ECDH, BY_REGION).await.unwrap();
    assert!(keyed.batches.iter().map(|b| b.num_rows()).sum::<usize>() > 0);
    assert_eq!(
        arrow::util::pretty::pretty_format_batches(&keyed.batches)
            .unwrap()
            .to_string(),
        arrow::util::pretty::pretty_format_batches(&ecdh.batches)
            .unwrap()
            .to_string()
    );

    // Every response globex got in this agreement holds none of its own
    // doubly blinded points.
    let responses: Vec<Vec<u8>> = vec![
        globex.get_agreement(ECDH).await.unwrap().encode_to_vec(),
        proto::ListDatasetsResponse {
            datasets: globex.list_datasets(ECDH).await.unwrap(),
        }
        .encode_to_vec(),
        globex.overlap(ECDH, &[]).await.unwrap().encode_to_vec(),
    ];
    for r in &responses {
        assert!(!holds_any(r, &globex_doubles));
    }

    // Erasing people under ecdh: the owner blinds their identifiers, rows
    // go, the blinding of the rest carries over, and the answers stay
    // those of the keyed mode after the same erasure.
    let text = std::fs::read_to_string(dir.path().join(cleanroom::synth::ACME_FILE)).unwrap();
    let keyed_erased =
        common::erase_first_customers(&acme, &secret(), KEYED, dir.path(), 300).await;
    let ecdh_erased = common::erase_first_customers(&acme, &acme_key, ECDH, dir.path(), 300).await;
    assert!(keyed_erased.rows_removed >= 300);
    assert_eq!(ecdh_erased.rows_removed, keyed_erased.rows_removed);
    assert_eq!(
        state_of(&mut acme, ECDH).await.0,
        proto::DatasetState::Matched
    );
    let after = overlap(&mut acme, KEYED).await;
    assert!(after < truth.overlap);
    assert_eq!(overlap(&mut acme, ECDH).await, after);

    // A restart loses the jobs in memory, never the blinding.
    let server = server.restart(setup(policies.path())).await;
    let mut acme = server.client("acme").await;
    assert_eq!(overlap(&mut acme, ECDH).await, after);
    assert_eq!(
        arrow::util::pretty::pretty_format_batches(
            &acme.query(KEYED, BY_REGION).await.unwrap().batches
        )
        .unwrap()
        .to_string(),
        arrow::util::pretty::pretty_format_batches(
            &acme.query(ECDH, BY_REGION).await.unwrap().batches
        )
        .unwrap()
        .to_string()
    );

    // The data directory holds no value one party could compute alone:
    // no party's singly blinded point, no unblinded hash point, no keyed
    // fingerprint, no scalar, and (sealed) no doubly blinded point either.
    let salt: [u8; 32] = hex::decode(acme.get_agreement(ECDH).await.unwrap().salt)
        .unwrap()
        .try_into()
        .unwrap();
    let mut forbidden: HashSet<[u8; 32]> = HashSet::new();
    forbidden.extend(acme_singles.iter().copied());
    forbidden.extend(globex_singles.iter().copied());
    forbidden.extend(acme_doubles.iter().copied());
    forbidden.extend(globex_doubles.iter().copied());
    for key in [&acme_key, &globex_key] {
        forbidden.insert(hex::decode(key.to_hex()).unwrap().try_into().unwrap());
        forbidden.insert(key.key_id());
    }
    let kinds = ["email", "phone"];
    for email in text.lines().skip(1).filter_map(|l| l.split(',').nth(1)) {
        if let Ok(n) = cleanroom::identity::email(email, true) {
            for kind in kinds {
                forbidden.insert(hash_to_point(&salt, kind, &n).compress().to_bytes());
            }
        }
    }
    let files = walk(&server.data_dir.path().join("data"));
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !holds_any(&bytes, &forbidden),
            "{} holds a point",
            file.display()
        );
        for key in [&acme_key, &globex_key] {
            let hex = key.to_hex();
            assert!(!bytes.windows(hex.len()).any(|w| w == hex.as_bytes()));
        }
    }
    server.stop().await.unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_blinding_that_breaks_the_protocol_stores_nothing() {
    let policies = common::both_matching_modes();
    let server = TestServer::start_with(setup(policies.path())).await;
    let (dir, _) = synth(300, 0.5);
    let (acme_key, globex_key) = (BlindingKey::generate(), BlindingKey::generate());
    let acme = server.client("acme").await;
    let globex = server.client("globex").await;
    upload(&acme, &acme_key, &options(ECDH, "acme", dir.path()))
        .await
        .unwrap();

    let submit = |job: &str, points: Vec<u8>, agreement: &str| {
        let messages = vec![proto::SubmitBlindingRequest {
            agreement_id: agreement.into(),
            job_id: job.into(),
            points,
        }];
        let channel = globex.channel();
        async move {
            MatchingServiceClient::new(channel)
                .submit_blinding(futures::stream::iter(messages))
                .await
                .map(|r| r.into_inner())
        }
    };
    let job = fetch_work(&globex, &globex_key, ECDH)
        .await
        .unwrap()
        .remove(0);
    let n = job.header.points as usize;
    let good: Vec<u8> = reblind(&globex_key, &points_of(&job.points))
        .unwrap()
        .concat();

    // Too few points, too many, and collapsed ones: each refused by field.
    for bad in [
        good[..good.len() - 32].to_vec(),
        [good.clone(), vec![7; 32]].concat(),
        good[..32].repeat(n),
    ] {
        let job = fetch_work(&globex, &globex_key, ECDH)
            .await
            .unwrap()
            .remove(0);
        let err = submit(&job.header.job_id, bad, ECDH).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().starts_with("points:"), "{}", err.message());
        assert_eq!(
            state_of(&mut acme.clone(), ECDH).await.0,
            proto::DatasetState::Waiting
        );
    }
    // Someone else's job, or a job in another agreement.
    let job = fetch_work(&globex, &globex_key, ECDH)
        .await
        .unwrap()
        .remove(0);
    let err = MatchingServiceClient::new(acme.channel())
        .submit_blinding(futures::stream::iter(vec![proto::SubmitBlindingRequest {
            agreement_id: ECDH.into(),
            job_id: job.header.job_id.clone(),
            points: good.clone(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = submit(&job.header.job_id, good.clone(), KEYED)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("agreement.matching"));
    // A job whose version was replaced before it came back.
    upload(&acme, &acme_key, &options(ECDH, "acme", dir.path()))
        .await
        .unwrap();
    let err = submit(&job.header.job_id, good.clone(), ECDH)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("blinding.job"), "{}", err.message());
    // A keyed agreement has nothing to blind.
    let err = MatchingServiceClient::new(globex.channel())
        .blinding_work(proto::BlindingWorkRequest {
            agreement_id: KEYED.into(),
            key_id: globex_key.key_id().to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The acme dataset still waits: nothing of the above was stored, and
    // every refusal is in the audit log under its rule.
    let mut acme_c = acme.clone();
    assert_eq!(
        state_of(&mut acme_c, ECDH).await.0,
        proto::DatasetState::Waiting
    );
    let entries = acme_c.audit_entries(ECDH).await.unwrap();
    let blindings: Vec<_> = entries
        .iter()
        .filter(|e| e.action().word() == "blinding")
        .collect();
    assert!(blindings.iter().all(|e| e.decision().word() == "rejected"));
    assert!(
        blindings
            .iter()
            .any(|e| e.rule.as_deref() == Some("blinding.job"))
    );
    // The real thing still works afterwards.
    match_pending(&globex, &globex_key, ECDH).await.unwrap();
    assert_eq!(
        state_of(&mut acme_c, ECDH).await.0,
        proto::DatasetState::Matched
    );
    server.stop().await.unwrap();
}

/// A party that changes keys: the server notices from the key ids, refuses
/// work and erasures under a key that did not make the current upload, and
/// asks the partner to blind again, so answers never mix two keys.
#[tokio::test]
async fn a_changed_key_is_noticed_and_the_partner_blinds_again() {
    let policies = common::both_matching_modes();
    let server = TestServer::start_with(setup(policies.path())).await;
    let (dir, truth) = synth(1_000, 0.3);
    let (old_key, new_key, globex_key) = (
        BlindingKey::generate(),
        BlindingKey::generate(),
        BlindingKey::generate(),
    );
    let mut acme = server.client("acme").await;
    let mut globex = server.client("globex").await;

    // The key id is required under ecdh and refused under keyed.
    let hash = |agreement: &str| {
        let mut c = acme.clone();
        let agreement = agreement.to_string();
        async move {
            c.get_agreement(&agreement)
                .await
                .unwrap()
                .summary
                .unwrap()
                .policy_hash
        }
    };
    for (agreement, key_id) in [
        (ECDH, vec![]),
        (ECDH, vec![1; 32]),
        (KEYED, old_key.key_id().to_vec()),
    ] {
        let mut header = common::header(&hash(agreement).await, "customers", "raw-1");
        if let Some(proto::upload_request::Part::Header(h)) = &mut header.part {
            h.agreement_id = agreement.into();
            h.key_id = key_id;
        }
        let err = common::raw_upload(&acme, vec![header]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains("key_id"), "{}", err.message());
    }

    upload(&acme, &old_key, &options(ECDH, "acme", dir.path()))
        .await
        .unwrap();
    upload(&globex, &globex_key, &options(ECDH, "globex", dir.path()))
        .await
        .unwrap();
    match_pending(&globex, &globex_key, ECDH).await.unwrap();
    match_pending(&acme, &old_key, ECDH).await.unwrap();
    assert_eq!(overlap(&mut acme, ECDH).await, truth.overlap);

    // Work or an erasure under a key that did not make acme's data.
    let err = match_pending(&acme, &new_key, ECDH).await.unwrap_err();
    assert!(err.to_string().contains("blinding.key"), "{err}");
    let erase_options = EraseOptions {
        agreement: ECDH.into(),
        dataset: "customers".into(),
        input: dir.path().join(cleanroom::synth::ACME_FILE),
        format: None,
        csv: CsvOptions::default(),
        mapping: Default::default(),
    };
    let err = erase(&acme, &new_key, &erase_options).await.unwrap_err();
    assert!(err.to_string().contains("blinding.key"), "{err}");
    assert_eq!(
        overlap(&mut acme, ECDH).await,
        truth.overlap,
        "nothing was erased"
    );

    // acme uploads again under its new key: both datasets wait, since
    // globex's points were blinded with the old one.
    upload(&acme, &new_key, &options(ECDH, "acme", dir.path()))
        .await
        .unwrap();
    assert_eq!(
        state_of(&mut acme, ECDH).await,
        (proto::DatasetState::Waiting, "globex".to_string())
    );
    assert_eq!(
        state_of(&mut globex, ECDH).await,
        (proto::DatasetState::Waiting, "acme".to_string())
    );
    let err = acme.overlap(ECDH, &[]).await.unwrap_err();
    assert!(err.to_string().contains("dataset.blinding"), "{err}");
    assert!(match_pending(&acme, &old_key, ECDH).await.is_err());

    // One round each and the answers are right again.
    let by_globex = match_pending(&globex, &globex_key, ECDH).await.unwrap();
    assert_eq!(by_globex.done.len(), 1);
    let by_acme = match_pending(&acme, &new_key, ECDH).await.unwrap();
    assert_eq!(by_acme.done.len(), 1);
    assert_eq!(by_acme.done[0].dataset, "audience");
    assert_eq!(
        state_of(&mut globex, ECDH).await.0,
        proto::DatasetState::Matched
    );
    assert_eq!(overlap(&mut acme, ECDH).await, truth.overlap);
    server.stop().await.unwrap();
}
