//! The differentially private aggregation: bound each person's
//! contribution, aggregate, add noise, and release only groups whose noisy
//! count of people passes a threshold (the semantics of ZetaSQL and
//! BigQuery differential privacy; Wilson et al., "Differentially Private
//! SQL with Bounded User Contribution", PoPETs 2020).
//!
//! Input: one [`Contributions`] row per (group, person), with that
//! person's partial aggregates in the group. Steps:
//!
//! 1. Each person keeps at most `max_groups_per_person` groups, chosen at
//!    random when there are more.
//! 2. Each person's contribution to each aggregate is bounded: row counts
//!    to `max_rows_per_person`, a metric's sum (or, for AVG, the person's
//!    mean) to the metric's bounds.
//! 3. Per group the bounded contributions are summed, exactly, on integers
//!    (metric values in whole units of a power-of-two grid).
//! 4. The query's epsilon is split evenly between the threshold and the
//!    noisy values (AVG is two: a sum and a count). Each gets discrete
//!    Laplace noise of scale `groups_per_person * sensitivity / share`.
//! 5. A group is released only if it has at least `min_group_size` people
//!    and its noisy people count reaches `tau = min_group_size + m`, where
//!    `P[noise >= m] <= delta / groups_per_person`. A group that one person
//!    could create or complete is thus released with probability at most
//!    delta per person, so the set of released keys is private too.
//!
//! By basic composition the query is (epsilon, delta)-differentially
//! private with respect to adding or removing one person's rows.

use super::noise::{NoiseSource, Scale};

/// Metric bounds and the kind of value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    pub lo: f64,
    pub hi: f64,
    pub integer: bool,
}

/// One aggregate of the query, in the aggregation's order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// COUNT(*): rows, at most `max_rows_per_person` per person.
    Rows,
    /// COUNT(column): non-null values, at most `max_rows_per_person` per person.
    NonNull,
    /// COUNT(DISTINCT identifier): people with a value.
    People,
    /// SUM(metric): each person's sum clamped to the bounds.
    Sum(Bounds),
    /// AVG(metric): the mean over people of each person's mean, clamped.
    Avg(Bounds),
}

impl Measure {
    /// Noisy quantities this measure releases.
    fn parts(self) -> u32 {
        match self {
            Measure::Avg(_) => 2,
            _ => 1,
        }
    }
}

/// The agreement's privacy settings for one query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub epsilon: f64,
    pub delta: f64,
    pub max_groups_per_person: u32,
    pub max_rows_per_person: u32,
    pub min_group_size: u32,
}

/// Why no plan could be made; the query is refused with this rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}: {detail}")]
pub struct PlanError {
    pub rule: &'static str,
    pub detail: String,
}

/// How one measure is noised.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MeasurePlan {
    measure: Measure,
    /// Width of one unit, for metrics; 1 for counts.
    grid: f64,
    lo_units: i64,
    hi_units: i64,
    /// Noise on the count or sum; None when the sensitivity is zero.
    scale: Option<Scale>,
    /// AVG only: noise on the count of people.
    count_scale: Option<Scale>,
}

/// The noise and threshold a query gets, fixed before any data is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    settings: Settings,
    share: f64,
    measures: Vec<MeasurePlan>,
    threshold_scale: Scale,
    threshold: u64,
}

/// Noise added to one output column, for the analyst.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnNoise {
    /// The aggregate's name in the plan (filled in by the query engine).
    pub aggregate: String,
    /// Epsilon spent on this column.
    pub epsilon: f64,
    /// Scale of the discrete Laplace noise, in the column's units (for AVG:
    /// on the sum of each person's distance from the midpoint of the
    /// bounds; the average's error is about this divided by the people in
    /// the group). Zero when no noise is needed.
    pub scale: f64,
    /// AVG only: the scale of the noise on its count of people.
    pub count_scale: Option<f64>,
    /// 95% of noise draws fall within plus or minus this (in the column's
    /// units; for AVG, of the sum).
    pub half_width_95: f64,
}

/// What was applied, reported with every private answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub mechanism: &'static str,
    pub epsilon: f64,
    pub delta: f64,
    /// A group is shown only if its noisy count of people reaches this.
    pub threshold: u64,
    /// Scale of the noise on the people count that the threshold reads.
    pub threshold_scale: f64,
    pub max_groups_per_person: u32,
    pub max_rows_per_person: u32,
    /// One per aggregate, in the aggregation's order.
    pub columns: Vec<ColumnNoise>,
}

pub const MECHANISM: &str =
    "discrete Laplace with per-person contribution bounds and a noisy people threshold";

