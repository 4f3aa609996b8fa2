//! A partner who crafts its own uploads, under thresholds alone: padding
//! rows that never match, one customer per target with a metric value of
//! its own, NULLs placed on one customer, conditions inside aggregates
//! that pick one person out of a large group, two conditions whose cells
//! differ by one person, and an approved template searched over its
//! parameter. Each probe runs on neighbouring data: globex's rows with and
//! without one victim. What acme sees must be the same; and at a minimum
//! of one person the same probe must tell the two apart, so each probe is
//! shown to be an attack that the minimum stops.

mod common;

use cleanroom::policy::Policy;
use cleanroom::query::QueryOutcome;
use common::people::{MARCH_2026, Row, audience, customers, demo_policy, tables, with_phones};
use common::{Setup, TestServer, observed, upload_people};

/// The victim: a globex person acme has as a customer too, with values a
/// probe would read (a segment no one else has, 37 exposures, a day of
/// their own, a spend of their own).
fn victim() -> Row {
    Row {
        segment: Some("tech"),
        exposures: Some(37),
        first_exposure: Some(MARCH_2026 - 100),
        spend: Some(1234.5),
        ..Row::new(1003)
    }
}

/// acme's view of `sql` over `acme` and `globex` plus, or not, the victim.
async fn both_ways(policy: &Policy, acme: &[Row], globex: &[Row], sql: &str) -> (String, String) {
    let mut with = globex.to_vec();
    with.push(victim());
    let present = common::workers::run(policy, "acme", &tables(policy, acme, &with), sql).await;
    let absent = common::workers::run(policy, "acme", &tables(policy, acme, globex), sql).await;
    (observed(&present), observed(&absent))
}

/// `sql` run by the engine alone, with no check and no minimum.
async fn ungoverned(policy: &Policy, acme: &[Row], globex: &[Row], sql: &str) -> String {
    let ctx = cleanroom::query::session(&tables(policy, acme, globex)).unwrap();
    let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
    arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string()
}

/// Each probe: the same answer with and without the victim at the demo's
/// minimum, and different answers from the engine alone, so that each is
/// an attack the minimum stops.
async fn probes_learn_nothing(acme: &[Row], globex: &[Row], probes: &[&str]) {
    let policy = demo_policy(None, 50);
    let mut with = globex.to_vec();
    with.push(victim());
    for probe in probes {
        let (present, absent) = both_ways(&policy, acme, globex, probe).await;
        assert!(!present.starts_with("error"), "{probe}: {present}");
        assert_eq!(present, absent, "{probe}");
        assert_ne!(
            ungoverned(&policy, acme, &with, probe).await,
            ungoverned(&policy, acme, globex, probe).await,
            "{probe} is no attack"
        );
    }
}

/// `n` people both parties hold, from `first`, spread over segments and
/// values.
fn background(first: u64, n: u64) -> Vec<Row> {
    (first..first + n)
        .map(|id| Row {
            segment: Some(["sports", "travel", "food"][(id % 3) as usize]),
            ltv: Some(100.0 + (id % 700) as f64),
            exposures: Some((id % 20) as i64),
            spend: Some((id % 50) as f64),
            ..Row::new(id)
        })
        .collect()
}

/// acme's customer for the victim: a lifetime value no one else has, so a
/// condition can pick them out.
fn acme_target() -> Row {
    Row {
        ltv: Some(1003.0),
        ..Row::new(1003)
    }
}

/// Padding: 300 acme customers globex never holds, plus the target.
fn padding() -> Vec<Row> {
    (5_000..5_300).map(Row::new).collect()
}

