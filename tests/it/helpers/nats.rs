//! A nats-server (≥ 2.11, from the pinned PyPI wheel) per test, on a free
//! port with its own store dir; killed and cleaned up on Drop.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

/// The gateway's NATS settings for a test server at `url`: one replica, a
/// short stream age.
pub fn nats_settings(url: String) -> natter::config::NatsSettings {
    natter::config::NatsSettings {
        nats_url: url,
        nats_user: None,
        nats_password: None,
        stream_replicas: 1,
        stream_max_age: Duration::from_secs(3600),
        stream_max_per_room: 100,
        stream_hard_max_per_room: 1000,
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on 127.0.0.1:`port` (a server a test
/// started), failing the test after `within`.
pub fn wait_listening(port: u16, within: Duration, what: &str) {
    let _never_exits = wait_listening_while(port, within, what, || None);
}

/// [`wait_listening`], but `Err` with the exit status as soon as `exited`
/// says the server has ended (a config it refused, say).
fn wait_listening_while(
    port: u16,
    within: Duration,
    what: &str,
    mut exited: impl FnMut() -> Option<ExitStatus>,
) -> Result<(), ExitStatus> {
    let until = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = exited() {
            return Err(status);
        }
        assert!(Instant::now() < until, "{what} did not listen on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A server process a test started: killed and reaped on Drop.
pub struct Spawned(pub Child);

impl Spawned {
    /// Waits until it listens on 127.0.0.1:`port`; `Err` with its exit
    /// status if it ended first.
    pub fn listening(&mut self, port: u16, within: Duration, what: &str) -> Result<(), ExitStatus> {
        wait_listening_while(port, within, what, || self.0.try_wait().unwrap())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// NATTER_TEST_NATS_SERVER, else the pinned binary from scripts/setup.
pub(crate) fn nats_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATTER_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/venv/bin/nats-server");
    assert!(local.exists(), "nats-server not found: run scripts/setup (or set NATTER_TEST_NATS_SERVER)");
    local
}

pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    args: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-js".into(),
            "-sd".into(),
            dir.path().join("js").display().to_string(),
        ];
        let mut s = Self { child: None, port, dir, args };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("nats.log")).unwrap();
        let child = Command::new(nats_bin())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        wait_listening(self.port, Duration::from_secs(10), "nats-server");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts it again on the same port with JetStream off: core NATS
    /// works, and every JetStream request has no responder.
    pub fn restart_without_jetstream(&mut self) {
        self.kill();
        let args = std::mem::take(&mut self.args);
        self.args = args.iter().filter(|a| *a != "-js").take(4).cloned().collect(); // -a <host> -p <port>
        self.spawn();
        self.args = args;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
