//! One client connection: its state, its buffers, and all socket I/O.
//!
//! A connection is in one of three states (see `docs/ARCHITECTURE.md`):
//! [`State::Http`] while requests are read and answered, [`State::Stream`] once it subscribed,
//! and [`State::Closing`] while a final response drains and the peer's leftover input is read so
//! that closing never resets unread bytes. Methods here report what happened as an [`Io`]
//! outcome; only the server tears a connection down. A [`Stream`] also makes its own
//! decisions (what follows a write, when its next deadline is, whether its reader stalled) and
//! hands the server a [`Next`] or [`Due`] to act on.

use crate::http::{Budget, Head, Reader};
use crate::sse::{self, Event};
use crate::sys;
use crate::timestamp::Micros;
use mio::net::TcpStream;
use std::io::{self, IoSlice, Read, Write};

/// What a socket operation came to.
#[derive(Debug)]
pub enum Io {
    /// Everything asked for was done; more may be possible.
    Done,
    /// The kernel would block: wait for the next readiness event.
    WouldBlock,
    /// The peer closed (EOF on read, or reset/broken pipe).
    Closed,
    /// Any other error; logged by the caller.
    Error(io::Error),
}

fn sort_error(e: io::Error) -> Io {
    match e.kind() {
        io::ErrorKind::WouldBlock => Io::WouldBlock,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::UnexpectedEof => Io::Closed,
        _ => Io::Error(e),
    }
}

/// Writes as much of `buf` as the socket takes. Returns the bytes written and the outcome:
/// `Done` when all of `buf` went out.
pub fn write_all_nb(sock: &mut TcpStream, buf: &[u8]) -> (usize, Io) {
    let mut n = 0;
    while n < buf.len() {
        match sock.write(&buf[n..]) {
            Ok(0) => return (n, Io::Closed),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, sort_error(e)),
        }
    }
    (n, Io::Done)
}

/// Reads once into `scratch`. `Done` with the byte count, or why nothing was read.
pub fn read_nb(sock: &mut TcpStream, scratch: &mut [u8]) -> (usize, Io) {
    loop {
        match sock.read(scratch) {
            Ok(0) => return (0, Io::Closed),
            Ok(n) => return (n, Io::Done),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (0, sort_error(e)),
        }
    }
}

/// A client connection.
pub struct Conn {
    /// The socket.
    pub sock: TcpStream,
    /// Distinguishes this connection from earlier ones in the same slab slot.
    pub serial: u64,
    /// Deadline of this connection's entry in the timer heap (ms), `u64::MAX` if none.
    pub timer_at: u64,
    /// The socket may have more input than was read (edge-triggered readiness).
    pub readable: bool,
    /// Where the connection is in its life.
    pub state: State,
}

/// The states of a connection.
pub enum State {
    /// Reading requests and writing responses (boxed: subscribers are the common case and
    /// should stay small).
    Http(Box<Http>),
    /// Subscribed to an environment.
    Stream(Stream),
    /// Finishing: flush the final response, shut down writing, read until EOF or the deadline.
    Closing(Closing),
}

/// A connection that is reading requests.
pub struct Http {
    /// Received bytes and the request being read.
    pub reader: Reader,
    /// Response bytes not yet written.
    pub out: Vec<u8>,
    /// How much of `out` is written.
    pub out_pos: usize,
    /// Close once `out` is written.
    pub close_after: bool,
    /// A queue-change of this connection is at the store; nothing else happens until it returns.
    pub awaiting_store: bool,
    /// When the current request must be complete (ms on the server clock).
    pub deadline: u64,
    /// Requests answered on this connection.
    pub served: u32,
    /// `100 Continue` was sent for the current request.
    pub continued: bool,
    /// When the current request's first bytes were read (ms), for the access log.
    pub started: Option<u64>,
    /// The path of a queue-change at the store, for the access log (only when it is on).
    pub log_path: Option<Box<str>>,
    /// A subscription parsed while responses to earlier requests still wait to be written: it
    /// turns the connection into a stream, so it is taken up only once they are out. (It has
    /// no body: only a queue-change has one.)
    pub held: Option<Box<Head>>,
}

impl Http {
    /// A connection waiting for its first request until `deadline`, buffering within `budget`.
    pub fn new(deadline: u64, budget: &Budget) -> Http {
        Http {
            reader: Reader::new(budget),
            out: Vec::new(),
            out_pos: 0,
            close_after: false,
            awaiting_store: false,
            deadline,
            served: 0,
            continued: false,
            started: None,
            log_path: None,
            held: None,
        }
    }

