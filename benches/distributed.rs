//! The private stage on 1, 2 and 4 `cleanroom worker` processes against
//! one machine, on generated demo-shaped data:
//!
//! ```text
//! cargo bench --bench distributed                          # 1M x 1M rows
//! cargo bench --bench distributed -- --rows 10000000       # 10M x 10M
//! cargo bench --bench distributed -- --workers 1,2,4 --runs 3
//! ```
//!
//! Per worker count: placing the tables (time, bytes to each worker), then
//! per query the bytes each worker's port received and sent (TLS included:
//! plans, shuffles between workers, partial aggregates back), the private
//! stage's time on the workers, and the server's share (under privacy:
//! bounding, noise and the noisy threshold over the partials; under
//! thresholds: the released table's public stage). All processes share
//! this machine's cores, so times show overheads, not speed-up
//! (`docs/distributed.md` models a real cluster).

mod common;
#[path = "../tests/common/worker_process.rs"]
mod worker_process;

use std::time::{Duration, Instant};

use cleanroom::cluster::wire::DescribeWorkerRequest;
use cleanroom::cluster::wire::partition_service_client::PartitionServiceClient;
use cleanroom::cluster::{Channels, Cluster, ClusterConfig, WorkerTls};
use cleanroom::policy::Policy;
use cleanroom::query::{Placement, QueryLimits, TableData};
use common::{arg, side};
use worker_process::spawn_worker;

const SQL: &str = "SELECT c.region, a.interest_segment, COUNT(*) AS people, AVG(c.lifetime_value) AS ltv, \
                   SUM(a.spend) AS spend FROM customers c JOIN audience a ON c.email = a.email \
                   GROUP BY c.region, a.interest_segment";

