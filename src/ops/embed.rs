//! Token embedding, the twin of `kernels/embed.cu`: lookup forward, scatter-add backward into an f32
//! gradient table; and `rows_store`, the row scatter the KV cache appends a decode step with (a
//! layer's keys and values in one launch: `rows_store_pair`); and `rows_sum`, the deterministic
//! adjoint of a row gather (a shared prompt's gradients summed back from every sequence reading it).

use cudarc::driver::PushKernelArg;
use half::bf16;

use crate::device::profile;
use crate::device::tensor::{host_f32, CudaElem};
use crate::device::{same_device, DType, Device, Tensor};
use crate::error::{Error, Result};
use crate::ops::{per_row, to_i32};

const OP_FWD: &str = "embed_fwd";
const OP_BWD: &str = "embed_bwd";
const OP_STORE: &str = "rows_store";
const OP_SUM: &str = "rows_sum";

/// `ids` must be 1-D i32 within `0..bound` (checked where they live on the host); `what` names the
/// entries and the bound in the error, e.g. ("token id", "the vocabulary").
fn check_ids(op: &'static str, ids: &Tensor, bound: usize, what: (&str, &str)) -> Result<usize> {
    if ids.shape().len() != 1 {
        return Err(Error::shape(
            op,
            format!("ids must be 1-D, got {:?}", ids.shape()),
        ));
    }
    ids.expect_dtype(op, DType::I32)?;
    if let Device::Cpu = ids.device() {
        if let Some((i, &id)) = ids
            .cpu_i32(op)?
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id as usize >= bound)
        {
            return Err(Error::Unsupported {
                op,
                detail: format!(
                    "{} {id} at position {i} is outside {} of {bound}",
                    what.0, what.1
                ),
            });
        }
    }
    Ok(ids.numel())
}

/// `out[n, :] = table[ids[n], :]`. table: [V, d]; ids: [N] i32.
pub fn embed_fwd(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let device = same_device(OP_FWD, &[table, ids])?;
    let _profile = profile::scope(device, OP_FWD);
    let (vocab, d) = table.dims2(OP_FWD)?;
    let n = check_ids(OP_FWD, ids, vocab, ("token id", "the vocabulary"))?;
    match device {
        Device::Cpu => {
            let t = host_f32(table, OP_FWD)?;
            let mut out = Vec::with_capacity(n * d);
            for &id in ids.cpu_i32(OP_FWD)? {
                out.extend_from_slice(&t[id as usize * d..(id as usize + 1) * d]);
            }
            Tensor::from_f32_as(&[n, d], &out, table.dtype(), device)
        }
        Device::Cuda(_) => match table.dtype() {
            DType::F32 => fwd_cuda::<f32>(table, ids, n, vocab, d),
            DType::BF16 => fwd_cuda::<bf16>(table, ids, n, vocab, d),
            DType::I32 => Err(Error::DType {
                op: OP_FWD,
                dtype: "i32",
            }),
        },
    }
}

/// `dtable[ids[n], :] += dout[n, :]`; dtable is [V, d] f32.
pub fn embed_bwd(dtable: &mut Tensor, dout: &Tensor, ids: &Tensor) -> Result<()> {
    let device = same_device(OP_BWD, &[dtable, dout, ids])?.clone();
    let _profile = profile::scope(&device, OP_BWD);
    let (vocab, d) = dtable.dims2(OP_BWD)?;
    dtable.expect_dtype(OP_BWD, DType::F32)?;
    let n = check_ids(OP_BWD, ids, vocab, ("token id", "the vocabulary"))?;
    dout.expect_shape(OP_BWD, "dout", &[n, d])?;
    match &device {
        Device::Cpu => {
            let g = host_f32(dout, OP_BWD)?.into_owned();
            let ids = ids.cpu_i32(OP_BWD)?.to_vec();
            let t = dtable.cpu_f32_mut(OP_BWD)?;
            for (row, &id) in ids.iter().enumerate() {
                for c in 0..d {
                    t[id as usize * d + c] += g[row * d + c];
                }
            }
            Ok(())
        }
        Device::Cuda(_) => match dout.dtype() {
            DType::F32 => bwd_cuda::<f32>(dtable, dout, ids, n, vocab, d),
            DType::BF16 => bwd_cuda::<bf16>(dtable, dout, ids, n, vocab, d),
            DType::I32 => Err(Error::DType {
                op: OP_BWD,
                dtype: "i32",
            }),
        },
    }
}

