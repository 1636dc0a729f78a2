//! `C = A x B + bias (+ residual)`, optionally clamped to [0, 6], for the
//! small and medium GEMMs of 1x1 convolutions: B (the weights) is packed once
//! at load time into panels of [`NR`] columns, A (activations, row-major with
//! any row stride) is read in place, and each microkernel call keeps an
//! `MR x NR` block of C in registers from the first multiply to the activated
//! store. There is no per-call set-up, allocation or zeroing, which is what a
//! general GEMM pays for on every one of the hundreds of small products in a
//! network.
//!
//! Runs on the calling thread; callers split work between threads.

use std::ops::Range;

use super::isa::Isa;

/// Columns per packed panel: one AVX-512 register, two AVX2 ones.
pub const NR: usize = 16;

/// Weights `[K, N]` packed as `ceil(N / NR)` panels of `K x NR`, zero-padded
/// past column N, with the bias padded likewise.
#[derive(Debug, Clone)]
pub struct PackedB {
    data: Vec<f32>,
    /// The same panels in bf16 for [`gemm_bf16`], when asked for: each value
    /// a pair of consecutive rows of one column (row 2i in the low half),
    /// `ceil(K / 2) x NR` pairs a panel.
    pairs: Option<Vec<u32>>,
    bias: Vec<f32>,
    k: usize,
    n: usize,
}

/// `x` rounded to the nearest bf16 (ties to even), as its bits.
fn bf16_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return (bits >> 16) | 0x40;
    }
    (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
}

/// Two values as one bf16 pair, `lo` in the low half as the pair instructions read it.
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    bf16_bits(lo) | (bf16_bits(hi) << 16)
}

impl PackedB {
    /// Packs row-major `weight [K, N]` and `bias [N]`.
    pub fn new(weight: &[f32], bias: &[f32], k: usize, n: usize) -> Self {
        assert!(k > 0 && n > 0, "packed gemm: empty weight [{k}, {n}]");
        assert_eq!(weight.len(), k * n, "packed gemm: weight is not [{k}, {n}]");
        assert_eq!(bias.len(), n, "packed gemm: bias is not [{n}]");
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for (row, dst) in panel.chunks_exact_mut(NR).enumerate() {
                let cols = p * NR..((p + 1) * NR).min(n);
                dst[..cols.len()]
                    .copy_from_slice(&weight[row * n + cols.start..row * n + cols.end]);
            }
        }
        let mut padded = vec![0f32; panels * NR];
        padded[..n].copy_from_slice(bias);
        Self {
            data,
            pairs: None,
            bias: padded,
            k,
            n,
        }
    }

    /// Adds the bf16 copy of the panels that [`gemm_bf16`] reads.
    pub fn with_bf16(mut self) -> Self {
        let (k, pairs_per_panel) = (self.k, self.k.div_ceil(2));
        let mut pairs = Vec::with_capacity(self.panels() * pairs_per_panel * NR);
        for panel in self.data.chunks_exact(k * NR) {
            for i in 0..pairs_per_panel {
                for j in 0..NR {
                    let lo = panel[2 * i * NR + j];
                    let hi = if 2 * i + 1 < k {
                        panel[(2 * i + 1) * NR + j]
                    } else {
                        0.0
                    };
                    pairs.push(bf16_pair(lo, hi));
                }
            }
        }
        self.pairs = Some(pairs);
        self
    }

    /// Rows of B (the reduction length).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of B (output channels).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of panels.
    pub fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// The bias, without padding.
    pub fn bias(&self) -> &[f32] {
        &self.bias[..self.n]
    }
}

/// What happens to each output value after the product.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Add B's bias; off for the partial sums that another pass completes.
    pub bias: bool,
    /// Added before the activation, laid out like C (same columns) with its own row stride.
    pub residual: Option<(&'a [f32], usize)>,
    /// Clamp to [0, 6].
    pub relu6: bool,
}

impl Epilogue<'_> {
    /// Bias only.
    pub const LINEAR: Epilogue<'static> = Epilogue {
        bias: true,
        residual: None,
        relu6: false,
    };
    /// Bias, then ReLU6.
    pub const RELU6: Epilogue<'static> = Epilogue {
        bias: true,
        residual: None,
        relu6: true,
    };
}

