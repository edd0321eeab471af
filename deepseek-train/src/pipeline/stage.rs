//! A model cut into pipeline stages, and the stages put back together.
//!
//! Stage `s` holds a contiguous run of decoder blocks. The first stage also holds the token
//! embedding; the last holds the final norm, the output head and the MTP modules, and, when
//! there are MTP modules, a copy of the embedding too (they embed the tokens ahead). As in
//! DeepSeek-V3 §2.2, the two embedding copies are one parameter: their gradients are summed
//! before every update, so they stay equal. The optimizer state of a stage covers its own
//! parameters only, so a rank holds a `1/P` share of the weights and of the AdamW moments (two
//! shares under DualPipe).
//!
//! Checkpoints stay those of one rank: the stages are merged into the full model and optimizer
//! state (by parameter id, which a split keeps), so a run with another layout, or none, loads
//! them.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::Embedding;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use deepseek_core::block::{DecoderLayer, FeedForward};
use deepseek_core::checkpoint::NamedTensor;
use deepseek_core::moe::Routing;
use deepseek_core::mtp::MtpModule;
use deepseek_core::norm::RmsNorm;
use deepseek_core::policy::ExecutionPolicy;
use deepseek_core::projection::Projection;
use deepseek_core::rope::RotaryEmbedding;
use deepseek_core::{DeepSeekConfig, DeepSeekModel};

use crate::error::{Result, TrainError};
use crate::optim::{param_sizes, AdamW};

/// One pipeline stage's part of the model.
#[derive(Module, Debug)]
pub struct Stage<B: Backend> {
    /// The first stage's embedding, or the last stage's copy for the MTP modules.
    pub embed_tokens: Option<Embedding<B>>,
    /// Blocks `blocks` of the main model.
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: Option<RmsNorm<B>>,
    pub lm_head: Option<Projection<B>>,
    pub mtp: Vec<MtpModule<B>>,
    #[module(skip)]
    pub index: usize,
    #[module(skip)]
    pub stages: usize,
    #[module(skip)]
    pub blocks: Range<usize>,
    /// The model's MoE blocks before this stage's first (main blocks), so that this stage's
    /// expert counts land in their place among the model's.
    #[module(skip)]
    pub moe_before: usize,
    #[module(skip)]
    pub rope: RotaryEmbedding,
    #[module(skip)]
    pub policy: ExecutionPolicy,
}

/// What a stage's forward of one micro-batch produced.
pub struct StageOutput<B: Backend> {
    /// `[b, s, d]` the last block's output (not on the last stage).
    pub hidden: Option<Tensor<B, 3>>,
    /// `[b, s, V]` main logits and the MTP logits (last stage only).
    pub logits: Option<Tensor<B, 3>>,
    pub mtp_logits: Vec<Tensor<B, 3>>,
    /// The routing of this stage's MoE blocks, main blocks first.
    pub routing: Vec<Routing<B>>,
}

impl<B: Backend> Stage<B> {
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.stages
    }

    /// The stage over `input` (the previous stage's output) or, on the first stage, over the
    /// embedded `inputs`.
    ///
    /// # Shapes
    /// `inputs`: `[b, s]` token ids, `input`: `[b, s, d]`.
    pub fn forward(
        &self,
        inputs: Tensor<B, 2, Int>,
        input: Option<Tensor<B, 3>>,
        packing: Option<&deepseek_core::packing::Packing>,
    ) -> StageOutput<B> {
        let embed = || self.embed_tokens.as_ref().expect("this stage holds the embedding");
        let mut x = match input {
            Some(x) => x,
            None => embed().forward(inputs.clone()), // [b, s, d]
        };
        let mut routing = Vec::new();
        for layer in &self.layers {
            let (out, r) = layer.forward(x, &self.rope, packing, &self.policy);
            x = out;
            routing.extend(r);
        }
        if !self.is_last() {
            return StageOutput { hidden: Some(x), logits: None, mtp_logits: Vec::new(), routing };
        }
        let norm = self.norm.as_ref().expect("the last stage holds the norm");
        let head = self.lm_head.as_ref().expect("the last stage holds the head");
        let final_hidden = norm.forward(x);
        let project = |h| deepseek_core::model::head_logits(head, h);
        let logits = project(final_hidden.clone());
        let mut mtp_logits = Vec::new();
        if !self.mtp.is_empty() {
            let (l, r) = deepseek_core::mtp::forward_modules(
                &self.mtp,
                final_hidden,
                embed().forward(inputs),
                &self.rope,
                packing,
                &self.policy,
                project,
            );
            mtp_logits = l;
            routing.extend(r);
        }
        StageOutput { hidden: None, logits: Some(logits), mtp_logits, routing }
    }

    /// This stage's MoE-capable blocks in routing order: its main blocks, then the MTP blocks.
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut DecoderLayer<B>> {
        self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block))
    }

    /// Positions of this stage's MoE blocks among all of the model's (main blocks first, then
    /// the MTP modules'), in this stage's routing order.
    pub fn moe_positions(&self, main_moe_blocks: usize) -> Vec<usize> {
        let main = self.layers.iter().filter(|l| matches!(l.mlp, FeedForward::Moe(_))).count();
        let mtp = self.mtp.iter().filter(|m| matches!(m.block.mlp, FeedForward::Moe(_))).count();
        (self.moe_before..self.moe_before + main)
            .chain(main_moe_blocks..main_moe_blocks + mtp)
            .collect()
    }
}

