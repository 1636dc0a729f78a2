//! Depthwise convolution over NHWC activations with TensorFlow "same"
//! padding, bias and optional ReLU6 fused.
//!
//! candle runs a grouped convolution as one convolution per channel; here
//! each output pixel is one pass over its k x k taps with the channels as the
//! vector dimension, so every load is contiguous whatever the stride, and the
//! accumulators stay in registers until the activated result is stored.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::isa::Isa;
use super::same_padding;

/// Channels per register-resident accumulator block: four AVX registers (or
/// eight SSE ones), enough independent chains to hide the FMA latency.
const WIDE: usize = 32;
/// Block for the channels left over after the wide blocks.
const NARROW: usize = 8;
/// Largest kernel side the tap buffer holds.
const MAX_KERNEL: usize = 7;

/// A depthwise convolution with its (folded) bias, TF-"same" padded.
#[derive(Debug, Clone)]
pub struct Depthwise {
    /// `[C, 1, k, k]` as loaded, for devices other than the CPU.
    weight: Tensor,
    bias: Tensor,
    /// `[k, k, C]`: each tap's weights are contiguous over channels.
    taps: Vec<f32>,
    bias_cpu: Vec<f32>,
    channels: usize,
    kernel: usize,
    stride: usize,
    relu6: bool,
}

impl Depthwise {
    /// Weight `[C, 1, k, k]`, bias `[C]`; `relu6` clamps the output to [0, 6].
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, relu6: bool) -> Result<Self> {
        let (channels, one, kernel, kw) = weight.dims4()?;
        if one != 1 || kernel != kw || kernel == 0 || kernel > MAX_KERNEL || stride == 0 {
            bail!(
                "depthwise: unsupported weight shape {:?} with stride {stride}",
                weight.dims()
            );
        }
        let weight = weight.to_dtype(DType::F32)?;
        let bias = bias.flatten_all()?.to_dtype(DType::F32)?;
        if bias.dims() != [channels] {
            bail!(
                "depthwise: bias shape {:?}, expected [{channels}]",
                bias.dims()
            );
        }
        let taps = weight
            .squeeze(1)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1()?;
        let bias_cpu = bias.to_vec1()?;
        Ok(Self {
            weight,
            bias,
            taps,
            bias_cpu,
            channels,
            kernel,
            stride,
            relu6,
        })
    }

    /// `[N, H, W, C]` in, `[N, ceil(H/s), ceil(W/s), C]` out.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1_no_bwd(self);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let op = super::depthwise_cuda::DepthwiseCuda {
                kernel: self.kernel,
                stride: self.stride,
                relu6: self.relu6,
            };
            // The kernel computes in f32 whatever the model's dtype: a cast each way is cheap next to the
            // convolution, and the taps sum without rounding to half precision.
            return x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op)?
                .to_dtype(x.dtype());
        }
        self.forward_with_candle(x)
    }

    /// The same convolution from candle's grouped conv2d, for other devices.
    fn forward_with_candle(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let (top, bottom) = same_padding(h, self.kernel, self.stride);
        let (left, right) = same_padding(w, self.kernel, self.stride);
        let y = x
            .permute((0, 3, 1, 2))?
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?
            .conv2d(
                &self.weight.to_device(x.device())?.to_dtype(x.dtype())?,
                0,
                self.stride,
                1,
                self.channels,
            )?
            .permute((0, 2, 3, 1))?
            .broadcast_add(&self.bias.to_device(x.device())?.to_dtype(x.dtype())?)?;
        if self.relu6 {
            y.clamp(0f32, 6f32)
        } else {
            Ok(y)
        }
    }
}

