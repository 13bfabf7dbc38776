//! virtio-vsock through podvmm's hybrid socket, both directions:
//!
//! - host to guest (`testguest.vsock_listen=L`): right after boot, before anything else
//!   (even the TSC calibration, so the host can time exec-to-first-answer), the guest
//!   accepts a connection to its port L, which a host program asked for with
//!   `CONNECT L\n` on the Unix socket, and echoes every byte until the host shuts down;
//! - guest to host (`testguest.vsock_port=P`): the guest connects to host port P (a host
//!   program listening on `<socket>_P` that echoes), measures small-message round trips
//!   for `testguest.vsock_ms` ms, streams `testguest.vsock_bulk` bytes through the echo
//!   with credit-based flow control both ways (a small receive buffer of our own, so the
//!   device must respect our credit; more data than the device's buffer, so we depend on its
//!   credit updates), then shuts down and expects the device to close with RST;
//! - a connection to a host port nobody listens on (`testguest.vsock_closed_port`, 5999)
//!   must be refused with RST.

use crate::arch::rdtsc;
use crate::cmdline::Cmdline;
use crate::dma::{Pool, Region};
use crate::println;
use crate::report::{Summary, Test};
use crate::time::{Clock, Deadline};
use crate::virtio::Transport;
use crate::vsock::*;

/// The byte at stream offset `k` of everything the guest sends (the echo brings it back).
fn pat(k: u64) -> u8 {
    (k ^ (k >> 8) ^ 0xa5) as u8
}

fn fill(r: Region, from: u64) {
    for i in 0..r.len {
        r.write8(i, pat(from + i as u64));
    }
}

fn check(r: Region, from: u64) -> bool {
    (0..r.len).all(|i| r.read8(i) == pat(from + i as u64))
}

/// What the host-to-guest phase found.
pub struct Early {
    vsock: Result<Vsock, &'static str>,
    port: u32,
    result: Result<Served, &'static str>,
}

#[derive(Clone, Copy)]
struct Served {
    echoed: u64,
    /// TSC when the host's REQUEST arrived.
    request_tsc: u64,
    end_tsc: u64,
}

/// The host-to-guest phase: init, accept one connection to `port`, echo until the host is
/// done. `clock` is only used for time-outs (it may be uncalibrated).
pub fn listen_phase(t: Transport, pool: &mut Pool, clock: &Clock, port: u32) -> Early {
    let mut vsock = Vsock::init(t, pool);
    let result = match &mut vsock {
        Ok(v) => serve(v, port, clock.deadline(30_000)),
        Err(e) => Err(*e),
    };
    Early {
        vsock,
        port,
        result,
    }
}

/// Accepts one connection to `port` and echoes until the host shuts it down.
fn serve(v: &mut Vsock, port: u32, deadline: Deadline) -> Result<Served, &'static str> {
    let mut conn: Option<Conn> = None;
    let mut served = Served {
        echoed: 0,
        request_tsc: 0,
        end_tsc: 0,
    };
    loop {
        if deadline.passed() {
            return Err("the host's connection never came or never ended");
        }
        let Some(p) = v.recv() else { continue };
        let h = p.h;
        match &mut conn {
            None if h.op == OP_REQUEST && h.dst_port == port => {
                served.request_tsc = rdtsc();
                let mut c = Conn {
                    local: port,
                    peer: h.src_port,
                    buf_alloc: 64 * 1024,
                    ..Conn::default()
                };
                c.saw(&h);
                let r = c.header(v.cid, OP_RESPONSE);
                v.release(p);
                v.send(&r, 0, deadline, |_| {})?;
                conn = Some(c);
            }
            Some(c) if c.owns(&p) => {
                c.saw(&h);
                match h.op {
                    OP_RW => {
                        let len = p.payload.len;
                        if c.credit() < len as u32 {
                            v.release(p);
                            return Err("no credit to echo the host's data");
                        }
                        c.consumed(len as u32);
                        let mut r = c.header(v.cid, OP_RW);
                        r.len = len as u32;
                        let src = p.payload;
                        v.send(&r, len, deadline, |dst| {
                            for i in 0..len {
                                dst.write8(i, src.read8(i));
                            }
                        })?;
                        c.tx_cnt = c.tx_cnt.wrapping_add(len as u32);
                        served.echoed += len as u64;
                        v.release(p);
                    }
                    OP_SHUTDOWN | OP_RST => {
                        v.release(p);
                        if h.op == OP_SHUTDOWN {
                            let r = c.header(v.cid, OP_RST);
                            v.send(&r, 0, deadline, |_| {})?;
                        }
                        served.end_tsc = rdtsc();
                        return Ok(served);
                    }
                    OP_CREDIT_REQUEST => {
                        v.release(p);
                        let r = c.header(v.cid, OP_CREDIT_UPDATE);
                        v.send(&r, 0, deadline, |_| {})?;
                    }
                    _ => v.release(p),
                }
            }
            _ => {
                // Not ours: refuse connection requests, ignore the rest.
                v.release(p);
                if h.op == OP_REQUEST {
                    let r = Header {
                        src_cid: v.cid,
                        dst_cid: HOST_CID,
                        src_port: h.dst_port,
                        dst_port: h.src_port,
                        type_: TYPE_STREAM,
                        op: OP_RST,
                        ..Header::default()
                    };
                    v.send(&r, 0, deadline, |_| {})?;
                }
            }
        }
    }
}

