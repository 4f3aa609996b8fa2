//! `cleanroom console`: a web console on the partner's own machine. It
//! talks to the server as the command line does, with the partner's own
//! certificate, so no browser holds a client certificate and nothing new
//! is exposed on the server (`docs/console.md`).
//!
//! It listens on a loopback address only. A random token, in the address
//! it prints, is exchanged for a cookie on first use; every other request
//! without that cookie is refused, and so is one whose `Host` is not the
//! console's own address (a page of another site cannot reach it through
//! a name that resolves to 127.0.0.1).

mod chart;
mod pages;
mod results;

#[cfg(test)]
pub(crate) use pages::commands;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::client::{Client, ClientError};
use results::Results;

/// The name of the console's cookie.
const COOKIE: &str = "cleanroom_console";

/// What every page handler shares.
#[derive(Clone)]
struct Console {
    client: Client,
    org: Arc<str>,
    token: Arc<str>,
    /// The addresses a request's `Host` may name.
    hosts: Arc<[String]>,
    results: Results,
}

/// `n` random bytes as hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // The system's random source; a console that cannot read it refuses to
    // start rather than hand out a guessable token.
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source");
    hex::encode(bytes)
}

/// A fresh access token: 32 random bytes as hex.
pub fn new_token() -> String {
    random_hex(32)
}

/// Equal texts, compared in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Serves the console on `listener` for `org` through `client` until
/// `shutdown` resolves. `listener` must be on a loopback address.
pub async fn serve(
    listener: tokio::net::TcpListener,
    client: Client,
    org: String,
    token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other(
            "the console listens on a loopback address only (127.0.0.1 or ::1)",
        ));
    }
    let port = addr.port();
    let hosts: Vec<String> = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]
    .into();
    let console = Console {
        client,
        org: org.into(),
        token: token.into(),
        hosts: hosts.into(),
        results: Results::default(),
    };
    let app = Router::new()
        .route("/", get(enter))
        .route("/agreements", get(agreements))
        .route("/agreements/{id}", get(agreement))
        .route("/agreements/{id}/run", axum::routing::post(run))
        .route("/agreements/{id}/datasets", get(datasets))
        .route("/agreements/{id}/overlap", get(overlap_form).post(overlap))
        .route("/agreements/{id}/budget", get(budget))
        .route("/agreements/{id}/audit", get(audit))
        .route("/agreements/{id}/access", get(access))
        .route("/admin", get(admin))
        .route("/results/{file}", get(download))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Lets a request through only from the console's own address, with the
/// cookie, or to `/` with the token; every answer carries the headers that
/// keep a page from being framed, scripted, cached or referred from.
async fn guard(State(c): State<Console>, request: Request, next: Next) -> Response {
    let mut response = admit(&c, request, next).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; script-src 'none'",
        ),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn admit(c: &Console, request: Request, next: Next) -> Response {
    let host_ok = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| c.hosts.iter().any(|ok| ok == h));
    if !host_ok {
        return (
            StatusCode::FORBIDDEN,
            "this console answers on its own address only",
        )
            .into_response();
    }
    let cookie_ok = cookie(request.headers()).is_some_and(|t| same(&t, &c.token));
    let token_ok = request.uri().path() == "/"
        && request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .is_some_and(|t| same(t, &c.token));
    if cookie_ok || token_ok {
        return next.run(request).await;
    }
    (StatusCode::UNAUTHORIZED, Html(pages::unauthorised())).into_response()
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            kv.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(String::from)
        })
}

/// The token exchanged for a cookie, and on to the agreements.
async fn enter(State(c): State<Console>) -> Response {
    let mut response = Redirect::to("/agreements").into_response();
    let value = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict", c.token);
    if let Ok(v) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// A refusal or failure of the server, as the console shows it: the rule
/// the server named, its text, and what to do. Every answer of the server
/// names a rule; a status without one came from the transport (the server
/// unreachable, the connection dropped) and is said as such.
fn refusal(e: &ClientError) -> maud::Markup {
    use tonic_types::StatusExt;
    let Some(status) = e.status() else {
        return pages::unreachable(&e.to_string());
    };
    match status.get_error_details().error_info() {
        Some(info) => {
            let rule = info.reason.as_str();
            pages::refusal(Some(rule), status.message(), crate::rules::advice(rule))
        }
        None => match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => pages::unreachable(status.message()),
            _ => pages::refusal(None, status.message(), None),
        },
    }
}

/// A page's body from an answer of the server, or the refusal instead.
fn shown<T>(
    answer: Result<T, ClientError>,
    render: impl FnOnce(&T) -> maud::Markup,
) -> maud::Markup {
    match answer {
        Ok(value) => render(&value),
        Err(e) => refusal(&e),
    }
}

fn html(c: &Console, title: &str, agreement: Option<&str>, body: maud::Markup) -> Response {
    Html(pages::page(title, &c.org, agreement, body)).into_response()
}

async fn agreements(State(c): State<Console>) -> Response {
    let body = shown(c.client.clone().list_agreements().await, |list| {
        pages::agreements(list)
    });
    html(&c, "Agreements", None, body)
}

