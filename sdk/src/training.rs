//! Local training for simulated trainers: a seeded synthetic classification
//! dataset split into non-IID shards, and softmax regression trained on a
//! shard by minibatch SGD.
//!
//! This is the model the demo job federates, so its parameter layout is the
//! layout the platform aggregates. For `classes` classes and `features`
//! features the parameters are one flat `Vec<f32>` of
//! `classes * features + classes` values (see [`ModelShape`]):
//!
//! ```text
//! [ w(0,0) .. w(0,F-1) | w(1,0) .. w(1,F-1) | .. | w(C-1,F-1) | b(0) .. b(C-1) ]
//!   weights, class-major: row c scores class c                  biases
//! ```
//!
//! so the logit of class `c` for a sample `x` is
//! `b(c) + sum over f of w(c,f) * x(f)`.
//!
//! Everything here is deterministic from its seeds and uses no network or
//! clock, so a round's updates can be reproduced exactly in tests.

use std::f64::consts::TAU;

/// Why a dataset could not be generated or a model trained or scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainingError {
    /// A parameter vector's length differs from the model's.
    #[error("parameters have {found} values, the model has {expected}")]
    ShapeMismatch {
        /// Values in the model ([`ModelShape::params`]).
        expected: usize,
        /// Values supplied.
        found: usize,
    },
    /// Samples or labels do not fit the declared shape.
    #[error("malformed samples: {0}")]
    MalformedSamples(&'static str),
    /// A dataset specification cannot produce a dataset.
    #[error("invalid dataset spec: {0}")]
    InvalidSpec(&'static str),
    /// A training configuration cannot train.
    #[error("invalid training config: {0}")]
    InvalidConfig(&'static str),
    /// Training or scoring was asked of no samples.
    #[error("no samples to train on or score")]
    NoSamples,
    /// The starting parameters hold a NaN or an infinity.
    #[error("parameters hold a non-finite value")]
    NonFiniteParams,
    /// Training produced a non-finite value; the learning rate is too large
    /// for the gradient clip to contain.
    #[error("training diverged to a non-finite value")]
    Diverged,
}

/// The dimensions of a softmax-regression model, and so of its flat
/// parameter vector (layout in the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Number of classes scored.
    pub classes: usize,
    /// Number of features per sample.
    pub features: usize,
}

impl ModelShape {
    /// Values in the flat parameter vector: weights then biases.
    pub fn params(&self) -> usize {
        self.classes * self.features + self.classes
    }

    /// Offset of the first bias; the weights come before it.
    pub fn bias_offset(&self) -> usize {
        self.classes * self.features
    }

    /// A zeroed parameter vector, the usual first global model.
    pub fn zeros(&self) -> Vec<f32> {
        vec![0.0; self.params()]
    }

    fn check(&self, params: &[f32]) -> Result<(), TrainingError> {
        if params.len() != self.params() {
            return Err(TrainingError::ShapeMismatch {
                expected: self.params(),
                found: params.len(),
            });
        }
        Ok(())
    }
}

/// Labelled samples: a row-major `len x features` matrix and one label each.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    shape: ModelShape,
    x: Vec<f32>,
    labels: Vec<u32>,
}

impl Samples {
    /// Wraps a row-major feature matrix and its labels, checking that the
    /// matrix has one row per label, every label is below `shape.classes`
    /// and every feature is finite.
    pub fn new(shape: ModelShape, x: Vec<f32>, labels: Vec<u32>) -> Result<Self, TrainingError> {
        if shape.classes < 2 || shape.features == 0 {
            return Err(TrainingError::MalformedSamples(
                "need at least 2 classes and 1 feature",
            ));
        }
        if x.len() != labels.len() * shape.features {
            return Err(TrainingError::MalformedSamples(
                "feature matrix is not one row per label",
            ));
        }
        if labels.iter().any(|&y| y as usize >= shape.classes) {
            return Err(TrainingError::MalformedSamples("label out of range"));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(TrainingError::MalformedSamples("non-finite feature"));
        }
        Ok(Self { shape, x, labels })
    }

    /// The shape of a model that fits these samples.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features of sample `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn row(&self, i: usize) -> &[f32] {
        let f = self.shape.features;
        &self.x[i * f..(i + 1) * f]
    }

    /// Every label, in sample order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// How many samples carry each label, indexed by class.
    pub fn label_counts(&self) -> Vec<u64> {
        let mut counts = vec![0; self.shape.classes];
        for &y in &self.labels {
            counts[y as usize] += 1;
        }
        counts
    }
}

