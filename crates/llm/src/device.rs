//! Where the model runs and in which precision: `--device auto|cpu|cuda[:N]`, `--dtype auto|...`,
//! and the CPU thread count. `auto` dtype is the one that is both fast and numerically safe on the
//! chosen device (see [`DTypeChoice::resolve`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// The device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first CUDA GPU when built with `cuda` and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let expected = "auto, cpu, cuda or cuda:N";
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| Error::invalid("device", s, expected)),
                None => Err(Error::invalid("device", s, expected)),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).or(Ok(Device::Cpu))
                } else {
                    Ok(Device::Cpu)
                }
            }
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device {
                        device: self.to_string(),
                        message: "this build of thinkrag has no CUDA support: rebuild with the `cuda` feature (needs the CUDA toolkit), or run on the CPU".into(),
                    });
                }
                Device::new_cuda(n).map_err(|e| Error::Device {
                    device: self.to_string(),
                    message: format!("{e} (is there a GPU number {n}? see nvidia-smi)"),
                })
            }
        }
    }
}

/// The dtype the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// bf16 on GPUs of compute capability >= 8.0, f32 elsewhere (see [`Self::resolve`]).
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision (overflows for Qwen2-1.5B: NaN logits).
    F16,
}

impl FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => Err(Error::invalid("dtype", s, "auto, f32, bf16 or f16")),
        }
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl DTypeChoice {
    /// The dtype to run in on `device`.
    ///
    /// `auto` is f32 on the CPU (candle's CPU bf16 matmul is slower than f32), bf16 on GPUs of
    /// compute capability >= 8.0, and f32 below that: a T4 (7.5) has no bf16 kernels in candle although
    /// `Device::supports_bf16()` answers true, and Qwen2-1.5B overflows in pure fp16 (NaN logits).
    /// An explicit bf16 on such a GPU is refused rather than left to fail inside a kernel.
    pub fn resolve(self, device: &Device) -> Result<DType> {
        let capability = compute_capability(device);
        let bf16_ok = capability.is_some_and(|(major, _)| major >= 8);
        match self {
            Self::Auto if device.is_cuda() && bf16_ok => Ok(DType::BF16),
            Self::Auto | Self::F32 => Ok(DType::F32),
            Self::Bf16 if device.is_cuda() && !bf16_ok => Err(Error::Device {
                device: "cuda".into(),
                message: format!(
                    "bf16 needs compute capability 8.0 or newer; this GPU has {}. Use f32 (or auto)",
                    capability.map_or("an unknown one".to_string(), |(a, b)| format!("{a}.{b}"))
                ),
            }),
            Self::Bf16 => Ok(DType::BF16),
            Self::F16 => Ok(DType::F16),
        }
    }
}

/// The CUDA compute capability of `device`, `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn compute_capability(device: &Device) -> Option<(i32, i32)> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(dev) = device else {
        return None;
    };
    let cu = dev.cuda_stream().context().cu_device();
    // SAFETY: a plain attribute query on a device handle candle keeps alive.
    let major = unsafe {
        result::device::get_attribute(
            cu,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )
    }
    .ok()?;
    // SAFETY: as above.
    let minor = unsafe {
        result::device::get_attribute(
            cu,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        )
    }
    .ok()?;
    Some((major, minor))
}

/// The CUDA compute capability of `device`, `None` on the CPU.
#[cfg(not(feature = "cuda"))]
pub fn compute_capability(_device: &Device) -> Option<(i32, i32)> {
    None
}

/// Physical cores of this machine: the default CPU thread count (hyper-threads add nothing to a
/// memory-bound decode and slow the compute-bound prefill).
pub fn physical_cores() -> usize {
    num_cpus::get_physical().max(1)
}

/// Bytes of memory the system can give a process now without swapping (`MemAvailable` of
/// `/proc/meminfo`, which counts reclaimable file pages); `None` where that is not known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Sets the number of CPU threads candle's kernels use. Call once, before the first tensor
/// operation: candle reads `RAYON_NUM_THREADS` at each matmul and rayon sizes its pool on first use.
pub fn set_cpu_threads(threads: usize) -> Result<()> {
    if threads == 0 || threads > 1024 {
        return Err(Error::invalid("threads", threads, "1..=1024"));
    }
    // SAFETY (edition 2024 wording): called at start-up before other threads read the environment.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // An already-built global pool keeps its size; that is harmless, candle's count comes from the env.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    Ok(())
}

/// Keeps freed tensor memory in the process instead of handing it back to the kernel: an explicit
/// process set-up call for binaries (the library never calls it), like [`set_cpu_threads`].
///
/// glibc serves large blocks (every activation buffer of a batch) with a fresh `mmap` and unmaps
/// them on free, so each batch faults in and zeroes its buffers again: a quarter of an embedding
/// benchmark's time was spent in the kernel doing that. With `mmap` off for the heap and trimming
/// only above 2 GiB, freed buffers are reused. Memory use peaks as before but is not returned
/// until the process ends. Does nothing on other C libraries; returns whether it took effect.
pub fn keep_tensor_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; both values are in their valid ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// A dtype's name as the CLI spells it.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// `madvise(MADV_HUGEPAGE)` over the whole 2 MiB extents inside `buf`: a hint about this
/// allocation alone (no process-wide setting), ignored where transparent huge pages are off.
/// Memory streamed whole at every decode step (weights laid out for the CPU kernels, the KV
/// cache) otherwise crosses a 4 KiB page, and misses the TLB, every 64 cache lines. It takes
/// effect on pages not yet touched: call it on fresh allocations, before writing them.
pub(crate) fn advise_huge_pages<T>(buf: &[T]) {
    #[cfg(target_os = "linux")]
    // SAFETY: `buf` is memory this process owns; the advice changes how its pages are backed,
    // never their contents.
    unsafe {
        advise_inside(
            buf.as_ptr().cast(),
            std::mem::size_of_val(buf),
            2 << 20,
            libc::MADV_HUGEPAGE,
        )
    };
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// The OS's page size (4 KiB where it cannot be read).
#[cfg(target_os = "linux")]
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

/// `madvise(advice)` over the whole `granule`-aligned units of `granule` bytes inside the `len`
/// bytes at `at` (a unit shared with the memory around the range is left alone); a refusal is
/// ignored, as advice is.
///
/// # Safety
/// The range is mapped memory of this process, and `advice` is one that is sound on it.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn advise_inside(at: *const u8, len: usize, granule: usize, advice: libc::c_int) {
    if let Some((from, to)) = whole_units(at, len, granule) {
        // SAFETY: the caller's: the units lie inside the range.
        let _ = unsafe { libc::madvise(from as *mut libc::c_void, to - from, advice) };
    }
}

/// The addresses `from..to` of the whole `granule`-aligned units of `granule` bytes inside the
/// `len` bytes at `at`, if there is at least one.
#[cfg(target_os = "linux")]
pub(crate) fn whole_units(at: *const u8, len: usize, granule: usize) -> Option<(usize, usize)> {
    let start = at as usize;
    let (from, to) = (
        start.next_multiple_of(granule),
        (start + len) / granule * granule,
    );
    (to > from).then_some((from, to))
}
