//! Pipeline parallelism (DeepSeek-V3 §3.2.1): the decoder blocks split into `P` contiguous
//! stages on `P` ranks, activations and their gradients passed between neighbours, and a
//! schedule deciding which micro-batch each rank works on when.
//!
//! - [`schedule`]: the schedules (1F1B, ZB1P, DualPipe) as per-rank operation lists;
//! - [`simulate`]: their timelines, bubbles and memory for given chunk times
//!   (`deepseek-train schedule`);
//! - [`stage`]: a model cut into stages, and the stages put back together;
//! - [`link`]: the tagged point-to-point messages between stage ranks;
//! - [`run`]: training with the stages as threads, running the very operation lists the
//!   simulator draws.

pub mod link;
pub mod run;
pub mod schedule;
pub mod simulate;
pub mod stage;

pub use schedule::{Chunk, Op, Schedule, ScheduleKind};
pub use simulate::{paper_bubble, simulate, Costs, Timeline};
