//! Preference losses from per-token log-probs (bytes: policy, reference and mask read, the token
//! gradient written). CPU at 8 pairs × 256; CUDA at 64 pairs × 1,024 tokens.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{Device, Tensor};
use rlhf_kernels::ops::pref_loss::{pref_loss, DpoLoss, PrefExtras, PrefLoss};
use rlhf_kernels::testing::{time_iters, Rng};

fn run(c: &mut Criterion, device: &Device, label: &str, pairs: usize, t: usize) {
    let mut rng = Rng::new(5);
    let r = 2 * pairs;
    let mk = |rng: &mut Rng| {
        Tensor::from_f32(&[r, t], rng.uniform_vec(r * t, -4.0, 0.0), device).unwrap()
    };
    let (lp, rf) = (mk(&mut rng), mk(&mut rng));
    let mask = Tensor::from_f32(&[r, t], vec![1.0; r * t], device).unwrap();
    let labels = Tensor::from_f32(&[r], (0..r).map(|i| (i % 2) as f32).collect(), device).unwrap();
    let mut group = c.benchmark_group(format!("pref_loss/{label}/{pairs}x{t}"));
    group.throughput(Throughput::Bytes((4 * r * t * 4) as u64));
    let kinds = [
        (
            "dpo_sigmoid",
            PrefLoss::Dpo {
                loss: DpoLoss::Sigmoid,
                beta: 0.1,
                label_smoothing: 0.0,
            },
        ),
        (
            "dpo_ipo",
            PrefLoss::Dpo {
                loss: DpoLoss::Ipo,
                beta: 0.1,
                label_smoothing: 0.0,
            },
        ),
        (
            "simpo",
            PrefLoss::Simpo {
                beta: 2.0,
                gamma: 0.5,
                label_smoothing: 0.0,
            },
        ),
        (
            "kto",
            PrefLoss::Kto {
                beta: 0.1,
                desirable_weight: 1.0,
                undesirable_weight: 1.0,
            },
        ),
    ];
    for (name, kind) in kinds {
        let ex = PrefExtras {
            ref_logps: Some(&rf),
            labels: Some(&labels),
            ..Default::default()
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_iters(device, iters, || {
                    drop(black_box(pref_loss(&kind, &lp, &mask, &ex).unwrap()))
                })
            })
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    run(c, &Device::Cpu, "cpu", 8, 256);
    match Device::cuda() {
        Ok(gpu) => run(c, &gpu, "cuda", 64, 1024),
        Err(e) => println!("pref_loss CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