/// How to generate a [`FederatedDataset`]. Start from
/// [`SyntheticSpec::new`] and change the fields that matter.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// Seed for everything generated: equal specs give equal datasets.
    pub seed: u64,
    /// Number of classes, at least 2.
    pub classes: usize,
    /// Features per sample, at least 1.
    pub features: usize,
    /// Number of trainer shards, at least 1.
    pub trainers: usize,
    /// Training samples over all shards; at least one per shard.
    pub train_samples: usize,
    /// Samples in the held-out test set, drawn with uniform labels.
    pub test_samples: usize,
    /// Standard deviation of each coordinate of a class mean. Class means
    /// lie about `separation * sqrt(2 * features)` apart.
    pub separation: f32,
    /// Typical standard deviation of the per-feature noise around a class
    /// mean.
    pub noise: f32,
    /// Spread of the noise across features, at least 1: each feature's
    /// noise standard deviation is `noise` times a factor drawn once,
    /// log-uniformly in `[1 / noise_spread, noise_spread]`. Above 1, some
    /// features are far more informative than others, which a nearest-mean
    /// classifier ignores and a trained model learns to weigh.
    pub noise_spread: f32,
    /// Fraction of a shard's samples drawn from its two dominant classes;
    /// the rest have uniform labels. 0 gives IID shards.
    pub dominant_fraction: f32,
}

impl SyntheticSpec {
    /// The demo's dataset: 10 classes in 32 features, 32 trainers holding
    /// 100 samples on average, 80% of each trainer's samples from its two
    /// dominant classes, and a 1000-sample test set. The classes separate
    /// well once informative features are weighted over noisy ones, so
    /// FedAvg's first round scores near 0.8 on the test set and a few more
    /// rounds above 0.9.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            classes: 10,
            features: 32,
            trainers: 32,
            train_samples: 3200,
            test_samples: 1000,
            separation: 0.8,
            noise: 1.0,
            noise_spread: 6.0,
            dominant_fraction: 0.8,
        }
    }

    /// The shape of a model that fits this dataset.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            classes: self.classes,
            features: self.features,
        }
    }

    fn validate(&self) -> Result<(), TrainingError> {
        let bad = |reason| Err(TrainingError::InvalidSpec(reason));
        if self.classes < 2 || self.features == 0 {
            return bad("need at least 2 classes and 1 feature");
        }
        if u32::try_from(self.classes).is_err() {
            return bad("more classes than a u32 label holds");
        }
        if self.trainers == 0 || self.train_samples < self.trainers {
            return bad("need at least one trainer and one sample per trainer");
        }
        if !(self.separation.is_finite() && self.separation >= 0.0) {
            return bad("separation must be finite and non-negative");
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return bad("noise must be finite and non-negative");
        }
        if !(self.noise_spread.is_finite() && self.noise_spread >= 1.0) {
            return bad("noise_spread must be finite and at least 1");
        }
        if !(0.0..=1.0).contains(&self.dominant_fraction) {
            return bad("dominant_fraction must lie in [0, 1]");
        }
        Ok(())
    }
}

/// A synthetic dataset split for federated training: one non-IID shard per
/// trainer and an IID held-out test set.
#[derive(Debug, Clone, PartialEq)]
pub struct FederatedDataset {
    /// One shard per trainer, in trainer order; sizes differ.
    pub shards: Vec<Samples>,
    /// Held-out samples with uniform labels, for scoring the global model.
    pub test: Samples,
}

impl FederatedDataset {
    /// Generates the dataset `spec` describes, deterministically from
    /// `spec.seed`.
    ///
    /// Each class is a Gaussian cluster around a mean drawn once. Shard
    /// sizes vary up to 3x around the average. Trainer `i`'s dominant
    /// classes are `i % classes` (so every class dominates somewhere when
    /// there are enough trainers) and one other drawn at random; a
    /// `dominant_fraction` of its samples are split evenly between them.
    pub fn generate(spec: &SyntheticSpec) -> Result<Self, TrainingError> {
        spec.validate()?;
        let mut rng = SplitMix64::new(spec.seed);
        let means = class_means(spec, &mut rng);
        let noise = feature_noise(spec, &mut rng);

        let sizes = shard_sizes(spec, &mut rng);
        let mut shards = Vec::with_capacity(spec.trainers);
        for (trainer, &size) in sizes.iter().enumerate() {
            let first = trainer % spec.classes;
            let second = (first + 1 + rng.below(spec.classes - 1)) % spec.classes;
            let mut label = |rng: &mut SplitMix64| {
                if rng.unit() < f64::from(spec.dominant_fraction) {
                    if rng.below(2) == 0 {
                        first
                    } else {
                        second
                    }
                } else {
                    rng.below(spec.classes)
                }
            };
            shards.push(draw_samples(
                spec, &means, &noise, size, &mut label, &mut rng,
            )?);
        }

        let mut uniform = |rng: &mut SplitMix64| rng.below(spec.classes);
        let test = draw_samples(
            spec,
            &means,
            &noise,
            spec.test_samples,
            &mut uniform,
            &mut rng,
        )?;
        Ok(Self { shards, test })
    }
}

