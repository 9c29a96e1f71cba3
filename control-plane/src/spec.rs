//! The job spec: the draft a user writes (JSON file or gRPC message) and its
//! validation into the typed spec the rest of the control plane trusts.
//!
//! A [`JobSpecDraft`] mirrors the wire fields one to one, with strings where
//! the wire has strings, so that an unknown rule or dtype reaches validation
//! and is reported with its field path instead of failing to parse.
//! [`JobSpecDraft::validate`] is the only way to get a [`JobSpec`].

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::planner;

/// Most rounds a job may ask for.
pub const MAX_ROUNDS: u32 = 1_000_000;
/// Most trainers one round may admit. The open round keeps one assignment
/// per trainer in memory, so this bounds that map (about 100 MB at most).
pub const MAX_TRAINERS_PER_ROUND: u32 = 1_000_000;
/// Most aggregators the tree of one round may have. Every aggregator takes an
/// endpoint id, which is never reused, and a core on some node; this keeps a
/// round's plan small and the 32-bit endpoint ids lasting.
pub const MAX_AGGREGATORS_PER_ROUND: u64 = 65_536;
/// Longest round deadline: one week.
pub const MAX_ROUND_DEADLINE_MS: u64 = 7 * 24 * 3600 * 1000;
/// Largest model, in bytes (64 GiB).
pub const MAX_MODEL_BYTES: u64 = 64 << 30;
/// Largest fan-in one aggregator may be given.
pub const MAX_FAN_IN: u32 = 1 << 16;
/// Most levels a fixed hierarchy may have.
pub const MAX_FIXED_LEVELS: u32 = 3;
/// Most tensors a model may have.
pub const MAX_TENSORS: usize = 10_000;
/// Most dimensions one tensor may have.
pub const MAX_DIMS: usize = 8;
/// Most violations a [`SpecError`] lists; the rest are only counted, so a
/// spec with a million bad fields gets a short answer.
pub const MAX_VIOLATIONS: usize = 32;

/// A job spec as written, not yet validated. Unknown JSON fields are errors.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpecDraft {
    /// Human-readable name.
    pub name: String,
    /// The model's tensors.
    pub model: ModelLayoutDraft,
    /// Rounds to run.
    pub rounds: u32,
    /// Trainers admitted per round.
    pub trainers_per_round: u32,
    /// Updates a round needs.
    pub min_trainers: u32,
    /// Round deadline in milliseconds.
    pub round_deadline_ms: u64,
    /// Rule and mode.
    pub aggregation: AggregationDraft,
    /// Tree shape.
    pub hierarchy: HierarchyDraft,
}

/// The tensors of a model, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelLayoutDraft {
    /// Tensors in layout order.
    pub tensors: Vec<TensorDraft>,
}

/// One tensor, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorDraft {
    /// Unique name.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
    /// Element type name, such as `f32`.
    pub dtype: String,
}

/// Aggregation rule and mode, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationDraft {
    /// Rule name, such as `fedavg`.
    pub rule: String,
    /// `eager` or `lazy`.
    pub mode: String,
}

/// Tree shape, as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HierarchyDraft {
    /// Levels: a number, or `"auto"` (also the default, and what 0 means).
    #[serde(default)]
    pub levels: LevelsDraft,
    /// Most children per aggregator.
    pub max_fan_in: u32,
}

/// Levels as written: a count or a word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LevelsDraft {
    /// A number of levels; 0 means auto.
    Count(u32),
    /// A word; only `auto` is accepted.
    Word(String),
}

impl Default for LevelsDraft {
    fn default() -> Self {
        Self::Word("auto".to_owned())
    }
}

impl LevelsDraft {
    /// The count the wire carries: the number as written, and 0 for `auto`.
    /// Any other word has no wire form and is refused, naming
    /// `hierarchy.levels`.
    pub fn to_count(&self) -> Result<u32, SpecError> {
        match self {
            Self::Count(n) => Ok(*n),
            Self::Word(w) if w == "auto" => Ok(0),
            Self::Word(w) => {
                let mut bad = Violations::default();
                bad.add("hierarchy.levels", levels_word_reason(w));
                Err(bad.into_error())
            }
        }
    }
}

