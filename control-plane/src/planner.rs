//! Plans the aggregation tree of one round: how many aggregators at each
//! level, who is whose parent, which node each runs on, and which leaf each
//! trainer sends to.
//!
//! Sizing: the tree has the requested number of levels (or, for auto, the
//! fewest that keep every aggregator within the maximum fan-in), and the same
//! fan-in `f` at every level: the smallest `f` with `f^levels >= trainers`.
//! Children are spread over parents so that siblings differ by at most one.
//!
//! Placement walks the tree from the top, keeping subtrees whole: a child and
//! its subtree go on the parent's node if they fit there (so every hop stays
//! in shared memory); otherwise on the node that fits the subtree most tightly
//! (best fit, so few nodes are used); if no node fits it, beside the parent
//! while the parent's node has a free core, else on the node with most room.
//!
//! LIMITATION: placement counts one aggregator per core and checks only that
//! a node's arena can hold one model; it does not model arena use by updates
//! waiting in place, nor prefer nodes with warm aggregators. A round larger
//! than the cluster's cores is overcommitted onto the least-loaded nodes, and
//! the sidecar's arena back-pressure is what then slows uploads. Feeding arena
//! use and warm instances from heartbeats into the node candidates would fix it.

use serde::{Deserialize, Serialize};

use crate::spec::Levels;

/// A node the planner may place aggregators on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCandidate {
    /// Node id.
    pub id: String,
    /// Cores: one aggregator each before the node counts as full.
    pub cores: u32,
}

/// One aggregator in a planned tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregator {
    /// Endpoint id, unique across jobs and rounds.
    pub endpoint_id: u32,
    /// 1 for leaves, up to the tree's level count for the top.
    pub level: u32,
    /// Parent's endpoint id; `None` for the top.
    pub parent: Option<u32>,
    /// Node it runs on.
    pub node_id: String,
    /// Trainers (leaves) or child aggregators (above) it waits for.
    pub expected_inputs: u32,
}

/// The planned tree of one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Job id.
    pub job_id: u32,
    /// Round number, from 1.
    pub round: u32,
    /// Levels of aggregators.
    pub levels: u32,
    /// Children per aggregator aimed for.
    pub fan_in: u32,
    /// Every aggregator: the leaves first, then each level above.
    pub aggregators: Vec<Aggregator>,
}

impl Topology {
    /// The leaves, in endpoint-id order.
    pub fn leaves(&self) -> &[Aggregator] {
        let n = self.aggregators.iter().take_while(|a| a.level == 1).count();
        &self.aggregators[..n]
    }

    /// The leaf the `index`-th trainer to join (from 0) sends to: trainers
    /// are dealt round the leaves, so leaf loads differ by at most one.
    pub fn leaf_for_trainer(&self, index: u32) -> Option<&Aggregator> {
        self.leaves_for_trainer(index).next()
    }

    /// Every leaf, in the order the `index`-th trainer should try them: its
    /// dealt leaf first, then the ones after it, wrapping round.
    pub fn leaves_for_trainer(&self, index: u32) -> impl Iterator<Item = &Aggregator> {
        let leaves = self.leaves();
        let start = usize::try_from(index).map_or(0, |i| i % leaves.len().max(1));
        leaves[start..].iter().chain(&leaves[..start])
    }

    /// The highest endpoint id in the tree.
    pub fn last_endpoint_id(&self) -> Option<u32> {
        self.aggregators.iter().map(|a| a.endpoint_id).max()
    }
}

/// How many aggregators each level holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeShape {
    /// Children per aggregator aimed for.
    pub fan_in: u32,
    /// Aggregators per level, leaves first; the last is always 1.
    pub widths: Vec<u32>,
}

impl TreeShape {
    /// Aggregators in the whole tree.
    pub fn aggregators(&self) -> u64 {
        self.widths.iter().map(|&w| u64::from(w)).sum()
    }
}

/// Why a round could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No node is online with room for the model.
    #[error("no online node can hold the job")]
    NoNode,
    /// The tree would need endpoint ids past `u32::MAX`; ids are never
    /// reused, so no later round can be planned either.
    #[error(
        "endpoint ids are exhausted: the round needs {needed} from id {first}, \
         but the last endpoint id is {}",
        u32::MAX
    )]
    EndpointIdsExhausted {
        /// The first id the round would take.
        first: u64,
        /// Ids the round needs.
        needed: u64,
    },
}

