//! The producer side: `browserfleet enqueue` validates tasks, publishes them
//! with confirms and, with `--wait`, collects their results on a private
//! reply queue.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::Value;

use crate::broker::{Broker, BrokerError};
use crate::config::Settings;
use crate::task::{self, Status, TaskResult};

/// Why enqueueing failed. Nothing is published when the input is invalid.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The input could not be parsed or a task in it is invalid.
    #[error("{0}")]
    Input(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Not every result arrived in time.
    #[error("timed out after {waited:?} with {missing} result(s) missing: {ids}")]
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// How many results never came.
        missing: usize,
        /// Some of their ids.
        ids: String,
    },
    /// Writing results failed.
    #[error("writing results: {0}")]
    Io(#[from] std::io::Error),
}

/// What `enqueue` did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Tasks published.
    pub published: usize,
    /// Results received with status ok (with `--wait`).
    pub ok: usize,
    /// Results received with status failed (with `--wait`).
    pub failed: usize,
}

/// Splits input into task objects: one JSON object, a JSON array, or JSON lines.
/// Each task is validated as a worker would, so a bad one is refused here with
/// its position, and nothing is sent.
pub fn parse_tasks(
    input: &str,
    limits: task::Limits,
) -> Result<Vec<(String, Vec<u8>)>, EnqueueError> {
    let trimmed = input.trim_start();
    let values: Vec<(String, Value)> = if trimmed.starts_with('[') {
        let arr: Vec<Value> = serde_json::from_str(trimmed)
            .map_err(|e| EnqueueError::Input(format!("input is not a JSON array of tasks: {e}")))?;
        arr.into_iter()
            .enumerate()
            .map(|(i, v)| (format!("element {i}"), v))
            .collect()
    } else if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        vec![("the task".to_string(), v)]
    } else {
        let mut out = Vec::new();
        for (n, line) in input.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line).map_err(|e| {
                EnqueueError::Input(format!(
                    "line {}: not JSON ({e}); expected one task object per line, a JSON array, or one object",
                    n + 1
                ))
            })?;
            out.push((format!("line {}", n + 1), v));
        }
        out
    };
    if values.is_empty() {
        return Err(EnqueueError::Input("no tasks in the input".into()));
    }
    values
        .into_iter()
        .map(|(where_, v)| {
            let body = serde_json::to_vec(&v).expect("a Value always serializes");
            let task = task::decode(&body, limits)
                .map_err(|e| EnqueueError::Input(format!("{where_}: {}", e.reason)))?;
            Ok((task.id, body))
        })
        .collect()
}

/// Publishes `tasks` (confirmed); with `wait`, prints each result as a JSON
/// line to `out` until all arrived or `timeout` passed.
pub async fn enqueue(
    settings: &Settings,
    tasks: Vec<(String, Vec<u8>)>,
    wait: Option<Duration>,
    mut out: impl Write,
) -> Result<Summary, EnqueueError> {
    let broker = Broker::connect(&settings.amqp, 0).await?;
    // Declaring first means tasks are never dropped for want of a queue,
    // even before any worker has started.
    broker.declare_topology(&settings.amqp).await?;
    let mut summary = Summary::default();
    let reply = match wait {
        Some(_) => {
            let q = broker
                .channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::from)?;
            let name = q.name().as_str().to_string();
            let consumer = broker
                .channel
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::from)?;
            Some((name, consumer))
        }
        None => None,
    };
    let mut pending: HashMap<String, usize> = HashMap::new();
    for (id, body) in &tasks {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into());
        if let Some((q, _)) = &reply {
            props = props
                .with_reply_to(q.as_str().into())
                .with_correlation_id(id.as_str().into());
        }
        broker
            .publish(&settings.amqp.task_queue, body, props)
            .await?;
        *pending.entry(id.clone()).or_default() += 1;
        summary.published += 1;
    }
    if let (Some(limit), Some((_, mut consumer))) = (wait, reply) {
        let deadline = tokio::time::Instant::now() + limit;
        while !pending.is_empty() {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let delivery = match next {
                Ok(Some(Ok(d))) => d,
                Ok(Some(Err(e))) => return Err(BrokerError::from(e).into()),
                Ok(None) => break,
                Err(_) => {
                    let ids: Vec<_> = pending.keys().take(10).cloned().collect();
                    return Err(EnqueueError::Timeout {
                        waited: limit,
                        missing: pending.values().sum(),
                        ids: ids.join(", "),
                    });
                }
            };
            let line = String::from_utf8_lossy(&delivery.data);
            writeln!(out, "{line}")?;
            out.flush()?;
            if let Ok(r) = serde_json::from_slice::<TaskResult>(&delivery.data) {
                match r.status {
                    Status::Ok => summary.ok += 1,
                    Status::Failed => summary.failed += 1,
                }
                if let Some(n) = pending.get_mut(&r.id) {
                    *n -= 1;
                    if *n == 0 {
                        pending.remove(&r.id);
                    }
                }
            }
        }
    }
    let _ = broker.connection.close(200, "done".into()).await;
    Ok(summary)
}