/// The product of rows `0..m` of `a` (row stride `lda`; its column 0 is B's
/// row `k.start`) with B's rows `k` and panels `panels`, into `c` (row stride
/// `ldc`; its column 0 is B's column `panels.start * NR`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    isa: Isa,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    k: Range<usize>,
    panels: Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
) {
    assert!(
        k.end <= b.k,
        "packed gemm: rows {k:?} outside [{}, {}]",
        b.k,
        b.n
    );
    let (mr, kernel): (usize, Kernel) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (AVX512_MR, x86::avx512),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => (AVX2_MR, x86::avx2),
        _ => (PORTABLE_MR, portable),
    };
    drive(
        Driver {
            kernel,
            mr,
            pair: pair_kernel(isa),
            b: &b.data,
            b_rows: b.k,
        },
        a,
        lda,
        m,
        b,
        k,
        panels,
        c,
        ldc,
        epilogue,
    );
}

/// A microkernel and the panels it reads.
struct Driver<'a> {
    kernel: Kernel,
    /// Rows of C one call computes.
    mr: usize,
    /// A microkernel over two adjacent panels at once and its rows, where the
    /// instruction set has one: each broadcast of A then feeds two multiplies.
    pair: Option<(Kernel, usize)>,
    /// The panels, each `b_rows x NR` 32-bit values.
    b: &'a [f32],
    b_rows: usize,
}

/// Checks the shapes and runs the microkernel over every `mr x NR` tile of
/// C; `k` counts rows of the driver's panels (pairs, for bf16).
#[allow(clippy::too_many_arguments)]
fn drive(
    d: Driver<'_>,
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    k: Range<usize>,
    panels: Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
) {
    if m == 0 || panels.is_empty() {
        return;
    }
    let klen = k.len();
    assert!(
        klen > 0
            && k.end <= d.b_rows
            && panels.end <= b.panels()
            && d.b.len() >= b.panels() * d.b_rows * NR,
        "packed gemm: rows {k:?} / panels {panels:?} outside [{}, {}]",
        d.b_rows,
        b.n
    );
    let cols = (panels.end * NR).min(b.n) - panels.start * NR;
    assert!(
        lda >= klen && a.len() >= (m - 1) * lda + klen,
        "packed gemm: A holds {} values, needs {m} rows of {klen} at stride {lda}",
        a.len()
    );
    let c_needed = (m - 1) * ldc + cols;
    assert!(
        ldc >= cols && c.len() >= c_needed,
        "packed gemm: C holds {} values, needs {m} rows of {cols} at stride {ldc}",
        c.len()
    );
    if let Some((r, ldr)) = epilogue.residual {
        assert!(
            ldr >= cols && r.len() >= (m - 1) * ldr + cols,
            "packed gemm: residual holds {} values, needs {m} rows of {cols} at stride {ldr}",
            r.len()
        );
    }
    static ZEROS: [f32; 2 * NR] = [0.0; 2 * NR];
    let mut p = panels.start;
    while p < panels.end {
        let (kernel, mr, width) = match d.pair {
            Some((kernel, mr)) if p + 1 < panels.end => (kernel, mr, 2),
            _ => (d.kernel, d.mr, 1),
        };
        let col = (p - panels.start) * NR;
        let ncols = (b.n - p * NR).min(width * NR);
        // SAFETY (for the pointer arithmetic below): the asserts above bound
        // every row and column the kernel touches: rows i..i+rows < m, columns
        // col..col+ncols <= cols, B's panels p..p+width rows k, the padded bias.
        let panel = unsafe { d.b.as_ptr().add(p * d.b_rows * NR + k.start * NR) };
        let bias = if epilogue.bias {
            unsafe { b.bias.as_ptr().add(p * NR) }
        } else {
            ZEROS.as_ptr()
        };
        let mut i = 0;
        while i < m {
            let rows = mr.min(m - i);
            let tile = Tile {
                k: klen,
                a: unsafe { a.as_ptr().add(i * lda) },
                lda,
                b: panel,
                panel_stride: d.b_rows * NR,
                bias,
                c: unsafe { c.as_mut_ptr().add(i * ldc + col) },
                ldc,
                residual: epilogue
                    .residual
                    .map_or(std::ptr::null(), |(r, ldr)| unsafe {
                        r.as_ptr().add(i * ldr + col)
                    }),
                ldr: epilogue.residual.map_or(0, |(_, ldr)| ldr),
                relu6: epilogue.relu6,
                ncols,
            };
            // SAFETY: `tile` is in bounds (above) and `kernel` was chosen for
            // an instruction set this CPU has (callers check it).
            unsafe { kernel(&tile, rows) };
            i += rows;
        }
        p += width;
    }
}

