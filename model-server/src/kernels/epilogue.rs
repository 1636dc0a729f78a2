//! Bias, ReLU6 and residual add applied in place to a layer's fresh output:
//! one pass over memory instead of the two or three separate candle ops take.

use candle_core::{CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor, bail};
use rayon::prelude::*;

/// Elements each rayon task handles; small tasks cost more in scheduling than
/// this memory-bound loop saves.
const TASK_ELEMENTS: usize = 1 << 14;

/// Per-channel bias with an optional ReLU6, for channels-last outputs.
#[derive(Debug, Clone)]
pub struct Epilogue {
    bias: Tensor,
    bias_cpu: Vec<f32>,
    relu6: bool,
}

impl Epilogue {
    /// Bias `[C]` for outputs whose last dimension is C.
    pub fn new(bias: &Tensor, relu6: bool) -> Result<Self> {
        let bias = bias.flatten_all()?.to_dtype(DType::F32)?;
        let bias_cpu = bias.to_vec1()?;
        Ok(Self {
            bias,
            bias_cpu,
            relu6,
        })
    }

    /// The bias in `dtype`, for the candle path of devices other than the CPU.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            bias: self.bias.to_dtype(dtype)?,
            bias_cpu: self.bias_cpu.clone(),
            relu6: self.relu6,
        })
    }

    /// Number of channels the bias covers.
    pub fn channels(&self) -> usize {
        self.bias_cpu.len()
    }

    /// Adds bias (and `residual`, before the activation) to `y`, in place
    /// when `y` is a contiguous f32 CPU tensor. Pass a layer's fresh output:
    /// any other tensor sharing `y`'s storage sees the change.
    pub fn apply(&self, y: Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if y.dims().last() != Some(&self.channels()) {
            bail!(
                "epilogue: output shape {:?} does not end in {} channels",
                y.dims(),
                self.channels()
            );
        }
        if !y.device().is_cpu() || y.dtype() != DType::F32 || !y.is_contiguous() {
            return self.apply_with_candle(&y, residual);
        }
        let op = BiasAct {
            bias: &self.bias_cpu,
            relu6: self.relu6,
        };
        match residual {
            None => y.inplace_op1(&op)?,
            Some(r) => {
                if r.dims() != y.dims() {
                    bail!(
                        "epilogue: residual shape {:?} differs from output shape {:?}",
                        r.dims(),
                        y.dims()
                    );
                }
                y.inplace_op2(&r.contiguous()?, &op)?
            }
        }
        Ok(y)
    }

    fn apply_with_candle(&self, y: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let mut y = y.broadcast_add(&self.bias.to_device(y.device())?)?;
        if let Some(r) = residual {
            y = (y + r)?;
        }
        if self.relu6 {
            y.clamp(0f32, 6f32)
        } else {
            Ok(y)
        }
    }
}

struct BiasAct<'a> {
    bias: &'a [f32],
    relu6: bool,
}

fn f32_slice_mut<'s>(storage: &'s mut CpuStorage, layout: &Layout) -> Result<&'s mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        bail!("epilogue: f32 tensors only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("epilogue: output must be contiguous")
    };
    Ok(&mut data[start..end])
}

impl BiasAct<'_> {
    fn run(&self, y: &mut [f32], residual: Option<&[f32]>) {
        let c = self.bias.len();
        let task = (TASK_ELEMENTS / c).max(1) * c;
        let body = |rows: &mut [f32], res: Option<&[f32]>| {
            for (i, row) in rows.chunks_exact_mut(c).enumerate() {
                for (o, b) in row.iter_mut().zip(self.bias) {
                    *o += b;
                }
                if let Some(res) = res {
                    for (o, r) in row.iter_mut().zip(&res[i * c..(i + 1) * c]) {
                        *o += r;
                    }
                }
                if self.relu6 {
                    for o in row.iter_mut() {
                        *o = o.clamp(0.0, 6.0);
                    }
                }
            }
        };
        match residual {
            None => y.par_chunks_mut(task).for_each(|rows| body(rows, None)),
            Some(r) => y
                .par_chunks_mut(task)
                .zip(r.par_chunks(task))
                .for_each(|(rows, res)| body(rows, Some(res))),
        }
    }
}

impl InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "bias-relu6"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.run(f32_slice_mut(storage, layout)?, None);
        Ok(())
    }
}

impl InplaceOp2 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "bias-residual-relu6"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let CpuStorage::F32(res) = s2 else {
            bail!("epilogue: f32 residual only")
        };
        let Some((start, end)) = l2.contiguous_offsets() else {
            bail!("epilogue: residual must be contiguous")
        };
        self.run(f32_slice_mut(s1, l1)?, Some(&res[start..end]));
        Ok(())
    }
}
