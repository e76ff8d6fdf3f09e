//! The core loop end to end: real RabbitMQ, real chromedriver + Chromium,
//! pages served locally. Each test runs its own worker on private queues.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use browserfleet::task::Status;
use common::*;
use lapin::types::AMQPValue;
use lapin::BasicProperties;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn every_step_action_runs_end_to_end() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("steps");
    let amqp = Amqp::connect().await;
    let _w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;

    let task = json!({"id": "all-steps", "timeout_ms": 60000, "steps": [
        {"action": "goto", "url": pages.url("/")},
        {"action": "wait_for", "selector": "#late", "timeout_ms": 5000},
        {"action": "text", "selector": "#late", "as": "late"},
        {"action": "fill", "selector": "#name", "value": "fleet"},
        {"action": "click", "selector": "#go"},
        {"action": "text", "selector": "#out", "as": "out"},
        {"action": "text", "selector": "h1", "as": "heading"},
        {"action": "text_all", "selector": "#list li", "as": "items"},
        {"action": "attr", "selector": "#more", "name": "data-kind", "as": "kind"},
        {"action": "attr", "selector": "#more", "name": "nonexistent", "as": "missing"},
        {"action": "html", "selector": "#list", "as": "list_html"},
        {"action": "html", "as": "page"},
        {"action": "eval", "script": "return {n: document.querySelectorAll('li').length, t: document.title}", "as": "info"},
        {"action": "sleep", "ms": 50},
        {"action": "screenshot", "as": "shot"}
    ]});
    amqp.publish_task(&q.tasks, &task).await;
    let results = amqp.results(&q.results, 1, LIMIT).await;
    let r = &results["all-steps"];
    assert_eq!(r.status, Status::Ok, "{r:?}");
    assert_eq!(r.attempts, 1);
    assert!(r.error.is_none());
    let o = &r.outputs;
    assert_eq!(o["late"], "arrived late");
    assert_eq!(o["out"], "clicked fleet");
    assert_eq!(o["heading"], "Example Domain");
    assert_eq!(o["items"], json!(["alpha", "beta", "gamma"]));
    assert_eq!(o["kind"], "link");
    assert_eq!(o["missing"], json!(null));
    assert!(o["list_html"]
        .as_str()
        .unwrap()
        .starts_with("<ul id=\"list\">"));
    assert!(o["page"]
        .as_str()
        .unwrap()
        .contains("browserfleet test page"));
    assert_eq!(o["info"], json!({"n": 3, "t": "browserfleet test page"}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(o["shot"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "screenshot is a PNG");
    assert!(!r.worker.is_empty());
    q.delete(&amqp).await;
}

#[tokio::test]
async fn results_go_to_reply_to_with_correlation_id_else_to_the_result_queue() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("reply");
    let amqp = Amqp::connect().await;
    let reply = amqp
        .channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let reply = reply.name().as_str().to_string();
    let _w = Worker::start(&q, &[]).await;
    let task = |id: &str| {
        json!({"id": id, "steps": [{"action": "goto", "url": pages.url("/")},
                                   {"action": "text", "selector": "h1", "as": "heading"}]})
        .to_string()
    };
    // reply_to with a correlation id, reply_to without one, and neither.
    let props = BasicProperties::default()
        .with_reply_to(reply.as_str().into())
        .with_correlation_id("corr-7".into());
    amqp.publish(&q.tasks, task("with-corr").as_bytes(), props)
        .await;
    let props = BasicProperties::default().with_reply_to(reply.as_str().into());
    amqp.publish(&q.tasks, task("no-corr").as_bytes(), props)
        .await;
    amqp.publish(
        &q.tasks,
        task("to-results").as_bytes(),
        BasicProperties::default(),
    )
    .await;

    let mut replies = amqp.take(&reply, 2, LIMIT).await;
    replies.sort_by_key(|d| d.properties.correlation_id().clone().unwrap().to_string());
    let corr: Vec<String> = replies
        .iter()
        .map(|d| d.properties.correlation_id().clone().unwrap().to_string())
        .collect();
    assert_eq!(
        corr,
        ["corr-7", "no-corr"],
        "correlation id copied, else the task id"
    );
    for d in &replies {
        assert_eq!(
            d.properties.delivery_mode(),
            &Some(2),
            "results are persistent"
        );
        let r: browserfleet::task::TaskResult = serde_json::from_slice(&d.data).unwrap();
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.outputs["heading"], "Example Domain");
    }
    let results = amqp.results(&q.results, 1, LIMIT).await;
    assert!(results.contains_key("to-results"));
    assert_eq!(
        amqp.depth(&q.results).await,
        0,
        "reply_to results are not duplicated"
    );
    q.delete(&amqp).await;
}

