//! Continuous batching: sequences of different lengths decode together over one shared latent
//! cache ([`SlotCache`]), joining and leaving the batch at any step.
//!
//! [`Engine::add`] prefills a request on its own (naive MLA path) into a free slot and chooses its
//! first token; [`Engine::step`] then runs one decoding step for every running sequence at once
//! (absorbed path), so the projections and routed experts see a batch of `active` tokens rather
//! than one. A sequence leaves when it stops (EOS, a stop sequence, its token budget) or is
//! cancelled, and its slot is free for the next request at once. Greedy output does not depend on
//! what else is in the batch (the tests check it).
//!
//! A traced engine ([`Engine::trace`], [`generate_traced`]) also records what a reinforcement-
//! learning update compares its own forward with: the log-prob of every chosen token and the
//! experts every MoE block chose at every position ([`Trace`]).

use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::pool::on_pool;
use deepseek_core::{DeepSeekModel, SlotCache};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::generate::{argmax, sample, Decoding};

/// What to generate for one prompt.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<i64>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Greedy or sampled; a sampled request draws from its own generator seeded with its seed.
    pub decoding: Decoding,
    /// Tokens that end the sequence when generated (EOS; kept in the output).
    pub stop_tokens: Vec<i64>,
    /// Stop once the output ends with any of these id sequences (kept in the output).
    pub stop_sequences: Vec<Vec<i64>>,
}

/// Identifies a sequence in the engine, unique over the engine's life.
pub type SequenceId = u64;

/// Why a sequence left the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It generated a stop token or stop sequence.
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// One chosen token of one sequence, and whether the sequence ended with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEvent {
    pub id: SequenceId,
    pub token: i64,
    /// Set on the sequence's last token; its slot is already free.
    pub finish: Option<Finish>,
}

/// What a traced sequence recorded besides its tokens (see [`Engine::trace`]): what a
/// policy-gradient step needs to compare its own forward with the rollout's.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trace {
    /// `log π(token)` of each generated token under the distribution it was drawn from:
    /// `log_softmax(logits / temperature)` (temperature 1 for greedy), over the whole
    /// vocabulary (top-k / top-p truncation aside, as TRL computes it).
    pub logprobs: Vec<f32>,
    /// For each MoE block in order, the experts chosen at every position the model was fed
    /// (the prompt's, then each generated token but the last), `K` per position, flattened.
    pub experts: Vec<Vec<i32>>,
}

/// A sequence in the batch; `Engine::running[r]` occupies cache row `r`.
struct Running {
    id: SequenceId,
    request: Request,
    generated: Vec<i64>,
    rng: Option<StdRng>,
    trace: Option<Trace>,
}

/// The batch of running sequences over one slot cache.
pub struct Engine<'m, B: Backend> {
    model: &'m DeepSeekModel<B>,
    cache: SlotCache<B>,
    running: Vec<Running>,
    device: B::Device,
    next_id: SequenceId,
    tracing: bool,
    /// Traces of finished sequences, until [`Engine::take_trace`].
    traces: std::collections::HashMap<SequenceId, Trace>,
}

impl<'m, B: Backend> Engine<'m, B> {
    /// An engine for up to `max_batch` sequences of up to `context` tokens each (prompt plus
    /// output; at most the model's `max_position_embeddings`).
    pub fn new(
        model: &'m DeepSeekModel<B>,
        max_batch: usize,
        context: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let cache = SlotCache::new(&model.config, max_batch, context, device)?;
        Ok(Self {
            model,
            cache,
            running: Vec::new(),
            device: device.clone(),
            next_id: 0,
            tracing: false,
            traces: Default::default(),
        })
    }

    /// Records a [`Trace`] (log-probs and chosen experts) of every sequence added from now on;
    /// a finished sequence's trace waits in [`Engine::take_trace`]. Costs one host read of the
    /// routing per step.
    pub fn trace(&mut self, on: bool) {
        self.tracing = on;
    }

    /// The trace of a finished traced sequence (once).
    pub fn take_trace(&mut self, id: SequenceId) -> Option<Trace> {
        self.traces.remove(&id)
    }

    /// Sequences decoding now.
    pub fn active(&self) -> usize {
        self.running.len()
    }

    /// Whether [`Engine::add`] can take another sequence.
    pub fn has_room(&self) -> bool {
        !self.cache.is_full()
    }

