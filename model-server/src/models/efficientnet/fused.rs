//! EfficientNet-Lite0 on the CPU as one operation, with each inverted-residual
//! block fused: expand 1x1 -> depthwise -> project 1x1 (+ residual) runs over
//! tiles of output rows, so the 6x-expanded activation lives only in a
//! cache-sized window (slid down the image, each expanded row computed once)
//! and never goes out to memory and back, as it does when the layers run one
//! after another.
//!
//! Threads split the work two ways. With at least as many images as threads,
//! each thread runs whole images on its own: no synchronisation at all. Any
//! other image is spread over the threads by splitting each block's expanded
//! channels in two: each half is expanded, convolved and projected on its own
//! (nothing computed twice), and the partial projections are summed. The
//! stem splits by rows, the head and classifier by output channels, none of
//! which changes any value: the logits are bit for bit the same on any number
//! of threads and in any batch.
//!
//! Kernels and tile sizes are chosen at run time from the CPU's instruction
//! sets and its L2 cache size.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{BlockSpec, HEAD_CHANNELS, INPUT_SIZE, NUM_CLASSES, STEM_CHANNELS};
use crate::kernels::depthwise::{Axis, RowArgs, RowFn, row_fn_for};
use crate::kernels::isa::{Isa, l2_cache_bytes};
use crate::kernels::packed_gemm::{Epilogue, NR, PackedB, gemm, gemm_bf16};
use crate::kernels::same_padding;
use crate::pools::with_pool_awake;

const STEM_KERNEL: usize = 3;
const STEM_STRIDE: usize = 2;
/// Values one output pixel of the stem reads: 3x3 taps of 3 channels.
const STEM_TAPS: usize = STEM_KERNEL * STEM_KERNEL * 3;
/// Parts a block's expanded channels are cut into, each projected on its
/// own and then summed. Fixed, not one per thread, so that the summation
/// order, and with it every bit of the logits, is the same whatever the
/// thread count, instance count or batch an image runs in; the price is that
/// a single image's blocks use at most this many threads.
const REDUCTION_PARTS: usize = 2;
/// Output sizes from which a block splits between threads by rows rather than by expanded channels.
const ROW_SPLIT_MIN_SIZE: usize = 28;
/// Fewest GEMM rows (pixels) a tile should give the microkernel, which keeps
/// up to 12 rows in registers; fewer leave most of it idle.
const MIN_TILE_PIXELS: usize = 48;

/// One inverted-residual block, weights packed for the fused pass.
#[derive(Debug, Clone)]
pub(super) struct Block {
    spec: BlockSpec,
    mid: usize,
    /// `[Cin, Cmid]`; none when the expansion ratio is 1.
    expand: Option<PackedB>,
    /// `[k, k, Cmid]`: each tap's weights contiguous over channels.
    taps: Vec<f32>,
    dw_bias: Vec<f32>,
    /// `[Cmid, Cout]`.
    project: PackedB,
    skip: bool,
}

/// Row-major `[K, N]` from a convolution weight `[N, K, 1, 1]` (or `[N, K]`).
fn transposed(weight: &Tensor) -> Result<Vec<f32>> {
    let n = weight.dim(0)?;
    weight
        .reshape((n, ()))?
        .t()?
        .contiguous()?
        .flatten_all()?
        .to_vec1()
}

impl Block {
    /// From BatchNorm-folded weights: expand `[Cmid, Cin, 1, 1]` (with its
    /// bias), depthwise `[Cmid, 1, k, k]`, project `[Cout, Cmid, 1, 1]`.
    pub(super) fn new(
        spec: BlockSpec,
        expand: Option<(&Tensor, &Tensor)>,
        depthwise: (&Tensor, &Tensor),
        project: (&Tensor, &Tensor),
    ) -> Result<Self> {
        let mid = spec.cin * spec.expand;
        if !mid.is_multiple_of(NR) {
            bail!("fused block: {mid} expanded channels is not a multiple of {NR}");
        }
        let expand = expand
            .map(|(w, b)| -> Result<PackedB> {
                Ok(PackedB::new(&transposed(w)?, &b.to_vec1()?, spec.cin, mid))
            })
            .transpose()?;
        let taps = depthwise
            .0
            .squeeze(1)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self {
            spec,
            mid,
            expand,
            taps,
            dw_bias: depthwise.1.to_vec1()?,
            project: PackedB::new(
                &transposed(project.0)?,
                &project.1.to_vec1()?,
                mid,
                spec.cout,
            ),
            skip: spec.stride == 1 && spec.cin == spec.cout,
        })
    }

    fn out_size(&self, size: usize) -> usize {
        size.div_ceil(self.spec.stride)
    }
}