fn levels_word_reason(word: &str) -> String {
    format!("is {word:?}; must be 1 to {MAX_FIXED_LEVELS}, or \"auto\"")
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human-readable name.
    pub name: String,
    /// The model's tensors, in layout order.
    pub tensors: Vec<Tensor>,
    /// Rounds to run, at least 1.
    pub rounds: u32,
    /// Trainers admitted per round, at least 1.
    pub trainers_per_round: u32,
    /// Updates a round needs, 1 to `trainers_per_round`.
    pub min_trainers: u32,
    /// Round deadline in milliseconds, at least 1.
    pub round_deadline_ms: u64,
    /// How updates are combined.
    pub rule: AggregationRule,
    /// When updates are combined.
    pub mode: AggregationMode,
    /// Tree depth.
    pub levels: Levels,
    /// Most children per aggregator, at least 2.
    pub max_fan_in: u32,
}

/// One validated tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tensor {
    /// Unique name.
    pub name: String,
    /// Dimensions, each at least 1.
    pub shape: Vec<u64>,
    /// Element type.
    pub dtype: DType,
}

/// Element types a tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 single precision.
    F32,
}

impl DType {
    /// The name used on the wire and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            Self::F32 => 4,
        }
    }
}

/// Aggregation rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregationRule {
    /// Sample-weighted average of the updates.
    FedAvg,
}

impl AggregationRule {
    /// The name used on the wire and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
        }
    }
}

/// When an aggregator combines updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregationMode {
    /// Fold each update in as it arrives.
    Eager,
    /// Wait for all updates, then combine.
    Lazy,
}

impl AggregationMode {
    /// The name used on the wire and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eager => "eager",
            Self::Lazy => "lazy",
        }
    }
}

/// Depth of the aggregation tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Levels {
    /// As few levels as the fan-in allows.
    Auto,
    /// Exactly this many levels, 1 to [`MAX_FIXED_LEVELS`].
    Fixed(u32),
}

impl JobSpec {
    /// Bytes of one model update. Validation bounds the total, so the error
    /// only comes from a spec built or stored without it.
    pub fn model_bytes(&self) -> Result<u64, SpecError> {
        self.tensors
            .iter()
            .try_fold(0u64, |total, t| {
                total.checked_add(tensor_bytes(&t.shape, t.dtype)?)
            })
            .ok_or_else(|| {
                let mut bad = Violations::default();
                bad.add(
                    "model.tensors",
                    "the model's size in bytes overflows 64 bits",
                );
                bad.into_error()
            })
    }
}

/// Bytes of one tensor, or `None` if that overflows 64 bits.
fn tensor_bytes(shape: &[u64], dtype: DType) -> Option<u64> {
    shape
        .iter()
        .try_fold(1u64, |elements, &dim| elements.checked_mul(dim))?
        .checked_mul(dtype.size_bytes())
}

/// One field that failed validation: its path in the spec and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path from the spec's root, such as `hierarchy.max_fan_in` or
    /// `model.tensors[2].shape[0]`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub reason: String,
}

/// A spec that failed validation, with the violations found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The first violations, in field order, at most [`MAX_VIOLATIONS`];
    /// never empty.
    pub violations: Vec<FieldViolation>,
    /// Violations found past the first [`MAX_VIOLATIONS`], counted only.
    pub omitted: usize,
}

impl SpecError {
    /// Prefixes every field path, for example with `spec.` when the spec is
    /// one field of a request.
    pub fn under(mut self, prefix: &str) -> Self {
        for v in &mut self.violations {
            v.field = format!("{prefix}.{}", v.field);
        }
        self
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.reason)?;
        }
        if self.omitted > 0 {
            write!(f, "; and {} more", self.omitted)?;
        }
        Ok(())
    }
}

