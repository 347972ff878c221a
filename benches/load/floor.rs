//! This machine's floor: the least a loop can take to write one SSE frame to each of many
//! connected loopback sockets from one thread, with the same socket options as the server's
//! streams (non-blocking, TCP_NODELAY, 8 KiB send buffer) and nothing else in the way.
//!
//! Two variants: with nobody waiting on the receiving ends (the bare cost of a write), and with
//! the receiving ends registered in an epoll instance that another thread waits on and drains,
//! as subscribers' sockets are (each write then also wakes a reader).

use crate::stats;
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Timed passes over all sockets, per variant.
const PASSES: usize = 15;
/// Drain reads per socket between passes.
const MAX_DRAIN_READS: usize = 8;
/// Longest wait for the reader thread to take one pass's bytes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the floor measure found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Floor {
    /// Socket pairs written to.
    pub pairs: usize,
    /// Bytes per write.
    pub frame_len: usize,
    /// Median over passes of (pass time / pairs), ns per write, nobody waiting to read.
    pub per_write_ns: f64,
    /// Fastest pass of that variant, per write.
    pub best_per_write_ns: f64,
    /// The same with a reader thread waiting in epoll on the receiving ends.
    pub epoll_per_write_ns: f64,
    /// Fastest pass of that variant, per write.
    pub epoll_best_per_write_ns: f64,
}

/// Connects `pairs` loopback socket pairs and times writing `frame` once to each.
pub fn measure(pairs: usize, frame: &[u8]) -> Result<Floor, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("floor: bind: {e}"))?;
    let addr = l.local_addr().map_err(|e| format!("floor: {e}"))?;
    let mut writers = Vec::with_capacity(pairs);
    let mut readers = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let r = TcpStream::connect(addr).map_err(|e| format!("floor: connect: {e}"))?;
        let (w, _) = l.accept().map_err(|e| format!("floor: accept: {e}"))?;
        w.set_nonblocking(true).map_err(|e| format!("floor: {e}"))?;
        w.set_nodelay(true).map_err(|e| format!("floor: {e}"))?;
        set_sndbuf(&w, 8 * 1024);
        r.set_nonblocking(true).map_err(|e| format!("floor: {e}"))?;
        writers.push(w);
        readers.push(r);
    }
    let fds: Vec<i32> = writers.iter().map(|w| w.as_raw_fd()).collect();

    let mut plain = Vec::with_capacity(PASSES);
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..PASSES {
        plain.push(pass(&fds, frame)? / pairs.max(1) as f64);
        for r in &mut readers {
            for _ in 0..MAX_DRAIN_READS {
                match r.read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
    }

    let got = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (got, stop) = (got.clone(), stop.clone());
        let readers: Vec<MioStream> = readers.into_iter().map(MioStream::from_std).collect();
        std::thread::spawn(move || read_all(readers, &got, &stop))
    };
    let mut waited = Vec::with_capacity(PASSES);
    let per_pass = (pairs * frame.len()) as u64;
    let mut result = Ok(());
    for i in 1..=PASSES as u64 {
        waited.push(pass(&fds, frame)? / pairs.max(1) as f64);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while got.load(Ordering::Relaxed) < i * per_pass {
            if Instant::now() > deadline {
                result = Err("floor: the reader thread did not take the frames".to_owned());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if result.is_err() {
            break;
        }
        // Let the reader settle back into epoll_wait before the next pass.
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    result?;

    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Floor {
        pairs,
        frame_len: frame.len(),
        best_per_write_ns: best(&plain),
        per_write_ns: stats::median_f64(&mut plain),
        epoll_best_per_write_ns: best(&waited),
        epoll_per_write_ns: stats::median_f64(&mut waited),
    })
}

/// One timed pass: `frame` written once to every descriptor; returns nanoseconds.
fn pass(fds: &[i32], frame: &[u8]) -> Result<f64, String> {
    let t = Instant::now();
    let mut short = 0usize;
    for &fd in fds {
        // SAFETY: fd is an open socket owned by the caller; frame is a valid buffer.
        let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
        if n != frame.len() as isize {
            short += 1;
        }
    }
    let ns = t.elapsed().as_nanos() as f64;
    if short > 0 {
        return Err(format!("floor: {short} short writes in one pass"));
    }
    Ok(ns)
}

/// Waits in epoll on every reader and drains what arrives, until told to stop (or 10 min).
fn read_all(mut readers: Vec<MioStream>, got: &AtomicU64, stop: &AtomicBool) {
    let Ok(poll) = Poll::new() else { return };
    for (i, r) in readers.iter_mut().enumerate() {
        if poll
            .registry()
            .register(r, Token(i), Interest::READABLE)
            .is_err()
        {
            return;
        }
    }
    let mut poll = poll;
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_err()
        {
            continue;
        }
        for ev in events.iter() {
            let Some(r) = readers.get_mut(ev.token().0) else {
                continue;
            };
            for _ in 0..MAX_DRAIN_READS {
                match r.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        got.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
        }
    }
}

fn set_sndbuf(s: &TcpStream, bytes: libc::c_int) {
    // SAFETY: setsockopt with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
