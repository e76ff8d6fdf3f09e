//! Never lose a task: browsers, chromedriver, the broker connection and
//! workers die during real runs (real RabbitMQ, chromedriver, Chromium), and
//! every task still gets its answer; poison ends dead-lettered, never loops.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use browserfleet::task::{Status, TaskResult};
use common::*;
use lapin::types::AMQPValue;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// Pages for these tests. `/poison` kills the browsers of the worker whose
/// pid is in `victim` — the test's stand-in for a page that crashes Chromium
/// (a real crashing page is not reproducible across Chromium versions).
#[derive(Clone, Default)]
struct Site {
    victim: Arc<AtomicI32>,
    poison_hits: Arc<AtomicUsize>,
    hung_once: Arc<Mutex<HashSet<String>>>,
    hang_once_hits: Arc<AtomicUsize>,
}

impl Site {
    async fn start(&self) -> SocketAddr {
        let app = Router::new()
            .route(
                "/page",
                get(|Query(q): Query<HashMap<String, String>>| async move {
                    Html(format!(
                        "<h1 id=\"title\">page {}</h1>",
                        q.get("n").cloned().unwrap_or_default()
                    ))
                }),
            )
            .route(
                "/slow",
                get(|Query(q): Query<HashMap<String, String>>| async move {
                    let ms = q.get("ms").and_then(|v| v.parse().ok()).unwrap_or(300);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Html(format!(
                        "<h1 id=\"title\">slow {}</h1>",
                        q.get("n").cloned().unwrap_or_default()
                    ))
                }),
            )
            .route(
                "/hang",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Html("never")
                }),
            )
            .route(
                "/hang-once",
                get(
                    |State(s): State<Site>, Query(q): Query<HashMap<String, String>>| async move {
                        let key = q.get("key").cloned().unwrap_or_default();
                        let first = s.hung_once.lock().unwrap().insert(key);
                        s.hang_once_hits.fetch_add(1, Ordering::SeqCst);
                        if first {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        Html("<h1 id=\"title\">answered the second time</h1>".to_string())
                    },
                ),
            )
            .route(
                "/poison",
                get(|State(s): State<Site>| async move {
                    s.poison_hits.fetch_add(1, Ordering::SeqCst);
                    for pid in browser_mains(s.victim.load(Ordering::SeqCst)) {
                        kill9(pid);
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Html("<h1 id=\"title\">you should not see this</h1>".to_string())
                }),
            )
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }
}

fn goto_task(id: &str, url: String, extra: serde_json::Value) -> serde_json::Value {
    let mut t = json!({"id": id, "steps": [
        {"action": "goto", "url": url},
        {"action": "text", "selector": "#title", "as": "title"}]});
    if let serde_json::Value::Object(m) = extra {
        t.as_object_mut().unwrap().extend(m);
    }
    t
}

/// Collects results until every id in `ids` has one, returning every result
/// seen per id (so duplicates are visible). `context` (a worker log) is shown
/// when results are missing.
async fn answers(
    amqp: &Amqp,
    queue: &str,
    ids: &HashSet<String>,
    limit: Duration,
    context: impl Fn() -> String,
) -> HashMap<String, Vec<TaskResult>> {
    use futures_util::StreamExt;
    let ch = amqp.conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<String, Vec<TaskResult>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + limit;
    // After the last expected result, linger briefly so late duplicates show.
    let mut linger: Option<tokio::time::Instant> = None;
    loop {
        if linger.is_none() && ids.iter().all(|id| seen.contains_key(id)) {
            linger = Some(tokio::time::Instant::now() + Duration::from_millis(1500));
        }
        let until = linger.unwrap_or(deadline);
        match tokio::time::timeout_at(until, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                let r: TaskResult = serde_json::from_slice(&d.data).unwrap();
                seen.entry(r.id.clone()).or_default().push(r);
            }
            Ok(other) => panic!("result consumer ended: {other:?}"),
            Err(_) if linger.is_some() => break,
            Err(_) => {
                let missing: Vec<_> = ids.iter().filter(|i| !seen.contains_key(*i)).collect();
                panic!("no results within {limit:?} for {missing:?}\n{}", context());
            }
        }
    }
    let _ = ch.close(200, "done".into()).await;
    seen
}

