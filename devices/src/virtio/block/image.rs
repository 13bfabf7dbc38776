//! What kind of disk image a file holds, from its magic numbers: podvmm serves raw images only,
//! so a client that does not know the format (`image_type: Unknown`) has its image probed and
//! a qcow2, VHDX or VHD refused instead of being handed to the guest as raw bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// An image format podvmm recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vhdx,
    /// A fixed or dynamic VHD: its footer (the last 512 bytes, or a copy at the start).
    Vhd,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhdx => "VHDX",
            ImageFormat::Vhd => "VHD",
        }
    }
}

const QCOW_MAGIC: &[u8] = b"QFI\xfb";
const VHDX_SIGNATURE: &[u8] = b"vhdxfile";
const VHD_COOKIE: &[u8] = b"conectix";

/// Reads at most `buf.len()` bytes at `offset`; short at the end of the file.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The format of the image in `file` (`size` bytes long).
pub fn probe(file: &File, size: u64) -> io::Result<ImageFormat> {
    let mut head = [0u8; 8];
    let n = read_at(file, &mut head, 0)?;
    if n >= 4 && &head[..4] == QCOW_MAGIC {
        return Ok(ImageFormat::Qcow2);
    }
    if n == 8 && head == VHDX_SIGNATURE {
        return Ok(ImageFormat::Vhdx);
    }
    if n == 8 && head == VHD_COOKIE {
        return Ok(ImageFormat::Vhd);
    }
    if size >= 512 {
        let mut tail = [0u8; 8];
        if read_at(file, &mut tail, size - 512)? == 8 && tail == VHD_COOKIE {
            return Ok(ImageFormat::Vhd);
        }
    }
    Ok(ImageFormat::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(tag: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("podvmm-probe-{tag}-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        let f = File::open(&p).unwrap();
        (p, f)
    }

    #[test]
    fn recognises_each_format_and_calls_the_rest_raw() {
        let mut vhd = vec![0u8; 4096];
        vhd[4096 - 512..4096 - 504].copy_from_slice(VHD_COOKIE);
        let mut qcow = vec![0u8; 1024];
        qcow[..4].copy_from_slice(QCOW_MAGIC);
        let cases: [(&str, Vec<u8>, ImageFormat); 6] = [
            ("raw", vec![0u8; 8192], ImageFormat::Raw),
            ("qcow2", qcow, ImageFormat::Qcow2),
            ("vhdx", b"vhdxfile and more".to_vec(), ImageFormat::Vhdx),
            ("vhd", vhd, ImageFormat::Vhd),
            ("tiny", b"QF".to_vec(), ImageFormat::Raw),
            ("empty", Vec::new(), ImageFormat::Raw),
        ];
        for (tag, bytes, want) in cases {
            let (p, f) = image(tag, &bytes);
            assert_eq!(probe(&f, bytes.len() as u64).unwrap(), want, "{tag}");
            let _ = std::fs::remove_file(p);
        }
    }
}
