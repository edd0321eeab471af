//! Distillation by rejection sampling keeps exactly the verified answers and writes SFT data
//! that `deepseek-train sft` reads; bad prompts and flags are clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use deepseek_infer::generate::Decoding;
use deepseek_infer::tokenizer::TextTokenizer;
use deepseek_train::distill::{distill, read_prompts, traces, DistillConfig, Keep, Teacher};

fn golden(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden").join(rel)
}

fn teacher_dir(dir: &Path) -> PathBuf {
    let t = dir.join("teacher");
    std::fs::create_dir_all(&t).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("v3_yarn_qlora").join(f), t.join(f)).unwrap();
    }
    std::fs::copy(golden("tokenizer/byte_tokenizer.json"), t.join("tokenizer.json")).unwrap();
    std::fs::copy(golden("tokenizer/chat_tokenizer_config.json"), t.join("tokenizer_config.json"))
        .unwrap();
    t
}

#[test]
fn distillation_keeps_exactly_the_verified_answers_as_sft_data() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_dir(dir.path());
    let prompts_file = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts_file, "{\"prompt\": \"2+3?\", \"answer\": 5}\n{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"1+1?\"}], \"answer\": \"2\"}\n{\"question\": \"4+4?\", \"answer\": \"8\"}\n").unwrap();
    let prompts = read_prompts(&prompts_file).unwrap();
    let device = Default::default();
    let teacher = deepseek_core::load_model::<Flex>(&t, &device, Default::default()).unwrap();
    let tok = TextTokenizer::from_file(&t.join("tokenizer.json")).unwrap();
    let (template, _) = deepseek_train::sft_data::model_template(&t).unwrap();
    // A checker the random teacher passes about half the time, known to the test.
    let check = |text: &str, _gold: &str| text.bytes().map(u32::from).sum::<u32>() % 2 == 0;
    for keep in [Keep::AllCorrect, Keep::Best] {
        let config = DistillConfig {
            samples: 6,
            max_new_tokens: 8,
            decoding: Decoding::Sample { temperature: 1.0, top_k: None, top_p: None, seed: 7 },
            keep,
            max_len: None,
            batch: 5,
        };
        let teacher = Teacher { model: &teacher, tokenizer: &tok, template: &template };
        let samples = distill(&teacher, &prompts, &config, &device, check, || {}).unwrap();
        // Decoded one at a time, the answers are the same.
        let alone = DistillConfig { batch: 1, ..config.clone() };
        assert_eq!(distill(&teacher, &prompts, &alone, &device, check, || {}).unwrap(), samples);
        let all: Vec<_> = samples.iter().flatten().collect();
        assert_eq!(all.len(), 18);
        assert!(all.iter().all(|s| s.correct == check(&s.text, "")));
        assert!(
            all.iter().any(|s| s.correct) && all.iter().any(|s| !s.correct),
            "the test needs both"
        );
        for ss in &samples {
            match keep {
                Keep::AllCorrect => assert!(ss.iter().all(|s| s.kept == s.correct)),
                Keep::Best => {
                    let kept: Vec<_> = ss.iter().filter(|s| s.kept).collect();
                    let shortest = ss.iter().filter(|s| s.correct).map(|s| s.tokens).min();
                    assert_eq!(kept.len(), shortest.is_some() as usize);
                    if let Some(k) = kept.first() {
                        assert_eq!(Some(k.tokens), shortest);
                    }
                }
            }
        }
        // The traces are SFT data: the prompt's turns, then the kept answer.
        let lines = traces(&prompts, &samples);
        assert_eq!(lines.len(), all.iter().filter(|s| s.kept).count());
        for line in &lines {
            let messages = deepseek_train::sft_data::parse_line(line).unwrap();
            let answer = &messages.last().unwrap().content;
            assert_eq!(messages.last().unwrap().role, "assistant");
            assert!(check(answer, ""), "{answer:?} was not verified");
        }
    }
}

#[test]
fn the_command_writes_traces_and_rejects_bad_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let t = teacher_dir(dir.path());
    let run = |prompts: &str, extra: &[&str]| {
        let p = dir.path().join("p.jsonl");
        std::fs::write(&p, prompts).unwrap();
        let out = dir.path().join("traces.jsonl");
        let o = Command::new(env!("CARGO_BIN_EXE_deepseek-train"))
            .args([
                "distill",
                "--teacher",
                t.to_str().unwrap(),
                "--prompts",
                p.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--max-new-tokens",
                "4",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            out,
        )
    };
    let (ok, stdout, stderr, out) =
        run("{\"prompt\": \"2+3?\", \"answer\": 5}\n", &["--samples", "2"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("samples: 2") && out.is_file(), "{stdout}");
    let (ok, _, stderr, _) = run("{\"prompt\": \"2+3?\"}\n", &[]);
    assert!(!ok && stderr.contains("p.jsonl:1: missing `answer`"), "{stderr}");
    let (ok, _, stderr, _) = run("{\"prompt\": \"x\", \"answer\": 1}\n", &["--samples", "0"]);
    assert!(!ok && stderr.contains("at least 1"), "{stderr}");
    let (ok, _, stderr, _) =
        run("{\"prompt\": \"x\", \"answer\": 1}\n", &["--samples", "3", "--temperature", "0"]);
    assert!(!ok && stderr.contains("copies"), "{stderr}");
}
