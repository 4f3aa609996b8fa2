//! Differential privacy: exact noise, the private aggregation, and the
//! windows a privacy budget covers. See `docs/privacy.md`.

pub mod mechanism;
pub mod noise;
pub mod window;

pub use mechanism::{Bounds, Measure, Plan, PlanError, Report, Settings};
pub use noise::NoiseSource;
pub use window::{Window, window};

/// Epsilon is kept in the ledger as whole millionths, so charges add up
/// exactly.
pub const MICROS: f64 = 1_000_000.0;

/// Epsilon in millionths, to the nearest, and at least one: no query is
/// free.
pub fn to_micros(epsilon: f64) -> u64 {
    ((epsilon * MICROS).round() as u64).max(1)
}

/// Millionths back to epsilon.
pub fn from_micros(micros: u64) -> f64 {
    micros as f64 / MICROS
}