#[tokio::test]
async fn a_missing_selector_gives_a_failed_result_and_the_session_stays() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("missing");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;
    amqp.publish_task(
        &q.tasks,
        &json!({"id": "missing", "steps": [
            {"action": "goto", "url": pages.url("/")},
            {"action": "text", "selector": "h1", "as": "heading"},
            {"action": "text", "selector": "#does-not-exist", "as": "x"}]}),
    )
    .await;
    amqp.publish_task(
        &q.tasks,
        &json!({"id": "wait-timeout", "steps": [
            {"action": "goto", "url": pages.url("/")},
            {"action": "wait_for", "selector": "#never", "timeout_ms": 300}]}),
    )
    .await;
    amqp.publish_task(
        &q.tasks,
        &json!({"id": "script-error", "steps": [
            {"action": "eval", "script": "throw new Error('boom')", "as": "x"}]}),
    )
    .await;
    let results = amqp.results(&q.results, 3, LIMIT).await;
    let r = &results["missing"];
    assert_eq!(r.status, Status::Failed);
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.kind, "no_such_element");
    assert_eq!(e.step, Some(2));
    assert_eq!(
        r.outputs["heading"], "Example Domain",
        "outputs before the failure are kept"
    );
    let e = results["wait-timeout"].error.as_ref().unwrap();
    assert_eq!((e.kind.as_str(), e.step), ("timeout", Some(1)));
    let e = results["script-error"].error.as_ref().unwrap();
    assert_eq!((e.kind.as_str(), e.step), ("script_error", Some(0)));
    assert!(e.message.contains("boom"), "{}", e.message);
    // Page failures are acked, not retried, and do not kill the session.
    assert_eq!(
        w.metric_eventually("browserfleet_tasks_total{outcome=\"failed\"}", 3.0)
            .await,
        3.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_tasks_total{outcome=\"republished\"}", 0.0)
            .await,
        0.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_sessions_created_total", 1.0)
            .await,
        1.0
    );
    assert_eq!(amqp.depth(&q.tasks).await, 0);
    assert_eq!(amqp.depth(&q.dead).await, 0);
    q.delete(&amqp).await;
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_and_the_worker_carries_on() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("invalid");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;
    amqp.publish(&q.tasks, b"this is not json", BasicProperties::default())
        .await;
    amqp.publish_task(
        &q.tasks,
        &json!({"id": "bad-action", "steps": [{"action": "hover", "selector": "h1"}]}),
    )
    .await;
    amqp.publish_task(&q.tasks, &json!({"id": 17, "steps": []}))
        .await;
    amqp.publish_task(
        &q.tasks,
        &json!({"id": "good", "steps": [{"action": "goto", "url": pages.url("/")},
                                        {"action": "text", "selector": "h1", "as": "h"}]}),
    )
    .await;

    let dead = amqp.take(&q.dead, 3, LIMIT).await;
    for d in &dead {
        let h = d.properties.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("x-browserfleet-reason"),
            Some(&AMQPValue::LongString("invalid_task".into()))
        );
        assert!(h.contains_key("x-browserfleet-detail"));
    }
    let bodies: Vec<_> = dead.iter().map(|d| d.data.clone()).collect();
    assert!(
        bodies.contains(&b"this is not json".to_vec()),
        "the original body is kept"
    );

    // "bad-action" had a usable id, so its producer gets an answer; "17" did not.
    let results = amqp.results(&q.results, 2, LIMIT).await;
    let bad = &results["bad-action"];
    assert_eq!(bad.status, Status::Failed);
    let e = bad.error.as_ref().unwrap();
    assert_eq!(e.kind, "invalid_task");
    assert!(
        e.message.contains("steps[0]") && e.message.contains("hover"),
        "{}",
        e.message
    );
    assert_eq!(results["good"].status, Status::Ok);
    assert_eq!(
        w.metric_eventually(
            "browserfleet_dead_lettered_total{reason=\"invalid_task\"}",
            3.0
        )
        .await,
        3.0
    );
    assert_eq!(amqp.depth(&q.tasks).await, 0, "nothing left behind");
    q.delete(&amqp).await;
}

#[tokio::test]
async fn a_session_killed_between_tasks_is_caught_by_the_health_check_and_replaced() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("recycle");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "1")]).await;
    let task = |id: &str| {
        json!({"id": id, "steps": [{"action": "goto", "url": pages.url("/")},
                                   {"action": "text", "selector": "h1", "as": "h"}]})
    };
    amqp.publish_task(&q.tasks, &task("before")).await;
    let r = amqp.results(&q.results, 1, LIMIT).await;
    assert_eq!(r["before"].status, Status::Ok);

    let browsers = browser_mains(w.pid());
    assert_eq!(browsers.len(), 1, "one session's browser runs");
    kill9(browsers[0]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    amqp.publish_task(&q.tasks, &task("after")).await;
    let r = amqp.results(&q.results, 1, LIMIT).await;
    let after = &r["after"];
    assert_eq!(after.status, Status::Ok, "{after:?}");
    assert_eq!(
        after.attempts, 1,
        "caught before the task ran, not by a retry"
    );
    assert_eq!(
        w.metric_eventually(
            "browserfleet_session_deaths_total{reason=\"health_check\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        w.metric_eventually(
            "browserfleet_session_recycles_total{reason=\"health\"}",
            1.0
        )
        .await,
        1.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_session_recoveries_total", 1.0)
            .await,
        1.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_sessions_created_total", 2.0)
            .await,
        2.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_tasks_total{outcome=\"republished\"}", 0.0)
            .await,
        0.0
    );
    assert!(w.log_text().contains("Session appears dead"));
    q.delete(&amqp).await;
}

