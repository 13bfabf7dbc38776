//! The 8250/16550 UART at COM1, backed by vm-superio, writing to stdout, a file, or nowhere.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use vm_superio::{serial::NoEvents, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// COM1's I/O ports and legacy interrupt line.
pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by signalling an EventFd the VMM registered as an irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console bytes go.
pub enum SerialOutput {
    Stdout,
    File(File),
    Sink,
}

impl SerialOutput {
    /// Creates (or truncates) `path` for console output.
    pub fn file(path: &Path) -> io::Result<Self> {
        Ok(SerialOutput::File(File::create(path)?))
    }

    fn into_writer(self) -> Box<dyn Write + Send> {
        match self {
            SerialOutput::Stdout => Box::new(io::stdout()),
            SerialOutput::File(f) => Box::new(f),
            SerialOutput::Sink => Box::new(io::sink()),
        }
    }
}

/// Called with each complete console line (without its newline), for a VMM that watches the
/// console for a known failure; lines are cut at [`WATCH_LINE_MAX`] bytes.
pub type LineWatch = Box<dyn FnMut(&[u8]) + Send>;

/// The longest line a [`LineWatch`] sees; the rest of a longer line is not buffered.
pub const WATCH_LINE_MAX: usize = 512;

/// Passes bytes through to the console and complete lines to a watcher.
struct Watched {
    inner: Box<dyn Write + Send>,
    line: Vec<u8>,
    watch: LineWatch,
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' => {
                    (self.watch)(&self.line);
                    self.line.clear();
                }
                b'\r' => {}
                _ if self.line.len() < WATCH_LINE_MAX => self.line.push(b),
                _ => {}
            }
        }
        self.inner.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    write_errors: u64,
}

impl Serial {
    /// `irq_evt` is signalled whenever the UART raises its interrupt.
    pub fn new(irq_evt: EventFd, output: SerialOutput) -> Self {
        Self::with_writer(irq_evt, output.into_writer())
    }

    /// Like [`Serial::new`], with every complete output line also handed to `watch`.
    pub fn watched(irq_evt: EventFd, output: SerialOutput, watch: LineWatch) -> Self {
        let writer = Watched {
            inner: output.into_writer(),
            line: Vec::new(),
            watch,
        };
        Self::with_writer(irq_evt, Box::new(writer))
    }

    fn with_writer(irq_evt: EventFd, writer: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq_evt), writer),
            write_errors: 0,
        }
    }

    /// Feeds host input (keyboard) to the guest; returns how many bytes fitted in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.uart
            .enqueue_raw_bytes(bytes)
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    /// Output bytes that could not be written (a closed stdout, a full disk).
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < COM1_LEN {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_LEN {
            return;
        }
        // A console that cannot be written must not stop the guest; count and go on.
        if self.uart.write(offset as u8, data[0]).is_err() {
            self.write_errors += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn a_watcher_sees_whole_lines_and_the_console_every_byte() {
        use std::sync::{Arc, Mutex};
        let dir = std::env::temp_dir().join(format!("podvmm-serial-w-{}", std::process::id()));
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = seen.clone();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::watched(
            evt,
            SerialOutput::file(&dir).unwrap(),
            Box::new(move |l| sink.lock().unwrap().push(String::from_utf8_lossy(l).into())),
        );
        let long = "x".repeat(WATCH_LINE_MAX + 10);
        for b in format!("one\r\ntwo\n{long}\npartial").bytes() {
            serial.write(THR, &[b]);
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!((seen[0].as_str(), seen[1].as_str()), ("one", "two"));
        assert_eq!(seen[2].len(), WATCH_LINE_MAX);
        let mut out = String::new();
        File::open(&dir).unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, format!("one\r\ntwo\n{long}\npartial"));
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn bytes_written_reach_the_file_and_lsr_says_ready() {
        let dir = std::env::temp_dir().join(format!("podvmm-serial-{}", std::process::id()));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(evt, SerialOutput::file(&dir).unwrap());
        for b in b"hi\n" {
            serial.write(THR, &[*b]);
        }
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter empty");
        let mut out = String::new();
        File::open(&dir).unwrap().read_to_string(&mut out).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(out, "hi\n");
    }

    #[test]
    fn input_raises_the_interrupt_when_enabled() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(evt.try_clone().unwrap(), SerialOutput::Sink);
        serial.write(IER, &[0x01]); // received-data-available interrupt
        assert_eq!(serial.enqueue_input(b"x").unwrap(), 1);
        assert!(evt.read().unwrap() >= 1);
        let mut d = [0u8];
        serial.read(THR, &mut d);
        assert_eq!(d[0], b'x');
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = Serial::new(evt, SerialOutput::Sink);
        let mut d = [0u8; 2];
        serial.read(THR, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        serial.write(THR, &[1, 2]);
        assert_eq!(serial.write_errors(), 0);
    }
}
