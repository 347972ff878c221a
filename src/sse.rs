//! Server-sent events on the wire: the stream's response head, update events, keep-alive
//! comments and the end of a stream, for chunked (HTTP/1.1) and close-delimited (HTTP/1.0)
//! streams alike.
//!
//! An update is encoded once into one shared buffer holding the chunked form; the plain form is
//! a slice of the same buffer, so every subscriber of an environment writes from one allocation.

use crate::timestamp::{self, Micros};
use std::rc::Rc;

/// Response head of a stream to an HTTP/1.1 request.
pub const HEAD_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/event-stream\r\n\
Cache-Control: no-cache\r\n\
Connection: keep-alive\r\n\
Access-Control-Allow-Origin: *\r\n\
X-Accel-Buffering: no\r\n\
Transfer-Encoding: chunked\r\n\r\n";

/// Response head of a stream to an HTTP/1.0 request: the same headers without chunking; the
/// body ends when the connection closes (there is no length, so no client can reuse it).
pub const HEAD_PLAIN: &[u8] = b"HTTP/1.1 200 OK\r\n\
Content-Type: text/event-stream\r\n\
Cache-Control: no-cache\r\n\
Connection: keep-alive\r\n\
Access-Control-Allow-Origin: *\r\n\
X-Accel-Buffering: no\r\n\r\n";

/// The keep-alive comment, in a chunk.
pub const PING_CHUNKED: &[u8] = b"8\r\n: ping\n\n\r\n";
/// The keep-alive comment, unframed.
pub const PING_PLAIN: &[u8] = b": ping\n\n";
/// The last chunk, which ends a chunked stream cleanly.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// One encoded `environment_updated` event, shared by every subscriber of the environment.
#[derive(Clone, Debug)]
pub struct Event {
    /// Chunk size line, event text, CRLF.
    buf: Rc<[u8]>,
    /// Length of the chunk size line.
    head: u8,
    /// The time the event carries.
    pub time: Micros,
}

impl Event {
    /// Encodes the event for `time`.
    pub fn new(time: Micros) -> Event {
        let mut text = Vec::with_capacity(96);
        text.extend_from_slice(b"event: environment_updated\ndata: {\"updated_at\": ");
        timestamp::write_epoch_seconds(time, &mut text);
        text.extend_from_slice(b"}\nretry: 15000\n\n");
        let mut buf = format!("{:x}\r\n", text.len()).into_bytes();
        let head = buf.len() as u8;
        buf.extend_from_slice(&text);
        buf.extend_from_slice(b"\r\n");
        Event {
            buf: buf.into(),
            head,
            time,
        }
    }

    /// The bytes to write: the chunk for a chunked stream, the bare event otherwise.
    pub fn bytes(&self, chunked: bool) -> &[u8] {
        if chunked {
            &self.buf
        } else {
            &self.buf[usize::from(self.head)..self.buf.len() - 2]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_bytes_are_exact() {
        let e = Event::new(1_735_229_888_760_412);
        let text = "event: environment_updated\ndata: {\"updated_at\": 1735229888.760412}\nretry: 15000\n\n";
        assert_eq!(std::str::from_utf8(e.bytes(false)).unwrap(), text);
        let chunk = format!("{:x}\r\n{text}\r\n", text.len());
        assert_eq!(std::str::from_utf8(e.bytes(true)).unwrap(), chunk);
    }

    #[test]
    fn whole_seconds_keep_a_decimal_point() {
        let e = Event::new(1_735_229_888_000_000);
        assert!(
            std::str::from_utf8(e.bytes(false))
                .unwrap()
                .contains("{\"updated_at\": 1735229888.0}\n")
        );
    }

    #[test]
    fn both_heads_carry_the_same_headers_but_chunking() {
        let chunked = std::str::from_utf8(HEAD_CHUNKED).unwrap();
        let plain = std::str::from_utf8(HEAD_PLAIN).unwrap();
        assert_eq!(chunked.replace("Transfer-Encoding: chunked\r\n", ""), plain);
    }

    #[test]
    fn ping_chunk_length_matches() {
        assert_eq!(&PING_CHUNKED[3..PING_CHUNKED.len() - 2], PING_PLAIN);
        assert_eq!(PING_PLAIN.len(), 8);
    }
}
