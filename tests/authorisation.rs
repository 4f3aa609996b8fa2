//! The authorisation matrix: every RPC, called by a party holding the right
//! it needs, a party without it, an organisation in no agreement, and a
//! caller without a certificate, while the agreement is in force,
//! suspended and expired. Every cell has its expected status code, and no
//! refused call changes what the server holds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cleanroom::client::Client;
use cleanroom::clock::ManualClock;
use cleanroom::proto;
use common::people::{Row, customers, demo_policy, fingerprint};
use common::{Setup, TestServer};
use time::macros::datetime;
use tonic::Code;

const ID: &str = "retail-media-demo";

/// The demo agreement with acme holding every right (admin too) and globex
/// only `upload`, so each right has a party without it.
fn policy_text() -> String {
    let text =
        std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml")).unwrap();
    text.replace(
        "rights = [\"upload\", \"query\", \"receive_results\", \"see_overlap\"]",
        "rights = [\"upload\", \"query\", \"receive_results\", \"see_overlap\", \"admin\"]",
    )
    .replace(
        "rights = [\"upload\", \"see_overlap\"]",
        "rights = [\"upload\"]",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// A party holding the right the call needs (acme).
    WithRight,
    /// A party without it (globex; for calls any party may make, the same
    /// as WithRight).
    WithoutRight,
    /// initech: party to nothing.
    Outsider,
    /// No client certificate.
    Anonymous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InForce,
    Suspended,
    Expired,
}

const RPCS: [&str; 12] = [
    "WhoAmI",
    "ListAgreements",
    "GetAgreement",
    "ListAuditEntries",
    "Upload",
    "ListDatasets",
    "Erase",
    "AccessReport",
    "AdminStatus",
    "Overlap",
    "Query",
    "Budget",
];

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn call(rpc: &str, client: &Client, hash: &str, policy: &cleanroom::policy::Policy) -> Code {
    let ch = client.channel();
    let agreement = || ID.to_string();
    match rpc {
        "WhoAmI" => code_of(
            proto::agreements_service_client::AgreementsServiceClient::new(ch)
                .who_am_i(proto::WhoAmIRequest::default())
                .await,
        ),
        "ListAgreements" => code_of(
            proto::agreements_service_client::AgreementsServiceClient::new(ch)
                .list_agreements(proto::ListAgreementsRequest::default())
                .await,
        ),
        "GetAgreement" => code_of(
            proto::agreements_service_client::AgreementsServiceClient::new(ch)
                .get_agreement(proto::GetAgreementRequest {
                    agreement_id: agreement(),
                })
                .await,
        ),
        "ListAuditEntries" => code_of(
            proto::audit_service_client::AuditServiceClient::new(ch)
                .list_audit_entries(proto::ListAuditEntriesRequest {
                    agreement_id: agreement(),
                    ..Default::default()
                })
                .await,
        ),
        "Upload" => {
            let batch = customers(policy, &(0..60).map(Row::new).collect::<Vec<_>>());
            code_of(
                common::raw_upload(
                    client,
                    vec![
                        common::header(hash, "customers", "matrix-upload"),
                        common::batch_msg(&batch),
                        common::commit(60, 1),
                    ],
                )
                .await,
            )
        }
        "ListDatasets" => code_of(
            proto::datasets_service_client::DatasetsServiceClient::new(ch)
                .list_datasets(proto::ListDatasetsRequest {
                    agreement_id: agreement(),
                })
                .await,
        ),
        "Erase" => code_of(
            proto::datasets_service_client::DatasetsServiceClient::new(ch)
                .erase(proto::EraseRequest {
                    agreement_id: agreement(),
                    dataset: "customers".into(),
                    policy_hash: hash.to_string(),
                    key_id: Vec::new(),
                    sets: vec![proto::FingerprintSet {
                        kind: "email".into(),
                        fingerprints: fingerprint(999_999, 0).to_vec(),
                    }],
                })
                .await,
        ),
        "AccessReport" => code_of(
            proto::governance_service_client::GovernanceServiceClient::new(ch)
                .access_report(proto::AccessReportRequest {
                    agreement_id: agreement(),
                })
                .await,
        ),
        "AdminStatus" => code_of(
            proto::governance_service_client::GovernanceServiceClient::new(ch)
                .admin_status(proto::AdminStatusRequest::default())
                .await,
        ),
        "Overlap" => code_of(
            proto::matching_service_client::MatchingServiceClient::new(ch)
                .overlap(proto::OverlapRequest {
                    agreement_id: agreement(),
                    ..Default::default()
                })
                .await,
        ),
        "Query" => {
            let r = proto::queries_service_client::QueriesServiceClient::new(ch)
                .query(proto::QueryRequest {
                    agreement_id: agreement(),
                    sql: "SELECT COUNT(*) FROM customers c JOIN audience a ON c.email = a.email"
                        .into(),
                    epsilon: Some(0.01),
                    ..Default::default()
                })
                .await;
            match r {
                Err(s) => s.code(),
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(_)) => {}
                            Ok(None) => break Code::Ok,
                            Err(s) => break s.code(),
                        }
                    }
                }
            }
        }
        "Budget" => code_of(
            proto::queries_service_client::QueriesServiceClient::new(ch)
                .budget(proto::BudgetRequest {
                    agreement_id: agreement(),
                })
                .await,
        ),
        other => panic!("unknown rpc {other}"),
    }
}