#[tokio::test]
async fn the_pool_never_exceeds_max_size_under_three_times_the_load() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("bounded");
    let amqp = Amqp::connect().await;
    let w = Worker::start(&q, &[("BROWSERFLEET__POOL__MAX_SIZE", "2")]).await;
    for i in 0..6 {
        amqp.publish_task(
            &q.tasks,
            &json!({"id": format!("slow-{i}"), "steps": [
                {"action": "goto", "url": pages.url(&format!("/slow?ms=600&n={i}"))},
                {"action": "text", "selector": "h1", "as": "h"}]}),
        )
        .await;
    }
    // Sample the worker's browsers while the tasks run.
    let mut most_browsers = 0;
    let sampler = async {
        loop {
            most_browsers = most_browsers.max(browser_mains(w.pid()).len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let results = tokio::select! {
        r = amqp.results(&q.results, 6, LIMIT) => r,
        _ = sampler => unreachable!(),
    };
    for i in 0..6 {
        let r = &results[&format!("slow-{i}")];
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.outputs["h"], format!("slow {i}"));
    }
    assert_eq!(
        pages.max_concurrent.load(Ordering::SeqCst),
        2,
        "exactly max_size page loads at once: bounded, and parallel"
    );
    assert!(most_browsers <= 2, "saw {most_browsers} browsers");
    assert_eq!(
        w.metric_eventually("browserfleet_sessions_created_total", 2.0)
            .await,
        2.0
    );
    assert_eq!(
        w.metric_eventually("browserfleet_pool_max_size", 2.0).await,
        2.0
    );
    assert!(w.metric("browserfleet_pool_size").await <= 2.0);
    q.delete(&amqp).await;
}

#[tokio::test]
async fn enqueue_publishes_tasks_and_waits_for_their_results() {
    require_browser();
    let pages = Pages::start().await;
    let q = Queues::new("enqueue");
    let amqp = Amqp::connect().await;
    let _w = Worker::start(&q, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tasks.jsonl");
    let lines = [
        json!({"id": "e-ok", "steps": [{"action": "goto", "url": pages.url("/")},
                                       {"action": "text", "selector": "h1", "as": "h"}]}),
        json!({"id": "e-missing", "steps": [{"action": "goto", "url": pages.url("/")},
                                            {"action": "text", "selector": "#nope", "as": "h"}]}),
    ];
    std::fs::write(
        &file,
        lines
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_browserfleet");
    let out = tokio::process::Command::new(bin)
        .args(["enqueue", "--wait", "--timeout", "90"])
        .arg(&file)
        .envs(q.env())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "exit 1: a task failed");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let mut results: Vec<browserfleet::task::TaskResult> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a result"))
        .collect();
    results.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(results.len(), 2, "{stdout}");
    assert_eq!(
        (results[0].id.as_str(), results[0].status),
        ("e-missing", Status::Failed)
    );
    assert_eq!(
        (results[1].id.as_str(), results[1].status),
        ("e-ok", Status::Ok)
    );
    assert_eq!(results[1].outputs["h"], "Example Domain");
    assert_eq!(
        amqp.depth(&q.results).await,
        0,
        "answers went to the private reply queue"
    );

    // A bad task anywhere refuses the whole batch, naming its line: nothing is sent.
    std::fs::write(
        &file,
        format!(
            "{}\n{{\"id\": \"x\", \"steps\": [{{\"action\": \"goto\"}}]}}\n",
            lines[0]
        ),
    )
    .unwrap();
    let out = tokio::process::Command::new(bin)
        .arg("enqueue")
        .arg(&file)
        .envs(q.env())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("line 2") && stderr.contains("missing field `url`"),
        "{stderr}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(amqp.depth(&q.tasks).await, 0, "nothing published");
    q.delete(&amqp).await;
}

#[tokio::test]
async fn check_config_shows_file_under_env_precedence_and_bad_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        "[pool]\nmax_size = 3\n[amqp]\ntask_queue = \"from-file\"\nurl = \"amqp://bob:s3cret@mq:5672/%2f\"\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_browserfleet");
    let out = std::process::Command::new(bin)
        .args(["check-config", "--config"])
        .arg(&file)
        .env("BROWSERFLEET__POOL__MAX_SIZE", "5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["pool"]["max_size"], 5, "env beats file");
    assert_eq!(
        cfg["amqp"]["task_queue"], "from-file",
        "file beats defaults"
    );
    assert_eq!(
        cfg["amqp"]["result_queue"], "browserfleet.results",
        "defaults fill the rest"
    );
    assert_eq!(
        cfg["amqp"]["url"], "amqp://bob:***@mq:5672/%2f",
        "password redacted"
    );

    let out = std::process::Command::new(bin)
        .arg("check-config")
        .env("BROWSERFLEET__POOL__MAX_SIZE", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pool.max_size"), "{stderr}");
}
