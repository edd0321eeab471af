//! Activation checkpointing (`--checkpoint-activations`): the per-block recomputation gives the
//! plain backward's losses and gradients, counts every expert load once, and a checkpointed
//! run follows the plain run step for step.

use std::collections::HashMap;
use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, Tensor};
use deepseek_core::DeepSeekConfig;
use deepseek_train::data::{prepare, DataConfig, Dataset};
use deepseek_train::loss::{batch_objective, LossWeights};
use deepseek_train::metrics::StepRecord;
use deepseek_train::recompute::checkpointed_gradients;
use deepseek_train::source::HostBatch;
use deepseek_train::{BalanceMode, TrainConfig, Trainer};

type AB = Autodiff<Flex>;

/// Every gradient of `grads` for the parameters of `model`, by parameter.
fn gradients(
    model: &deepseek_core::DeepSeekModel<AB>,
    grads: &GradientsParams,
) -> HashMap<ParamId, Vec<f32>> {
    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: HashMap<ParamId, Vec<f32>>,
    }
    impl ModuleVisitor<AB> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            if let Some(g) = self.grads.get::<<AB as AutodiffBackend>::InnerBackend, D>(param.id) {
                self.out.insert(param.id, g.into_data().convert::<f32>().into_vec().unwrap());
            }
        }
    }
    let mut c = Collect { grads, out: HashMap::new() };
    model.visit(&mut c);
    c.out
}

fn scalar(t: &Tensor<AB, 1>) -> f32 {
    t.clone().into_scalar()
}

/// A packed batch with padding and prompt tokens: two documents in row 0, one padded
/// document in row 1 (the SFT shape), or plain windows.
fn batch(packed: bool) -> HostBatch {
    let (rows, len) = (2, 13);
    let ids: Vec<i64> = (0..rows * len).map(|i| ((i * 37 + 11) % 256) as i64).collect();
    let mut host = HostBatch::plain(rows, len, ids);
    if packed {
        let seq = len - 1;
        host.segments =
            Some((0..rows * len).map(|i| if i < len { (i >= 6) as u32 } else { 2 }).collect());
        host.weights =
            Some((0..rows * seq).map(|i| (i % seq >= 2 && i < 20) as u8 as f32).collect());
        host.real = Some((0..rows * seq).map(|i| (i < 20) as i64).collect());
        host.tokens = 20;
    }
    host
}

#[test]
fn recomputed_blocks_give_the_plain_losses_gradients_and_expert_loads() {
    deepseek_core::register_autodiff::<Flex>();
    let device = Default::default();
    // tiny: a dense block, two MoE blocks with the selection bias, one MTP module.
    let model = deepseek_train::trainer::init_model::<AB>(&DeepSeekConfig::tiny(), 5, &device);
    for (packed, balance) in [(false, BalanceMode::AuxFree), (true, BalanceMode::AuxLoss)] {
        let weights = LossWeights { mtp_lambda: 0.3, balance, alpha: 0.05 };
        let host = batch(packed);
        let plain = batch_objective(&model, host.to_device(&device), weights);
        let plain_grads =
            GradientsParams::from_grads(plain.total.clone().div_scalar(4.0).backward(), &model);
        let (ckpt, ckpt_grads) =
            checkpointed_gradients(&model, host.to_device(&device), weights, 4.0).unwrap();

        for (name, a, b) in [
            ("total", &plain.total, &ckpt.total),
            ("main", &plain.main, &ckpt.main),
            ("mtp", plain.mtp.as_ref().unwrap(), ckpt.mtp.as_ref().unwrap()),
            ("balance", plain.balance.as_ref().unwrap(), ckpt.balance.as_ref().unwrap()),
        ] {
            let (a, b) = (scalar(a), scalar(b));
            assert!((a - b).abs() <= 1e-6, "{name}: {a} vs {b} (packed {packed})");
        }
        // The recomputation's routing is not counted: one load vector per MoE block, equal.
        let loads = |c: &[Tensor<AB, 1, burn::tensor::Int>]| -> Vec<Vec<i64>> {
            c.iter().map(|t| t.clone().into_data().convert::<i64>().into_vec().unwrap()).collect()
        };
        assert_eq!(plain.counts.len(), 3);
        assert_eq!(loads(&plain.counts), loads(&ckpt.counts), "expert loads (packed {packed})");

        let (a, b) = (gradients(&model, &plain_grads), gradients(&model, &ckpt_grads));
        assert_eq!(a.len(), b.len(), "the same parameters get gradients");
        let mut largest = 0.0f32;
        for (id, ga) in &a {
            let gb = &b[id];
            for (x, y) in ga.iter().zip(gb) {
                assert!((x - y).abs() <= 1e-6, "gradient differs: {x} vs {y} (packed {packed})");
                largest = largest.max(x.abs());
            }
        }
        // Not vacuous: the gradients are far above the tolerance.
        assert!(largest > 1e-2, "{largest}");
    }
}