    /// Queues response bytes.
    pub fn respond(&mut self, bytes: &[u8]) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
    }

    /// Writes queued response bytes; `Done` when nothing is left.
    pub fn flush(&mut self, sock: &mut TcpStream) -> Io {
        if self.out_pos == self.out.len() {
            return Io::Done;
        }
        let (n, io) = write_all_nb(sock, &self.out[self.out_pos..]);
        self.out_pos += n;
        if self.out_pos == self.out.len() {
            // Release the buffer: an idle connection holds no memory.
            self.out = Vec::new();
            self.out_pos = 0;
        }
        io
    }

    /// Whether response bytes are waiting.
    pub fn has_output(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Response bytes waiting.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.out_pos
    }
}

/// What a stream connection has queued.
#[derive(Clone, Debug)]
pub enum Piece {
    /// The response head.
    Head,
    /// A keep-alive comment.
    Ping,
    /// An update event, shared with the other subscribers.
    Event(Event),
    /// The end of the stream.
    End,
}

impl Piece {
    fn bytes(&self, chunked: bool) -> &[u8] {
        match (self, chunked) {
            (Piece::Head, true) => sse::HEAD_CHUNKED,
            (Piece::Head, false) => sse::HEAD_PLAIN,
            (Piece::Ping, true) => sse::PING_CHUNKED,
            (Piece::Ping, false) => sse::PING_PLAIN,
            (Piece::Event(e), c) => e.bytes(c),
            (Piece::End, true) => sse::LAST_CHUNK,
            (Piece::End, false) => b"",
        }
    }
}

/// Keep-alive deadlines are rounded down to multiples of this (ms); see [`ping_due`].
const PING_TICK_MS: u64 = 100;

/// When a stream that last wrote at `last_write` is due a keep-alive comment (ms).
///
/// Each connection pings up to a tenth of the interval early, by an offset fixed per connection
/// (derived from its `serial`), so that subscribers who got the same event do not all ping at
/// the same instant. Deadlines are rounded down to ticks of [`PING_TICK_MS`] (at most a tenth
/// of the interval), so that the loop wakes a few times a second to send the pings due, rather
/// than once for each: the pings stay spread over the interval, in small groups.
fn ping_due(last_write: u64, serial: u64, keepalive: u64) -> u64 {
    let h = serial.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let due = last_write + keepalive - h % (keepalive / 10 + 1);
    let tick = PING_TICK_MS.min(keepalive / 10).max(1);
    (due - due % tick).max(last_write + 1)
}

/// What the server does with a stream after writing to it: the stream decides, the server acts.
#[derive(Debug)]
pub enum Next {
    /// Nothing to do before this time (ms): the next keep-alive, age limit or stall check.
    WakeAt(u64),
    /// The end of the stream is written: hang up gracefully.
    Finished,
    /// The peer is gone (EOF, reset, broken pipe).
    Gone,
    /// The socket failed otherwise (`ETIMEDOUT`: the kernel gave up on an unacknowledging
    /// reader).
    Failed(io::Error),
}

/// What a stream's deadline came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Bytes have been pending for a keep-alive interval and the reader acknowledged none of
    /// them: drop it. Carries the bytes still pending (user space and kernel).
    Stalled(u64),
    /// Write what is queued; `pinged` says whether a keep-alive comment was just queued.
    Write {
        /// A keep-alive comment was queued.
        pinged: bool,
    },
}

/// A subscriber's connection: what it has been sent, what is queued for it, and the decisions
/// that follow from both (keep-alive, age limit, stalls).
pub struct Stream {
    /// The environment (index into the server's environment slab).
    env: u32,
    /// This connection's position in the environment's subscriber list.
    pos: u32,
    /// Chunked (HTTP/1.1) or close-delimited (HTTP/1.0).
    chunked: bool,
    /// The end of the stream is queued.
    ending: bool,
    /// The end of the stream has been written.
    finished: bool,
    /// Newest time queued or sent to this client; older or equal times are never sent.
    last_sent: Micros,
    /// The piece being written and how much of it is out.
    out: Option<(Piece, u32)>,
    /// The piece after it (a newer event replaces an older one here).
    next: Option<Piece>,
    /// When bytes last went to the kernel (ms), for keep-alives.
    last_write: u64,
    /// When the stream is ended for rebalancing (ms), `u64::MAX`: never.
    end_at: u64,
    /// Bytes handed to the kernel in all.
    written: u64,
    /// Since when (ms) and at what acknowledged byte count output has been pending.
    stall_mark: Option<(u64, u64)>,
    /// When the stream opened (ms), for the access log.
    opened: u64,
    /// Bytes received after the request (a stream client sends nothing more).
    stray_input: u32,
}

