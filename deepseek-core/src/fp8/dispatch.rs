//! Routes an FP8 operation on a generic Burn backend to the CubeCL kernels when the backend is one
//! of ours that runs them: `CubeBackend` or `Fusion<CubeBackend>` over wgpu or CUDA, with f32
//! floats. The model code stays generic over `B: Backend`; the match is on the concrete type at
//! run time (`TypeId`), so other backends (Flex) take the host path of the caller. Fusion tensors
//! are resolved to their device buffer (which flushes the pending fused operations) and the
//! kernel's output is registered back as a fusion tensor.

use std::any::{Any, TypeId};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorMetadata;
use burn_cubecl::{tensor::CubeTensor, BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::{stream::OperationStreams, Fusion, FusionBackend, FusionTensor, NoOp};
use burn_ir::{InitOperationIr, OperationIr, OperationOutput};

/// Moves a value whose concrete type the caller has checked with `TypeId`.
fn cast<T: 'static, U: 'static>(value: T) -> U {
    let boxed: Box<dyn Any> = Box::new(value);
    *boxed.downcast::<U>().expect("the caller compared TypeIds")
}

/// Runs `op` on the device buffer of `x` if `B` is `CubeBackend<R, f32, i32, BT>` or its fusion
/// wrapper; gives `x` back untouched otherwise.
fn on_runtime<B, R, BT>(
    x: FloatTensor<B>,
    op: &dyn Fn(CubeTensor<R>) -> CubeTensor<R>,
) -> Result<FloatTensor<B>, FloatTensor<B>>
where
    B: Backend,
    R: CubeRuntime,
    BT: BoolElement,
{
    type Cube<R, BT> = CubeBackend<R, f32, i32, BT>;
    if TypeId::of::<B>() == TypeId::of::<Cube<R, BT>>() {
        return Ok(cast(op(cast::<_, CubeTensor<R>>(x))));
    }
    if TypeId::of::<B>() == TypeId::of::<Fusion<Cube<R, BT>>>() {
        let fused: FusionTensor<<Cube<R, BT> as FusionBackend>::FusionRuntime> = cast(x);
        let inner = fused.client.clone().resolve_tensor_float::<Cube<R, BT>>(fused);
        return Ok(cast(register_fused::<Cube<R, BT>>(op(inner))));
    }
    Err(x)
}

/// A fusion tensor backed by an existing device buffer (as `Fusion::float_from_data` does).
pub(crate) fn register_fused<C: FusionBackend>(
    t: FloatTensor<C>,
) -> FusionTensor<C::FusionRuntime> {
    let device = C::float_device(&t);
    let client = burn_fusion::get_client::<C>(&device);
    let (shape, dtype) = (t.shape(), t.dtype());
    let handle = C::float_tensor_handle(t);
    let desc = InitOperationIr::create(shape, dtype, || client.register_tensor_handle(handle));
    client.register(OperationStreams::default(), OperationIr::Init(desc), NoOp::<C>::new()).output()
}

/// Runs `op` (written once per runtime by the caller) on whichever GPU runtime `B` uses.
macro_rules! each_runtime {
    ($x:expr, |$t:ident: $r:ident| $body:expr) => {{
        let x = $x;
        #[cfg(feature = "wgpu")]
        let x = {
            type $r = burn_wgpu::WgpuRuntime;
            match on_runtime::<B, $r, u32>(x, &|$t: CubeTensor<$r>| $body) {
                Ok(out) => return Some(out),
                Err(x) => x,
            }
        };
        #[cfg(feature = "cuda")]
        let x = {
            type $r = cubecl::cuda::CudaRuntime;
            match on_runtime::<B, $r, u8>(x, &|$t: CubeTensor<$r>| $body) {
                Ok(out) => return Some(out),
                Err(x) => x,
            }
        };
        drop(x);
        None
    }};
}

/// [`super::kernels::fake_quantize`] if `B` runs the kernels. `x` must be a 2-D f32 tensor whose
/// blocks are a multiple of 4 wide (checked by the caller).
pub(crate) fn fake_quantize<B: Backend>(
    x: &FloatTensor<B>,
    block: [usize; 2],
) -> Option<FloatTensor<B>> {
    each_runtime!(x.clone(), |t: R| super::kernels::fake_quantize(t, block)
        .expect("checked by the caller"))
}

/// Whether `B` is one of the backends [`fake_quantize`] runs the kernels on.
pub(crate) fn runs_kernels<B: Backend>() -> bool {
    fn is<B: 'static, R: CubeRuntime, BT: BoolElement>() -> bool {
        let id = TypeId::of::<B>();
        id == TypeId::of::<CubeBackend<R, f32, i32, BT>>()
            || id == TypeId::of::<Fusion<CubeBackend<R, f32, i32, BT>>>()
    }
    #[cfg(feature = "wgpu")]
    if is::<B, burn_wgpu::WgpuRuntime, u32>() {
        return true;
    }
    #[cfg(feature = "cuda")]
    if is::<B, cubecl::cuda::CudaRuntime, u8>() {
        return true;
    }
    false
}

