//! Exact noise on the integers, from a cryptographically secure source.
//!
//! Floating-point Laplace noise leaks: the low bits of `x + Lap(b)` computed
//! in doubles are not spread evenly, and can reveal `x` (Mironov, "On
//! Significance of the Least Significant Bits for Differential Privacy",
//! CCS 2012). Every value noised here is an integer (counts, or sums
//! expressed in whole units of a power-of-two grid), and the noise is an
//! integer drawn exactly from the discrete Laplace distribution
//!
//! ```text
//! P[Z = z] = (1 - p) / (1 + p) * p^|z|,   p = exp(-1/b)
//! ```
//!
//! with rational scale `b = t/s`, by Algorithms 1 and 2 of Canonne, Kamath
//! and Steinke, "The Discrete Gaussian for Differential Privacy" (NeurIPS
//! 2020, arXiv:2004.00010). They need only uniform integers and
//! comparisons: no floating point, no logarithms.
//!
//! Uniform integers come from ChaCha20 seeded by the operating system
//! (ring's `SystemRandom`), by rejection sampling, so every draw is exact.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A source of secure randomness for noise.
#[derive(Debug)]
pub struct NoiseSource {
    rng: ChaCha20Rng,
}

impl NoiseSource {
    /// Seeded from the operating system.
    pub fn from_os() -> Result<Self, ring::error::Unspecified> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)?;
        Ok(NoiseSource {
            rng: ChaCha20Rng::from_seed(seed),
        })
    }

    /// A fixed seed: reproducible draws for tests of the distributions.
    /// Never used to answer queries.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        NoiseSource {
            rng: ChaCha20Rng::from_seed(seed),
        }
    }

    fn next_u128(&mut self) -> u128 {
        (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64())
    }

    /// Uniform on `0..n`, exactly: draws falling in the incomplete last
    /// block of 2^128 are rejected.
    pub fn uniform_below(&mut self, n: u128) -> u128 {
        assert!(n > 0, "uniform_below needs a positive bound");
        let limit = (u128::MAX / n) * n;
        loop {
            let x = self.next_u128();
            if x < limit {
                return x % n;
            }
        }
    }

    /// Bernoulli(num / den), exactly.
    pub fn bernoulli(&mut self, num: u128, den: u128) -> bool {
        debug_assert!(num <= den);
        self.uniform_below(den) < num
    }

    /// Bernoulli(exp(-num/den)), exactly (Canonne-Kamath-Steinke,
    /// Algorithm 1).
    pub fn bernoulli_exp_minus(&mut self, num: u128, den: u128) -> bool {
        assert!(den > 0, "bernoulli_exp_minus needs a positive denominator");
        if num <= den {
            // K is the first k with a failed Bernoulli(gamma / k); the
            // probability that K is odd is exp(-gamma).
            let mut k: u128 = 1;
            loop {
                let Some(kd) = den.checked_mul(k) else {
                    // Reached only after ~2^64 successes in a row, each of
                    // probability at most 1/k: not a practical path.
                    return k % 2 == 1;
                };
                if !self.bernoulli(num, kd) {
                    return k % 2 == 1;
                }
                k += 1;
            }
        }
        for _ in 0..num / den {
            if !self.bernoulli_exp_minus(1, 1) {
                return false;
            }
        }
        self.bernoulli_exp_minus(num % den, den)
    }

    /// One draw of the discrete Laplace distribution with scale `t / s`
    /// (Canonne-Kamath-Steinke, Algorithm 2).
    pub fn discrete_laplace(&mut self, scale: Scale) -> i128 {
        let Scale { t, s } = scale;
        loop {
            let u = self.uniform_below(t);
            if !self.bernoulli_exp_minus(u, t) {
                continue;
            }
            let mut v: u128 = 0;
            while self.bernoulli_exp_minus(1, 1) {
                v += 1;
            }
            let x = u + t * v;
            let y = (x / s) as i128;
            let negative = self.bernoulli(1, 2);
            if negative && y == 0 {
                continue;
            }
            return if negative { -y } else { y };
        }
    }
}

/// A rational noise scale `t / s`, rounded up from the real scale wanted,
/// since more noise never weakens the guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scale {
    t: u128,
    s: u128,
}