impl Stream {
    /// A new stream of environment `env`, at position `pos` of its subscriber list, with its
    /// response head queued, opened at `now` and ended for rebalancing at `end_at`.
    pub fn new(env: u32, pos: u32, chunked: bool, now: u64, end_at: u64) -> Stream {
        Stream {
            env,
            pos,
            chunked,
            ending: false,
            finished: false,
            last_sent: Micros::MIN,
            out: Some((Piece::Head, 0)),
            next: None,
            last_write: now,
            end_at,
            written: 0,
            stall_mark: None,
            opened: now,
            stray_input: 0,
        }
    }

    /// When the stream opened (ms).
    pub fn opened(&self) -> u64 {
        self.opened
    }

    /// Counts `n` bytes the client sent after its request; returns how many it sent in all.
    pub fn stray_input(&mut self, n: usize) -> u32 {
        self.stray_input = self
            .stray_input
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.stray_input
    }

    /// The environment this stream is subscribed to.
    pub fn env(&self) -> u32 {
        self.env
    }

    /// Its position in the environment's subscriber list.
    pub fn pos(&self) -> usize {
        self.pos as usize
    }

    /// Records a new position in the subscriber list (after a removal moved it).
    pub fn set_pos(&mut self, pos: usize) {
        self.pos = pos as u32;
    }

    /// Whether this stream still takes `time`: it is newer than anything it was sent and the
    /// stream is not ending.
    fn wants(&self, time: Micros) -> bool {
        time > self.last_sent && !self.ending
    }

    /// Queues `event` if the stream still takes its time (see `wants`); true if it was queued.
    pub fn offer(&mut self, event: &Event) -> bool {
        if !self.wants(event.time) {
            return false;
        }
        self.last_sent = event.time;
        self.enqueue(Piece::Event(event.clone()));
        true
    }

    /// Ends the stream at `at` (ms) at the latest (shutdown spreads the ends out).
    pub fn end_by(&mut self, at: u64) {
        self.end_at = self.end_at.min(at);
    }

    /// Queues `piece`. An unsent event or ping is replaced, never queued behind.
    fn enqueue(&mut self, piece: Piece) {
        match &self.out {
            None => self.out = Some((piece, 0)),
            Some((Piece::Event(_) | Piece::Ping, 0)) if !matches!(piece, Piece::End) => {
                self.out = Some((piece, 0));
            }
            Some(_) => self.next = Some(piece),
        }
    }

    /// Bytes queued in user space.
    fn pending_bytes(&self) -> usize {
        let cur = self
            .out
            .as_ref()
            .map_or(0, |(p, pos)| p.bytes(self.chunked).len() - *pos as usize);
        cur + self
            .next
            .as_ref()
            .map_or(0, |p| p.bytes(self.chunked).len())
    }

    /// Writes what is queued and says what follows: a time to wake up at, or the end of the
    /// connection. A write that would block starts a stall mark (unless one is running), with
    /// the byte count the peer had acknowledged then; the stall check is due a keep-alive
    /// interval after the stall began, and later attempts do not push it back.
    pub fn write(&mut self, sock: &mut TcpStream, now: u64, serial: u64, keepalive: u64) -> Next {
        match self.flush(sock, now) {
            Io::Done if self.finished => Next::Finished,
            Io::Done => Next::WakeAt(self.deadline(serial, keepalive)),
            Io::WouldBlock => {
                if self.stall_mark.is_none() {
                    let queued = sys::unacked_bytes(sock).unwrap_or(0) as u64;
                    self.stall_mark = Some((now, self.written.saturating_sub(queued)));
                }
                Next::WakeAt(self.deadline(serial, keepalive))
            }
            Io::Closed => Next::Gone,
            Io::Error(e) => Next::Failed(e),
        }
    }

    /// The stream's next deadline (ms): its keep-alive (only when nothing is queued: queued
    /// output waits for the socket), its age limit (until its end is queued), its stall check.
    fn deadline(&self, serial: u64, keepalive: u64) -> u64 {
        let mut at = if self.out.is_none() {
            ping_due(self.last_write, serial, keepalive)
        } else {
            u64::MAX
        };
        if !self.ending {
            at = at.min(self.end_at);
        }
        if let Some((t0, _)) = self.stall_mark {
            at = at.min(t0 + keepalive);
        }
        at
    }

