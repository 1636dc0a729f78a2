//! CPU kernels for the layers candle runs slowly: depthwise convolution,
//! 1x1 convolutions and (for the detector) 3x3 convolutions by Winograd's
//! algorithm over NHWC activations, with bias, activation and residual adds
//! fused into the pass that produces the output.
//!
//! The per-layer operations (`dense`, `depthwise`, `pointwise`) split their
//! work with rayon, so they run on the pool the caller installed (the
//! server's inference pool). `packed_gemm` and the depthwise row functions
//! run on the calling thread: the fused network splits the work itself.
//! `isa` picks the instruction set they use. On CUDA the depthwise
//! convolution has a kernel of its own (`depthwise_cuda`); the other layers
//! use candle's CUDA operations.

pub mod dense;
pub mod depthwise;
#[cfg(feature = "cuda")]
pub mod depthwise_cuda;
pub mod epilogue;
pub mod isa;
pub mod packed_gemm;
pub mod pointwise;
pub mod winograd;

/// `lhs [m, k] x rhs [k, n]`, both row-major, into a new row-major vector,
/// split over the current rayon pool. The output is written once, never
/// zeroed first.
fn gemm_into_new(lhs: &[f32], rhs: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(
        k > 0 && lhs.len() == m * k && rhs.len() == k * n,
        "gemm: [{m}, {k}] x [{k}, {n}] does not match buffers of {} and {}",
        lhs.len(),
        rhs.len()
    );
    let mut out = Vec::<f32>::with_capacity(m * n);
    let (cols, k_stride) = (n as isize, k as isize);
    // SAFETY: the assert above bounds every read of `lhs` and `rhs`; `out` has
    // room for m x n values, and with `read_dst` false gemm reads none of them
    // and writes every one (k > 0), so all are initialised before `set_len`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            cols,
            false,
            lhs.as_ptr(),
            1,
            k_stride,
            rhs.as_ptr(),
            1,
            cols,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
        out.set_len(m * n);
    }
    out
}

/// TensorFlow "same" padding for one spatial dimension: the output is
/// ceil(size / stride) and any odd padding goes after, not before.
pub fn same_padding(size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(size);
    (total / 2, total - total / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        assert_eq!(same_padding(224, 3, 2), (0, 1));
        assert_eq!(same_padding(112, 5, 2), (1, 2));
        assert_eq!(same_padding(56, 3, 1), (1, 1));
        assert_eq!(same_padding(14, 5, 1), (2, 2));
        // Odd sizes pad symmetrically for stride 2 with a 3x3 kernel.
        assert_eq!(same_padding(7, 3, 2), (1, 1));
    }
}
