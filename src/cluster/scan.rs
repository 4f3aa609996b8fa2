//! The scan of a placed table: one engine partition per person partition,
//! read from this process's memory on the server or from the worker that
//! holds it, and the hooks that let the engine split it across workers.
//!
//! Worker `i` of a placement holds the person partitions `p` with
//! `p % workers == i`; a scan split into as many tasks as the placement has
//! workers gives task `i` exactly those, and task `i` is routed to worker
//! `i`. Any other split cannot be served from where the data is, and is
//! refused while planning (the query then runs on the server alone).

use std::fmt;
use std::sync::Arc;

use arrow::array::UInt32Array;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, exec_err, internal_err, plan_err};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion_distributed::{
    DesiredTaskCountEvent, DesiredTaskCountEventResponse, DistributedLeafExec, RouteTasksEvent,
    RouteTasksEventResponse, ScaleUpLeafNodeEvent, ScaleUpLeafNodeEventResponse,
};
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use datafusion_proto::protobuf::proto_error;
use prost::Message;
use url::Url;

use super::store::Held;

/// One table of a placement as the server holds it: the query table's
/// batches and, per person partition, the rows of each batch it holds.
#[derive(Debug)]
pub(crate) struct LocalTable {
    pub(crate) schema: SchemaRef,
    pub(crate) batches: Vec<RecordBatch>,
    /// `rows[p][b]`: the rows of batch `b` in partition `p`.
    pub(crate) rows: Vec<Vec<UInt32Array>>,
}

impl LocalTable {
    /// Partition `p`'s rows, in batch order.
    pub(crate) fn partition(&self, p: usize) -> Result<Vec<RecordBatch>> {
        let Some(rows) = self.rows.get(p) else {
            return internal_err!("no partition {p} of a placed table");
        };
        self.batches
            .iter()
            .zip(rows)
            .filter(|(_, r)| !r.is_empty())
            .map(|(b, r)| Ok(arrow::compute::take_record_batch(b, r)?))
            .collect()
    }
}

/// What names a placed table's data wherever it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placed {
    pub(crate) placement: String,
    pub(crate) dataset: String,
    /// The placement's workers, in the order partitions are assigned.
    pub(crate) workers: Vec<Url>,
    /// Person partitions in all.
    pub(crate) partitions: u32,
}

/// A table of a placement, as the coordinating session's tables.
#[derive(Debug)]
pub(crate) struct PlacedTable {
    pub(crate) placed: Placed,
    pub(crate) local: Arc<LocalTable>,
}

#[async_trait::async_trait]
impl TableProvider for PlacedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.local.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projection = match projection {
            Some(p) => p.clone(),
            None => (0..self.local.schema.fields().len()).collect(),
        };
        Ok(Arc::new(PlacedScanExec::new(
            self.placed.clone(),
            (0..self.placed.partitions).collect(),
            projection,
            Arc::clone(&self.local.schema),
            Some(Arc::clone(&self.local)),
        )?))
    }
}

/// Reads person partitions `parts` of a placed table, one engine partition
/// each: from `local` on the server, from the worker's [`Held`] elsewhere.
#[derive(Debug)]
pub(crate) struct PlacedScanExec {
    placed: Placed,
    parts: Vec<u32>,
    projection: Vec<usize>,
    /// The table's whole schema (before projection).
    table_schema: SchemaRef,
    local: Option<Arc<LocalTable>>,
    properties: Arc<PlanProperties>,
}

impl PlacedScanExec {
    fn new(
        placed: Placed,
        parts: Vec<u32>,
        projection: Vec<usize>,
        table_schema: SchemaRef,
        local: Option<Arc<LocalTable>>,
    ) -> Result<Self> {
        let schema = Arc::new(table_schema.project(&projection)?);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(parts.len().max(1)),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(PlacedScanExec {
            placed,
            parts,
            projection,
            table_schema,
            local,
            properties,
        })
    }

    /// The variant of this scan that reads worker `i`'s partitions.
    fn on_worker(&self, i: usize) -> Result<Self> {
        let w = self.placed.workers.len() as u32;
        let parts = (0..self.placed.partitions)
            .filter(|p| p % w == i as u32)
            .collect();
        PlacedScanExec::new(
            self.placed.clone(),
            parts,
            self.projection.clone(),
            Arc::clone(&self.table_schema),
            self.local.clone(),
        )
    }

    fn batches(&self, partition: usize, context: &TaskContext) -> Result<Vec<RecordBatch>> {
        let Some(&part) = self.parts.get(partition) else {
            return exec_err!("no engine partition {partition} in a placed scan");
        };
        let rows = match (
            &self.local,
            context.session_config().get_extension::<Held>(),
        ) {
            (Some(local), _) => local.partition(part as usize)?,
            (None, Some(held)) => {
                held.partition(&self.placed.placement, &self.placed.dataset, part)?
            }
            (None, None) => return exec_err!("a placed scan ran where no partitions are held"),
        };
        rows.iter()
            .map(|b| Ok(b.project(&self.projection)?))
            .collect()
    }
}

impl DisplayAs for PlacedScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        // Names and partition numbers only: never a value.
        write!(
            f,
            "PlacedScanExec: dataset={}, parts={:?} of {}",
            self.placed.dataset, self.parts, self.placed.partitions
        )
    }
}