#[tokio::test]
async fn padding_that_never_matches_counts_for_no_one_of_the_partner() {
    // acme holds padding and the target only; globex holds two others acme
    // also uploads. A LEFT JOIN keeps acme's rows.
    let mut acme = padding();
    acme.push(acme_target());
    acme.extend([Row::new(1000), Row::new(1001)]);
    let globex = vec![Row::new(1000), Row::new(1001)];
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            // Which of acme's customers matched, as a sum.
            "SELECT COUNT(*) AS n, SUM(CASE WHEN c.lifetime_value = 1003 AND a.interest_segment IS NOT NULL THEN 1 ELSE 0 END) AS hit FROM customers c LEFT JOIN audience a ON c.email = a.email",
            // The target's whole partner record as the group's sums.
            "SELECT COUNT(*), SUM(a.spend), SUM(a.ad_exposures), COUNT(a.first_exposure) FROM customers c LEFT JOIN audience a ON c.email = a.email",
            // Groups of the unmatched.
            "SELECT COALESCE(a.interest_segment, 'none') AS s, COUNT(*) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY s",
            "SELECT CASE WHEN a.ad_exposures >= 30 THEN 'exposed' ELSE 'unexposed' END AS e, COUNT(*) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY e",
        ],
    )
    .await;
}

#[tokio::test]
async fn padding_beside_real_matches_hides_the_target_among_the_unmatched() {
    // 200 people both hold: the cells of matched people are large, so the
    // unmatched rows' cells are released; the target's matched cell is
    // small, and acme's own row count must not show it was left out.
    let mut acme = background(0, 200);
    acme.extend(padding());
    acme.push(acme_target());
    let globex = background(0, 200);
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            "SELECT COUNT(*) AS n, SUM(CASE WHEN c.lifetime_value = 1003 AND a.interest_segment IS NOT NULL THEN 1 ELSE 0 END) AS hit FROM customers c LEFT JOIN audience a ON c.email = a.email",
            "SELECT CASE WHEN c.lifetime_value = 1003 AND a.interest_segment IS NOT NULL THEN 'target' ELSE 'rest' END AS t, COUNT(*), SUM(c.lifetime_value) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY t",
            "SELECT COALESCE(a.interest_segment, 'none') AS s, COUNT(*), AVG(c.lifetime_value) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY s",
            "SELECT date_trunc('day', a.first_exposure) AS d, COUNT(*) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY d",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_stand_in_counts_where_the_unmatched_row_it_replaces_would() {
    // acme marks 50 customers it knows globex holds, 49 padding rows and
    // the target with a lifetime value of their own. With the victim, the
    // target's matched cell (its own segment) is left out and its row
    // stands in among the unmatched; without, it is unmatched. The
    // unmatched cell must reach the minimum, or not, alike both ways.
    let marked = |mut r: Row| {
        r.ltv = Some(2000.0);
        r
    };
    let mut acme: Vec<Row> = background(0, 50).into_iter().map(marked).collect();
    acme.extend((5_000..5_049).map(Row::new).map(marked));
    acme.push(marked(Row::new(1003)));
    acme.extend(background(100, 300));
    let mut globex = background(0, 50);
    globex.extend(background(100, 300));
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            "SELECT CASE WHEN c.lifetime_value = 2000 THEN 'marked' ELSE 'rest' END AS m, COALESCE(a.interest_segment, 'none') AS s, COUNT(*) FROM customers c LEFT JOIN audience a ON c.email = a.email GROUP BY m, s",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_cell_inside_a_large_group_is_thresholded_too() {
    // No padding: 300 people both hold, and the target. Conditions inside
    // aggregates pick the target out of a group of 300.
    let mut acme = background(0, 300);
    acme.push(acme_target());
    let globex = background(0, 300);
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            // Membership, segment and exposures, bit by bit, in one answer.
            "SELECT COUNT(*) AS n, SUM(CASE WHEN c.lifetime_value = 1003 AND a.interest_segment = 'tech' THEN 1 ELSE 0 END) AS food, SUM(CASE WHEN c.lifetime_value = 1003 AND a.ad_exposures >= 32 THEN 2 ELSE 0 END) AS exposures_32 FROM customers c JOIN audience a ON c.email = a.email",
            "SELECT a.interest_segment, AVG(CASE WHEN c.lifetime_value = 1003 THEN 1 ELSE 0 END) FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment",
            // A CASE with several branches, one of them the target's.
            "SELECT SUM(CASE WHEN c.lifetime_value < 500 THEN 1 WHEN c.lifetime_value = 1003 THEN 1000 ELSE 0 END) FROM customers c JOIN audience a ON c.email = a.email",
        ],
    )
    .await;
}

