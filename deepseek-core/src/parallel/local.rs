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

/// One kind of collective round: how its buffers travel and how errors name them.
struct Round<T> {
    during: &'static str,
    /// The message kind due, for a mismatch.
    want: &'static str,
    /// The buffer, for a length mismatch.
    buffer: &'static str,
    wrap: fn(Vec<T>) -> Message,
    unwrap: fn(Message) -> std::result::Result<Vec<T>, Message>,
}

const COUNTS: Round<u64> = Round {
    during: "the count exchange",
    want: "counts",
    buffer: "counts",
    wrap: Message::Counts,
    unwrap: |m| match m {
        Message::Counts(c) => Ok(c),
        other => Err(other),
    },
};

const VALUES: Round<f32> = Round {
    during: "the all-to-all",
    want: "values",
    buffer: "an all-to-all buffer",
    wrap: Message::Values,
    unwrap: |m| match m {
        Message::Values(v) => Ok(v),
        other => Err(other),
    },
};

const SUMS: Round<f64> = Round {
    during: "an all-reduce",
    want: "sums",
    buffer: "an all-reduce buffer",
    wrap: Message::Sums,
    unwrap: |m| match m {
        Message::Sums(v) => Ok(v),
        other => Err(other),
    },
};

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
        f.debug_struct("LocalExchange")
            .field("rank", &self.rank)
            .field("size", &self.to.len())
            .finish()
    }
}

impl LocalExchange {
    /// The `size` ranks of one group; hand element `r` to the thread of rank `r`. A peer that
    /// does not answer within `timeout` is an error.
    pub fn group(size: usize, timeout: Duration) -> Vec<LocalExchange> {
        let mut senders: Vec<Vec<Option<Sender<Message>>>> =
            (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Message>>>> =
            (0..size).map(|_| (0..size).map(|_| None).collect()).collect();
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
            RecvTimeoutError::Timeout => ParallelError::Timeout {
                rank: self.rank,
                peer,
                seconds: self.timeout.as_secs_f64(),
                during,
            },
            RecvTimeoutError::Disconnected => ParallelError::PeerLost {
                rank: self.rank,
                peer,
                during,
                reason: "its thread has ended".into(),
            },
        })
    }

    /// Sends `send[j]` to every rank `j`, then receives one buffer of `expect[j]` values from each.
    fn round<T>(
        &self,
        round: &Round<T>,
        send: Vec<Vec<T>>,
        expect: &[usize],
    ) -> Result<Vec<Vec<T>>> {
        for (peer, buffer) in send.into_iter().enumerate() {
            if peer != self.rank {
                self.traffic.add(buffer.len() * std::mem::size_of::<T>());
            }
            self.send(peer, (round.wrap)(buffer), round.during)?;
        }
        (0..self.size())
            .map(|peer| {
                let got = (round.unwrap)(self.recv(peer, round.during)?)
                    .map_err(|other| self.unexpected(peer, &other, round.want))?;
                check_len(self.rank, peer, got.len(), expect[peer], round.buffer)?;
                Ok(got)
            })
            .collect()
    }

    fn unexpected(&self, peer: usize, got: &Message, want: &str) -> ParallelError {
        ParallelError::Mismatch {
            rank: self.rank,
            problem: format!(
                "rank {peer} sent {} where {want} were due: the ranks called different collectives",
                got.kind()
            ),
        }
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
        self.round(&COUNTS, send, &vec![width; self.size()])
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_send(self.rank, self.size(), &send, Some(recv_lens))?;
        self.round(&VALUES, send, recv_lens)
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let got = self.round(
            &SUMS,
            vec![values.to_vec(); self.size()],
            &vec![values.len(); self.size()],
        )?;
        values.fill(0.0);
        for v in got {
            values.iter_mut().zip(v).for_each(|(t, v)| *t += v);
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.traffic.get()
    }
}
