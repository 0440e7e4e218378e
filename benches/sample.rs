//! Sampling one token per row (bytes: the logits read once; the device kernel reads each row three
//! times, the last from cache) against the host path it replaces in generation, which copies the
//! logits to the host and samples there. CPU at a small shape; CUDA at 64 rows of 49,152 / 128,256.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::sample::{sample_plain, sample_plain_ref};
use rlhf_kernels::testing::{time_iters, Rng};

fn plain(c: &mut Criterion, device: &Device, label: &str, rows: usize, vocab: usize, dtype: DType) {
    let mut rng = Rng::new(5);
    let logits = Tensor::from_f32_as(
        &[rows, vocab],
        &rng.normal_vec(rows * vocab, 3.0),
        dtype,
        device,
    )
    .unwrap();
    let draws: Vec<f64> = (0..rows).map(|_| rng.unit()).collect();
    let mut group = c.benchmark_group(format!("sample/{label}/{rows}x{vocab}/{}", dtype.name()));
    group.throughput(Throughput::Bytes((rows * vocab * dtype.size()) as u64));
    group.bench_function("sample op", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                black_box(sample_plain(&logits, 1.0, &draws).unwrap());
            })
        })
    });
    group.bench_function("logits to the host, sampled there", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                let host = logits.to_f32_vec().unwrap();
                for (row, &u) in host.chunks(vocab).zip(&draws) {
                    black_box(sample_plain_ref(row, 1.0, u));
                }
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    plain(c, &Device::Cpu, "cpu", 8, 49_152, DType::F32);
    match Device::cuda() {
        Ok(gpu) => {
            for vocab in [49_152, 128_256] {
                plain(c, &gpu, "cuda", 64, vocab, DType::BF16);
            }
        }
        Err(e) => eprintln!("sample bench: CUDA skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