/// Worker processes, stopped with this bench.
struct Workers(Vec<std::process::Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(certs: &std::path::Path, n: usize) -> (Workers, Vec<url::Url>) {
    let (children, urls) = (0..n)
        .map(|i| spawn_worker(certs, &format!("w{i}")))
        .unzip();
    (Workers(children), urls)
}

/// Bytes each worker's port received and sent so far.
async fn traffic(
    channels: &Channels,
    urls: &[url::Url],
) -> Result<Vec<(u64, u64)>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    for u in urls {
        let d = PartitionServiceClient::new(channels.channel(u)?)
            .describe_worker(DescribeWorkerRequest {})
            .await?
            .into_inner();
        out.push((d.bytes_received, d.bytes_sent));
    }
    Ok(out)
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

/// Per query: (private stage, whole query) times, best of `runs`.
async fn measure(
    thresholds: &Policy,
    private: &Policy,
    tables: &[TableData],
    placement: Option<&dyn Placement>,
    runs: u64,
) -> Result<[Duration; 4], Box<dyn std::error::Error>> {
    let limits = QueryLimits::default();
    let mut best = [Duration::MAX; 4];
    for _ in 0..runs {
        // Under thresholds: the whole query, then its private stage alone
        // (the plan the release filters), timed apart.
        let t = Instant::now();
        cleanroom::query::run_with(thresholds, "acme", tables, SQL, placement).await?;
        best[0] = best[0].min(t.elapsed());
        // Under privacy: the partials on the workers, then the rest.
        let t = Instant::now();
        let (ctx, plan, checked) =
            cleanroom::query::plan_and_check_with(private, "acme", tables, SQL, &limits, placement)
                .await?;
        let noise =
            cleanroom::query::private::plan(private, &checked, 1.0).map_err(|v| v.to_string())?;
        let unit = cleanroom::query::private::bounding_unit(private, "acme", &plan)
            .map_err(|v| v.to_string())?;
        let one = cleanroom::query::one_row_per_person(tables, &checked);
        let p = cleanroom::query::private::partials(&ctx, plan, &noise, &unit, one).await?;
        best[1] = best[1].min(t.elapsed());
        drop(p);
        let t = Instant::now();
        cleanroom::query::run_with(private, "acme", tables, SQL, placement).await?;
        best[2] = best[2].min(t.elapsed());
    }
    best[3] = best[2].saturating_sub(best[1]);
    Ok(best)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows = arg("--rows", 1_000_000);
    let runs = arg("--runs", 3);
    let counts: Vec<usize> = std::env::args()
        .skip_while(|a| a != "--workers")
        .nth(1)
        .unwrap_or_else(|| "1,2,4".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml");
    let text = std::fs::read_to_string(&path)?;
    let private: Policy = cleanroom::agreements::parse_policy(&text, &path)?;
    let (without, _) = text.split_once("[privacy]").ok_or("no [privacy]")?;
    let thresholds: Policy = cleanroom::agreements::parse_policy(without, &path)?;
    let shared = rows * 3 / 10;
    let customers: Vec<u64> = (0..rows).collect();
    let audience: Vec<u64> = (0..shared).chain(rows..2 * rows - shared).collect();
    let t = Instant::now();
    let tables = cleanroom::query::agreement_tables(
        &private,
        vec![side(&customers, true), side(&audience, false)],
    );
    println!(
        "{rows} x {rows} rows generated and matched in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let [whole, partials, private_whole, server] =
        measure(&thresholds, &private, &tables, None, runs).await?;
    println!(
        "one machine: thresholds query {:.3} s; privacy: partials {:.3} s, whole {:.3} s, bounding+noise+release {:.3} s",
        whole.as_secs_f64(),
        partials.as_secs_f64(),
        private_whole.as_secs_f64(),
        server.as_secs_f64()
    );

    let dir = tempfile::tempdir()?;
    cleanroom::certs::init(dir.path(), &[], false)?;
    cleanroom::certs::issue_worker(dir.path(), "server", &[], false)?;
    let tls = WorkerTls::in_dir(dir.path(), "server");
    let channels = Channels::new(&tls)?;
    for n in counts {
        let (workers, urls) = spawn(dir.path(), n);
        let cluster = Cluster::start(ClusterConfig {
            workers: urls.clone(),
            tls: tls.clone(),
            health_interval: Duration::from_secs(5),
        })
        .await?;
        let before = traffic(&channels, &urls).await?;
        let t = Instant::now();
        let placement = match cluster
            .place("bench", &[format!("bench-{n}")], &tables)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                println!("\n{n} worker(s): not placed ({e}); queries run on the server as above");
                continue;
            }
        };
        let placed = t.elapsed();
        let after = traffic(&channels, &urls).await?;
        println!(
            "\n{n} worker(s): placement {:.2} s, {:.1} MB in all",
            placed.as_secs_f64(),
            mb(cluster.figures().placed_bytes)
        );
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            println!(
                "  worker {i}: received {:.1} MB at placement",
                mb(a.0 - b.0)
            );
        }
        if std::env::var("CLEANROOM_SHOW_PLAN").is_ok() {
            let (ctx, plan, _) = cleanroom::query::plan_and_check_with(
                &thresholds,
                "acme",
                &tables,
                SQL,
                &QueryLimits::default(),
                Some(placement.as_ref()),
            )
            .await?;
            let physical = ctx.state().create_physical_plan(&plan).await?;
            println!(
                "{}",
                datafusion_distributed::display_plan_ascii(physical.as_ref(), false)
            );
        }
        let reruns = cleanroom::query::reruns_on_server();
        // One query of each kind, its traffic per worker.
        let before = traffic(&channels, &urls).await?;
        cleanroom::query::run_with(&thresholds, "acme", &tables, SQL, Some(placement.as_ref()))
            .await?;
        let mid = traffic(&channels, &urls).await?;
        cleanroom::query::run_with(&private, "acme", &tables, SQL, Some(placement.as_ref()))
            .await?;
        let after = traffic(&channels, &urls).await?;
        for i in 0..n {
            println!(
                "  worker {i}: per query, thresholds: received {:.2} MB, sent {:.2} MB; privacy: received {:.2} MB, sent {:.2} MB",
                mb(mid[i].0 - before[i].0),
                mb(mid[i].1 - before[i].1),
                mb(after[i].0 - mid[i].0),
                mb(after[i].1 - mid[i].1)
            );
        }
        let [whole, partials, private_whole, server] = measure(
            &thresholds,
            &private,
            &tables,
            Some(placement.as_ref()),
            runs,
        )
        .await?;
        println!(
            "  thresholds query {:.3} s; privacy: partials on workers {:.3} s, whole {:.3} s, server's share (bounding, noise, release) {:.3} s ({:.0} %)",
            whole.as_secs_f64(),
            partials.as_secs_f64(),
            private_whole.as_secs_f64(),
            server.as_secs_f64(),
            100.0 * server.as_secs_f64() / private_whole.as_secs_f64()
        );
        let fell_back = cleanroom::query::reruns_on_server() - reruns;
        println!("  stages that fell back to the server: {fell_back}");
        drop(workers);
    }
    Ok(())
}
