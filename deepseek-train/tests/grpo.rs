//! GRPO: the objective and advantages against a scalar reference (both clip sides, zero-variance
//! groups, padding) with their gradients; rollout log-probs and experts equal the training
//! forward's, with and without routing replay; the first on-policy update has ratio exactly 1;
//! the KL to the adapters-off reference starts at exactly 0; exact resume; bad input.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Tensor, TensorData};
use deepseek_core::{DeepSeekModel, ForwardOptions, LoadOptions};
use deepseek_infer::chat::ChatTemplate;
use deepseek_infer::tokenizer::TextTokenizer;
use deepseek_train::config::{Finetune, LoraRecipe, RouterMode};
use deepseek_train::grpo::objective::{advantages, objective, ClipSettings};
use deepseek_train::grpo::reward::{Reward, Rewards};
use deepseek_train::grpo::rollout::{rows, sample_groups, Prompting};
use deepseek_train::grpo::run::{grpo_with, read_grpo_metrics, GrpoArgs};
use deepseek_train::grpo::task::{TaskItem, TaskSpec};
use deepseek_train::grpo::GrpoConfig;
use deepseek_train::TrainConfig;

type B = Flex;
type AB = Autodiff<Flex>;

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(rel)
}

/// A one-line Q/A chat format: the newline ends a turn.
const QA: &str = "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}{% else %}{{ 'A: ' + message['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}";

/// The golden MoE model (3 blocks, 2 of them MoE with 8 experts, top-2) with the byte tokenizer
/// and the Q/A template.
fn base_dir(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("v3_yarn_qlora").join(f), base.join(f)).unwrap();
    }
    std::fs::copy(golden("tokenizer/byte_tokenizer.json"), base.join("tokenizer.json")).unwrap();
    let config = serde_json::json!({"bos_token": null, "eos_token": "\n", "add_bos_token": false, "chat_template": QA});
    std::fs::write(base.join("tokenizer_config.json"), config.to_string()).unwrap();
    base
}

fn values<const D: usize, Bk: burn::tensor::backend::Backend>(t: Tensor<Bk, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// The per-token GRPO loss in f64, written out from the formulas.
fn reference_loss(
    logp: &[f64],
    old: &[f64],
    refp: &[f64],
    adv: &[f64],
    w: &[f64],
    seq: usize,
    c: ClipSettings,
) -> f64 {
    let mut total = 0.0;
    for i in 0..logp.len() {
        if w[i] == 0.0 {
            continue;
        }
        let a = adv[i / seq];
        let rho = (logp[i] - old[i]).exp();
        let clipped = rho.clamp(1.0 - c.epsilon_low, 1.0 + c.epsilon_high);
        let surrogate = (rho * a).min(clipped * a);
        let d = refp[i] - logp[i];
        let kl = d.exp() - d - 1.0;
        total += w[i] * -(surrogate - c.beta * kl);
    }
    total
}

#[test]
fn advantages_are_group_relative_and_zero_for_equal_rewards() {
    let r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5];
    let a = advantages(&r, 4, true);
    // Group 1: mean 0.5, sample std √(1/3).
    let std = (1.0f64 / 3.0).sqrt();
    for (got, want) in a[..4].iter().zip([0.5, -0.5, -0.5, 0.5]) {
        assert!((got - want / (std + 1e-4)).abs() < 1e-12, "{got}");
    }
    assert!(a[4..].iter().all(|&v| v == 0.0), "no signal in an all-equal group: {a:?}");
    let unscaled = advantages(&r, 4, false);
    assert_eq!(&unscaled[..4], &[0.5, -0.5, -0.5, 0.5]);
}