/// The blocks of each of `stages` stages: `explicit` counts per stage, or contiguous runs
/// balanced by parameter count (the embedding counted on the first stage, the head and MTP
/// modules on the last), minimizing the largest stage.
pub fn partition<B: Backend>(
    config: &DeepSeekConfig,
    stages: usize,
    explicit: Option<&[usize]>,
    device: &B::Device,
) -> Result<Vec<Range<usize>>> {
    let n = config.num_hidden_layers;
    if stages == 0 || stages > n {
        return Err(TrainError::config(
            "pipeline_parallel",
            format!("{stages} pipeline stages for {n} decoder blocks: each stage needs at least one block"),
        ));
    }
    if let Some(counts) = explicit {
        if counts.len() != stages || counts.contains(&0) || counts.iter().sum::<usize>() != n {
            return Err(TrainError::config(
                "stage_layers",
                format!("{counts:?} must list {stages} positive block counts summing to the model's {n} blocks"),
            ));
        }
        let mut start = 0;
        return Ok(counts
            .iter()
            .map(|&c| {
                start += c;
                start - c..start
            })
            .collect());
    }
    // Lazily initialized: counting parameters allocates nothing.
    let block: Vec<usize> = (0..n)
        .map(|l| param_sizes::<B, _>(&config.init_layer::<B>(l, device)).iter().sum())
        .collect();
    let embed = config.vocab_size * config.hidden_size;
    let mtp: usize = (1..=config.num_nextn_predict_layers)
        .map(|k| {
            param_sizes::<B, _>(&config.init_mtp::<B>(k, device)).iter().sum::<usize>() + embed
        })
        .sum();
    let weight = |r: &Range<usize>, s: usize| -> usize {
        block[r.clone()].iter().sum::<usize>()
            + if s == 0 { embed } else { 0 }
            + if s + 1 == stages { embed + config.hidden_size + mtp } else { 0 }
    };
    // best[s][j]: the smallest largest-stage weight placing blocks 0..j on stages 0..=s.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; n + 1]; stages];
    let mut cut = vec![vec![0usize; n + 1]; stages];
    for (j, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = weight(&(0..j), 0);
    }
    for s in 1..stages {
        for j in s + 1..=n {
            for i in s..j {
                if best[s - 1][i] == inf {
                    continue;
                }
                let w = best[s - 1][i].max(weight(&(i..j), s));
                if w < best[s][j] {
                    (best[s][j], cut[s][j]) = (w, i);
                }
            }
        }
    }
    let mut ranges = vec![0..0; stages];
    let mut end = n;
    for s in (0..stages).rev() {
        let start = if s == 0 { 0 } else { cut[s][end] };
        ranges[s] = start..end;
        end = start;
    }
    Ok(ranges)
}

