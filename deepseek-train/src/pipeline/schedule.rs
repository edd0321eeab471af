//! Pipeline schedules as per-rank lists of operations, shared by the simulator
//! ([`super::simulate`]) and the runtime ([`super::run`]): what is simulated is what runs.
//!
//! A model of `P` stages runs on `P` ranks. A *chunk* is one micro-batch's pass through one
//! stage. The operations are the forward of a chunk `F`, its backward `B` (full, or split into
//! the input gradient and a later weight gradient `W` as in zero-bubble pipelines), and
//! DualPipe's overlapped pair `F&B` (the forward of one chunk with the backward of another, so
//! that one's all-to-all hides behind the other's computation).
//!
//! - **1F1B** (Megatron, Narayanan et al. 2021): stage `i` runs `P − i − 1` warm-up forwards,
//!   then alternates one forward and one backward, then drains the backwards.
//! - **ZB1P** (ZB-H1, Qi et al. 2023): the 1F1B order with split backwards; stage `i` holds back
//!   its first `i` weight gradients, which fill the drain bubble.
//! - **DualPipe** (DeepSeek-V3 §3.2.1, and DeepSeek's public `dualpipe.py`, whose eight steps
//!   this follows): micro-batches enter from both ends. Rank `r` holds stage `r` for direction
//!   0 (fed at rank 0) and stage `P − 1 − r` for direction 1 (fed at rank `P − 1`), so two copies
//!   of the stage parameters; `P` even and `M ≥ 2P` micro-batches, half per direction.

use std::fmt;

/// Which schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    OneFOneB,
    ZeroBubble,
    DualPipe,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1f1b" => Ok(Self::OneFOneB),
            "zb1p" => Ok(Self::ZeroBubble),
            "dualpipe" => Ok(Self::DualPipe),
            other => Err(format!("unknown schedule `{other}`: choose 1f1b, zb1p or dualpipe")),
        }
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OneFOneB => "1f1b",
            Self::ZeroBubble => "zb1p",
            Self::DualPipe => "dualpipe",
        })
    }
}

/// How the model is cut into stages and scheduled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineLayout {
    /// Stages `P` (divides the ranks).
    pub stages: usize,
    pub schedule: ScheduleKind,
    /// Blocks per stage; `None`: balanced by parameter count.
    pub stage_layers: Option<Vec<usize>>,
    /// Tests only: rank `.0` fails at the start of step `.1`.
    #[doc(hidden)]
    pub fail_at: Option<(usize, usize)>,
}

impl PipelineLayout {
    pub fn new(stages: usize, schedule: ScheduleKind) -> Self {
        Self { stages, schedule, stage_layers: None, fail_at: None }
    }
}

/// One micro-batch of one direction (`dir` 0 enters at rank 0; 1, DualPipe only, at the last
/// rank); `mb` counts within the direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Chunk {
    pub dir: usize,
    pub mb: usize,
}

/// One operation of a rank, on the stage this rank holds for the chunk's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Forward(Chunk),
    /// The backward; with `split`, only the input gradient, the weight gradient waiting for a
    /// later [`Op::Weight`] of the same chunk.
    Backward {
        chunk: Chunk,
        split: bool,
    },
    /// The held-back weight gradient of a split backward.
    Weight(Chunk),
    /// The forward of one chunk overlapped with the full backward of another.
    ForwardBackward {
        forward: Chunk,
        backward: Chunk,
    },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |c: &Chunk| format!("{}{}", c.mb, if c.dir == 1 { "'" } else { "" });
        match self {
            Op::Forward(x) => write!(f, "F{}", c(x)),
            Op::Backward { chunk, split: false } => write!(f, "B{}", c(chunk)),
            Op::Backward { chunk, split: true } => write!(f, "b{}", c(chunk)),
            Op::Weight(x) => write!(f, "W{}", c(x)),
            Op::ForwardBackward { forward, backward } => {
                write!(f, "F{}&B{}", c(forward), c(backward))
            }
        }
    }
}

