//! Where a governed query runs: the session with only the agreement's
//! tables and the allowed functions, in this process or with its private
//! stage on workers of the distributed engine (`crate::cluster`), and
//! running a plan of the private stage to its end wherever it can.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::functions_aggregate::planner::AggregateFunctionPlanner;
use datafusion::functions_aggregate::{average::avg_udaf, count::count_udaf, sum::sum_udaf};
use datafusion::prelude::{SessionConfig, SessionContext};

use super::{QueryLimits, TableData, engine_failure, table_batches};

/// Where the private stage reads an agreement's tables: this process's
/// memory (no placement), or partitions placed on workers of a distributed
/// engine (`crate::cluster`), which the coordinating session reaches.
pub trait Placement: std::fmt::Debug + Send + Sync {
    /// The coordinating session: the engine's planner and hooks added, and
    /// `memory_bytes`, the memory one query's operators may hold, passed on
    /// to every worker the query reaches.
    fn session(&self, builder: SessionStateBuilder, memory_bytes: usize) -> SessionStateBuilder;
    /// The placed table of `dataset`, if placed.
    fn table(&self, dataset: &str) -> Option<Arc<dyn datafusion::catalog::TableProvider>>;
}

/// Marks a session whose plans may run on workers; see [`on_this_machine`].
#[derive(Debug)]
struct Distributed;

/// Stages of the private stage that failed on the workers and ran again on
/// the server, since the process started.
static RERUN_ON_SERVER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many stages failed on the workers and ran again on the server.
pub fn reruns_on_server() -> u64 {
    RERUN_ON_SERVER.load(std::sync::atomic::Ordering::Relaxed)
}

/// A session with only the agreement's tables and the allowed aggregates.
/// Public for benchmarks that compare governed and plain execution.
pub fn session(tables: &[TableData]) -> Result<SessionContext, DataFusionError> {
    session_with(tables, QueryLimits::default().memory_bytes, None)
}

/// The functions and aggregates a governed query may use, and nothing else
/// of the engine's defaults. Workers build their sessions with it too.
pub fn with_functions(builder: SessionStateBuilder) -> SessionStateBuilder {
    builder
        .with_aggregate_functions(vec![count_udaf(), sum_udaf(), avg_udaf()])
        // The scalar functions derived dimensions may use; the checker
        // admits each only with arguments on which it cannot fail.
        .with_scalar_functions(vec![
            datafusion::functions::math::floor(),
            datafusion::functions::math::ceil(),
            datafusion::functions::core::coalesce(),
            datafusion::functions::datetime::date_trunc(),
            datafusion::functions::datetime::date_part(),
        ])
        // COUNT(*) as a count of a literal; EXTRACT as date_part.
        .with_expr_planners(vec![
            Arc::new(AggregateFunctionPlanner),
            Arc::new(datafusion::functions::datetime::planner::DatetimeFunctionPlanner),
        ])
}

/// As [`session`], with the engine's memory limited to `memory_bytes`, the
/// tables read where `placement` put them.
pub fn session_with(
    tables: &[TableData],
    memory_bytes: usize,
    placement: Option<&dyn Placement>,
) -> Result<SessionContext, DataFusionError> {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_target_partitions(2);
    if placement.is_some() {
        config = config.with_extension(Arc::new(Distributed));
    }
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(memory_bytes, 1.0)
        .build_arc()?;
    let mut builder = with_functions(
        SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime),
    );
    if let Some(p) = placement {
        builder = p.session(builder, memory_bytes);
    }
    let ctx = SessionContext::new_with_state(builder.build());
    for t in tables {
        match placement.and_then(|p| p.table(t.dataset.name())) {
            Some(placed) => ctx.register_table(t.dataset.name(), placed)?,
            None => {
                let (schema, batches) = table_batches(t)?;
                ctx.register_table(
                    t.dataset.name(),
                    Arc::new(MemTable::try_new(schema, vec![batches])?),
                )?
            }
        };
    }
    Ok(ctx)
}

/// Whether the session's plans may run on workers.
pub(crate) fn distributed(ctx: &SessionContext) -> bool {
    ctx.state()
        .config()
        .get_extension::<Distributed>()
        .is_some()
}

/// The same session planning every stage on this machine: placed tables
/// are then read from the server's own memory.
pub(crate) fn on_this_machine(ctx: &SessionContext) -> SessionContext {
    if ctx
        .state()
        .config()
        .get_extension::<Distributed>()
        .is_none()
    {
        return ctx.clone();
    }
    let state = SessionStateBuilder::new_from_existing(ctx.state())
        .with_query_planner(Arc::new(OnThisMachine))
        .build();
    SessionContext::new_with_state(state)
}

#[derive(Debug)]
struct OnThisMachine;

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for OnThisMachine {
    async fn create_physical_plan(
        &self,
        plan: &datafusion::logical_expr::LogicalPlan,
        state: &dyn datafusion::catalog::Session,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::physical_planner::PhysicalPlanner;
        datafusion::physical_planner::DefaultPhysicalPlanner::default()
            .create_physical_plan(plan, state)
            .await
    }
}

/// Runs a plan of the private stage to its end: on the workers when the
/// session is distributed, and again on the server if that fails (a worker
/// gone, a stage the placement cannot serve), so that an answer is whole
/// or is an error, never partial. Past the memory limit is no engine
/// failure and is not run again.
pub(crate) async fn collect(
    ctx: &SessionContext,
    plan: datafusion::logical_expr::LogicalPlan,
) -> Result<Vec<RecordBatch>, DataFusionError> {
    let distributed = ctx
        .state()
        .config()
        .get_extension::<Distributed>()
        .is_some();
    if !distributed {
        return ctx.execute_logical_plan(plan).await?.collect().await;
    }
    let first = match ctx.execute_logical_plan(plan.clone()).await {
        Ok(df) => df.collect().await,
        Err(e) => Err(e),
    };
    match first {
        Err(e) if !matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) => {
            RERUN_ON_SERVER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                kind = %engine_failure(&e),
                "a stage failed on the workers; it runs again on the server"
            );
            on_this_machine(ctx)
                .execute_logical_plan(plan)
                .await?
                .collect()
                .await
        }
        other => other,
    }
}
