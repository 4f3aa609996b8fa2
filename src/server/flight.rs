//! Arrow Flight SQL, for the analysts' own tools (ADBC and JDBC drivers,
//! pandas, polars, DuckDB, BI tools), on the server's port with the same
//! mutual TLS and organisation identity as every other service.
//!
//! - A statement runs exactly as the `Query` RPC runs it
//!   ([`Room::governed`]): the same checker, release boundary,
//!   minimum group size, privacy charge, audit entry, error codes and texts.
//!   `GetFlightInfo` checks it without reading any row (a refusal is
//!   audited there); `DoGet` runs it, charges and audits it.
//! - The agreement is chosen by the call header `x-cleanroom-agreement`
//!   (with one agreement the caller may query, it may be left out), the
//!   privacy budget to spend by `x-cleanroom-epsilon`.
//! - Metadata describes only what the caller may see: a catalog per
//!   agreement it may query, one schema (`public`), a table per dataset it
//!   may see with its declared columns, each tagged with its role.
//! - Everything else (updates, ingestion, Substrait plans, transactions,
//!   prepared statements) is refused with a text that says so.

use std::pin::Pin;
use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::metadata::{
    GetCatalogsBuilder, GetDbSchemasBuilder, GetTablesBuilder, SqlInfoData, SqlInfoDataBuilder,
};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginSavepointRequest, ActionBeginSavepointResult, ActionBeginTransactionRequest,
    ActionBeginTransactionResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    ActionEndSavepointRequest, ActionEndTransactionRequest, Any, CommandGetCatalogs,
    CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, CommandPreparedStatementUpdate, CommandStatementIngest,
    CommandStatementQuery, CommandStatementSubstraitPlan, CommandStatementUpdate, ProstMessageExt,
    SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{Stream, StreamExt};
use prost::Message;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::auth::caller;
use crate::policy::{ColumnRole, Policy, Right};
use crate::proto;
use crate::room::{Ask, Room, RoomError, bounded_name};

/// The call header that names the agreement a statement runs under.
pub const AGREEMENT_HEADER: &str = "x-cleanroom-agreement";
/// The call header with the privacy budget a statement may spend.
pub const EPSILON_HEADER: &str = "x-cleanroom-epsilon";
/// The one database schema of every catalog.
pub const SCHEMA_NAME: &str = "public";
/// Schema metadata: the noise an answer carries, as JSON (privacy only).
pub const PRIVACY_METADATA: &str = "cleanroom.privacy";

type FlightStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>;

/// Implements Flight SQL over the server's state.
#[derive(Clone)]
pub struct FlightSqlEndpoint {
    room: Room,
    info: Arc<SqlInfoData>,
}

impl std::fmt::Debug for FlightSqlEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlightSqlEndpoint")
    }
}

impl FlightSqlEndpoint {
    pub fn new(room: Room) -> Self {
        let mut info = SqlInfoDataBuilder::new();
        info.append(SqlInfo::FlightSqlServerName, "cleanroom");
        info.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
        info.append(SqlInfo::FlightSqlServerArrowVersion, "59");
        info.append(SqlInfo::FlightSqlServerReadOnly, true);
        info.append(SqlInfo::FlightSqlServerSql, true);
        info.append(SqlInfo::FlightSqlServerSubstrait, false);
        info.append(SqlInfo::FlightSqlServerTransaction, 0i32);
        info.append(SqlInfo::FlightSqlServerCancel, false);
        let info = info.build().expect("fixed server information builds");
        FlightSqlEndpoint {
            room,
            info: Arc::new(info),
        }
    }

    /// The agreement a call concerns: its header, or the one agreement the
    /// caller may query.
    fn agreement_of(&self, org: &str, headers: &MetadataMap) -> Result<String, RoomError> {
        if let Some(value) = headers.get(AGREEMENT_HEADER) {
            let id = value
                .to_str()
                .map_err(|_| RoomError::invalid("x-cleanroom-agreement", "must be text"))?;
            bounded_name("x-cleanroom-agreement", id)?;
            return Ok(id.to_string());
        }
        match self.catalogs(org).as_slice() {
            [only] => Ok(only.id().to_string()),
            _ => Err(RoomError::invalid(
                "x-cleanroom-agreement",
                "name the agreement with the call header x-cleanroom-agreement (ADBC: adbc.flight.sql.rpc.call_header.x-cleanroom-agreement)",
            )),
        }
    }

