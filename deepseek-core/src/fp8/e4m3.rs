//! OCP FP8 E4M3FN (`float8_e4m3fn`): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; no
//! infinities; `0x7F`/`0xFF` are NaN; the largest finite value is ±448 (`0x7E`), the smallest
//! subnormal 2⁻⁹. Conversion from f32 rounds to nearest, ties to even, and saturates: every
//! magnitude of 448 or more, infinities included, becomes ±448; NaN keeps its sign. This is
//! PyTorch's conversion bit for bit (golden values in `tests/golden/fp8/`).

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// [`decode`] of every code, indexed by the code, with the two NaN codes (which the loaders
/// refuse) as 0: the lookup table of the dequantization paths.
pub fn decode_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|c| if c & 0x7F == 0x7F { 0.0 } else { decode(c as u8) })
    })
}

/// The value of an E4M3 code.
pub fn decode(code: u8) -> f32 {
    let negative = code & 0x80 != 0;
    let exponent = (code >> 3) & 0x0F;
    let mantissa = (code & 0x07) as f32;
    let magnitude = match (exponent, code & 0x07) {
        (0x0F, 0x07) => f32::NAN,
        // Subnormal: m/8 · 2^(1 − 7).
        (0, _) => mantissa * (1.0 / 512.0),
        (e, _) => (1.0 + mantissa / 8.0) * f32::powi(2.0, e as i32 - 7),
    };
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// The E4M3 code nearest to `x` (ties to even), saturating at ±448.
pub fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7F;
    }
    let magnitude = bits & 0x7FFF_FFFF;
    if f32::from_bits(magnitude) >= E4M3_MAX {
        return sign | 0x7E;
    }
    let code = if magnitude < (121 << 23) {
        // Below 2⁻⁶, the smallest normal: 2¹⁴ has an f32 ulp of 2⁻⁹, the subnormal step, so
        // adding it rounds x to a multiple of 2⁻⁹ (ties to even, by the FPU) and the low bits of
        // the sum count those steps: the code (8 steps carry into the smallest normal, 0x08).
        let align = 141u32 << 23; // 2¹⁴
        (f32::from_bits(magnitude) + f32::from_bits(align)).to_bits() - align
    } else {
        // Re-bias the exponent (127 → 7) and round the 20 dropped mantissa bits to even.
        let odd = (magnitude >> 20) & 1;
        (magnitude.wrapping_add(((7i32 - 127) as u32) << 23).wrapping_add(0x7FFFF) + odd) >> 20
    };
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finite_code_round_trips() {
        for code in 0..=255u8 {
            let v = decode(code);
            if code & 0x7F == 0x7F {
                assert!(v.is_nan(), "{code:#04x}");
                assert_eq!(encode(v), code);
            } else {
                assert_eq!(encode(v), code, "{code:#04x} = {v}");
            }
        }
        assert_eq!(decode(0x7E), 448.0);
        assert_eq!(decode(0x01), 2f32.powi(-9));
        assert_eq!(decode(0x08), 2f32.powi(-6));
    }

    #[test]
    fn rounding_and_saturation() {
        assert_eq!(encode(449.0), 0x7E);
        assert_eq!(encode(f32::INFINITY), 0x7E);
        assert_eq!(encode(f32::NEG_INFINITY), 0xFE);
        assert_eq!(encode(1.0 + 1.0 / 16.0), encode(1.0), "a tie rounds to the even mantissa");
        assert_eq!(encode(1.0 + 3.0 / 16.0), encode(1.25), "a tie rounds to the even mantissa");
        assert_eq!(encode(2f32.powi(-10)), 0x00, "half the smallest subnormal rounds to zero");
        assert_eq!(encode(-0.0), 0x80);
    }
}
