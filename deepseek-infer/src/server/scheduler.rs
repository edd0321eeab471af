//! The scheduler: one thread owns the model and the [`Engine`], admits queued sequences into free
//! slots, runs one decoding step for all of them, and sends each sequence's text to its request's
//! channel. A request whose client went away (its channel closed) leaves the batch before the
//! next step.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use burn::tensor::backend::Backend;
use deepseek_core::DeepSeekModel;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::engine::{Engine, Finish, Request, SequenceId, TokenEvent};
use crate::pipeline::Texts;
use crate::speculative::speculative_streaming;
use crate::tokenizer::TextTokenizer;

/// One sequence to generate: a choice of a request.
pub struct Job {
    pub request: Request,
    /// Stop strings (text level).
    pub stop: Vec<String>,
    /// Index of the choice in its request (`n` > 1 gives several).
    pub choice: usize,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// What the scheduler sends a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text of choice `choice` that became final.
    Piece { choice: usize, text: String },
    /// Choice `choice` ended after `tokens` generated tokens.
    Done { choice: usize, finish: Finish, tokens: usize },
    /// Generation failed.
    Failed { message: String },
}

/// Messages to the scheduler thread.
pub enum Command {
    Submit(Vec<Job>),
    /// Finish the running and queued sequences, then stop.
    Shutdown,
}

/// Sizes the scheduler runs with.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerSettings {
    /// Sequences decoding together at most.
    pub max_batch: usize,
    /// Tokens per sequence (prompt plus output).
    pub context: usize,
    /// Decode one sequence at a time with MTP speculative decoding instead of batching.
    pub speculative: bool,
}

/// A sequence in the engine.
struct Live<'t> {
    job: Job,
    texts: Texts<'t>,
    tokens: usize,
    last: Instant,
}

/// Starts the scheduler thread; it runs until [`Command::Shutdown`] and an empty batch, or until
/// every sender is gone.
pub fn spawn<B: Backend>(
    model: DeepSeekModel<B>,
    tokenizer: Arc<TextTokenizer>,
    eos: Option<u32>,
    settings: SchedulerSettings,
    metrics: Arc<Metrics>,
    device: B::Device,
) -> (mpsc::Sender<Command>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("deepseek-scheduler".into())
        .spawn(move || run(model, &tokenizer, eos, settings, &metrics, device, rx))
        .expect("spawn the scheduler thread");
    (tx, thread)
}

fn run<B: Backend>(
    model: DeepSeekModel<B>,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    settings: SchedulerSettings,
    metrics: &Metrics,
    device: B::Device,
    rx: mpsc::Receiver<Command>,
) {
    let mut engine = match Engine::new(&model, settings.max_batch, settings.context, &device) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("scheduler: cannot allocate the cache: {e:#}");
            return;
        }
    };
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut live: HashMap<SequenceId, Live> = HashMap::new();
    let mut shutting_down = false;
    loop {
        // Wait for work when idle; otherwise take what arrived without waiting.
        if engine.active() == 0 && queue.is_empty() {
            if shutting_down {
                return;
            }
            match rx.recv() {
                Ok(command) => receive(command, &mut queue, &mut shutting_down),
                Err(_) => return,
            }
        }
        while let Ok(command) = rx.try_recv() {
            receive(command, &mut queue, &mut shutting_down);
        }

        // Clients that went away free their slots (and queue places) now.
        let gone: Vec<SequenceId> =
            live.iter().filter(|(_, l)| l.job.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.cancel(id);
            live.remove(&id);
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        queue.retain(|job| {
            let open = !job.events.is_closed();
            if !open {
                metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            open
        });

        let outcome = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
            if settings.speculative {
                if let Some(job) = queue.pop_front() {
                    metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
                    run_speculative(&model, &device, tokenizer, eos, job, metrics);
                }
                return Ok(());
            }
            while engine.has_room() {
                let Some(job) = queue.pop_front() else { break };
                metrics.queue_length.fetch_sub(1, Ordering::Relaxed);
                let prompt = job.request.prompt.len();
                match engine.add(job.request.clone()) {
                    Ok((id, first)) => {
                        metrics.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
                        let texts = Texts::with(tokenizer, eos, &job.stop);
                        let now = Instant::now();
                        live.insert(id, Live { job, texts, tokens: 0, last: now });
                        if let Some(event) = first {
                            deliver(&mut engine, &mut live, event, metrics);
                        }
                    }
                    Err(e) => {
                        let _ = job.events.send(Event::Failed { message: format!("{e:#}") });
                    }
                }
            }
            metrics.batch_size.store(engine.active(), Ordering::Relaxed);
            if engine.active() > 0 {
                let events = engine.step()?;
                metrics.step(events.len());
                for event in events {
                    deliver(&mut engine, &mut live, event, metrics);
                }
            }
            metrics.batch_size.store(engine.active(), Ordering::Relaxed);
            Ok(())
        }));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("the model panicked during generation".to_string()),
        };
        if let Some(message) = failure {
            // Fail what was running; start over with a fresh cache.
            eprintln!("scheduler: {message}");
            for (_, l) in live.drain() {
                let _ = l.job.events.send(Event::Failed { message: message.clone() });
            }
            engine.cancel_all();
            metrics.batch_size.store(0, Ordering::Relaxed);
        }
    }
}