/// [`gemm`] with both operands rounded to bf16 and the products summed in
/// f32, on a CPU with AVX512-BF16 ([`super::isa::Isa::has_bf16`]), for B
/// packed [`PackedB::with_bf16`]. `k.start` must be even (a pair boundary).
/// `pairs` is the caller's scratch for A in bf16.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &PackedB,
    k: Range<usize>,
    panels: Range<usize>,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    pairs: &mut Vec<u32>,
) {
    let Some(packed) = &b.pairs else {
        panic!("packed gemm: bf16 product of weights packed without bf16")
    };
    assert!(
        super::isa::Isa::has_bf16(),
        "packed gemm: this CPU has no bf16 instructions"
    );
    assert!(
        k.start.is_multiple_of(2),
        "packed gemm: bf16 rows must start at a pair"
    );
    if m == 0 || panels.is_empty() {
        return;
    }
    let klen = k.len();
    assert!(
        klen > 0 && lda >= klen && a.len() >= (m - 1) * lda + klen,
        "packed gemm: A holds {} values, needs {m} rows of {klen} at stride {lda}",
        a.len()
    );
    let kp = klen.div_ceil(2);
    pairs.clear();
    pairs.resize(m * kp, 0);
    for (row, dst) in a.chunks(lda).take(m).zip(pairs.chunks_exact_mut(kp)) {
        to_bf16_pairs(&row[..klen], dst);
    }
    // The bf16 panels have the f32 panels' geometry with pairs for rows, so
    // the driver is shared: A is the pairs (as many "columns" as pairs), B
    // the pair panels, and the microkernel reads both as 32-bit units.
    // SAFETY: f32 and u32 have the same size and alignment; the kernel only
    // reinterprets the bits it loads.
    let a32 = unsafe { std::slice::from_raw_parts(pairs.as_ptr().cast::<f32>(), pairs.len()) };
    let b32 = unsafe { std::slice::from_raw_parts(packed.as_ptr().cast::<f32>(), packed.len()) };
    drive(
        Driver {
            kernel: bf16_kernel(),
            mr: BF16_MR,
            pair: bf16_pair_kernel(),
            b: b32,
            b_rows: b.k.div_ceil(2),
        },
        a32,
        kp,
        m,
        b,
        k.start / 2..k.start / 2 + kp,
        panels,
        c,
        ldc,
        epilogue,
    );
}

/// `src` rounded to bf16 into `dst` in order, two to a `u32`, the last pair
/// zero-padded: which is also the layout of pairs of consecutive values.
fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
    assert_eq!(
        dst.len(),
        src.len().div_ceil(2),
        "bf16 pairs: lengths differ"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::isa::Isa::has_bf16() {
        // SAFETY: the CPU has the instructions; the assert sizes `dst`.
        done = unsafe { x86::to_bf16_avx512(src, dst) };
    }
    for (i, d) in dst.iter_mut().enumerate().skip(done / 2) {
        let lo = src[2 * i];
        let hi = src.get(2 * i + 1).copied().unwrap_or(0.0);
        *d = bf16_pair(lo, hi);
    }
}

#[cfg(target_arch = "x86_64")]
const BF16_MR: usize = 12;
#[cfg(not(target_arch = "x86_64"))]
const BF16_MR: usize = 1;

fn bf16_pair_kernel() -> Option<(Kernel, usize)> {
    #[cfg(target_arch = "x86_64")]
    {
        Some((x86::avx512_bf16_pair, BF16_MR))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

fn bf16_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        x86::avx512_bf16
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        unreachable!("bf16 kernels exist only for x86-64")
    }
}

