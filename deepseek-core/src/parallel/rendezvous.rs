//! Multi-process bootstrap, as torchrun does it: every process knows its rank, the world size
//! and the master's address; rank 0 listens there, every other rank connects (retrying until the
//! deadline, so the start order does not matter) and announces its rank and the port where it
//! accepts peers. Rank 0 answers each with the address table and a small blob of its own (the
//! NCCL unique id, for instance). The table then builds the [`super::TcpExchange`] mesh.
//!
//! The address a peer is reached at is the local address of its connection to the master, so a
//! host with several interfaces announces the one that routes to the master.
//!
//! Wire format: little-endian integers; a rank announces `rank: u32, world: u32, port: u16`;
//! the master answers `world × (ip: 16 bytes IPv6-mapped, port: u16)` then `len: u32` blob bytes.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::error::{ParallelError, Result};

/// Where the master is and who this process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// This process's rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// `host:port` of rank 0's rendezvous listener.
    pub master: String,
    /// How long to wait for the master or for all ranks to arrive.
    pub timeout: Duration,
}

/// The outcome: every rank's peer address, rank 0's blob, and this rank's listener for the mesh.
#[derive(Debug)]
pub struct Rendezvous {
    /// This process's rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// The mesh address of every rank, in rank order.
    pub peers: Vec<SocketAddr>,
    /// Rank 0's payload for everyone (the NCCL unique id).
    pub blob: Vec<u8>,
    /// This rank's listener for the mesh connections.
    pub listener: TcpListener,
    /// How long to wait for peers.
    pub timeout: Duration,
}

fn err(what: impl std::fmt::Display) -> ParallelError {
    ParallelError::Rendezvous(what.to_string())
}

impl RendezvousConfig {
    fn check(&self) -> Result<()> {
        if self.world == 0 || self.rank >= self.world {
            return Err(ParallelError::Config {
                field: "rank",
                problem: format!("rank {} is outside a world of {} ranks", self.rank, self.world),
            });
        }
        Ok(())
    }

    fn master_addr(&self) -> Result<SocketAddr> {
        self.master
            .to_socket_addrs()
            .map_err(|e| err(format!("cannot resolve the master address `{}`: {e}", self.master)))?
            .next()
            .ok_or_else(|| err(format!("the master address `{}` resolves to nothing", self.master)))
    }

