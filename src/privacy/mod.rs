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

/// The epsilon a query asking for `requested` spends and is charged: the
/// smallest whole number of millionths at or above it (at least one), so
/// the noise is drawn for exactly what the ledger records and a request is
/// never charged less than it asked for. None if that exceeds `max`
/// (possible only when `max` is not itself whole millionths); the caller
/// then spends `max` rounded down.
pub fn charged_epsilon(requested: f64, max: f64) -> f64 {
    let mut micros = (requested * MICROS).ceil().max(1.0);
    // Floating point: make sure the charge really covers the request.
    while micros / MICROS < requested {
        micros += 1.0;
    }
    if micros / MICROS > max {
        micros = (max * MICROS).floor().max(1.0);
    }
    micros / MICROS
}

/// Millionths back to epsilon.
pub fn from_micros(micros: u64) -> f64 {
    micros as f64 / MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_charged_rounded_up_to_whole_millionths() {
        for (requested, charged) in [
            (1.4e-6, 2e-6),
            (1.5e-6, 2e-6),
            (1e-9, 1e-6),
            (0.25, 0.25),
            (0.1, 0.1),
            (0.123_456_01, 0.123_457),
            (1.0, 1.0),
        ] {
            let got = charged_epsilon(requested, 1.0);
            assert_eq!(got, charged, "{requested}");
            assert!(got >= requested);
            // The ledger records exactly the epsilon the noise is drawn for.
            assert_eq!(from_micros(to_micros(got)), got);
        }
        // Never above the per-query maximum.
        assert_eq!(charged_epsilon(0.000_001_5, 0.000_001_5), 1e-6);
    }
}
