//! CPU kernels for the layers candle runs slowly: depthwise convolution and
//! 1x1 convolutions over NHWC activations, with bias, ReLU6 and residual adds
//! fused into the pass that produces the output.
//!
//! All of them split their work with rayon, so they run on the pool the
//! caller installed (the server's inference pool). On other devices they fall
//! back to candle's own operations.

pub mod depthwise;
pub mod epilogue;
pub mod pointwise;

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
