//! The `deepseek-train` binary: a short run, flags and TOML, and clear errors for bad input.

use std::process::Command;

/// Runs `deepseek-train <command> <args>`: success, stdout, stderr.
fn run(command: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-train"))
        .arg(command)
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn train(args: &[&str]) -> (bool, String, String) {
    run("pretrain", args)
}

const SHORT: [&str; 10] = [
    "--preset",
    "tiny",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--builtin-bytes",
    "20000",
    "--eval-batches",
    "2",
];

#[test]
fn a_short_run_writes_metrics_checkpoints_plot_and_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let toml = dir.path().join("train.toml");
    std::fs::write(&toml, "lr = 0.003\nwarmup_steps = 1\n[optim]\nweight_decay = 0.05\n").unwrap();
    let mut args = SHORT.to_vec();
    args.extend([
        "--steps",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--config",
        toml.to_str().unwrap(),
        "--balance",
        "aux-loss",
    ]);
    let (ok, stdout, stderr) = train(&args);
    assert!(ok, "{stderr}");
    for key in ["steps: 3", "val_loss:", "max_vio_global:", "corpus_entropy:", "model:"] {
        assert!(stdout.contains(key), "missing `{key}` in\n{stdout}");
    }
    for file in [
        "metrics.jsonl",
        "loss.png",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
        "hf/tokenizer_config.json",
        "checkpoints/step-00000003/state.json",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    chat_turn_ends_at_the_exported_eos(&out.join("hf"));
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoints/step-00000003/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["train"]["lr"], 0.003, "the TOML value");
    assert_eq!(state["train"]["optim"]["weight_decay"], 0.05);
    assert_eq!(state["train"]["balance"], "aux-loss", "the flag");
}

/// What `deepseek chat --model HF_DIR` does for one turn: the template and tokenizer from the
/// exported directory, a greedy reply that ends at the template's EOS token (the newline of the
/// built-in corpus) or at the token limit.
fn chat_turn_ends_at_the_exported_eos(hf: &std::path::Path) {
    use deepseek_infer::chat::{ChatTemplate, Message};
    use deepseek_infer::generate::{generate, Decoding, GenerateConfig};
    use deepseek_infer::tokenizer::TextTokenizer;
    let template = ChatTemplate::from_tokenizer_config(&hf.join("tokenizer_config.json"))
        .expect("a chat template");
    let tok = TextTokenizer::from_file(&hf.join("tokenizer.json")).unwrap();
    let eos = template
        .eos_token
        .as_deref()
        .and_then(|t| tok.token_id(t))
        .expect("the EOS token is in the vocabulary");
    assert_eq!(tok.encode("\n").unwrap(), vec![eos], "EOS is the newline token");
    let messages = [
        Message::new("user", "the cat sat."),
        Message::new("assistant", "a dog ran."),
        Message::new("user", "12 + 7 ="),
    ];
    let prompt = template.render(&messages, true).unwrap();
    assert_eq!(
        prompt, "the cat sat.\na dog ran.\n12 + 7 =",
        "one message per line, the last one open"
    );
    let ids: Vec<i64> = tok.encode(&prompt).unwrap().into_iter().map(i64::from).collect();
    let model = deepseek_core::load_model::<burn::backend::Flex>(
        hf,
        &Default::default(),
        deepseek_core::LoadOptions::default(),
    )
    .unwrap();
    let cfg = GenerateConfig {
        max_new_tokens: 8,
        decoding: Decoding::Greedy,
        eos_token_id: Some(eos as i64),
        stop_sequences: vec![],
    };
    let reply = generate(&model, &[ids], &cfg, &Default::default()).unwrap().remove(0);
    assert!(!reply.is_empty() && reply.len() <= 8);
    assert!(
        reply.iter().position(|&t| t == eos as i64).is_none_or(|i| i == reply.len() - 1),
        "nothing after EOS: {reply:?}"
    );
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
        (vec!["--dtype", "f8"], "FP8 checkpoint"),
        (vec!["--dtype", "bf16", "--fp8"], "--dtype f32 with --fp8"),
    ];
    for (extra, expected) in cases {
        let mut args =
            vec!["--preset", "tiny", "--steps", "1", "--out", out, "--builtin-bytes", "20000"];
        args.extend(extra.iter());
        let (ok, _, stderr) = train(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(expected), "{extra:?}: expected `{expected}` in\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, stderr) = train(&[
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--out",
        out,
        "--corpus",
        empty.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("nothing to train on") || stderr.contains("tokens"), "{stderr}");
    let (ok, _, stderr) = train(&["--preset", "tiny", "--steps", "1", "--out", out, "--resume"]);
    assert!(!ok);
    assert!(stderr.contains("no checkpoint"), "{stderr}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn losses(out: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

const PARALLEL: [&str; 14] = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--builtin-bytes",
    "20000",
    "--eval-batches",
    "1",
    "--steps",
    "3",
    "--seed",
    "5",
];

#[test]
fn two_processes_on_localhost_train_like_two_ranks_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let master = format!("127.0.0.1:{}", free_port());
    // Two processes, one rank each, experts split between them (EP=2) over the TCP mesh.
    let spawn = |node: usize| {
        let out = dir.path().join(format!("node{node}"));
        Command::new(env!("CARGO_BIN_EXE_deepseek-train"))
            .arg("pretrain")
            .args(PARALLEL)
            .args([
                "--expert-parallel",
                "2",
                "--rank-timeout",
                "60",
                "--out",
                out.to_str().unwrap(),
            ])
            .env("DEEPSEEK_NODES", "2")
            .env("DEEPSEEK_NODE_RANK", node.to_string())
            .env("DEEPSEEK_MASTER", &master)
            .output()
            .expect("runs")
    };
    let (n1, n0) = std::thread::scope(|s| {
        let n1 = s.spawn(|| spawn(1));
        let n0 = spawn(0);
        (n1.join().unwrap(), n0)
    });
    assert!(n0.status.success(), "node 0: {}", String::from_utf8_lossy(&n0.stderr));
    assert!(n1.status.success(), "node 1: {}", String::from_utf8_lossy(&n1.stderr));

    let in_process = dir.path().join("threads");
    let mut args = PARALLEL.to_vec();
    args.extend(["--ranks", "2", "--expert-parallel", "2", "--out", in_process.to_str().unwrap()]);
    let (ok, _, stderr) = train(&args);
    assert!(ok, "{stderr}");
    let single = dir.path().join("single");
    let mut args = PARALLEL.to_vec();
    args.extend(["--out", single.to_str().unwrap()]);
    assert!(train(&args).0);

    let (procs, threads, one) =
        (losses(&dir.path().join("node0")), losses(&in_process), losses(&single));
    assert_eq!(procs.len(), 3);
    assert_eq!(procs, threads, "processes and threads sum the same numbers in the same order");
    for (p, o) in procs.iter().zip(&one) {
        assert!((p - o).abs() <= 1e-5 * o, "two processes {p} vs one rank {o}");
    }
}