/// A schedule of `micro_batches` over `ranks` ranks: `ops[r]` is what rank `r` runs, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub ranks: usize,
    pub micro_batches: usize,
    pub ops: Vec<Vec<Op>>,
}

impl Schedule {
    /// The schedule `kind` of `micro_batches` over `ranks` stages; an impossible shape is an
    /// error that says what would work.
    pub fn new(kind: ScheduleKind, ranks: usize, micro_batches: usize) -> Result<Self, String> {
        if ranks == 0 {
            return Err("a pipeline needs at least one stage".into());
        }
        if micro_batches == 0 {
            return Err("a pipeline step needs at least one micro-batch".into());
        }
        let ops = match kind {
            ScheduleKind::OneFOneB => {
                (0..ranks).map(|i| one_f_one_b(ranks, micro_batches, i, false)).collect()
            }
            ScheduleKind::ZeroBubble => {
                (0..ranks).map(|i| one_f_one_b(ranks, micro_batches, i, true)).collect()
            }
            ScheduleKind::DualPipe => {
                if !ranks.is_multiple_of(2) {
                    return Err(format!(
                        "DualPipe needs an even number of pipeline ranks, got {ranks}"
                    ));
                }
                if !micro_batches.is_multiple_of(2) || micro_batches < 2 * ranks {
                    return Err(format!(
                        "DualPipe over {ranks} ranks needs an even number of at least {} micro-batches (half from each end), got {micro_batches}",
                        2 * ranks
                    ));
                }
                (0..ranks).map(|r| dual_pipe(ranks, micro_batches, r)).collect()
            }
        };
        let schedule = Self { kind, ranks, micro_batches, ops };
        schedule.check()?;
        Ok(schedule)
    }

    /// Directions micro-batches enter from: 2 for DualPipe, else 1.
    pub fn directions(&self) -> usize {
        if self.kind == ScheduleKind::DualPipe {
            2
        } else {
            1
        }
    }

    /// Micro-batches per direction.
    pub fn per_direction(&self) -> usize {
        self.micro_batches / self.directions()
    }

    /// Stage copies each rank holds (parameters per device relative to one stage).
    pub fn chunks_per_rank(&self) -> usize {
        self.directions()
    }

    /// The stage rank `rank` runs for direction `dir`.
    pub fn stage(&self, rank: usize, dir: usize) -> usize {
        if dir == 0 {
            rank
        } else {
            self.ranks - 1 - rank
        }
    }

    /// The rank that runs stage `stage` for direction `dir` (the inverse of [`Schedule::stage`]).
    pub fn rank_of(&self, stage: usize, dir: usize) -> usize {
        self.stage(stage, dir)
    }

    /// The index of `chunk` among the step's micro-batches (direction 0 first).
    pub fn micro_batch(&self, chunk: Chunk) -> usize {
        chunk.dir * self.per_direction() + chunk.mb
    }