impl Depthwise {
    /// The convolution of contiguous NHWC `x`, one rayon task per output row.
    fn run(&self, x: &[f32], (n, h, w): (usize, usize, usize), row_fn: RowFn) -> Vec<f32> {
        let c = self.channels;
        let (rows, cols) = (
            Axis::new(h, self.kernel, self.stride),
            Axis::new(w, self.kernel, self.stride),
        );
        let len = n * rows.out * cols.out * c;
        // Every element is written below, so the output is not zeroed first:
        // at batch 8 that would be another pass over tens of megabytes.
        let mut out = Vec::<f32>::with_capacity(len);
        if len == 0 {
            return out;
        }
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(cols.out * c)
            .enumerate()
            .for_each(|(r, out_row)| {
                let (img, oy) = (r / rows.out, r % rows.out);
                let (lo, hi, start) = rows.window(oy, self.kernel, self.stride);
                let image = &x[img * h * w * c..(img + 1) * h * w * c];
                // Only the input rows this output row reads, with the kernel
                // rows that read them.
                let first = start + lo - rows.pad_before;
                let last = start + hi - rows.pad_before;
                let args = RowArgs {
                    image: &image[first * w * c..last * w * c],
                    taps: &self.taps[lo * self.kernel * c..hi * self.kernel * c],
                    bias: &self.bias_cpu,
                    channels: c,
                    tap_stride: c,
                    width: w,
                    kernel: self.kernel,
                    stride: self.stride,
                    relu6: self.relu6,
                };
                row_fn(&args, cols, hi - lo, out_row);
            });
        // SAFETY: the rows above cover all `len` elements, and `row` stores
        // every channel of every output pixel of its row.
        unsafe { out.set_len(len) };
        out
    }
}

/// Where the kernel window of one output row or column falls in the input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Axis {
    size: usize,
    pub(crate) out: usize,
    pub(crate) pad_before: usize,
}

impl Axis {
    pub(crate) fn new(size: usize, kernel: usize, stride: usize) -> Self {
        Self {
            size,
            out: size.div_ceil(stride),
            pad_before: same_padding(size, kernel, stride).0,
        }
    }

    /// Kernel indices `[lo, hi)` that land inside the input for output `o`,
    /// and the input index kernel index 0 maps to (may be "negative", so
    /// returned as the index plus `pad_before`).
    pub(crate) fn window(&self, o: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
        let start = o * stride; // input index + pad_before of tap 0
        let lo = self.pad_before.saturating_sub(start);
        let hi = kernel.min(self.size + self.pad_before - start);
        (lo, hi, start)
    }
}

/// One output row's worth of work, shared by the SIMD variants.
pub(crate) struct RowArgs<'a> {
    /// The input rows the output row reads, `channels` values a pixel.
    pub(crate) image: &'a [f32],
    /// `[k, k, tap_stride]` from the first kernel row used and the first channel computed.
    pub(crate) taps: &'a [f32],
    /// From the first channel computed.
    pub(crate) bias: &'a [f32],
    pub(crate) channels: usize,
    /// Distance between two taps' weights: the layer's channel count, which a
    /// caller computing only some of the channels does not change.
    pub(crate) tap_stride: usize,
    pub(crate) width: usize,
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) relu6: bool,
}

pub(crate) type RowFn = fn(&RowArgs<'_>, Axis, usize, &mut [MaybeUninit<f32>]);

impl CustomOp1 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("depthwise: f32 input only")
        };
        let (n, h, w, c) = layout.shape().dims4()?;
        if c != self.channels {
            bail!(
                "depthwise: input has {c} channels, weights {}",
                self.channels
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("depthwise: input must be contiguous NHWC")
        };
        let out = self.run(&data[start..end], (n, h, w), row_fn());
        let (ho, wo) = (h.div_ceil(self.stride), w.div_ceil(self.stride));
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c))))
    }
}

/// Picks the widest instruction set this CPU has; the binary itself is built
/// for the baseline target so it runs everywhere.
fn row_fn() -> RowFn {
    row_fn_for(Isa::detect())
}

/// The row variant for `isa`, which the caller has checked this CPU runs.
pub(crate) fn row_fn_for(isa: Isa) -> RowFn {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => row_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => row_avx2_fma,
        _ => row_portable,
    }
}

#[cfg(target_arch = "x86_64")]
fn row_avx512(args: &RowArgs<'_>, cols: Axis, kernel_rows: usize, out: &mut [MaybeUninit<f32>]) {
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn inner(
        args: &RowArgs<'_>,
        cols: Axis,
        kernel_rows: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        // The network's kernels get the variant that keeps the weights in
        // registers; anything else the generic one.
        if unsafe { simd::dispatch::<simd::Avx512>(args, cols, kernel_rows, out) }.is_none() {
            row::<true>(args, cols, kernel_rows, out);
        }
    }
    // SAFETY: only selected by `row_fn` after detecting AVX-512F and FMA; AVX2
    // comes with AVX-512F.
    unsafe { inner(args, cols, kernel_rows, out) }
}

