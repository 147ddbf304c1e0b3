//! Hardening: a 3-node NATS cluster with the CHAT stream at R3 and two
//! gateways on different nodes. The stream leader's node is killed -9 during
//! a steady send and later restarted: no acked message is lost, none is
//! stored twice, and every reader sees each message once, in order.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use natter::bus::subjects::CHAT_STREAM;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::{assert_eventually, helpers::*};

const ROOM: &str = "general";
const SENDS: usize = 600;
const SEND_GAP: Duration = Duration::from_millis(10);
/// Every send must be acked (after resends) within this.
const SEND_WITHIN: Duration = Duration::from_secs(35);
/// A reader must get back into the room within this after losing it.
const REJOIN_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_mid_send_loses_and_duplicates_nothing() {
    tokio::time::timeout(Duration::from_secs(60), kill_leader_mid_send()).await.expect("test ran over 60 s");
}

async fn kill_leader_mid_send() {
    let t0 = Instant::now();
    let mut cluster = tokio::task::block_in_place(|| NatsCluster::start(3));
    let db = TestDb::new().await;
    let r3 = ["--stream-replicas", "3"];
    let gw_a = spawn_gateway_at(&urls_from(&cluster, 0), &db, "gwa", &r3).await;
    let gw_b = spawn_gateway_at(&urls_from(&cluster, 1), &db, "gwb", &r3).await;
    create_room(&gw_a.http(), "alice", ROOM, &["bob", "carol"]).await;
    // Node 0 is also where gateway A is connected: its loss hits both paths.
    let observer = async_nats::connect(cluster.url(2)).await.unwrap();
    move_stream_leader(&observer, cluster.name(0)).await;
    let started = t0.elapsed();

    let stop = CancellationToken::new();
    let readers = [(gw_a.addr, "bob"), (gw_b.addr, "carol")].map(|(addr, user)| {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let c = join_room(addr, user, None).await;
            read_loop(c, addr, user, seen2, stop2).await
        });
        (user, seen, task)
    });
    for (user, seen, _) in &readers {
        assert_eventually!(REJOIN_WITHIN, seen.lock().unwrap().joined, "{user} did not join");
    }

    let progress = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn(send_steadily(gw_b.addr, progress.clone()));
    assert_eventually!(Duration::from_secs(20), progress.load(Ordering::Relaxed) >= SENDS / 3, "sends stalled");
    let leader_at_kill = stream_leader(&observer).await;
    cluster.kill9(0);
    let killed_at = Instant::now();
    assert_eventually!(SEND_WITHIN, progress.load(Ordering::Relaxed) >= 2 * SENDS / 3, "sends stalled after kill");
    tokio::task::block_in_place(|| cluster.restart(0));
    let restarted_after = killed_at.elapsed();
    let sent = sender.await.unwrap();
    let leader_now = stream_leader(&observer).await;

    // History (through the gateway that lost its node) holds each acked id once.
    let stored = history(&gw_a.http()).await;
    let stored_seqs: HashSet<u64> = stored.keys().copied().collect();
    assert_eq!(stored_seqs.len(), stored.len());
    let mut seqs_of: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (seq, id) in &stored {
        seqs_of.entry(id).or_default().push(*seq);
    }
    let twice: Vec<_> = seqs_of.iter().filter(|(_, s)| s.len() > 1).collect();
    assert!(twice.is_empty(), "ids stored more than once (id → seqs): {twice:?}");
    let lost: Vec<_> = sent.acked.iter().filter(|(id, seq)| stored.get(seq) != Some(id)).collect();
    assert!(lost.is_empty(), "acked (id, seq) missing from history: {lost:?}");
    assert_eq!(stored.len(), SENDS, "history holds messages nobody acked");

    // Every reader gets every stored seq (dropping repeats), in order.
    for (user, seen, _) in &readers {
        assert_eventually!(
            Duration::from_secs(15),
            stored_seqs.iter().all(|s| seen.lock().unwrap().ids.contains_key(s)),
            "{user} is missing seqs: {:?}",
            missing(&stored_seqs, &seen.lock().unwrap().ids)
        );
    }
    stop.cancel();
    let mut report = Vec::new();
    for (user, seen, task) in readers {
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        let order = &seen.first_seen;
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{user}: seqs out of order: {order:?}");
        for (seq, id) in &seen.ids {
            assert_eq!(stored.get(seq), Some(id), "{user}: seq {seq} carries {id}, history disagrees");
        }
        assert_eq!(seen.ids.len(), stored.len(), "{user}: got seqs that are not in history");
        report.push(format!("{user}: {} repeats dropped, {} rejoins", seen.repeats, seen.rejoins));
    }
    eprintln!(
        "cluster test: up in {started:?}; {SENDS} acked, {} unavailable errors, {} resends, {} sender reconnects, \
         slowest ack {:?}; killed leader {leader_at_kill}, \
         restarted {restarted_after:?} later; leader now {leader_now}; {}; \
         total {:?}",
        sent.errors,
        sent.resends,
        sent.reconnects,
        sent.slowest_ack,
        report.join(", "),
        t0.elapsed()
    );
}