    /// Meets the other ranks. Rank 0 passes `blob` to everyone (others pass anything).
    pub fn join(&self, blob: &[u8]) -> Result<Rendezvous> {
        self.check()?;
        let master = self.master_addr()?;
        let deadline = Instant::now() + self.timeout;
        if self.rank == 0 {
            let bind = SocketAddr::new(
                if master.is_ipv4() {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from(Ipv6Addr::UNSPECIFIED)
                },
                master.port(),
            );
            let server = TcpListener::bind(bind)
                .map_err(|e| err(format!("rank 0 cannot listen on {bind}: {e}")))?;
            let listener = TcpListener::bind(SocketAddr::new(bind.ip(), 0))
                .map_err(|e| err(format!("cannot open the peer port: {e}")))?;
            let own_port = listener.local_addr().map_err(err)?.port();
            let mut peers: Vec<Option<SocketAddr>> = vec![None; self.world];
            let mut streams = Vec::new();
            server.set_nonblocking(true).map_err(err)?;
            while streams.len() + 1 < self.world {
                match server.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).map_err(err)?;
                        stream.set_read_timeout(Some(remaining(deadline)?)).map_err(err)?;
                        let mut hello = [0u8; 10];
                        stream.read_exact(&mut hello).map_err(|e| {
                            err(format!("a rank connected but did not announce itself: {e}"))
                        })?;
                        let rank = u32::from_le_bytes(hello[0..4].try_into().unwrap()) as usize;
                        let world = u32::from_le_bytes(hello[4..8].try_into().unwrap()) as usize;
                        let port = u16::from_le_bytes(hello[8..10].try_into().unwrap());
                        if world != self.world {
                            return Err(err(format!("rank {rank} was started with a world of {world} ranks, rank 0 with {}", self.world)));
                        }
                        if rank == 0 || rank >= self.world || peers[rank].is_some() {
                            return Err(err(format!(
                                "rank {rank} announced twice or out of range (world {})",
                                self.world
                            )));
                        }
                        let ip = stream.peer_addr().map_err(err)?.ip();
                        peers[rank] = Some(SocketAddr::new(ip, port));
                        streams.push(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let missing: Vec<usize> =
                                (1..self.world).filter(|r| peers[*r].is_none()).collect();
                            return Err(ParallelError::Timeout {
                                rank: 0,
                                peer: missing[0],
                                seconds: self.timeout.as_secs_f64(),
                                during: "the rendezvous",
                            });
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(err(e)),
                }
            }
            // Rank 0 is reached at the address the others used for the master.
            peers[0] = Some(SocketAddr::new(master.ip(), own_port));
            let peers: Vec<SocketAddr> =
                peers.into_iter().map(|p| p.expect("all arrived")).collect();
            let mut answer = Vec::new();
            for p in &peers {
                let ip = match p.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                answer.extend_from_slice(&ip.octets());
                answer.extend_from_slice(&p.port().to_le_bytes());
            }
            answer.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            answer.extend_from_slice(blob);
            for mut s in streams {
                s.write_all(&answer).map_err(|e| err(format!("cannot answer a rank: {e}")))?;
            }
            Ok(Rendezvous {
                rank: 0,
                world: self.world,
                peers,
                blob: blob.to_vec(),
                listener,
                timeout: self.timeout,
            })
        } else {
            let mut stream = loop {
                match TcpStream::connect_timeout(&master, Duration::from_millis(500)) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() >= deadline {
                            return Err(err(format!(
                                "rank {} could not reach the master at {master} within {:.0} s (last error: {e}); is rank 0 running?",
                                self.rank,
                                self.timeout.as_secs_f64()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            let local_ip = stream.local_addr().map_err(err)?.ip();
            let listener = TcpListener::bind(SocketAddr::new(local_ip, 0))
                .map_err(|e| err(format!("cannot open the peer port: {e}")))?;
            let port = listener.local_addr().map_err(err)?.port();
            let mut hello = Vec::with_capacity(10);
            hello.extend_from_slice(&(self.rank as u32).to_le_bytes());
            hello.extend_from_slice(&(self.world as u32).to_le_bytes());
            hello.extend_from_slice(&port.to_le_bytes());
            stream.write_all(&hello).map_err(err)?;
            stream.set_read_timeout(Some(remaining(deadline)?)).map_err(err)?;
            let mut table = vec![0u8; self.world * 18 + 4];
            stream.read_exact(&mut table).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    ParallelError::Timeout {
                        rank: self.rank,
                        peer: 0,
                        seconds: self.timeout.as_secs_f64(),
                        during: "the rendezvous (waiting for all ranks)",
                    }
                }
                _ => err(format!("the master closed the rendezvous: {e}")),
            })?;
            let peers = (0..self.world)
                .map(|r| {
                    let chunk = &table[r * 18..(r + 1) * 18];
                    let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&chunk[..16]).unwrap());
                    let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
                    SocketAddr::new(ip, u16::from_le_bytes([chunk[16], chunk[17]]))
                })
                .collect();
            let len = u32::from_le_bytes(table[self.world * 18..].try_into().unwrap()) as usize;
            let mut blob = vec![0u8; len];
            stream.read_exact(&mut blob).map_err(err)?;
            Ok(Rendezvous {
                rank: self.rank,
                world: self.world,
                peers,
                blob,
                listener,
                timeout: self.timeout,
            })
        }
    }
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    Ok(left.max(Duration::from_millis(1)))
}
