//! [`Exchange`] between processes over TCP: a full mesh of connections built from a
//! [`Rendezvous`] (rank `i` connects to every lower rank and accepts every higher one). It works
//! on any host, CPU backends included, which is how the multi-process path is tested on
//! localhost; CUDA clusters use [`super::NcclExchange`] for the same interface.
//!
//! Frames: `tag: u8, count: u64` then `count` little-endian values (u64 counts, f32 values or
//! f64 sums). An all-to-all writes to every peer from scoped threads while this thread reads,
//! so two ranks sending each other large buffers cannot block each other.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::error::{ParallelError, Result};
use super::exchange::{check_len, check_send, Exchange, Traffic};
use super::rendezvous::Rendezvous;

const COUNTS: u8 = 1;
const VALUES: u8 = 2;
const SUMS: u8 = 3;

/// One rank of a multi-process group.
pub struct TcpExchange {
    rank: usize,
    size: usize,
    /// `peers[j]`: the connection to rank `j` (`None` for this rank), as separate read and write
    /// handles so that sending to a peer never waits for reading from it.
    peers: Vec<Option<Link>>,
    timeout: Duration,
    traffic: Traffic,
}

struct Link {
    read: Mutex<TcpStream>,
    write: Mutex<TcpStream>,
}

impl Link {
    fn new(stream: TcpStream) -> std::io::Result<Self> {
        Ok(Self { write: Mutex::new(stream.try_clone()?), read: Mutex::new(stream) })
    }
}

impl std::fmt::Debug for TcpExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpExchange").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

impl TcpExchange {
    /// Connects the mesh. A peer that does not connect, or later does not answer, within the
    /// rendezvous timeout is an error.
    pub fn connect(rv: Rendezvous) -> Result<Self> {
        let timeout = rv.timeout;
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<Link>> = (0..rv.world).map(|_| None).collect();
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        for (j, address) in rv.peers.iter().enumerate().take(rv.rank) {
            let mut stream = loop {
                match TcpStream::connect_timeout(address, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        return Err(ParallelError::PeerLost {
                            rank: rv.rank,
                            peer: j,
                            during: "the mesh setup",
                            reason: e.to_string(),
                        })
                    }
                }
            };
            setup(&stream).map_err(|e| io(rv.rank, j, "the mesh setup", e, timeout))?;
            stream
                .write_all(&(rv.rank as u32).to_le_bytes())
                .map_err(|e| io(rv.rank, j, "the mesh setup", e, timeout))?;
            peers[j] =
                Some(Link::new(stream).map_err(|e| io(rv.rank, j, "the mesh setup", e, timeout))?);
        }
        rv.listener.set_nonblocking(true).map_err(|e| ParallelError::Rendezvous(e.to_string()))?;
        let mut waiting = rv.world - rv.rank - 1;
        while waiting > 0 {
            match rv.listener.accept() {
                Ok((mut stream, _)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(|e| ParallelError::Rendezvous(e.to_string()))?;
                    setup(&stream).map_err(|e| ParallelError::Rendezvous(e.to_string()))?;
                    let mut id = [0u8; 4];
                    stream.read_exact(&mut id).map_err(|e| {
                        ParallelError::Rendezvous(format!(
                            "a peer connected but did not name itself: {e}"
                        ))
                    })?;
                    let j = u32::from_le_bytes(id) as usize;
                    if j <= rv.rank || j >= rv.world || peers[j].is_some() {
                        return Err(ParallelError::Rendezvous(format!(
                            "rank {} got an unexpected connection from rank {j}",
                            rv.rank
                        )));
                    }
                    peers[j] = Some(
                        Link::new(stream)
                            .map_err(|e| io(rv.rank, j, "the mesh setup", e, timeout))?,
                    );
                    waiting -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let peer = (rv.rank + 1..rv.world)
                            .find(|j| peers[*j].is_none())
                            .unwrap_or(rv.rank);
                        return Err(ParallelError::Timeout {
                            rank: rv.rank,
                            peer,
                            seconds: timeout.as_secs_f64(),
                            during: "the mesh setup",
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(ParallelError::Rendezvous(e.to_string())),
            }
        }
        Ok(Self { rank: rv.rank, size: rv.world, peers, timeout, traffic: Traffic::default() })
    }

    /// Sends `frames[j]` to each peer `j` (from scoped threads) and reads one frame of tag `tag`
    /// from each, with `expect[j]` values of `width` bytes. Returns the raw payloads.
    fn exchange(
        &self,
        tag: u8,
        width: usize,
        frames: Vec<Vec<u8>>,
        expect: &[usize],
        during: &'static str,
    ) -> Result<Vec<Vec<u8>>> {
        let mut own = None;
        let results = std::thread::scope(|scope| {
            let mut writers = Vec::new();
            for (j, frame) in frames.into_iter().enumerate() {
                let Some(peer) = &self.peers[j] else {
                    own = Some(frame);
                    continue;
                };
                self.traffic.add(frame.len());
                writers.push((
                    j,
                    scope.spawn(move || -> std::io::Result<()> {
                        let stream = peer.write.lock().unwrap_or_else(|p| p.into_inner());
                        let mut w = BufWriter::new(&*stream);
                        w.write_all(&[tag])?;
                        w.write_all(&((frame.len() / width) as u64).to_le_bytes())?;
                        w.write_all(&frame)?;
                        w.flush()
                    }),
                ));
            }
            let mut received: Vec<Option<Vec<u8>>> = (0..self.size).map(|_| None).collect();
            for (j, peer) in self.peers.iter().enumerate() {
                let Some(peer) = peer else { continue };
                // Unbuffered: a read-ahead buffer would swallow the start of the next frame.
                let stream = peer.read.lock().unwrap_or_else(|p| p.into_inner());
                let mut r = &*stream;
                let mut head = [0u8; 9];
                r.read_exact(&mut head).map_err(|e| io(self.rank, j, during, e, self.timeout))?;
                if head[0] != tag {
                    return Err(ParallelError::Mismatch { rank: self.rank, problem: format!("rank {j} sent frame {} where {tag} was due: the ranks called different collectives", head[0]) });
                }
                let n = u64::from_le_bytes(head[1..].try_into().unwrap()) as usize;
                check_len(self.rank, j, n, expect[j], during)?;
                let mut payload = vec![0u8; n * width];
                r.read_exact(&mut payload)
                    .map_err(|e| io(self.rank, j, during, e, self.timeout))?;
                received[j] = Some(payload);
            }
            for (j, w) in writers {
                w.join()
                    .expect("writer thread")
                    .map_err(|e| io(self.rank, j, during, e, self.timeout))?;
            }
            Ok(received)
        })?;
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| own.take().unwrap_or_default()))
            .collect())
    }
}