    /// Works through what is due at `now`: the age limit queues the end of the stream, the
    /// stall check either clears the mark (nothing pending), moves it (the peer acknowledged
    /// something) or finds the reader stalled, and a keep-alive comment is queued when the
    /// stream has been quiet for the interval. Bytes in the kernel's send queue count as
    /// pending (`SIOCOUTQ`).
    pub fn due(&mut self, sock: &TcpStream, now: u64, serial: u64, keepalive: u64) -> Due {
        if !self.ending && now >= self.end_at {
            self.ending = true;
            self.enqueue(Piece::End);
        }
        if let Some((t0, a0)) = self.stall_mark
            && now >= t0 + keepalive
        {
            let queued = sys::unacked_bytes(sock).unwrap_or(0) as u64;
            let pending = queued + self.pending_bytes() as u64;
            let acked = self.written.saturating_sub(queued);
            if pending == 0 {
                self.stall_mark = None;
            } else if acked != a0 {
                self.stall_mark = Some((now, acked));
            } else {
                return Due::Stalled(pending);
            }
        }
        let quiet = self.out.is_none() && !self.ending;
        let pinged = quiet && now >= ping_due(self.last_write, serial, keepalive);
        if pinged {
            self.enqueue(Piece::Ping);
        }
        Due::Write { pinged }
    }

    /// Writes queued pieces, both in one system call when two are queued (the response head
    /// and the first event of a new stream). `Done`: all written. `now` stamps `last_write`.
    fn flush(&mut self, sock: &mut TcpStream, now: u64) -> Io {
        loop {
            let Some((piece, pos)) = &self.out else {
                return Io::Done;
            };
            let first = &piece.bytes(self.chunked)[*pos as usize..];
            let second = self
                .next
                .as_ref()
                .map_or(&[][..], |p| p.bytes(self.chunked));
            let result = match (first.is_empty(), second.is_empty()) {
                // A plain stream's end is zero bytes: nothing to write.
                (true, true) => Ok(0),
                (_, true) => sock.write(first),
                _ => sock.write_vectored(&[IoSlice::new(first), IoSlice::new(second)]),
            };
            let total = first.len() + second.len();
            match result {
                Ok(0) if total > 0 => return Io::Closed,
                Ok(n) => {
                    if n > 0 {
                        self.written += n as u64;
                        self.last_write = now;
                    }
                    self.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return sort_error(e),
            }
        }
    }

    /// Marks `n` written bytes as sent, moving through the queued pieces.
    fn advance(&mut self, mut n: usize) {
        while let Some((piece, pos)) = &mut self.out {
            let left = piece.bytes(self.chunked).len() - *pos as usize;
            if n < left {
                *pos += n as u32;
                return;
            }
            n -= left;
            if matches!(piece, Piece::End) {
                self.out = None;
                self.next = None;
                self.finished = true;
                return;
            }
            self.out = self.next.take().map(|p| (p, 0));
            if n == 0
                && self
                    .out
                    .as_ref()
                    .is_some_and(|(p, _)| !p.bytes(self.chunked).is_empty())
            {
                return;
            }
        }
    }
}

/// A connection on its way out.
pub struct Closing {
    /// Final response bytes still to write (an error response), then writing is shut down.
    pub out: Vec<u8>,
    /// How much of `out` is written.
    pub out_pos: usize,
    /// Writing is shut down; now only reading until EOF.
    pub shut: bool,
    /// When to give up and close (ms).
    pub deadline: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunked: bool) -> Stream {
        Stream::new(0, 0, chunked, 0, u64::MAX)
    }

    #[test]
    fn a_newer_event_replaces_an_unsent_one_but_not_a_started_one() {
        let mut s = stream(true);
        s.enqueue(Piece::Event(Event::new(1)));
        s.enqueue(Piece::Event(Event::new(2)));
        assert!(matches!(&s.next, Some(Piece::Event(e)) if e.time == 2));
        s.advance(sse::HEAD_CHUNKED.len());
        assert!(matches!(&s.out, Some((Piece::Event(e), 0)) if e.time == 2));
        s.enqueue(Piece::Event(Event::new(3)));
        assert!(matches!(&s.out, Some((Piece::Event(e), 0)) if e.time == 3) && s.next.is_none());
        s.advance(5);
        s.enqueue(Piece::Event(Event::new(4)));
        assert!(matches!(&s.out, Some((Piece::Event(e), 5)) if e.time == 3));
        assert!(matches!(&s.next, Some(Piece::Event(e)) if e.time == 4));
        let left = s.pending_bytes();
        s.advance(left);
        assert!(s.out.is_none() && s.next.is_none() && s.pending_bytes() == 0);
    }

    #[test]
    fn the_end_is_written_last_and_finishes_the_stream() {
        for chunked in [true, false] {
            let mut s = stream(chunked);
            s.enqueue(Piece::End);
            let all = s.pending_bytes();
            s.advance(all);
            assert!(s.finished, "chunked: {chunked}");
        }
    }