#[tokio::test]
async fn two_cells_that_differ_by_one_person_release_no_difference() {
    let mut acme = background(0, 300);
    acme.push(acme_target());
    let globex = background(0, 300);
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            // Each sum covers hundreds; their difference is the target.
            "SELECT SUM(CASE WHEN c.lifetime_value < 900 OR (c.lifetime_value = 1003 AND a.interest_segment = 'tech') THEN 1 ELSE 0 END) AS wide, SUM(CASE WHEN c.lifetime_value < 900 THEN 1 ELSE 0 END) AS narrow FROM customers c JOIN audience a ON c.email = a.email",
            "SELECT COUNT(CASE WHEN c.lifetime_value < 900 OR (c.lifetime_value = 1003 AND a.ad_exposures >= 32) THEN 1 END), COUNT(CASE WHEN c.lifetime_value < 900 THEN 1 END) FROM customers c JOIN audience a ON c.email = a.email",
        ],
    )
    .await;
}

#[tokio::test]
async fn a_null_placed_on_one_customer_does_not_single_them_out() {
    // acme leaves one metric empty on the target only: COUNT(*) minus
    // COUNT(that metric) would be the target, in whichever segment.
    let mut acme = background(0, 300);
    acme.push(Row {
        lead_score: None,
        ..acme_target()
    });
    let globex = background(0, 300);
    probes_learn_nothing(
        &acme,
        &globex,
        &[
            "SELECT a.interest_segment, COUNT(*), COUNT(c.lead_score) FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment",
            "SELECT COUNT(*), AVG(c.lead_score), SUM(a.spend) FROM customers c JOIN audience a ON c.email = a.email",
        ],
    )
    .await;
}

/// The lift template in a templates-only agreement, through the server:
/// acme pads one region with customers globex never holds, adds the
/// target there, and searches the exposure threshold for the target's
/// exposures. Every answer is the same with and without the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_searched_over_its_parameter_learns_nothing() {
    let dir = common::demo_policies(None);
    let path = dir.path().join("retail-media-demo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("[query]\n", "[query]\nmode = \"templates\"\n", 1);
    std::fs::write(&path, text).unwrap();
    let policy = demo_policy(None, 50);
    let south = |r: Row| Row {
        region: Some("south"),
        ..r
    };
    let mut acme: Vec<Row> = background(0, 200);
    acme.extend(padding().into_iter().map(south));
    acme.push(south(acme_target()));
    let mut seen = Vec::new();
    for with_victim in [false, true] {
        let server = TestServer::start_with(Setup {
            policies: dir.path().to_path_buf(),
            ..Setup::default()
        })
        .await;
        let mut globex = background(0, 200);
        if with_victim {
            globex.push(south(victim()));
        }
        upload_people(&server, "acme", &customers(&policy, &acme), "c1").await;
        upload_people(&server, "globex", &audience(&policy, &globex), "a1").await;
        let mut client = server.client("acme").await;
        let mut answers = String::new();
        for k in [1, 19, 20, 32, 37, 38, 64, 100] {
            let params = [("min_exposures".to_string(), k.to_string())].into();
            let answer = client
                .run_template("retail-media-demo", "lift_by_region", &params, None)
                .await
                .unwrap();
            answers +=
                &cleanroom::cli::render_answer(&answer, cleanroom::cli::OutputFormat::Csv).unwrap();
        }
        assert!(answers.contains("north,unexposed"), "{answers}");
        seen.push(answers);
        server.stop().await.unwrap();
    }
    assert_eq!(seen[0], seen[1]);
}

