//! The `deepseek-train` binary: a short run, flags and TOML, and clear errors for bad input.

use std::process::Command;

fn train(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-train")).arg("pretrain").args(args).output().expect("runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const SHORT: [&str; 10] = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--builtin-bytes", "20000", "--eval-batches", "2"];

#[test]
fn a_short_run_writes_metrics_checkpoints_plot_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let toml = dir.path().join("train.toml");
    std::fs::write(&toml, "lr = 0.003\nwarmup_steps = 1\n[optim]\nweight_decay = 0.05\n").unwrap();
    let mut args = SHORT.to_vec();
    args.extend(["--steps", "3", "--out", out.to_str().unwrap(), "--config", toml.to_str().unwrap(), "--balance", "aux-loss"]);
    let (ok, stdout, stderr) = train(&args);
    assert!(ok, "{stderr}");
    for key in ["steps: 3", "val_loss:", "max_vio_global:", "corpus_entropy:", "model:"] {
        assert!(stdout.contains(key), "missing `{key}` in\n{stdout}");
    }
    for file in ["metrics.jsonl", "loss.png", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "checkpoints/step-00000003/state.json"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/step-00000003/state.json")).unwrap()).unwrap();
    assert_eq!(state["train"]["lr"], 0.003, "the TOML value");
    assert_eq!(state["train"]["optim"]["weight_decay"], 0.05);
    assert_eq!(state["train"]["balance"], "aux-loss", "the flag");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--corpus", "/nonexistent/corpus.txt"], "corpus.txt"),
        (vec!["--seq-len", "4096"], "max_position_embeddings"),
        (vec!["--balance", "sometimes"], "aux-free"),
        (vec!["--device", "tpu"], "flex"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["--preset", "tiny", "--steps", "1", "--out", out, "--builtin-bytes", "20000"];
        args.extend(extra.iter());
        let (ok, _, stderr) = train(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(expected), "{extra:?}: expected `{expected}` in\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, stderr) = train(&["--preset", "tiny", "--steps", "1", "--out", out, "--corpus", empty.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("nothing to train on") || stderr.contains("tokens"), "{stderr}");
    let (ok, _, stderr) = train(&["--preset", "tiny", "--steps", "1", "--out", out, "--resume"]);
    assert!(!ok);
    assert!(stderr.contains("no checkpoint"), "{stderr}");
}