/// The cluster's URLs with node `first` first (the gateway keeps that order).
fn urls_from(c: &NatsCluster, first: usize) -> String {
    let urls: Vec<String> = c.urls().split(',').map(str::to_owned).collect();
    let n = urls.len();
    (0..n).map(|i| urls[(first + i) % n].clone()).collect::<Vec<_>>().join(",")
}

/// The CHAT stream's leader. A request may time out while the cluster is
/// still placing the gateways' R3 streams and buckets: asked again, within 20 s.
async fn stream_leader(nats: &async_nats::Client) -> String {
    let js = async_nats::jetstream::new(nats.clone());
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let info = async { js.get_stream(CHAT_STREAM).await?.get_info().await.map_err(Into::into) };
        let res: Result<_, Box<dyn std::error::Error + Send + Sync>> = info.await;
        match res {
            Ok(info) => return info.cluster.and_then(|c| c.leader).unwrap_or_default(),
            Err(e) if Instant::now() < until => eprintln!("stream info: {e}; asking again"),
            Err(e) => panic!("no stream info within 20 s: {e}"),
        }
    }
}

/// Steps the CHAT stream's leader down until `to` leads it (asking for `to`
/// as the preferred successor; elections are random when that is ignored).
async fn move_stream_leader(nats: &async_nats::Client, to: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let leader = stream_leader(nats).await;
        if leader == to {
            return;
        }
        assert!(Instant::now() < until, "CHAT stream leader stays {leader:?}, wanted {to}");
        let ask = json!({"placement": {"preferred": to}}).to_string();
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{CHAT_STREAM}");
        let _ = nats.request(subject, ask.into()).await;
        assert_eventually!(
            Duration::from_secs(5),
            {
                let now = stream_leader(nats).await;
                !now.is_empty() && now != leader
            },
            "CHAT stream leader {leader} did not step down"
        );
    }
}

/// What a reader saw.
#[derive(Default)]
struct Seen {
    joined: bool,
    /// seq → id, for every distinct seq.
    ids: HashMap<u64, String>,
    /// Distinct seqs in the order they first arrived.
    first_seen: Vec<u64>,
    /// Seqs that arrived again (a client drops them).
    repeats: usize,
    rejoins: usize,
}

/// Joins the room on a fresh connection, retrying while the gateway answers
/// `unavailable` or the socket closes.
async fn join_room(addr: SocketAddr, user: &str, since: Option<u64>) -> Client {
    let until = Instant::now() + REJOIN_WITHIN;
    'connect: loop {
        assert!(Instant::now() < until, "{user}: could not join {ROOM} (since {since:?})");
        let mut c = Client::connect(addr, user).await;
        loop {
            let mut join = json!({"type": "join", "room": ROOM});
            if let Some(s) = since {
                join["since"] = json!(s);
            }
            if c.send_raw(Message::text(join.to_string())).await.is_err() {
                continue 'connect;
            }
            loop {
                match c.next_within(Duration::from_secs(5)).await {
                    Some(Ok(v)) if v["type"] == "joined" => return c,
                    Some(Ok(v)) if v["type"] == "error" && v["code"] == "unavailable" => break,
                    Some(Ok(v)) if v["type"] == "error" => panic!("{user}: join refused: {v}"),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => continue 'connect,
                }
            }
            assert!(Instant::now() < until, "{user}: could not join {ROOM} (since {since:?})");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Records message frames until stopped; resumes from the last seq seen when
/// the socket closes or the gateway drops the membership.
async fn read_loop(mut c: Client, addr: SocketAddr, user: &str, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    seen.lock().unwrap().joined = true;
    let mut last = 0;
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return,
            f = c.next_within(Duration::from_secs(1)) => f,
        };
        let lost_room = match frame {
            Some(Ok(v)) if v["type"] == "message" && v["room"] == ROOM => {
                let seq = v["seq"].as_u64().unwrap();
                let mut s = seen.lock().unwrap();
                if s.ids.insert(seq, v["id"].as_str().unwrap().to_owned()).is_some() {
                    s.repeats += 1;
                } else {
                    s.first_seen.push(seq);
                }
                last = last.max(seq);
                false
            }
            // A join whose replay failed comes back as an error after `joined`.
            Some(Ok(v)) => v["type"] == "error" && v["ref"] == "join",
            Some(Err(_)) => true,
            None => false,
        };
        if lost_room {
            seen.lock().unwrap().rejoins += 1;
            c = join_room(addr, user, Some(last)).await;
        }
    }
}