/// Sizes the tree for `trainers` updates. Callers pass a validated spec:
/// `trainers >= 1`, `max_fan_in >= 2`, and a fixed depth that can hold them.
pub fn size_tree(trainers: u32, max_fan_in: u32, levels: Levels) -> TreeShape {
    let trainers = u64::from(trainers.max(1));
    let max_fan_in = u64::from(max_fan_in.max(2));
    let depth = match levels {
        Levels::Fixed(n) => n.max(1),
        Levels::Auto => {
            let mut depth = 1;
            while max_fan_in.saturating_pow(depth) < trainers {
                depth += 1;
            }
            depth
        }
    };

    // The smallest fan-in that holds every trainer in `depth` levels.
    let mut fan_in = 1u64;
    while fan_in.saturating_pow(depth) < trainers {
        fan_in += 1;
    }

    let mut widths = Vec::new();
    let mut below = trainers;
    for _ in 0..depth {
        below = below.div_ceil(fan_in);
        widths.push(u32::try_from(below).unwrap_or(u32::MAX));
    }
    TreeShape {
        fan_in: u32::try_from(fan_in).unwrap_or(u32::MAX),
        widths,
    }
}

/// Plans round `round` of job `job_id` for `trainers` trainers over `nodes`,
/// numbering endpoints from `first_endpoint_id` (at least 1; a `u64` so that
/// the id after `u32::MAX` can be passed and refused, never wrapped).
pub fn plan(
    job_id: u32,
    round: u32,
    trainers: u32,
    max_fan_in: u32,
    levels: Levels,
    nodes: &[NodeCandidate],
    first_endpoint_id: u64,
) -> Result<Topology, PlanError> {
    if nodes.is_empty() {
        return Err(PlanError::NoNode);
    }
    let shape = size_tree(trainers, max_fan_in, levels);
    let mut aggregators = number_tree(&shape, trainers, first_endpoint_id)?;
    place(&mut aggregators, nodes);
    Ok(Topology {
        job_id,
        round,
        levels: u32::try_from(shape.widths.len()).unwrap_or(u32::MAX),
        fan_in: shape.fan_in,
        aggregators,
    })
}

/// Gives every aggregator its id, level, parent and input count; no node yet.
fn number_tree(
    shape: &TreeShape,
    trainers: u32,
    first_endpoint_id: u64,
) -> Result<Vec<Aggregator>, PlanError> {
    let needed = shape.aggregators();
    let exhausted = PlanError::EndpointIdsExhausted {
        first: first_endpoint_id,
        needed,
    };
    let last = first_endpoint_id
        .checked_add(needed)
        .and_then(|end| end.checked_sub(1));
    if first_endpoint_id == 0 || last.is_none_or(|last| last > u64::from(u32::MAX)) {
        return Err(exhausted);
    }

    // Level starts: the first endpoint id of each level. The check above
    // keeps every id within `u32`.
    let mut starts = Vec::with_capacity(shape.widths.len());
    let mut next = first_endpoint_id;
    for &w in &shape.widths {
        starts.push(u32::try_from(next).map_err(|_| exhausted.clone())?);
        next += u64::from(w);
    }

    let mut aggregators = Vec::new();
    let mut inputs_below = trainers;
    for (l, &width) in shape.widths.iter().enumerate() {
        let parent_width = shape.widths.get(l + 1).copied();
        let mut expected = vec![0u32; width as usize];
        // Inputs dealt round-robin (leaves) or proportionally (above): both
        // leave siblings within one of each other.
        for input in 0..inputs_below {
            let slot = if l == 0 {
                input % width
            } else {
                parent_index(input, inputs_below, width)
            };
            expected[slot as usize] += 1;
        }
        for (i, expected_inputs) in (0..width).zip(expected) {
            let parent = parent_width.map(|pw| starts[l + 1] + parent_index(i, width, pw));
            aggregators.push(Aggregator {
                endpoint_id: starts[l] + i,
                level: u32::try_from(l + 1).unwrap_or(u32::MAX),
                parent,
                node_id: String::new(),
                expected_inputs,
            });
        }
        inputs_below = width;
    }
    Ok(aggregators)
}

/// The parent of child `i` of `width` children spread over `parents` parents.
fn parent_index(i: u32, width: u32, parents: u32) -> u32 {
    let p = u64::from(i) * u64::from(parents) / u64::from(width.max(1));
    u32::try_from(p).unwrap_or(0)
}

/// Assigns a node to every aggregator: locality first, then best fit.
fn place(aggregators: &mut [Aggregator], nodes: &[NodeCandidate]) {
    let index_of = |id: u32| (id - aggregators[0].endpoint_id) as usize;
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); aggregators.len()];
    for (i, a) in aggregators.iter().enumerate() {
        if let Some(p) = a.parent {
            children[index_of(p)].push(i);
        }
    }
    let mut subtree = vec![1u32; aggregators.len()];
    // Children always come before parents in the list.
    for i in 0..aggregators.len() {
        for &c in &children[i] {
            subtree[i] += subtree[c];
        }
    }

    let mut free: Vec<i64> = nodes.iter().map(|n| i64::from(n.cores.max(1))).collect();
    let top = aggregators.len() - 1;
    let mut stack = vec![(top, None::<usize>)];
    while let Some((i, parent_node)) = stack.pop() {
        let node = match parent_node {
            Some(n) if free[n] >= i64::from(subtree[i]) => n,
            Some(n) if free[n] > 0 && !fits_anywhere(&free, subtree[i]) => n,
            _ => choose_node(&free, nodes, subtree[i]),
        };
        free[node] -= 1;
        aggregators[i].node_id = nodes[node].id.clone();
        for &c in children[i].iter().rev() {
            stack.push((c, Some(node)));
        }
    }
}