/// One output row, one vector of channels at a time: the block's k x k
/// weight vectors are loaded into registers once and used for the whole row,
/// so each multiply-add loads only its input, half the loads of the generic
/// variant, which is bound by them. Generic over the vector width; the
/// callers compile it with the instruction set of their vector type.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Axis, RowArgs};

    /// The few vector operations the row needs, with a lane mask for the
    /// channels left over at the end.
    pub(super) trait Vector: Copy {
        const LANES: usize;
        type Mask: Copy;
        fn mask(lanes: usize) -> Self::Mask;
        fn zero() -> Self;
        /// # Safety
        /// The masked lanes of `p` must be readable.
        unsafe fn load(m: Self::Mask, p: *const f32) -> Self;
        /// # Safety
        /// Every lane of `p` must be readable.
        unsafe fn load_all(p: *const f32) -> Self;
        /// # Safety
        /// The masked lanes of `p` must be writable.
        unsafe fn store(self, m: Self::Mask, p: *mut f32);
        /// # Safety
        /// Every lane of `p` must be writable.
        unsafe fn store_all(self, p: *mut f32);
        fn fma(x: Self, w: Self, acc: Self) -> Self;
        fn add(x: Self, y: Self) -> Self;
        fn relu6(self) -> Self;
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    // SAFETY (every impl below): used only from functions compiled with the
    // vector's instruction set, which the caller detected.
    impl Vector for Avx512 {
        const LANES: usize = 16;
        type Mask = __mmask16;
        #[inline(always)]
        fn mask(lanes: usize) -> __mmask16 {
            if lanes >= 16 { !0 } else { (1u16 << lanes) - 1 }
        }
        #[inline(always)]
        fn zero() -> Self {
            Self(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(m: __mmask16, p: *const f32) -> Self {
            Self(unsafe { _mm512_maskz_loadu_ps(m, p) })
        }
        #[inline(always)]
        unsafe fn store(self, m: __mmask16, p: *mut f32) {
            unsafe { _mm512_mask_storeu_ps(p, m, self.0) }
        }
        #[inline(always)]
        unsafe fn load_all(p: *const f32) -> Self {
            Self(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store_all(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn fma(x: Self, w: Self, acc: Self) -> Self {
            Self(unsafe { _mm512_fmadd_ps(x.0, w.0, acc.0) })
        }
        #[inline(always)]
        fn add(x: Self, y: Self) -> Self {
            Self(unsafe { _mm512_add_ps(x.0, y.0) })
        }
        #[inline(always)]
        fn relu6(self) -> Self {
            Self(unsafe {
                _mm512_min_ps(
                    _mm512_max_ps(self.0, _mm512_setzero_ps()),
                    _mm512_set1_ps(6.0),
                )
            })
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256);

    impl Vector for Avx2 {
        const LANES: usize = 8;
        type Mask = __m256i;
        #[inline(always)]
        fn mask(lanes: usize) -> __m256i {
            let l = lanes.min(8) as i32;
            unsafe {
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(l),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                )
            }
        }
        #[inline(always)]
        fn zero() -> Self {
            Self(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(m: __m256i, p: *const f32) -> Self {
            Self(unsafe { _mm256_maskload_ps(p, m) })
        }
        #[inline(always)]
        unsafe fn store(self, m: __m256i, p: *mut f32) {
            unsafe { _mm256_maskstore_ps(p, m, self.0) }
        }
        #[inline(always)]
        unsafe fn load_all(p: *const f32) -> Self {
            Self(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store_all(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        fn fma(x: Self, w: Self, acc: Self) -> Self {
            Self(unsafe { _mm256_fmadd_ps(x.0, w.0, acc.0) })
        }
        #[inline(always)]
        fn add(x: Self, y: Self) -> Self {
            Self(unsafe { _mm256_add_ps(x.0, y.0) })
        }
        #[inline(always)]
        fn relu6(self) -> Self {
            Self(unsafe {
                _mm256_min_ps(
                    _mm256_max_ps(self.0, _mm256_setzero_ps()),
                    _mm256_set1_ps(6.0),
                )
            })
        }
    }

    /// # Safety
    /// The CPU must run `V`'s instructions, and this must be inlined into a
    /// function compiled for them; `args` must describe the rows `out` reads
    /// (as the generic variant requires).
    #[inline(always)]
    pub(super) unsafe fn row<V: Vector, const K: usize, const S: usize>(
        args: &RowArgs<'_>,
        cols: Axis,
        kernel_rows: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let c = args.channels;
        let wo = out.len() / c;
        assert!(
            kernel_rows <= K
                && args.image.len() >= kernel_rows * args.width * c
                && args.taps.len() >= ((kernel_rows - 1) * K + K - 1) * args.tap_stride + c
                && args.bias.len() >= c
                && cols.out == wo,
            "depthwise row: buffers do not match the shapes"
        );
        // Output columns whose taps all fall inside the row.
        let first = cols.pad_before.div_ceil(S);
        let last = match (args.width + cols.pad_before).checked_sub(K) {
            Some(room) => (room / S + 1).min(wo),
            None => 0,
        };
        let out = out.as_mut_ptr().cast::<f32>();
        let mut ch = 0;
        while ch < c {
            // SAFETY: as this function's; `ch` is below the channel count.
            unsafe {
                // Every channel count of the network is a multiple of the lanes, so the masked form, slow on
                // some CPUs (AVX2's masked store on AMD's), only runs for other models' odd channels.
                if c - ch >= V::LANES {
                    channels::<V, K, S, true>(args, cols, kernel_rows, (first, last), ch, out);
                } else {
                    channels::<V, K, S, false>(args, cols, kernel_rows, (first, last), ch, out);
                }
            }
            ch += V::LANES;
        }
    }

    /// One vector of channels from `ch` across the output row: the pixels whose taps all fall inside the row,
    /// `interior`, four at a time, the others one by one with their taps checked. `ALL`: every lane is a
    /// channel, so loads and stores need no mask.
    ///
    /// # Safety
    /// As [`row`]'s, which checked the buffers; `interior` is the range it computed.
    #[inline(always)]
    unsafe fn channels<V: Vector, const K: usize, const S: usize, const ALL: bool>(
        args: &RowArgs<'_>,
        cols: Axis,
        kernel_rows: usize,
        (first, last): (usize, usize),
        ch: usize,
        out: *mut f32,
    ) {
        let (c, wo) = (args.channels, cols.out);
        let (image, taps, bias) = (args.image.as_ptr(), args.taps.as_ptr(), args.bias.as_ptr());
        let mask = V::mask(c - ch);
        // Macros, not closures: a closure would be a function of its own without the caller's instruction set,
        // and every vector operation in it a call.
        macro_rules! load {
            ($p:expr) => {
                if ALL {
                    unsafe { V::load_all($p) }
                } else {
                    unsafe { V::load(mask, $p) }
                }
            };
        }
        macro_rules! store {
            ($v:expr, $p:expr) => {
                if ALL {
                    unsafe { $v.store_all($p) }
                } else {
                    unsafe { $v.store(mask, $p) }
                }
            };
        }
        // SAFETY (loads and stores below): the caller's checks bound every tap, input pixel (kx within the
        // row, ky below kernel_rows) and output pixel, and the mask stops at the last channel.
        let mut w = [V::zero(); 25];
        for ky in 0..K {
            if ky < kernel_rows {
                for kx in 0..K {
                    w[ky * K + kx] = load!(taps.add((ky * K + kx) * args.tap_stride + ch));
                }
            }
        }
        let b = load!(bias.add(ch));
        // Pixels one at a time (the edges, and rows too narrow for a block of four, as every row of the 7x7
        // stages is at 5x5): a sum for each kernel row, so that the multiply-adds form K short chains instead
        // of one long one whose latency, not the multipliers, would set the pace.
        macro_rules! pixels {
            ($range:expr, $checked:expr) => {
                for ox in $range {
                    let start = ox * S;
                    let mut sums = [V::zero(); K];
                    sums[0] = b;
                    for (ky, sum) in sums.iter_mut().enumerate() {
                        if ky >= kernel_rows {
                            break;
                        }
                        for kx in 0..K {
                            let ix = start + kx;
                            if $checked
                                && (ix < cols.pad_before || ix - cols.pad_before >= args.width)
                            {
                                continue;
                            }
                            let at = (ky * args.width + ix - cols.pad_before) * c + ch;
                            *sum = V::fma(load!(image.add(at)), w[ky * K + kx], *sum);
                        }
                    }
                    let mut acc = sums[0];
                    for &sum in &sums[1..] {
                        acc = V::add(acc, sum);
                    }
                    if args.relu6 {
                        acc = acc.relu6();
                    }
                    store!(acc, out.add(ox * c + ch));
                }
            };
        }
        pixels!(0..first.min(wo), true);
        // Four pixels at a time: four independent sums hide the latency of the multiply-adds, which one sum
        // chains, and neighbouring pixels share input columns, each loaded once per kernel row.
        const BLOCK: usize = 4;
        let mut ox = first;
        while ox + BLOCK <= last {
            let mut acc = [b; BLOCK];
            for ky in 0..K {
                if ky >= kernel_rows {
                    break;
                }
                // Tap 0 of pixel `ox`, inside the row because `ox` is an interior pixel.
                let row = image.wrapping_add((ky * args.width + ox * S - cols.pad_before) * c + ch);
                for ix in 0..K + (BLOCK - 1) * S {
                    let x = load!(row.add(ix * c));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        if ix >= j * S && ix - j * S < K {
                            *acc = V::fma(x, w[ky * K + ix - j * S], *acc);
                        }
                    }
                }
            }
            for (j, mut acc) in acc.into_iter().enumerate() {
                if args.relu6 {
                    acc = acc.relu6();
                }
                store!(acc, out.add((ox + j) * c + ch));
            }
            ox += BLOCK;
        }
        pixels!(ox.min(last)..last, false);
        pixels!(last.max(first)..wo, true);
    }

    /// The specialised row for the network's kernel sizes and strides, or
    /// `None` for any other.
    #[inline(always)]
    pub(super) unsafe fn dispatch<V: Vector>(
        args: &RowArgs<'_>,
        cols: Axis,
        kernel_rows: usize,
        out: &mut [MaybeUninit<f32>],
    ) -> Option<()> {
        unsafe {
            match (args.kernel, args.stride) {
                (3, 1) => row::<V, 3, 1>(args, cols, kernel_rows, out),
                (3, 2) => row::<V, 3, 2>(args, cols, kernel_rows, out),
                (5, 1) => row::<V, 5, 1>(args, cols, kernel_rows, out),
                (5, 2) => row::<V, 5, 2>(args, cols, kernel_rows, out),
                _ => return None,
            }
        }
        Some(())
    }
}

#[cfg(target_arch = "x86_64")]
fn row_avx2_fma(args: &RowArgs<'_>, cols: Axis, kernel_rows: usize, out: &mut [MaybeUninit<f32>]) {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn inner(
        args: &RowArgs<'_>,
        cols: Axis,
        kernel_rows: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        if unsafe { simd::dispatch::<simd::Avx2>(args, cols, kernel_rows, out) }.is_none() {
            row::<true>(args, cols, kernel_rows, out);
        }
    }
    // SAFETY: only selected by `row_fn` after detecting AVX2 and FMA.
    unsafe { inner(args, cols, kernel_rows, out) }
}

fn row_portable(args: &RowArgs<'_>, cols: Axis, kernel_rows: usize, out: &mut [MaybeUninit<f32>]) {
    row::<false>(args, cols, kernel_rows, out);
}

/// Computes one output row. Inlined into each SIMD variant so LLVM
/// vectorises the channel loops for that variant's instruction set; `FMA`
/// selects fused multiply-add, which is a slow library call without it.
#[inline(always)]
fn row<const FMA: bool>(
    args: &RowArgs<'_>,
    cols: Axis,
    kernel_rows: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let c = args.channels;
    let mut offsets = [(0usize, 0usize); MAX_KERNEL * MAX_KERNEL];
    for (ox, px) in out.chunks_exact_mut(c).enumerate() {
        let (lo, hi, start) = cols.window(ox, args.kernel, args.stride);
        // (input offset, weight offset) of every tap inside the image.
        let mut n = 0;
        for ky in 0..kernel_rows {
            for kx in lo..hi {
                let ix = start + kx - cols.pad_before;
                offsets[n] = (
                    (ky * args.width + ix) * c,
                    (ky * args.kernel + kx) * args.tap_stride,
                );
                n += 1;
            }
        }
        let taps = &offsets[..n];
        let mut ch = 0;
        while ch + WIDE <= c {
            block::<WIDE, FMA>(args, taps, ch, &mut px[ch..ch + WIDE]);
            ch += WIDE;
        }
        while ch + NARROW <= c {
            block::<NARROW, FMA>(args, taps, ch, &mut px[ch..ch + NARROW]);
            ch += NARROW;
        }
        while ch < c {
            block::<1, FMA>(args, taps, ch, &mut px[ch..ch + 1]);
            ch += 1;
        }
    }
}

/// `L` channels of one output pixel, accumulated in registers.
#[inline(always)]
fn block<const L: usize, const FMA: bool>(
    args: &RowArgs<'_>,
    taps: &[(usize, usize)],
    ch: usize,
    out: &mut [MaybeUninit<f32>],
) {
    // A copy, not `array::from_fn`: that stays an out-of-line call with a
    // bounds check per element, a twentieth of the network's time.
    let mut acc = [0f32; L];
    acc.copy_from_slice(&args.bias[ch..ch + L]);
    for &(xo, wo) in taps {
        let x = &args.image[xo + ch..xo + ch + L];
        let w = &args.taps[wo + ch..wo + ch + L];
        for j in 0..L {
            acc[j] = if FMA {
                x[j].mul_add(w[j], acc[j])
            } else {
                acc[j] + x[j] * w[j]
            };
        }
    }
    if args.relu6 {
        for a in &mut acc {
            *a = a.clamp(0.0, 6.0);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        o.write(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable variant is what CPUs without AVX2 run; check it against
    /// every SIMD variant this machine can run.
    #[test]
    fn portable_and_simd_variants_agree() {
        // A fixed pseudo-random input; no dependency needed for that.
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32 * 4.0 - 2.0
        };
        // Widths with interior runs of several blocks of four pixels and a remainder at both strides, and the
        // network's 7x7, too narrow for a block at 5x5; channels that fill whole vectors and leave a masked
        // remainder.
        for (n, h, w, c) in [(2, 9, 8, 45), (1, 6, 23, 32), (1, 7, 7, 48)] {
            let x: Vec<f32> = (0..n * h * w * c).map(|_| next()).collect();
            // The network's kernels and strides (which AVX-512 specialises) and one it does not have.
            for (kernel, stride) in [(3, 1), (3, 2), (5, 1), (5, 2), (7, 3)] {
                let weight: Vec<f32> = (0..c * kernel * kernel).map(|_| next()).collect();
                let bias: Vec<f32> = (0..c).map(|_| next()).collect();
                let op = Depthwise::new(
                    &Tensor::from_vec(weight, (c, 1, kernel, kernel), &candle_core::Device::Cpu)
                        .unwrap(),
                    &Tensor::from_vec(bias, c, &candle_core::Device::Cpu).unwrap(),
                    stride,
                    true,
                )
                .unwrap();
                let portable = op.run(&x, (n, h, w), row_portable);
                assert_eq!(
                    portable.len(),
                    n * h.div_ceil(stride) * w.div_ceil(stride) * c
                );
                let mut variants: Vec<(&str, RowFn)> = vec![("detected", row_fn())];
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    if has!("avx2") && has!("fma") {
                        variants.push(("avx2", row_avx2_fma));
                    }
                    if has!("avx512f") && has!("fma") {
                        variants.push(("avx512", row_avx512));
                    }
                }
                for (name, variant) in variants {
                    let simd = op.run(&x, (n, h, w), variant);
                    let diff = portable
                        .iter()
                        .zip(&simd)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff <= 1e-5,
                        "{name}, {w}x{h}x{c} {kernel}x{kernel}/{stride}: max abs diff {diff}"
                    );
                }
            }
        }
    }
}