/// Buffers one thread needs for its part of a layer, kept between calls so
/// the steady state allocates only the small pooled features and logits.
#[derive(Default)]
struct Scratch {
    /// The window of expanded input rows.
    expanded: Vec<f32>,
    /// Depthwise output of one tile, or the head's output.
    depthwise: Vec<f32>,
    /// The stem's im2col rows.
    columns: Vec<f32>,
    /// A GEMM's input in bf16, in bf16 mode.
    pairs: Vec<u32>,
    /// A band's partial sums from the channels after the first part.
    partial: Vec<f32>,
}

/// Activations of one image in flight.
#[derive(Default)]
struct Activations {
    input: Vec<f32>,
    output: Vec<f32>,
    /// Partial projections of the threads other than the first.
    partial: Vec<Vec<f32>>,
}

/// Grows `v` to at least `len` values; never shrinks, so it settles at the
/// largest layer's size.
fn at_least(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// `out += partial`, value by value: one part's projection added to the block's output.
fn add_into(out: &mut [f32], partial: &[f32]) {
    for (o, v) in out.iter_mut().zip(partial) {
        *o += v;
    }
}

/// Takes a value from a free list, or makes one.
fn take<T: Default>(list: &Mutex<Vec<T>>) -> T {
    list.lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop()
        .unwrap_or_default()
}

fn give<T>(list: &Mutex<Vec<T>>, value: T) {
    list.lock().unwrap_or_else(|p| p.into_inner()).push(value);
}

/// `0..panels` cut into at most `parts` contiguous non-empty ranges of near
/// equal length.
fn split(panels: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, panels.max(1));
    (0..parts)
        .map(|i| i * panels / parts..(i + 1) * panels / parts)
        .filter(|r| !r.is_empty())
        .collect()
}

/// The whole network as a candle operation: normalised `[N, 3, 224, 224]`
/// in, logits `[N, 1000]` out.
pub(super) struct Fused {
    isa: Isa,
    /// Products in bf16 (AVX512-BF16), sums in f32.
    bf16: bool,
    row_fn: RowFn,
    /// Bytes of working set a tile may use: half the L2, leaving the rest
    /// for the weights it streams.
    tile_bytes: usize,
    /// `[27, 32]`, im2col order (ky, kx, channel).
    stem: PackedB,
    blocks: Vec<Block>,
    /// `[320, 1280]`.
    head: PackedB,
    /// `[1280, 1000]`.
    fc: PackedB,
    scratch: Mutex<Vec<Scratch>>,
    activations: Mutex<Vec<Activations>>,
}

impl std::fmt::Debug for Fused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fused")
            .field("isa", &self.isa)
            .field("bf16", &self.bf16)
            .field("tile_bytes", &self.tile_bytes)
            .finish_non_exhaustive()
    }
}

impl Fused {
    /// From BatchNorm-folded weights: stem `[32, 3, 3, 3]`, the blocks, head
    /// `[1280, 320, 1, 1]` and the classifier `[1000, 1280]`, running the
    /// kernels of `isa`; `bf16` rounds the 1x1 convolutions', stem's and
    /// classifier's operands to bf16 (the caller checks the CPU has it).
    pub(super) fn new(
        isa: Isa,
        bf16: bool,
        stem: (&Tensor, &Tensor),
        blocks: Vec<Block>,
        head: (&Tensor, &Tensor),
        fc: (&Tensor, &Tensor),
    ) -> Result<Self> {
        // [co, ci, ky, kx] -> [(ky, kx, ci), co]
        let stem_w = stem
            .0
            .permute((2, 3, 1, 0))?
            .contiguous()?
            .flatten_all()?
            .to_vec1()?;
        let last = blocks.last().map_or(0, |b| b.spec.cout);
        let pack = |b: PackedB| if bf16 { b.with_bf16() } else { b };
        let blocks = blocks
            .into_iter()
            .map(|b| Block {
                expand: b.expand.map(pack),
                project: pack(b.project),
                ..b
            })
            .collect();
        let head = PackedB::new(
            &transposed(head.0)?,
            &head.1.to_vec1()?,
            last,
            HEAD_CHANNELS,
        );
        let fc = PackedB::new(
            &transposed(fc.0)?,
            &fc.1.to_vec1()?,
            HEAD_CHANNELS,
            NUM_CLASSES,
        );
        Ok(Self {
            isa,
            bf16,
            row_fn: row_fn_for(isa),
            tile_bytes: l2_cache_bytes() / 2,
            stem: pack(PackedB::new(
                &stem_w,
                &stem.1.to_vec1()?,
                STEM_TAPS,
                STEM_CHANNELS,
            )),
            blocks,
            head: pack(head),
            fc: pack(fc),
            scratch: Mutex::default(),
            activations: Mutex::default(),
        })
    }