/// Collects violations while validation walks the draft, keeping the first
/// [`MAX_VIOLATIONS`] and counting the rest.
#[derive(Debug, Default)]
struct Violations {
    kept: Vec<FieldViolation>,
    /// Every violation found, kept or not.
    total: usize,
}

impl Violations {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.total += 1;
        if self.kept.len() < MAX_VIOLATIONS {
            self.kept.push(FieldViolation {
                field: field.into(),
                reason: reason.into(),
            });
        }
    }

    fn into_error(self) -> SpecError {
        SpecError {
            omitted: self.total - self.kept.len(),
            violations: self.kept,
        }
    }
}

/// Whether `name` is 1 to `max` characters of letters, digits, `.`, `_`, `-`.
pub fn is_valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl JobSpecDraft {
    /// Checks every field and returns the typed spec, or every violation.
    pub fn validate(&self) -> Result<JobSpec, SpecError> {
        let mut bad = Violations::default();

        if !is_valid_name(&self.name, 128) {
            bad.add(
                "name",
                "must be 1 to 128 characters of letters, digits, '.', '_' or '-'",
            );
        }
        let tensors = validate_tensors(&self.model, &mut bad);
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            bad.add("rounds", format!("must be 1 to {MAX_ROUNDS}"));
        }
        if self.trainers_per_round == 0 || self.trainers_per_round > MAX_TRAINERS_PER_ROUND {
            bad.add(
                "trainers_per_round",
                format!("must be 1 to {MAX_TRAINERS_PER_ROUND}"),
            );
        }
        if self.min_trainers == 0 {
            bad.add("min_trainers", "must be at least 1");
        } else if self.trainers_per_round > 0 && self.min_trainers > self.trainers_per_round {
            bad.add(
                "min_trainers",
                format!(
                    "is {} but trainers_per_round is only {}",
                    self.min_trainers, self.trainers_per_round
                ),
            );
        }
        if self.round_deadline_ms == 0 || self.round_deadline_ms > MAX_ROUND_DEADLINE_MS {
            bad.add(
                "round_deadline_ms",
                format!("must be 1 to {MAX_ROUND_DEADLINE_MS} (one week)"),
            );
        }
        let (rule, mode) = validate_aggregation(&self.aggregation, &mut bad);
        let levels = validate_hierarchy(&self.hierarchy, self.trainers_per_round, &mut bad);

        match (tensors, rule, mode, levels) {
            (Some(tensors), Some(rule), Some(mode), Some(levels)) if bad.total == 0 => {
                Ok(JobSpec {
                    name: self.name.clone(),
                    tensors,
                    rounds: self.rounds,
                    trainers_per_round: self.trainers_per_round,
                    min_trainers: self.min_trainers,
                    round_deadline_ms: self.round_deadline_ms,
                    rule,
                    mode,
                    levels,
                    max_fan_in: self.hierarchy.max_fan_in,
                })
            }
            _ => Err(bad.into_error()),
        }
    }
}

