//! Which device a run computes on: `auto` (the first GPU when this build has CUDA and a GPU is
//! present, else the CPU), `cpu`, `cuda` or `cuda:N`. The same words in `run.device` and in
//! every subcommand's `--device`.

use crate::Error;
use candle_core::Device;
use serde::{Deserialize, Serialize};

/// A device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first GPU if there is one (and this build has CUDA), else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// GPU `N` (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Config {
            key: "device".into(),
            msg: format!("{s:?}: give auto, cpu, cuda or cuda:N"),
        };
        match s.trim() {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: Error| serde::de::Error::custom(e.to_string()))
    }
}

/// Whether this build of glip-rs can use CUDA (built with the `cuda` feature).
pub fn cuda_built() -> bool {
    candle_core::utils::cuda_is_available()
}

const NO_CUDA: &str = "this glip was built without CUDA: build it with \
    `cargo build --release -p glip-cli --features cuda` (on a machine without the CUDA toolkit, \
    `cargo xtask cuda-env` prints the environment that build needs)";

impl DeviceSpec {
    /// The device, or an error that says why not (and how to build with CUDA).
    pub fn resolve(self) -> Result<Device, Error> {
        self.resolve_noted().map(|(d, _)| d)
    }

    /// [`DeviceSpec::resolve`], and why `auto` took the CPU in a build with CUDA (no GPU, or
    /// none visible: `CUDA_VISIBLE_DEVICES`), for the run to say so.
    pub fn resolve_noted(self) -> Result<(Device, Option<String>), Error> {
        match self {
            DeviceSpec::Cpu => Ok((Device::Cpu, None)),
            DeviceSpec::Auto if cuda_built() => match glip_kernels::cuda::new_device(0) {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((
                    Device::Cpu,
                    Some(format!(
                        "auto: this build has CUDA, but cuda:0 did not open ({e}): computing \
                         on the CPU"
                    )),
                )),
            },
            DeviceSpec::Auto => Ok((Device::Cpu, None)),
            DeviceSpec::Cuda(n) => {
                if !cuda_built() {
                    return Err(Error::Config {
                        key: "device".into(),
                        msg: format!("cuda:{n}: {NO_CUDA}"),
                    });
                }
                let d = glip_kernels::cuda::new_device(n).map_err(|e| Error::Config {
                    key: "device".into(),
                    msg: format!("cuda:{n}: no such GPU ({e})"),
                })?;
                Ok((d, None))
            }
        }
    }

    /// This request unless `over` (a `--device` given on the command line) says otherwise.
    pub fn or(self, over: Option<DeviceSpec>) -> DeviceSpec {
        over.unwrap_or(self)
    }
}

/// `cpu`, or `cuda:N` with the GPU's ordinal, for messages.
pub fn describe(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_words_parse_and_print_back() {
        for (s, d) in [
            ("auto", DeviceSpec::Auto),
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            let parsed: DeviceSpec = s.parse().unwrap();
            assert_eq!(parsed, d);
            let again: DeviceSpec = parsed.to_string().parse().unwrap();
            assert_eq!(again, d);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("auto, cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_and_cpu_resolve_without_cuda_and_cuda_says_how_to_build() {
        assert!(DeviceSpec::Cpu.resolve().unwrap().is_cpu());
        if !cuda_built() {
            assert!(DeviceSpec::Auto.resolve().unwrap().is_cpu());
            let (d, note) = DeviceSpec::Auto.resolve_noted().unwrap();
            assert!(d.is_cpu() && note.is_none(), "a CPU-only build's auto is the CPU, silently");
            let e = DeviceSpec::Cuda(0).resolve().unwrap_err().to_string();
            assert!(e.contains("--features cuda") && e.contains("cargo xtask cuda-env"), "{e}");
        }
    }
}
