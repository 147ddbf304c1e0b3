//! `bench idle`: N authenticated connections spread over the gateways, each
//! joined to one room (rooms of `--room-size` members, presence on as for any
//! connection), then held without traffic. Figures: connect rate, gateway RSS
//! growth per connection and gateway CPU per idle connection, from /proc.

use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use rand::{
    SeedableRng,
    rngs::StdRng,
    seq::{IndexedRandom, SliceRandom},
};
use serde_json::{Value, json};

use super::{Ws, connect, create_rooms, extend, join, presence_sub, procstat::Servers, round, run_id};
use crate::auth::Signer;

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections in all.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Members per room; every connection joins its rooms.
    #[arg(long, default_value_t = 10)]
    pub room_size: usize,
    /// Rooms each connection is a member of and joins. The first groups the
    /// users in order; the members of each further one are drawn at random,
    /// as a user's direct chats are (so a room's members are on any gateway).
    #[arg(long, default_value_t = 1)]
    pub rooms_per_connection: usize,
    /// Users each connection watches with `presence_sub` (drawn at random
    /// from all the run's users, as a contact list), after joining.
    #[arg(long, default_value_t = 0)]
    pub watches: usize,
    /// How long the connections are held idle (measured).
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub hold: Duration,
    /// Connection handshakes in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

pub async fn run(gateways: &[String], signer: &Signer, servers: &Servers, a: IdleArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(servers.gateways() > 0, "bench idle needs --gateway-pids to measure the gateways");
    let id = run_id();
    let size = a.room_size.max(1);
    let users: Vec<String> = (0..a.connections).map(|i| format!("i{id}-{i}")).collect();
    let mut rooms: Vec<(String, Vec<String>)> = Vec::new();
    // The rooms of each connection, as indexes into `rooms`.
    let mut rooms_of: Vec<Vec<usize>> = vec![Vec::new(); users.len()];
    let mut order: Vec<usize> = (0..users.len()).collect();
    for layer in 0..a.rooms_per_connection.max(1) {
        if layer > 0 {
            order.shuffle(&mut StdRng::seed_from_u64(layer as u64));
        }
        for chunk in order.chunks(size) {
            for &u in chunk {
                rooms_of[u].push(rooms.len());
            }
            let members = chunk.iter().map(|&u| users[u].clone()).collect();
            rooms.push((format!("i{id}-{layer}-{}", rooms.len()), members));
        }
    }
    create_rooms(gateways, signer, &rooms, 16).await?;

    let baseline = servers.snapshot();
    // Authenticated connections: connect + hello + welcome.
    let t = Instant::now();
    // Each handshake is a task of its own, so the load generator's side of
    // them runs on every core (in one task, it bounded the rate it measured).
    // buffer_unordered answers in completion order: each result carries its index.
    let conns: Vec<(usize, anyhow::Result<Ws>)> = futures::stream::iter(users.iter().enumerate())
        .map(|(i, u)| {
            let (gateway, signer, user) = (gateways[i % gateways.len()].clone(), signer.clone(), u.clone());
            let handshake = tokio::spawn(async move { connect(&gateway, &signer, &user).await });
            async move { (i, handshake.await.map_err(anyhow::Error::from).and_then(|c| c)) }
        })
        .buffer_unordered(a.concurrency.max(1))
        .collect()
        .await;
    let connect_s = t.elapsed().as_secs_f64();
    let failed = conns.iter().filter(|(_, c)| c.is_err()).count();
    if let Some((_, Err(e))) = conns.iter().find(|(_, c)| c.is_err()) {
        eprintln!("bench idle: first failed connection: {e:#}");
    }
    let mut conns: Vec<(usize, Ws)> = conns.into_iter().filter_map(|(i, c)| c.ok().map(|ws| (i, ws))).collect();

    let t = Instant::now();
    let joined: Vec<anyhow::Result<(usize, Ws)>> = futures::stream::iter(conns.drain(..))
        .map(|(i, mut ws)| {
            let (rooms, mine, users) = (&rooms, &rooms_of[i], &users);
            async move {
                for &r in mine {
                    join(&mut ws, &rooms[r].0, None).await?;
                }
                if a.watches > 0 {
                    let contacts: Vec<String> =
                        users.choose_multiple(&mut StdRng::seed_from_u64(i as u64), a.watches).cloned().collect();
                    presence_sub(&mut ws, &contacts).await?;
                }
                anyhow::Ok((i, ws))
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .collect()
        .await;
    let join_s = t.elapsed().as_secs_f64();
    let join_failed = joined.iter().filter(|c| c.is_err()).count();
    if let Some(Err(e)) = joined.iter().find(|c| c.is_err()) {
        eprintln!("bench idle: first failed join: {e:#}");
    }
    // Keep reading every socket, so pings are answered, as a client would.
    let holders: Vec<_> = joined
        .into_iter()
        .filter_map(Result::ok)
        .map(|(_, mut ws)| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();
    let held = holders.len();

    // Let the connect burst's allocations settle, then measure the hold.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = servers.snapshot();
    tokio::time::sleep(a.hold).await;
    let end = servers.snapshot();
    let still_open = holders.iter().filter(|h| !h.is_finished()).count();
    for h in &holders {
        h.abort();
    }

    let rss_growth = servers.gateway_rss_kib(&end).saturating_sub(servers.gateway_rss_kib(&baseline));
    let (idle_gw_cpu, idle_other_cpu) = servers.cpu_between(&start, &end);
    let (connect_gw_cpu, _) = servers.cpu_between(&baseline, &start);
    let hold_s = a.hold.as_secs_f64();
    let ok = a.connections - failed;
    let mut out = json!({
        "scenario": "idle",
        "connections": a.connections,
        "rooms": rooms.len(),
        "rooms_per_connection": a.rooms_per_connection.max(1),
        "watches_per_connection": a.watches,
        "room_size": size,
        "gateways": gateways.len(),
        "connected": ok,
        "failed_handshakes": failed,
        "join_failed": join_failed,
        "held": held,
        "still_open_after_hold": still_open,
        "connect_s": round(connect_s),
        "connects_per_s": round(ok as f64 / connect_s),
        "connects_per_s_per_gateway": round(ok as f64 / connect_s / gateways.len() as f64),
        "join_s": round(join_s),
        "gateway_cpu_s_connect_and_join": round(connect_gw_cpu),
        "gateway_rss_growth_mib": round(rss_growth as f64 / 1024.0),
        "gateway_rss_kib_per_conn": round(rss_growth as f64 / held.max(1) as f64),
        "hold_s": hold_s,
        "gateway_idle_cpu_s": round(idle_gw_cpu),
        "other_servers_idle_cpu_s": round(idle_other_cpu),
        "gateway_idle_cpu_us_per_conn_per_s": round(idle_gw_cpu * 1e6 / hold_s / held.max(1) as f64),
    });
    extend(&mut out, json!({"hold": servers.report(&start, &end)}));
    Ok(out)
}
