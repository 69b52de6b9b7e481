//! Reporting of interleaved measurements: per-round times of a baseline and of the
//! variant measured against it, the ratio taken within each round.

/// The median of `v`.
#[allow(dead_code)]
pub(crate) fn median(v: Vec<f64>) -> f64 {
    quantiles(v).1
}

/// The median, round by round, of the ratio of `variant` to `base` (times a call, one
/// entry a round).
#[allow(dead_code)]
pub(crate) fn median_ratio(variant: &[f64], base: &[f64]) -> f64 {
    median(variant.iter().zip(base).map(|(a, b)| a / b).collect())
}

/// The lower quartile, the median and the upper quartile of `v`.
fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.25), at(0.5), at(0.75))
}

/// Prints the median times of both sides (nanoseconds a call, per round) and the median
/// and quartiles of their ratio, round by round.
#[allow(dead_code)]
pub(crate) fn report(what: &str, (base, base_ns): (&str, Vec<f64>), (other, ns): (&str, Vec<f64>)) {
    let ratios: Vec<f64> = ns.iter().zip(&base_ns).map(|(o, b)| o / b).collect();
    let (_, base_median, _) = quantiles(base_ns);
    let (_, median_ns, _) = quantiles(ns);
    let (q1, median, q3) = quantiles(ratios);
    println!(
        "{what:<16} {base} {:>8.1} µs   {other} {:>8.1} µs   ratio median {median:.3}x (quartiles {q1:.3}x .. {q3:.3}x)",
        base_median / 1e3,
        median_ns / 1e3
    );
}
