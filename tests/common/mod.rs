//! Shared harness for the integration tests: a real worker process (the
//! built binary), the real RabbitMQ on 127.0.0.1:5672, a real chromedriver and
//! Chromium, and a local page server on port 0. Every test gets its own queue
//! names and ports, so tests run in parallel.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use browserfleet::task::TaskResult;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Fails early, with the fix, when the browser parts are missing.
pub fn require_browser() {
    for b in ["chromedriver", "chromium"] {
        assert!(
            browserfleet::browser::driver::which(b).is_some(),
            "{b} is not installed: run scripts/setup.sh (apt-get install -y chromium chromium-driver)"
        );
    }
}

/// Private queue names for one test.
#[derive(Clone, Debug)]
pub struct Queues {
    pub tasks: String,
    pub results: String,
    pub dead: String,
}

impl Queues {
    pub fn new(test: &str) -> Self {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = format!("bftest.{test}.{}", &tag[..8]);
        Queues {
            tasks: format!("{base}.tasks"),
            results: format!("{base}.results"),
            dead: format!("{base}.dead"),
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BROWSERFLEET__AMQP__TASK_QUEUE".into(), self.tasks.clone()),
            (
                "BROWSERFLEET__AMQP__RESULT_QUEUE".into(),
                self.results.clone(),
            ),
            (
                "BROWSERFLEET__AMQP__DEAD_LETTER_QUEUE".into(),
                self.dead.clone(),
            ),
        ]
    }

