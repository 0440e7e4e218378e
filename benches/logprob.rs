//! logprob forward+backward (bytes: one logits read forward, one read and one dlogits write
//! backward) and the LM-head-fused form (FLOPs: 2·N·V·d forward, 6·N·V·d backward). CPU at a small
//! shape; CUDA at N = 8,192, V = 49,152 / 128,256, d = 576 / 4,096 when a GPU is present.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::logprob::{
    linear_logprob_bwd, linear_logprob_fwd, logprob_bwd, logprob_fwd,
};
use rlhf_kernels::testing::{time_iters, Rng};

fn plain(c: &mut Criterion, device: &Device, label: &str, n: usize, vocab: usize, dtype: DType) {
    let mut rng = Rng::new(1);
    let logits =
        Tensor::from_f32_as(&[n, vocab], &rng.normal_vec(n * vocab, 2.0), dtype, device).unwrap();
    let tgt = Tensor::from_i32(
        &[n],
        (0..n).map(|_| rng.below(vocab) as i32).collect(),
        device,
    )
    .unwrap();
    let g = Tensor::from_f32(&[n], vec![1.0; n], device).unwrap();
    let mut group = c.benchmark_group(format!("logprob/{label}/{n}x{vocab}/{}", dtype.name()));
    group.throughput(Throughput::Bytes((3 * n * vocab * dtype.size()) as u64));
    group.bench_function("fwd+bwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                let o = logprob_fwd(&logits, &tgt, 1.0).unwrap();
                black_box(logprob_bwd(&logits, &tgt, &o, &g, &g, 1.0).unwrap());
            })
        })
    });
    group.finish();
}

fn fused(
    c: &mut Criterion,
    device: &Device,
    label: &str,
    n: usize,
    d: usize,
    vocab: usize,
    dtype: DType,
) {
    let mut rng = Rng::new(2);
    let h = Tensor::from_f32_as(&[n, d], &rng.normal_vec(n * d, 1.0), dtype, device).unwrap();
    let w =
        Tensor::from_f32_as(&[vocab, d], &rng.normal_vec(vocab * d, 0.05), dtype, device).unwrap();
    let tgt = Tensor::from_i32(
        &[n],
        (0..n).map(|_| rng.below(vocab) as i32).collect(),
        device,
    )
    .unwrap();
    let g = Tensor::from_f32(&[n], vec![1.0; n], device).unwrap();
    let mut dw = Tensor::zeros(&[vocab, d], DType::F32, device).unwrap();
    let mut group = c.benchmark_group(format!(
        "linear_logprob/{label}/n{n}_d{d}_V{vocab}/{}",
        dtype.name()
    ));
    // Criterion reports elements per second; one "element" here is one FLOP.
    group.throughput(Throughput::Elements((8 * n * vocab * d) as u64));
    group.sample_size(10);
    group.bench_function("fwd+bwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                let o = linear_logprob_fwd(&h, &w, &tgt, 1.0).unwrap();
                black_box(linear_logprob_bwd(&h, &w, &tgt, &o, &g, &g, 1.0, &mut dw).unwrap());
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    plain(c, &Device::Cpu, "cpu", 32, 4096, DType::F32);
    fused(c, &Device::Cpu, "cpu", 32, 64, 4096, DType::F32);
    match Device::cuda() {
        Ok(gpu) => {
            for vocab in [49_152, 128_256] {
                plain(c, &gpu, "cuda", 8192, vocab, DType::BF16);
            }
            fused(c, &gpu, "cuda", 8192, 576, 49_152, DType::BF16);
            fused(c, &gpu, "cuda", 8192, 4096, 128_256, DType::BF16);
        }
        Err(e) => println!("logprob CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
