//! The OpenAI API's wire format: requests of `/v1/completions` and `/v1/chat/completions`
//! checked field by field (a wrong field is a 400 naming it), responses, stream chunks and the
//! error body `{"error": {"message", "type", "param", "code"}}`.

use serde_json::{json, Map, Value};

use crate::chat::Message;
use crate::engine::Finish;

/// An error answered with OpenAI's error shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 for an invalid field (or body, when `param` is `None`).
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        Self {
            status: 404,
            message: format!("The model `{asked}` does not exist; this server serves `{served}`"),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 429 when the queue is full.
    pub fn queue_full(limit: usize) -> Self {
        Self {
            status: 429,
            message: format!(
                "The server is busy: {limit} requests are already waiting; retry later"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
        }
    }

    /// 503 while shutting down.
    pub fn shutting_down() -> Self {
        Self {
            status: 503,
            message: "The server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// 500 for a failure inside the server.
    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// 404 for an unknown path.
    pub fn no_route(path: &str) -> Self {
        Self {
            status: 404,
            message: format!("Unknown endpoint {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// What a request asks to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// `/v1/completions` with text.
    Text(String),
    /// `/v1/completions` with token ids.
    Ids(Vec<i64>),
    /// `/v1/chat/completions`.
    Chat(Vec<Message>),
}

/// A checked request.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// `max_tokens` (or `max_completion_tokens`); `None`: up to the context.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage counts.
    pub include_usage: bool,
}

/// Parses and checks a request body; `chat` selects the chat endpoint's fields. `max_n` bounds
/// `n`.
pub fn parse_request(body: &[u8], chat: bool, max_n: usize) -> Result<CompletionRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(None, format!("The body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(None, "The body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid(Some("model"), "`model` must be a string")),
        None => return Err(ApiError::invalid(Some("model"), "`model` is required")),
    };
    let prompt = if chat { Prompt::Chat(parse_messages(&obj)?) } else { parse_prompt(&obj)? };
    let max_key = if chat && obj.contains_key("max_completion_tokens") {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match optional_u64(&obj, max_key)? {
        Some(0) => {
            return Err(ApiError::invalid(Some(max_key), format!("`{max_key}` must be at least 1")))
        }
        m => m.map(|m| m as usize),
    };
    let temperature = match optional_f64(&obj, "temperature")? {
        None => 1.0,
        Some(t) if (0.0..=2.0).contains(&t) => t as f32,
        Some(t) => {
            return Err(ApiError::invalid(
                Some("temperature"),
                format!("`temperature` must be between 0 and 2, got {t}"),
            ))
        }
    };
    let top_p = match optional_f64(&obj, "top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("`top_p` must be in (0, 1], got {p}"),
            ))
        }
        p => p.map(|p| p as f32).filter(|&p| p < 1.0),
    };
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => match (v.as_i64(), v.as_u64()) {
            (_, Some(u)) => Some(u),
            (Some(i), None) => Some(i as u64),
            _ => return Err(ApiError::invalid(Some("seed"), "`seed` must be an integer")),
        },
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid(Some("stop"), "`stop` entries must be strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stop"),
                "`stop` must be a string or an array of at most 4 strings",
            ))
        }
    };
    let n = match optional_u64(&obj, "n")? {
        None => 1,
        Some(n) if n >= 1 && n as usize <= max_n => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                Some("n"),
                format!("`n` must be between 1 and {max_n}, got {n}"),
            ))
        }
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid(Some("stream"), "`stream` must be a boolean")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    Some("stream_options.include_usage"),
                    "`include_usage` must be a boolean",
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                Some("stream_options"),
                "`stream_options` must be an object",
            ))
        }
    };
    reject_unsupported(&obj)?;
    Ok(CompletionRequest {
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        n,
        stream,
        include_usage,
    })
}

/// Fields this server does not implement are errors when they ask for something (their neutral
/// values, which clients often send, pass): silently ignoring them would return other results.
fn reject_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    for key in [
        "logprobs",
        "top_logprobs",
        "echo",
        "suffix",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "tools",
        "response_format",
    ] {
        let asked = match (key, obj.get(key)) {
            (_, None | Some(Value::Null) | Some(Value::Bool(false))) => false,
            ("best_of", Some(v)) => v.as_f64() != Some(1.0),
            (_, Some(Value::Number(n))) => n.as_f64() != Some(0.0),
            ("logit_bias", Some(Value::Object(m))) => !m.is_empty(),
            ("tools", Some(Value::Array(a))) => !a.is_empty(),
            ("response_format", Some(v)) => v.get("type").and_then(Value::as_str) != Some("text"),
            _ => true,
        };
        if asked {
            return Err(ApiError::invalid(
                Some(key),
                format!("`{key}` is not supported by this server"),
            ));
        }
    }
    Ok(())
}

fn optional_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::invalid(Some(key), format!("`{key}` must be a non-negative integer, got {v}"))
        }),
    }
}

fn optional_f64(obj: &Map<String, Value>, key: &str) -> Result<Option<f64>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| {
            ApiError::invalid(Some(key), format!("`{key}` must be a number, got {v}"))
        }),
    }
}