    /// Tokens one sequence may hold (prompt plus output).
    pub fn context(&self) -> usize {
        self.cache.capacity()
    }

    /// The model the engine runs.
    pub fn model(&self) -> &'m DeepSeekModel<B> {
        self.model
    }

    /// Checks a request without running it: a non-empty prompt of in-vocabulary ids that fits
    /// the context with its `max_new_tokens`, and valid sampling settings.
    pub fn check(&self, request: &Request) -> Result<()> {
        request.decoding.validate()?;
        let (len, vocab) = (request.prompt.len(), self.model.config.vocab_size as i64);
        if len == 0 {
            bail!("empty prompt: give at least one token");
        }
        if let Some(bad) = request.prompt.iter().find(|&&t| t < 0 || t >= vocab) {
            bail!("token id {bad} is outside the vocabulary 0..{vocab}");
        }
        if len + request.max_new_tokens > self.context() {
            bail!(
                "the prompt's {len} tokens plus max_tokens {} exceed the context of {} tokens",
                request.max_new_tokens,
                self.context()
            );
        }
        Ok(())
    }

    /// Starts a sequence: prefills its prompt into a free slot and chooses its first token. The
    /// event ends the sequence already when that token stops it (or `max_new_tokens` is 1); with
    /// `max_new_tokens` 0 nothing runs and no token is returned.
    pub fn add(&mut self, request: Request) -> Result<(SequenceId, Option<TokenEvent>)> {
        self.check(&request)?;
        if !self.has_room() {
            bail!("all {} slots are taken", self.cache.slots());
        }
        if request.max_new_tokens == 0 {
            let id = self.next_id;
            self.next_id += 1;
            return Ok((id, None));
        }
        // One sequence is a group of one: the prefill and first token of `add_shared`.
        Ok(self.add_shared(vec![request])?.pop().expect("one request, one sequence"))
    }

    /// Starts several sequences with one prompt (the samples of a group): the prompt is prefilled
    /// once, its cache row duplicated for the others (pages shared, copy-on-write), and each
    /// sequence chooses its first token from the same logits with its own decoding. The result
    /// equals adding them one by one (the prefill is deterministic). Every request must have
    /// the same prompt and a budget of at least one token, and all must fit.
    pub fn add_shared(
        &mut self,
        requests: Vec<Request>,
    ) -> Result<Vec<(SequenceId, Option<TokenEvent>)>> {
        let Some(first) = requests.first() else { return Ok(Vec::new()) };
        for r in &requests {
            self.check(r)?;
            if r.prompt != first.prompt || r.max_new_tokens == 0 {
                bail!(
                    "add_shared takes requests with one prompt and budgets of at least one token"
                );
            }
        }
        if self.cache.slots() - self.cache.active() < requests.len() {
            bail!(
                "{} sequences do not fit the {} free slots",
                requests.len(),
                self.cache.slots() - self.cache.active()
            );
        }
        let len = first.prompt.len();
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(first.prompt.clone(), [1, len]),
            &self.device,
        );
        let (model, cache) = (self.model, &mut self.cache);
        let (row, out) = on_pool::<B, _>(|| model.prefill_slot(ids, cache))?;
        let experts: Option<Vec<Vec<i32>>> = match self.tracing {
            true => Some(out.experts.iter().map(|e| host_ids(e.clone())).collect::<Result<_>>()?),
            false => None,
        };
        let n = requests.len();
        let mut started = Vec::with_capacity(n);
        for (i, request) in requests.into_iter().enumerate() {
            if i > 0 {
                self.cache.duplicate(row)?;
            }
            let id = self.next_id;
            self.next_id += 1;
            let rng = match request.decoding {
                Decoding::Sample { seed, .. } => Some(StdRng::seed_from_u64(seed)),
                Decoding::Greedy => None,
            };
            let trace = experts.clone().map(|experts| Trace { logprobs: Vec::new(), experts });
            self.running.push(Running { id, request, generated: Vec::new(), rng, trace });
            started.push(id);
        }
        let last = out.logits.narrow(1, len - 1, 1); // [1, 1, vocab]
        let events = self.choose(Tensor::cat(vec![last; n], 0))?; // [n, 1, vocab]
        Ok(started
            .into_iter()
            .map(|id| (id, events.iter().find(|e| e.id == id).copied()))
            .collect())
    }

    /// One decoding step of every running sequence; returns each one's new token (in no
    /// particular order). Sequences that finish leave the batch.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let last: Vec<i64> = self
            .running
            .iter()
            .map(|r| *r.generated.last().expect("a running sequence has a token"))
            .collect();
        let rows = last.len();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(last, [rows, 1]), &self.device);
        let (model, cache) = (self.model, &mut self.cache);
        let out = on_pool::<B, _>(|| model.decode_slots(ids, cache))?;
        if self.running.iter().any(|r| r.trace.is_some()) {
            let k = self.model.config.num_experts_per_tok;
            for (block, experts) in out.experts.into_iter().enumerate() {
                let ids = host_ids(experts)?; // [rows·K]: row r's experts at r·K..
                for (seq, row) in self.running.iter_mut().zip(ids.chunks(k)) {
                    if let Some(trace) = &mut seq.trace {
                        trace.experts[block].extend_from_slice(row);
                    }
                }
            }
        }
        self.choose(out.logits) // [rows, 1, vocab]
    }

    /// Ends a running sequence now and frees its slot; `false` if it is not running.
    pub fn cancel(&mut self, id: SequenceId) -> bool {
        match self.running.iter().position(|r| r.id == id) {
            Some(row) => {
                self.remove(row);
                true
            }
            None => false,
        }
    }

    /// Ends every running sequence.
    pub fn cancel_all(&mut self) {
        self.running.clear();
        self.cache.clear();
    }

    fn remove(&mut self, row: usize) {
        self.running.swap_remove(row);
        self.cache.remove(row);
    }

    /// Chooses the next token of each running sequence from its logits (row `r` of `logits` for
    /// the sequence in row `r`), records it, and removes the sequences that finish.
    ///
    /// # Shapes
    /// `logits`: `[rows, 1, vocab]` for the last `rows` running sequences.
    fn choose(&mut self, logits: Tensor<B, 3>) -> Result<Vec<TokenEvent>> {
        let [rows, _, vocab] = logits.dims();
        let values: Vec<f32> =
            logits.into_data().convert::<f32>().into_vec().map_err(|e| anyhow!("{e:?}"))?;
        let first = self.running.len() - rows;
        let mut events = Vec::with_capacity(rows);
        let mut finished = Vec::new();
        for (i, row_logits) in values.chunks(vocab).enumerate() {
            let seq = &mut self.running[first + i];
            let token = match (seq.request.decoding, seq.rng.as_mut()) {
                (Decoding::Sample { temperature, top_k, top_p, .. }, Some(rng)) => {
                    sample(row_logits, temperature, top_k, top_p, rng)
                }
                _ => argmax(row_logits),
            };
            seq.generated.push(token);
            if let Some(trace) = &mut seq.trace {
                let temperature = match seq.request.decoding {
                    Decoding::Sample { temperature, .. } => temperature,
                    Decoding::Greedy => 1.0,
                };
                trace.logprobs.push(log_prob(row_logits, token, temperature));
            }
            let r = &seq.request;
            let stopped = r.stop_tokens.contains(&token)
                || r.stop_sequences.iter().any(|s| !s.is_empty() && seq.generated.ends_with(s));
            let finish = if stopped {
                Some(Finish::Stop)
            } else if seq.generated.len() >= r.max_new_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            if finish.is_some() {
                finished.push(first + i);
                if let Some(trace) = seq.trace.take() {
                    self.traces.insert(seq.id, trace);
                }
            }
            events.push(TokenEvent { id: seq.id, token, finish });
        }
        // Highest row first: a swap-remove moves only rows above the one it frees.
        for row in finished.into_iter().rev() {
            self.remove(row);
        }
        Ok(events)
    }
}