/// The bridging layout, beside `shared` people both parties hold: globex
/// holds x (2001) and y (2002) in `segments`, and the victim (1003, tech,
/// with a phone); acme holds the victim's email with a phone shared with
/// x's row, x, and y with the victim's phone. The tables with and without
/// the victim.
fn bridging(
    policy: &Policy,
    shared: &[Row],
    segments: [&'static str; 2],
) -> [Vec<cleanroom::query::TableData>; 2] {
    let mut globex = shared.to_vec();
    for (id, segment) in [2001, 2002].into_iter().zip(segments) {
        globex.push(Row {
            segment: Some(segment),
            ..Row::new(id)
        });
    }
    let mut acme = shared.to_vec();
    acme.extend([Row::new(1003), Row::new(2001), Row::new(2002)]);
    let mut phones: Vec<Option<u64>> = vec![None; shared.len()];
    phones.extend([Some(3001), Some(3001), Some(1003)]);
    let acme_batch = with_phones(&customers(policy, &acme), &phones);
    let with_victim = {
        let mut g = globex.clone();
        g.push(Row {
            segment: Some("tech"),
            phone: true,
            ..Row::new(1003)
        });
        g
    };
    [with_victim, globex].map(|g| {
        cleanroom::query::agreement_tables(
            policy,
            vec![vec![acme_batch.clone()], vec![audience(policy, &g)]],
        )
    })
}

/// Under differential privacy one victim row of globex's joins two of
/// acme's people into one where people are linked over every party's
/// rows: acme lays out a row with the victim's email and another's phone,
/// and a row with the victim's phone. Bounded per person so linked, one
/// group per person, removing the victim moves the released counts by up
/// to 3 in all; bounded per globex person, by 1, as the noise assumes.
#[tokio::test]
async fn rows_laid_out_to_bridge_identity_kinds_move_one_persons_count_only() {
    let policy = demo_policy(
        Some(
            "epsilon_total = 1e10\nepsilon_per_query_max = 1e8\ndelta = 1e-7\nmax_groups_per_person = 1\nmax_rows_per_person = 1",
        ),
        50,
    );
    let segment_of = |id: u64| ["sports", "travel", "tech"][(id % 3) as usize];
    let shared: Vec<Row> = (0..300)
        .map(|id| Row {
            segment: Some(segment_of(id)),
            ..Row::new(id)
        })
        .collect();
    let [present, absent] = bridging(&policy, &shared, ["sports", "travel"]);
    let counts = |outcome: &QueryOutcome| -> std::collections::BTreeMap<String, i64> {
        use arrow::array::AsArray;
        let mut out = std::collections::BTreeMap::new();
        for b in &outcome.batches {
            let s = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
            let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
            for i in 0..b.num_rows() {
                out.insert(s.as_string::<i32>().value(i).to_string(), n.value(i));
            }
        }
        out
    };
    let sql = "SELECT a.interest_segment, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment";
    // Bounding picks a person's groups at random: 30 tries each.
    for _ in 0..30 {
        let with = counts(
            &common::workers::run(&policy, "acme", &present, sql)
                .await
                .unwrap(),
        );
        let without = counts(
            &common::workers::run(&policy, "acme", &absent, sql)
                .await
                .unwrap(),
        );
        let moved: i64 = ["sports", "travel", "tech"]
            .iter()
            .map(|s| {
                (with.get(*s).copied().unwrap_or(0) - without.get(*s).copied().unwrap_or(0)).abs()
            })
            .sum();
        assert!(
            moved <= 1,
            "one victim moved the counts by {moved}: {with:?} against {without:?}"
        );
    }
}

/// Under thresholds the same layout: the victim's row would join x and y,
/// two of globex's people in one cell of exactly the minimum, into one
/// person, and the cell would vanish. People are counted as each party's
/// own rows link them, so the cell stands whether the victim is there or
/// not (the victim's own cell, of one person, is left out).
#[tokio::test]
async fn a_victim_bridging_two_people_does_not_shrink_their_cell() {
    let policy = demo_policy(None, 50);
    let shared: Vec<Row> = (0..48)
        .map(|id| Row {
            segment: Some("sports"),
            ..Row::new(id)
        })
        .collect();
    let sql = "SELECT a.interest_segment, COUNT(*) FROM customers c JOIN audience a ON c.email = a.email GROUP BY a.interest_segment";
    let mut seen = Vec::new();
    for tables in bridging(&policy, &shared, ["sports", "sports"]) {
        seen.push(observed(
            &common::workers::run(&policy, "acme", &tables, sql).await,
        ));
    }
    assert_eq!(seen[0], seen[1]);
    assert!(seen[0].contains("| sports           | 50"), "{}", seen[0]);
}