#[test]
fn the_objective_and_its_gradient_match_a_scalar_reference() {
    let device = Default::default();
    let (n, seq) = (3, 4);
    // Row 0 (A > 0): ratios inside, above 1 + ε_high (clipped) and below 1 − ε (not clipped
    // for A > 0); row 1 (A < 0): below 1 − ε (clipped) and above (not clipped); row 2: a
    // zero-advantage row; the last column is padding (weight 0) with a wild ratio.
    let logp = [-1.0, -0.5, -2.0, -9.0, -1.2, -0.3, -0.7, 5.0, -0.4, -0.6, -0.8, -3.0];
    let old = [-1.1, -0.9, -1.5, -1.0, -0.8, -0.6, -0.7, -1.0, -0.4, -0.5, -0.9, -1.0];
    let refp = [-1.0, -0.7, -1.8, -2.0, -1.0, -0.4, -0.9, -1.0, -0.5, -0.6, -0.7, -1.0];
    let adv = [1.5, -0.75, 0.0];
    let w = [0.1, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1, 0.0, 0.1, 0.1, 0.1, 0.0];
    let clip = ClipSettings { epsilon_low: 0.2, epsilon_high: 0.28, beta: 0.04 };
    let f = |v: &[f64], shape: [usize; 2]| {
        Tensor::<AB, 2>::from_data(
            TensorData::new(v.iter().map(|&x| x as f32).collect(), shape),
            &device,
        )
    };
    let lp = f(&logp, [n, seq]).require_grad();
    let out = objective(
        lp.clone(),
        f(&old, [n, seq]),
        Some(f(&refp, [n, seq])),
        Tensor::from_data(TensorData::new(adv.iter().map(|&x| x as f32).collect(), [n]), &device),
        f(&w, [n, seq]),
        clip,
    );
    let want = reference_loss(&logp, &old, &refp, &adv, &w, seq, clip);
    let got = out.loss.clone().into_scalar() as f64;
    assert!((got - want).abs() < 1e-5, "loss {got} vs reference {want}");
    // Clip active at (0, 1) (ρ = e^0.4 > 1.28, A > 0) and (1, 0) (ρ = e^−0.4 < 0.8, A < 0).
    assert_eq!(out.clipped.into_scalar(), 2.0);
    let grads = out.loss.backward();
    let g = values(lp.grad(&grads).unwrap());
    for i in 0..logp.len() {
        let h = 1e-6;
        let (mut up, mut down) = (logp, logp);
        up[i] += h;
        down[i] -= h;
        let fd = (reference_loss(&up, &old, &refp, &adv, &w, seq, clip)
            - reference_loss(&down, &old, &refp, &adv, &w, seq, clip))
            / (2.0 * h);
        assert!((g[i] as f64 - fd).abs() < 1e-4, "d loss / d logp[{i}]: {} vs {fd}", g[i]);
    }
    // Clipped tokens and the zero-advantage row get only the KL's gradient, w·β·(1 − π_ref/π);
    // padding none.
    for i in [1, 4, 8, 9, 10] {
        let kl_only = w[i] * clip.beta * (1.0 - (refp[i] - logp[i]).exp());
        assert!((g[i] as f64 - kl_only).abs() < 1e-6, "position {i}: {} vs {kl_only}", g[i]);
    }
    assert_eq!((g[3], g[7], g[11]), (0.0, 0.0, 0.0));
}

fn arithmetic_items(n: usize) -> Vec<TaskItem> {
    TaskSpec::default().load(0).unwrap().train.into_iter().take(n).collect()
}

