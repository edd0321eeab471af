//! The MoE dispatch/combine kernels against their host twins (`deepseek_core::moe::dispatch`) on
//! wgpu (lavapipe in CI): the counting sort exactly, the data movement and gradients bit for bit
//! (same operations in the same order), on random routing with idle experts, one token, and
//! more choices than a cube has units.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;

use common::Rng;
use deepseek_core::fp8::kernels::{download, upload};
use deepseek_core::moe::dispatch::{
    combine_reference, dispatch_reference, gate_grad_reference, DispatchPlan,
};
use deepseek_core::moe::kernels;

#[cfg(feature = "wgpu")]
type Runtime = burn::backend::wgpu::WgpuRuntime;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type Runtime = cubecl::cuda::CudaRuntime;

#[test]
fn dispatch_and_combine_match_the_twins() {
    let device = Default::default();
    let mut rng = Rng(11);
    // [T, K, E used, E, D]: idle experts, a single token, more choices than 256 units per cube.
    for [tokens, top_k, used, n_experts, d] in
        [[3, 2, 3, 4, 2], [1, 4, 8, 8, 5], [37, 4, 12, 16, 33], [600, 8, 40, 64, 7]]
    {
        let ids = rng.routing(tokens, top_k, used);
        let plan =
            DispatchPlan::new(&ids.iter().map(|&e| e as i64).collect::<Vec<_>>(), top_k, n_experts);
        let dev = kernels::plan(
            kernels::upload_ids::<Runtime>(&device, &ids, [tokens, top_k]),
            n_experts,
        );

        let counts: Vec<u32> = download(&dev.counts);
        assert_eq!(
            counts.iter().map(|&c| c as usize).collect::<Vec<_>>(),
            plan.rows_per_expert,
            "counts"
        );
        let offsets: Vec<u32> = download(&dev.offsets);
        assert_eq!(offsets[n_experts] as usize, tokens * top_k);
        let slot_of_row: Vec<u32> = download(&dev.slot_of_row);
        assert_eq!(
            slot_of_row.iter().map(|&s| s as i64).collect::<Vec<_>>(),
            plan.slot_of_row,
            "rows in token order within each expert"
        );
        let row_of_slot: Vec<u32> = download(&dev.row_of_slot);
        assert!(
            row_of_slot
                .iter()
                .enumerate()
                .all(|(slot, &row)| slot_of_row[row as usize] as usize == slot),
            "inverse maps"
        );

        let x: Vec<f32> = (0..tokens * d).map(|_| rng.uniform()).collect();
        let w: Vec<f32> = (0..tokens * top_k).map(|_| rng.uniform()).collect();
        let dy: Vec<f32> = (0..tokens * d).map(|_| rng.uniform()).collect();
        let xd = upload::<Runtime>(&device, &x, [tokens, d]);
        let wd = upload::<Runtime>(&device, &w, [tokens, top_k]);
        let dyd = upload::<Runtime>(&device, &dy, [tokens, d]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

        let rows = dispatch_reference(&x, d, &plan, None);
        let rows_d = kernels::dispatch(xd.clone(), &dev, None);
        assert_eq!(bits(&download(&rows_d)), bits(&rows), "dispatch");
        assert_eq!(
            bits(&download(&kernels::dispatch(dyd.clone(), &dev, Some(wd.clone())))),
            bits(&dispatch_reference(&dy, d, &plan, Some(&w))),
            "weighted dispatch"
        );
        assert_eq!(
            bits(&download(&kernels::combine(rows_d.clone(), &dev, Some(wd.clone())))),
            bits(&combine_reference(&rows, d, &plan, Some(&w), top_k)),
            "combine"
        );
        assert_eq!(
            bits(&download(&kernels::combine(rows_d.clone(), &dev, None))),
            bits(&combine_reference(&rows, d, &plan, None, top_k)),
            "unweighted combine"
        );
        assert_eq!(
            bits(&download(&kernels::gate_grad(dyd, rows_d, &dev))),
            bits(&gate_grad_reference(&dy, &rows, d, &plan, top_k)),
            "gate gradient"
        );
    }
}

#[cfg(feature = "wgpu")]
mod routed_experts {
    //! The MoE layer's routed experts with the device kernels (wgpu, fused, under autodiff)
    //! against the host plan on Flex: outputs and every gradient.
    use super::*;
    use burn::backend::{Autodiff, Wgpu};
    use burn::module::Param;
    use burn::tensor::backend::Backend;
    use burn::tensor::{Int, Tensor, TensorData};
    use deepseek_core::device::{run_on, BackendTask, DeviceKind};
    use deepseek_core::moe::RoutedExperts;
    use deepseek_core::{ExecutionPolicy, Projection};

    #[derive(Clone)]
    struct Case {
        tokens: usize,
        top_k: usize,
        n_experts: usize,
        d: usize,
        i: usize,
        ids: Vec<u32>,
        x: Vec<f32>,
        w: Vec<f32>,
        gate_up: Vec<f32>,
        down: Vec<f32>,
        dy: Vec<f32>,
    }

    /// Output and gradients of `Σ y ⊙ dy` for x, gate weights, gate_up and down.
    fn run<B: Backend>(c: &Case) -> [Vec<f32>; 5] {
        let device = Default::default();
        let f = |v: &[f32], shape: Vec<usize>| {
            Tensor::<Autodiff<B>, 2>::from_data(TensorData::new(v.to_vec(), shape), &device)
        };
        let f3 = |v: &[f32], shape: [usize; 3]| {
            Tensor::<Autodiff<B>, 3>::from_data(TensorData::new(v.to_vec(), shape), &device)
        };
        let experts = RoutedExperts::<Autodiff<B>> {
            gate_up: Projection::stacked(Param::from_tensor(f3(
                &c.gate_up,
                [c.n_experts, c.d, 2 * c.i],
            ))),
            down: Projection::stacked(Param::from_tensor(f3(&c.down, [c.n_experts, c.i, c.d]))),
        };
        let x = f(&c.x, vec![c.tokens, c.d]).require_grad();
        let w = f(&c.w, vec![c.tokens, c.top_k]).require_grad();
        let ids = Tensor::<Autodiff<B>, 2, Int>::from_data(
            TensorData::new(
                c.ids.iter().map(|&e| e as i64).collect::<Vec<_>>(),
                [c.tokens, c.top_k],
            ),
            &device,
        );
        let y = experts.forward(x.clone(), ids, w.clone(), &ExecutionPolicy::default());
        let grads = (y.clone() * f(&c.dy, vec![c.tokens, c.d])).sum().backward();
        let host2 = |t: Tensor<B, 2>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        let host3 = |t: Tensor<B, 3>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
        [
            host2(y.inner()),
            host2(x.grad(&grads).unwrap()),
            host2(w.grad(&grads).unwrap()),
            host3(experts.gate_up.param().unwrap().grad(&grads).unwrap()),
            host3(experts.down.param().unwrap().grad(&grads).unwrap()),
        ]
    }

    /// [`run`] on the backend the switch picks, which installs the autodiff nodes itself.
    struct OnBackend(Case);

    impl BackendTask for OnBackend {
        type Output = [Vec<f32>; 5];
        fn run<B: Backend>(self, _devices: Vec<B::Device>) -> [Vec<f32>; 5] {
            run::<B>(&self.0)
        }
    }

    #[test]
    fn routed_experts_on_the_kernels_match_the_host_plan_forward_and_backward() {
        let mut rng = Rng(21);
        let (tokens, top_k, n_experts, d, i) = (29, 4, 16, 24, 8);
        // Experts 12..16 receive no tokens.
        let ids = rng.routing(tokens, top_k, 12);
        let mut v = |n: usize| (0..n).map(|_| rng.uniform()).collect::<Vec<f32>>();
        let c = Case {
            tokens,
            top_k,
            n_experts,
            d,
            i,
            ids,
            x: v(tokens * d),
            w: v(tokens * top_k),
            gate_up: v(n_experts * d * 2 * i),
            down: v(n_experts * i * d),
            dy: v(tokens * d),
        };
        let before = deepseek_core::moe::device_dispatches();
        // Through the backend switch, with no registration call of our own: the switch installs
        // the dispatch/combine autodiff nodes, and the device kernels run under autodiff.
        let gpu = run_on(DeviceKind::Wgpu, &[], OnBackend(c.clone())).unwrap();
        assert!(deepseek_core::autodiff_ops_installed::<Autodiff<Wgpu>>());
        assert!(
            deepseek_core::moe::device_dispatches() > before,
            "the wgpu run took the device kernels"
        );
        let cpu = run_on(DeviceKind::Flex, &[], OnBackend(c.clone())).unwrap();
        for (name, (a, b)) in
            ["y", "dx", "d gate weights", "d gate_up", "d down"].iter().zip(gpu.iter().zip(&cpu))
        {
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{name}: {worst} against {scale}");
        }
        // Idle experts get zero gradient, on both.
        let idle = 12 * d * 2 * i;
        assert!(gpu[3][idle..].iter().all(|&g| g == 0.0));
    }
}