fn parse_prompt(obj: &Map<String, Value>) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("prompt"),
            "`prompt` must be a string, a list of token ids, or a list holding one of those",
        )
    };
    let ids = |items: &[Value]| -> Result<Prompt, ApiError> {
        items.iter().map(Value::as_i64).collect::<Option<Vec<_>>>().map(Prompt::Ids).ok_or_else(bad)
    };
    match obj.get("prompt") {
        None => Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(ApiError::invalid(Some("prompt"), "`prompt` is empty")),
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => ids(inner),
            items if items.iter().all(Value::is_number) => ids(items),
            _ => Err(ApiError::invalid(
                Some("prompt"),
                "a list of several prompts is not supported: send one prompt per request",
            )),
        },
        Some(_) => Err(bad()),
    }
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(ApiError::invalid(Some("messages"), "`messages` must be an array of messages"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "`messages` is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let bad = |what: &str| ApiError::invalid(Some(&param), format!("{param}: {what}"));
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("`role` must be a string"))?;
            if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
                return Err(bad(&format!("unknown role `{role}`")));
            }
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // Content parts: only text parts are supported.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(bad("only text content parts are supported")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                Some(_) => return Err(bad("`content` must be a string or a list of text parts")),
            };
            // DeepSeek's template knows `system`; OpenAI's newer name for it is `developer`.
            let role = if role == "developer" { "system" } else { role };
            Ok(Message::new(role, &content))
        })
        .collect()
}

/// OpenAI's name of a finish reason.
pub fn finish_reason(finish: Finish) -> &'static str {
    match finish {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// Token counts of a response.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Identity of a response: its id, creation time and model, shared by its chunks.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub chat: bool,
}

impl ResponseHead {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.chat, chunk) {
            (true, false) => "chat.completion",
            (true, true) => "chat.completion.chunk",
            (false, _) => "text_completion",
        }
    }

    /// The whole response: one choice per `(text, finish)`.
    pub fn response(&self, choices: &[(String, Finish)], usage: Value) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, (text, finish))| {
                let mut c =
                    json!({"index": i, "logprobs": null, "finish_reason": finish_reason(*finish)});
                if self.chat {
                    c["message"] = json!({"role": "assistant", "content": text});
                } else {
                    c["text"] = json!(text);
                }
                c
            })
            .collect();
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": choices, "usage": usage,
        })
    }

    /// A stream chunk of choice `index`: a piece of text, and the finish reason on its last.
    /// `first` marks a chat stream's opening chunk, which carries the role.
    pub fn chunk(&self, index: usize, text: &str, first: bool, finish: Option<Finish>) -> Value {
        let mut choice =
            json!({"index": index, "logprobs": null, "finish_reason": finish.map(finish_reason)});
        if self.chat {
            let mut delta = Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if !text.is_empty() || (first && finish.is_none()) {
                delta.insert("content".into(), json!(text));
            }
            choice["delta"] = Value::Object(delta);
        } else {
            choice["text"] = json!(text);
        }
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    /// The closing chunk with the usage counts (`stream_options.include_usage`).
    pub fn usage_chunk(&self, usage: Value) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [], "usage": usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str, chat: bool) -> ApiError {
        parse_request(body.as_bytes(), chat, 4).unwrap_err()
    }

    #[test]
    fn requests_parse_with_their_defaults() {
        let r = parse_request(
            br#"{"model":"m","prompt":"hi","max_tokens":5,"stop":"\n","seed":-1}"#,
            false,
            4,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Text("hi".into()));
        assert_eq!((r.max_tokens, r.temperature, r.n, r.stream), (Some(5), 1.0, 1, false));
        assert_eq!((r.stop, r.seed), (vec!["\n".to_string()], Some(u64::MAX)));
        let r = parse_request(
            br#"{"model":"m","prompt":[[1,2,3]],"logprobs":null,"echo":false,"best_of":1,"presence_penalty":0,"frequency_penalty":0.0,"logit_bias":{}}"#,
            false,
            4,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Ids(vec![1, 2, 3]));
        let r = parse_request(
            br#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_completion_tokens":3,"stream":true,"stream_options":{"include_usage":true}}"#,
            true,
            4,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![Message::new("system", "ab")]));
        assert_eq!((r.max_tokens, r.stream, r.include_usage), (Some(3), true, true));
    }

    #[test]
    fn every_bad_field_is_a_400_naming_it() {
        for (body, chat, param) in [
            ("{nope", false, None),
            ("[1]", false, None),
            (r#"{"prompt":"x"}"#, false, Some("model")),
            (r#"{"model":"m"}"#, false, Some("prompt")),
            (r#"{"model":"m","prompt":["a","b"]}"#, false, Some("prompt")),
            (r#"{"model":"m","prompt":"x","temperature":-0.5}"#, false, Some("temperature")),
            (r#"{"model":"m","prompt":"x","temperature":"hot"}"#, false, Some("temperature")),
            (r#"{"model":"m","prompt":"x","max_tokens":-3}"#, false, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","max_tokens":0}"#, false, Some("max_tokens")),
            (r#"{"model":"m","prompt":"x","top_p":0}"#, false, Some("top_p")),
            (r#"{"model":"m","prompt":"x","n":9}"#, false, Some("n")),
            (r#"{"model":"m","prompt":"x","stop":[1]}"#, false, Some("stop")),
            (r#"{"model":"m","prompt":"x","stream":"yes"}"#, false, Some("stream")),
            (r#"{"model":"m","messages":[]}"#, true, Some("messages")),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                true,
                Some("messages[0]"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":7}]}"#,
                true,
                Some("messages[0]"),
            ),
        ] {
            let e = err(body, chat);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
    }
}
