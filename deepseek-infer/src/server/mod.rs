//! `deepseek serve`: an OpenAI-compatible HTTP server on axum and tokio, over the continuous
//! batching [`crate::engine`].
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` as server-sent events
//!   ending with `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics`.
//! - The HTTP side parses, checks and tokenizes each request, then hands one job per choice to
//!   the scheduler thread ([`scheduler`]), which owns the model; text comes back over a channel
//!   per request. A client that goes away closes that channel and its sequences leave the batch
//!   before the next step.
//! - A full queue answers 429; SIGINT/SIGTERM stop accepting requests (503), let the running
//!   ones finish, then exit.

pub mod metrics;
pub mod openai;
pub mod scheduler;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use burn::tensor::backend::Backend;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::chat::ChatTemplate;
use crate::engine::{Finish, Request};
use crate::generate::Decoding;
use crate::pipeline::{encode_chat_with, encode_plain, Pipeline};
use crate::tokenizer::TextTokenizer;
use metrics::Metrics;
use openai::{parse_request, ApiError, CompletionRequest, Prompt, ResponseHead};
use scheduler::{Command, Event, Job, SchedulerSettings};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port (printed at start).
    pub port: u16,
    /// Sequences decoding together at most.
    pub max_batch: usize,
    /// Sequences waiting for a slot at most; more answer 429.
    pub max_queue: usize,
    /// Largest `n` a request may ask.
    pub max_n: usize,
    /// The name `/v1/models` lists and requests must use.
    pub model_name: String,
    /// Tokens per sequence (prompt plus output); default the model's context.
    pub context: Option<usize>,
    /// MTP speculative decoding, one sequence at a time (lower latency at low load; the batch is
    /// one sequence).
    pub speculative: bool,
}

/// What the HTTP handlers share.
struct AppState {
    tokenizer: Arc<TextTokenizer>,
    template: Option<ChatTemplate>,
    bos: Option<u32>,
    eos: Option<u32>,
    vocab: usize,
    context: usize,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    scheduler: mpsc::Sender<Command>,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    created: u64,
}

/// Serves `pipeline` until SIGINT or SIGTERM. Prints `listening on http://ADDR` to stderr once the
/// port is bound.
pub fn serve<B: Backend>(pipeline: Pipeline<B>, options: ServeOptions) -> Result<()> {
    if options.max_batch == 0 || options.max_queue == 0 || options.max_n == 0 {
        anyhow::bail!("--max-batch, --max-queue and --max-n must be at least 1");
    }
    let device = pipeline.device().clone();
    let Pipeline { model, tokenizer, template, bos_token_id, eos_token_id, .. } = pipeline;
    let model_context = model.config.max_position_embeddings;
    let context = options.context.unwrap_or(model_context);
    if context == 0 || context > model_context {
        anyhow::bail!(
            "--context must be in 1..={model_context} (the model's context), got {context}"
        );
    }
    let tokenizer = Arc::new(tokenizer);
    let metrics = Arc::new(Metrics::default());
    if options.speculative && model.mtp.is_empty() {
        anyhow::bail!("--speculative drafts with the MTP module, and this model has none (num_nextn_predict_layers = 0)");
    }
    // A speculative verification may run one position past the last kept token.
    let context = if options.speculative { context.min(model_context - 1) } else { context };
    let settings = SchedulerSettings {
        max_batch: options.max_batch,
        context,
        speculative: options.speculative,
    };
    let vocab = model.config.vocab_size;
    let (scheduler, thread) =
        scheduler::spawn(model, tokenizer.clone(), eos_token_id, settings, metrics.clone(), device);
    let state = Arc::new(AppState {
        tokenizer,
        template,
        bos: bos_token_id,
        eos: eos_token_id,
        vocab,
        context,
        metrics,
        scheduler: scheduler.clone(),
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        created: unix_time(),
        options: options.clone(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind((options.host.as_str(), options.port))
                .await
                .with_context(|| format!("cannot listen on {}:{}", options.host, options.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        eprintln!("listening on http://{addr} (model `{}`)", options.model_name);
        let app = router(state.clone());
        let stopping = state.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: finishing the running requests");
                stopping.shutting_down.store(true, Ordering::SeqCst);
            })
            .await
            .context("the server failed")
    })?;
    let _ = scheduler.send(Command::Shutdown);
    drop(state);
    drop(scheduler);
    thread.join().map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
    eprintln!("stopped");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|uri: Uri| async move { error_response(&ApiError::no_route(uri.path())) })
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.shutting_down.load(Ordering::SeqCst) {
        return error_response(&ApiError::shutting_down());
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": state.options.model_name, "object": "model",
        "created": state.created, "owned_by": "deepseek-burn",
        "max_model_len": state.context,
    }]}))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

