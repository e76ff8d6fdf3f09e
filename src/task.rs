//! The wire contract: task messages producers send, result messages workers
//! publish, and the decoding of one into a clear error when it is malformed.
//!
//! This module knows JSON and nothing of AMQP or WebDriver.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A browser task: an id and the steps to run, in order, on one session.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Task {
    /// Producer-chosen id, echoed in the result.
    pub id: String,
    /// Steps, run in order; the first failure ends the task.
    pub steps: Vec<Step>,
    /// Deadline for the whole task, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Runs that may end with a dead session before the task is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// One step of a task. `as` names the key of its output in the result.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
#[allow(missing_docs)]
pub enum Step {
    /// Navigate and wait for the page's load event.
    Goto {
        url: String,
    },
    /// Wait until `selector` matches an element.
    WaitFor {
        selector: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    Click {
        selector: String,
    },
    /// Clear the field, then type `value` into it.
    Fill {
        selector: String,
        value: Secret,
    },
    /// The rendered text of the first match.
    Text {
        selector: String,
        #[serde(rename = "as")]
        key: String,
    },
    /// The rendered text of every match, as a list.
    TextAll {
        selector: String,
        #[serde(rename = "as")]
        key: String,
    },
    /// An attribute of the first match (`null` when absent).
    Attr {
        selector: String,
        name: String,
        #[serde(rename = "as")]
        key: String,
    },
    /// The outer HTML of the first match, or the whole page without `selector`.
    Html {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        selector: Option<String>,
        #[serde(rename = "as")]
        key: String,
    },
    /// Run `script` as a function body; its `return` value, as JSON.
    Eval {
        script: String,
        #[serde(rename = "as")]
        key: String,
    },
    /// A PNG of the viewport, base64.
    Screenshot {
        #[serde(rename = "as")]
        key: String,
    },
    Sleep {
        ms: u64,
    },
}

impl Step {
    /// The action name as it appears on the wire.
    pub fn action(&self) -> &'static str {
        match self {
            Step::Goto { .. } => "goto",
            Step::WaitFor { .. } => "wait_for",
            Step::Click { .. } => "click",
            Step::Fill { .. } => "fill",
            Step::Text { .. } => "text",
            Step::TextAll { .. } => "text_all",
            Step::Attr { .. } => "attr",
            Step::Html { .. } => "html",
            Step::Eval { .. } => "eval",
            Step::Screenshot { .. } => "screenshot",
            Step::Sleep { .. } => "sleep",
        }
    }
}

/// A value a task carries that must not be logged (a password typed by `fill`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Why a message could not be decoded into a [`Task`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTask {
    /// The message's `id`, when it had a usable one: it still gets a result.
    pub id: Option<String>,
    /// What is wrong, where, and what was expected.
    pub reason: String,
}

impl fmt::Display for InvalidTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for InvalidTask {}

/// Bounds a decoded task must respect, from the worker's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest acceptable `timeout_ms`.
    pub max_timeout_ms: u64,
}

/// Decodes a message body into a task, or says exactly what is wrong with it.
pub fn decode(body: &[u8], limits: Limits) -> Result<Task, InvalidTask> {
    let value: Value = serde_json::from_slice(body).map_err(|e| InvalidTask {
        id: None,
        reason: format!("body is not JSON ({e}): expected a JSON object with `id` and `steps`"),
    })?;
    let id = match value.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    if !value.is_object() {
        return Err(InvalidTask {
            id,
            reason: "body is not a JSON object: expected {\"id\": ..., \"steps\": [...]}".into(),
        });
    }
    let task: Task = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            "task".to_string()
        } else {
            format!("`{path}`")
        };
        InvalidTask {
            id: id.clone(),
            reason: format!("{at}: {}", e.inner()),
        }
    })?;
    let bad = |reason: String| InvalidTask {
        id: Some(task.id.clone()),
        reason,
    };
    if task.id.is_empty() {
        return Err(InvalidTask {
            id: None,
            reason: "`id`: must not be empty".into(),
        });
    }
    match task.timeout_ms {
        Some(0) => return Err(bad("`timeout_ms`: must be at least 1".into())),
        Some(t) if t > limits.max_timeout_ms => {
            return Err(bad(format!(
                "`timeout_ms`: {t} exceeds this worker's task.max_timeout_ms ({})",
                limits.max_timeout_ms
            )))
        }
        _ => {}
    }
    if task.max_attempts == Some(0) {
        return Err(bad("`max_attempts`: must be at least 1".into()));
    }
    Ok(task)
}