impl ExecutionPlan for PlacedScanExec {
    fn name(&self) -> &str {
        "PlacedScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if let Some(held) = context.session_config().get_extension::<Held>() {
            held.count_read();
        }
        let batches = self.batches(partition, &context)?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        )))
    }
}

/// The wire form of a [`PlacedScanExec`]: names, never rows.
#[derive(Clone, PartialEq, prost::Message)]
struct PlacedScanProto {
    #[prost(string, tag = "1")]
    placement: String,
    #[prost(string, tag = "2")]
    dataset: String,
    #[prost(string, repeated, tag = "3")]
    workers: Vec<String>,
    #[prost(uint32, tag = "4")]
    partitions: u32,
    #[prost(uint32, repeated, tag = "5")]
    parts: Vec<u32>,
    #[prost(uint32, repeated, tag = "6")]
    projection: Vec<u32>,
    #[prost(message, optional, tag = "7")]
    schema: Option<datafusion_proto::protobuf::Schema>,
}

/// Encodes and decodes [`PlacedScanExec`] for the engine; registered on the
/// server's coordinating session and on every worker.
#[derive(Debug)]
pub(crate) struct PlacedScanCodec;

impl PhysicalExtensionCodec for PlacedScanCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        _ctx: &TaskContext,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !inputs.is_empty() {
            return internal_err!("a placed scan has no inputs");
        }
        let p =
            PlacedScanProto::decode(buf).map_err(|e| proto_error(format!("placed scan: {e}")))?;
        let schema: arrow::datatypes::Schema = p
            .schema
            .as_ref()
            .ok_or_else(|| proto_error("placed scan without a schema"))?
            .try_into()?;
        let workers = p
            .workers
            .iter()
            .map(|u| Url::parse(u).map_err(|_| proto_error("placed scan: a worker address")))
            .collect::<Result<Vec<_>>>()?;
        let placed = Placed {
            placement: p.placement,
            dataset: p.dataset,
            workers,
            partitions: p.partitions,
        };
        let projection = p.projection.iter().map(|i| *i as usize).collect();
        Ok(Arc::new(PlacedScanExec::new(
            placed,
            p.parts,
            projection,
            Arc::new(schema),
            None,
        )?))
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        _converter: &dyn PhysicalProtoConverterExtension,
    ) -> Result<()> {
        let Some(scan) = node.downcast_ref::<PlacedScanExec>() else {
            return internal_err!("not a placed scan: {}", node.name());
        };
        PlacedScanProto {
            placement: scan.placed.placement.clone(),
            dataset: scan.placed.dataset.clone(),
            workers: scan.placed.workers.iter().map(Url::to_string).collect(),
            partitions: scan.placed.partitions,
            parts: scan.parts.clone(),
            projection: scan.projection.iter().map(|i| *i as u32).collect(),
            schema: Some(scan.table_schema.as_ref().try_into()?),
        }
        .encode(buf)
        .map_err(|e| proto_error(format!("placed scan: {e}")))
    }
}

/// A placed scan wants one task per worker of its placement.
pub(crate) fn desired_tasks(
    ev: DesiredTaskCountEvent,
) -> Option<Result<DesiredTaskCountEventResponse>> {
    let scan = ev.plan.downcast_ref::<PlacedScanExec>()?;
    Some(Ok(DesiredTaskCountEventResponse::desired(
        scan.placed.workers.len(),
    )))
}

/// Splits a placed scan into one variant per worker, or refuses a split
/// the placement cannot serve.
pub(crate) fn scale_up(ev: ScaleUpLeafNodeEvent) -> Option<Result<ScaleUpLeafNodeEventResponse>> {
    let scan = ev.plan.downcast_ref::<PlacedScanExec>()?;
    if ev.task_count != scan.placed.workers.len() {
        return Some(plan_err!(
            "a stage of {} tasks cannot read a placement on {} workers",
            ev.task_count,
            scan.placed.workers.len()
        ));
    }
    let variants = (0..ev.task_count)
        .map(|i| {
            scan.on_worker(i)
                .map(|v| Arc::new(v) as Arc<dyn ExecutionPlan>)
        })
        .collect::<Result<Vec<_>>>();
    Some(variants.and_then(|v| {
        DistributedLeafExec::try_new(Arc::clone(ev.plan), v)
            .map(|leaf| ScaleUpLeafNodeEventResponse::new(Arc::new(leaf)))
    }))
}

/// Task `i` of a stage reading a placed table runs on worker `i` of the
/// placement; every placed table of one stage must share the placement.
pub(crate) fn route(ev: RouteTasksEvent) -> Option<Result<RouteTasksEventResponse>> {
    let mut workers: Option<std::result::Result<Vec<Url>, ()>> = None;
    let _ = ev.plan.apply(|node| {
        if let Some(leaf) = node.downcast_ref::<DistributedLeafExec>()
            && let Some(scan) = leaf.original().downcast_ref::<PlacedScanExec>()
        {
            workers = match &workers {
                None => Some(Ok(scan.placed.workers.clone())),
                Some(Ok(w)) if *w == scan.placed.workers => Some(Ok(w.clone())),
                _ => Some(Err(())),
            };
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match workers? {
        Ok(w) if w.len() == ev.task_count => Some(Ok(RouteTasksEventResponse::new(w))),
        _ => Some(plan_err!(
            "a stage's tasks cannot be routed to the workers holding its partitions"
        )),
    }
}
