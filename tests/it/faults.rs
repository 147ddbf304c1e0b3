//! Faults under load, against real servers and separate `natter gateway`
//! processes: kill -9 and SIGTERM of a gateway with clients on it, PostgreSQL
//! cut off from a gateway, and a client that never reads during a flood.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::watch};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use crate::{
    assert_eventually,
    helpers::{Client, CutProxy, GatewayProcess, NatsServer, TestDb, create_room, http, spawn_gateway, token},
};

const ROOM: &str = "ops";

/// A `natter gateway` process does not get the test settings: rate limits off
/// (the tests send faster than people do).
const LIMITS_OFF: [&str; 10] = [
    "--limit-sends-per-sec",
    "0",
    "--limit-user-sends-per-sec",
    "0",
    "--limit-frames-per-sec",
    "0",
    "--limit-http-per-ip-per-sec",
    "0",
    "--limit-http-per-token-per-sec",
    "0",
];

fn process_args<'a>(more: &[&'a str]) -> Vec<&'a str> {
    LIMITS_OFF.iter().copied().chain(more.iter().copied()).collect()
}

/// What one client saw across a gateway going away: the seqs on the first
/// gateway, how that connection ended, and the seqs after resuming on the other.
struct Followed {
    user: String,
    before: Vec<u64>,
    close: Option<u16>,
    closed_at: Instant,
    since: u64,
    after: Vec<u64>,
    reached_target: bool,
}

fn seq_of(v: &Value) -> Option<u64> {
    (v["type"] == "message" && v["room"] == ROOM).then(|| v["seq"].as_u64().expect("message seq"))
}

/// `n` members of ROOM (created on `survivor`), each following the room on
/// `first` and then on `survivor`, all joined. Send the last acked seq on the
/// returned sender to let them finish.
async fn followers(
    n: usize,
    first: SocketAddr,
    survivor: &crate::helpers::TestGateway,
) -> (watch::Sender<Option<u64>>, Vec<tokio::task::JoinHandle<Followed>>) {
    let users: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    create_room(&survivor.http(), "sender", ROOM, &members).await;
    let joined = Arc::new(AtomicUsize::new(0));
    let (target_tx, target) = watch::channel(None);
    let clients = users
        .iter()
        .map(|u| tokio::spawn(follow(u.clone(), first, survivor.addr, joined.clone(), target.clone())))
        .collect();
    assert_eventually!(
        Duration::from_secs(30),
        joined.load(Ordering::SeqCst) == n,
        "{} of {n} clients joined",
        joined.load(Ordering::SeqCst)
    );
    (target_tx, clients)
}

/// Joins ROOM on `first`, reads until that connection ends, then reconnects
/// to `second`, joins with `since` = the last seq seen, and reads until it has
/// seen the seq published on `target` (or gives up after 30 s).
async fn follow(
    user: String,
    first: SocketAddr,
    second: SocketAddr,
    joined: Arc<AtomicUsize>,
    target: watch::Receiver<Option<u64>>,
) -> Followed {
    let mut c = Client::connect(first, &user).await;
    c.join(ROOM, None).await;
    joined.fetch_add(1, Ordering::SeqCst);
    let mut before = Vec::new();
    let (close, closed_at) = loop {
        match c.next_within(Duration::from_secs(45)).await {
            Some(Ok(v)) => before.extend(seq_of(&v)),
            Some(Err(code)) => break (code, Instant::now()),
            None => panic!("{user}: the first gateway never went away"),
        }
    };
    drop(c);
    let since = before.last().copied().unwrap_or(0);
    let mut c = Client::connect(second, &user).await;
    c.join(ROOM, Some(since)).await;
    let mut after = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut reached_target = false;
    loop {
        let last = after.last().copied().unwrap_or(since);
        if target.borrow().is_some_and(|t| last >= t) {
            reached_target = true;
            break;
        }
        if Instant::now() > give_up {
            break;
        }
        match c.next_within(Duration::from_millis(250)).await {
            Some(Ok(v)) => after.extend(seq_of(&v)),
            Some(Err(code)) => panic!("{user}: second connection closed with {code:?}"),
            None => {}
        }
    }
    Followed { user, before, close, closed_at, since, after, reached_target }
}

