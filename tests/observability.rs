//! Observability end to end: the values /metrics reports after a known run,
//! the Grafana dashboard's queries against a real Prometheus scraping a real
//! worker and the local RabbitMQ, the ops configs as CI validates them, and
//! JSON logs.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use browserfleet::browser::driver::which;
use browserfleet::task::Status;
use common::*;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);
const REASON_HEADER: &str = "x-browserfleet-reason";
/// RabbitMQ's prometheus plugin on the local broker.
const RABBITMQ_PROMETHEUS: &str = "127.0.0.1:15692";

fn ok_task(pages: &CountingPages, id: &str) -> Value {
    json!({"id": id, "steps": [
        {"action": "goto", "url": pages.url("/")},
        {"action": "text", "selector": "h1", "as": "heading"}]})
}

fn missing_selector_task(pages: &CountingPages, id: &str) -> Value {
    json!({"id": id, "steps": [
        {"action": "goto", "url": pages.url("/")},
        {"action": "text", "selector": "#does-not-exist", "as": "x"}]})
}

/// A task whose first step loads a page that takes 4 s to answer, so its
/// browser can be killed while the task runs.
fn slow_task(pages: &CountingPages, id: &str, max_attempts: Option<u32>) -> Value {
    let mut t = json!({"id": id, "steps": [
        {"action": "goto", "url": pages.url(&format!("/slow?ms=4000&n={id}"))},
        {"action": "text", "selector": "h1", "as": "heading"}]});
    if let Some(n) = max_attempts {
        t["max_attempts"] = json!(n);
    }
    t
}

/// Waits until the page server has received its `nth` `/slow` request (so a
/// task is inside its `goto`, past the pool's recycle health check), checks
/// that `/sessions` shows the session busy, then SIGKILLs the worker's one
/// browser.
async fn kill_browser_mid_task(w: &Worker, pages: &CountingPages, nth: usize) {
    assert!(
        pages.wait_slow_requests(nth, LIMIT).await,
        "the page server never got /slow request #{nth}; worker log:\n{}",
        w.log_text()
    );
    let (status, body) = w.get("/sessions").await.expect("/sessions answers");
    assert_eq!(status, 200);
    let sessions: Value = serde_json::from_str(&body).unwrap();
    assert!(
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["state"] == "busy"),
        "a task is loading /slow, so a session must be busy: {sessions}"
    );
    let browsers = browser_mains(w.pid());
    assert_eq!(
        browsers.len(),
        1,
        "pool max_size 1: exactly one browser runs; log:\n{}",
        w.log_text()
    );
    kill9(browsers[0]);
}

fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name)
}

fn reason_is(d: &Delivery, reason: &str) -> bool {
    header(d, REASON_HEADER) == Some(&AMQPValue::LongString(reason.into()))
}

