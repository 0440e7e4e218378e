//! Sampling one token per row: the op's CPU path against its reference and its input checks, and the
//! CUDA kernel against the CDF of the same logits (its sums run in another order, so a token may
//! differ only where the draw lands within rounding of a CDF step).

use rlhf_kernels::cuda_test;
use rlhf_kernels::device::{DType, Device, Tensor};
use rlhf_kernels::ops::sample::{argmax, sample_plain, sample_plain_ref, RowWeights};
use rlhf_kernels::testing::{fresh_seed, poison_outputs, report, round_bf16, Rng};

#[test]
fn cpu_op_is_the_reference_row_by_row() {
    poison_outputs();
    let mut rng = Rng::new(fresh_seed("sample cpu_op_is_the_reference_row_by_row"));
    let (rows, vocab) = (9, 301);
    let logits = rng.normal_vec(rows * vocab, 3.0);
    let draws: Vec<f64> = (0..rows).map(|_| rng.unit()).collect();
    let t = Tensor::from_f32(&[rows, vocab], logits.clone(), &Device::Cpu).unwrap();
    for temperature in [0.0, 0.6, 1.0] {
        let (tokens, logps) = sample_plain(&t, temperature, &draws).unwrap();
        for (r, row) in logits.chunks(vocab).enumerate() {
            assert_eq!(
                (tokens[r], logps[r]),
                sample_plain_ref(row, temperature, draws[r])
            );
        }
    }
    // Greedy is the argmax, the lowest index among equal maxima, and its log-prob is under T = 1.
    let row = [0.5f32, 2.0, -1.0, 2.0];
    let (tok, lp) = sample_plain_ref(&row, 0.0, 0.7);
    assert_eq!((tok, argmax(&row)), (1, 1));
    let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
    assert!((lp as f64 - (2.0 - lse)).abs() < 1e-6);
    // u = 0 takes the first token with weight; u just under 1 the last.
    let flat = [0.0f32; 5];
    assert_eq!(sample_plain_ref(&flat, 1.0, 0.0).0, 0);
    assert_eq!(sample_plain_ref(&flat, 1.0, 1.0 - 1e-12).0, 4);
}

#[test]
fn bad_inputs_are_errors() {
    let t = Tensor::from_f32(&[2, 3], vec![0.0; 6], &Device::Cpu).unwrap();
    let e = sample_plain(&t, 1.0, &[0.5]).unwrap_err().to_string();
    assert!(e.contains("1 draws for 2 rows"), "{e}");
    let empty = Tensor::from_f32(&[2, 0], vec![], &Device::Cpu).unwrap();
    let e = sample_plain(&empty, 1.0, &[0.5, 0.5])
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocabulary of 0"), "{e}");
}

cuda_test! {
    fn cuda_picks_the_cdf_step_of_each_draw(dev) {
        let mut rng = Rng::new(fresh_seed("sample cuda_picks_the_cdf_step_of_each_draw"));
        let (mut all_rows, mut all_clear) = (0usize, 0usize);
        for &(rows, vocab) in &[(1, 1), (37, 50_257), (64, 49_152), (5, 128_256), (3, 1000)] {
            for dtype in [DType::F32, DType::BF16] {
                for temperature in [0.0f32, 0.7, 1.0] {
                    let mut logits = rng.normal_vec(rows * vocab, 4.0);
                    if dtype == DType::BF16 {
                        logits = round_bf16(&logits);
                    }
                    // Edge draws beside random ones: the first and the last step of the CDF.
                    let draws: Vec<f64> = (0..rows)
                        .map(|r| match r % 7 {
                            0 => 0.0,
                            1 => 1.0 - 1e-12,
                            _ => rng.unit(),
                        })
                        .collect();
                    let t = Tensor::from_f32_as(&[rows, vocab], &logits, dtype, &dev).unwrap();
                    let (tokens, logps) = sample_plain(&t, temperature, &draws).unwrap();
                    let (mut same, mut clear, mut worst_step, mut worst_lp) =
                        (0usize, 0usize, 0.0f64, 0.0f64);
                    for (r, row) in logits.chunks(vocab).enumerate() {
                        let (want, want_lp) = sample_plain_ref(row, temperature, draws[r]);
                        let got = tokens[r];
                        assert!((0..vocab as i32).contains(&got), "row {r}: token {got} of {vocab}");
                        let w = RowWeights::new(row, temperature);
                        let target = draws[r] * w.total;
                        // How far the draw lies outside token `t`'s CDF step, relative to the total
                        // (0 inside it); a step starting at 0 has an exact lower edge.
                        let step = |t: usize| {
                            let before: f64 = w.weights[..t].iter().map(|&x| x as f64).sum();
                            let after = before + w.weights[t] as f64;
                            let inside_by = if before == 0.0 {
                                after - target
                            } else {
                                (target - before).min(after - target)
                            };
                            let miss = (before - target).max(target - after).max(0.0);
                            (miss / w.total, inside_by / w.total)
                        };
                        // A draw deeper than the tolerance inside the reference's step leaves no
                        // rounding room: the kernel must pick that token. So must greedy rows and a
                        // draw of 0 (the first token with weight: no sum decides it).
                        let decided =
                            temperature == 0.0 || target == 0.0 || step(want as usize).1 > 1e-6;
                        clear += decided as usize;
                        if got == want {
                            same += 1;
                        } else {
                            let miss = step(got as usize).0;
                            worst_step = worst_step.max(miss);
                            assert!(
                                !decided && miss <= 1e-6,
                                "row {r} (T {temperature}, {dtype:?}, V {vocab}): token {got}, reference {want}, \
                                 draw {} outside its CDF step by {miss:e} of the total \
                                 (decided by more than rounding: {decided})",
                                draws[r]
                            );
                        }
                        let lp_err = (logps[r] as f64 - w.logp(row, got as usize) as f64).abs();
                        worst_lp = worst_lp.max(lp_err);
                        assert!(
                            lp_err <= 1e-5 * (1.0 + want_lp.abs() as f64),
                            "row {r}: log-prob {} against {}",
                            logps[r],
                            w.logp(row, got as usize)
                        );
                    }
                    all_rows += rows;
                    all_clear += clear;
                    report(
                        "sample_plain",
                        &format!("{rows}x{vocab} {dtype:?} T{temperature}"),
                        worst_lp,
                        &format!(
                            "token = reference on {same}/{rows} ({clear} decided), CDF miss {worst_step:.1e} <= 1e-6"
                        ),
                    );
                }
            }
        }
        // Only the edge draws (1 - 1e-12) and rare random ones sit within rounding of a step edge;
        // so that the exact check above is not vacuous, most rows must have been decided.
        assert!(
            all_clear * 10 >= all_rows * 7,
            "only {all_clear} of {all_rows} rows were decided by more than rounding"
        );
    }
}
