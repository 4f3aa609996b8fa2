use super::*;

const LTV: Bounds = Bounds {
    lo: 0.0,
    hi: 5000.0,
    integer: false,
};

fn settings(epsilon: f64) -> Settings {
    Settings {
        epsilon,
        delta: 1e-7,
        max_groups_per_person: 1,
        max_rows_per_person: 1,
        min_group_size: 50,
    }
}

fn rng() -> NoiseSource {
    NoiseSource::from_seed([9; 32])
}

/// `people` people in group 0 with one row of `value` each.
fn flat(people: u32, value: f64) -> Contributions {
    let n = people as usize;
    Contributions {
        group: vec![0; n],
        person: (0..people).collect(),
        rows: vec![1; n],
        sums: vec![vec![], vec![value; n]],
        counts: vec![vec![], vec![1; n]],
    }
}

#[test]
fn one_person_changes_a_bounded_sum_by_at_most_the_bound() {
    let plan = Plan::new(settings(1.0), &[Measure::Rows, Measure::Sum(LTV)]).unwrap();
    let base = flat(100, 100.0);
    let before = plan.bound(&base, 1, &mut rng()).unwrap();
    // Person 100 has 40 rows worth 9,000 each in the group; the
    // partial aggregate holds their total.
    let mut with = base.clone();
    with.group.push(0);
    with.person.push(100);
    with.rows.push(40);
    with.sums[1].push(40.0 * 9000.0);
    with.counts[1].push(40);
    let after = plan.bound(&with, 1, &mut rng()).unwrap();
    let grid = plan.measures[1].grid;
    let change = (after.totals[1][0] - before.totals[1][0]) as f64 * grid;
    assert!(change > 0.0 && change <= LTV.hi, "{change}");
    // COUNT(*) moves by max_rows_per_person, not 40.
    assert_eq!(after.totals[0][0] - before.totals[0][0], 1);
    assert_eq!(after.people[0] - before.people[0], 1);
}

#[test]
fn a_person_keeps_at_most_the_allowed_groups() {
    let mut s = settings(1.0);
    s.max_groups_per_person = 2;
    let plan = Plan::new(s, &[Measure::Rows]).unwrap();
    // Person 0 in 5 groups, person 1 in one.
    let c = Contributions {
        group: vec![0, 1, 2, 3, 4, 2],
        person: vec![0, 0, 0, 0, 0, 1],
        rows: vec![1; 6],
        sums: vec![vec![]],
        counts: vec![vec![]],
    };
    let b = plan.bound(&c, 5, &mut rng()).unwrap();
    assert_eq!(b.people.iter().sum::<u64>(), 3);
    // Over many draws, each of person 0's groups is kept equally often.
    let mut kept = [0u32; 5];
    let mut r = rng();
    for _ in 0..5000 {
        let b = plan.bound(&c, 5, &mut r).unwrap();
        for (g, k) in kept.iter_mut().enumerate() {
            *k += b.totals[0][g] as u32 - u32::from(g == 2);
        }
    }
    for k in kept {
        // Expected 2000 each; binomial sd ~ 35.
        assert!((1800..2200).contains(&k), "{kept:?}");
    }
}