/// One mean per class, row-major `classes x features`.
fn class_means(spec: &SyntheticSpec, rng: &mut SplitMix64) -> Vec<f32> {
    (0..spec.classes * spec.features)
        .map(|_| (rng.gaussian() * f64::from(spec.separation)) as f32)
        .collect()
}

/// One noise standard deviation per feature, log-uniform around
/// `spec.noise` within a factor of `spec.noise_spread`.
fn feature_noise(spec: &SyntheticSpec, rng: &mut SplitMix64) -> Vec<f32> {
    let log_spread = f64::from(spec.noise_spread).ln();
    (0..spec.features)
        .map(|_| {
            let factor = (log_spread * (2.0 * rng.unit() - 1.0)).exp();
            (f64::from(spec.noise) * factor) as f32
        })
        .collect()
}

/// Shard sizes summing to `spec.train_samples`, each at least 1, drawn with
/// weights in [0.5, 1.5) so the largest is up to 3x the smallest.
fn shard_sizes(spec: &SyntheticSpec, rng: &mut SplitMix64) -> Vec<usize> {
    let weights: Vec<f64> = (0..spec.trainers).map(|_| 0.5 + rng.unit()).collect();
    let total_weight: f64 = weights.iter().sum();
    let spare = spec.train_samples - spec.trainers;

    let mut sizes: Vec<usize> = weights
        .iter()
        .map(|w| 1 + (spare as f64 * w / total_weight) as usize)
        .collect();

    // Flooring leaves fewer than `trainers` samples over; hand them out.
    let assigned: usize = sizes.iter().sum();
    for size in sizes.iter_mut().take(spec.train_samples - assigned) {
        *size += 1;
    }
    sizes
}

/// Draws `count` samples: a label from `label`, then its class mean plus
/// Gaussian noise of each feature's standard deviation in `noise`.
fn draw_samples(
    spec: &SyntheticSpec,
    means: &[f32],
    noise: &[f32],
    count: usize,
    label: &mut dyn FnMut(&mut SplitMix64) -> usize,
    rng: &mut SplitMix64,
) -> Result<Samples, TrainingError> {
    let f = spec.features;
    let mut x = Vec::with_capacity(count * f);
    let mut labels = Vec::with_capacity(count);
    for _ in 0..count {
        let y = label(rng);
        for (&mean, &sigma) in means[y * f..(y + 1) * f].iter().zip(noise) {
            x.push(mean + (rng.gaussian() * f64::from(sigma)) as f32);
        }
        // `validate` checked that every class index fits a u32.
        labels.push(y as u32);
    }
    Samples::new(spec.shape(), x, labels)
}

/// How a trainer trains locally each round.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Passes over the shard.
    pub epochs: usize,
    /// Samples per SGD step; the last step of an epoch may have fewer.
    pub batch_size: usize,
    /// SGD step size, finite and positive.
    pub learning_rate: f32,
    /// Largest L2 norm of one step's gradient; larger gradients are scaled
    /// down to it, so one step moves the parameters at most
    /// `learning_rate * max_grad_norm`.
    pub max_grad_norm: f32,
    /// Seed for the per-epoch shuffle; vary it by trainer and round.
    pub seed: u64,
}

