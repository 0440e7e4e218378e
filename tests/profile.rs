//! The op profiler (`rlhf bench ... --profile`): ops record under their names only while it is on,
//! an op inside another is counted once (under the outer name), and a report clears what it read.
//! One test in its own binary: the profiler is process-wide, so other tests' ops would land in it.

use rlhf_kernels::device::profile;
use rlhf_kernels::device::{Device, Tensor};
use rlhf_kernels::ops::norm::rms_norm_fwd;
use rlhf_kernels::testing::{fresh_seed, Rng};

#[test]
fn ops_record_once_under_the_outermost_name_while_profiling_is_on() {
    let mut rng = Rng::new(fresh_seed("profile ops_record_once"));
    let dev = Device::Cpu;
    let x = Tensor::from_f32(&[64, 96], rng.normal_vec(64 * 96, 1.0), &dev).unwrap();
    let w = Tensor::from_f32(&[96], rng.normal_vec(96, 1.0), &dev).unwrap();

    rms_norm_fwd(&x, &w, 1e-6).unwrap();
    assert!(profile::report().unwrap().is_empty(), "recorded while off");

    profile::enable(true);
    for _ in 0..3 {
        rms_norm_fwd(&x, &w, 1e-6).unwrap();
    }
    {
        let _outer = profile::scope(&dev, "outer step");
        rms_norm_fwd(&x, &w, 1e-6).unwrap();
        rms_norm_fwd(&x, &w, 1e-6).unwrap();
    }
    for _ in 0..2 {
        let _counted = profile::scope_counting(&dev, || "counted".into(), 3e9);
        rms_norm_fwd(&x, &w, 1e-6).unwrap();
    }
    let rows = profile::report().unwrap();
    let table = profile::format_table(&rows, 1000.0);
    println!("{table}");
    let calls = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.calls);
    assert_eq!(calls("rms_norm_fwd"), Some(3), "{table}");
    assert_eq!(calls("outer step"), Some(1), "{table}");
    assert_eq!(calls("counted"), Some(2), "{table}");
    assert_eq!(rows.len(), 3, "{table}");
    let counted = rows.iter().find(|r| r.name == "counted").unwrap();
    assert_eq!(counted.flops, 6e9, "{table}");
    assert!(rows
        .iter()
        .filter(|r| r.name != "counted")
        .all(|r| r.flops == 0.0));
    let rate = table
        .lines()
        .find(|l| l.starts_with("counted"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    let want = 6e9 / (counted.ms * 1e-3) / 1e12;
    assert!(
        rate.is_some_and(|r| (r - want).abs() <= 0.05 * want + 0.05),
        "{table}"
    );
    assert!(rows.iter().all(|r| r.ms >= 0.0 && r.ms.is_finite()));
    assert!(table.contains("outside any op"));

    assert!(
        profile::report().unwrap().is_empty(),
        "a report clears what it read"
    );
    profile::enable(false);
    rms_norm_fwd(&x, &w, 1e-6).unwrap();
    assert!(
        profile::report().unwrap().is_empty(),
        "recorded after it was turned off"
    );
}

rlhf_kernels::cuda_test! {
    /// The tensor-memory counter (`rlhf bench train`'s max_memory_allocated twin): CUDA tensors
    /// count while alive, duplicates and reshapes included, and the peak holds the most.
    fn cuda_tensor_bytes_count_while_alive(dev) {
        use rlhf_kernels::device::tensor::{device_bytes_live, device_bytes_peak, reset_device_bytes_peak};
        use rlhf_kernels::device::DType;
        let base = device_bytes_live();
        reset_device_bytes_peak();
        let a = Tensor::zeros(&[1000, 3], DType::F32, &dev).unwrap();
        let b = Tensor::empty(&[5000], DType::BF16, &dev).unwrap();
        assert_eq!(device_bytes_live(), base + 12_000 + 10_000);
        let c = a.duplicate().unwrap().reshape(&[3000]).unwrap();
        assert_eq!(device_bytes_live(), base + 34_000);
        drop(a);
        drop(b);
        assert_eq!(device_bytes_live(), base + 12_000);
        assert_eq!(device_bytes_peak(), base + 34_000);
        drop(c);
        assert_eq!(device_bytes_live(), base);
        let cpu = Tensor::zeros(&[1000], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(device_bytes_live(), base, "CPU tensors are not device memory");
        drop(cpu);
    }
}