#[test]
fn rollout_logprobs_and_experts_equal_the_training_forward() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_dir(dir.path());
    let device = Default::default();
    let model: DeepSeekModel<B> =
        deepseek_core::load_model(&base, &device, LoadOptions::default()).unwrap();
    let tok = TextTokenizer::from_file(&base.join("tokenizer.json")).unwrap();
    let template = ChatTemplate::new(QA, String::new(), Some("\n".into())).unwrap();
    let prompting = Prompting { tokenizer: &tok, template: &template, eos: Some(10) };
    let items = arithmetic_items(3);
    let refs: Vec<&TaskItem> = items.iter().collect();
    let temperature = 0.8;
    let rollouts = sample_groups(
        &model,
        &prompting,
        &Rewards::standard(0.0),
        &refs,
        3,
        (temperature, None),
        12,
        7,
        0,
        4,
        &device,
    )
    .unwrap();
    assert_eq!(rollouts.len(), 9);
    let k = model.config.num_experts_per_tok;
    let batch: Vec<_> = rollouts.iter().collect();
    let adv = vec![0.0; batch.len()];
    let r = rows::<B>(&batch, &adv, |_| 1.0, k, &device);
    let [n, seq] = r.input.dims();
    let logp_of = |logits: Tensor<B, 3>| {
        let lp = log_softmax(logits.div_scalar(temperature as f64), 2)
            .gather(2, r.targets.clone().unsqueeze_dim::<3>(2))
            .reshape([n, seq]);
        values(lp * r.mask.clone())
    };
    let recorded = values(r.rollout_logp.clone());
    let mask = values(r.mask.clone());
    assert!(mask.iter().sum::<f32>() >= 9.0);
    // Without replay: the training forward routes as the rollout did, and its log-probs agree.
    let plain = model.forward_with(r.input.clone(), ForwardOptions::default());
    for (b, routing) in plain.routing.iter().enumerate() {
        let ids: Vec<i32> =
            routing.indices.clone().into_data().convert::<i32>().into_vec().unwrap();
        for (i, &len) in r.lens.iter().enumerate() {
            for t in 0..len {
                let at = (i * seq + t) * k;
                let mut a = ids[at..at + k].to_vec();
                let mut e = r.host_experts[b][at..at + k].to_vec();
                a.sort();
                e.sort();
                assert_eq!(a, e, "block {b}, row {i}, position {t}");
            }
        }
    }
    let replayed = model.forward_replayed(r.input.clone(), &r.replay).unwrap();
    for (name, got) in [("plain", logp_of(plain.logits)), ("replayed", logp_of(replayed.logits))] {
        for i in 0..got.len() {
            if mask[i] > 0.0 {
                assert!(
                    (got[i] - recorded[i]).abs() < 1e-4,
                    "{name} position {i}: {} vs rollout {}",
                    got[i],
                    recorded[i]
                );
            }
        }
    }
    // Replay is really used: other experts give other outputs.
    let shifted: Vec<Tensor<B, 2, burn::tensor::Int>> =
        r.replay.iter().map(|t| (t.clone() + 1).remainder_scalar(8)).collect();
    let other = model.forward_replayed(r.input.clone(), &shifted).unwrap();
    let diff = (other.logits - model.forward(r.input.clone())).abs().max().into_scalar();
    assert!(diff > 1e-3, "replayed experts changed nothing ({diff})");
}

/// A reward with variance on a random model: the share of digits in the completion.
struct Digits;
impl Reward for Digits {
    fn name(&self) -> &str {
        "digits"
    }
    fn score(&self, completion: &str, _: &TaskItem) -> f64 {
        let n = completion.chars().count().max(1);
        completion.chars().filter(|c| c.is_ascii_digit()).count() as f64 / n as f64
    }
}

fn args(base: &Path, out: &Path, steps: usize, grpo: GrpoConfig, lora: bool) -> GrpoArgs {
    let train = TrainConfig {
        steps,
        lr: 1e-3,
        warmup_steps: 0,
        decay_start: 1.0,
        decay_end: 1.0,
        min_lr: 1e-3,
        final_lr: None,
        eval_every: 0,
        checkpoint_every: 1,
        keep_checkpoints: 2,
        seed: 3,
        finetune: Some(Finetune {
            base_model: base.to_path_buf(),
            lora: lora.then(|| LoraRecipe {
                rank: 4,
                alpha: 8.0,
                rslora: false,
                dropout: 0.0,
                expert_rank: 2,
                targets: vec!["q_b_proj".into(), "kv_b_proj".into(), "o_proj".into()],
            }),
            router: RouterMode::Frozen,
            data: None,
            adapter: None,
            base_dtype: Default::default(),
        }),
        grpo: Some(grpo),
        ..TrainConfig::default()
    };
    GrpoArgs {
        out: out.to_path_buf(),
        resume: false,
        device: deepseek_core::device::DeviceKind::Flex,
        progress: false,
        train,
    }
}

fn small(iterations: usize, beta: f64, replay: bool) -> GrpoConfig {
    GrpoConfig {
        group: 4,
        prompts_per_step: 2,
        max_new_tokens: 6,
        temperature: 1.0,
        iterations,
        beta,
        routing_replay: replay,
        micro_batch: 3,
        rollout_batch: 8,
        eval_prompts: 4,
        ..GrpoConfig::default()
    }
}

