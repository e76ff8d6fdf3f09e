//! The browserfleet benchmark harness (see BENCHMARKS.md for numbers).
//!
//! ```sh
//! cargo build --release && cargo run --release --example bench            # full run, ~15 min
//! cargo build && cargo run --example bench -- --quick                      # CI smoke, ~20 s
//! ```
//!
//! It measures, side by side in one run, against the real RabbitMQ on
//! 127.0.0.1:5672 and the real worker binary (`browserfleet run`, found next
//! to this example's `examples/` directory, i.e. `target/<profile>/browserfleet`):
//!
//! 1. throughput of the fleet (worker + RabbitMQ + Chromium) against a raw
//!    fantoccini loop with as many sessions, rounds alternating (fleet, raw,
//!    raw + the health check's current_url), reported as fleet/raw;
//! 2. the worker process's own CPU time per task (utime+stime from
//!    /proc/PID/stat, children excluded) and its peak RSS (VmHWM);
//! 3. recovery: browsers SIGKILLed at random under load, kill → result of the
//!    affected task, against the worker's session-create time; no task lost;
//! 4. the dispatch ceiling: the worker against an instant WebDriver served by
//!    this process (a measuring device), i.e. worker + broker cost alone;
//! 5. throughput against pool size, with machine CPU use.
//!
//! It prints one table per section and a summary of the targets. It exits
//! non-zero only when the harness fails or a task is lost, never on a timing:
//! a benchmark is not a timed test.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::http::header::CONTENT_TYPE;
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};
use axum::Router;
use clap::Parser;
use fantoccini::{ClientBuilder, Locator};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TITLE: &str = "Example Domain";
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>browserfleet bench page</title></head>
<body>
  <h1 id="title">Example Domain</h1>
  <p>This domain is for use in illustrative examples in documents.</p>
  <ul id="list"><li>alpha</li><li>beta</li><li>gamma</li></ul>
  <a id="more" href="/more">More information</a>
</body></html>"#;

#[derive(Parser, Debug, Clone)]
#[command(
    about = "browserfleet benchmark harness: throughput, overhead, recovery, dispatch ceiling, scaling"
)]
struct Args {
    /// Tiny counts, pool 1, seconds not minutes: a smoke run for CI.
    #[arg(long)]
    quick: bool,
    /// Tasks per measured round (sections 1, 2, 5).
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Rounds of each variant (fleet, raw, raw + current_url) per pool size,
    /// alternating.
    #[arg(long, default_value_t = 3)]
    pairs: usize,
    /// Pool sizes for sections 1, 2 and 5 (comma-separated).
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pools: Vec<usize>,
    /// Browser kills in section 3.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Pool sizes of the workers in section 3 (comma-separated): 1 is the
    /// worst case (no other session to run the retried task).
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    recovery_pools: Vec<usize>,
    /// Runs of each dispatch configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    dispatch_reps: usize,
    /// Tasks per dispatch-ceiling run (section 4).
    #[arg(long, default_value_t = 20_000)]
    dispatch_tasks: usize,
    /// Pool sizes (= prefetch) of the dispatch-ceiling runs, on quorum queues
    /// (the default queue type).
    #[arg(long, default_value = "8,16,32", value_delimiter = ',')]
    dispatch_pools: Vec<usize>,
    /// Extra dispatch runs on classic queues, to show the broker's share
    /// (0: none).
    #[arg(long, default_value = "32", value_delimiter = ',')]
    dispatch_classic_pools: Vec<usize>,
    /// Sections to run: any of throughput (1, 2, 5), recovery (3), dispatch (4).
    #[arg(
        long,
        default_value = "throughput,recovery,dispatch",
        value_delimiter = ','
    )]
    only: Vec<String>,
    /// The worker binary; default: `browserfleet` in the same target profile
    /// directory as this example.
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Record a `perf record -e cpu-clock -g` profile of the worker during
    /// each dispatch run into this directory.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Keep the worker logs in this directory (default: a temp dir, removed).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Steps of a dispatch task: `title` (goto + text, as in sections 1-3)
    /// or `none` (an empty task: broker, JSON and checkout cost only).
    #[arg(long, default_value = "title")]
    dispatch_steps: String,
    /// Skip the third variant of section 1 (raw loop plus a `current_url`
    /// round-trip before each task, as the worker's health check does).
    #[arg(long)]
    no_raw_check: bool,
    /// Extra environment for every worker, KEY=VALUE (repeatable), e.g.
    /// BROWSERFLEET__LOG__LEVEL=warn to price the per-task log lines.
    #[arg(long = "worker-env", value_parser = parse_kv)]
    worker_env: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))
}

impl Args {
    fn apply_quick(&mut self) {
        if self.quick {
            self.tasks = self.tasks.min(10);
            self.pairs = 1;
            self.pools = vec![1];
            self.kills = self.kills.min(1);
            self.recovery_pools = vec![1];
            self.dispatch_reps = 1;
            self.dispatch_tasks = self.dispatch_tasks.min(500);
            self.dispatch_pools = vec![4];
            self.dispatch_classic_pools = vec![];
            self.no_raw_check = true;
        }
    }
    fn runs(&self, section: &str) -> bool {
        self.only.iter().any(|s| s == section)
    }
}

// ---------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all its threads, children excluded), in ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    cpu_ticks_at(&format!("/proc/{pid}/stat"))
}