/// `x · Wᵀ` through the FP8 kernels (`x` quantized here in 1 × 128 tiles, `W` `[n, k]` given as
/// packed codes and 128 × 128 block scales), if `B` runs them.
pub(crate) fn fp8_linear<B: Backend>(
    x: &FloatTensor<B>,
    codes: &burn::tensor::ops::IntTensor<B>,
    scales: &FloatTensor<B>,
    weight: [usize; 2],
) -> Option<FloatTensor<B>> {
    #[cfg(feature = "wgpu")]
    if let Some(out) = linear_on::<B, burn_wgpu::WgpuRuntime, u32>(x, codes, scales, weight) {
        return Some(out);
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = linear_on::<B, cubecl::cuda::CudaRuntime, u8>(x, codes, scales, weight) {
        return Some(out);
    }
    None
}

fn linear_on<B, R, BT>(
    x: &FloatTensor<B>,
    codes: &burn::tensor::ops::IntTensor<B>,
    scales: &FloatTensor<B>,
    weight: [usize; 2],
) -> Option<FloatTensor<B>>
where
    B: Backend,
    R: CubeRuntime,
    BT: BoolElement,
{
    type Cube<R, BT> = CubeBackend<R, f32, i32, BT>;
    let run = |x: CubeTensor<R>, codes: CubeTensor<R>, scales: CubeTensor<R>| {
        let a = super::kernels::quantize(x, super::ACTIVATION_BLOCK, super::ScaleFormat::F32)
            .expect("checked by the caller");
        let b = super::kernels::DeviceFp8 {
            codes,
            scales,
            rows: weight[0],
            cols: weight[1],
            block: super::WEIGHT_BLOCK,
        };
        super::kernels::gemm(&a, &b).expect("checked by the caller")
    };
    if TypeId::of::<B>() == TypeId::of::<Cube<R, BT>>() {
        return Some(cast(run(cast(x.clone()), cast(codes.clone()), cast(scales.clone()))));
    }
    if TypeId::of::<B>() == TypeId::of::<Fusion<Cube<R, BT>>>() {
        type Fused<R, BT> = FusionTensor<<Cube<R, BT> as FusionBackend>::FusionRuntime>;
        let x: Fused<R, BT> = cast(x.clone());
        let client = x.client.clone();
        let x = client.resolve_tensor_float::<Cube<R, BT>>(x);
        let codes =
            client.resolve_tensor_int::<Cube<R, BT>>(cast::<_, Fused<R, BT>>(codes.clone()));
        let scales =
            client.resolve_tensor_float::<Cube<R, BT>>(cast::<_, Fused<R, BT>>(scales.clone()));
        return Some(cast(register_fused::<Cube<R, BT>>(run(x, codes, scales))));
    }
    None
}
