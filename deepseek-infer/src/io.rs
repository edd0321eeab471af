//! Reading and writing the small safetensors files of `deepseek logits`: `input_ids` in,
//! `logits` out. Writes are atomic (temporary file, then rename).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Reads the I64 (or I32) tensor `name` of shape `[batch, seq]` from a safetensors file.
pub fn read_ids(path: &Path, name: &str) -> Result<(Vec<i64>, [usize; 2])> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let view = st.tensor(name).with_context(|| {
        format!("{} has no tensor `{name}` (found: {})", path.display(), st.names().join(", "))
    })?;
    let shape = view.shape();
    let [batch, seq] = shape else {
        bail!("`{name}` in {} must be 2-D [batch, seq], got shape {shape:?}", path.display());
    };
    let data = view.data();
    let ids = match view.dtype() {
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
            .collect(),
        other => bail!("`{name}` in {} must be I64 (or I32), got {other:?}", path.display()),
    };
    Ok((ids, [*batch, *seq]))
}

/// Writes F32 tensors to `path` atomically: a crash never leaves a half-written file behind.
pub fn write_f32(path: &Path, tensors: &[(&str, &[f32], Vec<usize>)]) -> Result<()> {
    let mut views = HashMap::new();
    for (name, values, shape) in tensors {
        let bytes: &[u8] = bytemuck_f32(values);
        views.insert(name.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytes)?);
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    safetensors::serialize_to_file(views, None, tmp.path())
        .context("cannot serialize safetensors")?;
    tmp.persist(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn bytemuck_f32(values: &[f32]) -> &[u8] {
    // f32 has no padding and any byte pattern is a valid u8; little-endian hosts only, as
    // safetensors stores little-endian.
    #[cfg(target_endian = "big")]
    compile_error!("safetensors output assumes a little-endian host");
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}
