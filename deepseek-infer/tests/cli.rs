//! The `deepseek` binary end to end: `logits` reproduces transformers' logits on every golden
//! case, `info` computes V3's parameter count, and bad input fails with a clear message.

use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(case)
}

fn read_f32(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    (
        v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        v.shape().to_vec(),
    )
}

fn deepseek(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deepseek")).args(args).output().unwrap()
}

#[test]
fn logits_command_reproduces_transformers_on_every_golden_case() {
    for case in ["v3_yarn_qlora", "v3_no_qlora", "v5_style"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("logits.safetensors");
        let reference = golden(case).join("reference.safetensors");
        let o = deepseek(&[
            "logits",
            "--model",
            golden(case).to_str().unwrap(),
            "--input",
            reference.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        let (got, shape) = read_f32(&out, "logits");
        let (want, want_shape) = read_f32(&reference, "logits");
        assert_eq!(shape, want_shape);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{case}: max |diff| {diff:e}");
    }
}

#[test]
fn logits_in_bf16_stay_within_bf16_tolerance_and_bad_dtypes_are_clear_errors() {
    let case = "v3_yarn_qlora";
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let reference = golden(case).join("reference.safetensors");
    let run = |dtype: &str| {
        let (model, input) = (golden(case), reference.to_str().unwrap().to_string());
        let args = ["logits", "--model", model.to_str().unwrap(), "--input", &input];
        deepseek(&[&args[..], &["--output", out.to_str().unwrap(), "--dtype", dtype]].concat())
    };
    let o = run("bf16");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (got, _) = read_f32(&out, "logits");
    let (want, _) = read_f32(&reference, "logits");
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    // Rounding moves them (tests/tests/half_precision.rs states the tolerance), but not by 0.
    assert!(diff > 1e-4 && diff < 0.15, "bf16 logits: max |diff| {diff:e}");
    std::fs::remove_file(&out).unwrap();
    for (bad, says) in [("f8", "FP8 checkpoint"), ("f64", "f32, bf16 or f16")] {
        let o = run(bad);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says) && !err.contains("panicked"), "--dtype {bad}: {err}");
        assert!(!out.exists(), "no output on failure");
    }
}