/// Steps 1-3 written plainly: each person's rows gathered in a map, in
/// person order; of a person in more than k groups, k chosen by the
/// same partial Fisher-Yates over the rows in row order; each kept row
/// added measure by measure.
fn bound_plainly(plan: &Plan, c: &Contributions, groups: usize, rng: &mut NoiseSource) -> Bounded {
    let k = plan.settings.max_groups_per_person as usize;
    let cap = u64::from(plan.settings.max_rows_per_person);
    let mut by_person: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (row, p) in c.person.iter().enumerate() {
        by_person.entry(*p).or_default().push(row);
    }
    let measures = plan.measures.len();
    let mut out = Bounded {
        people: vec![0; groups],
        totals: vec![vec![0; groups]; measures],
        avg_counts: plan
            .measures
            .iter()
            .map(|m| match m.measure {
                Measure::Avg(_) => vec![0; groups],
                _ => Vec::new(),
            })
            .collect(),
    };
    for (_, mut rows) in by_person {
        if rows.len() > k {
            for j in 0..k {
                let pick = j + rng.uniform_below((rows.len() - j) as u128) as usize;
                rows.swap(j, pick);
            }
            rows.truncate(k);
        }
        for row in rows {
            let g = c.group[row] as usize;
            out.people[g] += 1;
            for (i, m) in plan.measures.iter().enumerate() {
                let units = |v: f64| ((v / m.grid).round() as i64).clamp(m.lo_units, m.hi_units);
                let count = c
                    .counts
                    .get(i)
                    .and_then(|v| v.get(row))
                    .copied()
                    .unwrap_or(0);
                out.totals[i][g] += match m.measure {
                    Measure::Rows => i128::from(c.rows[row].min(cap)),
                    Measure::NonNull => i128::from(count.min(cap)),
                    Measure::People => i128::from(count > 0),
                    Measure::Sum(b) if count > 0 && !c.sums[i][row].is_nan() => {
                        i128::from(units(c.sums[i][row].clamp(b.lo, b.hi)))
                    }
                    Measure::Avg(b) if count > 0 && !(c.sums[i][row] / count as f64).is_nan() => {
                        out.avg_counts[i][g] += 1;
                        let mean = (c.sums[i][row] / count as f64).clamp(b.lo, b.hi);
                        i128::from(2 * units(mean) - m.lo_units - m.hi_units)
                    }
                    _ => 0,
                };
            }
        }
    }
    out
}

/// The mechanism's bounding equals the plain one on shuffled rows of
/// people in one to six groups, with NaN, out-of-bounds and missing
/// values, for several group and row caps, drawing the same choices.
#[test]
fn bounding_equals_the_plain_computation() {
    let mut data = NoiseSource::from_seed([3; 32]);
    let mut draw = |n: u128| data.uniform_below(n) as u64;
    for round in 0..24 {
        let mut s = settings(1.0);
        s.max_groups_per_person = 1 + round % 3;
        s.max_rows_per_person = 1 + (round / 3) % 2;
        let measures = [
            Measure::Rows,
            Measure::NonNull,
            Measure::People,
            Measure::Sum(LTV),
            Measure::Avg(LTV),
        ];
        let plan = Plan::new(s, &measures).unwrap();
        let groups = 1 + draw(7) as usize;
        let mut rows: Vec<(u32, u32)> = Vec::new();
        for person in 0..(50 + draw(400) as u32) {
            let mut gs: Vec<u32> = (0..groups as u32).collect();
            let times = 1 + draw(6) as usize;
            for _ in 0..times.min(groups) {
                let i = draw(gs.len() as u128) as usize;
                rows.push((gs.swap_remove(i), person * 7 % 1009));
            }
        }
        for i in (1..rows.len()).rev() {
            rows.swap(i, draw(i as u128 + 1) as usize);
        }
        let n = rows.len();
        let value = |d: &mut dyn FnMut(u128) -> u64| match d(10) {
            0 => f64::NAN,
            1 => 9_000.0,
            2 => -20.0,
            _ => d(500_000) as f64 / 100.0,
        };
        let mut c = Contributions {
            group: rows.iter().map(|r| r.0).collect(),
            person: rows.iter().map(|r| r.1).collect(),
            rows: (0..n).map(|_| 1 + draw(4)).collect(),
            sums: vec![Vec::new(); measures.len()],
            counts: vec![Vec::new(); measures.len()],
        };
        for i in 1..measures.len() {
            c.counts[i] = (0..n).map(|_| draw(3)).collect();
            c.sums[i] = (0..n).map(|_| value(&mut draw)).collect();
        }
        let seed = [round as u8; 32];
        let fast = plan
            .bound(&c, groups, &mut NoiseSource::from_seed(seed))
            .unwrap();
        let plain = bound_plainly(&plan, &c, groups, &mut NoiseSource::from_seed(seed));
        assert_eq!(fast, plain, "round {round}");
    }
}

