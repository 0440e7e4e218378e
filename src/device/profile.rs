//! Device time per op, for `rlhf bench train --profile` and `rlhf bench model --profile`: while
//! profiling is on, each op records a pair of CUDA events around its launches (wall time on the CPU)
//! under its name, and [`report`] sums them. Off (the default), a scope costs one atomic load.
//!
//! Only the outermost scope on a thread records, so an op that calls others (the fused LM-head
//! logprob runs GEMMs) is counted once, under its own name. The events add a little host time per
//! launch, so a profiled step runs somewhat slower than an unprofiled one: the bench reports the
//! step time from unprofiled runs and the profile as shares of the profiled step.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::CudaEvent;

use super::{CudaDevice, Device};
use crate::error::Result;

static ENABLED: AtomicBool = AtomicBool::new(false);
static RECORDS: Mutex<Vec<Record>> = Mutex::new(Vec::new());

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

struct Record {
    name: Cow<'static, str>,
    flops: f64,
    timing: Timing,
}

enum Timing {
    Cuda(CudaEvent, CudaEvent),
    Cpu(f64),
}

enum Start {
    Cuda(Arc<CudaDevice>, CudaEvent),
    Cpu(Instant),
}

/// Times the op it lives in until it is dropped.
#[must_use = "a scope times the code until it is dropped"]
pub struct Scope {
    counted: bool,
    active: Option<(Cow<'static, str>, f64, Start)>,
}

/// Starts or stops recording (and drops what was recorded).
pub fn enable(on: bool) {
    RECORDS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A scope named `name` on `device`.
pub fn scope(device: &Device, name: &'static str) -> Scope {
    scope_with(device, || Cow::Borrowed(name))
}

/// A scope whose name is built only when profiling is on.
pub fn scope_with(device: &Device, name: impl FnOnce() -> Cow<'static, str>) -> Scope {
    scope_counting(device, name, 0.0)
}

/// A scope for an op that does `flops` floating-point operations (GEMMs, named by their shape), so
/// the report can give its rate.
pub fn scope_counting(
    device: &Device,
    name: impl FnOnce() -> Cow<'static, str>,
    flops: f64,
) -> Scope {
    if !enabled() {
        return Scope {
            counted: false,
            active: None,
        };
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    let start = match device {
        _ if !outer => None,
        Device::Cpu => Some(Start::Cpu(Instant::now())),
        Device::Cuda(d) => d.timing_event().ok().map(|e| Start::Cuda(d.clone(), e)),
    };
    Scope {
        counted: true,
        active: start.map(|s| (name(), flops, s)),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.counted {
            DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
        let Some((name, flops, start)) = self.active.take() else {
            return;
        };
        let timing = match start {
            Start::Cpu(t) => Timing::Cpu(t.elapsed().as_secs_f64() * 1e3),
            Start::Cuda(d, s) => match d.timing_event() {
                Ok(e) => Timing::Cuda(s, e),
                Err(_) => return,
            },
        };
        RECORDS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Record {
                name,
                flops,
                timing,
            });
    }
}

/// One op's share of a profiled run.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub name: String,
    pub calls: usize,
    pub ms: f64,
    /// Floating-point operations of all its calls, where the op counts them (0 otherwise).
    pub flops: f64,
}

/// Sums what was recorded since profiling was turned on, by name, most time first, and clears it.
/// Waits for the device work it covers.
pub fn report() -> Result<Vec<ProfileRow>> {
    let records = std::mem::take(&mut *RECORDS.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rows: HashMap<String, ProfileRow> = HashMap::new();
    for r in records {
        let ms = match r.timing {
            Timing::Cpu(ms) => ms,
            Timing::Cuda(s, e) => s.elapsed_ms(&e)? as f64,
        };
        let row = rows
            .entry(r.name.to_string())
            .or_insert_with(|| ProfileRow {
                name: r.name.to_string(),
                calls: 0,
                ms: 0.0,
                flops: 0.0,
            });
        row.calls += 1;
        row.ms += ms;
        row.flops += r.flops;
    }
    let mut rows: Vec<ProfileRow> = rows.into_values().collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    Ok(rows)
}

/// The rows as a table: op, calls, total ms, share of `step_ms`, and TFLOP/s where counted.
pub fn format_table(rows: &[ProfileRow], step_ms: f64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<44} {:>7} {:>10} {:>7} {:>9}",
        "op", "calls", "ms", "share", "TFLOP/s"
    );
    let mut total = 0.0;
    for r in rows {
        total += r.ms;
        let rate = if r.flops > 0.0 && r.ms > 0.0 {
            format!("{:.1}", r.flops / (r.ms * 1e-3) / 1e12)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "{:<44} {:>7} {:>10.3} {:>6.1}% {:>9}",
            r.name,
            r.calls,
            r.ms,
            100.0 * r.ms / step_ms,
            rate
        );
    }
    let _ = writeln!(
        s,
        "{:<44} {:>7} {:>10.3} {:>6.1}%",
        "(outside any op: host work, copies, gaps)",
        "",
        (step_ms - total).max(0.0),
        100.0 * (step_ms - total).max(0.0) / step_ms
    );
    s
}