fn validate_tensors(model: &ModelLayoutDraft, bad: &mut Violations) -> Option<Vec<Tensor>> {
    if model.tensors.is_empty() {
        bad.add("model.tensors", "must list at least one tensor");
        return None;
    }
    if model.tensors.len() > MAX_TENSORS {
        bad.add(
            "model.tensors",
            format!(
                "has {} tensors; at most {MAX_TENSORS} are allowed",
                model.tensors.len()
            ),
        );
        return None;
    }

    let before = bad.total;
    let mut names = HashSet::new();
    let mut total_bytes: u64 = 0;
    let mut tensors = Vec::with_capacity(model.tensors.len());
    for (i, t) in model.tensors.iter().enumerate() {
        let at = format!("model.tensors[{i}]");
        if t.name.is_empty() || t.name.len() > 256 {
            bad.add(format!("{at}.name"), "must be 1 to 256 characters");
        } else if !names.insert(t.name.as_str()) {
            bad.add(format!("{at}.name"), format!("{:?} is used twice", t.name));
        }
        let dtype = match t.dtype.as_str() {
            "f32" => Some(DType::F32),
            other => {
                bad.add(
                    format!("{at}.dtype"),
                    format!("unsupported dtype {other:?}; supported: f32"),
                );
                None
            }
        };
        if t.shape.is_empty() {
            bad.add(format!("{at}.shape"), "must have at least one dimension");
        } else if t.shape.len() > MAX_DIMS {
            bad.add(
                format!("{at}.shape"),
                format!(
                    "has {} dimensions; at most {MAX_DIMS} are allowed",
                    t.shape.len()
                ),
            );
            continue;
        }
        for (d, &dim) in t.shape.iter().enumerate() {
            if dim == 0 {
                bad.add(format!("{at}.shape[{d}]"), "must be at least 1");
            }
        }
        let bytes = tensor_bytes(&t.shape, dtype.unwrap_or(DType::F32));
        total_bytes = bytes
            .and_then(|b| total_bytes.checked_add(b))
            .unwrap_or(u64::MAX);
        if let Some(dtype) = dtype {
            tensors.push(Tensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype,
            });
        }
    }
    if total_bytes > MAX_MODEL_BYTES {
        bad.add(
            "model.tensors",
            format!("the model exceeds {MAX_MODEL_BYTES} bytes"),
        );
    }
    (bad.total == before).then_some(tensors)
}

fn validate_aggregation(
    aggregation: &AggregationDraft,
    bad: &mut Violations,
) -> (Option<AggregationRule>, Option<AggregationMode>) {
    let rule = match aggregation.rule.as_str() {
        "fedavg" => Some(AggregationRule::FedAvg),
        other => {
            bad.add(
                "aggregation.rule",
                format!("unknown rule {other:?}; known: fedavg"),
            );
            None
        }
    };
    let mode = match aggregation.mode.as_str() {
        "eager" => Some(AggregationMode::Eager),
        "lazy" => Some(AggregationMode::Lazy),
        other => {
            bad.add(
                "aggregation.mode",
                format!("unknown mode {other:?}; known: eager, lazy"),
            );
            None
        }
    };
    (rule, mode)
}

fn validate_hierarchy(
    hierarchy: &HierarchyDraft,
    trainers_per_round: u32,
    bad: &mut Violations,
) -> Option<Levels> {
    let fan_in = hierarchy.max_fan_in;
    let fan_in_ok = (2..=MAX_FAN_IN).contains(&fan_in);
    if !fan_in_ok {
        bad.add(
            "hierarchy.max_fan_in",
            format!("is {fan_in}; must be 2 to {MAX_FAN_IN}"),
        );
    }

    let levels = match &hierarchy.levels {
        LevelsDraft::Count(0) => Levels::Auto,
        LevelsDraft::Count(n) if *n <= MAX_FIXED_LEVELS => Levels::Fixed(*n),
        LevelsDraft::Word(w) if w == "auto" => Levels::Auto,
        LevelsDraft::Count(n) => {
            bad.add(
                "hierarchy.levels",
                format!("is {n}; must be 1 to {MAX_FIXED_LEVELS}, or auto"),
            );
            return None;
        }
        LevelsDraft::Word(w) => {
            bad.add("hierarchy.levels", levels_word_reason(w));
            return None;
        }
    };

    let trainers_ok = (1..=MAX_TRAINERS_PER_ROUND).contains(&trainers_per_round);
    if !fan_in_ok || !trainers_ok {
        return Some(levels);
    }

    // A fixed depth must be able to hold a full round within the fan-in.
    if let Levels::Fixed(n) = levels {
        let capacity = u64::from(fan_in).saturating_pow(n);
        if capacity < u64::from(trainers_per_round) {
            bad.add(
                "hierarchy.levels",
                format!(
                    "{n} level(s) with max_fan_in {fan_in} hold at most {capacity} trainers, \
                     but trainers_per_round is {trainers_per_round}"
                ),
            );
            return Some(levels);
        }
    }

    // The planned tree must stay within the per-round aggregator budget.
    let aggregators = planner::size_tree(trainers_per_round, fan_in, levels).aggregators();
    if aggregators > MAX_AGGREGATORS_PER_ROUND {
        bad.add(
            "hierarchy.max_fan_in",
            format!(
                "is {fan_in}; with trainers_per_round {trainers_per_round} a round needs \
                 {aggregators} aggregators, more than the {MAX_AGGREGATORS_PER_ROUND} allowed; \
                 raise max_fan_in or lower trainers_per_round"
            ),
        );
    }
    Some(levels)
}

