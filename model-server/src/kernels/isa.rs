//! Which vector instructions and how much cache this CPU has, read once at
//! run time: the binary is built for the baseline x86-64 target so that one
//! image runs on every CPU, and the kernels pick their variant from this.

use std::sync::OnceLock;

/// A family of kernel variants, from the widest to the portable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F with FMA: 16 lanes, 32 vector registers.
    Avx512,
    /// AVX2 with FMA: 8 lanes, 16 vector registers.
    Avx2Fma,
    /// Plain Rust that the compiler vectorises for the baseline target (SSE2 on x86-64).
    Portable,
}

impl Isa {
    /// The widest variant this CPU runs, detected once.
    pub fn detect() -> Self {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| Self::available()[0])
    }

    /// Every variant this CPU can run, widest first; the portable one is always last.
    pub fn available() -> Vec<Self> {
        let mut all = Vec::with_capacity(3);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("fma") {
                all.push(Self::Avx512);
            }
            if has!("avx2") && has!("fma") {
                all.push(Self::Avx2Fma);
            }
        }
        all.push(Self::Portable);
        all
    }

    /// Whether this CPU multiplies bf16 pairs into f32 (AVX512-BF16), which
    /// the reduced-precision kernels need.
    pub fn has_bf16() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// Short name for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2Fma => "avx2-fma",
            Self::Portable => "portable",
        }
    }

    /// Parses a name as printed by [`Isa::name`], refusing one this CPU cannot run.
    pub fn parse_available(name: &str) -> Result<Self, String> {
        let available = Self::available();
        let wanted = match name {
            "auto" => return Ok(Self::detect()),
            "avx512" => Self::Avx512,
            "avx2-fma" | "avx2" => Self::Avx2Fma,
            "portable" => Self::Portable,
            other => {
                return Err(format!(
                    "unknown CPU kernel set `{other}` (auto, avx512, avx2-fma or portable)"
                ));
            }
        };
        if available.contains(&wanted) {
            Ok(wanted)
        } else {
            Err(format!(
                "this CPU cannot run the {} kernels (it has: {})",
                wanted.name(),
                available
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// Bytes of level-2 cache one core has to itself, read once; 256 KiB when the
/// system does not say (the smallest L2 of the x86-64 server CPUs in use).
pub fn l2_cache_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| read_cache_size(2).unwrap_or(256 << 10))
}

/// The size of cpu0's data or unified cache at `level`, from sysfs.
fn read_cache_size(level: u32) -> Option<usize> {
    let base = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    std::fs::read_dir(base).ok()?.find_map(|entry| {
        let dir = entry.ok()?.path();
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        let kind = read("type")?;
        if read("level")?.trim().parse::<u32>().ok()? != level || kind.trim() == "Instruction" {
            return None;
        }
        parse_size(read("size")?.trim())
    })
}

/// `512K`, `2048K`, `1M` or a plain byte count.
fn parse_size(text: &str) -> Option<usize> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: usize = digits.parse().ok()?;
    match unit {
        "" => Some(n),
        "K" => Some(n << 10),
        "M" => Some(n << 20),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_size("512K"), Some(512 << 10));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("12Q"), None);
    }

    #[test]
    fn portable_is_always_available_and_names_round_trip() {
        let all = Isa::available();
        assert_eq!(all.last(), Some(&Isa::Portable));
        assert_eq!(Isa::detect(), all[0]);
        for isa in all {
            assert_eq!(Isa::parse_available(isa.name()), Ok(isa));
        }
        assert!(Isa::parse_available("sse9").is_err());
    }
}
