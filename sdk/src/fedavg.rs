//! Federated averaging (FedAvg) folded into one accumulator: updates are
//! weighted by their sample counts, added as they arrive, and divided once
//! at the end.
//!
//! Each result carries its sample total, so a tree of averages equals the
//! flat weighted average of every update beneath it: a parent folds its
//! children's means weighted by their totals. The running sum is kept in
//! `f64`, one value per parameter, so an aggregator's memory is bounded by
//! the model's size whatever its number of children. The fold reads every
//! update of a batch side by side, adding each one's values to sums held in
//! registers, so folding several arrived updates costs one pass over the
//! accumulator, not one pass per update.

/// Parameters a step: their running sums stay in registers while every
/// update of the batch is added to them, and each update is read as one
/// unbroken stream, which the hardware prefetchers follow.
const LANES: usize = 16;

/// Updates read side by side in one pass; a longer batch takes more passes.
pub const MAX_BATCH: usize = 8;

/// Most training samples one update may claim. With the control plane's cap
/// of 1,000,000 trainers a round, a round's sample total stays below 2^52:
/// it cannot overflow, and every weight and sum of weights is exact in the
/// aggregators' `f64` arithmetic. The gateway refuses a push that claims
/// more, and an aggregator refuses a child whose total exceeds this times
/// the updates beneath it.
pub const MAX_UPDATE_SAMPLES: u64 = u32::MAX as u64;

/// `acc[i] += weight * values[i]` for each `(values, weight)` of a batch in
/// turn; every slice is as long as `acc`.
type AddBatch = fn(&mut [f64], &[(&[f32], f64)]);

/// `acc[i] += weight * values[i]`, for slices of equal length: the fold of
/// one update, to which [`add_batch`] is bit for bit equal.
#[inline(always)]
fn add_scaled(acc: &mut [f64], values: &[f32], weight: f64) {
    for (a, &x) in acc.iter_mut().zip(values) {
        *a += weight * f64::from(x);
    }
}

/// Folds a batch in one pass over `acc`, at most [`MAX_BATCH`] updates at
/// a time: [`LANES`] sums are loaded, every update's values for them are
/// added in batch order, and the sums are stored back. Each sum sees the
/// same additions in the same order as folding the updates one by one, so
/// the result is the same to the bit.
#[inline(always)]
fn add_batch(acc: &mut [f64], batch: &[(&[f32], f64)]) {
    for part in batch.chunks(MAX_BATCH) {
        match part {
            [(values, weight)] => add_scaled(acc, values, *weight),
            [a, b] => add_fixed(acc, [a, b]),
            [a, b, c] => add_fixed(acc, [a, b, c]),
            [a, b, c, d] => add_fixed(acc, [a, b, c, d]),
            [a, b, c, d, e] => add_fixed(acc, [a, b, c, d, e]),
            [a, b, c, d, e, f] => add_fixed(acc, [a, b, c, d, e, f]),
            [a, b, c, d, e, f, g] => add_fixed(acc, [a, b, c, d, e, f, g]),
            [a, b, c, d, e, f, g, h] => add_fixed(acc, [a, b, c, d, e, f, g, h]),
            // Reached only if MAX_BATCH grows past 8: one by one, the same sums.
            longer => {
                for (values, weight) in longer {
                    add_scaled(acc, values, *weight);
                }
            }
        }
    }
}

/// [`add_batch`] for a batch of `K` updates, `K` known to the compiler so
/// that the additions of one step are laid out in full.
#[inline(always)]
fn add_fixed<const K: usize>(acc: &mut [f64], batch: [&(&[f32], f64); K]) {
    let whole = acc.len() - acc.len() % LANES;
    let (body, tail) = acc.split_at_mut(whole);
    for (step, lanes) in body.chunks_exact_mut(LANES).enumerate() {
        let start = step * LANES;
        let mut sums = [0.0f64; LANES];
        sums.copy_from_slice(lanes);
        for &&(values, weight) in &batch {
            for (sum, &x) in sums.iter_mut().zip(&values[start..start + LANES]) {
                *sum += weight * f64::from(x);
            }
        }
        lanes.copy_from_slice(&sums);
    }
    for &&(values, weight) in &batch {
        add_scaled(tail, &values[whole..], weight);
    }
}