/// One microkernel call: `rows x ncols` of C from `rows x k` of A and a `k x NR`
/// panel (two adjacent ones for a pair kernel).
#[derive(Clone, Copy)]
struct Tile {
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    /// Values from one panel's start to the next one's.
    panel_stride: usize,
    /// NR values a panel, always readable.
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
    /// Null when there is none.
    residual: *const f32,
    ldr: usize,
    relu6: bool,
    /// Valid columns of this panel, 1..=NR; of the two, NR+1..=2*NR.
    ncols: usize,
}

type Kernel = unsafe fn(&Tile, usize);

/// The two-panel microkernel of `isa` and its rows, if it has one.
fn pair_kernel(isa: Isa) -> Option<(Kernel, usize)> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some((x86::avx512_pair, AVX512_PAIR_MR)),
        _ => None,
    }
}

const PORTABLE_MR: usize = 4;
#[cfg(target_arch = "x86_64")]
const AVX2_MR: usize = 6;
#[cfg(target_arch = "x86_64")]
const AVX512_MR: usize = 12;
/// 24 accumulators, two panel rows and a broadcast: 27 of the 32 registers.
#[cfg(target_arch = "x86_64")]
const AVX512_PAIR_MR: usize = 12;

/// Calls `$kernel::<R>` for the runtime row count `$rows` in `1..=$max`.
macro_rules! dispatch_rows {
    ($kernel:ident, $tile:expr, $rows:expr, [$($r:literal),*]) => {
        match $rows {
            $($r => $kernel::<$r>($tile),)*
            other => unreachable!("microkernel called for {other} rows"),
        }
    };
}

/// # Safety
/// `t` must describe memory valid for `rows` rows (at most [`PORTABLE_MR`]).
unsafe fn portable(t: &Tile, rows: usize) {
    unsafe { dispatch_rows!(portable_rows, t, rows, [1, 2, 3, 4]) }
}