    fn epsilon_of(headers: &MetadataMap) -> Result<Option<f64>, RoomError> {
        headers
            .get(EPSILON_HEADER)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|t| t.trim().parse::<f64>().ok())
                    .ok_or_else(|| RoomError::invalid("x-cleanroom-epsilon", "must be a number"))
            })
            .transpose()
    }

    /// Agreements `org` may query, for the catalog listings.
    fn catalogs(&self, org: &str) -> Vec<Arc<Policy>> {
        self.room
            .policies()
            .for_org(org)
            .filter(|p| p.allows(org, Right::Query))
            .cloned()
            .collect()
    }
}

/// Every field nullable, no metadata: the released table's shape, the same
/// in the flight's description and in its stream.
fn released_schema(schema: &Schema) -> Schema {
    Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), crate::query::caller_type(f.data_type()), true))
            .collect::<Vec<_>>(),
    )
}

/// The noise an answer carries, as schema metadata.
fn privacy_json(noise: &crate::privacy::Report) -> String {
    serde_json::json!({
        "mechanism": noise.mechanism,
        "epsilon": noise.epsilon,
        "delta": noise.delta,
        "threshold": noise.threshold,
        "threshold_scale": noise.threshold_scale,
        "max_groups_per_person": noise.max_groups_per_person,
        "max_rows_per_person": noise.max_rows_per_person,
        "columns": noise.columns.iter().map(|c| serde_json::json!({
            "epsilon": c.epsilon,
            "scale": c.scale,
            "count_scale": c.count_scale,
            "half_width_95": c.half_width_95,
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

fn with_metadata(schema: Schema, policy: &Policy, noise: Option<String>) -> Schema {
    let mut metadata = std::collections::HashMap::from([
        ("cleanroom.agreement".to_string(), policy.id().to_string()),
        (
            "cleanroom.min_group_size".to_string(),
            policy.query().min_group_size().to_string(),
        ),
    ]);
    if let Some(noise) = noise {
        metadata.insert(PRIVACY_METADATA.to_string(), noise);
    }
    schema.with_metadata(metadata)
}

fn flight_info(schema: &Schema, ticket: Vec<u8>) -> Result<FlightInfo, Status> {
    FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|_| Status::internal("describing the result failed"))
        .map(|info| {
            info.with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
                .with_ordered(true)
        })
}

fn stream_of(schema: SchemaRef, batches: Vec<RecordBatch>) -> Response<FlightStream> {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map(|r| r.map_err(|_| Status::internal("encoding the result failed")));
    Response::new(Box::pin(stream))
}

/// Most characters in a metadata filter pattern.
const MAX_PATTERN: usize = 256;

/// A metadata filter pattern the caller sent, refused past
/// [`MAX_PATTERN`] characters (naming the field, not echoing it).
fn pattern_field(field: &'static str, pattern: &Option<String>) -> Result<(), Status> {
    match pattern {
        Some(p) if p.chars().count() > MAX_PATTERN => Err(RoomError::invalid(
            field,
            format!("a filter pattern is at most {MAX_PATTERN} characters"),
        )
        .into()),
        _ => Ok(()),
    }
}

/// `%` and `_` patterns of Flight SQL's metadata filters, matched in at
/// most (pattern length x text length) steps: on a mismatch after a `%`,
/// the text resumes one past where that `%` last started, and only the
/// last `%` is ever returned to. (Trying every split at every `%` took
/// time exponential in the number of `%`s.)
fn like(pattern: Option<&str>, text: &str) -> bool {
    let Some(pattern) = pattern else {
        return true;
    };
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut i, mut j) = (0, 0);
    // The last `%` seen, and where in the text it began to match.
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == '%' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && (p[i] == '_' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if let Some((s, from)) = star {
            star = Some((s, from + 1));
            i = s + 1;
            j = from + 1;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '%')
}

/// A dataset's table as the caller sees it: its declared columns, each
/// tagged with its role; sensitive ones left out.
fn table_schema(dataset: &crate::policy::Dataset) -> Schema {
    let fields: Vec<Field> = dataset
        .uploaded_columns()
        .filter_map(|c| {
            let t = crate::upload::column_type(c.role())?;
            let role = match c.role() {
                ColumnRole::Identifier { kind } => format!("identifier ({kind}): joins only"),
                other => other.name().to_string(),
            };
            Some(
                Field::new(c.name(), t, true)
                    .with_metadata([("cleanroom.role".to_string(), role)].into_iter().collect()),
            )
        })
        .collect();
    Schema::new(fields)
}

fn refused(what: &str) -> Status {
    use tonic_types::StatusExt;
    Status::with_error_details(
        tonic::Code::Unimplemented,
        format!(
            "rule flight.unsupported: {what} is not supported: this clean room answers governed aggregate SELECT statements only"
        ),
        tonic_types::ErrorDetails::with_error_info(
            "flight.unsupported",
            crate::rules::DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}

/// Refuses a request of an authenticated caller: unauthenticated callers
/// learn nothing more than that.
fn refuse<T, R>(request: &Request<R>, refusal: Status) -> Result<T, Status> {
    caller(request)?;
    Err(refusal)
}

/// The flight of a metadata command: its result's schema, and the command
/// itself as the ticket.
fn describe<R>(
    request: &Request<R>,
    schema: &Schema,
    command: impl ProstMessageExt,
) -> Result<Response<FlightInfo>, Status> {
    caller(request)?;
    Ok(Response::new(flight_info(
        schema,
        command.as_any().encode_to_vec(),
    )?))
}

/// A metadata listing as a stream, or a fixed text if it could not be built.
fn listing<E>(
    schema: SchemaRef,
    batch: Result<RecordBatch, E>,
    what: &str,
) -> Result<Response<FlightStream>, Status> {
    let batch = batch.map_err(|_| Status::internal(format!("listing {what} failed")))?;
    Ok(stream_of(schema, vec![batch]))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlEndpoint {
    type FlightService = FlightSqlEndpoint;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let org = caller(&request)?;
        let agreement_id = self.agreement_of(&org, request.metadata())?;
        let epsilon = Self::epsilon_of(request.metadata())?;
        let ask = Ask {
            agreement: agreement_id,
            sql: query.query,
            epsilon,
            ..Ask::default()
        };
        let checked = self.room.dry_run(&org, &ask).await?;
        let schema = with_metadata(
            released_schema(&checked.schema),
            &checked.policy,
            checked.noise.as_ref().map(privacy_json),
        );
        let ticket = TicketStatementQuery {
            statement_handle: proto::QueryRequest::from(ask).encode_to_vec().into(),
        };
        Ok(Response::new(flight_info(
            &schema,
            ticket.as_any().encode_to_vec(),
        )?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        let org = caller(&request)?;
        let query_request =
            proto::QueryRequest::decode(ticket.statement_handle.as_ref()).map_err(|_| {
                Status::from(RoomError::invalid(
                    "ticket",
                    "is not one this server issued",
                ))
            })?;
        let governed = self.room.governed(&org, &query_request.into()).await?;
        let noise = governed.outcome.privacy.as_ref().map(privacy_json);
        let schema = Arc::new(with_metadata(
            released_schema(&governed.outcome.schema),
            &governed.policy,
            noise,
        ));
        let batches = governed
            .outcome
            .batches
            .iter()
            .map(|b| RecordBatch::try_new(Arc::clone(&schema), b.columns().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Status::internal("encoding the result failed"))?;
        Ok(stream_of(schema, batches))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        describe(&request, &query.into_builder().schema(), query)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        let org = caller(&request)?;
        let mut builder: GetCatalogsBuilder = query.into_builder();
        for p in self.catalogs(&org) {
            builder.append(p.id());
        }
        listing(builder.schema(), builder.build(), "catalogs")
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        describe(&request, &query.clone().into_builder().schema(), query)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        let org = caller(&request)?;
        // Matched by arrow's LIKE kernel (a regular expression, linear in
        // the text), and bounded like every pattern a caller sends.
        pattern_field("db_schema_filter_pattern", &query.db_schema_filter_pattern)?;
        let mut builder: GetDbSchemasBuilder = query.into_builder();
        for p in self.catalogs(&org) {
            builder.append(p.id(), SCHEMA_NAME);
        }
        listing(builder.schema(), builder.build(), "schemas")
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        describe(&request, &query.clone().into_builder().schema(), query)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        let org = caller(&request)?;
        let schema_pattern = query.db_schema_filter_pattern.clone();
        let table_pattern = query.table_name_filter_pattern.clone();
        pattern_field("db_schema_filter_pattern", &schema_pattern)?;
        pattern_field("table_name_filter_pattern", &table_pattern)?;
        let catalog = query.catalog.clone();
        let types = query.table_types.clone();
        let mut builder: GetTablesBuilder = query.into_builder();
        let listed = like(schema_pattern.as_deref(), SCHEMA_NAME)
            && (types.is_empty() || types.iter().any(|t| t == "TABLE"));
        for p in self.catalogs(&org) {
            if !listed || catalog.as_deref().is_some_and(|c| c != p.id()) {
                continue;
            }
            for d in p.datasets() {
                if like(table_pattern.as_deref(), d.name()) {
                    builder
                        .append(p.id(), SCHEMA_NAME, d.name(), "TABLE", &table_schema(d))
                        .map_err(|_| Status::internal("listing tables failed"))?;
                }
            }
        }
        listing(builder.schema(), builder.build(), "tables")
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        describe(&request, &query.into_builder().schema(), query)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        caller(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        listing(builder.schema(), builder.build(), "table types")
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&self.info).schema();
        describe(&request, &schema, query)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<FlightStream>, Status> {
        caller(&request)?;
        let builder = query.into_builder(&self.info);
        listing(builder.schema(), builder.build(), "server information")
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        refuse(&request, refused("a Substrait plan"))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        _query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        refuse(&request, refused("a prepared statement"))
    }

    async fn do_put_statement_update(
        &self,
        _ticket: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        refuse(
            &request,
            RoomError::PermissionDenied {
                rule: "query.statement",
                detail: "data modification is not allowed; partners upload with `cleanroom upload`"
                    .into(),
            }
            .into(),
        )
    }

    async fn do_put_statement_ingest(
        &self,
        _ticket: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        refuse(
            &request,
            RoomError::PermissionDenied {
                rule: "query.statement",
                detail: "ingestion is not allowed; partners upload with `cleanroom upload`".into(),
            }
            .into(),
        )
    }

    async fn do_put_prepared_statement_update(
        &self,
        _query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        refuse(&request, refused("a prepared update"))
    }

    async fn do_action_create_prepared_statement(
        &self,
        _query: ActionCreatePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        refuse(&request, refused("a prepared statement"))
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        refuse(&request, refused("a prepared statement"))
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        refuse(&request, refused("a transaction"))
    }

    async fn do_action_end_transaction(
        &self,
        _query: ActionEndTransactionRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        refuse(&request, refused("a transaction"))
    }

    async fn do_action_begin_savepoint(
        &self,
        _query: ActionBeginSavepointRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<ActionBeginSavepointResult, Status> {
        refuse(&request, refused("a savepoint"))
    }

    async fn do_action_end_savepoint(
        &self,
        _query: ActionEndSavepointRequest,
        request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        refuse(&request, refused("a savepoint"))
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        _message: Any,
    ) -> Result<Response<FlightStream>, Status> {
        refuse(&request, refused("this request"))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

#[cfg(test)]
mod tests {
    use super::like;

    #[test]
    fn filter_patterns() {
        assert!(like(None, "customers"));
        assert!(like(Some("%"), "customers"));
        assert!(like(Some("cust%"), "customers"));
        assert!(like(Some("_ustomers"), "customers"));
        assert!(!like(Some("audience"), "customers"));
        assert!(!like(Some("cust_"), "customers"));
    }

    /// The matcher against a plain dynamic-programming reference, on every
    /// short pattern over a small alphabet and texts around it.
    #[test]
    fn patterns_match_as_the_reference_does() {
        fn reference(p: &[char], t: &[char]) -> bool {
            let mut m = vec![vec![false; t.len() + 1]; p.len() + 1];
            m[0][0] = true;
            for i in 1..=p.len() {
                m[i][0] = m[i - 1][0] && p[i - 1] == '%';
                for j in 1..=t.len() {
                    m[i][j] = match p[i - 1] {
                        '%' => m[i - 1][j] || m[i][j - 1],
                        '_' => m[i - 1][j - 1],
                        c => m[i - 1][j - 1] && c == t[j - 1],
                    };
                }
            }
            m[p.len()][t.len()]
        }
        let alphabet = ['a', 'b', '%', '_'];
        let texts = ["", "a", "b", "ab", "ba", "aab", "abab", "bbaab", "aaaaa"];
        let mut patterns = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = patterns
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            patterns.extend(longer);
        }
        patterns.sort();
        patterns.dedup();
        for p in &patterns {
            let pc: Vec<char> = p.chars().collect();
            for t in texts {
                let tc: Vec<char> = t.chars().collect();
                assert_eq!(like(Some(p), t), reference(&pc, &tc), "{p:?} against {t:?}");
            }
        }
    }

    /// Many `%`s before a character the name lacks: answered at once
    /// (trying every split took hours at 64).
    #[test]
    fn many_percent_signs_are_matched_in_linear_steps() {
        let pattern = format!("{}#", "%".repeat(super::MAX_PATTERN - 1));
        let name = "a".repeat(64);
        assert!(!like(Some(&pattern), &name));
        assert!(like(Some(&"%".repeat(super::MAX_PATTERN)), &name));
    }
}
