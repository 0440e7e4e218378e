//! The transformer's small kernel families (embed, rope, mlp, elementwise, adamw), reported as bytes
//! moved per second: the CPU references at small shapes, and the CUDA kernels at SmolLM2-135M's
//! shapes for 8,192 tokens when a GPU is present. Their cost inside a training step is in
//! `cargo bench --bench model`; these isolate each kernel.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use rlhf_kernels::bench::AdamwBench;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::elementwise::add;
use rlhf_kernels::ops::embed::{embed_bwd, embed_fwd, rows_store, rows_sum, RowGroups};
use rlhf_kernels::ops::mlp::{swiglu_bwd, swiglu_fwd};
use rlhf_kernels::ops::rope::{rope_qkv_bwd, rope_qkv_fwd};
use rlhf_kernels::testing::{time_iters, Rng};

/// Token count, model width, query and key heads, head_dim, MLP width and vocabulary of one bench
/// shape.
#[derive(Clone, Copy)]
struct Shape {
    tokens: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
}

fn timed<M: criterion::measurement::Measurement<Value = Duration>>(
    g: &mut BenchmarkGroup<'_, M>,
    device: &Device,
    name: &str,
    bytes: usize,
    mut f: impl FnMut(),
) {
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| time_iters(device, iters, &mut f))
    });
}

