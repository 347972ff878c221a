//! Logging that never makes the caller wait: a `log::Log` that hands each record to a writer
//! thread over a bounded queue.
//!
//! The calling thread (the event loop, most of the time) formats the record's message, because
//! its arguments borrow the caller's data, and `try_send`s it; when the queue is full the line
//! is dropped and counted, never waited for. The writer thread renders lines as text or JSON
//! (`LOG_FORMAT`) and writes them to stderr in batches. When stderr stops being read (a full
//! pipe) the writer blocks there, alone, while the queue fills and new lines are dropped; when it
//! is gone (EPIPE; SIGPIPE is ignored) the failed lines are dropped too. Either way the count goes
//! to `flagsmith_sse_log_lines_dropped_total` and, once lines get through again, into one line
//! per interval. Warnings and errors that repeat at the same place in the code are aggregated
//! the same way: the first is written at once, the rest of the interval's as one line with a
//! count.

use crate::{json, timestamp};
use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Lines that may wait for the writer; beyond them new lines are dropped.
const QUEUE_LINES: usize = 4096;
/// Longest message kept; longer ones are cut (at a character boundary) and marked.
const MAX_MESSAGE: usize = 8 * 1024;
/// Most bytes the writer hands to one write(2).
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// Interval over which repeated warnings and dropped lines are summed into one line.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Lines lost: the queue was full, or writing them failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued, and lines the writer is done with (written or dropped): for [`flush`].
static QUEUED: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

/// Log lines lost since start, for `flagsmith_sse_log_lines_dropped_total`.
pub fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// How lines look (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `2025-01-12T18:06:42.028Z INFO  [module] message key=value`
    Text,
    /// One JSON object per line: `time`, `level`, `module`, `message`, then the record's fields.
    Json,
}

impl Format {
    /// The name `LOG_FORMAT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
        }
    }
}

/// A field value, kept as the kind JSON can tell apart.
#[derive(Debug, Clone, PartialEq)]
enum Field {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
}

/// A record on its way to the writer.
#[derive(Debug, Clone)]
struct Entry {
    /// Microseconds since the Unix epoch.
    time_us: i64,
    level: Level,
    target: String,
    message: String,
    fields: Vec<(String, Field)>,
    /// Where in the code it was logged, for aggregating repeats (warnings and errors only).
    site: Option<(String, u32)>,
}

struct FieldCollector<'a>(&'a mut Vec<(String, Field)>);

impl<'kvs> VisitSource<'kvs> for FieldCollector<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let field = if let Some(v) = value.to_u64() {
            Field::U64(v)
        } else if let Some(v) = value.to_i64() {
            Field::I64(v)
        } else if let Some(v) = value.to_f64() {
            Field::F64(v)
        } else if let Some(v) = value.to_bool() {
            Field::Bool(v)
        } else {
            Field::Str(value.to_string())
        };
        self.0.push((key.as_str().to_owned(), field));
        Ok(())
    }
}

/// The `log::Log` implementation: filters, formats the message, queues it.
struct Logger {
    level: LevelFilter,
    tx: SyncSender<Entry>,
}

impl Logger {
    fn allows(&self, level: Level, target: &str) -> bool {
        // The redis crate is chatty below warn; its connection problems are ours to report.
        let max = if target.starts_with("redis") {
            self.level.min(LevelFilter::Warn)
        } else {
            self.level
        };
        level <= max
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.allows(metadata.level(), metadata.target())
    }

