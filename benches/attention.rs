//! Attention forward and backward, reported as FLOP/s: forward 4·B·H·T²·D halved for causality,
//! backward 2.5× that. CPU: one small shape; CUDA: T = 512 .. 16,384 at batch·T = 16k tokens and
//! H·D = 2,048 for D = 64 and 128 (the flash kernels: the forward also on mma.sync, which on Hopper
//! differs from the default wgmma one; the backward in both its fast and its deterministic mode, and
//! both on Hopper blocks of one warpgroup, `fwd_narrow` and `bwd_narrow`).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{Device, Tensor};
use rlhf_kernels::ops::attention::{attention_bwd, attention_fwd, AttnBatch, AttnKernel, Heads};
use rlhf_kernels::testing::{time_iters, Rng};

fn run(c: &mut Criterion, device: &Device, label: &str, seqs: usize, t: usize, hd: Heads) {
    let dtype = device.compute_dtype();
    let n = seqs * t;
    let mut rng = Rng::new(1);
    let mk = |rng: &mut Rng, w: usize| {
        Tensor::from_f32_as(&[n, w], &rng.normal_vec(n * w, 1.0), dtype, device).unwrap()
    };
    let (q, k, v) = (
        mk(&mut rng, hd.heads * hd.head_dim),
        mk(&mut rng, hd.kv_heads * hd.head_dim),
        mk(&mut rng, hd.kv_heads * hd.head_dim),
    );
    let dout = mk(&mut rng, hd.heads * hd.head_dim);
    let batch = AttnBatch::packed(&vec![t; seqs], device)
        .unwrap()
        .with_deterministic(false);
    let scale = 1.0 / (hd.head_dim as f32).sqrt();
    let fwd_flops = 4.0 * (seqs * hd.heads * t * t * hd.head_dim) as f64 / 2.0;
    let mut g = c.benchmark_group(format!(
        "attention/{label}/B{seqs}_T{t}_H{}_KV{}_D{}",
        hd.heads, hd.kv_heads, hd.head_dim
    ));
    g.sample_size(10);
    g.throughput(Throughput::Elements(fwd_flops as u64));
    let default = batch.kernel;
    for (name, kernel) in [
        ("fwd", default),
        ("fwd_mma", AttnKernel::Mma),
        ("fwd_narrow", AttnKernel::Narrow),
    ] {
        let batch = AttnBatch::packed(&vec![t; seqs], device)
            .unwrap()
            .with_kernel(kernel);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_iters(device, iters, || {
                    drop(black_box(
                        attention_fwd(&q, &k, &v, &batch, hd, scale).unwrap(),
                    ))
                })
            })
        });
    }
    let (o, lse) = attention_fwd(&q, &k, &v, &batch, hd, scale).unwrap();
    g.throughput(Throughput::Elements((2.5 * fwd_flops) as u64));
    for (name, kernel, deterministic) in [
        ("bwd", default, false),
        ("bwd_narrow", AttnKernel::Narrow, false),
        ("bwd_deterministic", default, true),
    ] {
        let batch = AttnBatch::packed(&vec![t; seqs], device)
            .unwrap()
            .with_kernel(kernel)
            .with_deterministic(deterministic);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                time_iters(device, iters, || {
                    drop(black_box(
                        attention_bwd(&dout, &q, &k, &v, &o, &lse, &batch, hd, scale).unwrap(),
                    ))
                })
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    run(
        c,
        &Device::Cpu,
        "cpu",
        2,
        128,
        Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
        },
    );
    match Device::cuda() {
        Ok(gpu) => {
            for d in [64, 128] {
                let heads = 2048 / d;
                for t in [512, 2048, 8192, 16_384] {
                    run(
                        c,
                        &gpu,
                        "cuda",
                        16_384 / t,
                        t,
                        Heads {
                            heads,
                            kv_heads: heads,
                            head_dim: d,
                        },
                    );
                }
            }
        }
        Err(e) => println!("attention CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
