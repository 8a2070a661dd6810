//! Statistics over repeated, interleaved samples: medians, spreads, paired ratios and the
//! flagging of slow samples (the machine has fast and slow stretches; slow samples are shown,
//! never dropped).

use serde::Serialize;

/// A sample is flagged slow when it is below this fraction of its configuration's median.
pub(crate) const SLOW_FRACTION: f64 = 0.7;

/// Median of `values` (mean of the two middle values for an even count); `None` when empty or
/// when a value is not a number.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        f64::midpoint(v[mid - 1], v[mid])
    })
}

/// Nearest-rank percentile (`p` in 0..=100) of `values`; `None` when empty.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil().max(1.0);
    // `rank` is at least 1 and at most len, so the index is in range.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "rank is a small positive whole number"
    )]
    let idx = (rank as usize).min(v.len()) - 1;
    Some(v[idx])
}

/// Median and spread of one series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) n: usize,
}

impl Summary {
    /// `None` for an empty series.
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
        let median = median(values)?;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Self {
            median,
            min,
            max,
            n: values.len(),
        })
    }
}

/// Ratios paired within one repetition: `a[i] / b[i]` for every repetition where both exist
/// and `b[i]` is not zero.
pub(crate) fn paired_ratios(a: &[Option<f64>], b: &[Option<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter_map(|(x, y)| match (x, y) {
            (Some(x), Some(y)) if *y != 0.0 => Some(x / y),
            _ => None,
        })
        .collect()
}

/// Which samples are slow: below [`SLOW_FRACTION`] of the median of the series.
pub(crate) fn slow_flags(values: &[Option<f64>]) -> Vec<bool> {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    let Some(m) = median(&present) else {
        return vec![false; values.len()];
    };
    values
        .iter()
        .map(|v| v.is_some_and(|v| v < SLOW_FRACTION * m))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_series() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn summary_has_median_min_max() {
        let s = Summary::of(&[10.0, 8.0, 12.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (10.0, 8.0, 12.0, 3));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn ratios_pair_by_repetition_and_skip_gaps() {
        let a = [Some(9.0), None, Some(4.0), Some(1.0)];
        let b = [Some(10.0), Some(10.0), Some(8.0), Some(0.0)];
        assert_eq!(paired_ratios(&a, &b), vec![0.9, 0.5]);
    }

    #[test]
    fn slow_samples_are_flagged_not_dropped() {
        let flags = slow_flags(&[Some(100.0), Some(50.0), None, Some(98.0), Some(102.0)]);
        assert_eq!(flags, vec![false, true, false, false, false]);
    }
}
