//! Test support shared by tests/ and benches/: seeded random data, output poisoning, NaN-aware
//! comparisons, an f64 finite-difference gradient check, the golden files, and `cuda_test!`.

use std::path::PathBuf;

use crate::device::{tensor, Device};

pub use crate::rng::Rng;

/// A seed that differs per run unless `RLHF_TEST_SEED` pins it; printed so a failure can be replayed.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = std::env::var("RLHF_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("{test}: RLHF_TEST_SEED={seed}");
    seed
}

/// Every output buffer allocated from now on starts as NaN.
pub fn poison_outputs() {
    tensor::set_poisoning(true);
}

/// Rounds each value to bf16 and back.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

/// NaN-aware `|got - want| <= atol + rtol * |want|` over every element. A NaN or infinity in `got`
/// where `want` is finite fails. On failure the message names the first bad elements.
pub fn compare(name: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{name}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut bad = Vec::new();
    let mut max_err = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let err = (g - w).abs();
        let ok = err <= atol + rtol * w.abs();
        // `!ok` is true for NaN errors, so a NaN never passes.
        if !ok {
            bad.push((i, g, w));
        }
        if err.is_nan() {
            max_err = f64::NAN;
        } else if !max_err.is_nan() {
            max_err = max_err.max(err);
        }
    }
    if bad.is_empty() {
        return Ok(max_err);
    }
    let first: Vec<String> = bad
        .iter()
        .take(5)
        .map(|(i, g, w)| format!("[{i}] got {g:e}, want {w:e}"))
        .collect();
    Err(format!(
        "{name}: {} of {} elements outside atol {atol:e} + rtol {rtol:e}; max error {max_err:e}; first: {}",
        bad.len(),
        got.len(),
        first.join(", ")
    ))
}

/// Panics with `compare`'s message on a mismatch; returns the max absolute error.
#[track_caller]
pub fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> f64 {
    match compare(name, got, want, atol, rtol) {
        Ok(err) => err,
        Err(msg) => panic!("{msg}"),
    }
}

/// One line per checked output for scripts/gpu-run's summary table:
/// `CHECK|kernel|case|max_abs_error|tolerance`. Printed only after the check passed.
pub fn report(kernel: &str, case: &str, max_err: f64, tolerance: &str) {
    println!("CHECK|{kernel}|{case}|{max_err:.3e}|{tolerance}");
}

/// ‖got − want‖ / ‖want‖, NaN when anything is not finite.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let d = g as f64 - w as f64;
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    if !num.is_finite() || !den.is_finite() {
        return f64::NAN;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// max |a − exact|, NaN when any difference is NaN.
fn max_abs_err(a: &[f32], exact: &[f32]) -> f64 {
    a.iter()
        .zip(exact)
        .map(|(&x, &e)| (x as f64 - e as f64).abs())
        .fold(0.0f64, |m, e| {
            if e.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(e)
            }
        })
}

/// flash-attention's rule for low precision: the kernel's max error against the exact reference is at
/// most twice that of the exact reference rounded to bf16 (plus `atol` for values that round to 0).
/// Returns the kernel's max error.
#[track_caller]
pub fn assert_bf16_rule(name: &str, got: &[f32], exact: &[f32], atol: f64) -> f64 {
    let lowp = round_bf16(exact);
    let max_err = |a: &[f32]| max_abs_err(a, exact);
    let (err, err_low) = (max_err(got), max_err(&lowp));
    assert!(
        err <= 2.0 * err_low + atol,
        "{name}: max error {err:e} exceeds twice the bf16 rounding error {err_low:e} (+{atol:e}); {}",
        compare(name, got, exact, atol, 2.0 * 2f64.powi(-8)).err().unwrap_or_default()
    );
    err
}

