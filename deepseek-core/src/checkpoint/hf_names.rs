//! The checkpoint key mapping: one declarative table from Hugging Face / DeepSeek tensor names
//! (weights stored `[out, in]`) to the parameters of [`DeepSeekModel`]. Loading and the
//! missing/unexpected-tensor checks are driven by this table alone.
//!
//! Layer `N` of the main model is `model.layers.N.*`; MTP module k is stored as layer
//! `num_hidden_layers + k - 1` with its extra tensors (`enorm`, `hnorm`, `eh_proj`,
//! `shared_head.norm`) and copies of the embedding and head, which the model shares with the
//! main model and so does not load twice.

use crate::projection::Projection;
use burn::module::Param;
use burn::tensor::backend::Backend;

use crate::block::{DecoderLayer, FeedForward};
use crate::config::DeepSeekConfig;
use crate::mla::QueryProj;
use crate::mlp::Mlp;
use crate::model::DeepSeekModel;
use crate::moe::Moe;
use crate::norm::RmsNorm;

/// Where a checkpoint tensor goes.
pub enum Target<B: Backend> {
    /// A linear weight: stored `[out, in]`, Burn keeps `[in, out]`.
    Linear(fn(&mut DeepSeekModel<B>, usize) -> &mut Projection<B>),
    /// An RMSNorm gain `[d]`.
    Norm(fn(&mut DeepSeekModel<B>, usize) -> &mut RmsNorm<B>),
    /// A 2-D parameter stored as is (embedding `[V, d]`, router weight `[E, d]`).
    Matrix(fn(&mut DeepSeekModel<B>, usize) -> &mut Param<burn::tensor::Tensor<B, 2>>),
    /// A 1-D parameter stored as is (router correction bias `[E]`).
    Vector(fn(&mut DeepSeekModel<B>, usize) -> &mut Param<burn::tensor::Tensor<B, 1>>),
    /// One routed expert's projection: written into its slice of the stacked expert weights.
    Expert(ExpertPart),
    /// A duplicate of a tensor the model shares (the MTP copies of embedding and head): optional;
    /// when present its shape is checked, its data not loaded.
    Shared,
}

/// Which projection of a routed expert a checkpoint tensor holds; experts are stacked as
/// `gate_up [E, D, 2I]` (gate in columns `0..I`, up in `I..2I`) and `down [E, I, D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPart {
    Gate,
    Up,
    Down,
}

/// One row of the table.
pub struct Entry<B: Backend> {
    /// Checkpoint name.
    pub name: String,
    /// Shape as stored (`[out, in]` for linear weights).
    pub shape: Vec<usize>,
    /// Destination.
    pub target: Target<B>,
    /// What the accessor is called with: the block index, the MTP module index, or
    /// `layer · EXPERT_STRIDE + expert` for routed-expert rows.
    pub index: usize,
}

/// The block with global index `l`: main blocks first, then MTP blocks.
fn block<B: Backend>(m: &mut DeepSeekModel<B>, l: usize) -> &mut DecoderLayer<B> {
    let n = m.layers.len();
    if l < n {
        &mut m.layers[l]
    } else {
        &mut m.mtp[l - n].block
    }
}

fn dense<B: Backend>(m: &mut DeepSeekModel<B>, l: usize) -> &mut Mlp<B> {
    match &mut block(m, l).mlp {
        FeedForward::Dense(mlp) => mlp,
        FeedForward::Moe(_) => unreachable!("table built from the same config as the model"),
    }
}

fn moe<B: Backend>(m: &mut DeepSeekModel<B>, l: usize) -> &mut Moe<B> {
    match &mut block(m, l).mlp {
        FeedForward::Moe(moe) => moe,
        FeedForward::Dense(_) => unreachable!("table built from the same config as the model"),
    }
}

fn shared<B: Backend>(m: &mut DeepSeekModel<B>, l: usize) -> &mut Mlp<B> {
    moe(m, l).shared_experts.as_mut().expect("shared experts exist when the table lists them")
}

/// Expert rows pack `(layer, expert)` into the index as `layer * EXPERT_STRIDE + expert`.
pub const EXPERT_STRIDE: usize = 1_000_000;

/// The routed experts of the block with global index `l`.
pub fn routed_experts<B: Backend>(
    m: &mut DeepSeekModel<B>,
    l: usize,
) -> &mut crate::moe::RoutedExperts<B> {
    &mut moe(m, l).experts
}

fn low_rank<B: Backend>(m: &mut DeepSeekModel<B>, l: usize) -> &mut crate::mla::LowRankQuery<B> {
    match &mut block(m, l).self_attn.q {
        QueryProj::LowRank(q) => q,
        QueryProj::Direct(_) => unreachable!("table built from the same config as the model"),
    }
}