/// `dst[rows[n], :] = src[n, :]`: dst [R, d], src [N, d] of the same dtype, rows [N] i32, distinct
/// (a row written twice keeps either value).
pub fn rows_store(dst: &mut Tensor, src: &Tensor, rows: &Tensor) -> Result<()> {
    store(dst, src, None, rows)
}

/// `rows_store` of two pairs with the same rows in one launch: a layer's new keys and values into
/// its KV cache. `dst2` has `dst`'s shape and dtype, `src2` `src`'s.
pub fn rows_store_pair(
    dst: &mut Tensor,
    src: &Tensor,
    dst2: &mut Tensor,
    src2: &Tensor,
    rows: &Tensor,
) -> Result<()> {
    store(dst, src, Some((dst2, src2)), rows)
}

/// Groups of source rows, each summed into one output row by `rows_sum`: group `u` is
/// `list[offsets[u]..offsets[u + 1]]`. Checked on the host when built, so a launch cannot read
/// outside its tables.
pub struct RowGroups {
    offsets: Vec<i32>,
    list: Vec<i32>,
    src_rows: usize,
    dev: Option<(Tensor, Tensor)>,
}

impl RowGroups {
    /// `groups[u]`: the rows of a `[src_rows, d]` source summed, in this order, into output row `u`.
    pub fn new(groups: &[Vec<usize>], src_rows: usize, device: &Device) -> Result<RowGroups> {
        let mut offsets = vec![0i32];
        let mut list = Vec::new();
        for (u, g) in groups.iter().enumerate() {
            for &r in g {
                if r >= src_rows {
                    return Err(Error::shape(
                        OP_SUM,
                        format!("group {u} lists row {r} of a source of {src_rows} rows"),
                    ));
                }
                list.push(to_i32(OP_SUM, "row", r)?);
            }
            offsets.push(to_i32(OP_SUM, "list length", list.len())?);
        }
        let dev = match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some((
                Tensor::from_i32(&[offsets.len()], offsets.clone(), device)?,
                Tensor::from_i32(&[list.len().max(1)], list.clone(), device)?,
            )),
        };
        Ok(RowGroups {
            offsets,
            list,
            src_rows,
            dev,
        })
    }

    /// Output rows (groups).
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the source the groups index.
    pub fn src_rows(&self) -> usize {
        self.src_rows
    }

    fn group(&self, u: usize) -> &[i32] {
        &self.list[self.offsets[u] as usize..self.offsets[u + 1] as usize]
    }
}