#[test]
fn the_threshold_holds_back_groups_one_person_could_reveal() {
    let plan = Plan::new(settings(1.0), &[Measure::Rows]).unwrap();
    // epsilon 1 split in two: scale 2; m with 2^-? tails under 1e-7.
    assert!(
        plan.threshold() > 50 + 25 && plan.threshold() < 50 + 40,
        "{}",
        plan.threshold()
    );
    let mut r = rng();
    // A group exactly at the minimum is almost never shown.
    let at_min = flat(50, 1.0);
    let shown = (0..2000)
        .filter(|_| {
            !plan
                .release(&plan.bound(&at_min, 1, &mut r).unwrap(), &mut r)
                .is_empty()
        })
        .count();
    assert_eq!(shown, 0);
    // A large group always is, with its count close to the truth.
    let big = flat(1000, 1.0);
    let released = plan.release(&plan.bound(&big, 1, &mut r).unwrap(), &mut r);
    let Value::Int(count) = released[0].values[0] else {
        panic!("counts are integers")
    };
    assert!((count - 1000).abs() < 60, "{count}");
}

#[test]
fn averages_and_sums_are_noised_around_the_truth() {
    let plan = Plan::new(settings(1.0), &[Measure::Avg(LTV), Measure::Sum(LTV)]).unwrap();
    let n = 20_000u32;
    let c = Contributions {
        group: vec![0; n as usize],
        person: (0..n).collect(),
        rows: vec![1; n as usize],
        sums: vec![vec![1200.0; n as usize], vec![1200.0; n as usize]],
        counts: vec![vec![1; n as usize], vec![1; n as usize]],
    };
    let mut r = rng();
    let report = plan.report();
    assert_eq!(report.columns.len(), 2);
    // Four noisy parts (threshold, AVG's sum and count, SUM): 0.25 each.
    assert!((report.columns[0].epsilon - 0.5).abs() < 1e-12);
    let sum_scale = report.columns[1].scale;
    // Sensitivity 5000, share 0.25: scale 20,000.
    assert!(
        (sum_scale - 20_000.0).abs() / 20_000.0 < 1e-2,
        "{sum_scale}"
    );
    let mut sum_errors = Vec::new();
    for _ in 0..400 {
        let out = plan.release(&plan.bound(&c, 1, &mut r).unwrap(), &mut r);
        let [Value::Float(avg), Value::Float(sum)] = out[0].values[..] else {
            panic!("float metrics give floats")
        };
        assert!((avg - 1200.0).abs() < 50.0, "{avg}");
        sum_errors.push(sum - 1200.0 * f64::from(n));
    }
    let mean_abs = sum_errors.iter().map(|e| e.abs()).sum::<f64>() / 400.0;
    // E|Laplace(b)| = b.
    assert!((mean_abs - sum_scale).abs() / sum_scale < 0.2, "{mean_abs}");
}

#[test]
fn a_people_count_is_noised_and_thresholded() {
    let plan = Plan::new(settings(1.0), &[Measure::People]).unwrap();
    let mut r = rng();
    assert_eq!(plan.release_people_count(0, &mut r), None);
    assert_eq!(plan.release_people_count(50, &mut r), None);
    let shown = plan.release_people_count(6000, &mut r).unwrap();
    assert!((shown - 6000).abs() < 40, "{shown}");
    let draws: Vec<i64> = (0..200)
        .map(|_| plan.release_people_count(6000, &mut r).unwrap())
        .collect();
    assert!(draws.iter().any(|d| *d != 6000), "the count is noised");
}

#[test]
fn bad_settings_are_refused_by_rule() {
    let e = Plan::new(settings(0.0), &[Measure::Rows]).unwrap_err();
    assert_eq!(e.rule, "privacy.epsilon");
    let wide = Bounds {
        lo: -1e300,
        hi: 1e300,
        integer: true,
    };
    let e = Plan::new(settings(1.0), &[Measure::Sum(wide)]).unwrap_err();
    assert_eq!(e.rule, "privacy.noise");
}
