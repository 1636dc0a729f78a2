//! 3x3, stride 1, padding 1 convolutions over NHWC activations by Winograd's F(2x2, 3x3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 4x4 input tile becomes 16 points, each
//! point is one GEMM over the channels with its own packed kernel, and the 16 products become a 2x2 output
//! tile. That is 16 multiplies for 4 outputs where im2col takes 36, 2.25x fewer; the transforms are adds.
//!
//! A task takes a band of tile rows (and, where the map is small and the kernel large, a group of output
//! panels, so that each thread streams its own part of the weights): input transform, 16 GEMMs and output
//! transform run back to back on buffers that stay in cache. The transforms are plain lane-wise code that
//! the compiler vectorises for the instruction set chosen at run time.

use std::ops::Range;

use rayon::prelude::*;

use super::isa::Isa;
use super::packed_gemm::{Epilogue, NR, PackedB, gemm};

thread_local! {
    /// Each thread's transformed tiles and products, kept from task to task and layer to layer: allocated
    /// afresh, buffers this size come from the kernel as zeroed pages on every call.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Points of a transformed tile: 4x4.
const POINTS: usize = 16;
/// Tiles a task multiplies at least, so that each of its GEMMs has rows enough to block well.
const TILES_PER_TASK: usize = 64;
/// Channels the transforms handle at once: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// A 3x3 convolution's kernel transformed and packed for the 16 GEMMs, with its bias and activation.
#[derive(Debug)]
pub struct Winograd3x3 {
    /// Point p's kernel, `[cin, cout]`: row ci, column co is `(G g G^T)[p / 4][p % 4]` for `g = kernel[co][ci]`.
    points: Vec<PackedB>,
    bias: Vec<f32>,
    /// Negative slope of a leaky ReLU applied after the bias; `None` leaves the output linear.
    leaky: Option<f32>,
    cin: usize,
    cout: usize,
}

/// Where the tiles of a map lie.
#[derive(Clone, Copy)]
struct Geometry {
    h: usize,
    w: usize,
    /// Tile rows and columns of one image: a tile covers 2x2 outputs.
    th: usize,
    tw: usize,
}

impl Geometry {
    fn new(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }
}

impl Winograd3x3 {
    /// From an OIHW kernel `[cout, cin, 3, 3]` (batch norm already folded in) and its bias; `leaky` is the
    /// negative slope of the activation, if any, in [0, 1].
    pub fn new(kernel: &[f32], bias: &[f32], cin: usize, cout: usize, leaky: Option<f32>) -> Self {
        assert!(
            cin > 0 && cout > 0 && kernel.len() == cout * cin * 9 && bias.len() == cout,
            "winograd: a [{cout}, {cin}, 3, 3] kernel needs {} weights and {cout} biases, got {} and {}",
            cout * cin * 9,
            kernel.len(),
            bias.len()
        );
        let mut weights = vec![vec![0f32; cin * cout]; POINTS];
        // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]], applied to rows, then to columns.
        let g_of = |[a, b, c]: [f32; 3]| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
        for o in 0..cout {
            for c in 0..cin {
                let g = &kernel[(o * cin + c) * 9..][..9];
                let columns: [[f32; 4]; 3] =
                    std::array::from_fn(|x| g_of([g[x], g[3 + x], g[6 + x]]));
                for y in 0..4 {
                    let u = g_of([columns[0][y], columns[1][y], columns[2][y]]);
                    for (x, u) in u.into_iter().enumerate() {
                        weights[y * 4 + x][c * cout + o] = u;
                    }
                }
            }
        }
        let zeros = vec![0f32; cout];
        Self {
            points: weights
                .iter()
                .map(|w| PackedB::new(w, &zeros, cin, cout))
                .collect(),
            bias: bias.to_vec(),
            leaky,
            cin,
            cout,
        }
    }

    /// Input channels.
    pub fn cin(&self) -> usize {
        self.cin
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.cout
    }

    /// The convolution of `x`, `[n, h, w, cin]` row-major, into a new `[n, h, w, cout]`, split over the
    /// current rayon pool.
    pub fn run(&self, isa: Isa, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        assert!(
            x.len() == n * h * w * self.cin,
            "winograd: {} values are not a [{n}, {h}, {w}, {}] map",
            x.len(),
            self.cin
        );
        let geometry = Geometry::new(h, w);
        let len = n * h * w * self.cout;
        let rows = n * geometry.th;
        if len == 0 {
            return Vec::new();
        }
        // Not zeroed first: the tasks write every value (see `Target`).
        let mut out = Vec::<f32>::with_capacity(len);
        let band = TILES_PER_TASK.div_ceil(geometry.tw).min(rows);
        let bands = rows.div_ceil(band);
        let panels = self.points[0].panels();
        // Too few bands to keep every thread busy: split the output channels too, in pairs of panels (the
        // microkernel's width), so each thread reads only its share of the kernel.
        let wanted = (2 * rayon::current_num_threads()).div_ceil(bands);
        let per_group = panels
            .div_ceil(wanted.clamp(1, panels.div_ceil(2)))
            .next_multiple_of(2)
            .min(panels);
        let groups = panels.div_ceil(per_group);
        let target = Target(out.as_mut_ptr());
        (0..bands * groups).into_par_iter().for_each(|task| {
            let (b, g) = (task / groups, task % groups);
            let tile_rows = b * band..((b + 1) * band).min(rows);
            let group = g * per_group..((g + 1) * per_group).min(panels);
            SCRATCH.with_borrow_mut(|(v, m)| {
                self.band(isa, x, geometry, tile_rows, group, v, m, target)
            });
        });
        // SAFETY: every pixel of every image lies in one tile of one band, and every channel in one group, so
        // the tasks above wrote all `len` values; a panic in one of them would have unwound past this line.
        unsafe { out.set_len(len) };
        out
    }

    /// One task: the tiles of `tile_rows` (counted over the whole batch), output panels `group`.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        isa: Isa,
        x: &[f32],
        geometry: Geometry,
        tile_rows: Range<usize>,
        group: Range<usize>,
        v: &mut Vec<f32>,
        m: &mut Vec<f32>,
        target: Target,
    ) {
        let tiles = tile_rows.len() * geometry.tw;
        let col0 = group.start * NR;
        let cols = (group.end * NR).min(self.cout) - col0;
        v.resize(POINTS * tiles * self.cin, 0.0);
        m.resize(POINTS * tiles * cols, 0.0);
        transform_input(isa, x, self.cin, geometry, tile_rows.clone(), v);
        let products = v
            .chunks_exact(tiles * self.cin)
            .zip(m.chunks_exact_mut(tiles * cols));
        for ((a, c), packed) in products.zip(&self.points) {
            gemm(
                isa,
                a,
                self.cin,
                tiles,
                packed,
                0..self.cin,
                group.clone(),
                c,
                cols,
                Epilogue {
                    bias: false,
                    residual: None,
                    relu6: false,
                },
            );
        }
        let output = Output {
            target,
            cout: self.cout,
            col0,
            bias: &self.bias[col0..col0 + cols],
            leaky: self.leaky,
        };
        transform_output(isa, m, cols, geometry, tile_rows, &output);
    }
}