struct Sent {
    /// id → seq from its ack (every ack of one id must agree).
    acked: BTreeMap<String, u64>,
    errors: usize,
    resends: usize,
    reconnects: usize,
    slowest_ack: Duration,
}

/// alice sends m0..m{SENDS} every SEND_GAP without waiting for acks; an
/// `unavailable` send is resent with the same id after `retry_after_ms`, and
/// the sends pending on a closed socket are resent on a new one.
async fn send_steadily(addr: SocketAddr, progress: Arc<AtomicUsize>) -> Sent {
    let mut alice = Client::connect(addr, "alice").await;
    let mut sent = Sent { acked: BTreeMap::new(), errors: 0, resends: 0, reconnects: 0, slowest_ack: Duration::ZERO };
    let mut first_sent: HashMap<String, Instant> = HashMap::new();
    let mut pending: HashSet<String> = HashSet::new();
    let mut retry: Vec<(Instant, String)> = Vec::new();
    let until = Instant::now() + SEND_WITHIN;
    let (mut next, mut next_at) = (0, Instant::now());
    while sent.acked.len() < SENDS {
        assert!(Instant::now() < until, "{} of {SENDS} sends acked; unanswered: {pending:?}", sent.acked.len());
        let now = Instant::now();
        let due = retry.iter().position(|(at, _)| *at <= now);
        let to_send = if next < SENDS && now >= next_at {
            let id = format!("m{next}");
            first_sent.insert(id.clone(), now);
            next += 1;
            next_at += SEND_GAP;
            progress.store(next, Ordering::Relaxed);
            Some(id)
        } else if let Some(i) = due {
            sent.resends += 1;
            Some(retry.swap_remove(i).1)
        } else {
            None
        };
        if let Some(id) = to_send {
            let body = id.trim_start_matches('m').to_owned();
            let frame = json!({"type": "send", "room": ROOM, "id": id, "body": body});
            if alice.send_raw(Message::text(frame.to_string())).await.is_err() {
                retry.push((now, id));
            } else {
                pending.insert(id);
            }
            continue;
        }
        let mut wake = now + Duration::from_millis(100);
        if next < SENDS {
            wake = wake.min(next_at);
        }
        if let Some(at) = retry.iter().map(|(at, _)| *at).min() {
            wake = wake.min(at);
        }
        match alice.next_within(wake.saturating_duration_since(now)).await {
            Some(Ok(v)) if v["type"] == "ack" => {
                let id = v["id"].as_str().unwrap().to_owned();
                let seq = v["seq"].as_u64().unwrap();
                sent.slowest_ack = sent.slowest_ack.max(first_sent[&id].elapsed());
                pending.remove(&id);
                if let Some(before) = sent.acked.insert(id.clone(), seq) {
                    assert_eq!(before, seq, "{id} acked with two different seqs");
                }
            }
            Some(Ok(v)) if v["type"] == "error" => {
                assert_eq!(v["code"], "unavailable", "send refused: {v}");
                let id = v["ref"].as_str().unwrap().to_owned();
                sent.errors += 1;
                pending.remove(&id);
                if !sent.acked.contains_key(&id) {
                    let after = Duration::from_millis(v["retry_after_ms"].as_u64().unwrap_or(1000));
                    retry.push((Instant::now() + after, id));
                }
            }
            Some(Ok(_)) | None => {}
            Some(Err(_)) => {
                sent.reconnects += 1;
                alice = Client::connect(addr, "alice").await;
                retry.extend(pending.drain().map(|id| (Instant::now(), id)));
            }
        }
    }
    sent
}

/// The room's whole history, paged newest first with `before`: seq → id.
async fn history(base: &str) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    let mut before = u64::MAX;
    loop {
        let r = http()
            .get(format!("{base}/v1/rooms/{ROOM}/messages?limit=200&before={before}"))
            .bearer_auth(token("bob"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let page: Value = r.json().await.unwrap();
        let msgs = page["messages"].as_array().unwrap();
        let Some(oldest) = msgs.last().map(|m| m["seq"].as_u64().unwrap()) else { break };
        assert!(oldest < before, "history paging does not move back: before={before}, page ends at {oldest}");
        for m in msgs {
            let seq = m["seq"].as_u64().unwrap();
            let id = m["id"].as_str().unwrap().to_owned();
            assert!(out.insert(seq, id).is_none(), "seq {seq} on two history pages");
        }
        before = oldest;
    }
    out
}

fn missing(want: &HashSet<u64>, have: &HashMap<u64, String>) -> Vec<u64> {
    let mut m: Vec<u64> = want.iter().filter(|s| !have.contains_key(s)).copied().collect();
    m.sort_unstable();
    m
}