fn chromedriver_of(worker: i32) -> Option<i32> {
    descendants(worker)
        .into_iter()
        .find(|(_, a)| a.first().is_some_and(|x| x.ends_with("chromedriver")))
        .map(|(p, _)| p)
}

#[tokio::test]
async fn chaos_every_task_gets_exactly_one_ok_while_browsers_and_chromedriver_die() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("chaos");
    let amqp = Amqp::connect().await;
    let w = Worker::start(
        &q,
        &[
            ("BROWSERFLEET__POOL__MAX_SIZE", "2"),
            ("BROWSERFLEET__WEBDRIVER__COMMAND_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    let n = 100;
    let ids: HashSet<String> = (0..n).map(|i| format!("chaos-{i}")).collect();
    for i in 0..n {
        // Generous max_attempts: a task may be hit by several kills; this test
        // is about never losing or duplicating, not about the limit.
        let t = goto_task(
            &format!("chaos-{i}"),
            format!("http://{addr}/slow?ms=150&n={i}"),
            json!({"max_attempts": 10}),
        );
        amqp.publish_task(&q.tasks, &t).await;
    }
    let pid = w.pid();
    let chaos = async {
        let mut kills = 0;
        let mut driver_killed = false;
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if !driver_killed && started.elapsed() > Duration::from_secs(6) {
                if let Some(d) = chromedriver_of(pid) {
                    kill9(d);
                    driver_killed = true;
                    continue;
                }
            }
            let browsers = browser_mains(pid);
            if let Some(&b) = browsers.get(kills % browsers.len().max(1)) {
                kill9(b);
                kills += 1;
            }
        }
    };
    let seen = tokio::select! {
        s = answers(&amqp, &q.results, &ids, 2 * LIMIT, || w.log_text()) => s,
        _ = chaos => unreachable!(),
    };
    for id in &ids {
        let rs = &seen[id];
        assert_eq!(rs.len(), 1, "{id} answered {} times: {rs:?}", rs.len());
        assert_eq!(
            rs[0].status,
            Status::Ok,
            "{:?}\nworker log:\n{}",
            rs[0],
            w.log_text()
        );
    }
    assert_eq!(seen.len(), n, "no stray results");
    assert_eq!(amqp.depth(&q.dead).await, 0, "nothing dead-lettered");
    assert_eq!(amqp.depth(&q.tasks).await, 0, "nothing left behind");
    let mut total_deaths = 0.0;
    for r in browserfleet::metrics::DEATH_REASONS {
        total_deaths += w
            .metric(&format!(
                "browserfleet_session_deaths_total{{reason=\"{r}\"}}"
            ))
            .await;
    }
    assert!(total_deaths >= 3.0, "deaths counted: {total_deaths}");
    assert!(w.metric("browserfleet_session_recoveries_total").await >= 3.0);
    assert_eq!(
        w.metric("browserfleet_chromedriver_restarts_total").await,
        1.0
    );
    assert!(
        w.metric("browserfleet_tasks_total{outcome=\"republished\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        w.metric("browserfleet_tasks_total{outcome=\"ok\"}").await,
        n as f64
    );
    q.delete(&amqp).await;
}

#[tokio::test]
async fn a_poison_task_is_dead_lettered_after_max_attempts_and_others_succeed() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("poison");
    let amqp = Amqp::connect().await;
    // One session, so the poison page's kill hits exactly the poison task's browser.
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;
    site.victim.store(w.pid(), Ordering::SeqCst);
    let mut ids = HashSet::new();
    for i in 0..6 {
        if i == 2 {
            amqp.publish_task(
                &q.tasks,
                &goto_task(
                    "poison",
                    format!("http://{addr}/poison"),
                    json!({"max_attempts": 3}),
                ),
            )
            .await;
            ids.insert("poison".to_string());
        }
        let id = format!("fine-{i}");
        amqp.publish_task(
            &q.tasks,
            &goto_task(&id, format!("http://{addr}/page?n={i}"), json!({})),
        )
        .await;
        ids.insert(id);
    }
    let seen = answers(&amqp, &q.results, &ids, LIMIT, || w.log_text()).await;
    for i in 0..6 {
        let r = &seen[&format!("fine-{i}")];
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, Status::Ok, "{:?}", r[0]);
        assert_eq!(r[0].outputs["title"], format!("page {i}"));
    }
    let p = &seen["poison"];
    assert_eq!(p.len(), 1, "one final answer: {p:?}");
    let p = &p[0];
    assert_eq!(p.status, Status::Failed);
    assert_eq!(p.attempts, 3);
    let e = p.error.as_ref().unwrap();
    assert_eq!(e.kind, "session_died");
    assert_eq!(
        e.history.iter().map(|h| h.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        site.poison_hits.load(Ordering::SeqCst),
        3,
        "the poison ran exactly max_attempts times"
    );

    let dead = amqp.take(&q.dead, 1, LIMIT).await;
    let h = dead[0].properties.headers().as_ref().unwrap().inner();
    assert_eq!(
        h.get("x-browserfleet-reason"),
        Some(&AMQPValue::LongString("max_attempts".into()))
    );
    let body: serde_json::Value = serde_json::from_slice(&dead[0].data).unwrap();
    assert_eq!(body["id"], "poison", "the original task is kept");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(amqp.depth(&q.tasks).await, 0, "the poison does not loop");
    assert_eq!(
        w.metric_eventually(
            "browserfleet_dead_lettered_total{reason=\"max_attempts\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        w.metric("browserfleet_tasks_total{outcome=\"republished\"}")
            .await,
        2.0
    );
    q.delete(&amqp).await;
}

#[tokio::test]
async fn a_task_past_its_deadline_is_retried_on_a_fresh_session_and_reported() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("deadline");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "2")]).await;
    // Hangs on its first run only: retried on a new session, it succeeds.
    amqp.publish_task(
        &q.tasks,
        &goto_task(
            "hang-once",
            format!("http://{addr}/hang-once?key=a"),
            json!({"timeout_ms": 10000}),
        ),
    )
    .await;
    // Hangs every time: reported as failed after max_attempts, with the history.
    amqp.publish_task(
        &q.tasks,
        &goto_task(
            "hang-always",
            format!("http://{addr}/hang"),
            json!({"timeout_ms": 2000, "max_attempts": 2}),
        ),
    )
    .await;
    let ids: HashSet<String> = ["hang-once", "hang-always"].map(String::from).into();
    let seen = answers(&amqp, &q.results, &ids, LIMIT, || w.log_text()).await;
    let once = &seen["hang-once"][0];
    assert_eq!(once.status, Status::Ok, "{once:?}");
    assert_eq!(once.attempts, 2);
    assert_eq!(once.outputs["title"], "answered the second time");
    let always = &seen["hang-always"][0];
    assert_eq!(always.status, Status::Failed);
    let e = always.error.as_ref().unwrap();
    assert_eq!(e.kind, "session_died");
    assert_eq!(e.history.len(), 2);
    assert!(
        e.history
            .iter()
            .all(|h| h.reason == "deadline" && h.step == Some(0)),
        "{e:?}"
    );
    assert_eq!(
        w.metric_eventually(
            "browserfleet_session_deaths_total{reason=\"deadline\"}",
            3.0
        )
        .await,
        3.0
    );
    // The hung browsers were killed, not left behind: only pool sessions remain.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(browser_mains(w.pid()).len() <= 2);
    q.delete(&amqp).await;
}

