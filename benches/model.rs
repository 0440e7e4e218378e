//! Whole-model forward and forward+backward (next-token loss through the fused LM head), reported
//! as tokens per second. CPU: SmolLM2-135M's shape cut to 2 layers, 1 × 64 tokens; CUDA: the full
//! SmolLM2-135M shape at 8 × 1,024 tokens. Random weights: speed does not depend on them.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::model::{Batch, LlamaConfig, Model, Params};
use rlhf_kernels::ops::logprob::{linear_logprob_bwd, linear_logprob_fwd};
use rlhf_kernels::testing::{time_iters, Rng};

fn run(
    c: &mut Criterion,
    device: &Device,
    label: &str,
    cfg: &LlamaConfig,
    seqs: usize,
    len: usize,
) {
    let model = Model::random(cfg, 1, device).unwrap();
    let mut rng = Rng::new(2);
    let seq: Vec<Vec<i32>> = (0..seqs)
        .map(|_| (0..len).map(|_| rng.below(cfg.vocab_size) as i32).collect())
        .collect();
    let batch = Batch::new(&seq);
    let n = batch.len();
    let mut t: Vec<i32> = batch.tokens[1..].to_vec();
    t.push(-100);
    let tgt = Tensor::from_i32(&[n], t, device).unwrap();
    let g = Tensor::from_f32(&[n], vec![1.0 / n as f32; n], device).unwrap();
    let z = Tensor::zeros(&[n], DType::F32, device).unwrap();
    let mut grads = Params::zeros(cfg, device, DType::F32).unwrap();
    let mut group = c.benchmark_group(format!(
        "model/{label}/{}L_d{}/{seqs}x{len}",
        cfg.num_layers, cfg.hidden_size
    ));
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(10);
    group.bench_function("forward", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                drop(black_box(model.forward(&batch).unwrap()))
            })
        })
    });
    group.bench_function("forward+backward", |b| {
        b.iter_custom(|iters| {
            time_iters(device, iters, || {
                let acts = model.forward(&batch).unwrap();
                let out = linear_logprob_fwd(&acts.hidden, model.lm_head(), &tgt, 1.0).unwrap();
                let dh = linear_logprob_bwd(
                    &acts.hidden,
                    model.lm_head(),
                    &tgt,
                    &out,
                    &g,
                    &z,
                    1.0,
                    grads.lm_head_mut(),
                )
                .unwrap();
                model.backward(&acts, &dh, &mut grads).unwrap();
            })
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let mut small = LlamaConfig::smollm2_135m();
    small.num_layers = 2;
    run(c, &Device::Cpu, "cpu", &small, 1, 64);
    match Device::cuda() {
        Ok(gpu) => run(c, &gpu, "cuda", &LlamaConfig::smollm2_135m(), 8, 1024),
        Err(e) => println!("model CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(group);