async fn completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    complete(state, body, false).await
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    complete(state, body, true).await
}

/// Parses, checks, queues and answers one request; every failure is an OpenAI error body.
async fn complete(state: Arc<AppState>, body: Bytes, chat: bool) -> Response {
    let result = match start(&state, &body, chat) {
        Ok((request, head, prompt_tokens, events)) if request.stream => {
            Ok(stream_response(head, request, prompt_tokens, events).into_response())
        }
        Ok((request, head, prompt_tokens, events)) => {
            collect(head, request.n, prompt_tokens, events).await.map(|v| Json(v).into_response())
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(response) => {
            state.metrics.response(200);
            response
        }
        Err(e) => {
            state.metrics.response(e.status);
            error_response(&e)
        }
    }
}

type Started = (CompletionRequest, ResponseHead, usize, UnboundedReceiver<Event>);

fn start(state: &AppState, body: &[u8], chat: bool) -> Result<Started, ApiError> {
    if state.shutting_down.load(Ordering::SeqCst) {
        return Err(ApiError::shutting_down());
    }
    let request = parse_request(body, chat, state.options.max_n)?;
    if request.model != state.options.model_name {
        return Err(ApiError::unknown_model(&request.model, &state.options.model_name));
    }
    let prompt = match &request.prompt {
        Prompt::Text(text) => encode_plain(&state.tokenizer, state.bos, text)
            .map_err(|e| ApiError::invalid(Some("prompt"), format!("{e:#}")))?,
        Prompt::Ids(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= state.vocab) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("token id {bad} is outside the vocabulary 0..{}", state.vocab),
                ));
            }
            ids.clone()
        }
        Prompt::Chat(messages) => {
            let template = state.template.as_ref().ok_or_else(|| {
                ApiError::invalid(
                    Some("messages"),
                    "this model has no chat template: use /v1/completions",
                )
            })?;
            encode_chat_with(template, &state.tokenizer, messages)
                .map_err(|e| ApiError::invalid(Some("messages"), format!("{e:#}")))?
        }
    };
    let param = if chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some(param), "the prompt has no tokens"));
    }
    let context = state.context;
    let max_tokens = match request.max_tokens {
        Some(m) => m,
        None if prompt.len() < context => context - prompt.len(),
        None => {
            return Err(ApiError::invalid(
                Some(param),
                format!(
                    "the prompt has {} tokens, the context is {context}: no room to generate",
                    prompt.len()
                ),
            ))
        }
    };
    if prompt.len() + max_tokens > context {
        return Err(ApiError::invalid(
            Some("max_tokens"),
            format!(
                "This model's context is {context} tokens; the prompt has {} tokens and max_tokens is {max_tokens} ({} in all)",
                prompt.len(),
                prompt.len() + max_tokens
            ),
        ));
    }
    let decoding =
        Decoding::new(request.temperature, None, request.top_p, request.seed.unwrap_or(0))
            .map_err(|e| ApiError::invalid(Some("temperature"), format!("{e:#}")))?;
    let stop_tokens: Vec<i64> = state.scheduler_eos();
    // The queue bound: reserve the places first, give them back if over.
    let waiting = state.metrics.queue_length.fetch_add(request.n, Ordering::SeqCst);
    if waiting + request.n > state.options.max_queue {
        state.metrics.queue_length.fetch_sub(request.n, Ordering::SeqCst);
        return Err(ApiError::queue_full(state.options.max_queue));
    }
    let (tx, rx) = unbounded_channel();
    let arrived = Instant::now();
    let jobs: Vec<Job> = (0..request.n)
        .map(|choice| Job {
            request: Request {
                prompt: prompt.clone(),
                max_new_tokens: max_tokens,
                decoding: decoding.for_sample(choice),
                stop_tokens: stop_tokens.clone(),
                stop_sequences: vec![],
            },
            stop: request.stop.clone(),
            choice,
            arrived,
            events: tx.clone(),
        })
        .collect();
    if state.scheduler.send(Command::Submit(jobs)).is_err() {
        state.metrics.queue_length.fetch_sub(request.n, Ordering::SeqCst);
        return Err(ApiError::internal("the scheduler has stopped"));
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let head = ResponseHead {
        id: format!("{}-{id}", if chat { "chatcmpl" } else { "cmpl" }),
        created: unix_time(),
        model: state.options.model_name.clone(),
        chat,
    };
    Ok((request, head, prompt.len(), rx))
}