fn io(
    rank: usize,
    peer: usize,
    during: &'static str,
    e: std::io::Error,
    timeout: Duration,
) -> ParallelError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ParallelError::Timeout { rank, peer, seconds: timeout.as_secs_f64(), during }
        }
        std::io::ErrorKind::UnexpectedEof => ParallelError::PeerLost {
            rank,
            peer,
            during,
            reason: "the connection closed (did the process end?)".into(),
        },
        _ => ParallelError::PeerLost { rank, peer, during, reason: e.to_string() },
    }
}

fn bytes<T: Copy, const N: usize>(values: &[T], to: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|v| to(*v)).collect()
}

impl Exchange for TcpExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all_counts(&self, send: Vec<Vec<u64>>) -> Result<Vec<Vec<u64>>> {
        check_send(self.rank, self.size, &send, None)?;
        let width = send.first().map_or(0, Vec::len);
        let frames = send.iter().map(|c| bytes(c, u64::to_le_bytes)).collect();
        let got =
            self.exchange(COUNTS, 8, frames, &vec![width; self.size], "the count exchange")?;
        Ok(got
            .into_iter()
            .map(|b| b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
            .collect())
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_send(self.rank, self.size, &send, Some(recv_lens))?;
        let frames = send.iter().map(|v| bytes(v, f32::to_le_bytes)).collect();
        let got = self.exchange(VALUES, 4, frames, recv_lens, "the all-to-all")?;
        Ok(got
            .into_iter()
            .map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            .collect())
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        let frame = bytes(values, f64::to_le_bytes);
        let got = self.exchange(
            SUMS,
            8,
            vec![frame; self.size],
            &vec![values.len(); self.size],
            "an all-reduce",
        )?;
        values.fill(0.0);
        for b in got {
            for (v, c) in values.iter_mut().zip(b.chunks_exact(8)) {
                *v += f64::from_le_bytes(c.try_into().unwrap());
            }
        }
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.traffic.get()
    }
}