/// STYLE.md's rule for low precision with the low-precision reference given: the kernel's max error
/// against the f32 reference `exact` is at most twice that of `lowp`, the same computation with the
/// low-precision roundings of an eager bf16 implementation (plus `atol`). Prints the `CHECK|` line.
#[track_caller]
pub fn check_lowp_rule(
    kernel: &str,
    case: &str,
    got: &[f32],
    lowp: &[f32],
    exact: &[f32],
    atol: f64,
) {
    assert_eq!(got.len(), exact.len(), "{kernel} {case}: length");
    assert_eq!(lowp.len(), exact.len(), "{kernel} {case}: length");
    let max_err = |a: &[f32]| max_abs_err(a, exact);
    let (err, err_low) = (max_err(got), max_err(lowp));
    assert!(
        err <= 2.0 * err_low + atol,
        "{kernel} {case}: max error {err:e} exceeds twice the bf16 reference's {err_low:e} (+{atol:e}); {}",
        compare(kernel, got, exact, atol, 2.0 * 2f64.powi(-8)).err().unwrap_or_default()
    );
    report(
        kernel,
        case,
        err,
        &format!("2x bf16 ref ({err_low:.1e}) + {atol:e}"),
    );
}

/// A kernel output against the exact (f64) reference on the same inputs. bf16 outputs follow the bf16
/// rule. f32 outputs pass within `atol + rtol·|exact|`, or within twice the max error of the plain f32
/// CPU loop (`plain`) on the same inputs: an f32 reduction over 10^5 terms (a log-sum-exp over the
/// vocabulary, a weight gradient over 8,192 rows) carries rounding error that no order of summation
/// removes, and the kernel is held to the straightforward loop's accuracy, not to a bound that loop
/// itself misses. Panics on a mismatch; on a match prints the `CHECK|` line.
#[track_caller]
#[allow(clippy::too_many_arguments)]
pub fn check_against_exact(
    kernel: &str,
    case: &str,
    got: &[f32],
    plain: &[f32],
    exact: &[f64],
    dtype: crate::device::DType,
    atol: f64,
    rtol: f64,
) {
    assert_eq!(got.len(), exact.len(), "{kernel} {case}: length");
    assert_eq!(plain.len(), exact.len(), "{kernel} {case}: length");
    let name = format!("{kernel} {case}");
    let exact32: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
    if dtype == crate::device::DType::BF16 {
        let e = assert_bf16_rule(&name, got, &exact32, atol);
        report(kernel, case, e, &format!("2x bf16 rounding + {atol:e}"));
        return;
    }
    let plain_err = plain
        .iter()
        .zip(exact)
        .map(|(&p, &e)| (p as f64 - e).abs())
        .fold(0.0f64, f64::max);
    // The allowance must stay a rounding allowance: a plain loop far off the exact value means the
    // reference or the test is wrong, and that must not widen what the kernel may get away with.
    let nominal = atol + rtol * exact.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    assert!(
        plain_err <= 10.0 * nominal,
        "{name}: the plain f32 loop is {plain_err:e} from the exact reference, over 10x the nominal \
         tolerance {nominal:e}"
    );
    let mut max_err = 0.0f64;
    let mut bad = Vec::new();
    for (i, (&g, &e)) in got.iter().zip(exact).enumerate() {
        let err = (g as f64 - e).abs();
        let allowed = (atol + rtol * e.abs()).max(2.0 * plain_err);
        if err.is_nan() || err > allowed {
            bad.push(format!("[{i}] got {g:e}, exact {e:e}"));
        }
        max_err = if err.is_nan() {
            f64::NAN
        } else {
            max_err.max(err)
        };
    }
    assert!(
        bad.is_empty(),
        "{name}: {} of {} elements outside {atol:e} + {rtol:e}|exact| and twice the plain f32 loop's \
         error {plain_err:e}; max error {max_err:e}; first: {}",
        bad.len(),
        got.len(),
        bad[..bad.len().min(5)].join(", ")
    );
    report(
        kernel,
        case,
        max_err,
        &format!("{atol:e} + {rtol:e}|ref| or 2x f32 loop ({plain_err:.1e})"),
    );
}