async fn agreement(State(c): State<Console>, Path(id): Path<String>) -> Response {
    match c.client.clone().get_agreement(&id).await {
        Ok(a) => html(&c, &id, Some(&id), pages::agreement(&a, "")),
        Err(e) => html(&c, &id, None, refusal(&e)),
    }
}

/// Runs a template or SQL from the agreement page: the answer, or the
/// refusal beside the question asked.
async fn run(
    State(c): State<Console>,
    Path(id): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let (template, sql) = (field("template"), field("sql"));
    let epsilon = match field("epsilon").as_str() {
        "" => None,
        text => match text.parse::<f64>() {
            Ok(x) => Some(x),
            Err(_) => {
                let body = pages::refusal(
                    None,
                    "epsilon must be a number, or empty for the agreement's largest",
                    None,
                );
                return html(&c, &id, Some(&id), body);
            }
        },
    };
    let mut client = c.client.clone();
    let answer = if template.is_empty() {
        client.query_with_epsilon(&id, &sql, epsilon).await
    } else {
        let params: BTreeMap<String, String> = fields
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("param.")
                    .map(|name| (name.to_string(), v.trim().to_string()))
            })
            .collect();
        client.run_template(&id, &template, &params, epsilon).await
    };
    let asked = if template.is_empty() {
        "Your query"
    } else {
        template.as_str()
    };
    match answer {
        Ok(answer) => {
            let (rid, kept) = c.results.keep(&id, answer);
            let body = pages::answer(&id, &rid, &kept.answer);
            html(&c, &format!("{asked}: answer"), Some(&id), body)
        }
        Err(e) => {
            let form = match c.client.clone().get_agreement(&id).await {
                Ok(a) => pages::agreement(&a, &sql),
                Err(_) => maud::html! {},
            };
            let body = maud::html! { (refusal(&e)) (form) };
            html(&c, &format!("{asked}: refused"), Some(&id), body)
        }
    }
}

/// A kept answer as CSV or Parquet: what the page showed, not a new query.
async fn download(State(c): State<Console>, Path(file): Path<String>) -> Response {
    let (id, kind) = match file.rsplit_once('.') {
        Some((id, kind @ ("csv" | "parquet"))) => (id, kind),
        _ => return (StatusCode::NOT_FOUND, "no such download").into_response(),
    };
    let Some(kept) = c.results.get(id) else {
        return (
            StatusCode::NOT_FOUND,
            "this answer is no longer kept: run the question again",
        )
            .into_response();
    };
    let (bytes, mime) = match kind {
        "csv" => (results::csv(&kept).map_err(|e| e.to_string()), "text/csv"),
        _ => (
            results::parquet(&kept).map_err(|e| e.to_string()),
            "application/vnd.apache.parquet",
        ),
    };
    match bytes {
        Ok(bytes) => {
            let name = format!("attachment; filename=\"{}.{kind}\"", kept.agreement);
            let mut response = bytes.into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
            if let Ok(v) = HeaderValue::from_str(&name) {
                headers.insert(header::CONTENT_DISPOSITION, v);
            }
            response
        }
        Err(detail) => {
            tracing::warn!(%detail, "encoding a download");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the answer could not be encoded",
            )
                .into_response()
        }
    }
}

async fn datasets(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let body = shown(c.client.clone().list_datasets(&id).await, |list| {
        pages::datasets(&id, list)
    });
    html(&c, "Your datasets", Some(&id), body)
}

async fn overlap_form(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let body = match c.client.clone().get_agreement(&id).await {
        Ok(a) => pages::overlap_form(&id, a.privacy.is_some()),
        Err(e) => refusal(&e),
    };
    html(&c, "Overlap", Some(&id), body)
}

async fn overlap(
    State(c): State<Console>,
    Path(id): Path<String>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let epsilon = fields
        .iter()
        .find(|(k, _)| k == "epsilon")
        .and_then(|(_, v)| v.trim().parse::<f64>().ok());
    let body = shown(
        c.client
            .clone()
            .overlap_with_epsilon(&id, &[], epsilon)
            .await,
        pages::overlap,
    );
    html(&c, "Overlap", Some(&id), body)
}

async fn budget(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let body = shown(c.client.clone().budget(&id).await, pages::budget);
    html(&c, "Privacy budget", Some(&id), body)
}

async fn audit(
    State(c): State<Console>,
    Path(id): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Response {
    let after = q.get("after").cloned().unwrap_or_default();
    let body = shown(c.client.clone().audit_page(&id, 50, &after).await, |page| {
        pages::audit(&id, page, &after)
    });
    html(&c, "Audit log", Some(&id), body)
}

async fn admin(State(c): State<Console>) -> Response {
    let body = shown(c.client.clone().admin_status().await, pages::admin);
    html(&c, "Administration", None, body)
}

async fn access(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let body = shown(c.client.clone().access_report(&id).await, |r| {
        pages::access(r)
    });
    html(&c, "Access report", Some(&id), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_compared_whole() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..63]));
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; cleanroom_console=abc; b=2"),
        );
        assert_eq!(cookie(&headers).as_deref(), Some("abc"));
        assert_eq!(cookie(&HeaderMap::new()), None);
    }
}
