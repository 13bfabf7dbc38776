//! A guest's input files (kernel, initramfs): each opened once, checked from its descriptor
//! (a regular file of a sane size), and then measured and loaded from that same descriptor, so
//! a path swapped between a check and a read changes nothing, and a FIFO or a device put where
//! a file was expected is refused instead of blocking the VMM.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Largest kernel image accepted (a vmlinux with its symbols is tens of MiB).
pub const MAX_KERNEL_SIZE: u64 = 256 << 20;
/// Largest initramfs accepted (it must also fit in guest memory below 3 GiB).
pub const MAX_INITRAMFS_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is a {kind}, not a regular file")]
    NotAFile {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {path} is {size} bytes; podvmm takes at most {max} bytes")]
    TooLarge {
        what: &'static str,
        path: PathBuf,
        size: u64,
        max: u64,
    },
    #[error("{what} {path} is empty")]
    Empty { what: &'static str, path: PathBuf },
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An opened, checked input file.
#[derive(Debug)]
pub struct Input {
    pub what: &'static str,
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
}

impl Input {
    /// Opens `path` without blocking (`O_NONBLOCK`: opening a FIFO or a tty never waits) and
    /// checks from the descriptor that it is a non-empty regular file of at most `max` bytes.
    pub fn open(what: &'static str, path: &Path, max: u64) -> Result<Input, InputError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)
            .map_err(|source| InputError::Open {
                what,
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| InputError::Open {
            what,
            path: path.to_owned(),
            source,
        })?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            None
        } else if ft.is_dir() {
            Some("directory")
        } else if ft.is_fifo() {
            Some("FIFO")
        } else if ft.is_char_device() {
            Some("character device")
        } else if ft.is_block_device() {
            Some("block device")
        } else if ft.is_socket() {
            Some("socket")
        } else {
            Some("special file")
        };
        if let Some(kind) = kind {
            return Err(InputError::NotAFile {
                what,
                path: path.to_owned(),
                kind,
            });
        }
        let size = meta.len();
        if size > max {
            return Err(InputError::TooLarge {
                what,
                path: path.to_owned(),
                size,
                max,
            });
        }
        if size == 0 {
            return Err(InputError::Empty {
                what,
                path: path.to_owned(),
            });
        }
        Ok(Input {
            what,
            path: path.to_owned(),
            file,
            size,
        })
    }

    /// Feeds the file's first `size` bytes to `f`, chunk by chunk, from the descriptor
    /// (positioned reads: the file offset the loader uses is untouched).
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8])) -> Result<(), InputError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.size {
            let want = ((self.size - at) as usize).min(buf.len());
            match self.file.read_at(&mut buf[..want], at) {
                // Shrunk under us: what is left is what the loader will find too.
                Ok(0) => break,
                Ok(n) => {
                    f(&buf[..n]);
                    at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(InputError::Read {
                        what: self.what,
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_sane_regular_file() {
        let dir = std::env::temp_dir().join(format!("podvmm-input-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Opening a FIFO nobody writes to returns at once, and is refused.
        let e = Input::open("kernel", &fifo, MAX_KERNEL_SIZE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
        let e = Input::open("kernel", Path::new("/dev/zero"), MAX_KERNEL_SIZE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("character device"), "{e}");
        let e = Input::open("kernel", &dir, MAX_KERNEL_SIZE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("directory"), "{e}");
        // A huge sparse file is refused from its size, without reading it.
        let big = dir.join("big");
        File::create(&big).unwrap().set_len(20 << 30).unwrap();
        let e = Input::open("kernel", &big, MAX_KERNEL_SIZE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("21474836480 bytes; podvmm takes at most"), "{e}");
        let empty = dir.join("empty");
        File::create(&empty).unwrap();
        assert!(Input::open("initramfs", &empty, 10)
            .unwrap_err()
            .to_string()
            .contains("is empty"));
        // A good one is read back whole, in chunks.
        let good = dir.join("good");
        std::fs::write(&good, vec![7u8; 3 << 20]).unwrap();
        let input = Input::open("kernel", &good, MAX_KERNEL_SIZE).unwrap();
        let mut total = 0;
        input.for_each_chunk(|c| total += c.len()).unwrap();
        assert_eq!(total, 3 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