/// The output map, written by every task at once.
#[derive(Clone, Copy)]
struct Target(*mut f32);

// SAFETY: tasks write disjoint parts of the map: each output pixel lies in exactly one tile, each tile in
// exactly one band, and each channel in exactly one group; `run` outlives them all.
unsafe impl Send for Target {}
unsafe impl Sync for Target {}

/// Where and how a task's output transform writes.
struct Output<'a> {
    target: Target,
    cout: usize,
    /// The group's first channel and its biases.
    col0: usize,
    bias: &'a [f32],
    leaky: Option<f32>,
}

/// `B^T d B` for one tile, lane by lane: B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
/// Written as one scalar transform per lane so that the compiler turns the lane loop into vectors.
#[inline(always)]
fn input_tile<const L: usize>(d: &[[f32; L]; POINTS], v: &mut [[f32; L]; POINTS]) {
    for i in 0..L {
        let mut t = [0f32; POINTS];
        for x in 0..4 {
            let (d0, d1, d2, d3) = (d[x][i], d[4 + x][i], d[8 + x][i], d[12 + x][i]);
            t[x] = d0 - d2;
            t[4 + x] = d1 + d2;
            t[8 + x] = d2 - d1;
            t[12 + x] = d1 - d3;
        }
        for y in 0..4 {
            let (t0, t1, t2, t3) = (t[4 * y], t[4 * y + 1], t[4 * y + 2], t[4 * y + 3]);
            v[4 * y][i] = t0 - t2;
            v[4 * y + 1][i] = t1 + t2;
            v[4 * y + 2][i] = t2 - t1;
            v[4 * y + 3][i] = t1 - t3;
        }
    }
}