/// Builds the full table for `cfg`, in checkpoint order.
pub fn table<B: Backend>(cfg: &DeepSeekConfig) -> Vec<Entry<B>> {
    use Target::*;
    let d = cfg.hidden_size;
    let h = cfg.num_attention_heads;
    let v = cfg.vocab_size;
    let mut rows: Vec<Entry<B>> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, target: Target<B>, index: usize| {
        rows.push(Entry { name, shape, target, index });
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![v, d],
        Matrix(|m, _| &mut m.embed_tokens.weight),
        0,
    );
    add("model.norm.weight".into(), vec![d], Norm(|m, _| &mut m.norm), 0);
    add("lm_head.weight".into(), vec![v, d], Linear(|m, _| &mut m.lm_head), 0);

    let blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers;
    for l in 0..blocks {
        let p = format!("model.layers.{l}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![d],
            Norm(|m, l| &mut block(m, l).input_layernorm),
            l,
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![d],
            Norm(|m, l| &mut block(m, l).post_attention_layernorm),
            l,
        );

        // Attention (MLA).
        let a = format!("{p}.self_attn");
        let q_out = h * cfg.qk_head_dim();
        match cfg.q_lora_rank {
            None => add(
                format!("{a}.q_proj.weight"),
                vec![q_out, d],
                Linear(|m, l| match &mut block(m, l).self_attn.q {
                    QueryProj::Direct(q) => q,
                    QueryProj::LowRank(_) => {
                        unreachable!("table built from the same config as the model")
                    }
                }),
                l,
            ),
            Some(r) => {
                add(
                    format!("{a}.q_a_proj.weight"),
                    vec![r, d],
                    Linear(|m, l| &mut low_rank(m, l).q_a_proj),
                    l,
                );
                add(
                    format!("{a}.q_a_layernorm.weight"),
                    vec![r],
                    Norm(|m, l| &mut low_rank(m, l).q_a_layernorm),
                    l,
                );
                add(
                    format!("{a}.q_b_proj.weight"),
                    vec![q_out, r],
                    Linear(|m, l| &mut low_rank(m, l).q_b_proj),
                    l,
                );
            }
        }
        let kvl = cfg.kv_lora_rank;
        add(
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![kvl + cfg.qk_rope_head_dim, d],
            Linear(|m, l| &mut block(m, l).self_attn.kv_a_proj_with_mqa),
            l,
        );
        add(
            format!("{a}.kv_a_layernorm.weight"),
            vec![kvl],
            Norm(|m, l| &mut block(m, l).self_attn.kv_a_layernorm),
            l,
        );
        add(
            format!("{a}.kv_b_proj.weight"),
            vec![h * (cfg.qk_nope_head_dim + cfg.v_head_dim), kvl],
            Linear(|m, l| &mut block(m, l).self_attn.kv_b_proj),
            l,
        );
        add(
            format!("{a}.o_proj.weight"),
            vec![d, h * cfg.v_head_dim],
            Linear(|m, l| &mut block(m, l).self_attn.o_proj),
            l,
        );

        // Feed-forward.
        let f = format!("{p}.mlp");
        if !cfg.is_moe_layer(l) {
            let i = cfg.intermediate_size;
            add(
                format!("{f}.gate_proj.weight"),
                vec![i, d],
                Linear(|m, l| &mut dense(m, l).gate_proj),
                l,
            );
            add(
                format!("{f}.up_proj.weight"),
                vec![i, d],
                Linear(|m, l| &mut dense(m, l).up_proj),
                l,
            );
            add(
                format!("{f}.down_proj.weight"),
                vec![d, i],
                Linear(|m, l| &mut dense(m, l).down_proj),
                l,
            );
        } else {
            let e = cfg.n_routed_experts;
            let i = cfg.moe_intermediate_size;
            add(
                format!("{f}.gate.weight"),
                vec![e, d],
                Matrix(|m, l| &mut moe(m, l).gate.weight),
                l,
            );
            if cfg.topk_method.has_bias() {
                add(
                    format!("{f}.gate.e_score_correction_bias"),
                    vec![e],
                    Vector(|m, l| {
                        moe(m, l)
                            .gate
                            .e_score_correction_bias
                            .as_mut()
                            .expect("noaux_tc router has a bias")
                    }),
                    l,
                );
            }
            for x in 0..e {
                let packed = l * EXPERT_STRIDE + x;
                let ep = format!("{f}.experts.{x}");
                add(format!("{ep}.gate_proj.weight"), vec![i, d], Expert(ExpertPart::Gate), packed);
                add(format!("{ep}.up_proj.weight"), vec![i, d], Expert(ExpertPart::Up), packed);
                add(format!("{ep}.down_proj.weight"), vec![d, i], Expert(ExpertPart::Down), packed);
            }
            if cfg.n_shared_experts > 0 {
                let s = cfg.n_shared_experts * i;
                add(
                    format!("{f}.shared_experts.gate_proj.weight"),
                    vec![s, d],
                    Linear(|m, l| &mut shared(m, l).gate_proj),
                    l,
                );
                add(
                    format!("{f}.shared_experts.up_proj.weight"),
                    vec![s, d],
                    Linear(|m, l| &mut shared(m, l).up_proj),
                    l,
                );
                add(
                    format!("{f}.shared_experts.down_proj.weight"),
                    vec![d, s],
                    Linear(|m, l| &mut shared(m, l).down_proj),
                    l,
                );
            }
        }

        // MTP extras.
        if l >= cfg.num_hidden_layers {
            let k = l - cfg.num_hidden_layers;
            add(format!("{p}.enorm.weight"), vec![d], Norm(|m, k| &mut m.mtp[k].enorm), k);
            add(format!("{p}.hnorm.weight"), vec![d], Norm(|m, k| &mut m.mtp[k].hnorm), k);
            add(
                format!("{p}.eh_proj.weight"),
                vec![d, 2 * d],
                Linear(|m, k| &mut m.mtp[k].eh_proj),
                k,
            );
            add(
                format!("{p}.shared_head.norm.weight"),
                vec![d],
                Norm(|m, k| &mut m.mtp[k].head_norm),
                k,
            );
            add(format!("{p}.shared_head.head.weight"), vec![v, d], Shared, k);
            add(format!("{p}.embed_tokens.weight"), vec![v, d], Shared, k);
        }
    }
    rows
}
