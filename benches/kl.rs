//! Full KL forward+backward (bytes: two logit rows read forward, two read and one written backward)
//! and the sampled estimators. CPU at a small shape; CUDA at N = 8,192, V = 49,152 / 128,256.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::kl::{
    kl_full_bwd, kl_full_fwd, kl_sampled_bwd, kl_sampled_fwd, KlEstimator,
};
use rlhf_kernels::testing::{time_iters, Rng};

fn full(c: &mut Criterion, device: &Device, label: &str, n: usize, vocab: usize, dtype: DType) {
    let mut rng = Rng::new(3);
    let x =
        Tensor::from_f32_as(&[n, vocab], &rng.normal_vec(n * vocab, 2.0), dtype, device).unwrap();
    let y =
        Tensor::from_f32_as(&[n, vocab], &rng.normal_vec(n * vocab, 2.0), dtype, device).unwrap();
    let g = Tensor::from_f32(&[n], vec![1.0; n], device).unwrap();
    let mut group = c.benchmark_group(format!("kl_full/{label}/{n}x{vocab}/{}", dtype.name()));
    group.throughput(Throughput::Bytes((5 * n * vocab * dtype.size()) as u64));
    group.bench_function("fwd+bwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                let o = kl_full_fwd(&x, &y).unwrap();
                black_box(kl_full_bwd(&x, &y, &o, &g).unwrap());
            })
        })
    });
    group.finish();
}

fn sampled(c: &mut Criterion, device: &Device, label: &str, n: usize) {
    let mut rng = Rng::new(4);
    let t = |v: Vec<f32>| Tensor::from_f32(&[n], v, device).unwrap();
    let (p, r, g) = (
        t(rng.uniform_vec(n, -5.0, 0.0)),
        t(rng.uniform_vec(n, -5.0, 0.0)),
        t(vec![1.0; n]),
    );
    let mut group = c.benchmark_group(format!("kl_sampled/{label}/{n}"));
    // Forward reads two and writes one; backward reads three and writes one.
    group.throughput(Throughput::Bytes((7 * n * 4) as u64));
    group.bench_function("k3 fwd+bwd", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                black_box(kl_sampled_fwd(&p, &r, KlEstimator::K3).unwrap());
                black_box(kl_sampled_bwd(&p, &r, &g, KlEstimator::K3).unwrap());
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    full(c, &Device::Cpu, "cpu", 32, 4096, DType::F32);
    sampled(c, &Device::Cpu, "cpu", 65_536);
    match Device::cuda() {
        Ok(gpu) => {
            for vocab in [49_152, 128_256] {
                full(c, &gpu, "cuda", 8192, vocab, DType::BF16);
            }
            sampled(c, &gpu, "cuda", 64 * 1024 * 16);
        }
        Err(e) => println!("kl CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
