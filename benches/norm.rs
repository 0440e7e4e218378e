//! RMSNorm forward and backward throughput, reported as bytes moved per second: the CPU reference at
//! a small shape, and the CUDA kernels at a transformer's shape when a GPU is present; the residual
//! variants (the add folded in) beside the plain ones.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::norm::{add_rms_norm_fwd, rms_norm_bwd, rms_norm_bwd_add, rms_norm_fwd};
use rlhf_kernels::testing::{time_iters, Rng};

fn bench_device(
    c: &mut Criterion,
    device: &Device,
    label: &str,
    rows: usize,
    cols: usize,
    dtype: DType,
) {
    let mut rng = Rng::new(1);
    let x = Tensor::from_f32_as(
        &[rows, cols],
        &rng.normal_vec(rows * cols, 1.0),
        dtype,
        device,
    )
    .unwrap();
    let w = Tensor::from_f32_as(&[cols], &rng.uniform_vec(cols, 0.5, 1.5), dtype, device).unwrap();
    let dy = Tensor::from_f32_as(
        &[rows, cols],
        &rng.normal_vec(rows * cols, 1.0),
        dtype,
        device,
    )
    .unwrap();
    let out = rms_norm_fwd(&x, &w, 1e-5).unwrap();
    let mut dw = Tensor::zeros(&[cols], DType::F32, device).unwrap();
    let act = (rows * cols * dtype.size()) as u64;

    let mut g = c.benchmark_group(format!("rms_norm/{label}/{rows}x{cols}/{}", dtype.name()));
    // Forward: read x, write y.
    g.throughput(Throughput::Bytes(2 * act));
    g.bench_function("fwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                drop(black_box(rms_norm_fwd(&x, &w, 1e-5).unwrap()))
            })
        })
    });
    // Backward: read dy and x, write dx.
    g.throughput(Throughput::Bytes(3 * act));
    g.bench_function("bwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                drop(black_box(
                    rms_norm_bwd(&dy, &x, &w, &out.rstd, &mut dw).unwrap(),
                ))
            })
        })
    });
    // Residual forward: read x and delta, write h and y.
    g.throughput(Throughput::Bytes(4 * act));
    g.bench_function("add_fwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                drop(black_box(add_rms_norm_fwd(&x, &dy, &w, 1e-5).unwrap()))
            })
        })
    });
    // Residual backward: read dy, x and dres, write dx.
    g.throughput(Throughput::Bytes(4 * act));
    g.bench_function("bwd_add", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                drop(black_box(
                    rms_norm_bwd_add(&dy, &x, &w, &out.rstd, &mut dw, &x).unwrap(),
                ))
            })
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_device(c, &Device::Cpu, "cpu", 256, 576, DType::F32);
    match Device::cuda() {
        Ok(gpu) => {
            for dtype in [DType::BF16, DType::F32] {
                bench_device(c, &gpu, "cuda", 8192, 4096, dtype);
                bench_device(c, &gpu, "cuda", 8192, 576, dtype);
            }
        }
        Err(e) => println!("rms_norm CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
