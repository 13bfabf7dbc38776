//! Parsing a virtio-blk request out of a descriptor chain, trusting nothing the guest wrote.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

use virtio_bindings::virtio_blk as b;

/// Request types (virtio 1.x, 5.2.6).
pub const T_IN: u32 = b::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = b::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = b::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = b::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = b::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = b::VIRTIO_BLK_T_WRITE_ZEROES;

/// Status codes written back to the driver.
pub const S_OK: u8 = b::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the GET_ID answer.
pub const ID_BYTES: u32 = b::VIRTIO_BLK_ID_BYTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            T_IN => RequestType::In,
            T_OUT => RequestType::Out,
            T_FLUSH => RequestType::Flush,
            T_GET_ID => RequestType::GetId,
            T_DISCARD => RequestType::Discard,
            T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("request header is shorter than 16 bytes or device-writable")]
    BadHeader,
    #[error("cannot read the request header from guest memory")]
    HeaderRead,
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("data buffer at {0:#x} has the wrong direction for this request")]
    WrongDirection(u64),
    #[error("data buffer at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("GET_ID buffer is smaller than {ID_BYTES} bytes")]
    ShortId,
    #[error("malformed discard/write-zeroes segment")]
    BadSegment,
    #[error(
        "descriptor chain loops, leaves the descriptor table or has a malformed indirect table"
    )]
    Truncated,
    #[error("device-readable descriptor after a device-writable one")]
    BadOrder,
    #[error("more than {MAX_SEGMENTS} data segments")]
    TooManySegments,
    #[error("discard/write-zeroes segment flags {0:#x} are not supported")]
    SegmentFlags(u32),
    #[error("the avail ring is corrupt (index jumped ahead, or a head outside the table)")]
    BrokenRing,
}

/// A validated request: every buffer is inside guest memory and has the right direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status_addr: GuestAddress,
}

/// What the worker knows about a chain it could not parse: where (if anywhere) to write an
/// error status.
#[derive(Debug)]
pub struct Rejected {
    pub error: ParseError,
    pub status_addr: Option<GuestAddress>,
}

/// Most data segments one request may carry: the kernel's `UIO_MAXIOV`, the most one
/// `preadv`/`pwritev` (or io_uring readv/writev) accepts. Linux drivers stay within the
/// advertised `seg_max` (128).
pub const MAX_SEGMENTS: usize = 1024;

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    len > 0 && mem.get_slice(addr, len as usize).is_ok()
}

/// Adds `len` bytes at `addr` to the request's data, checking direction and memory.
fn add_segment(
    mem: &GuestMemoryMmap,
    req: &mut (Vec<(GuestAddress, u32)>, u64),
    addr: GuestAddress,
    len: u32,
    device_writable: bool,
    device_writes: bool,
) -> Result<(), ParseError> {
    if len == 0 {
        return Ok(());
    }
    if device_writable != device_writes {
        return Err(ParseError::WrongDirection(addr.0));
    }
    if !in_memory(mem, addr, len) {
        return Err(ParseError::OutOfMemory { addr: addr.0, len });
    }
    if req.0.len() >= MAX_SEGMENTS {
        return Err(ParseError::TooManySegments);
    }
    req.0.push((addr, len));
    req.1 += u64::from(len);
    Ok(())
}