/// Cuts `model` into the stages of `ranges` (clones share the weights' storage).
pub fn split<B: Backend>(model: &DeepSeekModel<B>, ranges: &[Range<usize>]) -> Vec<Stage<B>> {
    let stages = ranges.len();
    let has_mtp = !model.mtp.is_empty();
    let is_moe = |l: &DecoderLayer<B>| matches!(l.mlp, FeedForward::Moe(_));
    ranges
        .iter()
        .enumerate()
        .map(|(s, r)| {
            let last = s + 1 == stages;
            Stage {
                embed_tokens: (s == 0 || (last && has_mtp)).then(|| model.embed_tokens.clone()),
                layers: model.layers[r.clone()].to_vec(),
                norm: last.then(|| model.norm.clone()),
                lm_head: last.then(|| model.lm_head.clone()),
                mtp: if last { model.mtp.clone() } else { Vec::new() },
                index: s,
                stages,
                blocks: r.clone(),
                moe_before: model.layers[..r.start].iter().filter(|l| is_moe(l)).count(),
                rope: model.rope.clone(),
                policy: model.policy().clone(),
            }
        })
        .collect()
}

/// The model `stages` (all of them, in order) hold, on `template`'s configuration and policy.
pub fn merge<B: Backend>(template: &DeepSeekModel<B>, stages: Vec<Stage<B>>) -> DeepSeekModel<B> {
    let mut model = template.clone();
    model.layers = Vec::new();
    for (s, stage) in stages.into_iter().enumerate() {
        if s == 0 {
            model.embed_tokens = stage.embed_tokens.clone().expect("the first stage's embedding");
        }
        model.layers.extend(stage.layers);
        if stage.index + 1 == stage.stages {
            model.norm = stage.norm.expect("the last stage's norm");
            model.lm_head = stage.lm_head.expect("the last stage's head");
            model.mtp = stage.mtp;
        }
    }
    model
}

/// Ids of every float parameter of `module`, in visiting order (the optimizer's order).
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// Renames optimizer moments `m.{i}`/`v.{i}` through `index` (old position → new), dropping
/// those it does not map.
fn renumber(tensors: Vec<NamedTensor>, index: &HashMap<usize, usize>) -> Vec<NamedTensor> {
    tensors
        .into_iter()
        .filter_map(|mut t| {
            let (kind, i) = t.name.split_once('.')?;
            let to = index.get(&i.parse::<usize>().ok()?)?;
            t.name = format!("{kind}.{to}");
            Some(t)
        })
        .collect()
}

/// The share of `full` (the optimizer state of `model`) that belongs to `stage`.
pub fn split_optimizer<AB: AutodiffBackend>(
    full: &AdamW<AB::InnerBackend>,
    model: &DeepSeekModel<AB>,
    stage: &Stage<AB>,
    device: &AB::Device,
) -> Result<AdamW<AB::InnerBackend>> {
    let position: HashMap<ParamId, usize> =
        param_ids::<AB, _>(model).into_iter().enumerate().map(|(i, id)| (id, i)).collect();
    let index: HashMap<usize, usize> = param_ids::<AB, _>(stage)
        .into_iter()
        .enumerate()
        .map(|(i, id)| (position[&id], i))
        .collect();
    let mut optim = AdamW::new(full.config);
    optim.load_state(
        full.step,
        renumber(full.state_tensors(), &index),
        &param_sizes::<AB, _>(stage),
        device,
    )?;
    Ok(optim)
}

