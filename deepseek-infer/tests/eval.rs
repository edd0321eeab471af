//! `deepseek eval`: multiple-choice log-likelihoods against transformers
//! (`tests/golden/eval/generate_eval_refs.py`, lm-evaluation-harness's rules), perplexity as
//! the sum of the same log-likelihoods, and clear errors for bad tasks and flags.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use deepseek_core::{load_model, LoadOptions};
use deepseek_infer::eval::{parse_choice, perplexity, read_items, score_choices};
use deepseek_infer::tokenizer::TextTokenizer;

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(rel)
}

fn refs() -> Vec<Vec<f64>> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("eval/choice_refs.json")).unwrap())
            .unwrap();
    serde_json::from_value(v["loglikelihoods"].clone()).unwrap()
}

#[test]
fn choice_loglikelihoods_equal_transformers_in_any_batching() {
    let device = Default::default();
    let model =
        load_model::<Flex>(golden("v3_yarn_qlora"), &device, LoadOptions::default()).unwrap();
    let tok = TextTokenizer::from_file(&golden("tokenizer/byte_tokenizer.json")).unwrap();
    let items = read_items(&golden("eval/choice.jsonl"), |o| parse_choice(o, None, "")).unwrap();
    let want = refs();
    // One request per pass, and batches that pad short rows beside the long context.
    for batch in [1, 3, 16] {
        let scores = score_choices(&model, &tok, &items, batch, &device, |_| {}).unwrap();
        for (i, (s, w)) in scores.iter().zip(&want).enumerate() {
            for (c, (got, want)) in s.loglikelihoods.iter().zip(w).enumerate() {
                assert!(
                    (got - want).abs() < 1e-4,
                    "batch {batch}, item {i}, choice {c}: {got} vs {want}"
                );
            }
            let best = (0..w.len()).fold(0, |b, j| if w[j] > w[b] { j } else { b });
            assert_eq!(s.pred, best);
        }
    }
    // Perplexity scores the same way: one window whose first token conditions the rest.
    let text = "The cat sat on the mat";
    let ids = tok.encode(text).unwrap();
    let p = perplexity(&model, &ids, text.len(), 64, 4, &device, |_| {}).unwrap();
    assert_eq!(p.tokens, ids.len() - 1);
    let mat = refs()[0][0]; // log p(" mat" | "The cat sat on the")
    let prefix =
        perplexity(&model, &tok.encode("The cat sat on the").unwrap(), 18, 64, 1, &device, |_| {})
            .unwrap();
    assert!((p.nll - (prefix.nll - mat)).abs() < 1e-3, "{} vs {}", p.nll, prefix.nll - mat);
    assert!(
        (p.bits_per_byte() - p.nll / (std::f64::consts::LN_2 * text.len() as f64)).abs() < 1e-12
    );
}

/// A model directory the CLI reads: the golden model and the byte tokenizer.
fn model_dir(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("v3_yarn_qlora").join(f), m.join(f)).unwrap();
    }
    std::fs::copy(golden("tokenizer/byte_tokenizer.json"), m.join("tokenizer.json")).unwrap();
    m
}

fn deepseek(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deepseek")).args(args).output().unwrap()
}

#[test]
fn eval_command_prints_a_summary_writes_samples_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let samples = dir.path().join("samples.jsonl");
    let task = golden("eval/choice.jsonl");
    let o = deepseek(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
        "--kind",
        "choice",
        "--batch",
        "2",
        "--samples-out",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let want = refs();
    let right = want
        .iter()
        .zip([0usize, 0, 0, 1, 0])
        .filter(|(w, gold)| (0..w.len()).fold(0, |b, j| if w[j] > w[b] { j } else { b }) == *gold)
        .count();
    assert_eq!(summary["acc"].as_f64().unwrap(), right as f64 / 5.0, "{summary}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[3]["gold"], 1);
    assert_eq!(lines[4]["loglikelihoods"].as_array().unwrap().len(), 4);

    // Perplexity over a text file, and generation checked exactly.
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "the cat sat on the mat. ".repeat(8)).unwrap();
    let o = deepseek(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--task",
        text.to_str().unwrap(),
        "--kind",
        "perplexity",
        "--max-len",
        "32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        p["token_perplexity"].as_f64().unwrap() > 1.0 && p["tokens"].as_u64().unwrap() > 150,
        "{p}"
    );
    let gen = dir.path().join("gen.jsonl");
    std::fs::write(&gen, "{\"prompt\": \"1 + 1 =\", \"answer\": \"2\"}\n{\"question\": \"3 + 4 =\", \"answer\": 7}\n").unwrap();
    let o = deepseek(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--task",
        gen.to_str().unwrap(),
        "--kind",
        "generate",
        "--max-new-tokens",
        "4",
        "--k",
        "2",
        "--samples",
        "3",
        "--temperature",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(g["items"], 2);
    assert!(g["pass@2"].as_f64().unwrap() >= g["pass@1"].as_f64().unwrap(), "{g}");

    // Bad tasks and flags: clear errors naming the line.
    let bad = |name: &str, text: &str, kind: &str, extra: &[&str], expect: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        let mut args = vec![
            "eval",
            "--model",
            m.to_str().unwrap(),
            "--task",
            f.to_str().unwrap(),
            "--kind",
            kind,
        ];
        args.extend_from_slice(extra);
        let o = deepseek(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(expect), "{name}: {err}");
    };
    bad(
        "range.jsonl",
        "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 2}\n",
        "choice",
        &[],
        "range.jsonl:1: `answer` 2 is out of range",
    );
    bad("nochoices.jsonl", "{\"question\": \"q\", \"choices\": [\"a\", \"b\"], \"answer\": 0}\n{\"question\": \"q\"}\n", "choice", &[], "nochoices.jsonl:2: `choices`");
    bad(
        "noanswer.jsonl",
        "{\"prompt\": \"q\"}\n",
        "generate",
        &[],
        "noanswer.jsonl:1: missing `answer`",
    );
    bad("empty.jsonl", "\n", "choice", &[], "no items");
    bad("json.jsonl", "{oops\n", "generate", &[], "json.jsonl:1: malformed JSON");
    bad(
        "k.jsonl",
        "{\"prompt\": \"q\", \"answer\": \"1\"}\n",
        "generate",
        &["--k", "0"],
        "--k must be at least 1",
    );
    bad(
        "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"answer\": \"1\"}\n",
        "generate",
        &[],
        "chat template",
    );
    bad("kind.jsonl", "{}\n", "essay", &[], "unknown --kind");
}