impl From<&JobSpec> for JobSpecDraft {
    fn from(spec: &JobSpec) -> Self {
        Self {
            name: spec.name.clone(),
            model: ModelLayoutDraft {
                tensors: spec
                    .tensors
                    .iter()
                    .map(|t| TensorDraft {
                        name: t.name.clone(),
                        shape: t.shape.clone(),
                        dtype: t.dtype.as_str().to_owned(),
                    })
                    .collect(),
            },
            rounds: spec.rounds,
            trainers_per_round: spec.trainers_per_round,
            min_trainers: spec.min_trainers,
            round_deadline_ms: spec.round_deadline_ms,
            aggregation: AggregationDraft {
                rule: spec.rule.as_str().to_owned(),
                mode: spec.mode.as_str().to_owned(),
            },
            hierarchy: HierarchyDraft {
                levels: match spec.levels {
                    Levels::Auto => LevelsDraft::default(),
                    Levels::Fixed(n) => LevelsDraft::Count(n),
                },
                max_fan_in: spec.max_fan_in,
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A spec every test starts from and breaks one field of.
    pub(crate) fn good_draft() -> JobSpecDraft {
        JobSpecDraft {
            name: "mnist-cnn".to_owned(),
            model: ModelLayoutDraft {
                tensors: vec![
                    TensorDraft {
                        name: "conv1.weight".to_owned(),
                        shape: vec![32, 1, 3, 3],
                        dtype: "f32".to_owned(),
                    },
                    TensorDraft {
                        name: "fc.bias".to_owned(),
                        shape: vec![10],
                        dtype: "f32".to_owned(),
                    },
                ],
            },
            rounds: 3,
            trainers_per_round: 100,
            min_trainers: 80,
            round_deadline_ms: 60_000,
            aggregation: AggregationDraft {
                rule: "fedavg".to_owned(),
                mode: "eager".to_owned(),
            },
            hierarchy: HierarchyDraft {
                levels: LevelsDraft::default(),
                max_fan_in: 10,
            },
        }
    }

    fn fields_of(draft: &JobSpecDraft) -> Vec<String> {
        match draft.validate() {
            Ok(_) => Vec::new(),
            Err(e) => e.violations.into_iter().map(|v| v.field).collect(),
        }
    }

    #[test]
    fn good_spec_validates_and_sizes_its_model() {
        let spec = good_draft().validate().unwrap();
        assert_eq!(spec.levels, Levels::Auto);
        assert_eq!(spec.model_bytes(), Ok((32 * 9 + 10) * 4));
        assert_eq!(JobSpecDraft::from(&spec), good_draft());
    }

    #[test]
    fn each_broken_field_is_named_by_its_path() {
        type Breaker = Box<dyn Fn(&mut JobSpecDraft)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("name", Box::new(|d| d.name.clear())),
            ("rounds", Box::new(|d| d.rounds = 0)),
            ("trainers_per_round", Box::new(|d| d.trainers_per_round = 0)),
            ("min_trainers", Box::new(|d| d.min_trainers = 101)),
            ("round_deadline_ms", Box::new(|d| d.round_deadline_ms = 0)),
            (
                "aggregation.rule",
                Box::new(|d| d.aggregation.rule = "fedmedian".into()),
            ),
            (
                "aggregation.mode",
                Box::new(|d| d.aggregation.mode = "".into()),
            ),
            (
                "hierarchy.max_fan_in",
                Box::new(|d| d.hierarchy.max_fan_in = 1),
            ),
            (
                "hierarchy.levels",
                Box::new(|d| d.hierarchy.levels = LevelsDraft::Count(4)),
            ),
            (
                "hierarchy.levels",
                Box::new(|d| d.hierarchy.levels = LevelsDraft::Word("deep".into())),
            ),
            (
                "hierarchy.levels",
                Box::new(|d| d.hierarchy.levels = LevelsDraft::Count(1)),
            ),
            ("model.tensors", Box::new(|d| d.model.tensors.clear())),
            (
                "model.tensors[1].shape",
                Box::new(|d| d.model.tensors[1].shape.clear()),
            ),
            (
                "model.tensors[0].shape[2]",
                Box::new(|d| d.model.tensors[0].shape[2] = 0),
            ),
            (
                "model.tensors[1].dtype",
                Box::new(|d| d.model.tensors[1].dtype = "f16".into()),
            ),
            (
                "model.tensors[1].name",
                Box::new(|d| d.model.tensors[1].name = "conv1.weight".into()),
            ),
            (
                "model.tensors",
                Box::new(|d| d.model.tensors[0].shape = vec![u64::MAX, 2]),
            ),
        ];
        for (field, break_it) in cases {
            let mut draft = good_draft();
            break_it(&mut draft);
            assert_eq!(
                fields_of(&draft),
                vec![field.to_owned()],
                "breaking {field}"
            );
        }
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let mut draft = good_draft();
        draft.rounds = 0;
        draft.hierarchy.max_fan_in = 0;
        let err = draft.validate().unwrap_err().under("spec");
        assert_eq!(
            err.to_string(),
            "spec.rounds: must be 1 to 1000000; spec.hierarchy.max_fan_in: is 0; must be 2 to 65536"
        );
    }

    #[test]
    fn fixed_levels_must_hold_a_full_round() {
        let mut draft = good_draft();
        draft.hierarchy.levels = LevelsDraft::Count(2);
        assert_eq!(draft.validate().unwrap().levels, Levels::Fixed(2));
        draft.trainers_per_round = 101;
        let err = draft.validate().unwrap_err();
        assert!(
            err.to_string().contains("hold at most 100 trainers"),
            "{err}"
        );
    }

    #[test]
    fn trainers_per_round_is_capped() {
        let mut draft = good_draft();
        draft.trainers_per_round = MAX_TRAINERS_PER_ROUND + 1;
        draft.hierarchy.max_fan_in = 1024;
        let err = draft.validate().unwrap_err();
        assert_eq!(err.to_string(), "trainers_per_round: must be 1 to 1000000");
    }

    #[test]
    fn a_tree_over_the_aggregator_budget_is_refused_naming_the_fan_in() {
        let mut draft = good_draft();
        draft.trainers_per_round = 1_000_000;
        // Fan-in 16 needs 5 levels: 62500 + 3907 + 245 + 16 + 1 aggregators.
        draft.hierarchy.max_fan_in = 16;
        let err = draft.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "hierarchy.max_fan_in: is 16; with trainers_per_round 1000000 a round needs \
             66669 aggregators, more than the 65536 allowed; \
             raise max_fan_in or lower trainers_per_round"
        );

        // Fan-in 32 needs 31250 + 977 + 31 + 1.
        draft.hierarchy.max_fan_in = 32;
        assert_eq!(draft.validate().unwrap().trainers_per_round, 1_000_000);
        assert_eq!(
            planner::size_tree(1_000_000, 32, Levels::Auto).aggregators(),
            32_259
        );
    }

    #[test]
    fn model_bytes_reports_overflow_instead_of_wrapping() {
        let mut spec = good_draft().validate().unwrap();
        spec.tensors[0].shape = vec![u64::MAX / 8];
        assert_eq!(spec.model_bytes(), Ok(u64::MAX / 8 * 4 + 10 * 4));

        // Each tensor fits in 64 bits; their sum does not.
        spec.tensors[0].shape = vec![u64::MAX / 4];
        spec.tensors[1].shape = vec![u64::MAX / 4];
        let err = spec.model_bytes().unwrap_err();
        assert_eq!(
            err.to_string(),
            "model.tensors: the model's size in bytes overflows 64 bits"
        );
        spec.tensors[1].shape = vec![u64::MAX, 2];
        assert!(spec.model_bytes().is_err());
    }

    #[test]
    fn tensor_and_dimension_counts_are_capped() {
        let mut draft = good_draft();
        draft.model.tensors = (0..=MAX_TENSORS)
            .map(|i| TensorDraft {
                name: format!("t{i}"),
                shape: vec![1],
                dtype: "f32".to_owned(),
            })
            .collect();
        assert_eq!(
            draft.validate().unwrap_err().to_string(),
            "model.tensors: has 10001 tensors; at most 10000 are allowed"
        );
        draft.model.tensors.truncate(MAX_TENSORS);
        assert_eq!(draft.validate().unwrap().tensors.len(), MAX_TENSORS);

        let mut draft = good_draft();
        draft.model.tensors[1].shape = vec![1; MAX_DIMS + 1];
        assert_eq!(
            draft.validate().unwrap_err().to_string(),
            "model.tensors[1].shape: has 9 dimensions; at most 8 are allowed"
        );
        draft.model.tensors[1].shape = vec![1; MAX_DIMS];
        assert!(draft.validate().is_ok());
    }

    #[test]
    fn violations_past_the_first_32_are_only_counted() {
        let mut draft = good_draft();
        draft.model.tensors = (0..40)
            .map(|i| TensorDraft {
                name: format!("t{i}"),
                shape: vec![0],
                dtype: "f32".to_owned(),
            })
            .collect();
        draft.rounds = 0;
        let err = draft.validate().unwrap_err();
        assert_eq!(err.violations.len(), MAX_VIOLATIONS);
        assert_eq!(err.omitted, 9);
        assert_eq!(err.violations[31].field, "model.tensors[31].shape[0]");
        let text = err.under("spec").to_string();
        assert!(
            text.starts_with("spec.model.tensors[0].shape[0]: must be at least 1; "),
            "{text}"
        );
        assert!(
            text.ends_with("spec.model.tensors[31].shape[0]: must be at least 1; and 9 more"),
            "{text}"
        );
    }

    #[test]
    fn levels_words_other_than_auto_have_no_count() {
        assert_eq!(LevelsDraft::default().to_count(), Ok(0));
        assert_eq!(LevelsDraft::Count(2).to_count(), Ok(2));
        let err = LevelsDraft::Word("deep".into()).to_count().unwrap_err();
        assert_eq!(
            err.under("spec").to_string(),
            "spec.hierarchy.levels: is \"deep\"; must be 1 to 3, or \"auto\""
        );
    }

    #[test]
    fn json_with_an_unknown_field_is_refused() {
        let mut json = serde_json::to_value(good_draft()).unwrap();
        json["hierarchy"]["fan_out"] = 3.into();
        let err = serde_json::from_value::<JobSpecDraft>(json).unwrap_err();
        assert!(err.to_string().contains("unknown field `fan_out`"), "{err}");
    }

    #[test]
    fn json_levels_accept_a_number_or_auto() {
        let mut json = serde_json::to_value(good_draft()).unwrap();
        json["hierarchy"]["levels"] = 2.into();
        let draft: JobSpecDraft = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(draft.validate().unwrap().levels, Levels::Fixed(2));
        json["hierarchy"].as_object_mut().unwrap().remove("levels");
        let draft: JobSpecDraft = serde_json::from_value(json).unwrap();
        assert_eq!(draft.validate().unwrap().levels, Levels::Auto);
    }
}