/// One job start to end with MTP speculative decoding (the `--speculative` server): the batch is
/// this one sequence.
fn run_speculative<B: Backend>(
    model: &DeepSeekModel<B>,
    device: &B::Device,
    tokenizer: &TextTokenizer,
    eos: Option<u32>,
    job: Job,
    metrics: &Metrics,
) {
    let mut texts = Texts::with(tokenizer, eos, &job.stop);
    let (choice, r) = (job.choice, &job.request);
    metrics.prompt_tokens.fetch_add(r.prompt.len() as u64, Ordering::Relaxed);
    metrics.batch_size.store(1, Ordering::Relaxed);
    let mut last = Instant::now();
    let mut tokens = 0;
    let mut gone = false;
    let result = speculative_streaming(
        model,
        &r.prompt,
        r.max_new_tokens,
        r.stop_tokens.first().copied(),
        r.decoding,
        device,
        &mut |token| {
            let now = Instant::now();
            tokens += 1;
            metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if tokens == 1 {
                metrics.time_to_first_token(now - job.arrived);
            } else {
                metrics.inter_token(now - last);
            }
            last = now;
            let text = texts.piece(token)?;
            if !text.is_empty() && job.events.send(Event::Piece { choice, text }).is_err() {
                gone = true;
            }
            Ok(!gone && !texts.stopped())
        },
    );
    metrics.step(tokens);
    metrics.batch_size.store(0, Ordering::Relaxed);
    match result {
        Err(e) => {
            let _ = job.events.send(Event::Failed { message: format!("{e:#}") });
        }
        Ok(_) if gone => {
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out) => {
            let stopped =
                texts.stopped() || out.tokens.last().is_some_and(|t| r.stop_tokens.contains(t));
            let finish = if stopped { Finish::Stop } else { Finish::Length };
            let rest = texts.flush();
            if !rest.is_empty() {
                let _ = job.events.send(Event::Piece { choice, text: rest });
            }
            let _ = job.events.send(Event::Done { choice, finish, tokens: out.tokens.len() });
        }
    }
}

fn receive(command: Command, queue: &mut VecDeque<Job>, shutting_down: &mut bool) {
    match command {
        Command::Submit(jobs) => queue.extend(jobs),
        Command::Shutdown => *shutting_down = true,
    }
}

/// Turns a sequence's new token into text for its request; ends the sequence on a stop string,
/// at its end, or when its client is gone.
fn deliver<B: Backend>(
    engine: &mut Engine<B>,
    live: &mut HashMap<SequenceId, Live>,
    event: TokenEvent,
    metrics: &Metrics,
) {
    let Some(l) = live.get_mut(&event.id) else { return };
    let now = Instant::now();
    l.tokens += 1;
    metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
    if l.tokens == 1 {
        metrics.time_to_first_token(now - l.job.arrived);
    } else {
        metrics.inter_token(now - l.last);
    }
    l.last = now;
    let choice = l.job.choice;
    let mut sent = match l.texts.piece(event.token) {
        Ok(text) if text.is_empty() => true,
        Ok(text) => l.job.events.send(Event::Piece { choice, text }).is_ok(),
        Err(e) => {
            let _ = l.job.events.send(Event::Failed { message: format!("{e:#}") });
            false
        }
    };
    let finish = if l.texts.stopped() { Some(Finish::Stop) } else { event.finish };
    if let Some(finish) = finish {
        let rest = l.texts.flush();
        if !rest.is_empty() {
            sent &= l.job.events.send(Event::Piece { choice, text: rest }).is_ok();
        }
        let _ = l.job.events.send(Event::Done { choice, finish, tokens: l.tokens });
    }
    if finish.is_some() || !sent {
        if event.finish.is_none() {
            engine.cancel(event.id);
            if finish.is_none() {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        live.remove(&event.id);
    }
}