impl AppState {
    /// The token that ends a reply (the tokenizer config's EOS, else the model config's).
    fn scheduler_eos(&self) -> Vec<i64> {
        self.eos.map(i64::from).into_iter().collect()
    }
}

/// Waits for every choice of a non-streamed request.
async fn collect(
    head: ResponseHead,
    n: usize,
    prompt_tokens: usize,
    mut events: UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut texts = vec![String::new(); n];
    let mut finishes: Vec<Option<Finish>> = vec![None; n];
    let mut completion_tokens = 0;
    while finishes.iter().any(Option::is_none) {
        match events.recv().await {
            Some(Event::Piece { choice, text }) => texts[choice].push_str(&text),
            Some(Event::Done { choice, finish, tokens }) => {
                finishes[choice] = Some(finish);
                completion_tokens += tokens;
            }
            Some(Event::Failed { message }) => return Err(ApiError::internal(message)),
            None => return Err(ApiError::internal("generation ended without a result")),
        }
    }
    let choices: Vec<(String, Finish)> =
        texts.into_iter().zip(finishes).map(|(t, f)| (t, f.expect("all finished"))).collect();
    Ok(head.response(&choices, openai::usage(prompt_tokens, completion_tokens)))
}

/// Server-sent events of a streamed request: OpenAI chunks, then `data: [DONE]`.
fn stream_response(
    head: ResponseHead,
    request: CompletionRequest,
    prompt_tokens: usize,
    events: UnboundedReceiver<Event>,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    struct Progress {
        events: UnboundedReceiver<Event>,
        head: ResponseHead,
        started: Vec<bool>,
        open: usize,
        completion_tokens: usize,
        include_usage: bool,
        prompt_tokens: usize,
        /// 0: streaming, 1: usage sent (or skipped), 2: `[DONE]` sent.
        closing: u8,
    }
    let progress = Progress {
        events,
        head,
        started: vec![false; request.n],
        open: request.n,
        completion_tokens: 0,
        include_usage: request.include_usage,
        prompt_tokens,
        closing: 0,
    };
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let body = stream::unfold(progress, move |mut p| async move {
        loop {
            if p.open == 0 {
                match p.closing {
                    0 => {
                        p.closing = 1;
                        if p.include_usage {
                            let usage = openai::usage(p.prompt_tokens, p.completion_tokens);
                            return Some((Ok(data(p.head.usage_chunk(usage))), p));
                        }
                    }
                    1 => {
                        p.closing = 2;
                        return Some((Ok(SseEvent::default().data("[DONE]")), p));
                    }
                    _ => return None,
                }
                continue;
            }
            match p.events.recv().await {
                Some(Event::Piece { choice, text }) => {
                    let first = !std::mem::replace(&mut p.started[choice], true);
                    return Some((Ok(data(p.head.chunk(choice, &text, first, None))), p));
                }
                Some(Event::Done { choice, finish, tokens }) => {
                    p.open -= 1;
                    p.completion_tokens += tokens;
                    let first = !std::mem::replace(&mut p.started[choice], true);
                    return Some((Ok(data(p.head.chunk(choice, "", first, Some(finish)))), p));
                }
                Some(Event::Failed { message }) => {
                    p.open = 0;
                    p.closing = 1;
                    return Some((Ok(data(ApiError::internal(message).body())), p));
                }
                None => {
                    p.open = 0;
                    p.closing = 1;
                }
            }
        }
    });
    Sse::new(body)
}
