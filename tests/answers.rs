//! Many queue-changes acknowledged by the store at once, with the real binary and a real
//! `redis-server`: the loop answers them over as many turns as its budget needs, and still every
//! queue-change gets exactly one answer, on its own connection, in request order on a pipelined
//! connection, and every stored time reaches the environment's subscribers.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const BASE: u64 = 1_700_000_000;

fn post(key: &str, body: &str, close: bool) -> String {
    format!(
        "POST /sse/environments/{key}/queue-change HTTP/1.1\r\nHost: t\r\nAuthorization: Token {TOKEN}\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

#[track_caller]
fn assert_answer(r: &Response, secs: u64, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text());
    let want = format!("\"updated_at\": {}}}", update_text(secs));
    assert!(r.text().ends_with(&want), "{what}: {}", r.text());
}

#[test]
fn a_large_batch_of_acknowledged_writes_gets_one_answer_each_in_order() {
    const POSTS: usize = 1_000;
    const PIPELINED: usize = 3;
    const WATCHED: usize = 20;
    let redis = Redis::start();
    let url = redis.url();
    let server = Server::start(&[
        ("REDIS_URL", url.as_str()),
        ("STREAM_DELAY", "0"),
        ("MAX_STREAM_AGE", "-1"),
        ("LOG_LEVEL", "info"),
    ]);
    assert!(
        readiness_within(server.addr, 200, Duration::from_secs(10)),
        "not ready; log:\n{}",
        server.log()
    );
    let key = |i: usize| format!("batch-{i}");
    let mut subs: Vec<Subscriber> = (0..WATCHED)
        .map(|i| Subscriber::connect(server.addr, &key(i * (POSTS / WATCHED))))
        .collect();
    redis.cli(&["CONFIG", "RESETSTAT"]).unwrap();

    // Writes wait at Redis meanwhile, so that the helper collects the rest into large batches.
    redis.cli(&["CLIENT", "PAUSE", "700", "WRITE"]).unwrap();
    let mut socks: Vec<TcpStream> = (0..POSTS)
        .map(|i| {
            let mut s = TcpStream::connect(server.addr).expect("connect");
            s.write_all(post(&key(i), &update_body(BASE + i as u64), true).as_bytes())
                .expect("send");
            s
        })
        .collect();
    // One keep-alive connection with its queue-changes pipelined: answered in request order.
    let mut piped = TcpStream::connect(server.addr).expect("connect");
    let raw: String = (0..PIPELINED)
        .map(|j| {
            post(
                &format!("piped-{j}"),
                &update_body(BASE + 10 * j as u64),
                false,
            )
        })
        .collect();
    piped.write_all(raw.as_bytes()).expect("send");

    for (i, s) in socks.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let r = read_response(s);
        assert_answer(&r, BASE + i as u64, &key(i));
        // Exactly one answer: nothing but the end of the connection follows it.
        let mut rest = Vec::new();
        assert!(
            s.read_to_end(&mut rest).is_ok() && rest.is_empty(),
            "{}: more after the answer: {:?}",
            key(i),
            String::from_utf8_lossy(&rest)
        );
    }
    piped
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for j in 0..PIPELINED {
        let r = read_response(&mut piped);
        assert_answer(&r, BASE + 10 * j as u64, &format!("pipelined {j}"));
    }

    for (n, sub) in subs.iter_mut().enumerate() {
        let i = n * (POSTS / WATCHED);
        let got = sub.next_update(Duration::from_secs(20));
        assert_eq!(got, Some(update_text(BASE + i as u64)), "{}", key(i));
    }
    let calls = redis.calls("evalsha");
    println!(
        "{} queue-changes answered; {calls} EVALSHA round trips",
        POSTS + PIPELINED
    );
    assert!(
        calls <= (POSTS / 4) as u64,
        "{calls} round trips for {POSTS} writes: the batches were small"
    );
}
