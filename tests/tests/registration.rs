//! The custom autodiff operations (FP8 backward, device MoE dispatch/combine, expert-parallel
//! all-to-all) are found per backend type at run time. Training on an autodiff backend whose
//! operations were never installed fails loudly, naming the call to make, instead of going on
//! with straight-through FP8 gradients or another MoE path; the backend switch installs them.
//!
//! One test in its own binary (its own process): nothing else here installs anything for
//! `Autodiff<Flex>` first.

use std::panic::{catch_unwind, AssertUnwindSafe};

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use deepseek_core::device::{run_on, BackendTask, DeviceKind};
use deepseek_core::fp8::training;
use deepseek_core::moe::RoutedExpertsConfig;
use deepseek_core::ExecutionPolicy;

type AB = Autodiff<Flex>;

/// `Σ experts(x)` with the gradient of `x`, on `Autodiff<B>`.
fn routed_experts_step<B: Backend>() -> Vec<f32> {
    let device = Default::default();
    let experts = RoutedExpertsConfig::new(8, 4, 4).init::<Autodiff<B>>(&device);
    let x = Tensor::<Autodiff<B>, 2>::ones([3, 8], &device).require_grad();
    let ids = Tensor::<Autodiff<B>, 2, Int>::from_data(
        TensorData::new(vec![0i64, 1, 2, 3, 1, 0], [3, 2]),
        &device,
    );
    let w = Tensor::<Autodiff<B>, 2>::ones([3, 2], &device);
    let grads = experts.forward(x.clone(), ids, w, &ExecutionPolicy::default()).sum().backward();
    x.grad(&grads).expect("dx").into_data().convert::<f32>().into_vec().unwrap()
}

/// An FP8 training GEMM with the gradient of its weight, on `Autodiff<B>`.
fn fp8_step<B: Backend>() -> Vec<f32> {
    let device = Default::default();
    let x = Tensor::<Autodiff<B>, 2>::ones([2, 128], &device);
    let w = Tensor::<Autodiff<B>, 2>::ones([128, 4], &device).require_grad();
    let grads = training::matmul(x, w.clone()).sum().backward();
    w.grad(&grads).expect("dW").into_data().convert::<f32>().into_vec().unwrap()
}

fn panic_message(run: impl FnOnce() -> Vec<f32>) -> String {
    let panic = catch_unwind(AssertUnwindSafe(run))
        .expect_err("an autodiff backend without its operations must not train");
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

struct Steps;

impl BackendTask for Steps {
    type Output = (Vec<f32>, Vec<f32>);
    fn run<B: Backend>(self, _devices: Vec<B::Device>) -> (Vec<f32>, Vec<f32>) {
        (routed_experts_step::<B>(), fp8_step::<B>())
    }
}

#[test]
fn missing_custom_operations_fail_loudly_and_the_backend_switch_installs_them() {
    assert!(!deepseek_core::autodiff_ops_installed::<AB>());
    for (what, message) in [
        ("the routed experts", panic_message(routed_experts_step::<Flex>)),
        ("the FP8 GEMM", panic_message(fp8_step::<Flex>)),
    ] {
        assert!(message.contains(what), "names what failed: {message}");
        assert!(
            message.contains("deepseek_core::register_autodiff::<Inner>()"),
            "names the missing call: {message}"
        );
    }

    // The same steps through the backend switch: installed, and they train.
    let (dx, dw) = run_on(DeviceKind::Flex, &[], Steps).unwrap();
    assert!(deepseek_core::autodiff_ops_installed::<AB>());
    assert!(training::has_autodiff_node::<AB>());
    // dx of Σ_t Σ_k w·expert(x_t) is finite and nonzero; dW of Σ x·W with x = 1: every entry of
    // the quantized Wgrad is Q(1)·Q(1) summed over 2 rows = 2 (1 is exact in E4M3).
    assert!(dx.iter().all(|v| v.is_finite()) && dx.iter().any(|&v| v != 0.0));
    assert!(dw.iter().all(|&v| v == 2.0), "{dw:?}");
}