/// Grid units of a metric: 1 for integers; for decimals the power of two
/// at most 1/1024 of the noise scale, so rounding to it is lost in noise.
fn grid_for(bounds: Bounds, real_scale: f64) -> f64 {
    if bounds.integer || real_scale <= 0.0 {
        return 1.0;
    }
    let g = (real_scale / 1024.0).log2().floor().clamp(-60.0, 60.0);
    2f64.powi(g as i32)
}

fn scale(sensitivity: u128, groups: u32, share: f64) -> Result<Option<Scale>, PlanError> {
    if sensitivity == 0 {
        return Ok(None);
    }
    let b = (sensitivity as f64) * f64::from(groups) / share;
    Scale::at_least(b).map(Some).ok_or_else(|| PlanError {
        rule: "privacy.noise",
        detail: "the noise this query needs is too large to give a useful answer; widen epsilon or narrow the metric bounds".into(),
    })
}

impl Plan {
    /// The plan for `measures` under `settings`.
    pub fn new(settings: Settings, measures: &[Measure]) -> Result<Plan, PlanError> {
        if !(settings.epsilon.is_finite() && settings.epsilon > 0.0) {
            return Err(PlanError {
                rule: "privacy.epsilon",
                detail: "epsilon must be a positive number".into(),
            });
        }
        if !(settings.delta > 0.0 && settings.delta < 1.0) {
            return Err(PlanError {
                rule: "privacy.delta",
                detail: "delta must lie strictly between 0 and 1".into(),
            });
        }
        let k = settings.max_groups_per_person.max(1);
        let rows = u128::from(settings.max_rows_per_person.max(1));
        let parts = 1 + measures.iter().map(|m| m.parts()).sum::<u32>();
        let share = settings.epsilon / f64::from(parts);
        let mut planned = Vec::with_capacity(measures.len());
        for &measure in measures {
            let plan = match measure {
                Measure::Rows | Measure::NonNull => MeasurePlan {
                    measure,
                    grid: 1.0,
                    lo_units: 0,
                    hi_units: 0,
                    scale: scale(rows, k, share)?,
                    count_scale: None,
                },
                Measure::People => MeasurePlan {
                    measure,
                    grid: 1.0,
                    lo_units: 0,
                    hi_units: 0,
                    scale: scale(1, k, share)?,
                    count_scale: None,
                },
                Measure::Sum(b) => {
                    let real = b.lo.abs().max(b.hi.abs()) * f64::from(k) / share;
                    let grid = grid_for(b, real);
                    let (lo, hi) = units(b, grid)?;
                    MeasurePlan {
                        measure,
                        grid,
                        lo_units: lo,
                        hi_units: hi,
                        scale: scale(lo.unsigned_abs().max(hi.unsigned_abs()).into(), k, share)?,
                        count_scale: None,
                    }
                }
                Measure::Avg(b) => {
                    let real = (b.hi - b.lo) / 2.0 * f64::from(k) / share;
                    let grid = grid_for(b, real);
                    let (lo, hi) = units(b, grid)?;
                    // Centred sums are kept in half units (2v - lo - hi).
                    let width = u128::try_from(hi - lo).unwrap_or(0);
                    MeasurePlan {
                        measure,
                        grid,
                        lo_units: lo,
                        hi_units: hi,
                        scale: scale(width, k, share)?,
                        count_scale: scale(1, k, share)?,
                    }
                }
            };
            planned.push(plan);
        }
        // The threshold's people count changes by at most 1 in each of at
        // most k groups.
        let threshold_scale = scale(1, k, share)?.ok_or_else(|| PlanError {
            rule: "privacy.noise",
            detail: "no threshold noise".into(),
        })?;
        let per_group_delta = settings.delta / f64::from(k);
        let p = threshold_scale.p();
        let mut m = ((per_group_delta * (1.0 + p)).ln() / p.ln())
            .ceil()
            .max(1.0) as u64;
        while threshold_scale.upper_tail(m) > per_group_delta {
            m += 1;
        }
        // One more for rounding in the floating-point tail formula.
        let threshold = u64::from(settings.min_group_size) + m + 1;
        Ok(Plan {
            settings,
            share,
            measures: planned,
            threshold_scale,
            threshold,
        })
    }