/// Whether some node has room for a whole subtree of `size` aggregators.
fn fits_anywhere(free: &[i64], size: u32) -> bool {
    free.iter().any(|&f| f >= i64::from(size))
}

/// The node for a subtree of `size` aggregators that cannot go beside its
/// parent: the tightest node that fits it whole, else the one with most room,
/// else (all full) the least loaded relative to its cores.
fn choose_node(free: &[i64], nodes: &[NodeCandidate], size: u32) -> usize {
    let size = i64::from(size);
    let tightest = (0..free.len())
        .filter(|&n| free[n] >= size)
        .min_by_key(|&n| free[n]);
    let roomiest = (0..free.len())
        .filter(|&n| free[n] > 0)
        .max_by_key(|&n| free[n]);
    tightest.or(roomiest).unwrap_or_else(|| {
        (0..free.len())
            .min_by(|&a, &b| {
                let load = |n: usize| -free[n] as f64 / f64::from(nodes[n].cores.max(1));
                load(a).total_cmp(&load(b))
            })
            .unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn nodes(cores: &[u32]) -> Vec<NodeCandidate> {
        cores
            .iter()
            .enumerate()
            .map(|(i, &cores)| NodeCandidate {
                id: format!("node-{i}"),
                cores,
            })
            .collect()
    }

    #[test]
    fn auto_depth_is_the_fewest_levels_within_the_fan_in() {
        assert_eq!(size_tree(1, 10, Levels::Auto).widths, vec![1]);
        assert_eq!(size_tree(10, 10, Levels::Auto).widths, vec![1]);
        let shape = size_tree(11, 10, Levels::Auto);
        assert_eq!((shape.fan_in, shape.widths), (4, vec![3, 1]));
        let shape = size_tree(10_000, 10, Levels::Auto);
        assert_eq!((shape.fan_in, shape.widths), (10, vec![1000, 100, 10, 1]));
        let shape = size_tree(1_000_000, 100, Levels::Auto);
        assert_eq!((shape.fan_in, shape.widths), (100, vec![10_000, 100, 1]));
    }

    #[test]
    fn fixed_depth_balances_the_fan_in_across_levels() {
        let shape = size_tree(100, 10, Levels::Fixed(3));
        assert_eq!((shape.fan_in, shape.widths), (5, vec![20, 4, 1]));
        let shape = size_tree(100, 100, Levels::Fixed(1));
        assert_eq!((shape.fan_in, shape.widths), (100, vec![1]));
        let shape = size_tree(3, 10, Levels::Fixed(3));
        assert_eq!(shape.widths, vec![2, 1, 1]);
    }

    #[test]
    fn every_aggregator_has_one_parent_on_the_level_above_and_respects_fan_in() {
        for (trainers, fan_in, levels) in [
            (1, 2, Levels::Auto),
            (7, 2, Levels::Auto),
            (100, 10, Levels::Fixed(2)),
            (101, 10, Levels::Fixed(3)),
            (9_999, 16, Levels::Auto),
        ] {
            let topo = plan(1, 1, trainers, fan_in, levels, &nodes(&[4, 4]), 1).unwrap();
            let by_id: HashMap<u32, &Aggregator> = topo
                .aggregators
                .iter()
                .map(|a| (a.endpoint_id, a))
                .collect();
            let tops: Vec<_> = topo
                .aggregators
                .iter()
                .filter(|a| a.parent.is_none())
                .collect();
            assert_eq!(tops.len(), 1);
            assert_eq!(tops[0].level, topo.levels);

            let mut children: HashMap<u32, u32> = HashMap::new();
            for a in &topo.aggregators {
                assert!(
                    a.expected_inputs >= 1 && a.expected_inputs <= fan_in,
                    "{a:?}"
                );
                if let Some(p) = a.parent {
                    assert_eq!(by_id[&p].level, a.level + 1);
                    *children.entry(p).or_default() += 1;
                }
            }
            for a in topo.aggregators.iter().filter(|a| a.level > 1) {
                assert_eq!(children[&a.endpoint_id], a.expected_inputs);
            }
            let leaf_inputs: u32 = topo.leaves().iter().map(|l| l.expected_inputs).sum();
            assert_eq!(leaf_inputs, trainers);
        }
    }

    #[test]
    fn trainers_are_dealt_to_leaves_evenly() {
        let topo = plan(1, 1, 23, 4, Levels::Auto, &nodes(&[8]), 1).unwrap();
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for k in 0..23 {
            *counts
                .entry(topo.leaf_for_trainer(k).unwrap().endpoint_id)
                .or_default() += 1;
        }
        let (min, max) = (
            counts.values().min().unwrap(),
            counts.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{counts:?}");
        for leaf in topo.leaves() {
            assert_eq!(counts[&leaf.endpoint_id], leaf.expected_inputs);
        }
    }

    #[test]
    fn endpoint_ids_are_consecutive_from_the_first_leaves_first() {
        let topo = plan(1, 1, 100, 10, Levels::Fixed(2), &nodes(&[4]), 500).unwrap();
        let ids: Vec<u32> = topo.aggregators.iter().map(|a| a.endpoint_id).collect();
        assert_eq!(ids, (500..511).collect::<Vec<_>>());
        assert_eq!(topo.leaves().len(), 10);
        assert_eq!(topo.last_endpoint_id(), Some(510));
    }

    #[test]
    fn children_stay_beside_their_parent_while_it_has_cores() {
        // 3 leaves + 1 top fit on the 4-core node: best fit leaves the 8-core
        // node untouched.
        let topo = plan(1, 1, 12, 4, Levels::Fixed(2), &nodes(&[8, 4]), 1).unwrap();
        assert!(
            topo.aggregators.iter().all(|a| a.node_id == "node-1"),
            "{topo:?}"
        );

        // 20 leaves, 4 middles and a top on 6-core nodes: each middle and
        // its 5 leaves land on one node.
        let topo = plan(1, 1, 100, 10, Levels::Fixed(3), &nodes(&[6, 6, 6, 6, 6]), 1).unwrap();
        let by_id: HashMap<u32, &Aggregator> = topo
            .aggregators
            .iter()
            .map(|a| (a.endpoint_id, a))
            .collect();
        let split = topo
            .aggregators
            .iter()
            .filter(|a| a.level == 1)
            .filter(|a| by_id[&a.parent.unwrap()].node_id != a.node_id)
            .count();
        assert_eq!(split, 0, "{topo:?}");
    }

    #[test]
    fn a_round_larger_than_the_cluster_is_spread_over_every_node() {
        let topo = plan(1, 1, 1000, 10, Levels::Auto, &nodes(&[2, 2, 2]), 1).unwrap();
        let mut per_node: HashMap<&str, usize> = HashMap::new();
        for a in &topo.aggregators {
            *per_node.entry(a.node_id.as_str()).or_default() += 1;
        }
        assert_eq!(per_node.len(), 3);
        let (min, max) = (
            per_node.values().min().unwrap(),
            per_node.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{per_node:?}");
    }

    #[test]
    fn planning_without_nodes_or_ids_fails() {
        assert_eq!(
            plan(1, 1, 10, 4, Levels::Auto, &[], 1),
            Err(PlanError::NoNode)
        );
        let last = u64::from(u32::MAX);
        // 10 trainers at fan-in 4: 3 leaves and a top.
        let err = plan(1, 1, 10, 4, Levels::Auto, &nodes(&[1]), last - 2).unwrap_err();
        assert_eq!(
            err,
            PlanError::EndpointIdsExhausted {
                first: last - 2,
                needed: 4
            }
        );
        assert_eq!(
            err.to_string(),
            "endpoint ids are exhausted: the round needs 4 from id 4294967293, \
             but the last endpoint id is 4294967295"
        );
        assert!(plan(1, 1, 10, 4, Levels::Auto, &nodes(&[1]), last + 1).is_err());
        assert!(plan(1, 1, 10, 4, Levels::Auto, &nodes(&[1]), 0).is_err());
    }

    #[test]
    fn the_last_endpoint_id_is_usable_without_wrapping() {
        let last = u64::from(u32::MAX);
        let topo = plan(1, 1, 10, 4, Levels::Auto, &nodes(&[4]), last - 3).unwrap();
        let ids: Vec<u32> = topo.aggregators.iter().map(|a| a.endpoint_id).collect();
        assert_eq!(
            ids,
            vec![u32::MAX - 3, u32::MAX - 2, u32::MAX - 1, u32::MAX]
        );
        assert!(topo.leaves().iter().all(|l| l.parent == Some(u32::MAX)));
    }

    #[test]
    fn tree_size_counts_every_level() {
        assert_eq!(size_tree(10_000, 10, Levels::Auto).aggregators(), 1111);
        assert_eq!(size_tree(1, 2, Levels::Auto).aggregators(), 1);
    }
}