/// The optimizer state of the whole `model` from its stages' (one per stage, with the stage).
pub fn merge_optimizer<AB: AutodiffBackend>(
    model: &DeepSeekModel<AB>,
    parts: &[(&Stage<AB>, &AdamW<AB::InnerBackend>)],
    device: &AB::Device,
) -> Result<AdamW<AB::InnerBackend>> {
    let position: HashMap<ParamId, usize> =
        param_ids::<AB, _>(model).into_iter().enumerate().map(|(i, id)| (id, i)).collect();
    let mut tensors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (stage, optim) in parts {
        // A parameter two stages share (the embedding with MTP) is taken from the first.
        let index: HashMap<usize, usize> = param_ids::<AB, _>(*stage)
            .into_iter()
            .enumerate()
            .filter(|(_, id)| seen.insert(*id))
            .map(|(i, id)| (i, position[&id]))
            .collect();
        tensors.extend(renumber(optim.state_tensors(), &index));
    }
    let (config, step) = parts.first().map(|(_, o)| (o.config, o.step)).expect("one stage");
    let mut optim = AdamW::new(config);
    optim.load_state(step, tensors, &param_sizes::<AB, _>(model), device)?;
    Ok(optim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorData};

    type AB = Autodiff<Flex>;

    fn four_blocks() -> DeepSeekConfig {
        DeepSeekConfig { num_hidden_layers: 4, ..DeepSeekConfig::tiny() }
    }

    #[test]
    fn stages_compute_the_model_and_merge_back() {
        deepseek_core::register_autodiff::<Flex>();
        let device = Default::default();
        let config = four_blocks();
        let model = crate::trainer::init_model::<AB>(&config, 3, &device);
        let ids = Tensor::<AB, 2, Int>::random([2, 9], Distribution::Uniform(0.0, 200.0), &device);
        let want = model.forward_with(
            ids.clone(),
            deepseek_core::ForwardOptions { hidden_states: false, mtp: true },
        );
        for counts in [vec![1, 3], vec![2, 1, 1], vec![1, 1, 1, 1]] {
            let ranges = partition::<AB>(&config, counts.len(), Some(&counts), &device).unwrap();
            let stages = split(&model, &ranges);
            let mut x = None;
            let mut out = None;
            for stage in &stages {
                let o = stage.forward(ids.clone(), x.take(), None);
                x = o.hidden.clone();
                out = Some(o);
            }
            let out = out.unwrap();
            let close = |a: Tensor<AB, 3>, b: Tensor<AB, 3>| {
                a.into_data().assert_approx_eq::<f32>(
                    &b.into_data(),
                    burn::tensor::Tolerance::absolute(1e-6),
                )
            };
            close(out.logits.unwrap(), want.logits.clone());
            close(out.mtp_logits[0].clone(), want.mtp_logits[0].clone());
            let merged = merge(&model, stages);
            assert_eq!(param_ids::<AB, _>(&merged), param_ids::<AB, _>(&model));
        }
    }

    #[test]
    fn balanced_partition_covers_the_blocks_and_bad_layouts_are_errors() {
        let device = Default::default();
        let config = four_blocks();
        for p in 1..=4 {
            let r = partition::<AB>(&config, p, None, &device).unwrap();
            assert_eq!(r.len(), p);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[p - 1].end, 4);
            assert!(r.windows(2).all(|w| w[0].end == w[1].start && !w[1].is_empty()));
        }
        assert!(partition::<AB>(&config, 5, None, &device)
            .unwrap_err()
            .to_string()
            .contains("at least one block"));
        let bad = partition::<AB>(&config, 2, Some(&[1, 2]), &device).unwrap_err().to_string();
        assert!(bad.contains("summing to the model's 4 blocks"), "{bad}");
    }

    #[test]
    fn optimizer_state_splits_and_merges_exactly() {
        deepseek_core::register_autodiff::<Flex>();
        let device = Default::default();
        let config = four_blocks();
        let model = crate::trainer::init_model::<AB>(&config, 3, &device);
        // One real step so that every moment exists.
        let ids = Tensor::<AB, 2, Int>::from_data(
            TensorData::new((0..18).map(|i| i * 7 % 200).collect::<Vec<i64>>(), [2, 9]),
            &device,
        );
        let loss = crate::loss::batch_loss(
            &model,
            ids,
            crate::loss::LossWeights {
                mtp_lambda: 0.3,
                balance: crate::BalanceMode::AuxFree,
                alpha: 0.01,
            },
        );
        let grads = burn::optim::GradientsParams::from_grads(loss.total.backward(), &model);
        let mut optim = AdamW::new(Default::default());
        let (model, _) = optim.step::<AB, _>(1e-3, model, grads);
        let ranges = partition::<AB>(&config, 3, None, &device).unwrap();
        let stages = split(&model, &ranges);
        let parts: Vec<AdamW<Flex>> =
            stages.iter().map(|s| split_optimizer(&optim, &model, s, &device).unwrap()).collect();
        let pairs: Vec<_> = stages.iter().zip(&parts).collect();
        let merged = merge_optimizer(&model, &pairs, &device).unwrap();
        let names = |o: &AdamW<Flex>| {
            o.state_tensors().into_iter().map(|t| (t.name, t.values)).collect::<Vec<_>>()
        };
        assert_eq!(names(&merged), names(&optim));
        assert_eq!(merged.step, optim.step);
    }
}