    /// What the plan applies, in the columns' units.
    pub fn report(&self) -> Report {
        let columns = self
            .measures
            .iter()
            .map(|m| {
                let (unit, eps) = match m.measure {
                    // Half units for the centred sum.
                    Measure::Avg(_) => (m.grid / 2.0, 2.0 * self.share),
                    _ => (m.grid, self.share),
                };
                ColumnNoise {
                    aggregate: String::new(),
                    epsilon: eps,
                    scale: m.scale.map_or(0.0, |s| s.value() * unit),
                    count_scale: m.count_scale.map(Scale::value),
                    half_width_95: m.scale.map_or(0.0, |s| s.half_width_95() as f64 * unit),
                }
            })
            .collect();
        Report {
            mechanism: MECHANISM,
            epsilon: self.settings.epsilon,
            delta: self.settings.delta,
            threshold: self.threshold,
            threshold_scale: self.threshold_scale.value(),
            max_groups_per_person: self.settings.max_groups_per_person,
            max_rows_per_person: self.settings.max_rows_per_person,
            columns,
        }
    }

    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// The measures the plan noises, in the aggregation's order.
    pub fn measures(&self) -> Vec<Measure> {
        self.measures.iter().map(|m| m.measure).collect()
    }
}

fn units(b: Bounds, grid: f64) -> Result<(i64, i64), PlanError> {
    let lo = (b.lo / grid).round();
    let hi = (b.hi / grid).round();
    let limit = 2f64.powi(52);
    if !(lo.abs() < limit && hi.abs() < limit && lo <= hi) {
        return Err(PlanError {
            rule: "privacy.noise",
            detail: "the metric's bounds are too wide for exact noisy sums".into(),
        });
    }
    Ok((lo as i64, hi as i64))
}

/// One (group, person) pair per row, with the person's partial aggregates
/// in that group. `sums[i]` and `counts[i]` belong to measure `i` (unused
/// entries may be empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contributions {
    pub group: Vec<u32>,
    pub person: Vec<u32>,
    /// Rows of this person in this group.
    pub rows: Vec<u64>,
    /// Per measure: the person's sum of the metric in the group.
    pub sums: Vec<Vec<f64>>,
    /// Per measure: the person's non-null values in the group.
    pub counts: Vec<Vec<u64>>,
}

/// A released value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
}

/// One released group.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub group: u32,
    pub values: Vec<Value>,
}

/// Per-group bounded totals before noise, in grid units.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bounded {
    /// People per group after bounding.
    pub people: Vec<u64>,
    /// Per measure and group: the bounded total (for AVG the centred sum in
    /// half units).
    pub totals: Vec<Vec<i128>>,
    /// AVG only, per measure and group: people with a value.
    pub avg_counts: Vec<Vec<i128>>,
}

impl Plan {
    /// A single count of distinct people (each person counted once, as in
    /// an overlap), released under the plan's threshold. None when held
    /// back.
    pub fn release_people_count(&self, people: u64, rng: &mut NoiseSource) -> Option<i64> {
        let bounded = Bounded {
            people: vec![people],
            totals: vec![vec![i128::from(people)]],
            avg_counts: vec![Vec::new()],
        };
        match self.release(&bounded, rng).first()?.values.first()? {
            Value::Int(v) => Some(*v),
            Value::Float(_) => None,
        }
    }

    /// Steps 1-3: keeps at most `max_groups_per_person` groups per person
    /// and sums the bounded contributions per group.
    pub fn bound(
        &self,
        c: &Contributions,
        groups: usize,
        rng: &mut NoiseSource,
    ) -> Result<Bounded, PlanError> {
        let n = c.group.len();
        let malformed = || PlanError {
            rule: "privacy.input",
            detail: "partial aggregates do not line up".into(),
        };
        if c.person.len() != n || c.rows.len() != n {
            return Err(malformed());
        }
        for (i, m) in self.measures.iter().enumerate() {
            let needs = !matches!(m.measure, Measure::Rows);
            let counts_ok = c.counts.get(i).is_some_and(|v| v.len() == n);
            let sums_ok = c.sums.get(i).is_some_and(|v| v.len() == n);
            let needs_sums = matches!(m.measure, Measure::Sum(_) | Measure::Avg(_));
            if (needs && !counts_ok) || (needs_sums && !sums_ok) {
                return Err(malformed());
            }
        }
        if c.group.iter().any(|g| *g as usize >= groups) {
            return Err(malformed());
        }

        // Rows in person order: (person, row) packed into one word sorts
        // in one pass over contiguous memory, and each person's run is then
        // read from the sorted words alone.
        let mut packed: Vec<u64> = c
            .person
            .iter()
            .enumerate()
            .map(|(row, p)| (u64::from(*p) << 32) | row as u64)
            .collect();
        packed.sort_unstable();
        let k = self.settings.max_groups_per_person.max(1) as usize;
        let rows_cap = u64::from(self.settings.max_rows_per_person.max(1));
        // Rows of people in more than k groups that are left out: a uniform
        // choice of k of each such person's groups (partial Fisher-Yates
        // over the person's rows in row order), people in person order.
        let mut left_out: Vec<bool> = Vec::new();
        let mut start = 0;
        while start < n {
            let person = packed[start] >> 32;
            let mut end = start + 1;
            while end < n && packed[end] >> 32 == person {
                end += 1;
            }
            if end - start > k {
                let run = &mut packed[start..end];
                for j in 0..k {
                    let pick = j + rng.uniform_below((run.len() - j) as u128) as usize;
                    run.swap(j, pick);
                }
                if left_out.is_empty() {
                    left_out = vec![false; n];
                }
                for v in &run[k..] {
                    left_out[*v as u32 as usize] = true;
                }
            }
            start = end;
        }
        drop(packed);
        let mut out = Bounded {
            people: vec![0; groups],
            totals: vec![vec![0; groups]; self.measures.len()],
            avg_counts: vec![Vec::new(); self.measures.len()],
        };
        for (i, m) in self.measures.iter().enumerate() {
            if matches!(m.measure, Measure::Avg(_)) {
                out.avg_counts[i] = vec![0; groups];
            }
        }
        // The kept rows in row order: every array is read front to back.
        for row in 0..n {
            if !left_out.get(row).copied().unwrap_or(false) {
                self.add(c, row, rows_cap, &mut out);
            }
        }
        Ok(out)
    }