    /// A connected pair over loopback: our side (non-blocking, small send buffer) and the
    /// peer's.
    fn pair() -> (TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        sys::set_send_buffer(&ours, 4096).unwrap();
        (TcpStream::from_std(ours), peer)
    }

    const KEEPALIVE: u64 = 1_000;

    #[test]
    fn a_stream_refuses_times_it_has_and_everything_once_ending() {
        let (mut sock, _peer) = pair();
        let mut s = Stream::new(0, 0, true, 0, 50);
        assert!(s.offer(&Event::new(10)));
        assert!(!s.offer(&Event::new(10)), "the same time twice");
        assert!(!s.offer(&Event::new(9)), "an older time");
        assert!(matches!(
            s.write(&mut sock, 1, 7, KEEPALIVE),
            Next::WakeAt(50)
        ));
        assert_eq!(s.due(&sock, 50, 7, KEEPALIVE), Due::Write { pinged: false });
        assert!(
            !s.offer(&Event::new(11)),
            "a newer time after the end is queued"
        );
        assert!(matches!(
            s.write(&mut sock, 50, 7, KEEPALIVE),
            Next::Finished
        ));
    }

    #[test]
    fn a_quiet_stream_is_due_a_ping_and_then_waits_for_the_next() {
        let (mut sock, _peer) = pair();
        let mut s = Stream::new(0, 0, true, 0, u64::MAX);
        let Next::WakeAt(at) = s.write(&mut sock, 0, 7, KEEPALIVE) else {
            panic!("the head was not written");
        };
        assert_eq!(at, ping_due(0, 7, KEEPALIVE));
        assert!(at > 0 && at <= KEEPALIVE);
        assert_eq!(
            s.due(&sock, at - 1, 7, KEEPALIVE),
            Due::Write { pinged: false }
        );
        assert_eq!(s.due(&sock, at, 7, KEEPALIVE), Due::Write { pinged: true });
        assert!(
            matches!(s.write(&mut sock, at, 7, KEEPALIVE), Next::WakeAt(n) if n == ping_due(at, 7, KEEPALIVE))
        );
    }

    /// Offers and writes events at time 100 until the socket blocks (the peer reads nothing)
    /// and one event waits in user space; returns the last event's time and the wake-up time.
    fn fill(s: &mut Stream, sock: &mut TcpStream) -> (Micros, u64) {
        let mut t = 0;
        loop {
            t += 1;
            assert!(t < 1_000_000, "the socket never blocked");
            assert!(s.offer(&Event::new(t)));
            match s.write(sock, 100, 7, KEEPALIVE) {
                Next::WakeAt(at) if s.pending_bytes() > 0 => return (t, at),
                Next::WakeAt(_) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_reader_that_takes_nothing_is_found_stalled_one_interval_after_the_first_block() {
        let (mut sock, _peer) = pair();
        let mut s = Stream::new(0, 0, true, 0, u64::MAX);
        let (t, blocked_at) = fill(&mut s, &mut sock);
        assert_eq!(
            blocked_at,
            100 + KEEPALIVE,
            "the stall check is due an interval later"
        );
        // A later attempt does not push the check back.
        assert!(s.offer(&Event::new(t + 1)));
        assert!(
            matches!(s.write(&mut sock, 600, 7, KEEPALIVE), Next::WakeAt(at) if at == 100 + KEEPALIVE)
        );
        assert_eq!(
            s.due(&sock, 100 + KEEPALIVE - 1, 7, KEEPALIVE),
            Due::Write { pinged: false }
        );
        assert!(matches!(s.due(&sock, 100 + KEEPALIVE, 7, KEEPALIVE), Due::Stalled(n) if n > 0));

        // Had the peer read meanwhile, the mark moves on instead.
        let mut s2 = Stream::new(0, 0, true, 0, u64::MAX);
        let (mut sock2, mut peer2) = pair();
        fill(&mut s2, &mut sock2);
        let mut buf = vec![0u8; 1 << 16];
        peer2
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let n = std::io::Read::read(&mut peer2, &mut buf).unwrap();
        assert!(n > 0);
        // The acknowledgement of what was read comes back over loopback; wait for it, bounded.
        let acked = (0..500).any(|_| {
            let moved = matches!(
                s2.due(&sock2, 100 + KEEPALIVE, 7, KEEPALIVE),
                Due::Write { .. }
            );
            if !moved {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            moved
        });
        assert!(acked, "a reader that took bytes was found stalled");
    }
}