#[test]
fn parallel_layouts_and_ranks_that_never_join_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    let port = free_port().to_string();
    let master = format!("127.0.0.1:{port}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--ranks", "3", "--expert-parallel", "3", "--batch-size", "3"],
            "8 routed experts cannot be split over 3",
        ),
        (vec!["--ranks", "2", "--device", "flex:0,flex:1"], "Flex has a single device"),
        (vec!["--ranks", "2", "--device", "flex,wgpu:1"], "mixes backends"),
        (vec!["--ranks", "3", "--batch-size", "4"], "must split evenly over 3 ranks"),
        (vec!["--node-limit", "3:1"], "cannot be split into 3 nodes"),
        (vec!["--node-limit", "4"], "expected NODES:M"),
        (vec!["--nodes", "2", "--node-rank", "1"], "needs --nodes, --node-rank and --master"),
        (
            vec!["--nodes", "2", "--node-rank", "2", "--master", &master],
            "node 2 is outside 2 nodes",
        ),
        (
            vec!["--nodes", "2", "--node-rank", "0", "--master", &master, "--ranks", "2"],
            "one rank per process",
        ),
        // Rank 1 starts, but rank 0 never does.
        (
            vec!["--nodes", "2", "--node-rank", "1", "--master", &master, "--rank-timeout", "2"],
            "could not reach the master",
        ),
        // Rank 0 starts, but rank 1 never joins.
        (
            vec!["--nodes", "2", "--node-rank", "0", "--master", &master, "--rank-timeout", "2"],
            "never joined",
        ),
        (
            vec!["--nodes", "2", "--node-rank", "0", "--master", &master, "--transport", "nccl"],
            "NCCL needs a build with `--features cuda`",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--out",
            out,
            "--builtin-bytes",
            "20000",
            "--seq-len",
            "16",
        ];
        args.extend(extra.iter());
        let (ok, _, stderr) = train(&args);
        assert!(!ok, "{extra:?} should fail");
        assert!(stderr.contains(expected), "{extra:?}: expected `{expected}` in\n{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let _ = std::fs::remove_dir_all(out);
    }
}