/// utime + stime from a /proc stat file (a process's or a thread's).
fn cpu_ticks_at(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// A /proc/PID/status field in kB (VmHWM: peak RSS, VmRSS: current).
fn status_kb(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Context switches (voluntary + involuntary) of all live threads of `pid`.
fn context_switches(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Whole-machine CPU (busy, total) jiffies from /proc/stat.
fn machine_cpu() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Machine CPU use between two readings, in cores (0..=ncpu).
fn cores_used(a: (u64, u64), b: (u64, u64), ncpu: f64) -> f64 {
    let total = (b.1 - a.1) as f64;
    if total == 0.0 {
        0.0
    } else {
        (b.0 - a.0) as f64 / total * ncpu
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
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

/// The RabbitMQ node's Erlang VM, for its CPU time.
fn rabbit_pid() -> Option<i32> {
    all_pids().into_iter().find(|&p| {
        let c = cmdline(p);
        c.first().is_some_and(|a| a.ends_with("beam.smp")) && c.iter().any(|a| a == "rabbit")
    })
}

/// Processes whose ancestry includes `root`, with their command lines.
fn descendants(root: i32) -> Vec<(i32, Vec<String>)> {
    let pids = all_pids();
    let parent: HashMap<i32, i32> = pids
        .iter()
        .filter_map(|&p| Some((p, parent_of(p)?)))
        .collect();
    pids.into_iter()
        .filter(|&p| {
            let mut q = p;
            for _ in 0..64 {
                match parent.get(&q) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => q = pp,
                    _ => return false,
                }
            }
            false
        })
        .map(|p| (p, cmdline(p)))
        .collect()
}

/// The main browser process of each session under `root`: has
/// `--user-data-dir=`, no `--type=`, and a parent outside that profile.
fn browser_mains(root: i32) -> Vec<i32> {
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
    let mut v: Vec<i32> = mains.into_values().collect();
    v.sort_unstable();
    v
}

fn kill(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// SIGKILLs every process with `arg` in its command line.
fn kill_with_arg(arg: &str) {
    for p in all_pids() {
        if cmdline(p).iter().any(|a| a == arg) {
            kill(p, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A small xorshift generator: random kill times and victims, no extra crate.
struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t ^ ((std::process::id() as u64) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = (hi - lo).as_micros().max(1) as u64;
        lo + Duration::from_micros(self.next() % span)
    }
}

fn free_port() -> u16 {
    browserfleet::browser::driver::free_port().expect("a free loopback port")
}

use browserfleet::browser::driver::which;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// Broker side: queues, publishing, collecting results
// ---------------------------------------------------------------------------

/// Private queue names for one measurement.
struct Queues {
    tasks: String,
    results: String,
    dead: String,
    queue_type: &'static str,
}

impl Queues {
    fn new(what: &str, queue_type: &'static str) -> Queues {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = format!("bfbench.{what}.{}", &tag[..8]);
        Queues {
            tasks: format!("{base}.tasks"),
            results: format!("{base}.results"),
            dead: format!("{base}.dead"),
            queue_type,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BROWSERFLEET__AMQP__URL".into(), AMQP_URL.into()),
            ("BROWSERFLEET__AMQP__TASK_QUEUE".into(), self.tasks.clone()),
            (
                "BROWSERFLEET__AMQP__RESULT_QUEUE".into(),
                self.results.clone(),
            ),
            (
                "BROWSERFLEET__AMQP__DEAD_LETTER_QUEUE".into(),
                self.dead.clone(),
            ),
            (
                "BROWSERFLEET__AMQP__QUEUE_TYPE".into(),
                self.queue_type.into(),
            ),
        ]
    }

    /// Declares the queues exactly as the worker will (same code, same
    /// arguments), so tasks can be queued before the worker starts.
    async fn declare(&self) -> Result<()> {
        let settings = browserfleet::config::Settings::load_from(None, self.env())
            .map_err(|e| anyhow!("{e}"))?;
        let broker = browserfleet::broker::Broker::connect(&settings.amqp, 1)
            .await
            .map_err(|e| anyhow!("{e}"))
            .context("RabbitMQ must run on 127.0.0.1:5672 (guest/guest)")?;
        broker
            .declare_topology(&settings.amqp)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        let _ = broker.connection.close(200, "declared".into()).await;
        Ok(())
    }

    async fn delete(&self, amqp: &Amqp) {
        for q in [&self.tasks, &self.results, &self.dead] {
            let _ = amqp
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// The bench's own connection, with a confirming channel for publishing.
struct Amqp {
    conn: Connection,
    channel: Channel,
}

#[derive(Deserialize)]
struct ResultMsg {
    id: String,
    status: String,
    #[serde(default)]
    attempts: u32,
}

/// One result, when it reached the bench.
struct Got {
    at: Instant,
    id: String,
    status: String,
    attempts: u32,
}

fn task_body(id: &str, url: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "steps": [
            {"action": "goto", "url": url},
            {"action": "text", "selector": "#title", "as": "title"},
        ],
    }))
    .expect("JSON")
}

impl Amqp {
    async fn connect() -> Result<Amqp> {
        let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .context("RabbitMQ must run on 127.0.0.1:5672 (guest/guest)")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Amqp { conn, channel })
    }

    /// Publishes persistent messages in pipelined batches, waiting for the
    /// confirms of each batch before the next.
    async fn publish_all(&self, queue: &str, bodies: Vec<Vec<u8>>, batch: usize) -> Result<()> {
        for chunk in bodies.chunks(batch.max(1)) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for body in chunk {
                confirms.push(
                    self.channel
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            body,
                            BasicProperties::default().with_delivery_mode(2),
                        )
                        .await?,
                );
            }
            for c in confirms {
                if !c.await?.is_ack() {
                    bail!("the broker nacked a task publish");
                }
            }
        }
        Ok(())
    }

    /// Consumes `queue` (auto-ack) into a channel of results.
    async fn results(&self, queue: &str) -> Result<mpsc::UnboundedReceiver<Got>> {
        let ch = self.conn.create_channel().await?;
        ch.basic_qos(2000, BasicQosOptions::default()).await?;
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
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _ch = ch;
            while let Some(Ok(d)) = consumer.next().await {
                let at = Instant::now();
                let got = match serde_json::from_slice::<ResultMsg>(&d.data) {
                    Ok(r) => Got {
                        at,
                        id: r.id,
                        status: r.status,
                        attempts: r.attempts,
                    },
                    Err(_) => Got {
                        at,
                        id: String::new(),
                        status: "unparseable".into(),
                        attempts: 0,
                    },
                };
                if tx.send(got).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    /// Messages ready in `queue` now.
    async fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
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

/// Waits for `n` results whose id starts with `prefix`; others are dropped.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    prefix: &str,
    n: usize,
    limit: Duration,
) -> Result<Vec<Got>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(g)) if g.id.starts_with(prefix) => out.push(g),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the result consumer ended"),
            Err(_) => bail!(
                "only {} of {n} results for `{prefix}` within {limit:?}",
                out.len()
            ),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The worker process
// ---------------------------------------------------------------------------

struct Worker {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
    http: reqwest::Client,
    _dir: Option<tempfile::TempDir>,
}

impl Worker {
    fn spawn(args: &Args, bin: &Path, queues: &Queues, extra: &[(&str, String)]) -> Result<Worker> {
        let logs = args.keep_logs.as_deref();
        let (dir, log) = match logs {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.join(format!("{}.log", queues.tasks)))
            }
            None => {
                let d = tempfile::tempdir()?;
                let log = d.path().join("worker.log");
                (Some(d), log)
            }
        };
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("run")
            .env_remove("RUST_LOG")
            .envs(queues.env())
            .env("BROWSERFLEET__METRICS__LISTEN", metrics.to_string())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .envs(args.worker_env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Worker {
            child,
            metrics,
            log,
            http: reqwest::Client::new(),
            _dir: dir,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let r = self
            .http
            .get(format!("http://{}{path}", self.metrics))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.text().await.ok()?))
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((200, _)) = self.get("/readyz").await {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "the worker exited ({st}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!("the worker was not ready within 60 s:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (sum, count) of a histogram on /metrics.
    async fn histogram(&self, name: &str) -> (f64, f64) {
        let text = self
            .get("/metrics")
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        let value = |suffix: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("{name}_{suffix}"))?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0)
        };
        (value("sum"), value("count"))
    }

    fn cpu_ticks(&self) -> u64 {
        cpu_ticks(self.pid()).unwrap_or(0)
    }

    fn switches(&self) -> u64 {
        context_switches(self.pid())
    }

    fn peak_rss_mb(&self) -> f64 {
        status_kb(self.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0
    }

    /// SIGTERM, then SIGKILL if it has not exited in 20 s.
    async fn stop(mut self) {
        kill(self.pid(), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  (worker did not stop within 20 s of SIGTERM; killing it)");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The local page server and the raw fantoccini loop
// ---------------------------------------------------------------------------

/// Serves the page on a thread of its own, so that its CPU time can be told
/// apart from the raw loop's (both run in this process). Returns the page URL
/// and the thread's id.
fn start_pages() -> Result<(String, i32)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pages".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("page server runtime");
            rt.block_on(async move {
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse::<i32>().ok())
                    .unwrap_or(0);
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let addr = listener.local_addr().expect("bound address");
                let _ = tx.send(Ok((addr, tid)));
                let app = Router::new().route("/page", get(|| async { Html(PAGE) }));
                let _ = axum::serve(listener, app).await;
            });
        })?;
    let (addr, tid) = rx.recv()??;
    Ok((format!("http://{addr}/page"), tid))
}

/// CPU ticks of one thread of this process.
fn thread_ticks(tid: i32) -> u64 {
    cpu_ticks_at(&format!("/proc/self/task/{tid}/stat")).unwrap_or(0)
}

/// CPU ticks of the threads of `pid` whose name is `comm`.
fn threads_named(pid: i32, comm: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter_map(|t| cpu_ticks_at(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// N chromedriver sessions driven directly: the limit the fleet is held to.
struct Raw {
    driver: tokio::process::Child,
    clients: Vec<fantoccini::Client>,
    profiles: Vec<tempfile::TempDir>,
    create_secs: Vec<f64>,
}

impl Raw {
    /// Spawns chromedriver and opens `n` sessions with the worker's own
    /// Chromium flags (config/default.toml) and a profile directory each.
    async fn start(n: usize) -> Result<Raw> {
        let settings =
            browserfleet::config::Settings::load_from(None, Vec::<(String, String)>::new())
                .map_err(|e| anyhow!("{e}"))?;
        let chromedriver = which(&settings.webdriver.chromedriver).ok_or_else(|| {
            anyhow!("chromedriver is not installed (apt-get install -y chromium chromium-driver)")
        })?;
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .find_map(|b| which(b))
            .ok_or_else(|| anyhow!("chromium is not installed"))?;
        let port = free_port();
        let mut cmd = tokio::process::Command::new(chromedriver);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let driver = cmd.spawn().context("spawning chromedriver")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("chromedriver did not listen within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let mut raw = Raw {
            driver,
            clients: vec![],
            profiles: vec![],
            create_secs: vec![],
        };
        for _ in 0..n {
            let profile = tempfile::Builder::new()
                .prefix("browserfleet-bench-")
                .tempdir()?;
            let mut args = settings.webdriver.args.clone();
            args.push(format!("--user-data-dir={}", profile.path().display()));
            let mut chrome = Map::new();
            chrome.insert("args".into(), json!(args));
            chrome.insert("binary".into(), json!(chromium.display().to_string()));
            let mut caps = Map::new();
            caps.insert("browserName".into(), json!("chrome"));
            caps.insert("goog:chromeOptions".into(), Value::Object(chrome));
            let mut b = ClientBuilder::rustls().map_err(|e| anyhow!("TLS setup: {e}"))?;
            b.capabilities(caps);
            let t = Instant::now();
            let client = b
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
                .map_err(|e| anyhow!("opening a raw session: {e}"))?;
            raw.create_secs.push(t.elapsed().as_secs_f64());
            raw.clients.push(client);
            raw.profiles.push(profile);
        }
        Ok(raw)
    }

    /// `tasks` tasks over all sessions (each session pulls the next task):
    /// goto the page, read `#title`. Returns (elapsed, tasks not ok).
    /// With `check`, each task first does a `current_url` round-trip, as the
    /// worker's pool does on every checkout (the seed's health check).
    async fn run(
        &self,
        tasks: usize,
        url: &str,
        tag: &str,
        check: bool,
    ) -> Result<(Duration, usize)> {
        let next = AtomicUsize::new(0);
        let bad = AtomicUsize::new(0);
        let t0 = Instant::now();
        let loops = self.clients.iter().map(|c| {
            let (next, bad) = (&next, &bad);
            async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= tasks {
                        return Ok::<(), anyhow::Error>(());
                    }
                    if check {
                        c.current_url().await?;
                    }
                    c.goto(&format!("{url}?n={tag}-{i}")).await?;
                    let text = c.find(Locator::Css("#title")).await?.text().await?;
                    if text != TITLE {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        for r in futures_util::future::join_all(loops).await {
            r?;
        }
        Ok((t0.elapsed(), bad.load(Ordering::Relaxed)))
    }

    async fn stop(mut self) {
        for c in self.clients.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
        }
        let _ = self.driver.start_kill();
        let _ = self.driver.wait().await;
        for p in &self.profiles {
            kill_with_arg(&format!("--user-data-dir={}", p.path().display()));
        }
    }
}

impl Drop for Raw {
    /// On an early exit too: no browser outlives the harness.
    fn drop(&mut self) {
        let _ = self.driver.start_kill();
        for p in &self.profiles {
            kill_with_arg(&format!("--user-data-dir={}", p.path().display()));
        }
    }
}

// ---------------------------------------------------------------------------
// The instant WebDriver (section 4)
// ---------------------------------------------------------------------------

#[derive(Default)]
struct DriverCounts {
    sessions: AtomicU64,
    commands: AtomicU64,
}

async fn start_instant_driver() -> Result<(SocketAddr, Arc<DriverCounts>)> {
    const JSON: [(axum::http::HeaderName, &str); 1] = [(CONTENT_TYPE, "application/json")];
    let counts = Arc::new(DriverCounts::default());
    let c = |counts: &Arc<DriverCounts>| counts.clone();
    let (c1, c2, c3, c4, c5, c6) = (
        c(&counts),
        c(&counts),
        c(&counts),
        c(&counts),
        c(&counts),
        c(&counts),
    );
    let app = Router::new()
        .route(
            "/session",
            post(move || async move {
                let n = c1.sessions.fetch_add(1, Ordering::Relaxed);
                (
                    JSON,
                    format!(r#"{{"value":{{"sessionId":"s{n}","capabilities":{{}}}}}}"#),
                )
            }),
        )
        .route(
            "/session/{id}/url",
            get(move || async move {
                c2.commands.fetch_add(1, Ordering::Relaxed);
                (JSON, r#"{"value":"http://127.0.0.1/page"}"#)
            })
            .post(move || async move {
                c3.commands.fetch_add(1, Ordering::Relaxed);
                (JSON, r#"{"value":null}"#)
            }),
        )
        .route(
            "/session/{id}/element",
            post(move || async move {
                c4.commands.fetch_add(1, Ordering::Relaxed);
                (
                    JSON,
                    r#"{"value":{"element-6066-11e4-a52e-4f735466cecf":"e1"}}"#,
                )
            }),
        )
        .route(
            "/session/{id}/element/{eid}/text",
            get(move || async move {
                c5.commands.fetch_add(1, Ordering::Relaxed);
                (JSON, r#"{"value":"Example Domain"}"#)
            }),
        )
        .fallback(move || async move {
            c6.commands.fetch_add(1, Ordering::Relaxed);
            (JSON, r#"{"value":null}"#).into_response()
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, counts))
}

/// `perf record` attached to the worker, with --perf-dir.
struct Perf(Option<Child>);

impl Perf {
    fn start(args: &Args, worker: &Worker, name: &str) -> Result<Perf> {
        let Some(dir) = &args.perf_dir else {
            return Ok(Perf(None));
        };
        std::fs::create_dir_all(dir)?;
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-o"])
            .arg(dir.join(format!("{name}.perf.data")))
            .args(["-p", &worker.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning perf")?;
        Ok(Perf(Some(child)))
    }

    fn stop(mut self) {
        if let Some(mut p) = self.0.take() {
            kill(p.id() as i32, nix::sys::signal::Signal::SIGINT);
            let _ = p.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Clone)]
struct ThroughputRow {
    pool: usize,
    fleet_tps: f64,
    raw_tps: f64,
    fleet_rounds: Vec<f64>,
    raw_rounds: Vec<f64>,
    check_tps: f64,
    check_rounds: Vec<f64>,
    worker_cpu_ms_per_task: f64,
    worker_peak_rss_mb: f64,
    switches_per_task: f64,
    worker_lapin_ms_per_task: f64,
    raw_cpu_ms_per_task: f64,
    fleet_cores: f64,
    raw_cores: f64,
    raw_create_s: f64,
    fleet_create_s: f64,
    not_ok: usize,
}

async fn throughput(
    args: &Args,
    bin: &Path,
    amqp: &Amqp,
    url: &str,
    pages_tid: i32,
    tck: f64,
) -> Result<Vec<ThroughputRow>> {
    let me = std::process::id() as i32;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mut rows = vec![];
    for &n in &args.pools {
        println!("  pool {n}: starting a worker and {n} raw session(s)");
        let q = Queues::new("tput", "quorum");
        q.declare().await?;
        let mut rx = amqp.results(&q.results).await?;
        let mut worker = Worker::spawn(
            args,
            bin,
            &q,
            &[("BROWSERFLEET__POOL__MAX_SIZE", n.to_string())],
        )?;
        worker.wait_ready().await?;
        let raw = Raw::start(n).await?;
        let limit = Duration::from_secs(60 + 3 * args.tasks as u64);
        let mut row = ThroughputRow {
            pool: n,
            raw_create_s: raw.create_secs.iter().sum::<f64>() / raw.create_secs.len() as f64,
            ..Default::default()
        };

        // Warm-up: every session opened and past its first pages.
        let warm = 2 * n;
        let bodies = (0..warm)
            .map(|i| task_body(&format!("warm-{i}"), &format!("{url}?n=warm-{i}")))
            .collect();
        amqp.publish_all(&q.tasks, bodies, 500).await?;
        collect(&mut rx, "warm-", warm, limit).await?;
        raw.run(warm, url, "warm", false).await?;

        let (mut ft, mut rt, mut ct, mut fticks, mut fcores, mut rcores) =
            (0.0, 0.0, 0.0, 0u64, 0.0, 0.0);
        let (mut lticks, mut rticks) = (0u64, 0u64);
        let perf = Perf::start(args, &worker, &format!("throughput-{n}"))?;
        for pair in 0..args.pairs {
            // A: the fleet.
            let tag = format!("p{n}-r{pair}-");
            let bodies = (0..args.tasks)
                .map(|i| task_body(&format!("{tag}{i}"), &format!("{url}?n={tag}{i}")))
                .collect();
            let (c0, m0, x0) = (worker.cpu_ticks(), machine_cpu(), worker.switches());
            let l0 = threads_named(worker.pid(), "lapin-io-loop");
            let t0 = Instant::now();
            amqp.publish_all(&q.tasks, bodies, 500).await?;
            let got = collect(&mut rx, &tag, args.tasks, limit).await?;
            let last = got.iter().map(|g| g.at).max().unwrap_or(t0);
            let el = (last - t0).as_secs_f64();
            let (c1, m1) = (worker.cpu_ticks(), machine_cpu());
            row.switches_per_task +=
                (worker.switches() - x0) as f64 / args.tasks as f64 / args.pairs as f64;
            row.not_ok += got.iter().filter(|g| g.status != "ok").count();
            fticks += c1 - c0;
            lticks += threads_named(worker.pid(), "lapin-io-loop") - l0;
            fcores += cores_used(m0, m1, ncpu);
            ft += el;
            row.fleet_rounds.push(args.tasks as f64 / el);
            // B: the raw loop.
            let (m0, b0, p0) = (
                machine_cpu(),
                cpu_ticks(me).unwrap_or(0),
                thread_ticks(pages_tid),
            );
            let (el, bad) = raw
                .run(args.tasks, url, &format!("raw{pair}"), false)
                .await?;
            rcores += cores_used(m0, machine_cpu(), ncpu);
            // This process minus its page server: the fantoccini loop alone.
            rticks +=
                (cpu_ticks(me).unwrap_or(0) - b0).saturating_sub(thread_ticks(pages_tid) - p0);
            row.not_ok += bad;
            rt += el.as_secs_f64();
            row.raw_rounds.push(args.tasks as f64 / el.as_secs_f64());
            // C: the raw loop with the worker's per-checkout health check.
            if !args.no_raw_check {
                let (el, bad) = raw
                    .run(args.tasks, url, &format!("chk{pair}"), true)
                    .await?;
                row.not_ok += bad;
                ct += el.as_secs_f64();
                row.check_rounds.push(args.tasks as f64 / el.as_secs_f64());
            }
            println!(
                "    round {pair}: fleet {:.2} tasks/s, raw {:.2} tasks/s{}",
                row.fleet_rounds.last().unwrap(),
                row.raw_rounds.last().unwrap(),
                row.check_rounds
                    .last()
                    .map(|c| format!(", raw + current_url {c:.2} tasks/s"))
                    .unwrap_or_default()
            );
        }
        perf.stop();
        let total = (args.tasks * args.pairs) as f64;
        row.fleet_tps = total / ft;
        row.raw_tps = total / rt;
        row.check_tps = if ct > 0.0 { total / ct } else { f64::NAN };
        row.worker_cpu_ms_per_task = fticks as f64 / tck * 1000.0 / total;
        row.worker_lapin_ms_per_task = lticks as f64 / tck * 1000.0 / total;
        row.raw_cpu_ms_per_task = rticks as f64 / tck * 1000.0 / total;
        row.fleet_cores = fcores / args.pairs as f64;
        row.raw_cores = rcores / args.pairs as f64;
        row.worker_peak_rss_mb = worker.peak_rss_mb();
        let (s, c) = worker
            .histogram("browserfleet_session_create_duration_seconds")
            .await;
        row.fleet_create_s = if c > 0.0 { s / c } else { f64::NAN };
        worker.stop().await;
        raw.stop().await;
        q.delete(amqp).await;
        rows.push(row);
    }
    Ok(rows)
}

#[derive(Debug, Default)]
struct RecoveryReport {
    pool: usize,
    kills: usize,
    affected: usize,
    latencies: Vec<f64>,
    idle_kills: usize,
    create_mean_s: f64,
    replace_create_mean_s: f64,
    published: usize,
    results: usize,
    lost: usize,
    duplicates: usize,
    not_ok: usize,
    max_attempts_seen: u32,
    dead_lettered: u32,
    tps: f64,
    /// From the worker log: kill → "Session appears dead", kill → the
    /// replacement session opened.
    detect: Vec<f64>,
    replaced: Vec<f64>,
}

/// Seconds since the Unix epoch, now.
fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Parses the RFC 3339 UTC timestamp that starts a worker log line
/// (`2026-12-03T13:33:10.320949Z ...`) into Unix seconds.
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// For each kill, the delay to the first log line containing `needle` after it.
fn delays_after(log: &str, kills: &[f64], needle: &str) -> Vec<f64> {
    let times: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(log_time)
        .collect();
    kills
        .iter()
        .filter_map(|&k| times.iter().find(|&&t| t >= k - 0.001).map(|t| t - k))
        .collect()
}

async fn recovery(
    args: &Args,
    bin: &Path,
    amqp: &Amqp,
    url: &str,
    n: usize,
) -> Result<RecoveryReport> {
    let q = Queues::new("recovery", "quorum");
    q.declare().await?;
    let mut rx = amqp.results(&q.results).await?;
    let mut worker = Worker::spawn(
        args,
        bin,
        &q,
        &[("BROWSERFLEET__POOL__MAX_SIZE", n.to_string())],
    )?;
    worker.wait_ready().await?;
    let warm = 2 * n;
    let bodies = (0..warm)
        .map(|i| task_body(&format!("warm-{i}"), &format!("{url}?n=warm-{i}")))
        .collect();
    amqp.publish_all(&q.tasks, bodies, 500).await?;
    collect(&mut rx, "warm-", warm, Duration::from_secs(120)).await?;
    let (s0, c0) = worker
        .histogram("browserfleet_session_create_duration_seconds")
        .await;

    let mut rng = Rng::new();
    let mut rep = RecoveryReport {
        pool: n,
        ..Default::default()
    };
    let outstanding_target = 2 * n;
    let mut published = 0usize;
    let mut seen: HashSet<String> = HashSet::new();
    let mut pending: Option<Instant> = None;
    let mut kill_walls: Vec<f64> = vec![];
    let mut next_log_check = Instant::now();
    let mut next_kill =
        Instant::now() + rng.between(Duration::from_millis(500), Duration::from_millis(1500));
    let give_up_after = Duration::from_secs(30);
    let started = Instant::now();
    let hard_limit = Duration::from_secs(120 + 60 * args.kills as u64);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while rep.kills < args.kills || pending.is_some() {
        if started.elapsed() > hard_limit {
            bail!(
                "recovery phase exceeded {hard_limit:?}; worker log:\n{}",
                worker.log_tail()
            );
        }
        while published - seen.len() < outstanding_target {
            let id = format!("rec-{published}");
            amqp.publish_all(&q.tasks, vec![task_body(&id, &format!("{url}?n={id}"))], 1)
                .await?;
            published += 1;
        }
        tokio::select! {
            g = rx.recv() => {
                let g = g.ok_or_else(|| anyhow!("result consumer ended"))?;
                if !g.id.starts_with("rec-") { continue; }
                if !seen.insert(g.id.clone()) { rep.duplicates += 1; }
                rep.max_attempts_seen = rep.max_attempts_seen.max(g.attempts);
                if g.status != "ok" { rep.not_ok += 1; }
                if let Some(k) = pending {
                    if g.attempts >= 2 || g.status != "ok" {
                        rep.latencies.push((g.at - k).as_secs_f64());
                        rep.affected += 1;
                        pending = None;
                        next_kill = Instant::now() + rng.between(Duration::from_millis(500), Duration::from_millis(1500));
                    }
                }
            }
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        if let Some(k) = pending {
            // A kill that hit the browser between tasks is caught by the
            // checkout health check: no task ran on it, none is affected.
            let caught = now - k > Duration::from_millis(300) && now >= next_log_check && {
                next_log_check = now + Duration::from_millis(250);
                let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
                let kill_wall = kill_walls.last().copied().unwrap_or(0.0);
                log.lines().any(|l| {
                    l.contains("appears dead")
                        && l.contains("health_check")
                        && log_time(l).is_some_and(|t| t >= kill_wall - 0.001)
                })
            };
            if caught || now - k > give_up_after {
                rep.idle_kills += 1;
                pending = None;
                next_kill =
                    now + rng.between(Duration::from_millis(500), Duration::from_millis(1500));
            }
        }
        if pending.is_none() && rep.kills < args.kills && now >= next_kill {
            let mains = browser_mains(worker.pid());
            if mains.len() >= n {
                let victim = mains[rng.below(mains.len())];
                kill(victim, nix::sys::signal::Signal::SIGKILL);
                kill_walls.push(wall_now());
                pending = Some(Instant::now());
                rep.kills += 1;
            } else {
                // A replacement is still starting: kill a steady fleet only.
                next_kill = now + Duration::from_millis(100);
            }
        }
    }
    let phase = started.elapsed().as_secs_f64();
    // Drain: every published task must come back exactly once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < published {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(g)) if g.id.starts_with("rec-") => {
                if !seen.insert(g.id.clone()) {
                    rep.duplicates += 1;
                }
                rep.max_attempts_seen = rep.max_attempts_seen.max(g.attempts);
                if g.status != "ok" {
                    rep.not_ok += 1;
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    // Late duplicates would show up here.
    while let Ok(Some(g)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        if g.id.starts_with("rec-") && !seen.insert(g.id.clone()) {
            rep.duplicates += 1;
        }
    }
    rep.published = published;
    rep.results = seen.len();
    rep.lost = published - seen.len().min(published);
    rep.tps = seen.len() as f64 / phase;
    rep.dead_lettered = amqp.depth(&q.dead).await;
    let (s1, c1) = worker
        .histogram("browserfleet_session_create_duration_seconds")
        .await;
    rep.create_mean_s = if c1 > 0.0 { s1 / c1 } else { f64::NAN };
    rep.replace_create_mean_s = if c1 > c0 {
        (s1 - s0) / (c1 - c0)
    } else {
        f64::NAN
    };
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    rep.detect = delays_after(&log, &kill_walls, "appears dead");
    rep.replaced = delays_after(&log, &kill_walls, "replacing a dead one");
    worker.stop().await;
    q.delete(amqp).await;
    Ok(rep)
}

#[derive(Debug, Default, Clone)]
struct DispatchRow {
    pool: usize,
    queue_type: &'static str,
    tasks: usize,
    publish_tps: f64,
    tps: f64,
    worker_us_per_task: f64,
    broker_us_per_task: f64,
    bench_us_per_task: f64,
    machine_cores: f64,
    commands_per_task: f64,
    peak_rss_mb: f64,
    switches_per_task: f64,
    lapin_us_per_task: f64,
    tps_min: f64,
    tps_max: f64,
    reps: usize,
}

async fn dispatch(args: &Args, bin: &Path, amqp: &Amqp, tck: f64) -> Result<Vec<DispatchRow>> {
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let (addr, counts) = start_instant_driver().await?;
    let rabbit = rabbit_pid();
    let me = std::process::id() as i32;
    let configs: Vec<(usize, &'static str)> = args
        .dispatch_pools
        .iter()
        .map(|&p| (p, "quorum"))
        .chain(args.dispatch_classic_pools.iter().map(|&p| (p, "classic")))
        .filter(|&(p, _)| p > 0)
        .collect();
    if !["title", "none"].contains(&args.dispatch_steps.as_str()) {
        bail!("--dispatch-steps: expected `title` or `none`");
    }
    let mut rows = vec![];
    for (pool, qt) in configs {
        let mut runs: Vec<DispatchRow> = vec![];
        for _ in 0..args.dispatch_reps.max(1) {
            let d = args.dispatch_tasks;
            let q = Queues::new("dispatch", qt);
            q.declare().await?;
            let bodies: Vec<Vec<u8>> = (0..d)
                .map(|i| match args.dispatch_steps.as_str() {
                    "none" => serde_json::to_vec(&json!({"id": format!("d-{i}"), "steps": []}))
                        .expect("JSON"),
                    _ => task_body(&format!("d-{i}"), "http://127.0.0.1:1/page"),
                })
                .collect();
            let t = Instant::now();
            amqp.publish_all(&q.tasks, bodies, 1000).await?;
            let publish_tps = d as f64 / t.elapsed().as_secs_f64();
            let mut rx = amqp.results(&q.results).await?;
            let cmd0 = counts.commands.load(Ordering::Relaxed);
            let (b0, me0, m0) = (
                rabbit.and_then(cpu_ticks).unwrap_or(0),
                cpu_ticks(me).unwrap_or(0),
                machine_cpu(),
            );
            let mut worker = Worker::spawn(
                args,
                bin,
                &q,
                &[
                    ("BROWSERFLEET__POOL__MAX_SIZE", pool.to_string()),
                    ("BROWSERFLEET__WEBDRIVER__URL", format!("http://{addr}")),
                ],
            )?;
            let perf = Perf::start(args, &worker, &format!("dispatch-{qt}-{pool}"))?;
            worker.wait_ready().await?;
            let got = collect(&mut rx, "d-", d, Duration::from_secs(60 + d as u64 / 50)).await?;
            let first = got.iter().map(|g| g.at).min().unwrap();
            let last = got.iter().map(|g| g.at).max().unwrap();
            let (wt, b1, me1, m1) = (
                worker.cpu_ticks(),
                rabbit.and_then(cpu_ticks).unwrap_or(0),
                cpu_ticks(me).unwrap_or(0),
                machine_cpu(),
            );
            perf.stop();
            let per = |ticks: u64| ticks as f64 / tck * 1e6 / d as f64;
            let row = DispatchRow {
                pool,
                queue_type: qt,
                tasks: d,
                publish_tps,
                tps: (d - 1) as f64 / (last - first).as_secs_f64(),
                worker_us_per_task: per(wt),
                broker_us_per_task: per(b1 - b0),
                bench_us_per_task: per(me1 - me0),
                machine_cores: cores_used(m0, m1, ncpu),
                commands_per_task: (counts.commands.load(Ordering::Relaxed) - cmd0) as f64
                    / d as f64,
                peak_rss_mb: worker.peak_rss_mb(),
                switches_per_task: worker.switches() as f64 / d as f64,
                lapin_us_per_task: per(threads_named(worker.pid(), "lapin-io-loop")),
                ..Default::default()
            };
            let not_ok = got.iter().filter(|g| g.status != "ok").count();
            if not_ok > 0 {
                eprintln!("  warning: {not_ok} dispatch results were not ok");
            }
            println!(
                "  pool {pool} ({qt}): {:.0} tasks/s; worker {:.0} µs/task, broker {:.0} µs/task",
                row.tps, row.worker_us_per_task, row.broker_us_per_task
            );
            worker.stop().await;
            q.delete(amqp).await;
            runs.push(row);
        }
        runs.sort_by(|a, b| a.tps.total_cmp(&b.tps));
        let mut row = runs[runs.len() / 2].clone();
        row.tps_min = runs[0].tps;
        row.tps_max = runs[runs.len() - 1].tps;
        row.reps = runs.len();
        rows.push(row);
    }
    Ok(rows)
}

/// The broker round-trips a task waits on at prefetch = pool size: a
/// publish until its confirm, and an ack until the next delivery (prefetch
/// 1). Returns (confirm p50, ack → next delivery p50), in ms.
async fn broker_round_trips(amqp: &Amqp, queue_type: &'static str, n: usize) -> Result<(f64, f64)> {
    let q = Queues::new("rtt", queue_type);
    q.declare().await?;
    let body = task_body("rtt", "http://127.0.0.1:1/page");
    let mut confirm = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        amqp.publish_all(&q.tasks, vec![body.clone()], 1).await?;
        confirm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let ch = amqp.conn.create_channel().await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            q.tasks.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut redeliver = Vec::with_capacity(n);
    let mut acked: Option<Instant> = None;
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .context("no delivery within 10 s")?
            .ok_or_else(|| anyhow!("consumer ended"))??;
        if let Some(t) = acked {
            redeliver.push(t.elapsed().as_secs_f64() * 1e3);
        }
        acked = Some(Instant::now());
        d.ack(lapin::options::BasicAckOptions::default()).await?;
    }
    let _ = ch.close(200, "done".into()).await;
    q.delete(amqp).await;
    for v in [&mut confirm, &mut redeliver] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    Ok((percentile(&confirm, 50.0), percentile(&redeliver, 50.0)))
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn machine_line() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let version = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .stderr(Stdio::null())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{cores} cores, {mem_gb:.1} GiB RAM, kernel {kernel}; {}; {}",
        version("chromium"),
        version("chromedriver").split(" (").next().unwrap_or("?")
    )
}

struct Report {
    rtt: Vec<(&'static str, f64, f64)>,
    tput: Option<Vec<ThroughputRow>>,
    rec: Option<Vec<RecoveryReport>>,
    disp: Option<Vec<DispatchRow>>,
}

fn print_report(args: &Args, r: &Report, load_start: &str, load_end: &str) -> Vec<(String, bool)> {
    let mut targets: Vec<(String, bool)> = vec![];
    println!();
    println!("## browserfleet benchmark");
    println!();
    println!("machine: {}", machine_line());
    println!("load average (1/5/15 min): {load_start} at start, {load_end} at end");
    println!(
        "mode: {}; tasks/round {}, rounds per variant {}, pools {:?}; recovery: {} kills at each pool of {:?}; dispatch: {} tasks, steps `{}`{}",
        if args.quick { "--quick (smoke, numbers not meaningful)" } else { "full" },
        args.tasks,
        args.pairs,
        args.pools,
        args.kills,
        args.recovery_pools,
        args.dispatch_tasks,
        args.dispatch_steps,
        if args.worker_env.is_empty() {
            String::new()
        } else {
            format!("; worker env {:?}", args.worker_env)
        }
    );

    if let Some(rows) = &r.tput {
        println!();
        println!("### 1. Throughput vs the limit (fleet / raw fantoccini loop, same sessions, rounds alternating A B C A B C)");
        println!();
        println!("| sessions | fleet tasks/s | raw tasks/s | **fleet/raw** | target ≥ 0.97 | per-pair fleet/raw: median (min–max) | raw + current_url tasks/s | fleet / (raw + current_url) | per-round fleet | per-round raw | per-round raw + current_url |");
        println!("|---:|---:|---:|---:|---|---|---:|---:|---|---|---|");
        for x in rows {
            let ratio = x.fleet_tps / x.raw_tps;
            let fmt = |v: &[f64]| {
                v.iter()
                    .map(|t| format!("{t:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let mut pairs: Vec<f64> = x
                .fleet_rounds
                .iter()
                .zip(&x.raw_rounds)
                .map(|(f, r)| f / r)
                .collect();
            pairs.sort_by(|a, b| a.total_cmp(b));
            println!(
                "| {} | {:.2} | {:.2} | **{:.3}** | {} | {:.3} ({:.3}–{:.3}) | {:.2} | {:.3} | {} | {} | {} |",
                x.pool,
                x.fleet_tps,
                x.raw_tps,
                ratio,
                verdict(ratio >= 0.97),
                percentile(&pairs, 50.0),
                pairs.first().copied().unwrap_or(f64::NAN),
                pairs.last().copied().unwrap_or(f64::NAN),
                x.check_tps,
                x.fleet_tps / x.check_tps,
                fmt(&x.fleet_rounds),
                fmt(&x.raw_rounds),
                fmt(&x.check_rounds),
            );
            targets.push((
                format!("1. fleet/raw ≥ 0.97 with {} session(s): {ratio:.3}", x.pool),
                ratio >= 0.97,
            ));
        }
        let not_ok: usize = rows.iter().map(|x| x.not_ok).sum();
        if not_ok > 0 {
            println!("\n{not_ok} task(s) did not return the page title (see the worker log).");
        }

        println!();
        println!("### 2. Worker overhead (the worker process alone: /proc utime+stime, children excluded; VmHWM)");
        println!();
        println!("| sessions | worker CPU ms/task | of which lapin-io-loop thread | worker peak RSS MB | worker context switches/task | raw fantoccini loop CPU ms/task (reference) | target ≤ 1 ms, ≤ 40 MB at 4 sessions |");
        println!("|---:|---:|---:|---:|---:|---:|---|");
        for x in rows {
            let rss_ok = x.pool != 4 || x.worker_peak_rss_mb <= 40.0;
            let ok = x.worker_cpu_ms_per_task <= 1.0 && rss_ok;
            println!(
                "| {} | {:.3} | {:.3} | {:.1} | {:.1} | {:.3} | {} |",
                x.pool,
                x.worker_cpu_ms_per_task,
                x.worker_lapin_ms_per_task,
                x.worker_peak_rss_mb,
                x.switches_per_task,
                x.raw_cpu_ms_per_task,
                verdict(ok)
            );
            targets.push((
                format!(
                    "2. worker CPU ≤ 1 ms/task with {} session(s): {:.3} ms",
                    x.pool, x.worker_cpu_ms_per_task
                ),
                x.worker_cpu_ms_per_task <= 1.0,
            ));
            if x.pool == 4 {
                targets.push((
                    format!(
                        "2. worker peak RSS ≤ 40 MB with 4 sessions: {:.1} MB",
                        x.worker_peak_rss_mb
                    ),
                    x.worker_peak_rss_mb <= 40.0,
                ));
            }
        }
    }

    if let Some(recs) = &r.rec {
        println!();
        println!("### 3. Recovery latency (browser main process SIGKILLed at random under load)");
        println!();
        println!("| sessions | kills | affected tasks | kill→result p50 s | p99 s | max s | session create s (all / replacements) | target p50 ≤ create + 1 s | kill → found dead, median s | kill → replacement open, median s | tasks published / answered / lost / duplicated / not ok | dead-lettered | tasks/s during kills |");
        println!("|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---|---:|---:|");
        for x in recs {
            let mut l = x.latencies.clone();
            l.sort_by(|a, b| a.total_cmp(b));
            let (p50, p99) = (percentile(&l, 50.0), percentile(&l, 99.0));
            let ok = p50 <= x.create_mean_s + 1.0;
            let med = |v: &[f64]| {
                let mut v = v.to_vec();
                v.sort_by(|a, b| a.total_cmp(b));
                percentile(&v, 50.0)
            };
            println!(
            "| {} | {} | {} | **{:.2}** | {:.2} | {:.2} | {:.2} / {:.2} | {} | {:.2} | {:.2} | {} / {} / **{}** / {} / {} | {} | {:.2} |",
            x.pool,
            x.kills,
            x.affected,
            p50,
            p99,
            l.last().copied().unwrap_or(f64::NAN),
            x.create_mean_s,
            x.replace_create_mean_s,
            verdict(ok),
            med(&x.detect),
            med(&x.replaced),
            x.published,
            x.results,
            x.lost,
            x.duplicates,
            x.not_ok,
            x.dead_lettered,
            x.tps
        );
            targets.push((
                format!(
                    "3. recovery with {} session(s): p50 {p50:.2} s ≤ session create {:.2} s + 1 s",
                    x.pool, x.create_mean_s
                ),
                ok,
            ));
            targets.push((
                format!(
                    "3. tasks lost under kills with {} session(s): {}",
                    x.pool, x.lost
                ),
                x.lost == 0,
            ));
        }
        for x in recs {
            if x.idle_kills > 0 {
                println!(
                    "\npool {}: {} kill(s) found no task on the browser (caught by the checkout health check, or no affected result within 30 s); they have no latency sample.",
                    x.pool, x.idle_kills
                );
            }
        }
    }

    if let Some(rows) = &r.disp {
        println!();
        println!(
            "### 4. Dispatch ceiling (worker + RabbitMQ against an instant in-process WebDriver)"
        );
        println!();
        println!("| pool (prefetch) | queues | tasks × runs | tasks/s (median) | min–max | worker CPU µs/task | of which lapin-io-loop | RabbitMQ CPU µs/task | bench CPU µs/task (driver + consumer) | machine cores busy | WebDriver cmds/task | worker context switches/task | worker peak RSS MB | bench publish rate/s | target ≥ 2000/s |");
        println!("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for x in rows {
            println!(
                "| {} | {} | {} × {} | **{:.0}** | {:.0}–{:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
                x.pool,
                x.queue_type,
                x.tasks,
                x.reps,
                x.tps,
                x.tps_min,
                x.tps_max,
                x.worker_us_per_task,
                x.lapin_us_per_task,
                x.broker_us_per_task,
                x.bench_us_per_task,
                x.machine_cores,
                x.commands_per_task,
                x.switches_per_task,
                x.peak_rss_mb,
                x.publish_tps,
                verdict(x.tps >= 2000.0)
            );
        }
        let best = rows
            .iter()
            .filter(|x| x.queue_type == "quorum")
            .map(|x| x.tps)
            .fold(0.0, f64::max);
        targets.push((
            format!("4. dispatch ceiling ≥ 2000 tasks/s (default quorum queues): {best:.0}"),
            best >= 2000.0,
        ));
        if !r.rtt.is_empty() {
            println!();
            println!(
                "broker round-trips a task waits on at prefetch = pool size (sequential, p50):"
            );
            for (qt, c, a) in &r.rtt {
                println!("- {qt}: publish → confirm {c:.2} ms; ack → next delivery (prefetch 1) {a:.2} ms");
            }
        }
    }

    if let Some(rows) = &r.tput {
        println!();
        println!(
            "### 5. Scaling with pool size (machine CPU in cores busy, of {})",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        );
        println!();
        println!("| sessions | raw tasks/s | fleet tasks/s | raw speed-up vs 1 | fleet speed-up vs 1 | cores busy (raw) | cores busy (fleet) | session create s (raw / worker) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---|");
        let base = rows
            .first()
            .map(|x| (x.raw_tps, x.fleet_tps))
            .unwrap_or((1.0, 1.0));
        for x in rows {
            println!(
                "| {} | {:.2} | {:.2} | {:.2}× | {:.2}× | {:.2} | {:.2} | {:.2} / {:.2} |",
                x.pool,
                x.raw_tps,
                x.fleet_tps,
                x.raw_tps / base.0,
                x.fleet_tps / base.1,
                x.raw_cores,
                x.fleet_cores,
                x.raw_create_s,
                x.fleet_create_s
            );
        }
    }

    println!();
    println!("### Targets");
    println!();
    for (t, ok) in &targets {
        println!("- [{}] {t}", if *ok { "x" } else { " " });
    }
    targets
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.apply_quick();
    let bin = match &args.worker_bin {
        Some(b) => b.clone(),
        None => {
            // target/<profile>/examples/bench -> target/<profile>/browserfleet
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(|d| d.parent())
                .map(|d| d.join("browserfleet"))
                .ok_or_else(|| anyhow!("cannot locate the worker binary; pass --worker-bin"))?
        }
    };
    if !bin.is_file() {
        bail!(
            "worker binary {} not found: build it first (`cargo build --release` for a --release run, `cargo build` otherwise) or pass --worker-bin",
            bin.display()
        );
    }
    let tck = clk_tck();
    let load_start = loadavg();
    println!(
        "browserfleet bench: worker {}, load {load_start}",
        bin.display()
    );
    let amqp = Amqp::connect().await?;
    let (url, pages_tid) = start_pages()?;
    let mut report = Report {
        rtt: vec![],
        tput: None,
        rec: None,
        disp: None,
    };
    if args.runs("throughput") {
        println!("sections 1, 2, 5: throughput, overhead, scaling");
        report.tput = Some(throughput(&args, &bin, &amqp, &url, pages_tid, tck).await?);
    }
    if args.runs("recovery") {
        println!(
            "section 3: recovery ({} kills at each pool size of {:?})",
            args.kills, args.recovery_pools
        );
        let mut recs = vec![];
        for &n in &args.recovery_pools {
            recs.push(recovery(&args, &bin, &amqp, &url, n).await?);
        }
        report.rec = Some(recs);
    }
    if args.runs("dispatch") {
        println!(
            "section 4: dispatch ceiling ({} tasks per run)",
            args.dispatch_tasks
        );
        report.disp = Some(dispatch(&args, &bin, &amqp, tck).await?);
        let n = if args.quick { 20 } else { 300 };
        for qt in ["quorum", "classic"] {
            let (c, a) = broker_round_trips(&amqp, qt, n).await?;
            report.rtt.push((qt, c, a));
        }
    }
    let load_end = loadavg();
    print_report(&args, &report, &load_start, &load_end);
    let _ = amqp.conn.close(200, "bench done".into()).await;
    for r in report.rec.iter().flatten() {
        if r.lost > 0 {
            bail!("{} task(s) lost under browser kills", r.lost);
        }
    }
    Ok(())
}