impl TrainConfig {
    /// One epoch of batches of 16 at learning rate 0.1, clipped at norm 10.
    pub fn new(seed: u64) -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            learning_rate: 0.1,
            max_grad_norm: 10.0,
            seed,
        }
    }

    fn validate(&self) -> Result<(), TrainingError> {
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(TrainingError::InvalidConfig(
                "epochs and batch_size must be positive",
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(TrainingError::InvalidConfig(
                "learning_rate must be finite and positive",
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(TrainingError::InvalidConfig(
                "max_grad_norm must be finite and positive",
            ));
        }
        Ok(())
    }
}

/// Trains softmax regression on `shard` starting from `global`, by
/// `config.epochs` epochs of minibatch SGD on the mean cross-entropy, each
/// epoch in a fresh shuffled order.
///
/// Returns the new parameters and the number of samples behind them (the
/// shard's size, whatever the epochs), which is the weight FedAvg gives
/// this update.
pub fn train_local(
    global: &[f32],
    shard: &Samples,
    config: &TrainConfig,
) -> Result<(Vec<f32>, u64), TrainingError> {
    let shape = shard.shape();
    shape.check(global)?;
    config.validate()?;
    if shard.is_empty() {
        return Err(TrainingError::NoSamples);
    }
    if global.iter().any(|v| !v.is_finite()) {
        return Err(TrainingError::NonFiniteParams);
    }

    let mut params = global.to_vec();
    let mut grad = vec![0.0f32; shape.params()];
    let mut order: Vec<usize> = (0..shard.len()).collect();
    let mut rng = SplitMix64::new(config.seed);
    for _ in 0..config.epochs {
        rng.shuffle(&mut order);
        for batch in order.chunks(config.batch_size) {
            batch_gradient(&params, shard, batch, &mut grad);
            clip_norm(&mut grad, config.max_grad_norm);
            for (p, g) in params.iter_mut().zip(&grad) {
                *p -= config.learning_rate * g;
            }
        }
    }

    if params.iter().any(|v| !v.is_finite()) {
        return Err(TrainingError::Diverged);
    }
    Ok((params, shard.len() as u64))
}

/// Writes into `grad` the gradient of the mean cross-entropy over the
/// samples `batch` indexes: for each sample, `(softmax - one_hot) x^T` for
/// the weights and `softmax - one_hot` for the biases.
fn batch_gradient(params: &[f32], samples: &Samples, batch: &[usize], grad: &mut [f32]) {
    let shape = samples.shape();
    let bias = shape.bias_offset();
    let mut probs = vec![0.0f32; shape.classes];
    grad.fill(0.0);

    for &i in batch {
        let x = samples.row(i);
        logits(params, shape, x, &mut probs);
        softmax_in_place(&mut probs);
        probs[samples.labels[i] as usize] -= 1.0;

        for (c, &delta) in probs.iter().enumerate() {
            let row = &mut grad[c * shape.features..(c + 1) * shape.features];
            for (g, &xf) in row.iter_mut().zip(x) {
                *g += delta * xf;
            }
            grad[bias + c] += delta;
        }
    }

    let scale = 1.0 / batch.len() as f32;
    grad.iter_mut().for_each(|g| *g *= scale);
}

/// Scales `grad` down so its L2 norm is at most `max_norm`.
fn clip_norm(grad: &mut [f32], max_norm: f32) {
    let norm = grad
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    if norm > f64::from(max_norm) {
        let scale = (f64::from(max_norm) / norm) as f32;
        grad.iter_mut().for_each(|g| *g *= scale);
    }
}

/// Writes the class scores of `x` into `out` (length `shape.classes`).
fn logits(params: &[f32], shape: ModelShape, x: &[f32], out: &mut [f32]) {
    let bias = &params[shape.bias_offset()..];
    for (c, score) in out.iter_mut().enumerate() {
        let row = &params[c * shape.features..(c + 1) * shape.features];
        let dot: f32 = row.iter().zip(x).map(|(w, xf)| w * xf).sum();
        *score = dot + bias[c];
    }
}

/// Turns scores into probabilities. Subtracting the largest score first
/// keeps every `exp` in (0, 1], so large scores cannot overflow.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    // The largest score contributes exp(0) = 1, so `total >= 1`.
    scores.iter_mut().for_each(|s| *s /= total);
}

/// Mean cross-entropy of the model `params` on `samples`, in nats,
/// computed as log-sum-exp minus the true class's score so it stays finite
/// whatever the scores.
pub fn loss(params: &[f32], samples: &Samples) -> Result<f64, TrainingError> {
    let shape = samples.shape();
    shape.check(params)?;
    if samples.is_empty() {
        return Err(TrainingError::NoSamples);
    }

    let mut scores = vec![0.0f32; shape.classes];
    let mut total = 0.0f64;
    for (i, &y) in samples.labels.iter().enumerate() {
        logits(params, shape, samples.row(i), &mut scores);
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum_exp: f64 = scores.iter().map(|&s| f64::from(s - max).exp()).sum();
        total += sum_exp.ln() - f64::from(scores[y as usize] - max);
    }
    Ok(total / samples.len() as f64)
}

/// Fraction of `samples` whose highest-scoring class under `params` is
/// their label; ties go to the lowest class index.
pub fn accuracy(params: &[f32], samples: &Samples) -> Result<f64, TrainingError> {
    let shape = samples.shape();
    shape.check(params)?;
    if samples.is_empty() {
        return Err(TrainingError::NoSamples);
    }

    let mut scores = vec![0.0f32; shape.classes];
    let mut correct = 0usize;
    for (i, &y) in samples.labels.iter().enumerate() {
        logits(params, shape, samples.row(i), &mut scores);
        let mut best = 0;
        for (c, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = c;
            }
        }
        correct += usize::from(best == y as usize);
    }
    Ok(correct as f64 / samples.len() as f64)
}