/// The same loop compiled for AVX2: four `f64` lanes an instruction
/// instead of SSE2's two. Multiply and add stay separate operations (no
/// FMA), so the sums are bit for bit those of [`add_batch`] on any machine.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn add_batch_avx2(acc: &mut [f64], batch: &[(&[f32], f64)]) {
    add_batch(acc, batch);
}

/// The widest kernel this CPU runs.
fn add_batch_kernel() -> AddBatch {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        return |acc, batch| {
            // SAFETY: the CPU was just found to support AVX2, the only
            // requirement `add_batch_avx2` adds to a safe function.
            unsafe { add_batch_avx2(acc, batch) }
        };
    }
    add_batch
}

/// Why an update could not be folded or a mean taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    /// An update's length differs from the model's.
    #[error("update has {found} parameters, the model has {expected}")]
    ShapeMismatch {
        /// Parameters in the model.
        expected: usize,
        /// Parameters in the update.
        found: usize,
    },
    /// An update claims no training samples, so it has no weight.
    #[error("an update with zero samples has no weight")]
    ZeroSamples,
    /// Sample totals would overflow a `u64`.
    #[error("sample total overflows")]
    SampleOverflow,
    /// A mean was asked of an accumulator holding nothing.
    #[error("no update has been folded")]
    Empty,
}

/// A weighted sum of updates and the samples behind it.
#[derive(Debug, Clone)]
pub struct Accumulator {
    sum: Vec<f64>,
    samples: u64,
    updates: u64,
}

impl Accumulator {
    /// An empty accumulator for a model of `params` parameters.
    pub fn new(params: usize) -> Self {
        // Written zeros, not `vec![0.0; n]`, whose lazily zeroed pages would
        // fault inside the first fold: this happens while the aggregator
        // still waits for its first input.
        let mut sum = Vec::with_capacity(params);
        sum.resize(params, 0.0);
        Self {
            sum,
            samples: 0,
            updates: 0,
        }
    }

    /// Parameters in the model.
    pub fn params(&self) -> usize {
        self.sum.len()
    }

    /// Samples behind everything folded so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Updates folded so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Folds a batch of `(values, samples)` updates in one pass. Either the
    /// whole batch is folded or, on an error, none of it.
    pub fn fold(&mut self, batch: &[(&[f32], u64)]) -> Result<(), FoldError> {
        let mut samples = self.samples;
        for &(values, weight) in batch {
            if values.len() != self.sum.len() {
                return Err(FoldError::ShapeMismatch {
                    expected: self.sum.len(),
                    found: values.len(),
                });
            }
            if weight == 0 {
                return Err(FoldError::ZeroSamples);
            }
            samples = samples
                .checked_add(weight)
                .ok_or(FoldError::SampleOverflow)?;
        }

        let weighted: Vec<(&[f32], f64)> = batch.iter().map(|&(v, w)| (v, w as f64)).collect();
        add_batch_kernel()(&mut self.sum, &weighted);
        self.samples = samples;
        self.updates += batch.len() as u64;
        Ok(())
    }

    /// Writes the weighted mean into `out` and returns the sample total that
    /// stands behind it, the weight a parent gives this result.
    pub fn write_mean(&self, out: &mut [f32]) -> Result<u64, FoldError> {
        if self.samples == 0 {
            return Err(FoldError::Empty);
        }
        if out.len() != self.sum.len() {
            return Err(FoldError::ShapeMismatch {
                expected: self.sum.len(),
                found: out.len(),
            });
        }
        let total = self.samples as f64;
        for (o, &s) in out.iter_mut().zip(&self.sum) {
            *o = (s / total) as f32;
        }
        Ok(self.samples)
    }