    /// Deletes the test's queues from the broker.
    pub async fn delete(&self, amqp: &Amqp) {
        for q in [&self.tasks, &self.results, &self.dead] {
            let _ = amqp
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A worker process, killed when dropped.
pub struct Worker {
    pub child: Child,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    /// Starts `browserfleet run` on `queues` with extra `env` overrides and
    /// waits until it consumes.
    pub async fn start(queues: &Queues, env: &[(&str, &str)]) -> Worker {
        let w = Self::spawn(queues, env);
        w.wait_ready().await;
        w
    }

    pub fn spawn(queues: &Queues, env: &[(&str, &str)]) -> Worker {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("worker.log");
        let port = free_port();
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_browserfleet"));
        cmd.arg("run")
            .env("BROWSERFLEET__METRICS__LISTEN", metrics.to_string())
            .env("BROWSERFLEET__AMQP__URL", AMQP_URL)
            .env("BROWSERFLEET__LOG__LEVEL", "info,browserfleet=debug")
            .env_remove("RUST_LOG")
            .envs(queues.env())
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        let child = cmd.spawn().expect("spawning the worker binary");
        Worker {
            child,
            metrics,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = reqwest::get(format!("http://{}{path}", self.metrics))
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready within 60 s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (up to 10 s) until a sample has `expected`; returns the last value.
    /// Results can reach the test a moment before the worker counts them.
    pub async fn metric_eventually(&self, sample: &str, expected: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(sample).await;
            if v == expected || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one sample, e.g. `browserfleet_tasks_total{outcome="ok"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self
            .get("/metrics")
            .await
            .expect("metrics endpoint answers");
        sample_value(&text, sample).unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit; returns its exit code. Async, so the
    /// test's own servers keep answering meanwhile.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a sample's value in Prometheus text.
pub fn sample_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Processes (pid, cmdline args) whose ancestry includes `root`.
pub fn descendants(root: i32) -> Vec<(i32, Vec<String>)> {
    let mut parent = HashMap::new();
    let mut cmd = HashMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The field after the parenthesised command name is the state, then ppid.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: i32 = rest
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        parent.insert(pid, ppid);
        let args = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        cmd.insert(
            pid,
            args.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>(),
        );
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        let mut hops = 0;
        while p > 1 && hops < 64 {
            p = *parent.get(&p).unwrap_or(&0);
            if p == root {
                out.push((pid, cmd.remove(&pid).unwrap_or_default()));
                break;
            }
            hops += 1;
        }
    }
    out
}

/// The main browser process of each session under `root`: one per
/// `--user-data-dir` (a browser's forks briefly share its command line, so
/// the process whose parent is not in the same profile is the main one).
pub fn browser_mains(root: i32) -> Vec<i32> {
    let procs = descendants(root);
    let profile = |args: &[String]| {
        args.iter()
            .find(|x| x.starts_with("--user-data-dir="))
            .cloned()
    };
    let by_pid: HashMap<i32, Option<String>> =
        procs.iter().map(|(p, a)| (*p, profile(a))).collect();
    let mut mains: HashMap<String, i32> = HashMap::new();
    for (pid, args) in &procs {
        let Some(dir) = profile(args) else { continue };
        if args.iter().any(|x| x.starts_with("--type=")) {
            continue;
        }
        let parent_same = parent_of(*pid)
            .and_then(|pp| by_pid.get(&pp).cloned().flatten())
            .is_some_and(|d| d == dir);
        if !parent_same {
            mains.insert(dir, *pid);
        }
    }
    mains.into_values().collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every chromedriver/chromium process whose command line mentions `needle`
/// (e.g. a profile dir), anywhere on the machine.
pub fn processes_matching(pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let args: Vec<String> = std::fs::read(e.path().join("cmdline"))
            .unwrap_or_default()
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() && pred(&args) {
            out.push(pid);
        }
    }
    out
}

pub fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A test's own AMQP connection.
pub struct Amqp {
    pub conn: Connection,
    pub channel: Channel,
}

impl Amqp {
    pub async fn connect() -> Amqp {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ must run on 127.0.0.1:5672 (rabbitmq-server -detached)");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Amqp { conn, channel }
    }

    /// Publishes raw bytes to a queue and waits for the confirm.
    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let c = self
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props.with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }

    pub async fn publish_task(&self, queue: &str, task: &Value) {
        self.publish(
            queue,
            task.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await
    }

    /// Collects `n` messages from `queue` (acking them), or panics after `limit`.
    pub async fn take(
        &self,
        queue: &str,
        n: usize,
        limit: Duration,
    ) -> Vec<lapin::message::Delivery> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(d),
                Ok(other) => panic!("consumer on {queue} ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {n} messages arrived on {queue} within {limit:?}",
                    out.len()
                ),
            }
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    /// Collects `n` results from `queue`, keyed by task id.
    pub async fn results(
        &self,
        queue: &str,
        n: usize,
        limit: Duration,
    ) -> HashMap<String, TaskResult> {
        let mut map = HashMap::new();
        for d in self.take(queue, n, limit).await {
            let r: TaskResult = serde_json::from_slice(&d.data).unwrap_or_else(|e| {
                panic!(
                    "result is not a TaskResult ({e}): {}",
                    String::from_utf8_lossy(&d.data)
                )
            });
            assert!(map.insert(r.id.clone(), r).is_none(), "duplicate result");
        }
        map
    }

    /// Messages ready in `queue` now.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .unwrap_or(0)
    }
}

/// A local web server on port 0 serving the test pages.
pub struct Pages {
    pub addr: SocketAddr,
    /// Most `/slow` requests seen at once.
    pub max_concurrent: Arc<AtomicUsize>,
    current: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct PageState {
    current: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

const INDEX: &str = r#"<!doctype html>
<html><head><title>browserfleet test page</title></head>
<body>
  <h1 id="title">Example Domain</h1>
  <ul id="list"><li>alpha</li><li>beta</li><li>gamma</li></ul>
  <a id="more" href="/more" data-kind="link">More information</a>
  <input id="name" type="text" value="">
  <button id="go" onclick="document.getElementById('out').textContent = 'clicked ' + document.getElementById('name').value">Go</button>
  <p id="out">not clicked</p>
  <div id="late-holder"></div>
  <script>
    setTimeout(function () {
      var d = document.createElement('div');
      d.id = 'late'; d.textContent = 'arrived late';
      document.getElementById('late-holder').appendChild(d);
    }, 400);
  </script>
</body></html>"#;

impl Pages {
    pub async fn start() -> Pages {
        let current = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let state = PageState {
            current: current.clone(),
            max: max.clone(),
        };
        let app = Router::new()
            .route("/", get(|| async { Html(INDEX) }))
            .route(
                "/slow",
                get(|State(s): State<PageState>, Query(q): Query<HashMap<String, String>>| async move {
                    let now = s.current.fetch_add(1, Ordering::SeqCst) + 1;
                    s.max.fetch_max(now, Ordering::SeqCst);
                    let ms: u64 = q.get("ms").and_then(|v| v.parse().ok()).unwrap_or(400);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    s.current.fetch_sub(1, Ordering::SeqCst);
                    Html(format!(
                        "<html><body><h1 id=\"title\">slow {}</h1></body></html>",
                        q.get("n").cloned().unwrap_or_default()
                    ))
                }),
            )
            .route(
                "/hang",
                // Never answers: the page load never ends, so the browser hangs
                // in `goto` until the task's deadline.
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Html("never")
                }),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Pages {
            addr,
            max_concurrent: max,
            current,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// A page server like [`Pages`] whose `/slow?ms=N` page counts every request
/// it receives. The count only grows (the in-flight count behind
/// `Pages::max_concurrent` can stay up when a browser is killed mid-request),
/// so a test can wait until a browser is inside a page load, then kill it.
pub struct CountingPages {
    pub addr: SocketAddr,
    /// `/slow` requests received so far.
    pub slow_requests: Arc<AtomicUsize>,
}

impl CountingPages {
    pub async fn start() -> CountingPages {
        let slow_requests = Arc::new(AtomicUsize::new(0));
        let count = slow_requests.clone();
        let app = Router::new()
            .route("/", get(|| async { Html(INDEX) }))
            .route(
                "/slow",
                get(move |Query(q): Query<HashMap<String, String>>| async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let ms: u64 = q.get("ms").and_then(|v| v.parse().ok()).unwrap_or(400);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Html(format!(
                        "<html><body><h1 id=\"title\">slow {}</h1></body></html>",
                        q.get("n").cloned().unwrap_or_default()
                    ))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        CountingPages {
            addr,
            slow_requests,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (up to `limit`) until `/slow` has received `n` requests in all.
    pub async fn wait_slow_requests(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.slow_requests.load(Ordering::SeqCst) < n {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}