unsafe fn portable_rows<const R: usize>(t: &Tile) {
    let mut acc = [[0f32; NR]; R];
    for kk in 0..t.k {
        // SAFETY: the caller's tile bounds these reads.
        let b = unsafe { std::slice::from_raw_parts(t.b.add(kk * NR), NR) };
        for (i, row) in acc.iter_mut().enumerate() {
            let a = unsafe { *t.a.add(i * t.lda + kk) };
            for (o, w) in row.iter_mut().zip(b) {
                *o += a * w;
            }
        }
    }
    let bias = unsafe { std::slice::from_raw_parts(t.bias, NR) };
    for (i, row) in acc.iter().enumerate() {
        for j in 0..t.ncols {
            let mut v = row[j] + bias[j];
            if !t.residual.is_null() {
                v += unsafe { *t.residual.add(i * t.ldr + j) };
            }
            if t.relu6 {
                v = v.clamp(0.0, 6.0);
            }
            unsafe { *t.c.add(i * t.ldc + j) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{NR, Tile};

    /// # Safety
    /// AVX2 and FMA must be present; `t` valid for `rows` (at most 6) rows.
    pub(super) unsafe fn avx2(t: &Tile, rows: usize) {
        unsafe { dispatch_rows!(avx2_rows, t, rows, [1, 2, 3, 4, 5, 6]) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_rows<const R: usize>(t: &Tile) {
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            let rows: [*const f32; R] = std::array::from_fn(|i| t.a.add(i * t.lda));
            let mut b = t.b;
            for kk in 0..t.k {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                for i in 0..R {
                    let a = _mm256_broadcast_ss(&*rows[i].add(kk));
                    lo[i] = _mm256_fmadd_ps(a, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(a, b1, hi[i]);
                }
                b = b.add(NR);
            }
            let bias0 = _mm256_loadu_ps(t.bias);
            let bias1 = _mm256_loadu_ps(t.bias.add(8));
            let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
            let full = t.ncols == NR;
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.ncols as i32), lanes);
            let mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.ncols as i32 - 8), lanes);
            for i in 0..R {
                let mut v0 = _mm256_add_ps(lo[i], bias0);
                let mut v1 = _mm256_add_ps(hi[i], bias1);
                if !t.residual.is_null() {
                    let r = t.residual.add(i * t.ldr);
                    let (r0, r1) = if full {
                        (_mm256_loadu_ps(r), _mm256_loadu_ps(r.add(8)))
                    } else {
                        (
                            _mm256_maskload_ps(r, mask0),
                            _mm256_maskload_ps(r.add(8), mask1),
                        )
                    };
                    v0 = _mm256_add_ps(v0, r0);
                    v1 = _mm256_add_ps(v1, r1);
                }
                if t.relu6 {
                    v0 = _mm256_min_ps(_mm256_max_ps(v0, zero), six);
                    v1 = _mm256_min_ps(_mm256_max_ps(v1, zero), six);
                }
                let c = t.c.add(i * t.ldc);
                if full {
                    _mm256_storeu_ps(c, v0);
                    _mm256_storeu_ps(c.add(8), v1);
                } else {
                    _mm256_maskstore_ps(c, mask0, v0);
                    _mm256_maskstore_ps(c.add(8), mask1, v1);
                }
            }
        }
    }

    /// Defines `$name(t, rows)`, which runs `$kernel::<rows>` for 1 to 12 rows.
    macro_rules! up_to_twelve_rows {
        ($(#[$doc:meta])* $name:ident => $kernel:ident) => {
            $(#[$doc])*
            pub(super) unsafe fn $name(t: &Tile, rows: usize) {
                unsafe {
                    dispatch_rows!($kernel, t, rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
                }
            }
        };
    }

    up_to_twelve_rows!(
        /// # Safety
        /// AVX-512F must be present; `t` valid for `rows` (at most 12) rows.
        avx512 => avx512_rows
    );

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512_rows<const R: usize>(t: &Tile) {
        unsafe { panel_rows::<F32, R>(t) }
    }

    up_to_twelve_rows!(
        /// # Safety
        /// AVX-512F must be present; `t` valid for `rows` (at most 12) rows
        /// and two panels.
        avx512_pair => avx512_pair_rows
    );

    /// One load of each A value for 32 columns, where [`avx512_rows`] loads
    /// it for 16: on CPUs with two 512-bit FMA units the single-panel kernel
    /// runs out of load slots before it runs out of multipliers.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512_pair_rows<const R: usize>(t: &Tile) {
        unsafe { pair_rows::<F32, R>(t) }
    }

    up_to_twelve_rows!(
        /// # Safety
        /// AVX-512F and AVX512-BF16 must be present; `t` valid for `rows` (at
        /// most 12) rows and two panels, holding bf16 pairs as for [`avx512_bf16`].
        avx512_bf16_pair => avx512_bf16_pair_rows
    );

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_bf16_pair_rows<const R: usize>(t: &Tile) {
        unsafe { pair_rows::<Bf16, R>(t) }
    }

    /// One multiply-add of a kernel: a broadcast A unit against a panel row.
    trait Product {
        /// # Safety
        /// Inlined only into a function compiled for the product's instructions.
        unsafe fn fma(acc: __m512, a: __m512, b: __m512) -> __m512;
    }

    /// f32 operands.
    struct F32;

    /// bf16 pairs in each 32-bit unit, summed into f32.
    struct Bf16;

    impl Product for F32 {
        #[inline(always)]
        unsafe fn fma(acc: __m512, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, acc) }
        }
    }

    impl Product for Bf16 {
        #[inline(always)]
        unsafe fn fma(acc: __m512, a: __m512, b: __m512) -> __m512 {
            // The packed panels hold bf16 pairs in f32 lanes: the same 512 bits, read as 32 bf16 values.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512, __m512bh>(a),
                    std::mem::transmute::<__m512, __m512bh>(b),
                )
            }
        }
    }

    /// The body of the one-panel kernels: A's 32-bit units broadcast, one panel.
    ///
    /// # Safety
    /// Inlined only into a function compiled for `P`'s instructions; `t`
    /// valid for `R` rows.
    #[inline(always)]
    unsafe fn panel_rows<P: Product, const R: usize>(t: &Tile) {
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let rows: [*const f32; R] = std::array::from_fn(|i| t.a.add(i * t.lda));
            let mut b = t.b;
            for kk in 0..t.k {
                let b0 = _mm512_loadu_ps(b);
                for i in 0..R {
                    // The unit's bits whatever they hold: an f32 or a bf16 pair.
                    acc[i] = P::fma(acc[i], _mm512_set1_ps(*rows[i].add(kk)), b0);
                }
                b = b.add(NR);
            }
            finish(t, &acc);
        }
    }

    /// The body of the pair kernels: A's 32-bit units broadcast, two panels.
    ///
    /// # Safety
    /// Inlined only into a function compiled for `P`'s instructions; `t`
    /// valid for `R` rows and two panels.
    #[inline(always)]
    unsafe fn pair_rows<P: Product, const R: usize>(t: &Tile) {
        unsafe {
            let mut lo = [_mm512_setzero_ps(); R];
            let mut hi = [_mm512_setzero_ps(); R];
            let rows: [*const f32; R] = std::array::from_fn(|i| t.a.add(i * t.lda));
            let mut b = t.b;
            let next = t.panel_stride;
            for kk in 0..t.k {
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(next));
                for i in 0..R {
                    // The unit's bits whatever they hold: an f32 or a bf16 pair.
                    let a = _mm512_set1_ps(*rows[i].add(kk));
                    lo[i] = P::fma(lo[i], a, b0);
                    hi[i] = P::fma(hi[i], a, b1);
                }
                b = b.add(NR);
            }
            finish(&Tile { ncols: NR, ..*t }, &lo);
            let second = Tile {
                bias: t.bias.add(NR),
                c: t.c.add(NR),
                residual: if t.residual.is_null() {
                    t.residual
                } else {
                    t.residual.add(NR)
                },
                ncols: t.ncols - NR,
                ..*t
            };
            finish(&second, &hi);
        }
    }

    up_to_twelve_rows!(
        /// # Safety
        /// AVX-512F and AVX512-BF16 must be present; `t` valid for `rows` (at
        /// most 12) rows, with `a` and `b` holding bf16 pairs and `k` counting them.
        avx512_bf16 => avx512_bf16_rows
    );

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_bf16_rows<const R: usize>(t: &Tile) {
        unsafe { panel_rows::<Bf16, R>(t) }
    }

    /// Converts whole blocks of 16 values of `src` into `dst` (as pairs) and
    /// returns how many values it converted (a multiple of 32 pairs' worth).
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 must be present; `dst` holds `src.len() / 2`
    /// pairs or more.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_bf16_avx512(src: &[f32], dst: &mut [u32]) -> usize {
        let blocks = src.len() / 16;
        for b in 0..blocks {
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(b * 16));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(b * 8).cast::<__m256i>(), h);
            }
        }
        blocks * 16
    }

    /// Bias, residual and ReLU6 on the accumulated rows, and the masked store.
    /// Always inlined, so the accumulators stay in registers: called out of
    /// line, they went to the stack and back on every tile, a third of the
    /// time of a tile with K = 16 (the first blocks' expansions).
    ///
    /// # Safety
    /// Inlined only into a function compiled for AVX-512F; `t` valid for `R` rows.
    #[inline(always)]
    unsafe fn finish<const R: usize>(t: &Tile, acc: &[__m512; R]) {
        unsafe {
            let bias = _mm512_loadu_ps(t.bias);
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            let mask: __mmask16 = if t.ncols >= NR {
                0xffff
            } else {
                (1u16 << t.ncols) - 1
            };
            for (i, a) in acc.iter().enumerate() {
                let mut v = _mm512_add_ps(*a, bias);
                if !t.residual.is_null() {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, t.residual.add(i * t.ldr)));
                }
                if t.relu6 {
                    v = _mm512_min_ps(_mm512_max_ps(v, zero), six);
                }
                _mm512_mask_storeu_ps(t.c.add(i * t.ldc), mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as f32 / u32::MAX as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// Every variant against a plain triple loop, over sizes that leave row
    /// and column tails, a sub-range of K and panels, strided A and C, and
    /// each epilogue.
    #[test]
    fn every_variant_matches_the_definition() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 24),
            (13, 37, 40),
            (30, 96, 16),
            (5, 64, 1000),
            (25, 48, 128),
            (12, 20, 100),
        ] {
            let (lda, ldc) = (k + 3, n + 5);
            let a = random(m * lda, 7);
            let w = random(k * n, 11);
            let bias = random(n, 13);
            let res = random(m * ldc, 17);
            let packed = PackedB::new(&w, &bias, k, n);
            let krange = k / 3..k;
            let panels = packed.panels() / 2..packed.panels();
            let col0 = panels.start * NR;
            for (relu6, residual, with_bias) in [
                (false, false, true),
                (true, true, true),
                (false, true, false),
            ] {
                let mut expect = vec![0f32; m * ldc];
                for i in 0..m {
                    for j in col0..n {
                        let mut v: f32 = krange
                            .clone()
                            .map(|kk| a[i * lda + kk - krange.start] * w[kk * n + j])
                            .sum();
                        if with_bias {
                            v += bias[j];
                        }
                        if residual {
                            v += res[i * ldc + j - col0];
                        }
                        expect[i * ldc + j - col0] = if relu6 { v.clamp(0.0, 6.0) } else { v };
                    }
                }
                for isa in Isa::available() {
                    let mut c = vec![0f32; m * ldc];
                    let epilogue = Epilogue {
                        bias: with_bias,
                        residual: residual.then_some((&res[..], ldc)),
                        relu6,
                    };
                    gemm(
                        isa,
                        &a,
                        lda,
                        m,
                        &packed,
                        krange.clone(),
                        panels.clone(),
                        &mut c,
                        ldc,
                        epilogue,
                    );
                    let diff = c
                        .iter()
                        .zip(&expect)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        diff < 1e-4,
                        "{isa:?} [{m}x{k}x{n}] relu6={relu6} residual={residual}: {diff}"
                    );
                }
            }
        }
    }

    /// bf16 products against the definition on the same operands rounded to
    /// bf16, over odd K (a zero-padded last pair), row and column tails, a
    /// sub-range of K and every epilogue; on a CPU without AVX512-BF16 there
    /// is nothing to run.
    #[test]
    fn bf16_matches_the_definition_on_rounded_operands() {
        if !Isa::has_bf16() {
            eprintln!("no AVX512-BF16 on this CPU: bf16 kernel not run");
            return;
        }
        let round = |x: f32| f32::from_bits(bf16_bits(x) << 16);
        assert_eq!(round(1.0), 1.0);
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0, "ties go to even");
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        let mut pairs = Vec::new();
        for &(m, k, n) in &[
            (1, 1, 1),
            (7, 5, 24),
            (13, 37, 40),
            (30, 96, 16),
            (5, 64, 1000),
            (25, 48, 128),
            (12, 20, 100),
        ] {
            let (lda, ldc) = (k + 3, n + 5);
            let a = random(m * lda, 7);
            let w = random(k * n, 11);
            let bias = random(n, 13);
            let res = random(m * ldc, 17);
            let packed = PackedB::new(&w, &bias, k, n).with_bf16();
            let krange = (k / 3) & !1..k;
            let panels = packed.panels() / 2..packed.panels();
            let col0 = panels.start * NR;
            for (relu6, residual, with_bias) in [
                (false, false, true),
                (true, true, true),
                (false, true, false),
            ] {
                let mut c = vec![0f32; m * ldc];
                let epilogue = Epilogue {
                    bias: with_bias,
                    residual: residual.then_some((&res[..], ldc)),
                    relu6,
                };
                gemm_bf16(
                    &a,
                    lda,
                    m,
                    &packed,
                    krange.clone(),
                    panels.clone(),
                    &mut c,
                    ldc,
                    epilogue,
                    &mut pairs,
                );
                for i in 0..m {
                    for j in col0..n {
                        let mut v: f64 = krange
                            .clone()
                            .map(|kk| {
                                f64::from(
                                    round(a[i * lda + kk - krange.start]) * round(w[kk * n + j]),
                                )
                            })
                            .sum();
                        v += if with_bias { f64::from(bias[j]) } else { 0.0 };
                        v += if residual {
                            f64::from(res[i * ldc + j - col0])
                        } else {
                            0.0
                        };
                        let v = if relu6 { v.clamp(0.0, 6.0) } else { v };
                        let got = f64::from(c[i * ldc + j - col0]);
                        assert!(
                            (got - v).abs() < 1e-4 * (1.0 + v.abs()),
                            "[{m}x{k}x{n}] ({i}, {j}) relu6={relu6} residual={residual}: {got} vs {v}"
                        );
                    }
                }
            }
        }
    }
}
