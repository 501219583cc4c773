//! The benches' paired-slice statistics (`benches/common/paired.rs`),
//! tested here: bench targets have no test harness.

#[path = "../benches/common/paired.rs"]
#[allow(dead_code)] // the benches read the fields
mod paired;

use paired::{binomial_tail, compare};

#[test]
fn sign_test_tail() {
    assert!((binomial_tail(1, 1) - 0.5).abs() < 1e-12);
    assert!((binomial_tail(10, 0) - 1.0).abs() < 1e-12);
    // 9 or 10 heads of 10: 11 / 1024.
    assert!((binomial_tail(10, 9) - 11.0 / 1024.0).abs() < 1e-12);
}

#[test]
fn a_steady_lead_has_an_interval_above_one() {
    let b: Vec<f64> = (0..40)
        .map(|i| 30_000.0 + f64::from(i % 7) * 4_000.0)
        .collect();
    let a: Vec<f64> = b.iter().map(|x| x * 1.2).collect();
    let p = compare(&a, &b);
    assert_eq!(p.at_or_above, 40);
    assert!((p.total_ratio - 1.2).abs() < 1e-9 && (p.median_ratio - 1.2).abs() < 1e-9);
    assert!(p.interval.0 > 1.19 && p.interval.1 < 1.21);
    assert!(p.sign_p < 1e-9);
}

#[test]
fn noise_gives_an_interval_around_one() {
    // Equal servers, slices swinging 10k-70k: the interval must cover 1.
    let b: Vec<f64> = (0..40)
        .map(|i| 10_000.0 + f64::from((i * 37) % 61) * 1_000.0)
        .collect();
    let a: Vec<f64> = (0..40)
        .map(|i| 10_000.0 + f64::from((i * 23 + 5) % 61) * 1_000.0)
        .collect();
    let p = compare(&a, &b);
    assert!(p.interval.0 < 1.0 && p.interval.1 > 1.0, "{:?}", p.interval);
}

#[test]
fn an_even_count_takes_the_mean_of_the_middle_two() {
    let b = [10_000.0; 4];
    let a = [10_000.0, 20_000.0, 30_000.0, 40_000.0];
    let p = compare(&a, &b);
    assert!((p.median_ratio - 2.5).abs() < 1e-12, "{}", p.median_ratio);
    assert!((p.total_ratio - 2.5).abs() < 1e-12);
    assert_eq!(p.at_or_above, 4);
}