#[test]
fn the_first_on_policy_update_has_ratio_one_and_the_kl_starts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_dir(dir.path());
    let out = dir.path().join("run");
    let summary = grpo_with(
        &args(&base, &out, 2, small(1, 0.1, false), true),
        &Rewards::new(vec![(1.0, Box::new(Digits))]),
    )
    .unwrap();
    let (steps, evals) = read_grpo_metrics(&summary.metrics).unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(evals.first().map(|e| e.step), Some(0));
    let first = &steps[0];
    assert_eq!(first.ratio, 1.0, "ρ = π/π_old with π_old = π detached");
    assert_eq!(first.clip_fraction, 0.0);
    // Fresh adapters have B = 0: the policy is the reference, the k3 estimate exactly 0.
    assert_eq!(first.kl, Some(0.0));
    assert!(first.zero_std_groups < 1.0, "the digit reward varies within groups");
    assert!(first.grad_norm > 0.0);
    assert!(steps[1].kl.unwrap() > 0.0, "after an update the policy has moved: {:?}", steps[1].kl);
    assert!(first.logprob_gap < 1e-4, "{}", first.logprob_gap);
    assert_eq!(first.routing_mismatch, Some(0.0));
    assert!(summary.output.join("adapter_model.safetensors").is_file());
    assert!(summary.plot.is_file());
}

