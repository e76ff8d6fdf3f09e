//! Runs a task's steps on one browser session. Every WebDriver command runs
//! under `webdriver.command_timeout_ms`; every error is classified by
//! [`crate::browser::classify`] into a page failure or a dead session.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use fantoccini::error::{CmdError, ErrorStatus};
use fantoccini::{Client, Locator};
use serde_json::{json, Map, Value};

use crate::browser::{classify, Failure};
use crate::task::Step;

/// Timeouts the step runner applies.
#[derive(Debug, Clone, Copy)]
pub struct StepTimeouts {
    /// Longest any single WebDriver command may take.
    pub command: Duration,
    /// `wait_for` without its own `timeout_ms`.
    pub default_wait: Duration,
}

/// The step that failed and why.
#[derive(Debug, Clone)]
pub struct StepFailure {
    /// 0-based index into the task's steps.
    pub step: usize,
    /// What the failure means.
    pub failure: Failure,
}

/// Runs `steps` in order into `outputs`; stops at the first failure.
/// `progress` holds the index of the step running, for a deadline report.
pub async fn run(
    client: &Client,
    steps: &[Step],
    timeouts: StepTimeouts,
    outputs: &mut Map<String, Value>,
    progress: &AtomicUsize,
) -> Result<(), StepFailure> {
    for (i, step) in steps.iter().enumerate() {
        progress.store(i, Ordering::Relaxed);
        run_one(client, step, timeouts, outputs)
            .await
            .map_err(|failure| StepFailure { step: i, failure })?;
    }
    Ok(())
}

async fn run_one(
    client: &Client,
    step: &Step,
    t: StepTimeouts,
    outputs: &mut Map<String, Value>,
) -> Result<(), Failure> {
    let css = Locator::Css;
    match step {
        Step::Goto { url } => cmd(t, "goto", client.goto(url)).await?,
        Step::WaitFor {
            selector,
            timeout_ms,
        } => {
            let limit = timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(t.default_wait);
            wait_for(client, selector, limit, t).await?;
        }
        Step::Click { selector } => {
            let el = cmd(t, "find", client.find(css(selector))).await?;
            cmd(t, "click", el.click()).await?;
        }
        Step::Fill { selector, value } => {
            let el = cmd(t, "find", client.find(css(selector))).await?;
            cmd(t, "clear", el.clear()).await?;
            cmd(t, "send_keys", el.send_keys(&value.0)).await?;
        }
        Step::Text { selector, key } => {
            let el = cmd(t, "find", client.find(css(selector))).await?;
            let text = cmd(t, "text", el.text()).await?;
            outputs.insert(key.clone(), json!(text));
        }
        Step::TextAll { selector, key } => {
            // One round-trip for any number of matches; innerText is what
            // WebDriver's "get element text" returns for visible elements.
            let script =
                "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText);";
            let v = cmd(t, "text_all", client.execute(script, vec![json!(selector)])).await?;
            outputs.insert(key.clone(), v);
        }
        Step::Attr {
            selector,
            name,
            key,
        } => {
            let el = cmd(t, "find", client.find(css(selector))).await?;
            let v = cmd(t, "attr", el.attr(name)).await?;
            outputs.insert(key.clone(), json!(v));
        }
        Step::Html { selector, key } => {
            let html = match selector {
                Some(s) => {
                    let el = cmd(t, "find", client.find(css(s))).await?;
                    cmd(t, "html", el.html(false)).await?
                }
                None => cmd(t, "source", client.source()).await?,
            };
            outputs.insert(key.clone(), json!(html));
        }
        Step::Eval { script, key } => {
            let v = cmd(t, "eval", client.execute(script, vec![])).await?;
            outputs.insert(key.clone(), v);
        }
        Step::Screenshot { key } => {
            let png = cmd(t, "screenshot", client.screenshot()).await?;
            outputs.insert(
                key.clone(),
                json!(base64::engine::general_purpose::STANDARD.encode(png)),
            );
        }
        Step::Sleep { ms } => tokio::time::sleep(Duration::from_millis(*ms)).await,
    }
    Ok(())
}

/// Polls for `selector` until it matches or `limit` passes.
async fn wait_for(
    client: &Client,
    selector: &str,
    limit: Duration,
    t: StepTimeouts,
) -> Result<(), Failure> {
    let deadline = Instant::now() + limit;
    loop {
        match tokio::time::timeout(t.command, client.find(Locator::Css(selector))).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(CmdError::Standard(wd))) if wd.error == ErrorStatus::NoSuchElement => {}
            Ok(Err(e)) => return Err(classify(&e)),
            Err(_) => {
                return Err(Failure::command_timeout(
                    "find",
                    t.command.as_millis() as u64,
                ))
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure::Page {
                kind: "timeout",
                message: format!(
                    "`{selector}` did not appear within {} ms",
                    limit.as_millis()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one WebDriver command under the command timeout and classifies its error.
async fn cmd<T>(
    t: StepTimeouts,
    what: &str,
    fut: impl Future<Output = Result<T, CmdError>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(t.command, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(Failure::command_timeout(what, t.command.as_millis() as u64)),
    }
}
