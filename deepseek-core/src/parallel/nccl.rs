//! [`Exchange`] between CUDA GPUs through NCCL (feature `cuda`), one process per GPU. Rank 0
//! creates the NCCL unique id and hands it to the others through the [`Rendezvous`] blob (the TCP
//! bootstrap torchrun also uses); each rank then joins the communicator on its GPU.
//!
//! An all-to-all is one NCCL group of `ncclSend`/`ncclRecv` pairs, counts first, then payloads.
//! The model's buffers are staged through host memory (the exchange interface takes host
//! buffers so the same MoE code drives all three exchanges); device-resident payloads are the
//! next step. Limits: NCCL calls block, so a rank that dies after the rendezvous stalls its
//! peers until NCCL's own error handling aborts; the rendezvous itself times out.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, NcclType, ReduceOp};

use super::error::{ParallelError, Result};
use super::exchange::{check_len, check_send, Exchange, Traffic};
use super::rendezvous::RendezvousConfig;

/// CUDA devices on this machine (0 when the driver cannot be loaded).
pub fn cuda_device_count() -> usize {
    cudarc::driver::result::init()
        .ok()
        .and_then(|_| cudarc::driver::result::device::get_count().ok())
        .map_or(0, |n| n as usize)
}

/// One GPU rank of an NCCL communicator.
pub struct NcclExchange {
    comm: Mutex<Comm>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    traffic: Traffic,
}

// SAFETY: the communicator is only used under the mutex, one call at a time, which is what NCCL
// requires of a communicator shared between threads.
unsafe impl Send for NcclExchange {}
unsafe impl Sync for NcclExchange {}

impl std::fmt::Debug for NcclExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclExchange").field("rank", &self.rank).field("size", &self.size).finish()
    }
}

fn nccl(what: &str, e: impl std::fmt::Debug) -> ParallelError {
    ParallelError::Nccl(format!("{what}: {e:?}"))
}

impl NcclExchange {
    /// Meets the other ranks at the rendezvous and joins the communicator on GPU `ordinal`.
    pub fn connect(config: &RendezvousConfig, ordinal: usize) -> Result<Self> {
        let blob: Vec<u8> = if config.rank == 0 {
            Id::new()
                .map_err(|e| nccl("ncclGetUniqueId (is libnccl.so on LD_LIBRARY_PATH?)", e))?
                .internal()
                .iter()
                .map(|c| *c as u8)
                .collect()
        } else {
            Vec::new()
        };
        let rv = config.join(&blob)?;
        let internal: [std::ffi::c_char; 128] =
            rv.blob.iter().map(|b| *b as std::ffi::c_char).collect::<Vec<_>>().try_into().map_err(
                |_| {
                    ParallelError::Rendezvous(format!(
                        "the NCCL id from rank 0 has {} bytes, 128 expected",
                        rv.blob.len()
                    ))
                },
            )?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| nccl(&format!("CUDA device {ordinal}"), e))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rv.rank, rv.world, Id::uninit(internal))
            .map_err(|e| nccl("ncclCommInitRank", e))?;
        Ok(Self {
            comm: Mutex::new(comm),
            stream,
            rank: rv.rank,
            size: rv.world,
            traffic: Traffic::default(),
        })
    }

    /// One grouped send/receive round of host buffers of `T`.
    fn round<
        T: NcclType + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default,
    >(
        &self,
        send: Vec<Vec<T>>,
        recv_lens: &[usize],
    ) -> Result<Vec<Vec<T>>> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let mut own = Vec::new();
        let mut device_send = Vec::new();
        for (peer, values) in send.into_iter().enumerate() {
            if peer == self.rank {
                own = values;
            } else if !values.is_empty() {
                self.traffic.add(values.len() * std::mem::size_of::<T>());
                device_send.push((
                    peer,
                    self.stream.clone_htod(&values).map_err(|e| nccl("copy to the GPU", e))?,
                ));
            }
        }
        let mut device_recv = Vec::new();
        for (peer, &len) in recv_lens.iter().enumerate() {
            if peer != self.rank && len > 0 {
                device_recv.push((
                    peer,
                    self.stream.alloc_zeros::<T>(len).map_err(|e| nccl("allocation", e))?,
                ));
            }
        }
        group_start().map_err(|e| nccl("ncclGroupStart", e))?;
        for (peer, buf) in &device_send {
            comm.send(buf, *peer as i32).map_err(|e| nccl("ncclSend", e))?;
        }
        for (peer, buf) in &mut device_recv {
            comm.recv(buf, *peer as i32).map_err(|e| nccl("ncclRecv", e))?;
        }
        group_end().map_err(|e| nccl("ncclGroupEnd", e))?;
        let mut out: Vec<Vec<T>> = (0..self.size).map(|_| Vec::new()).collect();
        out[self.rank] = own;
        for (peer, buf) in device_recv {
            out[peer] = self.stream.clone_dtoh(&buf).map_err(|e| nccl("copy from the GPU", e))?;
        }
        Ok(out)
    }
}

impl Exchange for NcclExchange {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_to_all_counts(&self, send: Vec<Vec<u64>>) -> Result<Vec<Vec<u64>>> {
        check_send(self.rank, self.size, &send, None)?;
        let width = send.first().map_or(0, Vec::len);
        let got = self.round(send, &vec![width; self.size])?;
        for (peer, c) in got.iter().enumerate() {
            check_len(self.rank, peer, c.len(), width, "counts")?;
        }
        Ok(got)
    }

    fn all_to_all(&self, send: Vec<Vec<f32>>, recv_lens: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_send(self.rank, self.size, &send, Some(recv_lens))?;
        let own = send[self.rank].len();
        check_len(self.rank, self.rank, own, recv_lens[self.rank], "an all-to-all buffer")?;
        self.round(send, recv_lens)
    }

    fn all_reduce_sum(&self, values: &mut [f64]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let send =
            self.stream.clone_htod(&values.to_vec()).map_err(|e| nccl("copy to the GPU", e))?;
        let mut recv =
            self.stream.alloc_zeros::<f64>(values.len()).map_err(|e| nccl("allocation", e))?;
        comm.all_reduce(&send, &mut recv, &ReduceOp::Sum).map_err(|e| nccl("ncclAllReduce", e))?;
        self.traffic.add(values.len() * 8 * 2 * (self.size - 1) / self.size.max(1));
        let out = self.stream.clone_dtoh(&recv).map_err(|e| nccl("copy from the GPU", e))?;
        values.copy_from_slice(&out);
        Ok(())
    }

    fn bytes_sent(&self) -> u64 {
        self.traffic.get()
    }
}