#[test]
fn info_plan_prints_the_parts_and_the_total_last() {
    let args = ["info", "--plan", "--preset", "v3-671b", "--task", "infer", "--dtype", "bf16"];
    let o = deepseek(&[&args[..], &["--batch", "1", "--seq", "4096", "--memory", "80"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let value = |key: &str| -> u64 {
        let line =
            text.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key}: {text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let parts = ["weights_bytes:", "gradients_bytes:", "optimizer_bytes:", "activations_bytes:"];
    let sum: u64 = parts.iter().map(|k| value(k)).sum::<u64>() + value("kv_cache_bytes:");
    assert_eq!(text.lines().last().unwrap(), format!("total_bytes: {sum}"));
    // 671B parameters in bf16 do not fit one 80 GiB device; the cache is 4096 × 70272 bytes.
    assert!(text.contains("fits: no"), "{text}");
    assert_eq!(value("kv_cache_bytes:"), 4096 * 70_272);

    let plan =
        |extra: &[&str]| deepseek(&[&["info", "--plan", "--preset", "small"][..], extra].concat());
    for (extra, says) in [
        (&["--task", "train"][..], "--batch"),
        (&["--batch", "8", "--seq", "128"][..], "--task"),
        (&["--task", "train", "--batch", "8", "--seq", "128", "--zero1"][..], "--ranks 2"),
        (&["--task", "fly", "--batch", "8", "--seq", "128"][..], "infer, train or lora"),
        (&["--task", "infer", "--batch", "1", "--seq", "8", "--dtype", "f8"][..], "FP8"),
    ] {
        let o = plan(extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(says) && !err.contains("panicked"),
            "{extra:?}: {err}"
        );
    }
}

#[test]
fn info_prints_671b_parameters_for_v3() {
    let o = deepseek(&["info", "--preset", "v3-671b"]);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("total_params: 671026419200 (671.0B)"), "{text}");
    assert!(text.contains("kv_cache_bytes_per_token: 70272"), "{text}");
    for key in ["active_params:", "mtp_params:", "weights_bytes_bf16:", "weights_bytes_fp8:"] {
        assert!(text.contains(key), "missing {key} in {text}");
    }
    // A model directory gives the same keys.
    let o = deepseek(&["info", "--model", golden("v5_style").to_str().unwrap()]);
    assert!(o.status.success());
}

#[test]
fn out_of_vocabulary_ids_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("ids.safetensors");
    let ids: Vec<u8> = [3i64, 7, 999].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 3], &ids).unwrap();
    safetensors::serialize_to_file(vec![("input_ids", view)], None, &input).unwrap();
    let out = dir.path().join("logits.safetensors");
    let o = deepseek(&[
        "logits",
        "--model",
        golden("v3_no_qlora").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("token id 999") && err.contains("vocabulary"), "{err}");
    assert!(!out.exists(), "no output on failure");
}

#[test]
fn missing_backend_and_missing_model_are_clear_errors() {
    let o = deepseek(&["info", "--model", "/nonexistent/model"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model"));
    let o = deepseek(&["info", "--preset", "v9"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown preset"));
}

/// `greedy.output_ids` of a golden case, per sequence (prompt, continuation): transformers'
/// `generate`, greedy, 8 new tokens after a 12-token prompt.
fn hf_greedy(case: &str) -> Vec<(Vec<i64>, Vec<i64>)> {
    let bytes = std::fs::read(golden(case).join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids: Vec<i64> = st
        .tensor("greedy.output_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    ids.chunks(20).map(|row| (row[..12].to_vec(), row[12..].to_vec())).collect()
}

#[test]
fn generate_print_ids_reproduces_transformers_greedy_continuations() {
    for (case, (prompt, expected)) in ["v3_yarn_qlora", "v3_no_qlora", "v5_style"]
        .into_iter()
        .flat_map(|c| hf_greedy(c).into_iter().map(move |r| (c, r)))
    {
        let prompt: Vec<String> = prompt.iter().map(i64::to_string).collect();
        let has_mtp = case != "v3_no_qlora";
        let (dir, prompt) = (golden(case), prompt.join(","));
        for speculative in [false, true].into_iter().filter(|&s| !s || has_mtp) {
            let mut args = vec![
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt-ids",
                &prompt,
                "--max-new-tokens",
                "8",
                "--print-ids",
            ];
            if speculative {
                args.push("--speculative");
            }
            let o = deepseek(&args);
            assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
            let stdout = String::from_utf8(o.stdout).unwrap();
            let last = stdout.lines().last().unwrap();
            let got: Vec<i64> = last.split(' ').map(|t| t.parse().unwrap()).collect();
            assert_eq!(got, expected, "{case} speculative={speculative}");
        }
    }
}

#[test]
fn generate_rejects_bad_prompts() {
    let model = golden("v3_no_qlora");
    let cases: [(&[&str], &str); 7] = [
        (&["--prompt-ids", "3,999"], "outside the vocabulary"),
        (&["--prompt-ids", "3", "--max-new-tokens", "1000"], "exceeds the model's context"),
        (&["--prompt", "hello"], "--prompt-ids"),
        // Sampling settings are checked whether or not they are used (greedy ignores top-p).
        (&["--prompt-ids", "3", "--top-p", "2"], "top_p must be in (0, 1]"),
        (
            &["--prompt-ids", "3", "--temperature", "0.7", "--top-k", "0"],
            "top_k must be at least 1",
        ),
        (&["--prompt-ids", "3", "--temperature=-1", "--speculative"], "temperature must be"),
        (&["--prompt-ids", "3", "--temperature", "NaN"], "temperature must be"),
    ];
    for (args, message) in cases {
        let mut all = vec!["generate", "--model", model.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = deepseek(&all);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(message), "{args:?}: {err}");
    }
}

#[test]
fn adapter_flag_and_merge_reproduce_peft_logits() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = golden("peft/plain");
    let peft = adapter.join("peft_logits.safetensors");
    let (want, _) = read_f32(&peft, "logits");
    let close = |path: &Path, what: &str| {
        let (got, _) = read_f32(path, "logits");
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{what}: max |diff| {diff:e}");
    };
    let base = golden("v3_yarn_qlora");
    let unmerged = dir.path().join("unmerged.safetensors");
    let o = deepseek(&[
        "logits",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        peft.to_str().unwrap(),
        "--output",
        unmerged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    close(&unmerged, "--adapter");
    for dtype in ["f32", "bf16"] {
        let merged_dir = dir.path().join(format!("merged-{dtype}"));
        let o = deepseek(&[
            "merge",
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            merged_dir.to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let merged = dir.path().join(format!("merged-{dtype}.safetensors"));
        let o = deepseek(&[
            "logits",
            "--model",
            merged_dir.to_str().unwrap(),
            "--input",
            peft.to_str().unwrap(),
            "--output",
            merged.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        if dtype == "f32" {
            close(&merged, "merge");
        } else {
            // bf16 weights: 8 mantissa bits, so only close.
            let (got, _) = read_f32(&merged, "logits");
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 0.5, "bf16 merge: {diff}");
        }
    }
    // A merge into an existing, non-empty directory and an adapter for another model fail.
    let o = deepseek(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not empty"));
    let o = deepseek(&[
        "logits",
        "--model",
        golden("v3_no_qlora").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        peft.to_str().unwrap(),
        "--output",
        dir.path().join("x.safetensors").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("another model"), "{err}");
}