fn config(steps: usize, checkpoint_activations: bool) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 2,
        seq_len: 16,
        grad_accum: 2,
        seed: 3,
        lr: 3e-3,
        warmup_steps: 2,
        eval_every: 0,
        eval_batches: 2,
        checkpoint_every: 2,
        bias_gamma: 0.01,
        checkpoint_activations,
        ..Default::default()
    }
}

fn run(
    out: &Path,
    data: &Dataset,
    cfg: TrainConfig,
    resume: bool,
) -> (Trainer<AB>, Vec<StepRecord>) {
    let device = Default::default();
    let mut trainer = if resume {
        Trainer::resume(out, &DeepSeekConfig::tiny(), cfg, &device).unwrap()
    } else {
        let model =
            deepseek_train::trainer::init_model::<AB>(&DeepSeekConfig::tiny(), cfg.seed, &device);
        Trainer::new(
            model,
            cfg,
            DataConfig { builtin_bytes: 20_000, ..Default::default() },
            out,
            &device,
        )
        .unwrap()
    };
    let mut steps = Vec::new();
    trainer
        .run(data, |e| {
            if let deepseek_train::Event::Step(s) = e {
                steps.push(s.clone());
            }
        })
        .unwrap();
    (trainer, steps)
}

fn biases(model: &deepseek_core::DeepSeekModel<AB>) -> Vec<Vec<f32>> {
    let mut model = model.clone();
    model
        .blocks_mut()
        .filter_map(|b| match &b.mlp {
            deepseek_core::block::FeedForward::Moe(moe) => {
                moe.gate.e_score_correction_bias.as_ref()
            }
            _ => None,
        })
        .map(|b| b.val().into_data().convert::<f32>().into_vec().unwrap())
        .collect()
}

#[test]
fn a_checkpointed_run_follows_the_plain_run_and_may_switch_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = prepare(
        &dir.path().join("data"),
        &DataConfig { builtin_bytes: 20_000, ..Default::default() },
    )
    .unwrap();
    let (plain, plain_steps) = run(&dir.path().join("plain"), &data, config(4, false), false);
    let (ckpt, ckpt_steps) = run(&dir.path().join("ckpt"), &data, config(4, true), false);
    for (a, b) in plain_steps.iter().zip(&ckpt_steps) {
        assert!((a.loss - b.loss).abs() <= 1e-6, "step {}: {} vs {}", a.step, a.loss, b.loss);
        let (ma, mb) = (a.mtp_loss.unwrap(), b.mtp_loss.unwrap());
        assert!((ma - mb).abs() <= 1e-6, "step {}: MTP {ma} vs {mb}", a.step);
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-6 * a.grad_norm.max(1.0));
        assert_eq!(a.max_vio_batch, b.max_vio_batch, "step {}: the same expert loads", a.step);
    }
    // The bias updates saw the same loads: the biases are equal, and they moved.
    assert_eq!(biases(&plain.model), biases(&ckpt.model));
    assert!(biases(&plain.model).iter().flatten().any(|&b| b != 0.0));

    // The setting is a run setting: a plain run resumed with checkpointing goes on alike.
    let switched = dir.path().join("switched");
    run(&switched, &data, config(2, false), false);
    let (_, resumed) = run(&switched, &data, config(4, true), true);
    for (a, b) in plain_steps[2..].iter().zip(&resumed) {
        assert!((a.loss - b.loss).abs() <= 1e-6, "step {}: {} vs {}", a.step, a.loss, b.loss);
    }
}

#[test]
fn checkpointing_refuses_lora_dropout() {
    let model = DeepSeekConfig::tiny();
    let mut cfg = config(2, true);
    cfg.finetune = Some(deepseek_train::config::Finetune {
        base_model: "base".into(),
        lora: Some(deepseek_train::config::LoraRecipe {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            expert_rank: 2,
            dropout: 0.1,
            targets: deepseek_core::LoraTargets::parse("attn").unwrap().0,
        }),
        router: Default::default(),
        data: None,
        adapter: None,
        base_dtype: Default::default(),
    });
    let e = cfg.validate(&model).unwrap_err().to_string();
    assert!(e.contains("dropout") && e.contains("--checkpoint-activations"), "{e}");
}