fn step_records(metrics: &Path) -> Vec<serde_json::Value> {
    let (steps, _) = read_grpo_metrics(metrics).unwrap();
    steps
        .into_iter()
        .map(|s| {
            let mut v = serde_json::to_value(s).unwrap();
            for timing in ["rollout_s", "train_s", "rollout_tokens_per_s", "train_tokens_per_s"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            v
        })
        .collect()
}

#[test]
fn resuming_after_a_stop_continues_bit_for_bit() {
    use deepseek_core::WeightDtype::{Bf16, F32};
    // LoRA, full, and full in bf16 (f32 master weights in the optimizer state).
    for (lora, iterations, replay, dtype) in
        [(true, 2, true, F32), (false, 1, false, F32), (false, 1, false, Bf16)]
    {
        let dir = tempfile::tempdir().unwrap();
        let base = base_dir(dir.path());
        let rewards = || Rewards::new(vec![(1.0, Box::new(Digits))]);
        let args = |out: &Path, steps| {
            let mut a = args(&base, out, steps, small(iterations, 0.0, replay), lora);
            a.train.dtype = dtype;
            a.train.finetune.as_mut().unwrap().base_dtype = dtype;
            a
        };
        let straight = dir.path().join("straight");
        grpo_with(&args(&straight, 3), &rewards()).unwrap();
        let resumed = dir.path().join("resumed");
        grpo_with(&args(&resumed, 2), &rewards()).unwrap();
        // The run stops after step 2 (its last checkpoint); a later invocation continues it.
        let mut again = args(&resumed, 3);
        again.resume = true;
        let summary = grpo_with(&again, &rewards()).unwrap();
        assert_eq!(summary.steps, 3);
        assert_eq!(
            step_records(&straight.join("metrics.jsonl")),
            step_records(&resumed.join("metrics.jsonl"))
        );
        let weights =
            if lora { "adapter/adapter_model.safetensors" } else { "hf/model.safetensors" };
        assert!(
            std::fs::read(straight.join(weights)).unwrap()
                == std::fs::read(resumed.join(weights)).unwrap(),
            "weights differ after resume (lora {lora})"
        );
        // A resume with another recipe is refused.
        let mut other = args(&resumed, 4);
        other.train.grpo = Some(small(iterations, 0.5, replay));
        other.resume = true;
        let err = grpo_with(&other, &rewards()).unwrap_err().to_string();
        assert!(err.contains("differs"), "{err}");
    }
}

fn expect_error(args: &GrpoArgs, rewards: &Rewards, needle: &str) {
    let err = grpo_with(args, rewards).unwrap_err().to_string();
    assert!(err.contains(needle), "expected `{needle}` in: {err}");
    assert!(!args.out.join("checkpoints").exists(), "nothing is written for bad input");
    assert!(!args.out.join("metrics.jsonl").exists(), "nothing is written for bad input");
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_dir(dir.path());
    let exact = Rewards::standard(0.0);
    // A task file line without an answer.
    let file = dir.path().join("task.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"1 plus 1\", \"answer\": \"2\"}\n{\"prompt\": \"2 plus 2\"}\n",
    )
    .unwrap();
    let mut cfg = small(1, 0.0, false);
    cfg.task = TaskSpec::File { train: file.clone(), heldout: None };
    expect_error(
        &args(&base, &dir.path().join("a"), 1, cfg, true),
        &exact,
        "task.jsonl:2: missing `answer`",
    );
    // G < 2.
    let mut cfg = small(1, 0.0, false);
    cfg.group = 1;
    expect_error(&args(&base, &dir.path().join("b"), 1, cfg, true), &exact, "group");
    // A prompt longer than the context.
    let long = dir.path().join("long.jsonl");
    let prompt = "7 ".repeat(9000);
    std::fs::write(&long, format!("{{\"prompt\": \"{prompt}\", \"answer\": \"7\"}}\n{{\"prompt\": \"1\", \"answer\": \"1\"}}\n")).unwrap();
    let mut cfg = small(1, 0.0, false);
    cfg.task = TaskSpec::File { train: long, heldout: None };
    expect_error(
        &args(&base, &dir.path().join("c"), 1, cfg, true),
        &exact,
        "exceeds the model's context",
    );
    // A reward that returns NaN.
    struct Nan;
    impl Reward for Nan {
        fn name(&self) -> &str {
            "nan_reward"
        }
        fn score(&self, _: &str, _: &TaskItem) -> f64 {
            f64::NAN
        }
    }
    let a = args(&base, &dir.path().join("d"), 1, small(1, 0.0, false), true);
    let err = grpo_with(&a, &Rewards::new(vec![(1.0, Box::new(Nan))])).unwrap_err().to_string();
    assert!(err.contains("nan_reward") && err.contains("finite"), "{err}");
    assert!(!a.out.exists(), "nothing is written when the first rollout fails");
}

fn grpo_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deepseek-train"))
        .arg("grpo")
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_runs_grpo_and_rejects_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_dir(dir.path());
    let out = dir.path().join("run");
    let (base_s, out_s) = (base.to_str().unwrap(), out.to_str().unwrap());
    let short = [
        "--model",
        base_s,
        "--out",
        out_s,
        "--steps",
        "2",
        "--group",
        "2",
        "--prompts-per-step",
        "2",
        "--max-new-tokens",
        "3",
        "--eval-prompts",
        "2",
    ];
    let (ok, stdout, stderr) = grpo_cli(&short);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("heldout_accuracy_after:"), "{stdout}");
    for f in [
        "metrics.jsonl",
        "grpo.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // Continuing the adapter the run wrote, on a base held in bf16.
    let adapter = out.join("adapter");
    let out2 = dir.path().join("run2");
    let mut again: Vec<&str> = short.to_vec();
    again[3] = out2.to_str().unwrap();
    again.extend(["--adapter", adapter.to_str().unwrap(), "--dtype", "bf16"]);
    let (ok, _, stderr) = grpo_cli(&again);
    assert!(ok, "{stderr}");
    let toml = dir.path().join("grpo.toml");
    std::fs::write(&toml, "[grpo]\ngroup = 4\n").unwrap();
    let bad = dir.path().join("bad");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--group", "1"], "at least 2"),
        (vec!["--task", "/nonexistent/task.jsonl"], "task.jsonl"),
        (vec!["--heldout", "/tmp/x.jsonl"], "--heldout goes with a task file"),
        (vec!["--temperature", "0"], "temperature"),
        (vec!["--loss-norm", "mean"], "token or sequence"),
        (vec!["--ops", "divide"], "unknown operation"),
        (vec!["--config", toml.to_str().unwrap()], "not a [grpo] table"),
        (vec!["--resume"], "no checkpoint"),
        (vec!["--full", "--dtype", "f16"], "use --dtype bf16"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--model", base_s, "--out", bad.to_str().unwrap(), "--steps", "1"];
        args.extend(extra.iter());
        let (ok, _, stderr) = grpo_cli(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(expected), "{extra:?}: expected `{expected}` in\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!bad.exists(), "{extra:?} wrote something");
    }
}
