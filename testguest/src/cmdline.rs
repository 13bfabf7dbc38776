//! The kernel command line, read the way Linux reads it: space-separated `key=value` words.
//! podvmm announces each virtio-mmio device as `virtio_mmio.device=<size>@<base>:<irq>`;
//! our own options are `testguest.<name>=<value>`.

/// A virtio-mmio device announced on the command line.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

pub struct Cmdline(pub &'static str);

/// Parses `123`, `0x7b`, with an optional K/M/G suffix.
pub fn parse_num(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    v.checked_mul(mult)
}

impl Cmdline {
    /// `testguest.<name>` as a number, or `default` (also when it does not parse).
    pub fn num(&self, name: &str, default: u64) -> u64 {
        self.option(name).and_then(parse_num).unwrap_or(default)
    }

    /// `testguest.<name>`.
    pub fn option(&self, name: &str) -> Option<&'static str> {
        self.0
            .split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix("testguest."))
            .filter_map(|w| w.split_once('='))
            .rfind(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Whether `testguest.<name>` lists `item` (comma-separated), or `default` if absent.
    pub fn lists(&self, name: &str, item: &str, default: bool) -> bool {
        match self.option(name) {
            Some(list) => list.split(',').any(|i| i == item || i == "all"),
            None => default,
        }
    }

    /// Every `virtio_mmio.device=` word, in order; malformed ones are returned as `Err`.
    pub fn mmio_devices(&self) -> impl Iterator<Item = Result<MmioDevice, &'static str>> {
        self.0
            .split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
            .map(|spec| {
                let (size, rest) = spec.split_once('@').ok_or(spec)?;
                let (base, irq) = rest.split_once(':').ok_or(spec)?;
                Ok(MmioDevice {
                    size: parse_num(size).ok_or(spec)?,
                    base: parse_num(base).ok_or(spec)?,
                    irq: irq.parse().map_err(|_| spec)?,
                })
            })
    }
}