    /// Checks what any correct schedule satisfies: on every rank each chunk of each direction
    /// runs exactly one forward and one backward, the forward first, and a split backward's
    /// weight gradient comes once, after it.
    pub fn check(&self) -> Result<(), String> {
        #[derive(Default, Clone, Copy)]
        struct Seen {
            forward: bool,
            backward: bool,
            split: bool,
            weight: bool,
        }
        let n = self.per_direction();
        for (rank, ops) in self.ops.iter().enumerate() {
            let mut seen = vec![vec![Seen::default(); n]; self.directions()];
            let mut visit = |c: Chunk, what: u8| -> Result<(), String> {
                let s = seen
                    .get_mut(c.dir)
                    .and_then(|d| d.get_mut(c.mb))
                    .ok_or_else(|| format!("rank {rank}: chunk {c:?} is out of range"))?;
                let fail = |why: &str| {
                    Err(format!("rank {rank}: micro-batch {} of direction {}: {why}", c.mb, c.dir))
                };
                match what {
                    0 if s.forward => return fail("two forwards"),
                    0 => s.forward = true,
                    1 | 2 if s.backward => return fail("two backwards"),
                    1 | 2 if !s.forward => return fail("backward before its forward"),
                    1 => s.backward = true,
                    2 => (s.backward, s.split) = (true, true),
                    _ if !s.split || s.weight => {
                        return fail("a weight gradient without its split backward")
                    }
                    _ => s.weight = true,
                }
                Ok(())
            };
            for op in ops {
                match *op {
                    Op::Forward(c) => visit(c, 0)?,
                    Op::Backward { chunk, split } => visit(chunk, 1 + split as u8)?,
                    Op::Weight(c) => visit(c, 3)?,
                    Op::ForwardBackward { forward, backward } => {
                        visit(forward, 0)?;
                        visit(backward, 1)?;
                    }
                }
            }
            for (dir, chunks) in seen.iter().enumerate() {
                for (mb, s) in chunks.iter().enumerate() {
                    if !s.forward || !s.backward || s.split != s.weight {
                        return Err(format!("rank {rank}: micro-batch {mb} of direction {dir} does not finish its forward, backward and weight gradient"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// 1F1B on stage `i`; with `split`, ZB-H1: split backwards, the first `i` weight gradients held
/// back (a FIFO, as DualPipe's `WeightGradStore`).
fn one_f_one_b(ranks: usize, m: usize, i: usize, split: bool) -> Vec<Op> {
    let c = |mb| Chunk { dir: 0, mb };
    let warmup = (ranks - i - 1).min(m);
    let mut ops: Vec<Op> = (0..warmup).map(|mb| Op::Forward(c(mb))).collect();
    let mut held = std::collections::VecDeque::new();
    let mut backward = |ops: &mut Vec<Op>, mb| {
        ops.push(Op::Backward { chunk: c(mb), split });
        if split {
            held.push_back(mb);
            if held.len() > i {
                ops.push(Op::Weight(c(held.pop_front().expect("non-empty"))));
            }
        }
    };
    for k in 0..m - warmup {
        ops.push(Op::Forward(c(warmup + k)));
        backward(&mut ops, k);
    }
    for k in m - warmup..m {
        backward(&mut ops, k);
    }
    ops.extend(held.into_iter().map(|mb| Op::Weight(c(mb))));
    ops
}

/// DualPipe on rank `rank`: the eight steps of DeepSeek's `DualPipe.step`. Its "phase" 0/1 is
/// the direction on the first half of the ranks and the other direction on the second half.
fn dual_pipe(ranks: usize, m: usize, rank: usize) -> Vec<Op> {
    struct Rank {
        second_half: bool,
        next_f: [usize; 2],
        next_b: [usize; 2],
        held: std::collections::VecDeque<Chunk>,
        ops: Vec<Op>,
    }
    impl Rank {
        fn dir(&self, phase: usize) -> usize {
            phase ^ self.second_half as usize
        }
        fn take_f(&mut self, phase: usize) -> Chunk {
            let dir = self.dir(phase);
            self.next_f[dir] += 1;
            Chunk { dir, mb: self.next_f[dir] - 1 }
        }
        fn take_b(&mut self, phase: usize) -> Chunk {
            let dir = self.dir(phase);
            self.next_b[dir] += 1;
            Chunk { dir, mb: self.next_b[dir] - 1 }
        }
        fn f(&mut self, phase: usize) {
            let c = self.take_f(phase);
            self.ops.push(Op::Forward(c));
        }
        fn b(&mut self, phase: usize, split: bool) {
            let chunk = self.take_b(phase);
            if split {
                self.held.push_back(chunk);
            }
            self.ops.push(Op::Backward { chunk, split });
        }
        fn w(&mut self) {
            let c = self.held.pop_front().expect("a held weight gradient");
            self.ops.push(Op::Weight(c));
        }
        fn fb(&mut self, forward_phase: usize, backward_phase: usize) {
            let forward = self.take_f(forward_phase);
            let backward = self.take_b(backward_phase);
            self.ops.push(Op::ForwardBackward { forward, backward });
        }
    }
    let half_ranks = ranks / 2;
    let half = rank.min(ranks - 1 - rank);
    let middle = rank + 1 == half_ranks || rank == half_ranks;
    let mut r = Rank {
        second_half: rank >= half_ranks,
        next_f: [0; 2],
        next_b: [0; 2],
        held: Default::default(),
        ops: Vec::new(),
    };
    // 1: nF0
    for _ in 0..(half_ranks - half - 1) * 2 {
        r.f(0);
    }
    // 2: nF0F1
    for _ in 0..half + 1 {
        r.f(0);
        r.f(1);
    }
    // 3: nB1W1F1 (zero bubble)
    for _ in 0..half_ranks - half - 1 {
        r.b(1, true);
        r.w();
        r.f(1);
    }
    // 4 (main): nF0B1F1B0; the middle ranks do not overlap their first pair.
    for i in 0..m / 2 + half + 1 - ranks {
        if i == 0 && middle {
            r.f(0);
            r.b(1, false);
        } else {
            r.fb(0, 1);
        }
        r.fb(1, 0);
    }
    // 5: nB1F1B0
    for _ in 0..half_ranks - half - 1 {
        r.b(1, false);
        r.fb(1, 0);
    }
    // 6: nB1B0, the second half with split backwards
    let steps = half + 1;
    let mut split = false;
    for i in 0..steps {
        if i == steps / 2 && !half.is_multiple_of(2) {
            split = true;
        }
        r.b(1, split);
        if i == steps / 2 && half.is_multiple_of(2) {
            split = true;
        }
        r.b(0, split);
    }
    // 7: nWB0 (zero bubble)
    for _ in 0..half_ranks - half - 1 {
        r.w();
        r.b(0, true);
    }
    // 8: nW
    while !r.held.is_empty() {
        r.w();
    }
    r.ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schedule_runs_each_chunk_once_per_direction() {
        for kind in [ScheduleKind::OneFOneB, ScheduleKind::ZeroBubble, ScheduleKind::DualPipe] {
            for p in [1, 2, 3, 4, 6, 8, 16] {
                for m in [1, 2, p, 2 * p, 2 * p + 2, 4 * p, 5 * p] {
                    match Schedule::new(kind, p, m) {
                        Ok(s) => {
                            s.check().unwrap();
                            let forwards: usize = s
                                .ops
                                .iter()
                                .map(|o| {
                                    o.iter()
                                        .filter(|op| {
                                            matches!(
                                                op,
                                                Op::Forward(_) | Op::ForwardBackward { .. }
                                            )
                                        })
                                        .count()
                                })
                                .sum();
                            assert_eq!(forwards, p * m, "{kind} P={p} M={m}");
                        }
                        Err(e) => assert!(
                            kind == ScheduleKind::DualPipe
                                && (p % 2 == 1 || m < 2 * p || m % 2 == 1),
                            "{kind} P={p} M={m}: {e}"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_matches_megatron_on_four_stages() {
        let s = Schedule::new(ScheduleKind::OneFOneB, 4, 6).unwrap();
        let text = |r: usize| s.ops[r].iter().map(|o| o.to_string()).collect::<Vec<_>>().join(" ");
        assert_eq!(text(0), "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5");
        assert_eq!(text(3), "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5");
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Schedule::new(ScheduleKind::DualPipe, 3, 12)
            .unwrap_err()
            .contains("even number of pipeline ranks"));
        assert!(Schedule::new(ScheduleKind::DualPipe, 4, 6).unwrap_err().contains("at least 8"));
        assert!(Schedule::new(ScheduleKind::OneFOneB, 0, 6).is_err());
        assert!(Schedule::new(ScheduleKind::OneFOneB, 2, 0).is_err());
        assert!("gpipe".parse::<ScheduleKind>().unwrap_err().contains("1f1b, zb1p or dualpipe"));
    }
}
