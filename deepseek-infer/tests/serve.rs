//! `deepseek serve` end to end over HTTP on 127.0.0.1, on a golden model with the byte-level
//! tokenizer and a chat template: batching does not change greedy text, streamed text equals the
//! non-streamed text, every bad request gets its status and OpenAI error body while the server
//! stays up, a client that disconnects frees its slot, a full queue answers 429, SIGTERM lets the
//! running stream finish. The official `openai` Python client is the ignored test at the end
//! (`.ci/run` installs it).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/golden")
}

/// A model directory: the v5-style golden weights, the byte-level tokenizer and a chat template.
fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let g = golden();
    for (from, to) in [
        (g.join("v5_style/config.json"), "config.json"),
        (g.join("v5_style/model.safetensors"), "model.safetensors"),
        (g.join("tokenizer/byte_tokenizer.json"), "tokenizer.json"),
        (g.join("tokenizer/chat_tokenizer_config.json"), "tokenizer_config.json"),
    ] {
        std::fs::copy(from, dir.path().join(to)).unwrap();
    }
    dir
}

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(args: &[&str]) -> Self {
        let dir = model_dir();
        let mut child = Command::new(env!("CARGO_BIN_EXE_deepseek"))
            .args(["serve", "--model", dir.path().to_str().unwrap(), "--port", "0"])
            .args(["--served-model-name", "golden"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let url = loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "the server exited before listening");
            if let Some(rest) = line.strip_prefix("listening on ") {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = stderr.read_to_string(&mut sink);
        });
        Self { child, url, _dir: dir }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        respond(ureq::post(&format!("{}{path}", self.url)).send_string(&body.to_string()))
    }

    fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        respond(ureq::post(&format!("{}{path}", self.url)).send_string(body))
    }

    fn get(&self, path: &str) -> (u16, String) {
        match ureq::get(&format!("{}{path}", self.url)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    }

    /// A value of `/metrics`.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    fn wait_for(&self, what: &str, until: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !until(self) {
            assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The SSE data lines of a streamed request, read as they come; `stop_after` ends early.
    fn stream(&self, path: &str, body: &Value, stop_after: Option<usize>) -> Vec<String> {
        let r = ureq::post(&format!("{}{path}", self.url)).send_string(&body.to_string()).unwrap();
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        let mut lines = Vec::new();
        for line in BufReader::new(r.into_reader()).lines() {
            let line = line.unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                lines.push(data.to_string());
                if Some(lines.len()) == stop_after {
                    break; // dropping the reader closes the connection
                }
            }
        }
        lines
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn respond(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(r) => (r.status(), serde_json::from_str(&r.into_string().unwrap()).unwrap()),
        Err(ureq::Error::Status(code, r)) => {
            (code, serde_json::from_str(&r.into_string().unwrap()).unwrap())
        }
        Err(e) => panic!("{e}"),
    }
}

