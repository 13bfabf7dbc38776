//! SHA-256 digests of what a VM booted (`vm.info`'s `boot_digests`).

use super::*;

/// The SHA-256 of an input, read from its descriptor (bounded by the input's size limit).
pub(super) fn digest(input: &boot::Input) -> Result<String, ApiError> {
    let mut hasher = Sha256::new();
    input
        .for_each_chunk(|c| hasher.update(c))
        .map_err(|e| bad(e.to_string()))?;
    Ok(hex(&hasher.finalize()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}