    /// The same network running `isa`'s kernels.
    pub(super) fn with_isa(&self, isa: Isa) -> Self {
        Self {
            isa,
            bf16: self.bf16,
            row_fn: row_fn_for(isa),
            tile_bytes: self.tile_bytes,
            stem: self.stem.clone(),
            blocks: self.blocks.clone(),
            head: self.head.clone(),
            fc: self.fc.clone(),
            scratch: Mutex::default(),
            activations: Mutex::default(),
        }
    }

    /// A GEMM in this network's precision; `pairs` is scratch for bf16.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
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
        if self.bf16 {
            gemm_bf16(a, lda, m, b, k, panels, c, ldc, epilogue, pairs);
        } else {
            gemm(self.isa, a, lda, m, b, k, panels, c, ldc, epilogue);
        }
    }

    /// Whether the products are computed in bf16.
    pub(super) fn bf16(&self) -> bool {
        self.bf16
    }

    /// The instruction set the kernels use.
    pub(super) fn isa(&self) -> Isa {
        self.isa
    }

    /// Logits of `n` images laid out `[n, 3, 224, 224]`, on the current rayon pool.
    pub(super) fn run(&self, x: &[f32], n: usize) -> Vec<f32> {
        let threads = rayon::current_num_threads();
        with_pool_awake(|| self.run_on(x, n, threads))
    }

    fn run_on(&self, x: &[f32], n: usize, threads: usize) -> Vec<f32> {
        let image_len = 3 * INPUT_SIZE * INPUT_SIZE;
        let mut pooled = vec![0f32; n * HEAD_CHANNELS];
        // Whole images per thread while there are enough to go round; the
        // rest spread over every thread.
        let alone = if threads > 1 {
            n / threads * threads
        } else {
            n
        };
        pooled[..alone * HEAD_CHANNELS]
            .par_chunks_mut(HEAD_CHANNELS)
            .zip(x[..alone * image_len].par_chunks(image_len))
            .with_max_len(1)
            .for_each(|(pooled, image)| self.image(image, 1, pooled));
        for (pooled, image) in pooled[alone * HEAD_CHANNELS..]
            .chunks_mut(HEAD_CHANNELS)
            .zip(x[alone * image_len..].chunks(image_len))
        {
            self.image(image, threads, pooled);
        }
        self.classify(&pooled, n, threads)
    }

    /// One image on `threads` threads, into its pooled head features.
    fn image(&self, x: &[f32], threads: usize, pooled: &mut [f32]) {
        let mut acts = take(&self.activations);
        let mut size = INPUT_SIZE.div_ceil(STEM_STRIDE);
        self.stem(
            x,
            threads,
            at_least(&mut acts.output, size * size * STEM_CHANNELS),
        );
        for block in &self.blocks {
            std::mem::swap(&mut acts.input, &mut acts.output);
            let out = block.out_size(size);
            self.block(block, &mut acts, size, threads);
            size = out;
        }
        self.head(
            &acts.output[..size * size * self.head.k()],
            size * size,
            threads,
            pooled,
        );
        give(&self.activations, acts);
    }

    fn stem(&self, x: &[f32], threads: usize, out: &mut [f32]) {
        let size = INPUT_SIZE;
        let axis = Axis::new(size, STEM_KERNEL, STEM_STRIDE);
        let wo = axis.out;
        let per_row = wo * (STEM_TAPS + STEM_CHANNELS) * 4;
        let mut rows = (self.tile_bytes / per_row).clamp(1, wo);
        if threads > 1 {
            // Enough tiles for every thread, a few each to even out.
            rows = rows.min(wo.div_ceil(threads * 4)).max(1);
        }
        let tile = |(t, out): (usize, &mut [f32])| {
            let mut s = take(&self.scratch);
            let o0 = t * rows;
            let n = out.len() / (wo * STEM_CHANNELS);
            let cols = at_least(&mut s.columns, n * wo * STEM_TAPS);
            im2col(x, size, axis, o0..o0 + n, cols);
            self.mm(
                cols,
                STEM_TAPS,
                n * wo,
                &self.stem,
                0..STEM_TAPS,
                0..self.stem.panels(),
                out,
                STEM_CHANNELS,
                Epilogue::RELU6,
                &mut s.pairs,
            );
            give(&self.scratch, s);
        };
        let chunk = rows * wo * STEM_CHANNELS;
        if threads > 1 {
            out.par_chunks_mut(chunk).enumerate().for_each(tile);
        } else {
            out.chunks_mut(chunk).enumerate().for_each(tile);
        }
    }

    /// One block from `acts.input` (`size x size x Cin`) into `acts.output`.
    fn block(&self, b: &Block, acts: &mut Activations, size: usize, threads: usize) {
        let out_size = b.out_size(size);
        let out_len = out_size * out_size * b.spec.cout;
        let x = &acts.input[..size * size * b.spec.cin];
        let panels = b.mid / NR;
        let parts = split(panels, REDUCTION_PARTS);
        if threads > 1 && out_size >= ROW_SPLIT_MIN_SIZE {
            // A large map: each thread takes a band of output rows and adds up its own parts' sums, in the same
            // order as below, so the logits are the same to the bit; the price is expanding twice the few input
            // rows where the bands' windows overlap.
            let bands = split(out_size, threads);
            let row_len = out_size * b.spec.cout;
            let mut rest = &mut at_least(&mut acts.output, out_len)[..out_len];
            let mut targets = Vec::with_capacity(bands.len());
            for band in &bands {
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(band.len() * row_len);
                targets.push(head);
                rest = tail;
            }
            targets.into_par_iter().zip(bands).for_each(|(out, rows)| {
                let mut s = take(&self.scratch);
                let mut partial = std::mem::take(&mut s.partial);
                let (first, others) = parts.split_first().expect("a block has channels");
                self.block_part(b, x, size, first.clone(), rows.clone(), true, out, &mut s);
                for panels in others {
                    let sums = at_least(&mut partial, out.len());
                    self.block_part(
                        b,
                        x,
                        size,
                        panels.clone(),
                        rows.clone(),
                        false,
                        sums,
                        &mut s,
                    );
                    add_into(out, sums);
                }
                s.partial = partial;
                give(&self.scratch, s);
            });
            return;
        }
        at_least(&mut acts.output, out_len);
        let others = parts.len() - 1;
        if acts.partial.len() < others {
            acts.partial.resize_with(others, Vec::new);
        }
        let mut targets: Vec<&mut [f32]> = vec![&mut acts.output[..out_len]];
        targets.extend(
            acts.partial
                .iter_mut()
                .take(others)
                .map(|p| at_least(p, out_len)),
        );
        let part = |(i, (out, panels)): (usize, (&mut [f32], Range<usize>))| {
            let mut s = take(&self.scratch);
            self.block_part(b, x, size, panels, 0..out_size, i == 0, out, &mut s);
            give(&self.scratch, s);
        };
        if threads > 1 {
            targets
                .into_par_iter()
                .zip(parts)
                .enumerate()
                .for_each(part);
        } else {
            targets.into_iter().zip(parts).enumerate().for_each(part);
        }
        // On one thread: the sum is a small fraction of the block's work, and
        // a second hand-off between threads per block costs more than it saves.
        for p in &acts.partial[..others] {
            add_into(&mut acts.output[..out_len], &p[..out_len]);
        }
    }

    /// The block's contribution from expanded channels `panels` (in units of
    /// [`NR`]) to output rows `out_rows`, into `out` (those rows only): with
    /// the bias and residual when `first`, the bare partial sum otherwise.
    #[allow(clippy::too_many_arguments)]
    fn block_part(
        &self,
        b: &Block,
        x: &[f32],
        size: usize,
        panels: Range<usize>,
        out_rows: Range<usize>,
        first: bool,
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        let BlockSpec {
            kernel,
            stride,
            cin,
            cout,
            ..
        } = b.spec;
        let channels = panels.start * NR..panels.end * NR;
        let width = channels.len();
        let axis = Axis::new(size, kernel, stride);
        let wo = axis.out;
        // Input rows a tile of `r` output rows reads: r * stride plus the
        // kernel's overhang; bytes per output row, expanded and convolved.
        let per_row = (stride * size + wo) * width * 4;
        let overhang = kernel.saturating_sub(stride) * size * width * 4;
        let mut rows = (self.tile_bytes.saturating_sub(overhang) / per_row).max(1);
        rows = rows.max(MIN_TILE_PIXELS.div_ceil(wo)).min(out_rows.len());
        let window_rows = ((rows - 1) * stride + kernel).min(size);
        let expanded = at_least(&mut s.expanded, window_rows * size * width);
        let dw = at_least(&mut s.depthwise, rows * wo * width);
        let line = size * width;
        // Input rows now in `expanded`, from its start.
        let mut have = 0..0;
        let base = out_rows.start * wo;
        for o0 in out_rows.clone().step_by(rows) {
            let o1 = (o0 + rows).min(out_rows.end);
            let need = (o0 * stride).saturating_sub(axis.pad_before)
                ..((o1 - 1) * stride + kernel - axis.pad_before).min(size);
            let mut fresh = need.start;
            if have.start <= need.start && need.start < have.end {
                let from = (need.start - have.start) * line;
                expanded.copy_within(from..(have.end - have.start) * line, 0);
                fresh = have.end;
            }
            let dst = &mut expanded[(fresh - need.start) * line..(need.end - need.start) * line];
            let src = &x[fresh * size * cin..need.end * size * cin];
            match &b.expand {
                Some(e) => self.mm(
                    src,
                    cin,
                    (need.end - fresh) * size,
                    e,
                    0..cin,
                    panels.clone(),
                    dst,
                    width,
                    Epilogue::RELU6,
                    &mut s.pairs,
                ),
                None => {
                    for (d, px) in dst.chunks_exact_mut(width).zip(src.chunks_exact(cin)) {
                        d.copy_from_slice(&px[channels.clone()]);
                    }
                }
            }
            have = need.clone();
            for oy in o0..o1 {
                let (lo, hi, start) = axis.window(oy, kernel, stride);
                let first_row = start + lo - axis.pad_before - need.start;
                let last_row = start + hi - axis.pad_before - need.start;
                let args = RowArgs {
                    image: &expanded[first_row * line..last_row * line],
                    taps: &b.taps[lo * kernel * b.mid + channels.start..],
                    bias: &b.dw_bias[channels.clone()],
                    channels: width,
                    tap_stride: b.mid,
                    width: size,
                    kernel,
                    stride,
                    relu6: true,
                };
                let row = &mut dw[(oy - o0) * wo * width..(oy - o0 + 1) * wo * width];
                // SAFETY: f32 and MaybeUninit<f32> have the same layout, and
                // the row function only ever writes initialised values.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(
                        row.as_mut_ptr().cast::<MaybeUninit<f32>>(),
                        row.len(),
                    )
                };
                (self.row_fn)(&args, axis, hi - lo, row);
            }
            let pixels = o0 * wo..o1 * wo;
            let epilogue = Epilogue {
                bias: first,
                residual: (first && b.skip).then(|| (&x[pixels.start * cin..], cin)),
                relu6: false,
            };
            self.mm(
                dw,
                width,
                pixels.len(),
                &b.project,
                channels.clone(),
                0..b.project.panels(),
                &mut out[(pixels.start - base) * cout..(pixels.end - base) * cout],
                cout,
                epilogue,
                &mut s.pairs,
            );
        }
    }

    /// Head 1x1 convolution with ReLU6 and the global average pool, split by
    /// output channels.
    fn head(&self, x: &[f32], pixels: usize, threads: usize, pooled: &mut [f32]) {
        let parts = split(self.head.panels(), threads);
        let k = self.head.k();
        let part = |(panels, pooled): (Range<usize>, &mut [f32])| {
            let mut s = take(&self.scratch);
            let cols = pooled.len();
            let y = at_least(&mut s.depthwise, pixels * cols);
            self.mm(
                x,
                k,
                pixels,
                &self.head,
                0..k,
                panels,
                y,
                cols,
                Epilogue::RELU6,
                &mut s.pairs,
            );
            pooled.fill(0.0);
            for px in y.chunks_exact(cols) {
                for (p, v) in pooled.iter_mut().zip(px) {
                    *p += v;
                }
            }
            let scale = 1.0 / pixels as f32;
            pooled.iter_mut().for_each(|p| *p *= scale);
            give(&self.scratch, s);
        };
        let pieces = split_columns(pooled, &parts, HEAD_CHANNELS);
        if parts.len() > 1 {
            parts.clone().into_par_iter().zip(pieces).for_each(part);
        } else {
            parts.clone().into_iter().zip(pieces).for_each(part);
        }
    }

    /// The classifier over every image's pooled features at once, so its
    /// 5 MB of weights are read once per batch; split by classes.
    fn classify(&self, pooled: &[f32], n: usize, threads: usize) -> Vec<f32> {
        let parts = split(self.fc.panels(), threads);
        let pieces: Vec<Vec<f32>> = parts
            .par_iter()
            .map(|panels| {
                let cols = (panels.end * NR).min(NUM_CLASSES) - panels.start * NR;
                let mut y = vec![0f32; n * cols];
                self.mm(
                    pooled,
                    HEAD_CHANNELS,
                    n,
                    &self.fc,
                    0..HEAD_CHANNELS,
                    panels.clone(),
                    &mut y,
                    cols,
                    Epilogue::LINEAR,
                    &mut Vec::new(),
                );
                y
            })
            .collect();
        let mut logits = Vec::with_capacity(n * NUM_CLASSES);
        for i in 0..n {
            for (piece, panels) in pieces.iter().zip(&parts) {
                let cols = (panels.end * NR).min(NUM_CLASSES) - panels.start * NR;
                logits.extend_from_slice(&piece[i * cols..(i + 1) * cols]);
            }
        }
        logits
    }
}

