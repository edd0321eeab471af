//! Shared by the kernel tests: reproducible random data without a dependency.
#![allow(dead_code)]

/// SplitMix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    pub fn next(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[-0.5, 0.5)`.
    pub fn uniform(&mut self) -> f32 {
        self.next() - 0.5
    }

    /// Roughly normal values (a sum of four uniforms) with occasional outliers (×300), tiny
    /// values and exact zeros: what block quantization must survive.
    pub fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let base = (0..4).map(|_| self.next()).sum::<f32>() - 2.0;
                match (self.next() * 100.0) as u32 {
                    0 => base * 300.0,
                    1 => base * 1e-6,
                    2 => 0.0,
                    _ => base,
                }
            })
            .collect()
    }

    /// `[T, K]` distinct experts per token, drawn from the first `used` experts (the rest idle).
    pub fn routing(&mut self, tokens: usize, top_k: usize, used: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(tokens * top_k);
        for _ in 0..tokens {
            let mut chosen: Vec<u32> = Vec::new();
            while chosen.len() < top_k {
                let e = (self.next_u64() % used as u64) as u32;
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            ids.extend(chosen);
        }
        ids
    }
}