/// `log_softmax(logits / temperature)[token]`, in f64 and rounded once.
fn log_prob(logits: &[f32], token: i64, temperature: f32) -> f32 {
    let t = temperature as f64;
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
    let sum: f64 = logits.iter().map(|&v| (v as f64 / t - max).exp()).sum();
    (logits[token as usize] as f64 / t - max - sum.ln()) as f32
}

/// An id tensor's values on the host.
fn host_ids<B: Backend, const D: usize>(ids: Tensor<B, D, Int>) -> Result<Vec<i32>> {
    ids.into_data().convert::<i32>().into_vec().map_err(|e| anyhow!("{e:?}"))
}

/// The output of one request run by [`generate_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens (a stop token or sequence included).
    pub tokens: Vec<i64>,
    /// Why it ended; `None` when the callback ended it.
    pub finish: Option<Finish>,
    /// What [`generate_traced`] recorded (`None` from [`generate_all`], or for a request the
    /// callback ended).
    pub trace: Option<Trace>,
}

/// Runs `requests` to completion with continuous batching, at most `max_batch` at a time: a
/// request joins as soon as another leaves. Calls `on_token(request_index, event)` for every
/// token as it is chosen (`event.finish` set on a request's last); returning `false` ends that
/// request there (e.g. on a stop string in its text). Outputs come back in request order; every request is checked before any runs.
pub fn generate_all<B: Backend>(
    model: &DeepSeekModel<B>,
    requests: Vec<Request>,
    max_batch: usize,
    device: &B::Device,
    on_token: &mut dyn FnMut(usize, TokenEvent) -> Result<bool>,
) -> Result<Vec<Generated>> {
    run_all(model, requests, max_batch, device, on_token, false)
}