/// Central finite differences of `f` at `x` against `analytic`, in f64. Fails with the first bad
/// coordinates. `h` is the step; `tol` bounds `|fd - analytic| / max(1, |analytic|)`.
pub fn fd_check(
    name: &str,
    f: impl Fn(&[f64]) -> f64,
    x: &[f64],
    analytic: &[f64],
    h: f64,
    tol: f64,
) -> Result<(), String> {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let mut bad = Vec::new();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let fd = (fp - fm) / (2.0 * h);
        let err = (fd - analytic[i]).abs() / analytic[i].abs().max(1.0);
        if err.is_nan() || err > tol {
            bad.push(format!(
                "[{i}] finite difference {fd:e}, analytic {:e}",
                analytic[i]
            ));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{name}: {} of {} gradient entries disagree; first: {}",
            bad.len(),
            x.len(),
            bad[..bad.len().min(5)].join(", ")
        ))
    }
}

/// `../shared/golden` beside the checkout, or `RLHF_GOLDEN_DIR` (the GPU bundle sets it).
pub fn golden_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RLHF_GOLDEN_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden")
}

/// The CUDA device for a CUDA test, with poisoning on; or None after printing why the test skips.
/// With `RLHF_REQUIRE_GPU=1` (scripts/gpu-run sets it) a missing device fails the test instead.
pub fn cuda_device_or_skip(test: &str) -> Option<Device> {
    poison_outputs();
    match Device::cuda() {
        Ok(d) => Some(d),
        Err(e) => {
            if std::env::var("RLHF_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: RLHF_REQUIRE_GPU=1 but {e}");
            }
            println!("{test}: skipped: no CUDA device ({e})");
            None
        }
    }
}

/// A CUDA variant of a test. It is `#[ignore]`d so that a machine without a GPU reports it as
/// ignored rather than passed; `scripts/test` adds `--include-ignored` when a GPU is present and
/// `scripts/gpu-run` always does. Inside, a missing device prints `skipped: no CUDA device`.
#[macro_export]
macro_rules! cuda_test {
    ($(#[$meta:meta])* fn $name:ident($dev:ident) $body:block) => {
        $(#[$meta])*
        #[test]
        #[ignore = "needs a CUDA device (scripts/gpu-run, or --include-ignored on a GPU machine)"]
        fn $name() {
            let Some($dev) = $crate::testing::cuda_device_or_skip(stringify!($name)) else {
                return;
            };
            $body
        }
    };
}

/// Wall time of `iters` calls of `f` on `device`, synchronised before and after so asynchronous GPU
/// work is inside the interval (for criterion's `iter_custom`).
pub fn time_iters(device: &Device, iters: u64, mut f: impl FnMut()) -> std::time::Duration {
    device.synchronize().expect("device synchronize");
    let start = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    device.synchronize().expect("device synchronize");
    start.elapsed()
}

/// A kernel output against the CPU reference at the precision it is stored in: `atol + rtol·|ref|`
/// for f32, the bf16 rule (at most twice the reference's own bf16 rounding error, plus `atol`) for
/// bf16. Panics on a mismatch; on a match prints the `CHECK|` line for gpu-run's table.
#[track_caller]
pub fn check_output(
    kernel: &str,
    case: &str,
    got: &[f32],
    want: &[f32],
    dtype: crate::device::DType,
    atol: f64,
    rtol: f64,
) {
    let name = format!("{kernel} {case}");
    if dtype == crate::device::DType::BF16 {
        let e = assert_bf16_rule(&name, got, want, atol);
        report(kernel, case, e, &format!("2x bf16 rounding + {atol:e}"));
    } else {
        let e = assert_close(&name, got, want, atol, rtol);
        report(kernel, case, e, &format!("{atol:e} + {rtol:e}|ref|"));
    }
}
