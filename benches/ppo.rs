//! PPO advantages (rewards, GAE, whitening) and the clipped losses with gradients (bytes: seven
//! [B, T] inputs read, six written). CPU at 8 × 128; CUDA at 64 × 512.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{Device, Tensor};
use rlhf_kernels::ops::ppo::{ppo_advantages, ppo_loss, PpoConfig};
use rlhf_kernels::testing::{time_iters, Rng};

fn run(c: &mut Criterion, device: &Device, label: &str, b: usize, t: usize) {
    let mut rng = Rng::new(6);
    let mk = |rng: &mut Rng| {
        Tensor::from_f32(&[b, t], rng.uniform_vec(b * t, -2.0, 0.0), device).unwrap()
    };
    let (old_lp, ref_lp, old_v, new_lp, new_v) = (
        mk(&mut rng),
        mk(&mut rng),
        mk(&mut rng),
        mk(&mut rng),
        mk(&mut rng),
    );
    let scores = Tensor::from_f32(&[b], rng.normal_vec(b, 1.0), device).unwrap();
    let mask = Tensor::from_f32(&[b, t], vec![1.0; b * t], device).unwrap();
    let cfg = PpoConfig::default();
    let mut group = c.benchmark_group(format!("ppo/{label}/{b}x{t}"));
    group.throughput(Throughput::Bytes((13 * b * t * 4) as u64));
    group.bench_function("advantages+loss", |bch| {
        bch.iter_custom(|iters| {
            time_iters(device, iters, || {
                let a = ppo_advantages(&cfg, &old_lp, &ref_lp, &old_v, &scores, &mask).unwrap();
                black_box(
                    ppo_loss(
                        &cfg,
                        &new_lp,
                        &new_v,
                        &old_lp,
                        &old_v,
                        &a.whitened,
                        &a.returns,
                        &mask,
                    )
                    .unwrap(),
                );
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    run(c, &Device::Cpu, "cpu", 8, 128);
    match Device::cuda() {
        Ok(gpu) => run(c, &gpu, "cuda", 64, 512),
        Err(e) => println!("ppo CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
