//! Percentiles and the report line format.

use std::time::Duration;

/// Sorted samples.
#[derive(Debug)]
pub(crate) struct Samples(Vec<Duration>);

impl Samples {
    pub(crate) fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// The `p`-th percentile (nearest rank), `p` in 0..=100.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub(crate) fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    pub(crate) fn p99(&self) -> Duration {
        self.percentile(99.0)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// Formats a duration with a unit that keeps three significant digits.
pub(crate) fn fmt(d: Duration) -> String {
    let ns = d.as_nanos() as f64;
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

/// `a / b` as a ratio.
pub(crate) fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "n/a".into();
    }
    format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
}

/// Prints the p50 and p99 rows of `spare` against `baseline`, each named
/// by its percentile and then `what` (`"p50"`, or `"p50, with --local"`).
pub(crate) fn percentile_rows(what: &str, spare: &Samples, baseline: &Samples) {
    for (name, of) in [
        ("p50", Samples::p50 as fn(&Samples) -> Duration),
        ("p99", Samples::p99),
    ] {
        row(
            &format!("{name}{what}"),
            &fmt(of(spare)),
            &fmt(of(baseline)),
            &ratio(of(spare), of(baseline)),
        );
    }
}

/// Prints one result row: what, the figure, the baseline, their ratio.
pub(crate) fn row(what: &str, figure: &str, baseline: &str, ratio: &str) {
    println!("| {what} | {figure} | {baseline} | {ratio} |");
}

pub(crate) fn header(title: &str) {
    println!("\n## {title}\n");
    println!("| measure | spare | baseline | ratio |");
    println!("|---|---|---|---|");
}

/// Mean of `values` and the half-width of its 95% confidence interval
/// (Student's t, `n - 1` degrees of freedom); the half-width is NaN for
/// fewer than two values.
pub(crate) fn mean_ci95(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, t975(n - 1) * (var / n as f64).sqrt())
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        // Cornish-Fisher's first correction to the normal quantile.
        _ => {
            let z = 1.959_964;
            z + (z * z * z + z) / (4.0 * df as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Samples::new((1..=100).map(Duration::from_millis).collect());
        assert_eq!(s.p50(), Duration::from_millis(50));
        assert_eq!(s.p99(), Duration::from_millis(99));
        assert_eq!(s.percentile(100.0), Duration::from_millis(100));
        assert_eq!(Samples::new(vec![]).p50(), Duration::ZERO);
    }

    #[test]
    fn confidence_interval_of_the_mean() {
        let (mean, half) = mean_ci95(&[1.0, 2.0, 3.0, 4.0]);
        assert!((mean - 2.5).abs() < 1e-12);
        // s = 1.291, s / sqrt(4) = 0.6455, t(3) = 3.182.
        assert!((half - 2.054).abs() < 1e-3, "{half}");
        assert!(mean_ci95(&[1.0]).1.is_nan());
        assert!((t975(1000) - 1.962).abs() < 1e-3);
    }
}