/// A guest-initiated connection and the state of its two byte streams.
struct Stream {
    c: Conn,
    tx_off: u64,
    rx_off: u64,
    bad: u64,
    peer_shutdown: bool,
    reset: bool,
    /// The device asked for our credit (CREDIT_REQUEST).
    owe_update: bool,
}

/// Sends REQUEST to host port `port`; waits for RESPONSE (Ok) or RST (Err).
fn connect(
    v: &mut Vsock,
    port: u32,
    local: u32,
    buf_alloc: u32,
    clock: &Clock,
) -> Result<Stream, &'static str> {
    let mut c = Conn {
        local,
        peer: port,
        buf_alloc,
        ..Conn::default()
    };
    let deadline = clock.deadline(3000);
    let h = c.header(v.cid, OP_REQUEST);
    v.send(&h, 0, deadline, |_| {})?;
    loop {
        if deadline.passed() {
            return Err("no answer to our connection request");
        }
        let Some(p) = v.recv() else { continue };
        let h = p.h;
        let ours = c.owns(&p);
        v.release(p);
        if !ours {
            continue;
        }
        c.saw(&h);
        return match h.op {
            OP_RESPONSE => Ok(Stream {
                c,
                tx_off: 0,
                rx_off: 0,
                bad: 0,
                peer_shutdown: false,
                reset: false,
                owe_update: false,
            }),
            OP_RST => Err("refused (RST)"),
            _ => Err("unexpected answer to a connection request"),
        };
    }
}

impl Stream {
    /// Handles every packet that arrived: echoed data is checked against the pattern.
    fn pump(&mut self, v: &mut Vsock, deadline: Deadline) -> Result<(), &'static str> {
        while let Some(p) = v.recv() {
            let h = p.h;
            if !self.c.owns(&p) {
                v.release(p);
                continue;
            }
            self.c.saw(&h);
            match h.op {
                OP_RW => {
                    if p.short || !check(p.payload, self.rx_off) {
                        self.bad += 1;
                    }
                    self.c.consumed(p.payload.len as u32);
                    self.rx_off += p.payload.len as u64;
                }
                OP_CREDIT_REQUEST => self.owe_update = true,
                OP_SHUTDOWN => self.peer_shutdown = true,
                OP_RST => self.reset = true,
                _ => {}
            }
            v.release(p);
        }
        if self.c.owes_update() || self.owe_update {
            self.owe_update = false;
            let h = self.c.header(v.cid, OP_CREDIT_UPDATE);
            v.send(&h, 0, deadline, |_| {})?;
        }
        if self.reset {
            return Err("the host reset the connection");
        }
        Ok(())
    }

    /// Sends `len` bytes of the pattern, waiting for credit as needed.
    fn send(
        &mut self,
        v: &mut Vsock,
        len: usize,
        deadline: Deadline,
        credit_waits: &mut u64,
    ) -> Result<(), &'static str> {
        let mut left = len;
        while left > 0 {
            let chunk = left.min(MAX_TX_PAYLOAD);
            if (self.c.credit() as usize) < chunk {
                *credit_waits += 1;
                while (self.c.credit() as usize) < chunk {
                    self.pump(v, deadline)?;
                    if deadline.passed() {
                        return Err("no credit from the device");
                    }
                }
            }
            let mut h = self.c.header(v.cid, OP_RW);
            h.len = chunk as u32;
            let from = self.tx_off;
            v.send(&h, chunk, deadline, |r| fill(r, from))?;
            self.tx_off += chunk as u64;
            self.c.tx_cnt = self.c.tx_cnt.wrapping_add(chunk as u32);
            left -= chunk;
        }
        Ok(())
    }

    /// Waits until everything sent came back.
    fn drain(&mut self, v: &mut Vsock, deadline: Deadline) -> Result<(), &'static str> {
        while self.rx_off < self.tx_off {
            self.pump(v, deadline)?;
            if deadline.passed() {
                return Err("the echo stopped");
            }
        }
        Ok(())
    }
}

