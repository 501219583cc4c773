//! Paired slices: a server against a reference (uvloop) over the same
//! interleaved slices, with the figures that say whether a difference is
//! more than the host's noise. On a busy 2-core host one 1 s slice can
//! make anywhere from 10k to 70k messages, whichever server runs, so a
//! run's total alone cannot tell a 5% lead from luck.

/// How `a` fared against `b`, slice by slice (msg/s per slice, paired by index).
pub struct Paired {
    /// Slices compared.
    pub n: usize,
    /// Slices in which `a` made at least `b`'s msg/s.
    pub at_or_above: usize,
    /// Median of the per-slice ratios `a / b` (the mean of the two middle ones for even `n`).
    pub median_ratio: f64,
    /// `sum(a) / sum(b)`: the run's msg/s ratio (the slices are equally long).
    pub total_ratio: f64,
    /// 95% bootstrap interval of `total_ratio`: slices resampled with
    /// replacement, pairs kept together.
    pub interval: (f64, f64),
    /// One-sided sign test: the chance of at least `at_or_above` of `n`
    /// slices at or above if each slice were a coin toss.
    pub sign_p: f64,
}

/// Bootstrap resamples for [`Paired::interval`].
const RESAMPLES: usize = 10_000;

/// Compares `a` with `b` (same length, at least one slice).
pub fn compare(a: &[f64], b: &[f64]) -> Paired {
    assert!(!a.is_empty() && a.len() == b.len(), "paired slices");
    let n = a.len();
    let at_or_above = a.iter().zip(b).filter(|(x, y)| x >= y).count();
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y.max(1.0)).collect();
    ratios.sort_by(f64::total_cmp);
    let median_ratio = if n % 2 == 1 {
        ratios[n / 2]
    } else {
        (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0
    };
    let ratio_of_sums = |idx: &mut dyn Iterator<Item = usize>| {
        let (sa, sb) = idx.fold((0.0, 0.0), |(sa, sb), i| (sa + a[i], sb + b[i]));
        sa / f64::max(sb, 1.0)
    };
    let total_ratio = ratio_of_sums(&mut (0..n));
    // A fixed seed: the same slices give the same interval.
    let mut rng = fastrand::Rng::with_seed(0x9E37_79B9_7F4A_7C15);
    let mut boot: Vec<f64> = (0..RESAMPLES)
        .map(|_| ratio_of_sums(&mut (0..n).map(|_| rng.usize(..n))))
        .collect();
    boot.sort_by(f64::total_cmp);
    let interval = (boot[RESAMPLES / 40], boot[RESAMPLES - 1 - RESAMPLES / 40]);
    Paired {
        n,
        at_or_above,
        median_ratio,
        total_ratio,
        interval,
        sign_p: binomial_tail(n, at_or_above),
    }
}

/// P(X ≥ k) for X ~ Binomial(n, ½).
pub fn binomial_tail(n: usize, k: usize) -> f64 {
    // pmf(i) built up from pmf(0) = 2^-n; fine for the few hundred slices a run has.
    let mut pmf = 0.5f64.powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut tail = 0.0;
    for i in 0..=n {
        if i >= k {
            tail += pmf;
        }
        pmf *= (n - i) as f64 / (i + 1) as f64;
    }
    tail.min(1.0)
}