/// The expected code of one cell.
fn expected(rpc: &str, caller: Caller, state: State) -> Code {
    use Caller::*;
    use Code::*;
    if caller == Anonymous {
        return Unauthenticated;
    }
    match rpc {
        "WhoAmI" | "ListAgreements" => return Ok,
        "AdminStatus" => {
            return if caller == WithRight {
                Ok
            } else {
                PermissionDenied
            };
        }
        _ => {}
    }
    if caller == Outsider {
        return NotFound;
    }
    // Reading what the agreement holds is allowed in every state.
    let acts = matches!(rpc, "Upload" | "Erase" | "Overlap" | "Query");
    if !acts {
        return Ok;
    }
    if state != State::InForce {
        return FailedPrecondition;
    }
    if caller == WithoutRight {
        return PermissionDenied;
    }
    Ok
}

/// What the server holds of the agreement, as its parties can see it:
/// versions and rows of each dataset, and the budget spent.
async fn holdings(acme: &mut Client, globex: &mut Client) -> String {
    let mut out = String::new();
    for c in [acme, globex] {
        for d in c.list_datasets(ID).await.unwrap() {
            out += &format!(
                "{} {} {} {};",
                d.dataset,
                d.version,
                d.rows,
                d.committed_at.map(|t| t.seconds).unwrap_or_default()
            );
        }
        let b = c.budget(ID).await.unwrap();
        out += &format!("budget {} {};", b.epsilon_spent, b.queries);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_for_every_caller_in_every_state() {
    let policies = tempfile::tempdir().unwrap();
    let file = policies.path().join("retail-media-demo.toml");
    std::fs::write(&file, policy_text()).unwrap();
    let clock = ManualClock::new(datetime!(2026-11-20 12:00 UTC));
    let server = TestServer::start_with(Setup {
        policies: policies.path().to_path_buf(),
        clock: Arc::new(clock.clone()),
        maintenance_interval: Duration::from_secs(3600),
        ..Setup::default()
    })
    .await;
    let policy = demo_policy(
        Some("epsilon_total = 10.0\nepsilon_per_query_max = 1.0\ndelta = 1e-7"),
        50,
    );
    let (data, _) = common::synth(2_000, 0.5);
    common::upload_demo(&server, "acme", data.path()).await;
    common::upload_demo(&server, "globex", data.path()).await;
    let mut acme = server.client("acme").await;
    let mut globex = server.client("globex").await;
    let hash = common::policy_hash(&server).await;
    let anonymous = Client::connect(&server.config(None)).await.unwrap();
    let callers = [
        (Caller::WithRight, server.client("acme").await),
        (Caller::WithoutRight, server.client("globex").await),
        (Caller::Outsider, server.client("initech").await),
        (Caller::Anonymous, anonymous),
    ];
    let mut failures = Vec::new();
    let mut cells = 0;
    for state in [State::InForce, State::Suspended, State::Expired] {
        match state {
            State::InForce => {}
            State::Suspended => {
                std::fs::remove_file(&file).unwrap();
                assert!(common::reaches_state(&acme, proto::AgreementState::Suspended).await);
            }
            State::Expired => {
                std::fs::write(&file, policy_text()).unwrap();
                assert!(common::reaches_state(&acme, proto::AgreementState::Active).await);
                clock.set(datetime!(2028-01-02 12:00 UTC));
            }
        }
        for rpc in RPCS {
            for (caller, client) in &callers {
                let before = holdings(&mut acme, &mut globex).await;
                let audit_before = acme.audit_entries(ID).await.unwrap().len();
                let got = call(rpc, client, &hash, &policy).await;
                let want = expected(rpc, *caller, state);
                cells += 1;
                if got != want {
                    failures.push(format!(
                        "{rpc} by {caller:?} when {state:?}: got {got:?}, expected {want:?}"
                    ));
                }
                if got != Code::Ok {
                    let after = holdings(&mut acme, &mut globex).await;
                    if after != before {
                        failures.push(format!("{rpc} by {caller:?} when {state:?} was refused but changed {before} into {after}"));
                    }
                    let audit_after = acme.audit_entries(ID).await.unwrap().len();
                    if matches!(caller, Caller::Outsider | Caller::Anonymous)
                        && audit_after != audit_before
                    {
                        failures.push(format!(
                            "{rpc} by {caller:?} when {state:?} grew the audit log"
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "authorisation matrix: {cells} cells, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(cells, 12 * 4 * 3);
    server.stop().await.unwrap();
}