/// Every acked seq reached every client exactly once (after dropping seqs a
/// client already had), in increasing order on each connection.
fn check_no_loss(outcomes: &[Followed], acked: &[u64]) {
    let acked: BTreeSet<u64> = acked.iter().copied().collect();
    let mut problems = Vec::new();
    for o in outcomes {
        let increasing = |s: &[u64]| s.windows(2).all(|w| w[0] < w[1]);
        if !increasing(&o.before) || !increasing(&o.after) {
            problems.push(format!("{}: out of order or duplicated on one connection", o.user));
        }
        let dupes = o.after.iter().filter(|s| **s <= o.since).count();
        if dupes > 0 {
            problems.push(format!("{}: {dupes} seqs replayed at or below since={}", o.user, o.since));
        }
        let seen: BTreeSet<u64> = o.before.iter().chain(&o.after).copied().collect();
        let missing: Vec<u64> = acked.difference(&seen).copied().collect();
        if !missing.is_empty() || !o.reached_target {
            problems.push(format!(
                "{}: missing {} acked seqs (first {:?}); since={}, saw {} + {}",
                o.user,
                missing.len(),
                &missing[..missing.len().min(8)],
                o.since,
                o.before.len(),
                o.after.len()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} clients lost messages:\n{}",
        problems.len(),
        outcomes.len(),
        problems.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_gateway_with_200_clients_loses_no_acked_message_after_resume() {
    const CLIENTS: usize = 200;
    const SENDS: usize = 300;
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let survivor = spawn_gateway(&nats, &db, "gw-survivor", &[]).await;
    let mut doomed = GatewayProcess::start(&nats.url(), &db, "gw-doomed", &process_args(&[]));
    let (target_tx, clients) = followers(CLIENTS, doomed.addr, &survivor).await;

    let mut sender = Client::connect(survivor.addr, "sender").await;
    let mut acked = Vec::with_capacity(SENDS);
    let started = Instant::now();
    let mut killed_at = None;
    for i in 0..SENDS {
        if i == SENDS / 3 {
            doomed.kill9();
            killed_at = Some(started.elapsed());
        }
        acked.push(sender.send_msg(ROOM, &format!("m{i}"), "steady").await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent_in = started.elapsed();
    target_tx.send_replace(acked.iter().copied().max());

    let mut outcomes = Vec::with_capacity(CLIENTS);
    for c in clients {
        outcomes.push(c.await.expect("client task"));
    }
    let before: usize = outcomes.iter().map(|o| o.before.len()).sum();
    let after: usize = outcomes.iter().map(|o| o.after.len()).sum();
    eprintln!(
        "kill -9: {SENDS} acked in {sent_in:?}, killed at {killed_at:?}; {CLIENTS} clients saw {before} frames \
         before and {after} after resuming"
    );
    assert!(outcomes.iter().all(|o| o.close.is_none()), "a killed gateway sends no close frame");
    check_no_loss(&outcomes, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_1012_spread_over_the_drain_window_and_exits_0_losing_nothing() {
    const CLIENTS: usize = 50;
    const SENDS: usize = 400;
    const WINDOW: Duration = Duration::from_secs(4);
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let survivor = spawn_gateway(&nats, &db, "gw-survivor", &[]).await;
    let draining = GatewayProcess::start(&nats.url(), &db, "gw-draining", &process_args(&["--drain-window", "4s"]));
    let addr = draining.addr;
    let mut draining = Some(draining);
    let (target_tx, clients) = followers(CLIENTS, addr, &survivor).await;

    let mut sender = Client::connect(survivor.addr, "sender").await;
    let mut acked = Vec::with_capacity(SENDS);
    let mut terminated = None;
    for i in 0..SENDS {
        if i == SENDS / 8 {
            let mut draining = draining.take().expect("once");
            let sigterm_at = Instant::now();
            terminated = Some(tokio::task::spawn_blocking(move || {
                let status = draining.terminate(WINDOW + Duration::from_secs(1));
                (sigterm_at, status, sigterm_at.elapsed())
            }));
        }
        acked.push(sender.send_msg(ROOM, &format!("m{i}"), "steady").await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    target_tx.send_replace(acked.iter().copied().max());
    let (sigterm_at, status, exit_after) = terminated.expect("SIGTERM sent").await.unwrap();

    let mut outcomes = Vec::with_capacity(CLIENTS);
    for c in clients {
        outcomes.push(c.await.expect("client task"));
    }
    let offsets: Vec<Duration> = outcomes.iter().map(|o| o.closed_at.saturating_duration_since(sigterm_at)).collect();
    let (first, last) = (offsets.iter().min().unwrap(), offsets.iter().max().unwrap());
    eprintln!(
        "SIGTERM: status {status:?} after {exit_after:?}; closes {:?}, from {first:?} to {last:?} after SIGTERM",
        outcomes.iter().map(|o| o.close).collect::<BTreeSet<_>>()
    );
    let codes: Vec<_> = outcomes.iter().filter(|o| o.close != Some(1012)).map(|o| (&o.user, o.close)).collect();
    assert!(codes.is_empty(), "every client is closed with 1012: {codes:?}");
    assert!(outcomes.iter().all(|o| o.closed_at >= sigterm_at), "no close before SIGTERM");
    assert!(*last <= WINDOW, "every socket closed within the drain window: last at {last:?}");
    assert!(*last - *first > Duration::from_millis(500), "closes spread over time: {first:?}..{last:?}");
    let status = status.unwrap_or_else(|| panic!("no exit within the drain window + 1 s ({exit_after:?})"));
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    check_no_loss(&outcomes, &acked);
}

/// `db_url` with host and port replaced by `proxy`'s.
fn through(db_url: &str, proxy: SocketAddr) -> String {
    let mut via = url::Url::parse(db_url).unwrap();
    via.set_host(Some("127.0.0.1")).unwrap();
    via.set_port(Some(proxy.port())).unwrap();
    via.to_string()
}

async fn readyz(addr: SocketAddr) -> (u16, Value) {
    let r = http().get(format!("http://{addr}/readyz")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Sends a join and returns the answer: `joined` or an error frame (other
/// frames are skipped).
async fn try_join(c: &mut Client, room: &str) -> Value {
    c.send(json!({"type":"join","room":room})).await;
    loop {
        let v = c.recv().await;
        if v["type"] == "joined" || (v["type"] == "error" && v["ref"] == "join") {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_fails_joins_unavailable_keeps_sockets_and_recovers_without_restart() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let db_url = url::Url::parse(&db.url).unwrap();
    let upstream = format!("{}:{}", db_url.host_str().unwrap(), db_url.port().unwrap_or(5432));
    let upstream = tokio::net::lookup_host(upstream).await.unwrap().next().unwrap();
    let proxy = CutProxy::start(upstream).await;
    let via = through(&db.url, proxy.addr);
    let cut_gw =
        spawn_gateway(&nats, &db, "gw-cut", &["--database-url", &via, "--membership-cache-ttl", "100ms"]).await;
    let other = spawn_gateway(&nats, &db, "gw-other", &[]).await;
    create_room(&other.http(), "carol", "before", &["alice"]).await;
    create_room(&other.http(), "carol", "later", &["alice"]).await;
    let mut alice = Client::connect(cut_gw.addr, "alice").await;
    // (room_added events for alice may come first: frames other than the answer are skipped.)
    assert_eq!(try_join(&mut alice, "before").await["type"], "joined");
    let mut carol = Client::connect(other.addr, "carol").await;
    assert_eq!(readyz(cut_gw.addr).await.0, 200);

    proxy.cut();
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await; // past the membership cache
    let t = Instant::now();
    let answer = try_join(&mut alice, "later").await;
    let took = t.elapsed();
    let (status, body) = readyz(cut_gw.addr).await;
    eprintln!("PostgreSQL cut: join answered {answer} after {took:?}; /readyz {status} {body}");
    assert_eq!(answer["type"], "error", "a join cannot be checked without PostgreSQL: {answer}");
    assert_eq!(answer["code"], "unavailable", "a dependency outage is `unavailable` (retry), not {answer}");
    assert_eq!(status, 503);
    assert_eq!(body["database"], false, "{body}");
    assert_eq!(body["nats"], true, "{body}");

    // The open socket is still served: live messages and pings.
    let seq = carol.send_msg("before", "during-cut", "still here").await;
    let got = alice.messages("before", 1).await;
    assert_eq!(got[0]["seq"], seq);
    alice.send(json!({"type":"ping"})).await;
    while alice.recv().await["type"] != "pong" {}

    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
    proxy.restore();
    let restored = Instant::now();
    let mut last: Value;
    assert_eventually!(
        Duration::from_secs(15),
        {
            last = try_join(&mut alice, "later").await;
            if last["type"] != "joined" {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            last["type"] == "joined"
        },
        "joins work again after PostgreSQL is back, on the same socket: {last}"
    );
    let rejoin = restored.elapsed();
    assert_eventually!(Duration::from_secs(10), readyz(cut_gw.addr).await.0 == 200, "ready again");
    eprintln!("PostgreSQL back: join ok after {rejoin:?}, /readyz 200 after {:?}", restored.elapsed());
    let seq = carol.send_msg("later", "after-cut", "back").await;
    assert_eq!(alice.messages("later", 1).await[0]["seq"], seq);
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A bare socket after `welcome` (and `joined`, given a room), for tests that
/// read and write from separate tasks.
async fn raw_client(addr: SocketAddr, node: &str, user: &str, room: Option<&str>) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await.expect("ws connect");
    ws.send(Message::text(json!({"type":"hello","token": token(user)}).to_string())).await.unwrap();
    let mut want = vec!["welcome"];
    if let Some(r) = room {
        ws.send(Message::text(json!({"type":"join","room": r}).to_string())).await.unwrap();
        want.push("joined");
    }
    for ty in want {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == ty {
                        if ty == "welcome" {
                            assert_eq!(v["node"], node, "{user}: connected to another gateway than the test's");
                        }
                        break;
                    }
                    assert_ne!(v["type"], "error", "{user}: {v}");
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("{user}: no {ty}: {other:?}"),
            }
        }
    }
    ws
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_closed_4008_and_costs_neither_memory_nor_others_latency() {
    const FLOOD: usize = 10_000;
    const IN_FLIGHT: usize = 256;
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = GatewayProcess::start(
        &nats.url(),
        &db,
        "gw-flood",
        &process_args(&["--outbound-queue", "256", "--stream-max-per-room", "100000", "--presence-grace", "100ms"]),
    );
    let base = format!("http://{}", gw.addr);
    create_room(&base, "flooder", ROOM, &["slow"]).await;
    // The watcher is in a quiet room of the same gateway: with a 256-frame
    // queue, a reading client in the flooded room is itself closed 4008
    // whenever this 2-core machine stalls its reader for ~50 ms.
    create_room(&base, "watcher", "quiet", &[]).await;
    let mut slow = Client::connect(gw.addr, "slow").await;
    slow.join(ROOM, None).await; // and then not a single read until the gateway has dropped it

    // The watcher reads everything, measures the acks of its own sends and
    // watches the slow client's presence: offline (after a 100 ms grace) once
    // the gateway has ended its session.
    let mut watcher = raw_client(gw.addr, "gw-flood", "watcher", Some("quiet")).await;
    watcher.send(Message::text(json!({"type":"presence_sub","users":["slow"]}).to_string())).await.unwrap();
    let (mut wsink, mut wstream) = watcher.split();
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (cut_tx, cut) = watch::channel(None::<Instant>);
    let watcher_msgs = Arc::new(AtomicUsize::new(0));
    let counted = watcher_msgs.clone();
    let watcher_reader = tokio::spawn(async move {
        while let Some(m) = wstream.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("message") => {
                            counted.fetch_add(1, Ordering::SeqCst);
                        }
                        Some("ack") => {
                            let _ = ack_tx.send((v["id"].as_str().unwrap().to_owned(), Instant::now()));
                        }
                        Some("presence") if v["user"] == "slow" && v["status"] == "offline" => {
                            cut_tx.send_if_modified(|c| c.is_none() && c.replace(Instant::now()).is_none());
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    });

    let pid = gw.pid();
    let baseline = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Ack latency with the gateway idle, for comparison.
    let mut sent_at = HashMap::new();
    for i in 0..25 {
        let id = format!("idle{i}");
        sent_at.insert(id.clone(), Instant::now());
        let ping = json!({"type":"send","room":"quiet","id":id,"body":"ping"}).to_string();
        wsink.send(Message::text(ping)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The never-reading client is read only once the gateway has dropped its
    // session (or after the flood): what its socket buffers held, then the
    // close. Its close frame waits behind those frames, and the gateway gives
    // up on a socket that stays full for 3 s, so it must not wait longer.
    let (flood_done_tx, flood_done) = watch::channel(false);
    let slow_read = {
        let (mut cut, mut flood_done) = (cut.clone(), flood_done.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = cut.wait_for(Option::is_some) => r.map(|_| ()).unwrap(),
                r = flood_done.wait_for(|d| *d) => r.map(|_| ()).unwrap(),
            }
            let started = Instant::now();
            let mut seqs = Vec::new();
            let close = loop {
                match slow.next_within(Duration::from_secs(10)).await {
                    Some(Ok(v)) => seqs.extend(v["seq"].as_u64().filter(|_| v["type"] == "message")),
                    Some(Err(code)) => break code,
                    None => panic!("slow: neither frames nor a close ({} frames read)", seqs.len()),
                }
            };
            (close, seqs, started, started.elapsed())
        })
    };

    // The flood: sends pipelined from one connection (no join), IN_FLIGHT unacked at most.
    let (mut fsink, mut fstream) = raw_client(gw.addr, "gw-flood", "flooder", None).await.split();
    let window = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let flood_acked = Arc::new(AtomicUsize::new(0));
    let flood_reader = {
        let (window, acked) = (window.clone(), flood_acked.clone());
        tokio::spawn(async move {
            while acked.load(Ordering::SeqCst) < FLOOD {
                match tokio::time::timeout(Duration::from_secs(20), fstream.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        assert_ne!(v["type"], "error", "flood send refused: {v}");
                        if v["type"] == "ack" {
                            acked.fetch_add(1, Ordering::SeqCst);
                            window.add_permits(1);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("flooder: {other:?} after {} acks", acked.load(Ordering::SeqCst)),
                }
            }
        })
    };
    let body = "x".repeat(600);
    let flood_started = Instant::now();
    let flooder = tokio::spawn(async move {
        for i in 0..FLOOD {
            window.acquire().await.unwrap().forget();
            let f = json!({"type":"send","room":ROOM,"id":format!("f{i}"),"body":body});
            fsink.send(Message::text(f.to_string())).await.unwrap();
        }
        fsink
    });

    // Meanwhile the watcher sends one message every 20 ms.
    let mut i = 0;
    while !flooder.is_finished() || flood_acked.load(Ordering::SeqCst) < FLOOD {
        assert!(flood_started.elapsed() < Duration::from_secs(40), "flood not acked within 40 s");
        let id = format!("w{i}");
        sent_at.insert(id.clone(), Instant::now());
        let ping = json!({"type":"send","room":"quiet","id":id,"body":"ping"}).to_string();
        if let Err(e) = wsink.send(Message::text(ping)).await {
            let closed = tokio::time::timeout(Duration::from_secs(1), watcher_reader).await;
            panic!("watcher: {e} (its close: {closed:?}) after {i} sends");
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flood_took = flood_started.elapsed();
    let _fsink = flooder.await.unwrap();
    flood_reader.await.unwrap();
    flood_done_tx.send_replace(true);
    let pings = sent_at.len();
    assert_eventually!(
        Duration::from_secs(20),
        watcher_msgs.load(Ordering::SeqCst) == pings && !watcher_reader.is_finished(),
        "the watcher gets all {pings} of its messages and stays connected: {} (finished: {})",
        watcher_msgs.load(Ordering::SeqCst),
        watcher_reader.is_finished()
    );
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    let grew_kib = peak.load(Ordering::SeqCst).saturating_sub(baseline);

    // An ack may come after the message it acks: wait for all of them.
    let mut latencies = Vec::with_capacity(pings);
    while latencies.len() < pings {
        let ack = tokio::time::timeout(Duration::from_secs(10), ack_rx.recv()).await;
        let (id, at) =
            ack.ok().flatten().unwrap_or_else(|| panic!("{} of {pings} watcher sends acked", latencies.len()));
        let sent = sent_at[&id];
        latencies.push((id, at - sent));
    }
    let (idle, mut flood): (Vec<_>, Vec<_>) = latencies.into_iter().partition(|(id, _)| id.starts_with("idle"));
    let mut idle: Vec<Duration> = idle.into_iter().map(|(_, l)| l).collect();
    idle.sort();
    flood.sort_by_key(|(_, l)| *l);
    let flood: Vec<Duration> = flood.into_iter().map(|(_, l)| l).collect();
    let (p50, p99) = (percentile(&flood, 0.5), percentile(&flood, 0.99));

    let (close, slow_seqs, read_from, read_took) = slow_read.await.unwrap();
    let cut_at = cut.borrow().map(|c| c.saturating_duration_since(flood_started));
    eprintln!(
        "flood: {FLOOD} acked in {flood_took:?}; slow client offline at {cut_at:?} into the flood, then read {} \
         messages in {read_took:?} (from {:?}) and close {close:?}; gateway RSS {baseline} KiB -> peak +{grew_kib} \
         KiB; watcher ack during the flood p50 {p50:?} p99 {p99:?} over {} sends (idle p50 {:?})",
        slow_seqs.len(),
        read_from.saturating_duration_since(flood_started),
        flood.len(),
        percentile(&idle, 0.5)
    );
    assert_eq!(close, Some(4008), "a slow consumer is closed with 4008");
    assert!(slow_seqs.len() < FLOOD, "the slow client was cut off before the end");
    assert!(grew_kib < 100 * 1024, "gateway RSS grew {grew_kib} KiB over the flood");
    assert!(p99 < Duration::from_millis(500), "watcher ack latency p99 {p99:?} (p50 {p50:?})");

    // 4008 means "resume from the last seq": nothing is lost.
    let since = slow_seqs.last().copied().unwrap_or(0);
    let mut again = Client::connect(gw.addr, "slow").await;
    let last = again.join(ROOM, Some(since)).await;
    let rest = again.messages(ROOM, FLOOD - slow_seqs.len()).await;
    let rest = crate::helpers::seqs_in_order(&rest);
    assert!(rest.first().is_some_and(|s| *s > since) && rest.last() == Some(&last), "replay ({since}, {last}]");
    let all: BTreeSet<u64> = slow_seqs.iter().chain(&rest).copied().collect();
    assert_eq!(all.len(), FLOOD, "resumed after 4008 without loss");
    again.expect_silence(Duration::from_millis(300)).await;
}

/// A sender that is in the room it sends to gets two frames per send, the
/// message (from the room) and the ack, in separate writes. With Nagle on the
/// gateway's sockets, the second would wait for the client's delayed ACK
/// (~40 ms); the gateway sets TCP_NODELAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_in_its_own_room_gets_acks_without_a_delayed_ack_stall() {
    let nats = NatsServer::start();
    let db = TestDb::new().await;
    let gw = spawn_gateway(&nats, &db, "gw1", &[]).await;
    create_room(&gw.http(), "alice", ROOM, &[]).await;
    let mut alice = Client::connect(gw.addr, "alice").await;
    let mut took = Vec::new();
    for joined in [false, true] {
        if joined {
            alice.join(ROOM, None).await;
        }
        let mut l: Vec<Duration> = Vec::new();
        for i in 0..30 {
            let t = Instant::now();
            alice.send_msg(ROOM, &format!("{joined}-{i}"), "hi").await;
            l.push(t.elapsed());
        }
        l.sort();
        took.push(percentile(&l, 0.5));
    }
    eprintln!("ack p50: not joined {:?}, joined {:?}", took[0], took[1]);
    assert!(took[1] < Duration::from_millis(15), "ack p50 of a joined sender {:?} (not joined {:?})", took[1], took[0]);
}
