//! Expert parallelism against one device: routed experts spread over two in-process ranks
//! (threads sharing the Flex device, each with its own autodiff graph) give the same outputs and
//! the same gradients (inputs, gate weights, expert weights summed over ranks) as one module
//! computing every expert, including experts that receive no tokens and a rank that receives no
//! rows at all. Also: node-limited routing against a scalar reference, the exchanges' errors,
//! and the TCP exchange between two rendezvoused "processes" (threads with their own sockets).

mod common;

use std::sync::Arc;
use std::time::Duration;

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use common::Rng;
use deepseek_core::moe::{NodeLimit, RoutedExperts, RoutedExpertsConfig, RouterConfig};
use deepseek_core::parallel::{
    Exchange, ExpertParallel, LocalExchange, ParallelError, RendezvousConfig, TcpExchange,
};
use deepseek_core::{ExecutionPolicy, ScoringFunc, TopkMethod};

type AB = Autodiff<Flex>;

const D: usize = 16;
const I: usize = 8;
const E: usize = 8;
const K: usize = 3;

fn values<const N: usize>(t: Tensor<Flex, N>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

/// One rank's tokens: activations, choices, gate weights and the output weighting of the loss.
#[derive(Clone)]
struct Batch {
    x: Vec<f32>,
    ids: Vec<u32>,
    w: Vec<f32>,
    c: Vec<f32>,
    tokens: usize,
}

impl Batch {
    fn random(rng: &mut Rng, tokens: usize, used: &[u32]) -> Self {
        let ids =
            rng.routing(tokens, K, used.len()).into_iter().map(|i| used[i as usize]).collect();
        Batch {
            x: (0..tokens * D).map(|_| rng.uniform() * 2.0).collect(),
            ids,
            w: (0..tokens * K).map(|_| rng.next()).collect(),
            c: (0..tokens * D).map(|_| rng.uniform()).collect(),
            tokens,
        }
    }
}

/// Output, `dL/dx`, `dL/dw`, `dL/d gate_up`, `dL/d down` of `L = Σ y ⊙ c`.
type Grads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

fn run(experts: &RoutedExperts<AB>, policy: &ExecutionPolicy, b: &Batch) -> Grads {
    let device = Default::default();
    let x = Tensor::<AB, 2>::from_data(TensorData::new(b.x.clone(), [b.tokens, D]), &device)
        .require_grad();
    let w = Tensor::<AB, 2>::from_data(TensorData::new(b.w.clone(), [b.tokens, K]), &device)
        .require_grad();
    let ids = Tensor::<AB, 2, Int>::from_data(
        TensorData::new(b.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [b.tokens, K]),
        &device,
    );
    let c = Tensor::<AB, 2>::from_data(TensorData::new(b.c.clone(), [b.tokens, D]), &device);
    let y = experts.forward(x.clone(), ids, w.clone(), policy);
    let grads = (y.clone() * c).sum().backward();
    let g = |p: &Tensor<AB, 2>| values(p.grad(&grads).expect("gradient"));
    let g3 = |p: &Tensor<AB, 3>| {
        p.grad(&grads).map(values).unwrap_or_else(|| vec![0.0; p.dims().iter().product()])
    };
    (values(y.inner()), g(&x), g(&w), g3(&experts.gate_up.weight()), g3(&experts.down.weight()))
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

/// Runs `batches[r]` on rank `r` of an expert-parallel group of `batches.len()` ranks and checks
/// everything against one module computing all experts.
fn check_against_one_device(batches: Vec<Batch>) {
    deepseek_core::register_autodiff::<Flex>();
    let device = Default::default();
    let experts = RoutedExpertsConfig::new(D, I, E).init::<AB>(&device);
    let reference: Vec<Grads> =
        batches.iter().map(|b| run(&experts, &ExecutionPolicy::default(), b)).collect();
    let group = LocalExchange::group(batches.len(), Duration::from_secs(30));
    let handles: Vec<_> = group
        .into_iter()
        .zip(batches)
        .map(|(exchange, batch)| {
            let experts = experts.clone();
            std::thread::spawn(move || {
                // A fresh autodiff graph per rank (shared parameter nodes would merge the graphs).
                let experts = experts.fork(&Default::default());
                let parallel = ExpertParallel::new(Arc::new(exchange), E).unwrap();
                run(
                    &experts,
                    &ExecutionPolicy::default().with_expert_parallel(Some(parallel)),
                    &batch,
                )
            })
        })
        .collect();
    let parallel: Vec<Grads> =
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
    let (mut gate_up, mut down) = (vec![0f32; E * D * 2 * I], vec![0f32; E * I * D]);
    for (r, (p, want)) in parallel.iter().zip(&reference).enumerate() {
        assert_close(&format!("rank {r} output"), &p.0, &want.0);
        assert_close(&format!("rank {r} dL/dx"), &p.1, &want.1);
        assert_close(&format!("rank {r} dL/dw"), &p.2, &want.2);
        gate_up.iter_mut().zip(&p.3).for_each(|(a, b)| *a += b);
        down.iter_mut().zip(&p.4).for_each(|(a, b)| *a += b);
    }
    // Single device: one module saw every rank's tokens.
    let sum = |f: fn(&Grads) -> &Vec<f32>| {
        reference.iter().fold(vec![0f32; f(&reference[0]).len()], |acc, g| {
            acc.iter().zip(f(g)).map(|(a, b)| a + b).collect()
        })
    };
    assert_close("dL/d gate_up (summed over ranks)", &gate_up, &sum(|g| &g.3));
    assert_close("dL/d down (summed over ranks)", &down, &sum(|g| &g.4));
}

#[test]
fn two_expert_parallel_ranks_equal_one_device_forward_and_backward() {
    let mut rng = Rng(11);
    // Expert 6 receives no tokens; rank 1 (experts 4..8) receives rows from both ranks.
    let used = [0, 1, 2, 3, 4, 5, 7];
    let batches = vec![Batch::random(&mut rng, 9, &used), Batch::random(&mut rng, 6, &used)];
    check_against_one_device(batches);
}

#[test]
fn a_rank_whose_experts_get_no_rows_still_takes_part_in_backward() {
    let mut rng = Rng(5);
    // Every token chooses among experts 0..4: rank 1's experts stay idle.
    let used = [0, 1, 2, 3];
    check_against_one_device(vec![
        Batch::random(&mut rng, 7, &used),
        Batch::random(&mut rng, 4, &used),
    ]);
}

#[test]
fn four_expert_parallel_ranks_equal_one_device() {
    let mut rng = Rng(23);
    let used: Vec<u32> = (0..E as u32).collect();
    check_against_one_device((0..4).map(|r| Batch::random(&mut rng, 3 + r, &used)).collect());
}

/// Scalar node-limited top-k: nodes scored by the sum of their `⌈K/M⌉` best biased scores, the
/// best `M` nodes kept, the top `K` experts among them (ascending).
fn reference_node_limited(choice: &[f32], nodes: usize, max_nodes: usize, k: usize) -> Vec<usize> {
    let per = choice.len() / nodes;
    let m = k.div_ceil(max_nodes).min(per);
    let mut node_scores: Vec<(f32, usize)> = (0..nodes)
        .map(|n| {
            let mut v = choice[n * per..(n + 1) * per].to_vec();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            (v[..m].iter().sum(), n)
        })
        .collect();
    node_scores.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let kept: Vec<usize> = node_scores[..max_nodes].iter().map(|s| s.1).collect();
    let mut candidates: Vec<(f32, usize)> =
        (0..choice.len()).filter(|e| kept.contains(&(e / per))).map(|e| (choice[e], e)).collect();
    candidates.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let mut chosen: Vec<usize> = candidates[..k].iter().map(|c| c.1).collect();
    chosen.sort();
    chosen
}

#[test]
fn node_limited_routing_keeps_each_token_on_at_most_m_nodes() {
    type B = Flex;
    let device = Default::default();
    let (d, e, k, tokens) = (12, 16, 4, 40);
    let config =
        RouterConfig::new(d, e, k, 1, 1, ScoringFunc::Sigmoid, TopkMethod::NoAuxTc, true, 2.5);
    let mut router = config.init::<B>(&device);
    let mut rng = Rng(3);
    // O(1) weights and a nonzero bias, so that the decisions are not near-ties.
    router.weight = burn::module::Param::from_tensor(Tensor::from_data(
        TensorData::new((0..e * d).map(|_| rng.uniform() * 3.0).collect::<Vec<_>>(), [e, d]),
        &device,
    ));
    let bias: Vec<f32> = (0..e).map(|_| rng.uniform() * 0.2).collect();
    router.e_score_correction_bias = Some(burn::module::Param::from_tensor(Tensor::from_data(
        TensorData::new(bias.clone(), [e]),
        &device,
    )));
    let x_values: Vec<f32> = (0..tokens * d).map(|_| rng.uniform() * 2.0).collect();
    let x = Tensor::<B, 2>::from_data(TensorData::new(x_values.clone(), [tokens, d]), &device);
    let unlimited = router.forward(x.clone(), &ExecutionPolicy::default());
    for limit in [
        NodeLimit { nodes: 4, max_nodes: 2 },
        NodeLimit { nodes: 8, max_nodes: 2 },
        NodeLimit { nodes: 4, max_nodes: 4 },
    ] {
        limit.check(e, k).unwrap();
        let routing =
            router.forward(x.clone(), &ExecutionPolicy::default().with_node_limit(Some(limit)));
        let ids: Vec<i64> = routing.indices.into_data().convert::<i64>().into_vec().unwrap();
        let scores = values(routing.scores.clone());
        let per = e / limit.nodes;
        for t in 0..tokens {
            let mut got: Vec<usize> = ids[t * k..(t + 1) * k].iter().map(|&i| i as usize).collect();
            got.sort();
            let mut spanned: Vec<usize> = got.iter().map(|e| e / per).collect();
            spanned.dedup();
            assert!(
                spanned.len() <= limit.max_nodes,
                "token {t} spans nodes {spanned:?} under {limit:?}"
            );
            let choice: Vec<f32> = (0..e).map(|i| scores[t * e + i] + bias[i]).collect();
            assert_eq!(
                got,
                reference_node_limited(&choice, limit.nodes, limit.max_nodes, k),
                "token {t} under {limit:?}"
            );
        }
        if limit.max_nodes == limit.nodes {
            assert_eq!(
                ids,
                unlimited.indices.clone().into_data().convert::<i64>().into_vec::<i64>().unwrap(),
                "no limit when every node is allowed"
            );
        }
    }
    let err = NodeLimit { nodes: 3, max_nodes: 1 }.check(e, k).unwrap_err();
    assert!(err.contains("cannot be split into 3 nodes"), "{err}");
    let err = NodeLimit { nodes: 8, max_nodes: 1 }.check(e, k).unwrap_err();
    assert!(err.contains("fewer than the 4 experts"), "{err}");
}

#[test]
fn a_peer_that_never_answers_times_out_and_a_finished_peer_is_reported() {
    let mut group = LocalExchange::group(2, Duration::from_millis(200));
    let rank1 = group.pop().unwrap();
    let rank0 = group.pop().unwrap();
    let err = rank0.all_to_all_counts(vec![vec![1], vec![2]]).unwrap_err();
    assert!(matches!(err, ParallelError::Timeout { rank: 0, peer: 1, .. }), "{err}");
    assert!(err.to_string().contains("never joined or stopped responding"), "{err}");
    drop(rank1);
    let err = rank0.all_to_all(vec![vec![1.0], vec![]], &[1, 0]).unwrap_err();
    assert!(matches!(err, ParallelError::PeerLost { rank: 0, peer: 1, .. }), "{err}");
}

#[test]
fn tcp_exchange_moves_counts_payloads_and_sums_between_rendezvoused_ranks() {
    let port = free_port();
    let world = 3;
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let config = RendezvousConfig {
                    rank,
                    world,
                    master: format!("127.0.0.1:{port}"),
                    timeout: Duration::from_secs(20),
                };
                let rv = config.join(b"blob from rank 0").unwrap();
                assert_eq!(rv.blob, b"blob from rank 0");
                let ex = TcpExchange::connect(rv).unwrap();
                // Rank r sends r·10 + j values of (r, j) to rank j: large enough to need the
                // concurrent writers.
                let n = |r: usize, j: usize| 20_000 * (r * 10 + j) % 70_001;
                let counts = ex
                    .all_to_all_counts((0..world).map(|j| vec![n(rank, j) as u64, 7]).collect())
                    .unwrap();
                let lens: Vec<usize> = counts.iter().map(|c| c[0] as usize).collect();
                let got = ex
                    .all_to_all(
                        (0..world).map(|j| vec![(rank * 100 + j) as f32; n(rank, j)]).collect(),
                        &lens,
                    )
                    .unwrap();
                for (src, buf) in got.iter().enumerate() {
                    assert_eq!(buf.len(), n(src, rank));
                    assert!(buf.iter().all(|&v| v == (src * 100 + rank) as f32));
                }
                let mut sums = vec![rank as f64, 1.0];
                ex.all_reduce_sum(&mut sums).unwrap();
                assert_eq!(sums, vec![3.0, 3.0]);
                let own = n(rank, rank) * 4;
                let sent: usize = (0..world).map(|j| n(rank, j) * 4).sum::<usize>() - own;
                assert!(
                    ex.bytes_sent() as usize >= sent,
                    "traffic counts every remote payload byte"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().expect("rank");
    }
}

#[test]
fn a_rendezvous_without_the_master_is_a_clear_error() {
    let port = free_port();
    let config = RendezvousConfig {
        rank: 1,
        world: 2,
        master: format!("127.0.0.1:{port}"),
        timeout: Duration::from_millis(300),
    };
    let err = config.join(&[]).unwrap_err().to_string();
    assert!(
        err.contains("could not reach the master") && err.contains("is rank 0 running"),
        "{err}"
    );
    let bad = RendezvousConfig {
        rank: 2,
        world: 2,
        master: "127.0.0.1:1".into(),
        timeout: Duration::from_millis(10),
    };
    assert!(bad.join(&[]).unwrap_err().to_string().contains("outside a world of 2"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