/// Denominator of the rational scales: 2^20, so rounding up adds at most
/// one millionth to any scale of 1 or more.
const SCALE_DENOMINATOR: u128 = 1 << 20;
/// Largest scale accepted; larger ones mean noise that swamps any answer.
pub const MAX_SCALE: f64 = 1e15;

impl Scale {
    /// The smallest `t / 2^20` at least `b`. `b` must be positive, finite
    /// and at most [`MAX_SCALE`].
    pub fn at_least(b: f64) -> Option<Scale> {
        if !(b.is_finite() && b > 0.0 && b <= MAX_SCALE) {
            return None;
        }
        let t = (b * SCALE_DENOMINATOR as f64).ceil() as u128;
        // Guard the conversion: the rational must not fall below b.
        let t = if (t as f64) / (SCALE_DENOMINATOR as f64) < b {
            t + 1
        } else {
            t
        };
        Some(Scale {
            t: t.max(1),
            s: SCALE_DENOMINATOR,
        })
    }

    /// An exact rational scale `t / s`.
    pub fn ratio(t: u64, s: u64) -> Scale {
        assert!(t > 0 && s > 0, "a scale is a positive ratio");
        Scale {
            t: u128::from(t),
            s: u128::from(s),
        }
    }

    pub fn value(self) -> f64 {
        self.t as f64 / self.s as f64
    }

    /// `p = exp(-1/b)`, the ratio of neighbouring probabilities.
    pub fn p(self) -> f64 {
        (-1.0 / self.value()).exp()
    }

    /// Variance of the discrete Laplace distribution: `2p / (1-p)^2`.
    pub fn variance(self) -> f64 {
        let p = self.p();
        2.0 * p / ((1.0 - p) * (1.0 - p))
    }

    /// `P[Z >= m]` for `m >= 1`: `p^m / (1 + p)`.
    pub fn upper_tail(self, m: u64) -> f64 {
        let p = self.p();
        p.powf(m as f64) / (1.0 + p)
    }

