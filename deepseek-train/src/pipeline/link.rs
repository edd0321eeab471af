//! Point-to-point messages between the stage ranks of one process: activations forward,
//! their gradients backward. Each message carries a tag (what, direction, micro-batch), and a
//! receiver takes the one it asks for, keeping others that arrive first: DualPipe ranks send
//! to the same neighbour in both directions, in an order the receiver's schedule does not share.
//!
//! A rank that fails records why on the shared [`Failure`]; a rank waiting for a message sees
//! it within a poll interval and stops with an error naming the failed stage rank, instead of
//! waiting out the timeout.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::schedule::Chunk;
use crate::error::{Result, TrainError};

/// What a message holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A stage's output, for the next stage's forward.
    Activation,
    /// The gradient of a stage's input, for the previous stage's backward.
    Gradient,
}

/// A message's identity: its kind and the chunk it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag {
    pub kind: Kind,
    pub chunk: Chunk,
}

/// A tensor in flight, `[b, s, d]`.
#[derive(Debug)]
pub struct Message {
    pub dims: [usize; 3],
    pub values: Vec<f32>,
}

struct Packet {
    from: usize,
    tag: Tag,
    message: Message,
}

/// The first failure of any rank of the group.
#[derive(Debug, Default)]
pub struct Failure(Mutex<Option<(usize, String)>>);

impl Failure {
    /// Records rank `rank`'s failure, unless another was recorded first.
    pub fn set(&self, rank: usize, problem: String) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert((rank, problem));
    }

    pub fn get(&self) -> Option<(usize, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// One rank's end of the group's links.
pub struct Links {
    rank: usize,
    to: Vec<Sender<Packet>>,
    inbox: Receiver<Packet>,
    early: HashMap<(usize, Tag), Message>,
    timeout: Duration,
    failure: Arc<Failure>,
}

impl Links {
    /// The links of `size` ranks; element `r` goes to rank `r`'s thread.
    pub fn group(size: usize, timeout: Duration, failure: Arc<Failure>) -> Vec<Links> {
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..size).map(|_| channel()).unzip();
        inboxes
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| Links {
                rank,
                to: senders.clone(),
                inbox,
                early: HashMap::new(),
                timeout,
                failure: failure.clone(),
            })
            .collect()
    }

    /// Sends `message` to rank `peer` (never blocks).
    pub fn send(&self, peer: usize, tag: Tag, message: Message) -> Result<()> {
        self.to[peer].send(Packet { from: self.rank, tag, message }).map_err(|_| TrainError::Rank {
            rank: self.rank,
            problem: format!("stage rank {peer} has ended"),
        })
    }

    /// Waits for the message `tag` from rank `peer`.
    pub fn recv(&mut self, peer: usize, tag: Tag) -> Result<Message> {
        if let Some(m) = self.early.remove(&(peer, tag)) {
            return Ok(m);
        }
        let start = Instant::now();
        loop {
            if let Some((rank, problem)) = self.failure.get() {
                return Err(TrainError::Rank {
                    rank: self.rank,
                    problem: format!("stopped: stage rank {rank} failed ({problem})"),
                });
            }
            match self.inbox.recv_timeout(Duration::from_millis(50)) {
                Ok(p) if p.from == peer && p.tag == tag => return Ok(p.message),
                Ok(p) => {
                    self.early.insert((p.from, p.tag), p.message);
                }
                Err(RecvTimeoutError::Timeout) if start.elapsed() < self.timeout => {}
                Err(_) => {
                    return Err(TrainError::Rank {
                        rank: self.rank,
                        problem: format!(
                            "no {:?} of micro-batch {} (direction {}) from stage rank {peer} within {:.0} s",
                            tag.kind,
                            tag.chunk.mb,
                            tag.chunk.dir,
                            self.timeout.as_secs_f64()
                        ),
                    })
                }
            }
        }
    }
}