/// `A^T m A` for one tile plus the bias, then the activation, lane by lane: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
#[inline(always)]
fn output_tile<const L: usize>(
    m: &[[f32; L]; POINTS],
    bias: &[f32; L],
    leaky: Option<f32>,
    y: &mut [[f32; L]; 4],
) {
    for i in 0..L {
        let mut s = [0f32; 8];
        for x in 0..4 {
            let (m0, m1, m2, m3) = (m[x][i], m[4 + x][i], m[8 + x][i], m[12 + x][i]);
            s[x] = m0 + m1 + m2;
            s[4 + x] = m1 - m2 - m3;
        }
        for r in 0..2 {
            let (s0, s1, s2, s3) = (s[4 * r], s[4 * r + 1], s[4 * r + 2], s[4 * r + 3]);
            y[2 * r][i] = s0 + s1 + s2 + bias[i];
            y[2 * r + 1][i] = s1 - s2 - s3 + bias[i];
        }
        if let Some(slope) = leaky {
            // max(v, slope v) is the leaky ReLU without a branch, so it vectorises.
            for y in y.iter_mut() {
                y[i] = y[i].max(slope * y[i]);
            }
        }
    }
}

/// The input transform of `tile_rows` into `v`, `[16][tiles][c]`, on the instruction set `isa`.
fn transform_input(
    isa: Isa,
    x: &[f32],
    c: usize,
    geometry: Geometry,
    tile_rows: Range<usize>,
    v: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only Avx512 on a CPU that has AVX-512F (`Isa::available`).
        Isa::Avx512 => unsafe { x86::input_avx512(x, c, geometry, tile_rows, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: likewise for AVX2 and FMA.
        Isa::Avx2Fma => unsafe { x86::input_avx2(x, c, geometry, tile_rows, v) },
        _ => input_band(x, c, geometry, tile_rows, v),
    }
}

/// The output transform of `m`, `[16][tiles][cols]`, into the map, on the instruction set `isa`.
fn transform_output(
    isa: Isa,
    m: &[f32],
    cols: usize,
    geometry: Geometry,
    tile_rows: Range<usize>,
    output: &Output<'_>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `transform_input`.
        Isa::Avx512 => unsafe { x86::output_avx512(m, cols, geometry, tile_rows, output) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `transform_input`.
        Isa::Avx2Fma => unsafe { x86::output_avx2(m, cols, geometry, tile_rows, output) },
        _ => output_band(m, cols, geometry, tile_rows, output),
    }
}

#[inline(always)]
fn input_band(x: &[f32], c: usize, geometry: Geometry, tile_rows: Range<usize>, v: &mut [f32]) {
    let Geometry { h, w, th, tw } = geometry;
    let tiles = tile_rows.len() * tw;
    for (k, row) in tile_rows.enumerate() {
        let (img, ty) = (row / th, row % th);
        let image = &x[img * h * w * c..(img + 1) * h * w * c];
        for tx in 0..tw {
            let t = k * tw + tx;
            // The pixel under each point, or none in the padding (and past the last row or column).
            let pixel: [Option<usize>; POINTS] = std::array::from_fn(|p| {
                let (iy, ix) = (
                    (2 * ty + p / 4).wrapping_sub(1),
                    (2 * tx + p % 4).wrapping_sub(1),
                );
                (iy < h && ix < w).then(|| (iy * w + ix) * c)
            });
            let mut d = [[0f32; LANES]; POINTS];
            let mut points = [[0f32; LANES]; POINTS];
            let mut ch = 0;
            while ch < c {
                // Whole vectors move as fixed-size copies; only the channels past the last multiple of LANES take
                // the copies of run-time length.
                let take = LANES.min(c - ch);
                for (lane, pixel) in d.iter_mut().zip(&pixel) {
                    match pixel {
                        Some(at) if take == LANES => {
                            lane.copy_from_slice(&image[at + ch..][..LANES])
                        }
                        Some(at) => {
                            lane[..take].copy_from_slice(&image[at + ch..][..take]);
                            lane[take..].fill(0.0);
                        }
                        None => *lane = [0.0; LANES],
                    }
                }
                input_tile(&d, &mut points);
                for (p, point) in points.iter().enumerate() {
                    let at = (p * tiles + t) * c + ch;
                    if take == LANES {
                        v[at..][..LANES].copy_from_slice(point);
                    } else {
                        v[at..][..take].copy_from_slice(&point[..take]);
                    }
                }
                ch += take;
            }
        }
    }
}

#[inline(always)]
fn output_band(
    m: &[f32],
    cols: usize,
    geometry: Geometry,
    tile_rows: Range<usize>,
    output: &Output<'_>,
) {
    let Geometry { h, w, th, tw } = geometry;
    let tiles = tile_rows.len() * tw;
    for (k, row) in tile_rows.enumerate() {
        let (img, ty) = (row / th, row % th);
        for tx in 0..tw {
            let t = k * tw + tx;
            // The four output pixels of the tile; those past the last row or column are dropped.
            let pixels: [Option<usize>; 4] = std::array::from_fn(|q| {
                let (oy, ox) = (2 * ty + q / 2, 2 * tx + q % 2);
                (oy < h && ox < w).then(|| ((img * h + oy) * w + ox) * output.cout + output.col0)
            });
            let mut products = [[0f32; LANES]; POINTS];
            let mut bias = [0f32; LANES];
            let mut y = [[0f32; LANES]; 4];
            let mut ch = 0;
            while ch < cols {
                let take = LANES.min(cols - ch);
                for (p, lane) in products.iter_mut().enumerate() {
                    let at = (p * tiles + t) * cols + ch;
                    if take == LANES {
                        lane.copy_from_slice(&m[at..][..LANES]);
                    } else {
                        lane[..take].copy_from_slice(&m[at..][..take]);
                    }
                }
                if take == LANES {
                    bias.copy_from_slice(&output.bias[ch..][..LANES]);
                } else {
                    bias[..take].copy_from_slice(&output.bias[ch..][..take]);
                }
                output_tile(&products, &bias, output.leaky, &mut y);
                for (y, pixel) in y.iter().zip(pixels) {
                    let Some(at) = pixel else { continue };
                    // SAFETY: `at + ch .. at + ch + take` lies in the pixel's channels of this task's group
                    // (`Target`), inside the map `run` allocated.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(output.target.0.add(at + ch), take)
                    };
                    if take == LANES {
                        dst[..LANES].copy_from_slice(y);
                    } else {
                        dst.copy_from_slice(&y[..take]);
                    }
                }
                ch += take;
            }
        }
    }
}

/// The transforms compiled for each instruction set, so the lane-wise code becomes its vectors.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::ops::Range;

    use super::{Geometry, Output, input_band, output_band};

    /// The two transforms compiled with `$features`.
    macro_rules! compiled_for {
        ($features:literal, $input:ident, $output:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $input(
                x: &[f32],
                c: usize,
                geometry: Geometry,
                tile_rows: Range<usize>,
                v: &mut [f32],
            ) {
                input_band(x, c, geometry, tile_rows, v);
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $output(
                m: &[f32],
                cols: usize,
                geometry: Geometry,
                tile_rows: Range<usize>,
                output: &Output<'_>,
            ) {
                output_band(m, cols, geometry, tile_rows, output);
            }
        };
    }

    compiled_for!("avx512f,avx2,fma", input_avx512, output_avx512);
    compiled_for!("avx2,fma", input_avx2, output_avx2);
}