    /// The smallest `h` with `P[|Z| <= h] >= 0.95`.
    pub fn half_width_95(self) -> u64 {
        // P[|Z| > h] = 2 p^(h+1) / (1+p) <= 0.05.
        let p = self.p();
        let estimate = ((0.025 * (1.0 + p)).ln() / p.ln()).ceil() - 1.0;
        let mut h = estimate.max(0.0) as u64;
        while h > 0 && 2.0 * self.upper_tail(h) <= 0.05 {
            h -= 1;
        }
        while 2.0 * self.upper_tail(h + 1) > 0.05 {
            h += 1;
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(n: u8) -> NoiseSource {
        NoiseSource::from_seed([n; 32])
    }

    /// |observed - expected| in standard errors of a binomial proportion.
    fn binomial_z(hits: u64, n: u64, p: f64) -> f64 {
        let observed = hits as f64 / n as f64;
        (observed - p).abs() / (p * (1.0 - p) / n as f64).sqrt()
    }

    #[test]
    fn uniform_below_is_flat() {
        let mut rng = source(1);
        let n = 7u128;
        let draws = 70_000u64;
        let mut counts = [0u64; 7];
        for _ in 0..draws {
            counts[rng.uniform_below(n) as usize] += 1;
        }
        // Chi-square with 6 degrees of freedom; 22.46 is the 0.999 quantile.
        let expected = draws as f64 / 7.0;
        let chi2: f64 = counts
            .iter()
            .map(|c| (*c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 22.46, "chi2 {chi2} counts {counts:?}");
    }

    #[test]
    fn bernoulli_exp_minus_has_the_right_rate() {
        let mut rng = source(2);
        let n = 200_000u64;
        for (num, den) in [(0u128, 1u128), (3, 10), (1, 1), (27, 10), (7, 2)] {
            let hits = (0..n).filter(|_| rng.bernoulli_exp_minus(num, den)).count() as u64;
            let p = (-(num as f64) / den as f64).exp();
            if num == 0 {
                assert_eq!(hits, n);
                continue;
            }
            let z = binomial_z(hits, n, p);
            assert!(z < 5.0, "exp(-{num}/{den}): {hits}/{n} vs {p}, z = {z}");
        }
    }

    /// The exact probability mass function, summed far into the tails.
    fn exact_moments(scale: Scale) -> (f64, f64, f64) {
        let p = scale.p();
        let norm = (1.0 - p) / (1.0 + p);
        let (mut var, mut m4, mut mass) = (0.0, 0.0, norm);
        let mut z = 1.0f64;
        loop {
            let pz = 2.0 * norm * p.powf(z);
            if pz < 1e-300 || z > 1e7 {
                break;
            }
            mass += pz;
            var += pz * z * z;
            m4 += pz * z.powi(4);
            z += 1.0;
        }
        (mass, var, m4)
    }

    #[test]
    fn discrete_laplace_matches_its_distribution() {
        for (seed, scale) in [
            (3u8, Scale::ratio(7, 2)),
            (4, Scale::ratio(1, 3)),
            (5, Scale::at_least(40.25).unwrap()),
        ] {
            let mut rng = source(seed);
            let n = 200_000u64;
            let draws: Vec<f64> = (0..n).map(|_| rng.discrete_laplace(scale) as f64).collect();
            let (mass, var, m4) = exact_moments(scale);
            assert!((mass - 1.0).abs() < 1e-9);
            assert!((var - scale.variance()).abs() / var < 1e-6);

            // Mean 0: standard error sqrt(var / n).
            let mean = draws.iter().sum::<f64>() / n as f64;
            let z_mean = mean.abs() / (var / n as f64).sqrt();
            assert!(z_mean < 5.0, "scale {}: mean {mean}", scale.value());

            // Variance: the sample second moment has standard error
            // sqrt((m4 - var^2) / n).
            let second = draws.iter().map(|x| x * x).sum::<f64>() / n as f64;
            let z_var = (second - var).abs() / ((m4 - var * var) / n as f64).sqrt();
            assert!(
                z_var < 5.0,
                "scale {}: variance {second} vs {var}",
                scale.value()
            );

            // Tails, on both sides: P[Z >= m] = p^m / (1+p).
            for m in [
                1u64,
                (2.0 * scale.value()).ceil() as u64 + 1,
                (4.0 * scale.value()).ceil() as u64 + 1,
            ] {
                let expected = scale.upper_tail(m);
                let above = draws.iter().filter(|x| **x >= m as f64).count() as u64;
                let below = draws.iter().filter(|x| **x <= -(m as f64)).count() as u64;
                for (side, hits) in [("upper", above), ("lower", below)] {
                    let z = binomial_z(hits, n, expected);
                    assert!(
                        z < 5.0,
                        "scale {} {side} tail at {m}: {hits}/{n} vs {expected}",
                        scale.value()
                    );
                }
            }
            // The point mass at zero.
            let zeros = draws.iter().filter(|x| **x == 0.0).count() as u64;
            let p0 = (1.0 - scale.p()) / (1.0 + scale.p());
            assert!(binomial_z(zeros, n, p0) < 5.0);
        }
    }

    #[test]
    fn a_wrong_scale_is_caught() {
        // The same checks reject draws of twice the scale: the tests above
        // can fail.
        let mut rng = source(6);
        let n = 200_000u64;
        let wide = Scale::ratio(7, 1);
        let narrow = Scale::ratio(7, 2);
        let draws: Vec<f64> = (0..n).map(|_| rng.discrete_laplace(wide) as f64).collect();
        let second = draws.iter().map(|x| x * x).sum::<f64>() / n as f64;
        let (_, var, m4) = exact_moments(narrow);
        let z_var = (second - var).abs() / ((m4 - var * var) / n as f64).sqrt();
        assert!(z_var > 5.0);
    }

    #[test]
    fn scales_round_up_and_report_their_spread() {
        let s = Scale::at_least(3.3).unwrap();
        assert!(s.value() >= 3.3 && s.value() < 3.3 + 1e-6);
        assert!(Scale::at_least(0.0).is_none());
        assert!(Scale::at_least(f64::NAN).is_none());
        assert!(Scale::at_least(1e16).is_none());
        let h = s.half_width_95();
        assert!(2.0 * s.upper_tail(h + 1) <= 0.05);
        assert!(2.0 * s.upper_tail(h) > 0.05 || h == 0);
    }
}