/// The text of a streamed response's chunks (completions or chat), and the finish reason.
fn streamed_text(lines: &[String]) -> (String, String) {
    assert_eq!(lines.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    let mut finish = String::new();
    for line in &lines[..lines.len() - 1] {
        let chunk: Value = serde_json::from_str(line).unwrap();
        let choice = &chunk["choices"][0];
        let piece = choice["delta"]["content"].as_str().or(choice["text"].as_str());
        text.push_str(piece.unwrap_or(""));
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "golden", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[test]
fn sixteen_concurrent_greedy_requests_give_exactly_their_text_alone() {
    let server = Server::start(&["--max-batch", "16"]);
    let mut requests: Vec<Value> = (0..16)
        .map(|i| {
            let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(5);
            completion(&prompt[..7 + 13 * i], 8 + 5 * i)
        })
        .collect();
    let mut alone: Vec<Value> =
        requests.iter().map(|r| server.post("/v1/completions", r).1).collect();
    // Every fourth request stops early, on a piece of the text it generates alone.
    for i in (3..16).step_by(4) {
        let text: Vec<char> = alone[i]["choices"][0]["text"].as_str().unwrap().chars().collect();
        requests[i]["stop"] = json!([text[2..4].iter().collect::<String>()]);
        alone[i] = server.post("/v1/completions", &requests[i]).1;
    }
    assert_eq!(server.metric("deepseek_peak_batch_size"), 1.0);
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> =
            requests.iter().map(|r| s.spawn(|| server.post("/v1/completions", r).1)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a["choices"][0]["text"], t["choices"][0]["text"], "request {i}");
        assert_eq!(a["choices"][0]["finish_reason"], t["choices"][0]["finish_reason"], "{i}");
        assert_eq!(a["usage"], t["usage"], "request {i}");
    }
    let finishes: Vec<&str> =
        alone.iter().map(|a| a["choices"][0]["finish_reason"].as_str().unwrap()).collect();
    assert!(finishes.contains(&"stop") && finishes.contains(&"length"), "{finishes:?}");
    assert!(server.metric("deepseek_peak_batch_size") > 4.0, "the requests decoded together");
}

#[test]
fn streamed_text_equals_the_non_streamed_text() {
    let server = Server::start(&[]);
    let chat = json!({
        "model": "golden", "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, how are you?"}],
    });
    let text_body = completion("Once upon a time", 30);
    for (path, body) in [("/v1/chat/completions", chat), ("/v1/completions", text_body)] {
        let (status, whole) = server.post(path, &body);
        assert_eq!(status, 200, "{whole}");
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        streaming["stream_options"] = json!({"include_usage": true});
        let lines = server.stream(path, &streaming, None);
        let usage: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
        assert_eq!(usage["usage"], whole["usage"], "{path}");
        let (text, finish) = streamed_text(&lines);
        let choice = &whole["choices"][0];
        let expected = choice["message"]["content"].as_str().or(choice["text"].as_str()).unwrap();
        assert_eq!(text, expected, "{path}");
        assert_eq!(finish, choice["finish_reason"].as_str().unwrap());
        assert!(lines.len() > 4, "{path}: streamed in pieces");
        let tokens = whole["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(tokens > 0 && tokens <= body["max_tokens"].as_u64().unwrap());
    }
    // Token-id prompts and n > 1 with sampling: the choices differ by seed, reproducibly.
    let body = json!({"model": "golden", "prompt": [72, 105, 33], "max_tokens": 12, "n": 3, "seed": 5, "temperature": 1.0});
    let (status, a) = server.post("/v1/completions", &body);
    assert_eq!(status, 200, "{a}");
    let (_, b) = server.post("/v1/completions", &body);
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(a["usage"]["prompt_tokens"], 3);
    let (_, models) = server.get("/v1/models");
    assert!(models.contains("\"id\":\"golden\""), "{models}");
}

#[test]
fn bad_requests_get_their_status_and_error_body_and_the_server_stays_up() {
    let server = Server::start(&["--max-n", "2"]);
    let ok = completion("hello", 4);
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b.to_string()
    };
    let context = 2048;
    let long_prompt = "x".repeat(2040);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "not valid JSON"),
        ("/v1/completions", "[]".into(), 400, "JSON object"),
        ("/v1/completions", with("model", json!("gpt-4")), 404, "does not exist"),
        ("/v1/completions", with("temperature", json!(-1)), 400, "temperature"),
        ("/v1/completions", with("max_tokens", json!("ten")), 400, "max_tokens"),
        ("/v1/completions", with("n", json!(3)), 400, "between 1 and 2"),
        ("/v1/completions", with("prompt", json!([1, 999])), 400, "outside the vocabulary"),
        ("/v1/completions", with("prompt", json!({"a": 1})), 400, "prompt"),
        ("/v1/completions", with("stop", json!([1, 2])), 400, "stop"),
        (
            "/v1/completions",
            json!({"model": "golden", "prompt": long_prompt, "max_tokens": 100}).to_string(),
            400,
            "context is 2048 tokens; the prompt has 2040 tokens and max_tokens is 100",
        ),
        ("/v1/chat/completions", json!({"model": "golden"}).to_string(), 400, "messages"),
        (
            "/v1/chat/completions",
            json!({"model": "golden", "messages": [{"role": "user"}, {"content": "x"}]})
                .to_string(),
            400,
            "messages[1]",
        ),
        ("/v1/nothing", ok.to_string(), 404, "Unknown endpoint"),
    ];
    assert_eq!(context, 2048);
    for (path, body, status, needle) in cases {
        let (got, error) = server.post_raw(path, &body);
        assert_eq!(got, status, "{body}: {error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
        assert!(error["error"]["type"].is_string(), "{error}");
    }
    assert_eq!(server.get("/health"), (200, json!({"status": "ok"}).to_string()));
    let (status, fine) = server.post("/v1/completions", &ok);
    assert_eq!(status, 200, "{fine}");
    assert_eq!(server.metric("deepseek_requests_total{status=\"400\"}"), 11.0);
}