pub fn run(
    t: Transport,
    early: Option<Early>,
    pool: &mut Pool,
    clock: &Clock,
    cmd: &Cmdline,
    sum: &mut Summary,
) {
    let mut test = Test::new("vsock");
    let vsock = match early {
        Some(e) => {
            match e.result {
                Ok(s) => println!(
                    "TESTGUEST vsock host_connect port={} echoed={} us={}",
                    e.port,
                    s.echoed,
                    clock.ns(s.end_tsc - s.request_tsc) / 1000
                ),
                Err(err) => test.fail(format_args!("host connection to port {}: {err}", e.port)),
            }
            e.vsock
        }
        None => Vsock::init(t, pool),
    };
    let mut v = match vsock {
        Ok(v) => v,
        Err(e) => {
            test.fail(format_args!("init: {e}"));
            sum.finish(test);
            return;
        }
    };
    println!("TESTGUEST vsock cid={} queue_size={}", v.cid, v.rx.size);
    test.check(
        v.cid > 2 && v.cid < 0xffff_ffff,
        format_args!("guest cid {} is reserved", v.cid),
    );

    if let Some(port) = cmd.option("vsock_port").and_then(crate::cmdline::parse_num) {
        guest_to_host(&mut v, port as u32, clock, cmd, &mut test);
    }

    let closed = cmd.num("vsock_closed_port", 5999) as u32;
    let r = connect(&mut v, closed, 40_000, 4096, clock).map(|_| ());
    let rst = r == Err("refused (RST)");
    println!(
        "TESTGUEST vsock closed_port port={closed} rst={}",
        u8::from(rst)
    );
    test.check(
        rst,
        format_args!("connection to closed host port {closed}: {r:?}"),
    );
    sum.finish(test);
}

fn guest_to_host(v: &mut Vsock, port: u32, clock: &Clock, cmd: &Cmdline, test: &mut Test) {
    let mut s = match connect(v, port, 50_000, 16 * 1024, clock) {
        Ok(s) => s,
        Err(e) => return test.fail(format_args!("connect to host port {port}: {e}")),
    };
    let mut credit_waits = 0u64;

    // Round trips of one 64-byte message.
    let ms = cmd.num("vsock_ms", 200);
    let until = clock.deadline(ms);
    let t0 = rdtsc();
    let mut trips = 0u64;
    let mut result = Ok(());
    while !until.passed() {
        let deadline = clock.deadline(3000);
        result = s
            .send(v, 64, deadline, &mut credit_waits)
            .and_then(|_| s.drain(v, deadline));
        if result.is_err() {
            break;
        }
        trips += 1;
    }
    let cycles = rdtsc() - t0;
    println!(
        "TESTGUEST vsock rtt port={port} trips={trips} per_sec={} us={}",
        clock.per_sec(trips, cycles),
        clock.ns(cycles / trips.max(1)) / 1000
    );
    if let Err(e) = result {
        return test.fail(format_args!("round trips: {e}"));
    }
    test.check(trips > 0, format_args!("no round trip completed"));

    // A stream larger than the device's buffer, through a small buffer of ours.
    let bulk = cmd.num("vsock_bulk", 1 << 20);
    let deadline = clock.deadline(10_000);
    let t0 = rdtsc();
    let sent_before = s.tx_off;
    let mut r = Ok(());
    while s.tx_off - sent_before < bulk && r.is_ok() {
        let chunk = (bulk - (s.tx_off - sent_before)).min(MAX_TX_PAYLOAD as u64) as usize;
        r = s
            .send(v, chunk, deadline, &mut credit_waits)
            .and_then(|_| s.pump(v, deadline));
    }
    let r = r.and_then(|_| s.drain(v, deadline));
    let cycles = rdtsc() - t0;
    println!(
        "TESTGUEST vsock bulk bytes={bulk} mib_per_sec={} bad_packets={} credit_waits={credit_waits} credit_updates={} credit_violations={}",
        clock.per_sec(bulk, cycles) >> 20,
        s.bad,
        s.c.credit_updates_received,
        s.c.credit_violations
    );
    if let Err(e) = r {
        return test.fail(format_args!("bulk: {e}"));
    }
    test.check(
        s.bad == 0,
        format_args!("{} echoed packets differ from what we sent", s.bad),
    );
    test.check(
        s.c.credit_violations == 0,
        format_args!(
            "the device sent beyond our credit {} times",
            s.c.credit_violations
        ),
    );

    // Orderly close: SHUTDOWN both ways; the device answers RST (possibly after its own
    // SHUTDOWN, which we answer with RST).
    let deadline = clock.deadline(5000);
    let h = s.c.header(v.cid, OP_SHUTDOWN);
    let h = Header {
        flags: SHUTDOWN_BOTH,
        ..h
    };
    let mut closed = v.send(&h, 0, deadline, |_| {}).is_ok();
    while closed && !s.reset && !deadline.passed() {
        match s.pump(v, deadline) {
            Err(_) => break,
            Ok(()) if s.peer_shutdown => {
                let h = s.c.header(v.cid, OP_RST);
                closed = v.send(&h, 0, deadline, |_| {}).is_ok();
                s.reset = true;
            }
            Ok(()) => {}
        }
    }
    println!("TESTGUEST vsock close rst={}", u8::from(s.reset));
    test.check(
        s.reset,
        format_args!("the device did not close the connection after SHUTDOWN"),
    );
}