/// [`generate_all`] recording each request's [`Trace`] (the log-prob of every chosen token and
/// the experts of every position), as a reinforcement-learning rollout does.
pub fn generate_traced<B: Backend>(
    model: &DeepSeekModel<B>,
    requests: Vec<Request>,
    max_batch: usize,
    device: &B::Device,
    on_token: &mut dyn FnMut(usize, TokenEvent) -> Result<bool>,
) -> Result<Vec<Generated>> {
    run_all(model, requests, max_batch, device, on_token, true)
}

fn run_all<B: Backend>(
    model: &DeepSeekModel<B>,
    requests: Vec<Request>,
    max_batch: usize,
    device: &B::Device,
    on_token: &mut dyn FnMut(usize, TokenEvent) -> Result<bool>,
    trace: bool,
) -> Result<Vec<Generated>> {
    // A budget of 0 tokens is finished before it starts.
    let mut out: Vec<Generated> = requests
        .iter()
        .map(|r| Generated {
            tokens: Vec::new(),
            finish: (r.max_new_tokens == 0).then_some(Finish::Length),
            trace: (trace && r.max_new_tokens == 0).then(Trace::default),
        })
        .collect();
    let Some(context) = requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max() else {
        return Ok(out);
    };
    let context = context.min(model.config.max_position_embeddings).max(1);
    let mut engine = Engine::new(model, max_batch.clamp(1, requests.len()), context, device)?;
    engine.trace(trace);
    for (i, r) in requests.iter().enumerate() {
        engine.check(r).map_err(|e| e.context(format!("request {i}")))?;
    }
    let mut index_of = std::collections::HashMap::new();
    let mut pending = requests.into_iter().enumerate().peekable();
    let mut deliver = |engine: &mut Engine<B>,
                       index_of: &mut std::collections::HashMap<SequenceId, usize>,
                       event: TokenEvent|
     -> Result<()> {
        let i = index_of[&event.id];
        out[i].tokens.push(event.token);
        out[i].finish = event.finish;
        if event.finish.is_some() {
            out[i].trace = engine.take_trace(event.id);
        }
        let go_on = on_token(i, event)?;
        if !go_on && event.finish.is_none() {
            engine.cancel(event.id);
        }
        Ok(())
    };
    loop {
        while engine.has_room() {
            let Some((i, request)) = pending.next() else { break };
            // The following requests with this prompt that fit share its prefill.
            let mut group = vec![(i, request)];
            let room = engine.cache.slots() - engine.cache.active();
            while group.len() < room
                && group[0].1.max_new_tokens > 0
                && pending
                    .peek()
                    .is_some_and(|(_, r)| r.prompt == group[0].1.prompt && r.max_new_tokens > 0)
            {
                group.push(pending.next().expect("peeked"));
            }
            let started = if group[0].1.max_new_tokens == 0 {
                let (i, request) = group.pop().expect("one");
                vec![(i, engine.add(request)?)]
            } else {
                let (indices, requests): (Vec<usize>, Vec<Request>) = group.into_iter().unzip();
                indices.into_iter().zip(engine.add_shared(requests)?).collect()
            };
            for (i, (id, _)) in &started {
                index_of.insert(*id, *i);
            }
            for (_, (_, first)) in started {
                if let Some(event) = first {
                    deliver(&mut engine, &mut index_of, event)?;
                }
            }
        }
        if engine.active() == 0 {
            break;
        }
        for event in engine.step()? {
            deliver(&mut engine, &mut index_of, event)?;
        }
    }
    Ok(out)
}