/// A greedy request that runs to its full budget (checked alone first), long enough to be
/// interrupted.
fn long_request() -> Value {
    completion("A long story: ", 1500)
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let server = Server::start(&["--max-batch", "2"]);
    let (_, whole) = server.post("/v1/completions", &long_request());
    assert_eq!(whole["choices"][0]["finish_reason"], "length", "{whole}");
    let mut body = long_request();
    body["stream"] = json!(true);
    let lines = server.stream("/v1/completions", &body, Some(3));
    assert_eq!(lines.len(), 3);
    server.wait_for("the slot to be freed", |s| {
        s.metric("deepseek_cancelled_total") == 1.0 && s.metric("deepseek_batch_size") == 0.0
    });
    let generated = server.metric("deepseek_generated_tokens_total");
    assert!(generated < 2.0 * 1500.0, "the stream stopped early: {generated} tokens in all");
}

#[test]
fn a_full_queue_answers_429_and_a_terminated_server_finishes_its_streams() {
    let server = Server::start(&["--max-batch", "1", "--max-queue", "1"]);
    let mut running = long_request();
    running["stream"] = json!(true);
    let url = server.url.clone();
    let body = running.to_string();
    // One stream decodes, one request waits in the queue, the next is refused.
    let first = std::thread::spawn(move || {
        let r = ureq::post(&format!("{url}/v1/completions")).send_string(&body).unwrap();
        BufReader::new(r.into_reader()).lines().map(Result::unwrap).collect::<Vec<_>>()
    });
    server.wait_for("the first stream to run", |s| s.metric("deepseek_batch_size") == 1.0);
    let url = server.url.clone();
    let queued = std::thread::spawn(move || {
        respond(
            ureq::post(&format!("{url}/v1/completions"))
                .send_string(&completion("hi", 3).to_string()),
        )
    });
    server.wait_for("the second request to queue", |s| s.metric("deepseek_queue_length") == 1.0);
    let (status, error) = server.post("/v1/completions", &completion("hi", 3));
    assert_eq!(status, 429, "{error}");
    assert_eq!(error["error"]["code"], "queue_full");

    // SIGTERM: no new requests, the running stream and the queued request finish, then exit 0.
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let lines = first.join().unwrap();
    assert_eq!(
        lines.iter().rev().find(|l| !l.is_empty()).map(String::as_str),
        Some("data: [DONE]")
    );
    let data: Vec<String> =
        lines.iter().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    assert_eq!(streamed_text(&data).1, "length");
    let (status, _) = queued.join().unwrap();
    assert_eq!(status, 200);
    let mut server = server;
    let code = server.child.wait().unwrap();
    assert!(code.success(), "{code}");
}

/// The official `openai` Python client against the server (needs a Python with `openai`:
/// DEEPSEEK_CLIENT_PYTHON, default the venv `.ci/run` creates).
#[test]
#[ignore]
fn the_openai_python_client_talks_to_the_server() {
    let python = std::env::var("DEEPSEEK_CLIENT_PYTHON").unwrap_or_else(|_| {
        format!("{}/.cache/deepseek-burn/venv-client/bin/python", std::env::var("HOME").unwrap())
    });
    let server = Server::start(&[]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["--base-url", &format!("{}/v1", server.url), "--model", "golden"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
}

#[test]
fn the_speculative_server_gives_the_batching_servers_greedy_text() {
    let plain = Server::start(&[]);
    let speculative = Server::start(&["--speculative"]);
    for (prompt, max_tokens) in [("Once upon a time", 40), ("The quick brown fox", 25), ("x", 1)] {
        let body = completion(prompt, max_tokens);
        let (_, want) = plain.post("/v1/completions", &body);
        let (status, got) = speculative.post("/v1/completions", &body);
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"], want["choices"], "{prompt}");
        assert_eq!(got["usage"], want["usage"], "{prompt}");
        let mut streaming = body.clone();
        streaming["stream"] = json!(true);
        let (text, _) = streamed_text(&speculative.stream("/v1/completions", &streaming, None));
        assert_eq!(text, want["choices"][0]["text"].as_str().unwrap(), "{prompt}");
    }
}