    fn log(&self, record: &Record<'_>) {
        if !self.allows(record.level(), record.target()) {
            return;
        }
        let mut message = String::new();
        let _ = write!(message, "{}", record.args());
        truncate(&mut message, MAX_MESSAGE);
        let mut fields = Vec::new();
        let _ = record.key_values().visit(&mut FieldCollector(&mut fields));
        let site = match (record.level(), record.file(), record.line()) {
            (Level::Error | Level::Warn, Some(file), Some(line)) => Some((file.to_owned(), line)),
            _ => None,
        };
        let entry = Entry {
            time_us: timestamp::now_micros(),
            level: record.level(),
            target: record.target().to_owned(),
            message,
            fields,
            site,
        };
        match self.tx.try_send(entry) {
            Ok(()) => {
                QUEUED.fetch_add(1, Ordering::Release);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger and starts its writer thread. Call once, before other threads start.
pub fn init(level: LevelFilter, format: Format) -> io::Result<()> {
    let (tx, rx) = mpsc::sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            crate::sys::block_termination_signals();
            Writer::new(format, io::stderr()).run(rx);
        })?;
    let logger: &'static Logger = Box::leak(Box::new(Logger { level, tx }));
    log::set_logger(logger).map_err(|e| io::Error::other(e.to_string()))?;
    log::set_max_level(level);
    Ok(())
}

/// Waits up to `timeout` for the writer to finish the lines queued so far. Returns whether it
/// did; it does not when stderr is not being read.
pub fn flush(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let target = QUEUED.load(Ordering::Acquire);
    loop {
        if HANDLED.load(Ordering::Acquire) >= target {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A repeated warning: the first of an interval is written, the others counted.
struct Repeat {
    since: Instant,
    count: u64,
    last: Option<Entry>,
}

/// The writer thread's state.
struct Writer<W: Write> {
    format: Format,
    out: W,
    buf: Vec<u8>,
    /// Lines in `buf`.
    buf_lines: u64,
    /// Entries taken from the queue since the last write (some only counted as repeats).
    taken: u64,
    repeats: HashMap<(String, u32), Repeat>,
    /// Dropped count at the last report, and when that was.
    reported_dropped: u64,
    reported_at: Instant,
    /// The last write error since the last report.
    last_error: Option<io::Error>,
}

impl<W: Write> Writer<W> {
    fn new(format: Format, out: W) -> Self {
        Writer {
            format,
            out,
            buf: Vec::with_capacity(MAX_BATCH_BYTES),
            buf_lines: 0,
            taken: 0,
            repeats: HashMap::new(),
            reported_dropped: 0,
            reported_at: Instant::now(),
            last_error: None,
        }
    }

    fn run(mut self, rx: Receiver<Entry>) {
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(entry) => {
                    self.take(entry, Instant::now());
                    // Whatever else is queued goes out in the same write.
                    while self.buf.len() < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(entry) => self.take(entry, Instant::now()),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.tick(Instant::now());
                    self.write_out();
                    return;
                }
            }
            self.tick(Instant::now());
            self.write_out();
        }
    }

    /// Renders one entry into the batch, or counts it as a repeat.
    fn take(&mut self, entry: Entry, now: Instant) {
        self.taken += 1;
        if let Some(site) = &entry.site {
            match self.repeats.get_mut(site) {
                Some(r) if now.duration_since(r.since) < REPEAT_INTERVAL => {
                    r.count += 1;
                    r.last = Some(entry);
                    return;
                }
                _ => {
                    self.repeats.insert(
                        site.clone(),
                        Repeat {
                            since: now,
                            count: 0,
                            last: None,
                        },
                    );
                }
            }
        }
        self.push(&entry);
    }

    fn push(&mut self, entry: &Entry) {
        render(self.format, entry, &mut self.buf);
        self.buf_lines += 1;
    }

    /// Writes the aggregated lines whose interval is over.
    fn tick(&mut self, now: Instant) {
        let mut due = Vec::new();
        self.repeats.retain(|_, r| {
            if now.duration_since(r.since) < REPEAT_INTERVAL {
                return true;
            }
            match r.last.take() {
                Some(mut last) if r.count > 0 => {
                    last.message.push_str(&format!(
                        " (repeated {} times in the last {} s)",
                        r.count,
                        REPEAT_INTERVAL.as_secs()
                    ));
                    last.fields.push(("repeated".into(), Field::U64(r.count)));
                    last.time_us = timestamp::now_micros();
                    due.push(last);
                    // The next interval starts now; it ends without a line if nothing repeats.
                    r.since = now;
                    r.count = 0;
                    true
                }
                _ => false,
            }
        });
        due.sort_by_key(|e| e.time_us);
        for e in &due {
            self.push(e);
        }
        if now.duration_since(self.reported_at) >= REPEAT_INTERVAL {
            let dropped = DROPPED.load(Ordering::Relaxed);
            let lost = dropped - self.reported_dropped.min(dropped);
            if lost > 0 {
                let why = match &self.last_error {
                    Some(e) => format!("writing to stderr failed: {e}"),
                    None => "stderr did not keep up".to_owned(),
                };
                let entry = Entry {
                    time_us: timestamp::now_micros(),
                    level: Level::Warn,
                    target: module_path!().to_owned(),
                    message: format!(
                        "{lost} log lines dropped in the last {} s ({why})",
                        now.duration_since(self.reported_at).as_secs()
                    ),
                    fields: vec![("dropped".into(), Field::U64(lost))],
                    site: None,
                };
                self.push(&entry);
            }
            self.reported_dropped = dropped;
            self.reported_at = now;
            self.last_error = None;
        }
    }

    /// Writes the batch; lines that cannot be written are dropped and counted.
    fn write_out(&mut self) {
        // Done with these entries once their bytes are out (or dropped): see `flush`.
        let taken = std::mem::take(&mut self.taken);
        if self.buf.is_empty() {
            HANDLED.fetch_add(taken, Ordering::Release);
            return;
        }
        if let Err(e) = self
            .out
            .write_all(&self.buf)
            .and_then(|()| self.out.flush())
        {
            DROPPED.fetch_add(self.buf_lines, Ordering::Relaxed);
            self.last_error = Some(e);
        }
        HANDLED.fetch_add(taken, Ordering::Release);
        self.buf.clear();
        self.buf_lines = 0;
        if self.buf.capacity() > 4 * MAX_BATCH_BYTES {
            self.buf.shrink_to(MAX_BATCH_BYTES);
        }
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str("...");
}

/// Formats `micros` since the epoch as RFC 3339 UTC with `digits` fractional digits (3 or 6).
pub fn rfc3339(micros: i64, digits: u32) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = timestamp::civil_from_days(days);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    if digits >= 6 {
        format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:06}Z")
    } else {
        format!(
            "{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z",
            frac / 1000
        )
    }
}

/// Appends one rendered line (with its newline) to `out`.
fn render(format: Format, e: &Entry, out: &mut Vec<u8>) {
    let mut s = String::with_capacity(96 + e.message.len());
    match format {
        Format::Text => {
            let _ = write!(
                s,
                "{} {:<5} [{}] {}",
                rfc3339(e.time_us, 3),
                e.level,
                e.target,
                e.message
            );
            for (k, v) in &e.fields {
                s.push(' ');
                s.push_str(k);
                s.push('=');
                match v {
                    Field::Str(v) if v.is_empty() || v.contains([' ', '"', '=']) => {
                        json::write_string(&mut s, v)
                    }
                    other => field_text(&mut s, other),
                }
            }
            // One record, one line: a newline inside a message must not forge another line, nor
            // a control character reach a terminal.
            if s.contains(char::is_control) {
                s = s
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
            }
        }
        Format::Json => {
            s.push_str("{\"time\":\"");
            s.push_str(&rfc3339(e.time_us, 6));
            s.push_str("\",\"level\":\"");
            s.push_str(&e.level.as_str().to_ascii_lowercase());
            s.push_str("\",\"module\":");
            json::write_string(&mut s, &e.target);
            s.push_str(",\"message\":");
            json::write_string(&mut s, &e.message);
            for (k, v) in &e.fields {
                if matches!(k.as_str(), "time" | "level" | "module" | "message") {
                    continue;
                }
                s.push(',');
                json::write_string(&mut s, k);
                s.push(':');
                match v {
                    Field::Str(v) => json::write_string(&mut s, v),
                    Field::F64(f) if !f.is_finite() => json::write_string(&mut s, &f.to_string()),
                    other => field_text(&mut s, other),
                }
            }
            s.push('}');
        }
    }
    s.push('\n');
    out.extend_from_slice(s.as_bytes());
}

fn field_text(s: &mut String, v: &Field) {
    let _ = match v {
        Field::U64(v) => write!(s, "{v}"),
        Field::I64(v) => write!(s, "{v}"),
        Field::F64(v) => write!(s, "{v}"),
        Field::Bool(v) => write!(s, "{v}"),
        Field::Str(v) => write!(s, "{v}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(level: Level, message: &str, site: Option<u32>) -> Entry {
        Entry {
            time_us: 1_736_705_202_028_060,
            level,
            target: "flagsmith_sse::server".into(),
            message: message.into(),
            fields: vec![
                ("status".into(), Field::U64(200)),
                ("path".into(), Field::Str("/a b".into())),
            ],
            site: site.map(|l| ("src/x.rs".to_owned(), l)),
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 6), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_736_705_202_028_060, 6),
            "2025-01-12T18:06:42.028060Z"
        );
        assert_eq!(
            rfc3339(1_736_705_202_028_060, 3),
            "2025-01-12T18:06:42.028Z"
        );
        assert_eq!(rfc3339(951_782_400_000_000, 3), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(-1, 6), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn text_and_json_lines() {
        let mut out = Vec::new();
        render(
            Format::Text,
            &entry(Level::Info, "hi\nthere", None),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2025-01-12T18:06:42.028Z INFO  [flagsmith_sse::server] hi there status=200 path=\"/a b\"\n"
        );
        let mut out = Vec::new();
        render(
            Format::Json,
            &entry(Level::Warn, "a \"q\"\n\u{1}", None),
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"time\":\"2025-01-12T18:06:42.028060Z\",\"level\":\"warn\",\"module\":\"flagsmith_sse::server\",\"message\":\"a \\\"q\\\"\\n\\u0001\",\"status\":200,\"path\":\"/a b\"}\n"
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let mut s = "é".repeat(10);
        truncate(&mut s, 5);
        assert_eq!(s, "éé...");
    }

    /// The lines in `buf`, but the dropped-lines reports (other tests drop lines meanwhile).
    fn lines(buf: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(buf)
            .lines()
            .filter(|l| !l.contains("log lines dropped"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn repeats_become_one_line_per_interval() {
        let mut w = Writer::new(Format::Text, Vec::new());
        let t0 = Instant::now();
        for i in 0..5 {
            w.take(
                entry(Level::Warn, "out of file descriptors", Some(7)),
                t0 + Duration::from_millis(i * 100),
            );
        }
        // Another site is not held back by the first.
        w.take(entry(Level::Warn, "other", Some(8)), t0);
        w.tick(t0 + Duration::from_secs(1));
        let text = lines(&w.buf);
        assert_eq!(text.len(), 2, "{text:?}");
        w.tick(t0 + REPEAT_INTERVAL + Duration::from_millis(1));
        let text = lines(&w.buf);
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(
            text[2].contains("out of file descriptors (repeated 4 times in the last 10 s)"),
            "{text:?}"
        );
        // A quiet interval ends without a line, and the next occurrence is written at once.
        w.tick(t0 + 3 * REPEAT_INTERVAL);
        w.take(
            entry(Level::Warn, "out of file descriptors", Some(7)),
            t0 + 3 * REPEAT_INTERVAL,
        );
        let text = lines(&w.buf);
        assert_eq!(text.len(), 4, "{text:?}");
        assert!(!text[3].contains("repeated"), "{text:?}");
    }

    /// A destination that fails every write.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn failed_writes_are_counted_not_fatal() {
        let before = lines_dropped();
        let mut w = Writer::new(Format::Json, Broken);
        w.take(entry(Level::Info, "a", None), Instant::now());
        w.take(entry(Level::Info, "b", None), Instant::now());
        w.write_out();
        assert!(lines_dropped() >= before + 2);
        assert!(w.last_error.is_some());
        assert!(w.buf.is_empty());
    }
}