/// Parses `chain` into a request for a disk of `capacity` sectors.
///
/// Any framing is accepted (virtio 1.x, 2.7.4: the device must not assume one): the header is
/// the first 16 bytes of the device-readable part, the status the last byte of the
/// device-writable part, and everything between is data. Linux uses one descriptor for each.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    capacity: u64,
    readonly: bool,
) -> Result<Request, Rejected>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let descs: Vec<Descriptor> = chain.collect();
    let reject = |error, status_addr| Rejected { error, status_addr };
    let last = descs
        .last()
        .ok_or_else(|| reject(ParseError::Empty, None))?;
    // The chain iterator ends a chain early without saying so: after queue-size descriptors
    // (a loop), at a next index outside the table, at a malformed indirect table, or past
    // 4 GiB. The last descriptor it yielded then still has NEXT set. Its end is not the
    // driver's, so there is no status byte to trust.
    if last.has_next() {
        return Err(reject(ParseError::Truncated, None));
    }
    let status_addr = match last
        .addr()
        .checked_add(u64::from(last.len()).wrapping_sub(1))
    {
        Some(addr) if last.is_write_only() && last.len() >= 1 && in_memory(mem, addr, 1) => addr,
        _ => return Err(reject(ParseError::NoStatus, None)),
    };
    let status = Some(status_addr);
    // Device-readable descriptors come first (2.7.4.2).
    let first_writable = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
        return Err(reject(ParseError::BadOrder, status));
    }
    // The header: the first 16 bytes of the readable part.
    let mut header = [0u8; 16];
    let mut got = 0usize;
    let mut rest: Option<(GuestAddress, u32)> = None;
    let mut readable = descs[..first_writable].iter();
    for d in readable.by_ref() {
        let n = (header.len() - got).min(d.len() as usize);
        mem.read_slice(&mut header[got..got + n], d.addr())
            .map_err(|_| reject(ParseError::HeaderRead, status))?;
        got += n;
        if got == header.len() {
            let left = d.len() - n as u32;
            if left > 0 {
                let addr = d.addr().checked_add(n as u64).ok_or_else(|| {
                    reject(
                        ParseError::OutOfMemory {
                            addr: d.addr().0,
                            len: d.len(),
                        },
                        status,
                    )
                })?;
                rest = Some((addr, left));
            }
            break;
        }
    }
    if got < header.len() {
        return Err(reject(ParseError::BadHeader, status));
    }
    let t = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let kind = RequestType::from(t);

    // The data: what follows the header, up to the status byte. Flush and unknown requests
    // carry none the device looks at.
    let mut data = (Vec::with_capacity(descs.len()), 0u64);
    if !matches!(kind, RequestType::Flush | RequestType::Unsupported(_)) {
        let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
        let writable = &descs[first_writable..];
        let (status_desc, writable_data) = match writable.split_last() {
            Some(split) => split,
            None => return Err(reject(ParseError::NoStatus, None)),
        };
        let segments = rest
            .into_iter()
            .chain(readable.map(|d| (d.addr(), d.len())))
            .map(|(a, l)| (a, l, false))
            .chain(writable_data.iter().map(|d| (d.addr(), d.len(), true)))
            .chain(std::iter::once((
                status_desc.addr(),
                status_desc.len() - 1,
                true,
            )));
        for (addr, len, device_writable) in segments {
            add_segment(mem, &mut data, addr, len, device_writable, device_writes)
                .map_err(|e| reject(e, status))?;
        }
    }
    let (data, data_len) = data;
    let check_range = |count: u64| match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    };
    let result = match kind {
        RequestType::In | RequestType::Out => {
            if data_len % SECTOR_SIZE != 0 {
                Err(ParseError::Unaligned(data_len))
            } else if kind == RequestType::Out && readonly {
                Err(ParseError::ReadOnly)
            } else {
                check_range(data_len >> SECTOR_SHIFT)
            }
        }
        RequestType::Flush => Ok(()),
        RequestType::GetId if data_len < u64::from(ID_BYTES) => Err(ParseError::ShortId),
        RequestType::GetId => Ok(()),
        RequestType::Discard | RequestType::WriteZeroes => {
            if readonly {
                Err(ParseError::ReadOnly)
            } else if data_len == 0 || data.iter().any(|&(_, len)| len % 16 != 0) {
                Err(ParseError::BadSegment)
            } else {
                Ok(())
            }
        }
        RequestType::Unsupported(t) => Err(ParseError::Unsupported(t)),
    };
    result.map_err(|e| reject(e, Some(status_addr)))?;
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}

/// The one segment flag defined (write-zeroes only): the device may deallocate the range.
pub const SEGMENT_F_UNMAP: u32 = 1;

/// A discard/write-zeroes segment: sector, number of sectors, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Reads and range-checks the segments of a discard/write-zeroes request.
pub fn read_segments(
    mem: &GuestMemoryMmap,
    req: &Request,
    capacity: u64,
) -> Result<Vec<Segment>, ParseError> {
    let mut out = Vec::new();
    for &(addr, len) in &req.data {
        for i in 0..u64::from(len) / 16 {
            let base = addr.unchecked_add(i * 16);
            let sector: u64 = mem.read_obj(base).map_err(|_| ParseError::BadSegment)?;
            let num_sectors: u32 = mem
                .read_obj(base.unchecked_add(8))
                .map_err(|_| ParseError::BadSegment)?;
            let flags: u32 = mem
                .read_obj(base.unchecked_add(12))
                .map_err(|_| ParseError::BadSegment)?;
            let allowed = if req.kind == RequestType::WriteZeroes {
                SEGMENT_F_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(ParseError::SegmentFlags(flags));
            }
            match sector.checked_add(u64::from(num_sectors)) {
                Some(end) if end <= capacity => {}
                _ => {
                    return Err(ParseError::OutOfRange {
                        sector,
                        count: u64::from(num_sectors),
                        capacity,
                    })
                }
            }
            out.push(Segment {
                sector,
                num_sectors,
                flags,
            });
        }
    }
    Ok(out)
}