    fn add(&self, c: &Contributions, row: usize, rows_cap: u64, out: &mut Bounded) {
        let g = c.group[row] as usize;
        out.people[g] += 1;
        for (i, m) in self.measures.iter().enumerate() {
            let total = &mut out.totals[i][g];
            match m.measure {
                Measure::Rows => *total += i128::from(c.rows[row].min(rows_cap)),
                Measure::NonNull => *total += i128::from(c.counts[i][row].min(rows_cap)),
                Measure::People => *total += i128::from(c.counts[i][row] > 0),
                Measure::Sum(b) => {
                    let sum = c.sums[i][row];
                    if c.counts[i][row] > 0 && !sum.is_nan() {
                        *total += i128::from(self.to_units(m, sum.clamp(b.lo, b.hi)));
                    }
                }
                Measure::Avg(b) => {
                    let count = c.counts[i][row];
                    let mean = c.sums[i][row] / count as f64;
                    if count > 0 && !mean.is_nan() {
                        let v = self.to_units(m, mean.clamp(b.lo, b.hi));
                        *total += i128::from(2 * v - m.lo_units - m.hi_units);
                        out.avg_counts[i][g] += 1;
                    }
                }
            }
        }
    }

    fn to_units(&self, m: &MeasurePlan, v: f64) -> i64 {
        ((v / m.grid).round() as i64).clamp(m.lo_units, m.hi_units)
    }

    /// Steps 4-5: noise and threshold. Returns the released groups in
    /// group order.
    pub fn release(&self, bounded: &Bounded, rng: &mut NoiseSource) -> Vec<Released> {
        let mut out = Vec::new();
        let min = u64::from(self.settings.min_group_size);
        let noise =
            |rng: &mut NoiseSource, s: Option<Scale>| s.map_or(0, |s| rng.discrete_laplace(s));
        for (g, &people) in bounded.people.iter().enumerate() {
            if people == 0 {
                continue;
            }
            // Draw the threshold noise for every group that exists, so the
            // randomness used does not depend on the exact count.
            let noisy_people = i128::from(people) + rng.discrete_laplace(self.threshold_scale);
            if people < min || noisy_people < i128::from(self.threshold) {
                continue;
            }
            let values = self
                .measures
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let total = bounded.totals[i][g];
                    match m.measure {
                        Measure::Rows | Measure::NonNull | Measure::People => {
                            Value::Int(saturate(total + noise(rng, m.scale)).max(0))
                        }
                        Measure::Sum(b) => {
                            let noisy = total + noise(rng, m.scale);
                            if b.integer {
                                Value::Int(saturate(noisy))
                            } else {
                                Value::Float(noisy as f64 * m.grid)
                            }
                        }
                        Measure::Avg(b) => {
                            let sum = total + noise(rng, m.scale);
                            let count =
                                (bounded.avg_counts[i][g] + noise(rng, m.count_scale)).max(1);
                            let mid = (m.lo_units + m.hi_units) as f64 / 2.0;
                            let mean = (mid + (sum as f64 / 2.0) / count as f64) * m.grid;
                            Value::Float(mean.clamp(b.lo, b.hi))
                        }
                    }
                })
                .collect();
            out.push(Released {
                group: g as u32,
                values,
            });
        }
        out
    }
}

fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests;
