//! Small helpers shared by this crate's CubeCL kernels (`fp8::kernels`, `moe::kernels`): device
//! buffers of 32-bit elements, array arguments, launch grids, and host transfers.

use burn::tensor::{DType, Shape};
use burn_cubecl::{tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

/// An uninitialized contiguous tensor of 32-bit elements on `like`'s device.
pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: &[usize],
    dtype: DType,
) -> CubeTensor<R> {
    let n: usize = shape.iter().product();
    let handle = like.client.empty((n * 4).max(4));
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        Shape::from(shape.to_vec()),
        handle,
        dtype,
    )
}

/// A contiguous tensor as a flat kernel array.
pub(crate) fn array<R: CubeRuntime>(t: &CubeTensor<R>) -> ArrayArg<R> {
    unsafe { ArrayArg::from_raw_parts(t.handle.clone(), t.meta.shape().num_elements().max(1)) }
}

/// `cubes` cubes of a 1-D launch, spread over two grid dimensions (each at most 65535); kernels
/// read their linear index as `CUBE_POS_Y · CUBE_COUNT_X + CUBE_POS_X`.
pub(crate) fn grid(cubes: usize) -> CubeCount {
    let cubes = cubes.max(1) as u32;
    let x = cubes.min(65_535);
    CubeCount::Static(x, cubes.div_ceil(x), 1)
}

/// Uploads row-major 32-bit `values` of `shape` to `device` as a tensor of `dtype`.
pub fn upload<R: CubeRuntime, T: bytemuck::Pod>(
    device: &R::Device,
    values: &[T],
    shape: &[usize],
    dtype: DType,
) -> CubeTensor<R> {
    assert_eq!(std::mem::size_of::<T>(), 4, "32-bit elements");
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "values must fill the shape {shape:?}"
    );
    let client = R::client(device);
    let handle = client.create_from_slice(bytemuck::cast_slice(values));
    CubeTensor::new_contiguous(client, device.clone(), Shape::from(shape.to_vec()), handle, dtype)
}

/// Reads a contiguous 32-bit tensor back (f32 or u32 words), blocking.
pub fn download<R: CubeRuntime, T: bytemuck::Pod>(t: &CubeTensor<R>) -> Vec<T> {
    let n = t.meta.shape().num_elements();
    let bytes = t.client.read_one_unchecked(t.handle.clone());
    bytemuck::cast_slice::<u8, T>(&bytes[..n * 4]).to_vec()
}