    /// Empties the accumulator for the next round, keeping its memory.
    pub fn reset(&mut self) {
        self.sum.fill(0.0);
        self.samples = 0;
        self.updates = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_of(acc: &Accumulator) -> Vec<f32> {
        let mut out = vec![0.0; acc.params()];
        acc.write_mean(&mut out).unwrap();
        out
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Relative error in the max norm: a parameter that cancels to near
    /// zero is judged against the model's scale, not its own.
    fn close(a: &[f32], b: &[f64], rel: f64) {
        let scale = b.iter().fold(0.0f64, |m, y| m.max(y.abs()));
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (f64::from(x) - y).abs() <= rel * scale,
                "param {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn equal_weights_average_to_the_plain_mean() {
        // The prototype's eager fold gave 3.0 here; the mean is 2.0.
        let mut acc = Accumulator::new(1);
        for v in [1.0f32, 2.0, 3.0] {
            acc.fold(&[(&[v], 10)]).unwrap();
        }
        assert_eq!(mean_of(&acc), vec![2.0]);
        assert_eq!((acc.samples(), acc.updates()), (30, 3));
    }

    #[test]
    fn a_batch_sums_bit_for_bit_as_folding_its_updates_one_by_one() {
        // Not a whole number of steps, so the tail is folded too.
        let n = 3 * LANES * 100 + 7;
        let updates: Vec<Vec<f32>> = (0..9).map(|k| values(k + 11, n)).collect();
        // Weights whose products round, so that the sums depend on the
        // order of the additions.
        let weights = [
            0.1,
            1.0 / 3.0,
            4096.7,
            3e-5,
            1e9 + 0.3,
            7.1,
            2.9,
            1.0 / 7.0,
            5.5,
        ];
        // Every batch size the kernel lays out, and one past a pass.
        for size in 1..=updates.len() {
            let batch: Vec<(&[f32], f64)> = updates
                .iter()
                .zip(weights)
                .take(size)
                .map(|(v, w)| (v.as_slice(), w))
                .collect();
            let (mut wide, mut plain) = (vec![0.25f64; n], vec![0.25f64; n]);
            add_batch_kernel()(&mut wide, &batch);
            for &(values, weight) in &batch {
                add_scaled(&mut plain, values, weight);
            }
            assert!(
                wide.iter()
                    .zip(&plain)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "a batch of {size}"
            );
        }
    }

    #[test]
    fn eager_and_lazy_folds_give_the_same_model() {
        let n = 3 * LANES * 100 + 17;
        let updates: Vec<(Vec<f32>, u64)> = (0..9).map(|k| (values(k, n), 100 + 37 * k)).collect();

        let mut eager = Accumulator::new(n);
        for (v, s) in &updates {
            eager.fold(&[(v, *s)]).unwrap();
        }
        let mut lazy = Accumulator::new(n);
        let batch: Vec<(&[f32], u64)> = updates.iter().map(|(v, s)| (v.as_slice(), *s)).collect();
        lazy.fold(&batch).unwrap();

        assert_eq!(mean_of(&eager), mean_of(&lazy));
    }

    #[test]
    fn a_tree_of_averages_equals_the_flat_weighted_average() {
        let n = LANES * 100 + 5;
        let updates: Vec<(Vec<f32>, u64)> = (0..12)
            .map(|k| (values(k + 50, n), 1 + (k * k) % 7))
            .collect();

        // Independently: the weighted mean, straight from the definition.
        let total: u64 = updates.iter().map(|(_, s)| s).sum();
        let flat: Vec<f64> = (0..n)
            .map(|i| {
                updates
                    .iter()
                    .map(|(v, s)| f64::from(v[i]) * *s as f64)
                    .sum::<f64>()
                    / total as f64
            })
            .collect();

        // Leaves of 3, 4 and 5 updates, then one top over the leaves' means.
        let mut top = Accumulator::new(n);
        for range in [0..3, 3..7, 7..12] {
            let mut leaf = Accumulator::new(n);
            for (v, s) in &updates[range] {
                leaf.fold(&[(v, *s)]).unwrap();
            }
            let mut partial = vec![0.0; n];
            let samples = leaf.write_mean(&mut partial).unwrap();
            top.fold(&[(&partial, samples)]).unwrap();
        }
        assert_eq!(top.samples(), total);
        close(&mean_of(&top), &flat, 1e-6);
    }

    #[test]
    fn bad_updates_are_refused_and_leave_the_sum_untouched() {
        let mut acc = Accumulator::new(4);
        acc.fold(&[(&[1.0; 4], 2)]).unwrap();
        let short = [1.0f32; 3];
        assert_eq!(
            acc.fold(&[(&[5.0; 4], 1), (&short, 1)]),
            Err(FoldError::ShapeMismatch {
                expected: 4,
                found: 3
            })
        );
        assert_eq!(acc.fold(&[(&[5.0; 4], 0)]), Err(FoldError::ZeroSamples));
        assert_eq!(
            acc.fold(&[(&[5.0; 4], u64::MAX)]),
            Err(FoldError::SampleOverflow)
        );
        assert_eq!(mean_of(&acc), vec![1.0; 4], "a refused batch folds nothing");

        acc.reset();
        assert_eq!(acc.write_mean(&mut [0.0; 4]), Err(FoldError::Empty));
    }
}