/// `out[u, :] = Σ src[r, :]` over the rows `r` of group `u`, summed in f32 in the group's order and
/// rounded once to src's dtype: bit for bit repeatable, unlike `embed_bwd`'s atomics. It is the
/// adjoint of `embed_fwd` gathering rows of `out`'s shape into `src`'s when each source row belongs
/// to the group of the row it was gathered from. src: `[groups.src_rows(), d]`; out `[groups.len(), d]`.
pub fn rows_sum(src: &Tensor, groups: &RowGroups) -> Result<Tensor> {
    let device = same_device(OP_SUM, &[src])?;
    let _profile = profile::scope(device, OP_SUM);
    let (rows, d) = src.dims2(OP_SUM)?;
    if rows != groups.src_rows {
        return Err(Error::shape(
            OP_SUM,
            format!(
                "the groups index a source of {} rows; src has {rows}",
                groups.src_rows
            ),
        ));
    }
    let n = groups.len();
    match device {
        Device::Cpu => {
            if groups.dev.is_some() {
                return Err(Error::DeviceMismatch {
                    op: OP_SUM,
                    detail: "the row groups were built for CUDA".into(),
                });
            }
            let x = host_f32(src, OP_SUM)?;
            let mut out = vec![0.0f32; n * d];
            for (u, o) in out.chunks_mut(d.max(1)).enumerate().take(n) {
                for &r in groups.group(u) {
                    for (acc, &v) in o.iter_mut().zip(&x[r as usize * d..][..d]) {
                        *acc += v;
                    }
                }
            }
            Tensor::from_f32_as(&[n, d], &out, src.dtype(), device)
        }
        Device::Cuda(_) => match src.dtype() {
            DType::F32 => sum_cuda::<f32>(src, groups, n, rows, d),
            DType::BF16 => sum_cuda::<bf16>(src, groups, n, rows, d),
            DType::I32 => Err(Error::DType {
                op: OP_SUM,
                dtype: "i32",
            }),
        },
    }
}

