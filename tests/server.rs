//! The server over real mutual TLS on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cleanroom::client::{Client, ClientConfig};
use cleanroom::clock::ManualClock;
use cleanroom::proto;
use common::{Pki, Setup, TestServer};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health(client: &Client) -> ServingStatus {
    health_of(client, "").await
}

async fn health_of(client: &Client, service: &str) -> ServingStatus {
    let response = HealthClient::new(client.channel())
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

#[tokio::test]
async fn a_party_sees_its_agreement() {
    let server = TestServer::start().await;
    let mut acme = server.client("acme").await;

    let me = acme.who_am_i().await.unwrap();
    assert_eq!(me.organisation, "acme");
    assert_eq!(me.agreement_count, 1);

    let list = acme.list_agreements().await.unwrap();
    assert_eq!(list.len(), 1);
    let summary = &list[0];
    assert_eq!(summary.id, "retail-media-demo");
    assert_eq!(summary.state, proto::AgreementState::Active as i32);
    assert_eq!(summary.policy_hash.len(), 64);
    let mut rights = summary.my_rights.clone();
    rights.sort();
    assert_eq!(
        rights,
        vec![
            proto::Right::Upload as i32,
            proto::Right::Query as i32,
            proto::Right::ReceiveResults as i32,
            proto::Right::SeeOverlap as i32
        ]
    );

    // acme may query, so it sees both datasets, but not globex's sensitive column.
    let a = acme.get_agreement("retail-media-demo").await.unwrap();
    assert_eq!(a.salt.len(), 64);
    assert_eq!(a.query.as_ref().unwrap().min_group_size, 50);
    let names: Vec<&str> = a.datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["customers", "audience"]);
    let audience = &a.datasets[1];
    assert!(audience.columns.iter().all(|c| c.name != "health_interest"));
    assert!(audience.columns.iter().any(|c| c.name == "spend"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_party_without_query_right_sees_only_its_own_dataset() {
    let server = TestServer::start().await;
    let mut globex = server.client("globex").await;
    let a = globex.get_agreement("retail-media-demo").await.unwrap();
    let names: Vec<&str> = a.datasets.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["audience"]);
    // Its own dataset in full, sensitive column included, so its client knows to drop it.
    let sensitive = a.datasets[0]
        .columns
        .iter()
        .find(|c| c.name == "health_interest")
        .unwrap();
    assert_eq!(sensitive.role, proto::ColumnRole::Sensitive as i32);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_non_party_gets_not_found_exactly_like_a_missing_agreement() {
    let server = TestServer::start().await;
    let mut initech = server.client("initech").await;
    assert_eq!(initech.who_am_i().await.unwrap().agreement_count, 0);
    assert!(initech.list_agreements().await.unwrap().is_empty());

    let hidden = initech
        .get_agreement("retail-media-demo")
        .await
        .unwrap_err();
    let missing = initech
        .get_agreement("no-such-agreement")
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Some(Code::NotFound));
    assert_eq!(missing.code(), Some(Code::NotFound));
    let text = |e: &cleanroom::client::ClientError| match e {
        cleanroom::client::ClientError::Status(s) => s.message().replace("no-such-agreement", "X"),
        other => panic!("{other}"),
    };
    assert_eq!(
        text(&hidden).replace("retail-media-demo", "X"),
        text(&missing)
    );

    let empty = initech.get_agreement("").await.unwrap_err();
    assert_eq!(empty.code(), Some(Code::InvalidArgument));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_client_without_a_certificate_is_unauthenticated() {
    let server = TestServer::start().await;
    let mut anonymous = Client::connect(&server.config(None)).await.unwrap();
    let err = anonymous.who_am_i().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    let err = anonymous.list_agreements().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    let err = anonymous
        .get_agreement("retail-media-demo")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated));
    // Health stays reachable for probes that carry no certificate.
    assert_eq!(health(&anonymous).await, ServingStatus::Serving);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let server = TestServer::start().await;
    let other = Pki::new();
    let config = ClientConfig::new(server.url(), server.pki.path().join("ca.pem")).with_identity(
        other.path().join("acme.pem"),
        other.path().join("acme-key.pem"),
    );
    // With TLS 1.3 the client learns of the rejection at connect or at the first call.
    let outcome = match Client::connect(&config).await {
        Err(e) => Err(e),
        Ok(mut client) => client.who_am_i().await.map(|_| ()),
    };
    let err = outcome.expect_err("a foreign client certificate must be refused");
    assert_ne!(err.code(), Some(Code::Ok));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_by_the_client() {
    let server = TestServer::start().await;
    let other = Pki::new();
    let config = ClientConfig::new(server.url(), other.path().join("ca.pem")).with_identity(
        other.path().join("acme.pem"),
        other.path().join("acme-key.pem"),
    );
    assert!(Client::connect(&config).await.is_err());
    server.stop().await.unwrap();
}

#[tokio::test]
async fn health_turns_not_serving_during_shutdown_then_the_server_exits() {
    let mut server = TestServer::start_with(Setup {
        shutdown_grace: Duration::from_millis(1500),
        ..Setup::default()
    })
    .await;
    let acme = server.client("acme").await;
    assert_eq!(health(&acme).await, ServingStatus::Serving);
    for service in [
        "cleanroom.v1.AgreementsService",
        "cleanroom.v1.DatasetsService",
        "cleanroom.v1.MatchingService",
        "cleanroom.v1.QueriesService",
        "cleanroom.v1.AuditService",
        "cleanroom.v1.GovernanceService",
        "arrow.flight.protocol.FlightService",
    ] {
        assert_eq!(
            health_of(&acme, service).await,
            ServingStatus::Serving,
            "{service}"
        );
    }

    server.begin_shutdown();
    let mut status = ServingStatus::Serving;
    for _ in 0..50 {
        status = health(&acme).await;
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    assert_eq!(
        health_of(&acme, "cleanroom.v1.QueriesService").await,
        ServingStatus::NotServing
    );
    // Calls still finish during the grace period.
    let mut acme2 = acme.clone();
    assert_eq!(acme2.who_am_i().await.unwrap().organisation, "acme");

    let task = server.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server stops after the grace period")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn agreement_state_follows_the_clock() {
    let clock = ManualClock::new(time::macros::datetime!(2028-01-01 00:00 UTC));
    let server = TestServer::start_with(Setup {
        clock: Arc::new(clock.clone()),
        ..Setup::default()
    })
    .await;
    let mut acme = server.client("acme").await;
    let list = acme.list_agreements().await.unwrap();
    assert_eq!(list[0].state, proto::AgreementState::Expired as i32);
    clock.set(time::macros::datetime!(2025-06-01 00:00 UTC));
    let list = acme.list_agreements().await.unwrap();
    assert_eq!(list[0].state, proto::AgreementState::Pending as i32);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_invalid_policy_stops_the_start_with_the_policy_check_message() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(common::policies_dir().join("retail-media-demo.toml"))
        .unwrap()
        .replace("min_group_size = 50", "min_group_size = 1");
    std::fs::write(dir.path().join("retail-media-demo.toml"), text).unwrap();
    let server = TestServer::start_with(Setup {
        policies: dir.path().to_path_buf(),
        ..Setup::default()
    })
    .await;
    let err = server.stop().await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("retail-media-demo.toml: query.min_group_size: must be at least 2"),
        "{message}"
    );
}

/// Lists the services reflection version `$v` names, and the services of
/// the file that defines the Flight service.
macro_rules! reflected {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "arrow.flight.protocol.FlightService".into(),
                )),
            },
        ];
        let mut responses = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("expected a service list");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
            panic!("expected the Flight service's file, got {response:?}");
        };
        let flight_methods: Vec<String> = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| {
                <prost_types::FileDescriptorProto as prost::Message>::decode(&bytes[..]).unwrap()
            })
            .flat_map(|f| f.service)
            .filter(|s| s.name() == "FlightService")
            .flat_map(|s| s.method)
            .map(|m| m.name().to_string())
            .collect();
        (names, flight_methods)
    }};
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service_flight_sql_included() {
    let server = TestServer::start().await;
    let acme = server.client("acme").await;
    let expected = [
        "cleanroom.v1.AgreementsService",
        "cleanroom.v1.DatasetsService",
        "cleanroom.v1.MatchingService",
        "cleanroom.v1.QueriesService",
        "cleanroom.v1.GovernanceService",
        "cleanroom.v1.AuditService",
        "arrow.flight.protocol.FlightService",
        "grpc.health.v1.Health",
    ];
    let v1 = reflected!(v1, acme.channel());
    let v1alpha = reflected!(v1alpha, acme.channel());
    for (version, (names, flight_methods)) in [("v1", v1), ("v1alpha", v1alpha)] {
        for service in expected {
            assert!(
                names.iter().any(|n| n == service),
                "{version}: {service} missing from {names:?}"
            );
        }
        for method in ["GetFlightInfo", "DoGet", "DoAction", "Handshake"] {
            assert!(
                flight_methods.iter().any(|m| m == method),
                "{version}: FlightService lacks {method}: {flight_methods:?}"
            );
        }
    }
    server.stop().await.unwrap();
}