/// Closes the worker's AMQP connection through the management API, as a
/// broker restart or network cut would.
async fn close_connection_of(pid: i32) -> usize {
    let http = reqwest::Client::new();
    let list: Vec<serde_json::Value> = http
        .get("http://127.0.0.1:15672/api/connections")
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API on :15672 (rabbitmq-plugins enable rabbitmq_management; scripts/setup.sh --test)")
        .json()
        .await
        .unwrap();
    let mine = format!("browserfleet-{pid}");
    let mut closed = 0;
    for c in list {
        if c["client_properties"]["connection_name"] == mine.as_str() {
            let name = c["name"].as_str().unwrap();
            let url = format!("http://127.0.0.1:15672/api/connections/{}", urlencode(name));
            let r = http
                .delete(url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "closing {name}: {}", r.status());
            closed += 1;
        }
    }
    closed
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_dropped_broker_connection_loses_no_task() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("broker");
    let amqp = Amqp::connect().await;
    let w = Worker::start(
        &q,
        &[
            ("BROWSERFLEET__POOL__MAX_SIZE", "2"),
            // Long enough to observe the disconnected state from outside.
            ("BROWSERFLEET__AMQP__RECONNECT_INITIAL_MS", "2000"),
        ],
    )
    .await;
    let n = 30;
    let ids: HashSet<String> = (0..n).map(|i| format!("conn-{i}")).collect();
    for i in 0..n {
        amqp.publish_task(
            &q.tasks,
            &goto_task(
                &format!("conn-{i}"),
                format!("http://{addr}/slow?ms=300&n={i}"),
                json!({}),
            ),
        )
        .await;
    }
    let chaos = async {
        for round in 0..2 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while close_connection_of(w.pid()).await == 0 {
                assert!(
                    Instant::now() < deadline,
                    "worker never reconnected (round {round})"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // While it is away the worker says so.
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some((503, _)) = w.get("/readyz").await {
                    assert_eq!(w.metric("browserfleet_broker_connected").await, 0.0);
                    break;
                }
                assert!(Instant::now() < deadline, "/readyz never said 503");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        std::future::pending::<()>().await
    };
    let seen = tokio::select! {
        s = answers(&amqp, &q.results, &ids, LIMIT, || w.log_text()) => s,
        _ = chaos => unreachable!(),
    };
    for id in &ids {
        let rs = &seen[id];
        assert!(rs.iter().all(|r| r.status == Status::Ok), "{rs:?}");
        assert_eq!(rs.len(), 1, "{id} answered {} times", rs.len());
    }
    w.wait_ready().await;
    assert_eq!(w.metric("browserfleet_broker_connected").await, 1.0);
    assert_eq!(amqp.depth(&q.dead).await, 0);
    assert!(w.log_text().contains("broker connection lost"));
    q.delete(&amqp).await;
}

#[tokio::test]
async fn when_one_of_two_workers_is_sigkilled_the_other_finishes_and_no_browser_survives() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("twoworkers");
    let amqp = Amqp::connect().await;
    let env = [("BROWSERFLEET__POOL__MAX_SIZE", "2")];
    let mut doomed = Worker::start(&q, &env).await;
    let survivor = Worker::start(&q, &env).await;
    let n = 40;
    let ids: HashSet<String> = (0..n).map(|i| format!("two-{i}")).collect();
    for i in 0..n {
        amqp.publish_task(
            &q.tasks,
            &goto_task(
                &format!("two-{i}"),
                format!("http://{addr}/slow?ms=400&n={i}"),
                json!({}),
            ),
        )
        .await;
    }
    // Kill once the doomed worker is busy with browsers open.
    let deadline = Instant::now() + Duration::from_secs(60);
    while browser_mains(doomed.pid()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "doomed worker never opened a browser"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let orphans: Vec<(i32, Vec<String>)> = descendants(doomed.pid());
    assert!(orphans
        .iter()
        .any(|(_, a)| a.iter().any(|x| x.contains("chromedriver"))));
    doomed.signal(nix::sys::signal::Signal::SIGKILL);
    doomed.wait_exit(Duration::from_secs(10)).await;

    let seen = answers(&amqp, &q.results, &ids, LIMIT, || survivor.log_text()).await;
    for id in &ids {
        assert!(
            seen[id].iter().all(|r| r.status == Status::Ok),
            "{:?}",
            seen[id]
        );
    }
    // At-least-once across workers: a result confirmed by the killed worker
    // just before its ack was lost is answered again by the survivor. Only
    // tasks the killed worker had in flight (its prefetch) can be duplicated.
    let duplicated = ids.iter().filter(|id| seen[*id].len() > 1).count();
    assert!(duplicated <= 2, "{duplicated} duplicates");
    assert!(
        survivor
            .metric("browserfleet_tasks_total{outcome=\"ok\"}")
            .await
            >= 1.0
    );

    // Browsers and the driver of the SIGKILLed worker die with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: Vec<_> = orphans
            .iter()
            .filter(|(pid, args)| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        !c.is_empty()
                            && String::from_utf8_lossy(&c)
                                .contains(args.first().map(String::as_str).unwrap_or("?"))
                    })
                    .unwrap_or(false)
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the killed worker survive: {alive:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(amqp.depth(&q.dead).await, 0);
    q.delete(&amqp).await;
}

#[tokio::test]
async fn sigterm_finishes_or_hands_back_in_flight_tasks_and_exits_zero() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("sigterm");
    let amqp = Amqp::connect().await;
    // Tasks take 3 s; the drain deadline is 1 s, so the ones in flight are
    // handed back and a second worker finishes them.
    let mut w = Worker::start(
        &q,
        &[
            ("BROWSERFLEET__POOL__MAX_SIZE", "2"),
            ("BROWSERFLEET__WORKER__DRAIN_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let n = 6;
    let ids: HashSet<String> = (0..n).map(|i| format!("term-{i}")).collect();
    for i in 0..n {
        amqp.publish_task(
            &q.tasks,
            &goto_task(
                &format!("term-{i}"),
                format!("http://{addr}/slow?ms=3000&n={i}"),
                json!({}),
            ),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.metric("browserfleet_tasks_in_flight").await < 2.0 || browser_mains(w.pid()).len() < 2 {
        assert!(Instant::now() < deadline, "worker never got busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tree = descendants(w.pid());
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        w.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "log:\n{}",
        w.log_text()
    );
    assert!(w.log_text().contains("drain deadline passed"));
    for (pid, _) in &tree {
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_err()
                || std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| c.is_empty())
                    .unwrap_or(true),
            "process {pid} of the stopped worker survives"
        );
    }
    // Nothing was lost: a fresh worker answers every task exactly once.
    let _w2 = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "2")]).await;
    let seen = answers(&amqp, &q.results, &ids, LIMIT, || _w2.log_text()).await;
    for id in &ids {
        assert_eq!(seen[id].len(), 1, "{:?}", seen[id]);
        assert_eq!(seen[id][0].status, Status::Ok);
        assert_eq!(seen[id][0].attempts, 1, "a hand-back is not an attempt");
    }
    q.delete(&amqp).await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_tasks_finish_within_the_drain_deadline() {
    require_browser();
    let site = Site::default();
    let addr = site.start().await;
    let q = Queues::new("drain");
    let amqp = Amqp::connect().await;
    // A private TMPDIR shows that every profile directory goes away.
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_str().unwrap().to_string();
    let mut w = Worker::start(
        &q,
        &[("BROWSERFLEET__POOL__MAX_SIZE", "2"), ("TMPDIR", &tmp_path)],
    )
    .await;
    for i in 0..2 {
        amqp.publish_task(
            &q.tasks,
            &goto_task(
                &format!("drain-{i}"),
                format!("http://{addr}/slow?ms=2000&n={i}"),
                json!({}),
            ),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.metric("browserfleet_tasks_in_flight").await < 2.0 || browser_mains(w.pid()).len() < 2 {
        assert!(Instant::now() < deadline, "worker never got busy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        w.wait_exit(Duration::from_secs(40)).await,
        Some(0),
        "log:\n{}",
        w.log_text()
    );
    let results = amqp.results(&q.results, 2, Duration::from_secs(5)).await;
    assert!(results
        .values()
        .all(|r| r.status == Status::Ok && r.attempts == 1));
    assert_eq!(amqp.depth(&q.tasks).await, 0, "finished, not handed back");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "profile or scratch directories left behind: {left:?}"
    );
    q.delete(&amqp).await;
}

#[tokio::test]
async fn a_chromium_chromedriver_version_mismatch_refuses_to_start() {
    // A stand-in Chromium that reports another major version: the real
    // packages always match, so the mismatch cannot be produced otherwise.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("chromium");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'Chromium 12.0.1.2 built on Debian'\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let q = Queues::new("versions");
    let mut w = Worker::spawn(
        &q,
        &[("BROWSERFLEET__WEBDRIVER__CHROMIUM", fake.to_str().unwrap())],
    );
    let code = w.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(1), "log:\n{}", w.log_text());
    let log = w.log_text();
    assert!(
        log.contains("Chromium 12.0.1.2") && log.contains("ChromeDriver"),
        "{log}"
    );
    assert!(log.contains("apt-get install"), "says what to do: {log}");
}
