//! The few operating-system calls std and mio do not offer: the open-file limit, socket buffer
//! sizes and queue depth, SO_REUSEPORT, and signals: delivery of SIGTERM and SIGINT into the
//! event loop (and only there: every other thread blocks them), and SIGPIPE ignored.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) }).is_ok() {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(lim.rlim_cur)
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives across the call.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sets SO_SNDBUF (the kernel doubles it for its own bookkeeping).
pub fn set_send_buffer(sock: &impl AsRawFd, bytes: usize) -> io::Result<()> {
    setsockopt_int(
        sock.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        bytes as libc::c_int,
    )
}

/// Sets TCP_USER_TIMEOUT: the kernel aborts the connection (the socket reports ETIMEDOUT) when
/// sent data stays unacknowledged, or the peer's window stays closed, for longer than this.
pub fn set_user_timeout(sock: &impl AsRawFd, millis: u64) -> io::Result<()> {
    let millis = millis.min(libc::c_int::MAX as u64) as libc::c_int;
    setsockopt_int(
        sock.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        millis,
    )
}

/// Bytes written to a TCP socket that the peer has not acknowledged yet (SIOCOUTQ).
pub fn unacked_bytes(sock: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) })?;
    Ok(n.max(0) as usize)
}

/// A listening socket, non-blocking, with SO_REUSEADDR and optionally SO_REUSEPORT. An error
/// names the address: `cannot listen on 0.0.0.0:8000: Address already in use`.
pub fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    listen_on(addr, reuse_port).map_err(|e| {
        let text = e.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        io::Error::new(e.kind(), format!("cannot listen on {addr}: {text}"))
    })
}

fn listen_on(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket creation; the descriptor is owned right away.
    let fd = check(unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuse_port {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: storage holds a sockaddr of length len.
    check(unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    // SAFETY: fd is a bound socket.
    check(unsafe { libc::listen(fd, 4096) })?;
    Ok(std::net::TcpListener::from(owned))
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// The signals that end the server.
const TERMINATION: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in TERMINATION {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

fn set_termination_mask(how: libc::c_int) {
    let set = termination_set();
    // SAFETY: set is initialised; the old mask is not asked for.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
}

/// Blocks SIGTERM and SIGINT in the calling thread (and so in the threads it spawns later), so
/// that they reach the event loop's thread only, rather than interrupting a blocking call on a
/// helper thread. Called first thing in `main` and by every thread the server starts.
pub fn block_termination_signals() {
    set_termination_mask(libc::SIG_BLOCK);
}

/// Unblocks SIGTERM and SIGINT in the calling thread: the event loop's, once its helpers run.
pub fn unblock_termination_signals() {
    set_termination_mask(libc::SIG_UNBLOCK);
}

/// Ignores SIGPIPE, so that writing to a closed pipe or socket is an EPIPE error to handle, not
/// the end of the process. (Rust's runtime does this too; a library user's may not.)
pub fn ignore_sigpipe() {
    // SAFETY: SIG_IGN is a valid disposition for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe. The eventfd is closed only after the handler
        // is uninstalled (see `Drop`), and the handler runs on the loop's thread only, the one
        // that closes it.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// An eventfd that becomes readable when SIGTERM or SIGINT arrives.
pub struct SignalFd(OwnedFd);

impl SignalFd {
    /// Installs the handlers for SIGTERM and SIGINT.
    pub fn install() -> io::Result<SignalFd> {
        // SAFETY: creating an eventfd has no preconditions.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: fd is fresh and owned here.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        SIGNAL_FD.store(fd, Ordering::SeqCst);
        for sig in TERMINATION {
            // SAFETY: the handler only touches atomics and calls write(2).
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: action is fully initialised.
            check(unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) })?;
        }
        Ok(SignalFd(owned))
    }

    /// Clears the readiness and returns how many signals arrived in all.
    pub fn take(&self) -> usize {
        let mut buf = 0u64;
        // SAFETY: reading 8 bytes into a u64 from a non-blocking eventfd.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
        SIGNALS.load(Ordering::SeqCst)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // The handler goes first, then the descriptor it writes to (closed when the field
        // drops): a signal in between must not write to a closed, or reused, descriptor.
        for sig in TERMINATION {
            // SAFETY: SIG_DFL is a valid disposition for these signals.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        SIGNAL_FD.store(-1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether SIGTERM or SIGINT is blocked in the calling thread.
    fn termination_signals_blocked() -> bool {
        // SAFETY: sigemptyset initialises the set that pthread_sigmask fills in.
        unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut old);
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
            TERMINATION
                .iter()
                .any(|&sig| libc::sigismember(&old, sig) == 1)
        }
    }

    fn disposition(sig: libc::c_int) -> usize {
        // SAFETY: a null new action only reads the current one into `old`.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig, std::ptr::null(), &mut old);
            old.sa_sigaction
        }
    }

    #[test]
    fn the_handler_is_gone_before_its_descriptor() {
        let fd = SignalFd::install().unwrap();
        assert_eq!(disposition(libc::SIGTERM), on_signal as *const () as usize);
        assert_eq!(SIGNAL_FD.load(Ordering::SeqCst), fd.as_raw_fd());
        drop(fd);
        for sig in TERMINATION {
            assert_eq!(disposition(sig), libc::SIG_DFL);
        }
        assert_eq!(SIGNAL_FD.load(Ordering::SeqCst), -1);
    }

    #[test]
    fn threads_block_termination_signals() {
        let t = std::thread::spawn(|| {
            block_termination_signals();
            let blocked = termination_signals_blocked();
            unblock_termination_signals();
            (blocked, termination_signals_blocked())
        });
        assert_eq!(t.join().unwrap(), (true, false));
    }
}