fn sum_cuda<T: CudaElem>(
    src: &Tensor,
    groups: &RowGroups,
    n: usize,
    rows: usize,
    d: usize,
) -> Result<Tensor> {
    let dev = src.device().as_cuda(OP_SUM)?;
    let (offsets, list) = groups.dev.as_ref().ok_or_else(|| Error::DeviceMismatch {
        op: OP_SUM,
        detail: "the row groups were built for the CPU".into(),
    })?;
    same_device(OP_SUM, &[src, offsets, list])?;
    let mut out = Tensor::empty(&[n, d], T::DTYPE, src.device())?;
    if n == 0 || d == 0 {
        return Ok(out);
    }
    let (r, dd) = (to_i32(OP_SUM, "rows", rows)?, to_i32(OP_SUM, "d", d)?);
    let f = dev.function("embed", T::pick("rows_sum_f32", "rows_sum_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut out, OP_SUM)?)
        .arg(T::slice(src, OP_SUM)?)
        .arg(offsets.cuda_i32(OP_SUM)?)
        .arg(list.cuda_i32(OP_SUM)?)
        .arg(&r)
        .arg(&dd);
    // SAFETY: out holds n*d elements, src rows*d; offsets (n+1 entries, non-decreasing from 0) and
    // list (every entry below rows) were checked on the host when the groups were built.
    unsafe { b.launch(per_row(OP_SUM, n, 128, 0)?) }?;
    Ok(out)
}

fn store(
    dst: &mut Tensor,
    src: &Tensor,
    mut second: Option<(&mut Tensor, &Tensor)>,
    rows: &Tensor,
) -> Result<()> {
    let device = same_device(OP_STORE, &[dst, src, rows])?.clone();
    let _profile = profile::scope(&device, OP_STORE);
    let (r, d) = dst.dims2(OP_STORE)?;
    let n = check_ids(OP_STORE, rows, r, ("row", "the destination's rows"))?;
    src.expect_shape(OP_STORE, "src", &[n, d])?;
    src.expect_dtype(OP_STORE, dst.dtype())?;
    if let Some((dst2, src2)) = &second {
        same_device(OP_STORE, &[dst, dst2, src2])?;
        dst2.expect_shape(OP_STORE, "dst2", &[r, d])?;
        dst2.expect_dtype(OP_STORE, dst.dtype())?;
        src2.expect_shape(OP_STORE, "src2", &[n, d])?;
        src2.expect_dtype(OP_STORE, dst.dtype())?;
    }
    match &device {
        Device::Cpu => {
            let to = rows.cpu_i32(OP_STORE)?.to_vec();
            for (i, &row) in to.iter().enumerate() {
                dst.copy_rows(row as usize, src, i, 1)?;
                if let Some((dst2, src2)) = second.as_mut() {
                    dst2.copy_rows(row as usize, src2, i, 1)?;
                }
            }
            Ok(())
        }
        Device::Cuda(_) => match dst.dtype() {
            DType::F32 => store_cuda::<f32>(dst, src, second, rows, n, r, d),
            DType::BF16 => store_cuda::<bf16>(dst, src, second, rows, n, r, d),
            DType::I32 => Err(Error::DType {
                op: OP_STORE,
                dtype: "i32",
            }),
        },
    }
}

fn store_cuda<T: CudaElem>(
    dst: &mut Tensor,
    src: &Tensor,
    second: Option<(&mut Tensor, &Tensor)>,
    rows: &Tensor,
    n: usize,
    r: usize,
    d: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let dev = src.device().as_cuda(OP_STORE)?.clone();
    let (rr, dd) = (to_i32(OP_STORE, "rows", r)?, to_i32(OP_STORE, "d", d)?);
    let f = dev.function("embed", T::pick("rows_store_f32", "rows_store_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(dst, OP_STORE)?)
        .arg(T::slice(src, OP_STORE)?);
    // Without a second pair the kernel's blocks all take the first (gridDim.y 1): null pointers.
    let null = 0u64;
    let pairs = match second {
        Some((dst2, src2)) => {
            b.arg(T::slice_mut(dst2, OP_STORE)?)
                .arg(T::slice(src2, OP_STORE)?);
            2
        }
        None => {
            b.arg(&null).arg(&null);
            1
        }
    };
    b.arg(rows.cuda_i32(OP_STORE)?).arg(&rr).arg(&dd);
    let mut cfg = per_row(OP_STORE, n, 128, 0)?;
    cfg.grid_dim.1 = pairs;
    // SAFETY: dst (and dst2) hold r*d elements, src (and src2) n*d, rows n; rows are range-checked
    // in the kernel; blockIdx.y reaches the second pair only when it is given.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

fn fwd_cuda<T: CudaElem>(
    table: &Tensor,
    ids: &Tensor,
    n: usize,
    vocab: usize,
    d: usize,
) -> Result<Tensor> {
    let dev = table.device().as_cuda(OP_FWD)?;
    let mut out = Tensor::empty(&[n, d], T::DTYPE, table.device())?;
    if n == 0 {
        return Ok(out);
    }
    let (v, dd) = (to_i32(OP_FWD, "vocab", vocab)?, to_i32(OP_FWD, "d", d)?);
    let f = dev.function("embed", T::pick("embed_fwd_f32", "embed_fwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(T::slice_mut(&mut out, OP_FWD)?)
        .arg(T::slice(table, OP_FWD)?)
        .arg(ids.cuda_i32(OP_FWD)?)
        .arg(&v)
        .arg(&dd);
    // SAFETY: out holds n*d elements, table vocab*d, ids n; ids are range-checked in the kernel.
    unsafe { b.launch(per_row(OP_FWD, n, 128, 0)?) }?;
    Ok(out)
}

fn bwd_cuda<T: CudaElem>(
    dtable: &mut Tensor,
    dout: &Tensor,
    ids: &Tensor,
    n: usize,
    vocab: usize,
    d: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let dev = dout.device().as_cuda(OP_BWD)?.clone();
    let (v, dd) = (to_i32(OP_BWD, "vocab", vocab)?, to_i32(OP_BWD, "d", d)?);
    let f = dev.function("embed", T::pick("embed_bwd_f32", "embed_bwd_bf16"))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dtable.cuda_f32_mut(OP_BWD)?)
        .arg(T::slice(dout, OP_BWD)?)
        .arg(ids.cuda_i32(OP_BWD)?)
        .arg(&v)
        .arg(&dd);
    // SAFETY: dtable holds vocab*d floats, dout n*d, ids n; ids are range-checked in the kernel.
    unsafe { b.launch(per_row(OP_BWD, n, 128, 0)?) }?;
    Ok(())
}
