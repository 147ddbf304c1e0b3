//! A NATS cluster per test: n nats-servers with JetStream, routed to each
//! other, each on free ports with its own config and store dir; `kill9` and
//! `restart` one node; every node killed on Drop.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{free_port, nats::nats_bin};

/// The whole cluster must be up (every node listening and reporting a
/// JetStream meta leader) within this.
const STARTUP: Duration = Duration::from_secs(20);

const CLUSTER_NAME: &str = "natter-test";

struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
}

impl NatsCluster {
    /// Starts `n` routed nodes and waits until JetStream has a meta leader
    /// on every one of them.
    pub fn start(n: usize) -> Self {
        assert!(n >= 1, "a cluster needs at least one node");
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| Node {
                name: format!("n{i}"),
                port: free_port(),
                cluster_port: free_port(),
                monitor_port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
            })
            .collect();
        let routes: Vec<String> = nodes.iter().map(|n| format!("nats-route://127.0.0.1:{}", n.cluster_port)).collect();
        for node in &nodes {
            std::fs::write(node.config_path(), node.config(&routes)).unwrap();
        }
        for node in &mut nodes {
            node.spawn();
        }
        let until = Instant::now() + STARTUP;
        for node in &nodes {
            node.wait_ready(until);
        }
        Self { nodes }
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node's URL, comma-separated, in node order.
    pub fn urls(&self) -> String {
        (0..self.nodes.len()).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The `server_name` of node `i` (as JetStream names stream leaders).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// Where node `i` keeps its config, store and `nats.log`.
    pub fn dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.path().to_owned()
    }

    /// kill -9 node `i`, as a crash would.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on the same ports and store, and waits until it
    /// reports healthy (caught up with the cluster).
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill();
        node.spawn();
        node.wait_ready(Instant::now() + STARTUP);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

impl Node {
    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn config(&self, routes: &[String]) -> String {
        let store = self.dir.path().join("js");
        let routes = routes.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ");
        format!(
            "server_name: \"{name}\"\n\
             listen: \"127.0.0.1:{port}\"\n\
             http: \"127.0.0.1:{monitor}\"\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             cluster {{\n  name: \"{CLUSTER_NAME}\"\n  listen: \"127.0.0.1:{cport}\"\n  routes: [{routes}]\n}}\n",
            name = self.name,
            port = self.port,
            monitor = self.monitor_port,
            store = store.display(),
            cport = self.cluster_port,
        )
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_bin())
            .arg("-c")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits until the node accepts clients and `/healthz` answers 200, which
    /// it does only once JetStream knows its meta leader.
    fn wait_ready(&self, until: Instant) {
        let mut last = String::from("not listening");
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                match self.healthz() {
                    Ok(200) => return,
                    Ok(code) => last = format!("/healthz answered {code}"),
                    Err(e) => last = format!("/healthz: {e}"),
                }
            }
            assert!(
                Instant::now() < until,
                "nats node {} (client port {}) not ready: {last}; see {}",
                self.name,
                self.port,
                self.dir.path().join("nats.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The HTTP status of the monitor's `/healthz`.
    fn healthz(&self) -> std::io::Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor_port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad answer: {answer:?}")))
    }
}