/// A small, fast, seedable generator (SplitMix64): statistically fine for
/// simulation, not for anything secret.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` for `n > 0`, by multiply-shift (bias below 2^-32
    /// for the sizes used here).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Standard normal, by Box-Muller.
    fn gaussian(&mut self) -> f64 {
        // 1 - unit() lies in (0, 1], so the logarithm is finite.
        let radius = (-2.0 * (1.0 - self.unit()).ln()).sqrt();
        radius * (TAU * self.unit()).cos()
    }

    /// Fisher-Yates shuffle.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weighted FedAvg of `(params, samples)` updates, computed directly.
    fn weighted_mean(updates: &[(Vec<f32>, u64)]) -> Vec<f32> {
        let total: u64 = updates.iter().map(|(_, n)| n).sum();
        let mut sum = vec![0.0f64; updates[0].0.len()];
        for (params, n) in updates {
            for (s, &p) in sum.iter_mut().zip(params) {
                *s += f64::from(p) * *n as f64;
            }
        }
        sum.iter().map(|s| (s / total as f64) as f32).collect()
    }

    /// Total variation distance between two count vectors' distributions.
    fn total_variation(a: &[u64], b: &[u64]) -> f64 {
        let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 / na - y as f64 / nb).abs())
            .sum::<f64>()
            / 2.0
    }

    /// Mean distance of each shard's label distribution from the pooled one.
    fn mean_skew(data: &FederatedDataset) -> f64 {
        let classes = data.test.shape().classes;
        let mut pooled = vec![0u64; classes];
        for shard in &data.shards {
            for (p, c) in pooled.iter_mut().zip(shard.label_counts()) {
                *p += c;
            }
        }
        let skews: Vec<f64> = data
            .shards
            .iter()
            .map(|s| total_variation(&s.label_counts(), &pooled))
            .collect();
        skews.iter().sum::<f64>() / skews.len() as f64
    }

    #[test]
    fn generator_is_deterministic_for_a_seed() {
        let spec = SyntheticSpec::new(42);
        let a = FederatedDataset::generate(&spec).expect("valid spec");
        let b = FederatedDataset::generate(&spec).expect("valid spec");
        assert_eq!(a, b);

        let c = FederatedDataset::generate(&SyntheticSpec::new(43)).expect("valid spec");
        assert_ne!(a.shards[0].x, c.shards[0].x);
    }

    #[test]
    fn shards_are_non_iid_with_sizes_that_sum_and_differ() {
        let spec = SyntheticSpec::new(7);
        let data = FederatedDataset::generate(&spec).expect("valid spec");

        assert_eq!(data.shards.len(), 32);
        let sizes: Vec<usize> = data.shards.iter().map(Samples::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), spec.train_samples);
        let (min, max) = (sizes.iter().min(), sizes.iter().max());
        assert!(
            max.zip(min).is_some_and(|(max, min)| max * 2 > min * 3),
            "{sizes:?}"
        );
        assert_eq!(data.test.len(), spec.test_samples);

        // With 80% of samples on 2 of 10 classes, a shard is about 0.64 from
        // the pooled distribution in total variation; IID shards of ~100
        // samples are about 0.12 from it.
        let skewed = mean_skew(&data);
        let iid = FederatedDataset::generate(&SyntheticSpec {
            dominant_fraction: 0.0,
            ..spec.clone()
        })
        .expect("valid spec");
        let flat = mean_skew(&iid);
        assert!(skewed > 0.5, "non-IID skew {skewed}");
        assert!(flat < 0.2, "IID skew {flat}");

        // Each shard's two most common labels hold most of its samples.
        for shard in &data.shards {
            let mut counts = shard.label_counts();
            counts.sort_unstable_by(|a, b| b.cmp(a));
            let top_two = (counts[0] + counts[1]) as f64 / shard.len() as f64;
            assert!(top_two > 0.6, "top-two share {top_two}");
        }
    }

    #[test]
    fn invalid_specs_and_configs_are_refused() {
        let spec = SyntheticSpec {
            train_samples: 10,
            ..SyntheticSpec::new(1)
        };
        assert!(matches!(
            FederatedDataset::generate(&spec),
            Err(TrainingError::InvalidSpec(_))
        ));

        let data = FederatedDataset::generate(&SyntheticSpec::new(1)).expect("valid spec");
        let shape = data.test.shape();
        let bad_lr = TrainConfig {
            learning_rate: f32::NAN,
            ..TrainConfig::new(1)
        };
        assert!(matches!(
            train_local(&shape.zeros(), &data.shards[0], &bad_lr),
            Err(TrainingError::InvalidConfig(_))
        ));
        assert_eq!(
            accuracy(&[0.0; 3], &data.test),
            Err(TrainingError::ShapeMismatch {
                expected: 330,
                found: 3
            })
        );
    }

    #[test]
    fn softmax_of_huge_scores_is_finite_and_sums_to_one() {
        let mut scores = [1e30f32, -1e30, 1e30 - 1.0, 0.0];
        softmax_in_place(&mut scores);
        assert!(scores.iter().all(|p| p.is_finite()));
        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(scores[1], 0.0);

        let mut uniform = [3.0f32; 4];
        softmax_in_place(&mut uniform);
        assert_eq!(uniform, [0.25; 4]);
    }

    #[test]
    fn zero_model_loss_is_log_classes() {
        let data = FederatedDataset::generate(&SyntheticSpec::new(3)).expect("valid spec");
        let zeros = data.test.shape().zeros();
        let l = loss(&zeros, &data.test).expect("shapes match");
        assert!((l - 10f64.ln()).abs() < 1e-9, "{l}");
    }

    #[test]
    fn local_training_from_zeros_reduces_shard_loss() {
        let data = FederatedDataset::generate(&SyntheticSpec::new(11)).expect("valid spec");
        let shard = &data.shards[5];
        let zeros = shard.shape().zeros();

        let before = loss(&zeros, shard).expect("shapes match");
        let config = TrainConfig {
            epochs: 2,
            ..TrainConfig::new(5)
        };
        let (trained, samples) = train_local(&zeros, shard, &config).expect("trains");
        let after = loss(&trained, shard).expect("shapes match");

        assert_eq!(samples, shard.len() as u64);
        assert!(after < 0.5 * before, "loss {before} -> {after}");
        assert_eq!(zeros.len(), trained.len());
    }

    #[test]
    fn fedavg_rounds_raise_test_accuracy() {
        let data = FederatedDataset::generate(&SyntheticSpec::new(2024)).expect("valid spec");
        let mut global = data.test.shape().zeros();

        let mut accuracies = Vec::new();
        for round in 0..5u64 {
            let updates: Vec<(Vec<f32>, u64)> = data
                .shards
                .iter()
                .zip(0u64..)
                .map(|(shard, trainer)| {
                    let config = TrainConfig::new(round * 1000 + trainer);
                    train_local(&global, shard, &config).expect("trains")
                })
                .collect();
            global = weighted_mean(&updates);
            accuracies.push(accuracy(&global, &data.test).expect("shapes match"));
        }

        eprintln!("FedAvg test accuracy per round: {accuracies:?}");
        let (first, last) = (accuracies[0], accuracies[4]);
        assert!(last > 0.9, "final accuracy {last}");
        assert!(last > first + 0.1, "{accuracies:?}");
    }

    #[test]
    fn large_learning_rate_stays_finite() {
        let data = FederatedDataset::generate(&SyntheticSpec::new(9)).expect("valid spec");
        let shard = &data.shards[0];
        let config = TrainConfig {
            epochs: 3,
            learning_rate: 1e4,
            ..TrainConfig::new(9)
        };

        let (trained, _) = train_local(&shard.shape().zeros(), shard, &config).expect("finite");
        assert!(trained.iter().all(|p| p.is_finite()));

        let l = loss(&trained, &data.test).expect("shapes match");
        let acc = accuracy(&trained, &data.test).expect("shapes match");
        assert!(l.is_finite(), "loss {l}");
        assert!((0.0..=1.0).contains(&acc), "accuracy {acc}");
    }
}
