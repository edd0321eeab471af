//! Whole steps on the CPU's thread pool.
//!
//! Flex (and the few-row kernel) split each operation over rayon's global pool. Called from a
//! thread outside that pool, such as a program's main thread, every parallel operation is handed
//! to the pool while the caller sleeps on a latch until it is done: a sleep and a wake-up per
//! operation, tens of microseconds each, and a decoded token or a training step runs hundreds of
//! operations (`perf`: a third of the time of `small`'s batch-1 decoding was in `sched_yield`
//! and futex waits). Called from a pool thread, the same operation is split with `join`: the
//! caller does its part and the other threads steal the rest while they are still awake.
//! [`on_pool`] runs a whole step on a pool thread; measured on 2 cores (`docs/benchmarks.md`):
//! batch-1 decoding of `small` about 1.3x faster, its training step (8 × 128) 1.05–1.15x, its
//! forward (8 × 128) about 1.07x.
//!
//! Only for work that waits on no other thread: the ranks of a parallel run meet in collectives,
//! and with more ranks than pool threads, ranks queued behind the others would never arrive.
//! Other backends run the work where it is called: their operations are queued to a device, not
//! split over CPU threads.

use burn::tensor::backend::Backend;

/// Runs `work` on a thread of the CPU pool when `B` is Flex (or autodiff over Flex), else on
/// the calling thread; returns its result. Nested calls run in place; calls from several
/// threads take turns.
pub fn on_pool<B: Backend, R: Send>(work: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    if is_flex::<B>() {
        if rayon::current_thread_index().is_some() {
            return work();
        }
        // One step in the pool at a time. A pool thread waiting inside one step's operation
        // steals queued jobs, and a second caller's whole step is such a job: run on top of the
        // first, it can wait for a lock the first holds (Burn's autodiff graph) and deadlock.
        // Seen with two SFT tests training at once.
        static ENTRY: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ENTRY.lock().unwrap_or_else(|p| p.into_inner());
        return rayon::scope(|_| work());
    }
    work()
}

/// Whether `B` is Flex or `Autodiff<Flex>`.
#[cfg(feature = "flex")]
fn is_flex<B: Backend>() -> bool {
    use std::any::TypeId;
    type Flex = burn::backend::Flex;
    let id = TypeId::of::<B>();
    id == TypeId::of::<Flex>() || id == TypeId::of::<burn::backend::Autodiff<Flex>>()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::backend::{Autodiff, Flex};

    #[test]
    fn flex_work_runs_on_a_pool_thread_and_other_work_where_it_is_called() {
        let outside = rayon::current_thread_index();
        assert_eq!(outside, None, "the test runs outside the pool");
        let on = super::on_pool::<Flex, _>(rayon::current_thread_index);
        assert!(on.is_some(), "Flex work runs on a pool thread");
        let on = super::on_pool::<Autodiff<Flex>, _>(rayon::current_thread_index);
        assert!(on.is_some(), "so does autodiff over Flex");
        // Nested: stays on the thread it is on.
        let (outer, inner) = super::on_pool::<Flex, _>(|| {
            let outer = rayon::current_thread_index();
            (outer, super::on_pool::<Flex, _>(rayon::current_thread_index))
        });
        assert_eq!(outer, inner);
    }

    #[cfg(feature = "wgpu")]
    #[test]
    fn device_backends_run_where_they_are_called() {
        let on = super::on_pool::<burn::backend::Wgpu, _>(rayon::current_thread_index);
        assert_eq!(on, None);
    }
}