#[test]
fn a_process_that_dies_mid_run_stops_the_others_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let master = format!("127.0.0.1:{}", free_port());
    for ep in ["1", "2"] {
        let start = |node: usize| {
            let mut args = PARALLEL.to_vec();
            // Long enough to be killed while training.
            args[11] = "100000";
            let out = dir.path().join(format!("ep{ep}-node{node}"));
            Command::new(env!("CARGO_BIN_EXE_deepseek-train"))
                .arg("pretrain")
                .args(args)
                .args([
                    "--expert-parallel",
                    ep,
                    "--rank-timeout",
                    "60",
                    "--checkpoint-every",
                    "0",
                    "--eval-every",
                    "0",
                    "--out",
                    out.to_str().unwrap(),
                ])
                .args(["--nodes", "2", "--node-rank", &node.to_string(), "--master", &master])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("starts")
        };
        let mut n1 = start(1);
        let n0 = start(0);
        let metrics = dir.path().join(format!("ep{ep}-node0/metrics.jsonl"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
            assert!(std::time::Instant::now() < deadline, "node 0 never trained");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        n1.kill().unwrap();
        n1.wait().unwrap();
        let out = n0.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "EP {ep}: {}",
            stderr.lines().find(|l| l.starts_with("Error")).unwrap_or_default()
        );
        assert!(!out.status.success(), "node 0 must stop");
        assert!(stderr.contains("lost rank 1") || stderr.contains("waited"), "EP {ep}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

fn schedule(args: &[&str]) -> (bool, String, String) {
    run("schedule", args)
}

#[test]
fn the_schedule_simulator_prints_the_timeline_and_the_bubble_last() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("dualpipe.png");
    let (ok, stdout, stderr) = schedule(&[
        "--pp",
        "8",
        "--micro-batches",
        "20",
        "--schedule",
        "dualpipe",
        "--fb",
        "2.5",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().filter(|l| l.starts_with("rank ")).count(), 8, "{stdout}");
    // (P/2 − 1)(F&B + B − 3W) = 3 · (2.5 + 2 − 3).
    assert_eq!(stdout.lines().last(), Some("bubble: 4.5"), "{stdout}");
    assert!(stdout.contains("parameters_per_device: 2x"));
    assert!(stdout.contains("activations_per_device: 9 "));
    assert!(std::fs::metadata(&png).unwrap().len() > 1000, "a PNG was drawn");
    let (ok, stdout, _) = schedule(&[
        "--pp",
        "4",
        "--micro-batches",
        "8",
        "--schedule",
        "1f1b",
        "--png",
        png.to_str().unwrap(),
    ]);
    assert!(ok);
    assert_eq!(stdout.lines().last(), Some("bubble: 9"), "(P − 1)(F + B)");
    for (args, expected) in [
        (vec!["--pp", "3", "--micro-batches", "12"], "even number of pipeline ranks"),
        (vec!["--pp", "4", "--micro-batches", "6"], "at least 8 micro-batches"),
        (vec!["--pp", "4", "--micro-batches", "8", "--w", "2"], "W is part of B"),
        (
            vec!["--pp", "4", "--micro-batches", "8", "--schedule", "gpipe"],
            "choose 1f1b, zb1p or dualpipe",
        ),
        (vec!["--pp", "0", "--micro-batches", "8", "--schedule", "1f1b"], "at least one stage"),
    ] {
        let mut args = args.clone();
        args.extend(["--png", png.to_str().unwrap()]);
        let (ok, _, stderr) = schedule(&args);
        assert!(!ok && stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn pretrain_runs_pipeline_stages_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pp");
    let mut args = SHORT.to_vec();
    let out_s = out.to_str().unwrap().to_string();
    args.extend(["--steps", "2", "--out", &out_s]);
    args.extend(
        "--ranks 2 --pipeline-parallel 2 --schedule dualpipe --grad-accum 4 --stage-layers 2,1"
            .split_whitespace(),
    );
    let (ok, stdout, stderr) = train(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("steps: 2"), "{stdout}");
    assert!(out.join("hf").join("model.safetensors").is_file());
    for (flags, expected) in [
        ("--ranks 2 --pipeline-parallel 3", "3 pipeline stages must divide the 2 ranks"),
        ("--ranks 2 --pipeline-parallel 2 --stage-layers 1,1", "summing to the model's 3 blocks"),
        (
            "--ranks 2 --pipeline-parallel 2 --schedule dualpipe --grad-accum 2",
            "at least 4 micro-batches",
        ),
        ("--pipeline-parallel 0", "--pipeline-parallel must be at least 1"),
    ] {
        let bad = dir.path().join("bad");
        let bad_s = bad.to_str().unwrap().to_string();
        let mut args = SHORT.to_vec();
        args.extend(["--steps", "1", "--out", &bad_s]);
        args.extend(flags.split_whitespace());
        let (ok, _, stderr) = train(&args);
        assert!(!ok && stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!bad.join("metrics.jsonl").exists(), "{flags:?}: nothing written");
    }
}
