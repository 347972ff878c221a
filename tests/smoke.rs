//! The README's promise: a subscriber sees the event after a queue-change.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn subscriber_sees_a_queue_change() {
    let server = Server::start(&[]);
    let mut sub = Subscriber::connect(server.addr, "env-key");
    let r = queue_change(
        server.addr,
        "env-key",
        r#"{"updated_at": "2025-01-12T18:06:42.028060+00:00"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sub.next_update(Duration::from_secs(5)).as_deref(),
        Some("1736705202.02806")
    );
}
