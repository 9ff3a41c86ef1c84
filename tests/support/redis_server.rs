//! A real `redis-server` on a loopback port, persistence off, in a temporary directory,
//! killed on drop. Redis has no `--port 0`: a free port is found by binding and releasing
//! it, and the start is retried on another port if something took it meanwhile.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the tests find the server (`.ci/run` installs it from the system packages).
pub const REDIS_SERVER: &str = "redis-server";

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = spawn(port, dir.path()) {
                return RedisServer {
                    port,
                    child: Some(child),
                    dir,
                };
            }
        }
        panic!("redis-server did not start on any of 10 free ports");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again, empty, on the same port (retried while the port is still taken).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(child) = spawn(self.port, self.dir.path()) {
                self.child = Some(child);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not start again on port {}", self.port);
    }

    /// `DBSIZE`: keys held right now.
    pub fn keys(&self) -> i64 {
        let mut con = connect(self.port).expect("redis answers");
        redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE")
    }

    /// `PTTL` of every key (milliseconds).
    pub fn ttls(&self) -> Vec<i64> {
        let mut con = connect(self.port).expect("redis answers");
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).expect("KEYS");
        keys.iter()
            .map(|k| redis::cmd("PTTL").arg(k).query(&mut con).expect("PTTL"))
            .collect()
    }

    /// Every key's name.
    pub fn key_names(&self) -> Vec<String> {
        let mut con = connect(self.port).expect("redis answers");
        redis::cmd("KEYS").arg("*").query(&mut con).expect("KEYS")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free right now, below the kernel's ephemeral range when it can be: a killed
/// server is restarted on the same port later, and a port in the ephemeral range may be
/// handed to another test's socket meanwhile.
fn free_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    // Above the benchmark scripts' fixed ports (18000-19999).
    if low > 21_000 {
        let span = u32::from(low - 20_000);
        for _ in 0..50 {
            let port = 20_000 + (rand::random::<u32>() % span) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Starts `redis-server` on `port`; `None` when it exits (port taken) or never answers.
fn spawn(port: u16, dir: &std::path::Path) -> Option<Child> {
    let mut child = Command::new(REDIS_SERVER)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server runs (install the redis-server package)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if let Ok(mut con) = connect(port) {
            // The server answering must be this child, not one a parallel test started on
            // the same port a moment earlier.
            if let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(&mut con) {
                let ours = format!("process_id:{}", child.id());
                if info.lines().any(|l| l.trim() == ours) {
                    return Some(child);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn connect(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_millis(500))
}
