//! [`Exchange`] between the threads of one process: one FIFO channel per ordered pair of ranks.
//! The ranks may hold their tensors on different Burn devices (several wgpu adapters) or share
//! one (Flex has a single device); buffers move through host memory.
//!
//! A rank whose thread ends drops its senders, so its peers see [`ParallelError::PeerLost`]
//! instead of waiting; a rank that never arrives is a [`ParallelError::Timeout`].

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use super::error::{ParallelError, Result};
use super::exchange::{check_len, check_send, Exchange, Traffic};

enum Message {
    Counts(Vec<u64>),
    Values(Vec<f32>),
    Sums(Vec<f64>),
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Counts(_) => "counts",
            Message::Values(_) => "values",
            Message::Sums(_) => "sums",
        }
    }
}

/// One rank of an in-process group; build the group with [`LocalExchange::group`].
pub struct LocalExchange {
    rank: usize,
    /// `to[j]`: the channel to rank `j`.
    to: Vec<Sender<Message>>,
    /// `from[j]`: the channel from rank `j` (a mutex only to make the struct `Sync`; one thread
    /// per rank uses it).
    from: Vec<Mutex<Receiver<Message>>>,
    timeout: Duration,
    traffic: Traffic,
}

impl std::fmt::Debug for LocalExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalExchange").field("rank", &self.rank).field("size", &self.to.len()).finish()
    }
}

impl LocalExchange {
    /// The `size` ranks of one group; hand element `r` to the thread of rank `r`. A peer that
    /// does not answer within `timeout` is an error.
    pub fn group(size: usize, timeout: Duration) -> Vec<LocalExchange> {
        let mut senders: Vec<Vec<Option<Sender<Message>>>> = (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Message>>>> = (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        for src in 0..size {
            for dst in 0..size {
                let (tx, rx) = channel();
                senders[src][dst] = Some(tx);
                receivers[dst][src] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (to, from))| LocalExchange {
                rank,
                to: to.into_iter().map(|s| s.expect("filled")).collect(),
                from: from.into_iter().map(|r| Mutex::new(r.expect("filled"))).collect(),
                timeout,
                traffic: Traffic::default(),
            })
            .collect()
    }

    fn send(&self, peer: usize, message: Message, during: &'static str) -> Result<()> {
        self.to[peer].send(message).map_err(|_| ParallelError::PeerLost {
            rank: self.rank,
            peer,
            during,
            reason: "its thread has ended".into(),
        })
    }

    fn recv(&self, peer: usize, during: &'static str) -> Result<Message> {
        let rx = self.from[peer].lock().unwrap_or_else(|p| p.into_inner());
        rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => ParallelError::Timeout { rank: self.rank, peer, seconds: self.timeout.as_secs_f64(), during },
            RecvTimeoutError::Disconnected => ParallelError::PeerLost { rank: self.rank, peer, during, reason: "its thread has ended".into() },
        })
    }

    fn unexpected(&self, peer: usize, got: &Message, want: &str) -> ParallelError {
        ParallelError::Mismatch { rank: self.rank, problem: format!("rank {peer} sent {} where {want} were due: the ranks called different collectives", got.kind()) }
    }
}

impl Exchange for LocalExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn all_to_all_counts(&self, send: Vec<Vec<u64>>) -> Result<Vec<Vec<u64>>> {
        check_send(self.rank, self.size(), &send, None)?;
        let width = send.first().map_or(0, Vec::len);
        for (peer, counts) in send.into_iter().enumerate() {
            if peer != self.rank {
                self.traffic.add(counts.len() * 8);
            }
            self.send(peer, Message::Counts(counts), "the count exchange")?;
        }
        (0..self.size())
            .map(|peer| match self.recv(peer, "the count exchange")? {
                Message::Counts(c) => check_len(self.rank, peer, c.len(), width, "counts").map(|_| c),
                other => Err(self.unexpected(peer, &other, "counts")),
            })
            .collect()
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_send(self.rank, self.size(), &send, Some(recv_lens))?;
        for (peer, values) in send.into_iter().enumerate() {
            if peer != self.rank {
                self.traffic.add(values.len() * 4);
            }
            self.send(peer, Message::Values(values), "the all-to-all")?;
        }
        (0..self.size())
            .map(|peer| match self.recv(peer, "the all-to-all")? {
                Message::Values(v) => check_len(self.rank, peer, v.len(), recv_lens[peer], "an all-to-all buffer").map(|_| v),
                other => Err(self.unexpected(peer, &other, "values")),
            })
            .collect()
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        for peer in 0..self.size() {
            if peer != self.rank {
                self.traffic.add(values.len() * 8);
            }
            self.send(peer, Message::Sums(values.to_vec()), "an all-reduce")?;
        }
        let mut total = vec![0f64; values.len()];
        for peer in 0..self.size() {
            match self.recv(peer, "an all-reduce")? {
                Message::Sums(v) => {
                    check_len(self.rank, peer, v.len(), values.len(), "an all-reduce buffer")?;
                    total.iter_mut().zip(v).for_each(|(t, v)| *t += v);
                }
                other => return Err(self.unexpected(peer, &other, "sums")),
            }
        }
        values.copy_from_slice(&total);
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.traffic.get()
    }
}