/// The sum of every sample of one family, e.g. all `reason`s of
/// `browserfleet_session_deaths_total`.
fn family_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let value = if rest.starts_with('{') {
                rest.rsplit_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

async fn metrics_text(w: &Worker) -> String {
    let (status, text) = w.get("/metrics").await.expect("/metrics answers");
    assert_eq!(status, 200);
    text
}

/// Waits (up to 10 s) until a family sums to `expected`; returns the last sum.
async fn family_sum_eventually(w: &Worker, family: &str, expected: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = family_sum(&metrics_text(w).await, family);
        if v == expected || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where a tool is, or None when it is missing and tool tests may be skipped
/// (`BROWSERFLEET_SKIP_TOOL_TESTS=1`); otherwise a missing tool fails.
fn required_tool(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = which(name) {
        return Some(p);
    }
    if std::env::var("BROWSERFLEET_SKIP_TOOL_TESTS").as_deref() == Ok("1") {
        eprintln!("NOTICE: {name} is not installed; skipped (BROWSERFLEET_SKIP_TOOL_TESTS=1)");
        return None;
    }
    panic!(
        "{name} is not installed: apt-get install {package} (scripts/setup.sh --test installs it), \
         or set BROWSERFLEET_SKIP_TOOL_TESTS=1 to skip"
    );
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn metrics_report_the_values_of_a_run() {
    require_browser();
    let pages = CountingPages::start().await;
    let q = Queues::new("obsmetrics");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;

    // Two ok tasks, one that fails on the page, one undecodable message.
    amqp.publish_task(&q.tasks, &ok_task(&pages, "ok-1")).await;
    amqp.publish_task(&q.tasks, &ok_task(&pages, "ok-2")).await;
    amqp.publish_task(&q.tasks, &missing_selector_task(&pages, "page-failed"))
        .await;
    amqp.publish(&q.tasks, b"{not json", BasicProperties::default())
        .await;
    let results = amqp.results(&q.results, 3, LIMIT).await;
    assert_eq!(results["ok-1"].status, Status::Ok, "{:?}", results["ok-1"]);
    assert_eq!(results["ok-2"].status, Status::Ok, "{:?}", results["ok-2"]);
    let failed = &results["page-failed"];
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.error.as_ref().unwrap().kind, "no_such_element");
    let dead = amqp.take(&q.dead, 1, LIMIT).await;
    assert!(
        reason_is(&dead[0], "invalid_task"),
        "{:?}",
        dead[0].properties
    );
    assert_eq!(&dead[0].data[..], b"{not json");

    // A task whose browser is killed mid-task: republished, then ok.
    amqp.publish_task(&q.tasks, &slow_task(&pages, "killed-once", None))
        .await;
    kill_browser_mid_task(&w, &pages, 1).await;
    let results = amqp.results(&q.results, 1, LIMIT).await;
    let r = &results["killed-once"];
    assert_eq!(
        (r.status, r.attempts),
        (Status::Ok, 2),
        "{r:?}; worker log:\n{}",
        w.log_text()
    );
    assert_eq!(r.outputs["heading"], "slow killed-once");

    // The same with max_attempts 1: failed, session_died, dead-lettered.
    amqp.publish_task(&q.tasks, &slow_task(&pages, "killed-final", Some(1)))
        .await;
    // /slow requests so far: killed-once's two runs; this is the third.
    kill_browser_mid_task(&w, &pages, 3).await;
    let results = amqp.results(&q.results, 1, LIMIT).await;
    let r = &results["killed-final"];
    assert_eq!(
        (r.status, r.attempts),
        (Status::Failed, 1),
        "{r:?}; worker log:\n{}",
        w.log_text()
    );
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.kind, "session_died", "{e:?}");
    assert_eq!(e.history.len(), 1, "{e:?}");
    let dead = amqp.take(&q.dead, 1, LIMIT).await;
    assert!(
        reason_is(&dead[0], "max_attempts"),
        "{:?}",
        dead[0].properties
    );

    // The values, not only the names.
    let log = || w.log_text();
    let expect = [
        ("browserfleet_tasks_total{outcome=\"ok\"}", 3.0),
        ("browserfleet_tasks_total{outcome=\"failed\"}", 1.0),
        ("browserfleet_tasks_total{outcome=\"republished\"}", 1.0),
        ("browserfleet_tasks_total{outcome=\"dead_lettered\"}", 2.0),
        (
            "browserfleet_dead_lettered_total{reason=\"invalid_task\"}",
            1.0,
        ),
        (
            "browserfleet_dead_lettered_total{reason=\"max_attempts\"}",
            1.0,
        ),
        (
            "browserfleet_task_duration_seconds_count{outcome=\"ok\"}",
            3.0,
        ),
        ("browserfleet_pool_max_size", 1.0),
        ("browserfleet_broker_connected", 1.0),
    ];
    let mut wrong = Vec::new();
    for (sample, want) in expect {
        let got = w.metric_eventually(sample, want).await;
        if got != want {
            wrong.push(format!("{sample} = {got}, expected {want}"));
        }
    }
    let build_info = format!(
        "browserfleet_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    let got = w.metric(&build_info).await;
    if got != 1.0 {
        wrong.push(format!("{build_info} = {got}, expected 1"));
    }
    let deaths = family_sum_eventually(&w, "browserfleet_session_deaths_total", 2.0).await;
    if deaths != 2.0 {
        wrong.push(format!(
            "browserfleet_session_deaths_total summed over reasons = {deaths}, expected 2"
        ));
    }
    let recoveries = w.metric("browserfleet_session_recoveries_total").await;
    if recoveries < 1.0 {
        wrong.push(format!(
            "browserfleet_session_recoveries_total = {recoveries}, expected >= 1"
        ));
    }
    let created = w.metric("browserfleet_sessions_created_total").await;
    if created < 2.0 {
        wrong.push(format!(
            "browserfleet_sessions_created_total = {created}, expected >= 2"
        ));
    }
    let text = metrics_text(&w).await;
    let deaths_by_reason: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("browserfleet_session_deaths_total{") && !l.ends_with(" 0"))
        .collect();
    eprintln!("session deaths: {deaths_by_reason:?}");
    assert!(
        wrong.is_empty(),
        "wrong metric values:\n  {}\n/metrics:\n{text}\nworker log:\n{}",
        wrong.join("\n  "),
        log()
    );

    // The exposition passes Prometheus' own checker.
    match which("promtool") {
        None => eprintln!(
            "NOTICE: promtool not found (Debian package prometheus); skipping `promtool check metrics`"
        ),
        Some(promtool) => {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed ({}):\n{}{}\n/metrics:\n{text}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    q.delete(&amqp).await;
}

// ---------------------------------------------------------------------------

/// A Prometheus server on a free port, killed when dropped.
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes the worker at `worker` and the local RabbitMQ plugin (both
    /// endpoints, job names as in config/prometheus.yml) every second.
    fn start(worker: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: browserfleet
    static_configs:
      - targets: ["{worker}"]
  - job_name: rabbitmq
    metrics_path: /metrics
    static_configs:
      - targets: ["{RABBITMQ_PROMETHEUS}"]
  - job_name: rabbitmq-detailed
    metrics_path: /metrics/detailed
    params:
      family: [queue_coarse_metrics]
    static_configs:
      - targets: ["{RABBITMQ_PROMETHEUS}"]
"#
            ),
        )
        .unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let binary = which("prometheus")
            .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| p.exists()))
            .expect(
                "prometheus is not installed: apt-get install prometheus \
                 (scripts/setup.sh --test installs it)",
            );
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .expect("spawning prometheus");
        Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let url = url::Url::parse_with_params(&format!("{}{path}", self.base), params).unwrap();
        let r = reqwest::get(url).await.map_err(|e| e.to_string())?;
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() || body["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        match data["result"].as_array() {
            Some(a) => Ok(a.clone()),
            None => Err(format!("unexpected result: {data}")),
        }
    }

    /// Waits until every target has been scraped successfully.
    async fn wait_targets_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(up) = self.query("up == 1").await {
                if up.len() >= n {
                    return;
                }
            }
            if Instant::now() > deadline {
                let targets = self.api("/api/v1/targets", &[]).await;
                panic!(
                    "Prometheus did not scrape all {n} targets within 30 s; targets: {targets:?}\nprometheus log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One query of a dashboard panel.
#[derive(Debug)]
struct Target {
    panel: String,
    expr: String,
    legend: String,
}

/// Every panel target with an `expr`, rows and nested panels included.
fn dashboard_targets(dashboard: &Value) -> Vec<Target> {
    fn walk(panels: &Value, out: &mut Vec<Target>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str().filter(|e| !e.trim().is_empty()) {
                    out.push(Target {
                        panel: p["title"].as_str().unwrap_or("?").to_string(),
                        expr: expr.to_string(),
                        legend: t["legendFormat"].as_str().unwrap_or("").to_string(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    // Old-style dashboards keep panels under `rows`.
    for row in dashboard["rows"].as_array().into_iter().flatten() {
        walk(&row["panels"], &mut out);
    }
    out
}

/// Replaces Grafana's built-in variables and the dashboard's own template
/// variables (by `allValue`, else `.*`) the way Grafana would for "All".
fn substitute(expr: &str, dashboard: &Value) -> String {
    let mut e = expr.to_string();
    // Longest first, so `$__range_s` is not eaten by `$__range`.
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__range_ms", "300000"),
        ("$__range_s", "300"),
        ("$__range", "5m"),
        ("${__range}", "5m"),
        ("$__interval_ms", "5000"),
        ("$__interval", "5s"),
        ("${__interval}", "5s"),
    ] {
        e = e.replace(var, value);
    }
    let mut vars: Vec<(String, String)> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let name = v["name"].as_str()?.to_string();
            let all = v["allValue"]
                .as_str()
                .filter(|a| !a.is_empty())
                .unwrap_or(".*")
                .to_string();
            Some((name, all))
        })
        .collect();
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    for (name, value) in vars {
        for form in [
            format!("${{{name}:regex}}"),
            format!("${{{name}}}"),
            format!("[[{name}]]"),
            format!("${name}"),
        ] {
            e = e.replace(&form, &value);
        }
    }
    e
}

/// Label names a legend format refers to (`{{instance}} busy` → `instance`).
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(l, _)| l.trim().to_string()))
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sample(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// What is wrong with the dashboard's per-queue data for `dead_queue`, which
/// holds exactly one message: it must be among the series of every
/// `rabbitmq_detailed_queue_messages_*` query (ready = 1), and the
/// `rabbitmq_detailed_queue_messages` family the dead-letter stat sums must
/// count it.
async fn queue_problems(
    prom: &Prometheus,
    answers: &BTreeMap<String, Vec<Value>>,
    dead_queue: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut queue_panels = 0;
    for (e, result) in answers {
        if !e.contains("rabbitmq_detailed_queue_messages_") {
            continue;
        }
        queue_panels += 1;
        match result.iter().find(|s| s["metric"]["queue"] == dead_queue) {
            None => problems.push(format!("queue {dead_queue} is not in {e}")),
            Some(s) if e.contains("messages_ready") && sample(s) != 1.0 => problems.push(format!(
                "{e}: {dead_queue} has {} ready, expected 1",
                s["value"][1]
            )),
            Some(_) => {}
        }
    }
    if queue_panels == 0 {
        problems
            .push("the dashboard has no per-queue rabbitmq_detailed_queue_messages_* query".into());
    }
    let stat = format!("rabbitmq_detailed_queue_messages{{queue=\"{dead_queue}\"}}");
    match prom.query(&stat).await {
        Ok(r) if r.first().map(sample) == Some(1.0) => {}
        Ok(r) => problems.push(format!("{stat} is {r:?}, expected 1")),
        Err(e) => problems.push(format!("{stat}: {e}")),
    }
    problems
}

#[tokio::test]
async fn dashboard_queries_return_data_from_a_real_prometheus() {
    require_browser();
    assert!(
        reqwest::get(format!("http://{RABBITMQ_PROMETHEUS}/metrics"))
            .await
            .is_ok_and(|r| r.status().is_success()),
        "RabbitMQ's prometheus endpoint {RABBITMQ_PROMETHEUS} is not reachable: run \
         `rabbitmq-plugins enable rabbitmq_prometheus` (scripts/setup.sh --test does it)"
    );
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("config/grafana/dashboards/browserfleet.json"))
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    let targets = dashboard_targets(&dashboard);
    assert!(!targets.is_empty(), "the dashboard has no queries");

    // Queue names the dashboard's own `browserfleet.*` regex matches.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let base = format!("browserfleet.test.{}", &tag[..8]);
    let q = Queues {
        tasks: format!("{base}.tasks"),
        results: format!("{base}.results"),
        dead: format!("{base}.dead"),
    };
    let pages = CountingPages::start().await;
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;
    let worker_instance = w.metrics.to_string();
    let prom = Prometheus::start(&worker_instance);
    let deadline = Instant::now() + Duration::from_secs(90);
    // Scraped before the run, so rates see every increase.
    prom.wait_targets_up(3).await;

    amqp.publish_task(&q.tasks, &ok_task(&pages, "ok-1")).await;
    amqp.publish_task(&q.tasks, &ok_task(&pages, "ok-2")).await;
    amqp.publish_task(&q.tasks, &missing_selector_task(&pages, "page-failed"))
        .await;
    // Stays in the dead-letter queue, so `messages_ready` has a value there.
    amqp.publish(&q.tasks, b"{not json", BasicProperties::default())
        .await;
    let results = amqp.results(&q.results, 3, LIMIT).await;
    assert_eq!(results["ok-1"].status, Status::Ok);
    assert_eq!(results["page-failed"].status, Status::Failed);
    amqp.publish_task(&q.tasks, &slow_task(&pages, "killed-once", None))
        .await;
    kill_browser_mid_task(&w, &pages, 1).await;
    let results = amqp.results(&q.results, 1, LIMIT).await;
    let r = &results["killed-once"];
    assert_eq!(
        (r.status, r.attempts),
        (Status::Ok, 2),
        "{r:?}; worker log:\n{}",
        w.log_text()
    );
    assert_eq!(
        w.metric_eventually(
            "browserfleet_dead_lettered_total{reason=\"invalid_task\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(amqp.depth(&q.dead).await, 1, "the invalid message waits");

    // Every dashboard query, as Grafana would send it with "All" selected.
    let queries: Vec<(&Target, String)> = targets
        .iter()
        .map(|t| (t, substitute(&t.expr, &dashboard)))
        .collect();
    for (t, e) in &queries {
        assert!(
            !e.contains('$') && !e.contains("[["),
            "panel {:?}: unresolved variable in {e}",
            t.panel
        );
    }
    // Poll until each query has returned series, at least once with a
    // finite value (a quantile is NaN while its rate window holds no
    // observation), or the deadline passes.
    let mut has_series = vec![false; queries.len()];
    let mut has_finite = vec![false; queries.len()];
    let mut legend_problems: Vec<Option<String>> = vec![None; queries.len()];
    let mut answers: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let problems = loop {
        for (i, (t, e)) in queries.iter().enumerate() {
            let result = match prom.query(e).await {
                Ok(r) => r,
                // A query Prometheus rejects never gets better: fail now.
                Err(err) => panic!("panel {:?}: query {e} was rejected: {err}", t.panel),
            };
            has_series[i] |= !result.is_empty();
            has_finite[i] |= result.iter().any(|s| sample(s).is_finite());
            if !result.is_empty() {
                legend_problems[i] = legend_labels(&t.legend).into_iter().find_map(|label| {
                    let s = result.iter().find(|s| s["metric"].get(&label).is_none())?;
                    Some(format!(
                        "panel {:?}: legend {:?} uses label {label:?}, missing from {} of {e}",
                        t.panel, t.legend, s["metric"]
                    ))
                });
            }
            answers.insert(e.clone(), result);
        }
        let problems: Vec<String> = queries
            .iter()
            .enumerate()
            .filter_map(|(i, (t, e))| {
                if !has_series[i] {
                    Some(format!("panel {:?}: no data for {e}", t.panel))
                } else if !has_finite[i] {
                    Some(format!("panel {:?}: only NaN for {e}", t.panel))
                } else {
                    legend_problems[i].clone()
                }
            })
            .collect();
        // The queue panels show this test's own dead-letter queue, holding
        // the invalid message (RabbitMQ refreshes queue stats every few s).
        let mut problems = problems;
        problems.extend(queue_problems(&prom, &answers, &q.dead).await);
        if problems.is_empty() || Instant::now() > deadline {
            break problems;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        problems.is_empty(),
        "dashboard queries without (the expected) data within 90 s of Prometheus' start:\n  {}\nprometheus log (tail):\n{}",
        problems.join("\n  "),
        tail(&prom.log_text(), 40)
    );

    // The data is this test's own: the worker under its instance label, and
    // this test's dead-letter queue in the queue-depth panel.
    let build = prom.query("browserfleet_build_info").await.unwrap();
    assert!(
        build
            .iter()
            .any(|s| s["metric"]["instance"] == worker_instance.as_str()),
        "the worker is scraped with instance={worker_instance}: {build:?}"
    );
    let instances = prom
        .api(
            "/api/v1/label/instance/values",
            &[("match[]", "browserfleet_build_info")],
        )
        .await
        .unwrap();
    assert!(
        instances
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == worker_instance.as_str()),
        "the Worker variable (label_values(browserfleet_build_info, instance)) lists {worker_instance}: {instances}"
    );
    drop(prom);
    q.delete(&amqp).await;
}

// ---------------------------------------------------------------------------

#[test]
fn compose_and_prometheus_configs_validate() {
    let root = repo_root();
    if let Some(compose) = required_tool("docker-compose", "docker-compose") {
        let out = Command::new(compose)
            .args(["config", "-q"])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker-compose config -q failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(promtool) = required_tool("promtool", "prometheus") {
        let out = Command::new(promtool)
            .args(["check", "config", "config/prometheus.yml"])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check config config/prometheus.yml failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The third CI check (python3 -m json.tool) without python.
    let dashboard =
        std::fs::read_to_string(root.join("config/grafana/dashboards/browserfleet.json")).unwrap();
    serde_json::from_str::<Value>(&dashboard).expect("the dashboard is valid JSON");
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn json_logs_carry_task_and_attempt() {
    require_browser();
    let pages = CountingPages::start().await;
    let q = Queues::new("jsonlog");
    let amqp = Amqp::connect().await;
    let w = Worker::start(
        &q,
        &[
            ("BROWSERFLEET__POOL__MAX_SIZE", "1"),
            ("BROWSERFLEET__LOG__FORMAT", "json"),
            (
                "BROWSERFLEET__AMQP__URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            ),
        ],
    )
    .await;
    let id = format!(
        "json-log-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    amqp.publish_task(&q.tasks, &ok_task(&pages, &id)).await;
    let results = amqp.results(&q.results, 1, LIMIT).await;
    assert_eq!(results[&id].status, Status::Ok);

    // The task's log lines are written just after its result is confirmed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, lines) = loop {
        let text = w.log_text();
        let lines: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}\nlog:\n{text}"))
            })
            .collect();
        let tagged = lines
            .iter()
            .any(|l| l["span"]["task_id"] == id.as_str() && l["span"]["attempt"] == 1);
        if tagged || Instant::now() > deadline {
            break (text, lines);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!lines.is_empty(), "no log lines");
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["task_id"] == id.as_str() && l["span"]["attempt"] == 1),
        "no JSON log line whose span carries task_id={id} and attempt=1:\n{text}"
    );
    let startup = lines
        .iter()
        .find(|l| l["fields"]["message"] == "worker starting")
        .unwrap_or_else(|| panic!("no `worker starting` line:\n{text}"));
    assert!(
        startup.to_string().contains("guest:***@"),
        "the startup line shows the redacted URL: {startup}"
    );
    assert!(
        !text.contains("guest:guest@"),
        "the AMQP password is in the log:\n{text}"
    );
    q.delete(&amqp).await;
}