fn bench_device(c: &mut Criterion, device: &Device, label: &str, s: Shape, dtype: DType) {
    let mut rng = Rng::new(1);
    let el = dtype.size();
    let tensor = |rng: &mut Rng, shape: &[usize], dt: DType| {
        let n = shape.iter().product();
        Tensor::from_f32_as(shape, &rng.normal_vec(n, 1.0), dt, device).unwrap()
    };
    let ids = |rng: &mut Rng, n: usize, bound: usize| {
        let v = (0..n).map(|_| rng.below(bound) as i32).collect();
        Tensor::from_i32(&[n], v, device).unwrap()
    };
    let act = s.tokens * s.d * el;
    let mut g = c.benchmark_group(format!(
        "transformer_ops/{label}/{}tok_d{}/{}",
        s.tokens,
        s.d,
        dtype.name()
    ));

    // embed: gather rows forward (read + write a row per token), scatter-add into f32 backward.
    let table = tensor(&mut rng, &[s.vocab, s.d], dtype);
    let tok = ids(&mut rng, s.tokens, s.vocab);
    timed(&mut g, device, "embed_fwd", 2 * act, || {
        drop(black_box(embed_fwd(&table, &tok).unwrap()))
    });
    let dout = tensor(&mut rng, &[s.tokens, s.d], dtype);
    let mut dtable = Tensor::zeros(&[s.vocab, s.d], DType::F32, device).unwrap();
    timed(
        &mut g,
        device,
        "embed_bwd",
        act + 2 * s.tokens * s.d * 4,
        || embed_bwd(&mut dtable, &dout, &tok).unwrap(),
    );
    // rows_store: the KV-cache append, every token's row to a distinct cache row.
    let mut cache = tensor(&mut rng, &[2 * s.tokens, s.d], dtype);
    let mut perm: Vec<i32> = (0..2 * s.tokens as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    perm.truncate(s.tokens);
    let rows = Tensor::from_i32(&[s.tokens], perm, device).unwrap();
    timed(&mut g, device, "rows_store", 2 * act, || {
        rows_store(&mut cache, &dout, &rows).unwrap()
    });
    // rows_sum: the gradients of DPO's shared prompts summed back, as a layer's keys and values
    // take them (half the rows a prompt, each read by two sequences): every source row read once,
    // each output row written once.
    let (half, width) = (s.tokens / 2, s.kv_heads * s.head_dim);
    let groups: Vec<Vec<usize>> = (0..s.tokens - half / 2)
        .map(|u| {
            if u < half / 2 {
                vec![u, s.tokens - half / 2 + u]
            } else {
                vec![u]
            }
        })
        .collect();
    let groups = RowGroups::new(&groups, s.tokens, device).unwrap();
    let summed = tensor(&mut rng, &[s.tokens, width], dtype);
    timed(
        &mut g,
        device,
        "rows_sum",
        (s.tokens + groups.len()) * width * el,
        || drop(black_box(rows_sum(&summed, &groups).unwrap())),
    );

    // rope: a layer's queries and keys in one launch, split from the QKV projection's output with
    // the values (forward) and joined back (backward), all three read and written once.
    let (width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkv = tensor(&mut rng, &[s.tokens, width + 2 * kv_width], dtype);
    let q = tensor(&mut rng, &[s.tokens, width], dtype);
    let k = tensor(&mut rng, &[s.tokens, kv_width], dtype);
    let v = tensor(&mut rng, &[s.tokens, kv_width], dtype);
    let pos = ids(&mut rng, s.tokens, 4096);
    let inv_freq: Vec<f32> = (0..s.head_dim / 2)
        .map(|i| 10_000f32.powf(-2.0 * i as f32 / s.head_dim as f32))
        .collect();
    let inv_freq = Tensor::from_f32(&[s.head_dim / 2], inv_freq, device).unwrap();
    let rope_bytes = 2 * s.tokens * (width + 2 * kv_width) * el;
    timed(&mut g, device, "rope_qkv_fwd", rope_bytes, || {
        drop(black_box(
            rope_qkv_fwd(&qkv, &pos, &inv_freq, s.heads, s.kv_heads).unwrap(),
        ))
    });
    timed(&mut g, device, "rope_qkv_bwd", rope_bytes, || {
        drop(black_box(
            rope_qkv_bwd(&q, &k, &v, &pos, &inv_freq, s.heads, s.kv_heads).unwrap(),
        ))
    });

    // SwiGLU: forward reads gate and up (side by side), writes h; backward reads dh, gate and up,
    // writes dgate and dup.
    let ffn = s.tokens * s.ffn * el;
    let gate_up = tensor(&mut rng, &[s.tokens, 2 * s.ffn], dtype);
    timed(&mut g, device, "swiglu_fwd", 3 * ffn, || {
        drop(black_box(swiglu_fwd(&gate_up).unwrap()))
    });
    let dh = tensor(&mut rng, &[s.tokens, s.ffn], dtype);
    timed(&mut g, device, "swiglu_bwd", 5 * ffn, || {
        drop(black_box(swiglu_bwd(&dh, &gate_up).unwrap()))
    });

    // Residual add: read two activations, write one.
    let y = tensor(&mut rng, &[s.tokens, s.d], dtype);
    timed(&mut g, device, "add", 3 * act, || {
        drop(black_box(add(&dout, &y).unwrap()))
    });
    g.finish();
}

/// AdamW over `params` f32 master weights with a bf16 copy (`AdamwBench::bytes` says what it moves).
fn bench_adamw(c: &mut Criterion, device: &Device, label: &str, params: usize) {
    let mut adamw = AdamwBench::new(device, params, &mut Rng::new(2)).unwrap();
    let mut g = c.benchmark_group(format!("transformer_ops/{label}/adamw/{params}"));
    let bytes = adamw.bytes();
    timed(&mut g, device, "adamw_step", bytes, || {
        adamw.step().unwrap()
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let small = Shape {
        tokens: 256,
        d: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
        vocab: 4096,
    };
    bench_device(c, &Device::Cpu, "cpu", small, DType::F32);
    bench_adamw(c, &Device::Cpu, "cpu", 1 << 18);
    match Device::cuda() {
        Ok(gpu) => {
            let smollm2 = Shape {
                tokens: 8192,
                vocab: 49_152,
                ..small
            };
            bench_device(c, &gpu, "cuda", smollm2, DType::BF16);
            bench_adamw(c, &gpu, "cuda", 134_515_008);
        }
        Err(e) => println!("transformer_ops CUDA benches skipped: {e}"),
    }
}

criterion_group! {
    name = group;
    config = Criterion::default().warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(group);