/// `v` (one row of `len` columns) cut at the column boundaries of `parts`.
fn split_columns<'a>(v: &'a mut [f32], parts: &[Range<usize>], len: usize) -> Vec<&'a mut [f32]> {
    let mut rest = v;
    parts
        .iter()
        .map(|p| {
            let cols = (p.end * NR).min(len) - p.start * NR;
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(cols);
            rest = tail;
            head
        })
        .collect()
}

/// The stem's input patches for output rows `rows`, `[pixels, (ky, kx, c)]`,
/// from one NCHW image with TensorFlow "same" padding (zeros outside).
fn im2col(x: &[f32], size: usize, axis: Axis, rows: Range<usize>, cols: &mut [f32]) {
    let plane = size * size;
    let (pad, _) = same_padding(size, STEM_KERNEL, STEM_STRIDE);
    let mut patches = cols.chunks_exact_mut(STEM_TAPS);
    for oy in rows {
        for ox in 0..axis.out {
            let Some(patch) = patches.next() else { return };
            for ky in 0..STEM_KERNEL {
                let iy = (oy * STEM_STRIDE + ky)
                    .checked_sub(pad)
                    .filter(|&i| i < size);
                for kx in 0..STEM_KERNEL {
                    let ix = (ox * STEM_STRIDE + kx)
                        .checked_sub(pad)
                        .filter(|&i| i < size);
                    let tap = &mut patch[(ky * STEM_KERNEL + kx) * 3..][..3];
                    match (iy, ix) {
                        (Some(iy), Some(ix)) => {
                            for (c, t) in tap.iter_mut().enumerate() {
                                *t = x[c * plane + iy * size + ix];
                            }
                        }
                        _ => tap.fill(0.0),
                    }
                }
            }
        }
    }
}

impl CustomOp1 for Fused {
    fn name(&self) -> &'static str {
        "efficientnet-lite0-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            bail!("efficientnet: the fused CPU network takes f32 input")
        };
        let (n, c, h, w) = layout.shape().dims4()?;
        if (c, h, w) != (3, INPUT_SIZE, INPUT_SIZE) {
            bail!(
                "efficientnet: input is {:?}, expected [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]",
                layout.dims()
            );
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("efficientnet: input must be contiguous")
        };
        let logits = self.run(&data[start..end], n);
        Ok((CpuStorage::F32(logits), Shape::from((n, NUM_CLASSES))))
    }
}