/// Final status of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every step ran.
    Ok,
    /// A step failed on the page, the task was invalid, or sessions kept dying.
    Failed,
}

/// The result message published for every task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task's id.
    pub id: String,
    /// `ok` or `failed`.
    pub status: Status,
    /// Runs of this task, this one included.
    pub attempts: u32,
    /// Step outputs keyed by their `as`.
    pub outputs: Map<String, Value>,
    /// Why it failed; `null` when ok.
    pub error: Option<TaskError>,
    /// The worker that produced this result.
    pub worker: String,
    /// Time spent on the final run, in milliseconds.
    pub duration_ms: u64,
}

/// Why a task failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskError {
    /// Machine-readable kind: `no_such_element`, `timeout`, `script_error`,
    /// `invalid_task`, `session_died`, ...
    pub kind: String,
    /// Human-readable detail.
    pub message: String,
    /// 0-based index of the failing step, when one failed.
    #[serde(default)]
    pub step: Option<usize>,
    /// For `session_died`: what ended each attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
}

/// One run of a task that ended with its session dead.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttemptRecord {
    /// 1-based attempt number.
    pub attempt: u32,
    /// Death reason (`unreachable`, `invalid_session`, `deadline`, ...).
    pub reason: String,
    /// Detail of what was seen.
    pub message: String,
    /// Step running when the session died.
    #[serde(default)]
    pub step: Option<usize>,
    /// Worker that ran the attempt.
    pub worker: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_timeout_ms: 600_000,
    };

    #[test]
    fn decodes_every_action() {
        let body = br#"{"id":"job-42","timeout_ms":60000,"max_attempts":3,"steps":[
            {"action":"goto","url":"http://x/"},
            {"action":"wait_for","selector":"h1","timeout_ms":5000},
            {"action":"click","selector":"a"},
            {"action":"fill","selector":"input","value":"pw"},
            {"action":"text","selector":"h1","as":"heading"},
            {"action":"text_all","selector":"li","as":"items"},
            {"action":"attr","selector":"a","name":"href","as":"link"},
            {"action":"html","as":"page"},
            {"action":"eval","script":"return 1","as":"one"},
            {"action":"screenshot","as":"png"},
            {"action":"sleep","ms":5}]}"#;
        let t = decode(body, LIMITS).unwrap();
        assert_eq!(t.id, "job-42");
        let actions: Vec<_> = t.steps.iter().map(Step::action).collect();
        assert_eq!(
            actions,
            [
                "goto",
                "wait_for",
                "click",
                "fill",
                "text",
                "text_all",
                "attr",
                "html",
                "eval",
                "screenshot",
                "sleep"
            ]
        );
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = decode(b"nope", LIMITS).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.reason.contains("not JSON"), "{}", e.reason);

        let e = decode(br#"{"steps":[]}"#, LIMITS).unwrap_err();
        assert_eq!(e.id, None);
        assert!(e.reason.contains("missing field `id`"), "{}", e.reason);

        let e = decode(br#"{"id":7,"steps":[]}"#, LIMITS).unwrap_err();
        assert_eq!(e.id, None, "a numeric id is not usable");

        let e = decode(
            br#"{"id":"a","steps":[{"action":"goto","url":"u"},{"action":"hover"}]}"#,
            LIMITS,
        )
        .unwrap_err();
        assert_eq!(e.id.as_deref(), Some("a"));
        assert!(
            e.reason.contains("steps[1]") && e.reason.contains("unknown variant `hover`"),
            "{}",
            e.reason
        );

        let e = decode(
            br#"{"id":"a","steps":[{"action":"sleep","ms":"5"}]}"#,
            LIMITS,
        )
        .unwrap_err();
        assert!(
            e.reason.contains("steps[0]") && e.reason.contains("invalid type"),
            "{}",
            e.reason
        );

        let e = decode(br#"{"id":"a","steps":[],"timeout_ms":999999999}"#, LIMITS).unwrap_err();
        assert!(e.reason.contains("timeout_ms"), "{}", e.reason);
    }

    #[test]
    fn fill_values_are_redacted_in_debug() {
        let t = decode(
            br##"{"id":"a","steps":[{"action":"fill","selector":"#pw","value":"hunter2"}]}"##,
            LIMITS,
        )
        .unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }
}
