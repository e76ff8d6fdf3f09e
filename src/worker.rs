//! The worker loop: one task from delivery to ack.
//!
//! Ordering rules that keep every task answered exactly once:
//! - a delivery is acked only after whatever replaces it (its result, its
//!   republished copy, its dead-letter copy) is confirmed by the broker;
//! - a session that died is discarded, never returned to the pool;
//! - attempts are counted in a header on republish and from redeliveries, so a
//!   task that keeps killing browsers (or workers) ends dead-lettered.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool::managed::Object;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde_json::Map;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::broker::{self, Broker, BrokerError};
use crate::browser::{self, Driver, Failure, Pool};
use crate::config::{ms, Settings};
use crate::http;
use crate::metrics::Metrics;
use crate::steps::{self, StepFailure, StepTimeouts};
use crate::task::{self, AttemptRecord, InvalidTask, Status, Task, TaskError, TaskResult};

/// Why the worker could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The WebDriver endpoint could not be set up.
    #[error(transparent)]
    Driver(#[from] browser::driver::DriverError),
    /// The metrics listener could not bind.
    #[error("cannot listen on metrics.listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The broker rejected the topology (e.g. a queue exists with other arguments).
    #[error("declaring queues failed: {0} (does a queue of that name exist with another type or arguments? see amqp.queue_type)")]
    Topology(BrokerError),
}

/// Shared state of the running worker.
struct Ctx {
    settings: Settings,
    name: String,
    metrics: Metrics,
    pool: Pool,
    timeouts: StepTimeouts,
    limits: task::Limits,
    completed: Mutex<CompletedIds>,
}

/// Runs a worker until `shutdown` fires, then drains and exits cleanly.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(settings.metrics.listen)
        .await
        .map_err(|source| WorkerError::Listen {
            addr: settings.metrics.listen,
            source,
        })?;
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "metrics, health and sessions endpoints listening");
    let driver = Driver::start(&settings.webdriver, metrics.clone()).await?;
    let pool = browser::build_pool(&settings, &driver, metrics.clone());
    metrics.observe_pool(pool.status());
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        http::State {
            metrics: metrics.clone(),
            pool: pool.clone(),
            ready: ready.clone(),
        },
        http_stop.clone(),
    ));

    let name = settings.worker_name();
    info!(worker = %name, amqp = %settings.amqp.url, task_queue = %settings.amqp.task_queue,
        pool_max_size = settings.pool.max_size, webdriver = %driver.url(), "worker starting");
    let ctx = Arc::new(Ctx {
        timeouts: StepTimeouts {
            command: ms(settings.webdriver.command_timeout_ms),
            default_wait: ms(settings.task.default_wait_timeout_ms),
        },
        limits: task::Limits {
            max_timeout_ms: settings.task.max_timeout_ms,
        },
        completed: Mutex::new(CompletedIds::new(settings.worker.completed_ids_memory)),
        name,
        metrics: metrics.clone(),
        pool: pool.clone(),
        settings,
    });

    let in_flight = TaskTracker::new();
    let drain_expired = CancellationToken::new();
    let result = consume_until_shutdown(&ctx, &ready, &in_flight, &drain_expired, &shutdown).await;

    // Drain: in-flight tasks get `drain_timeout_ms` to finish; past it they
    // nack their delivery with requeue and discard their session.
    ready.store(false, Ordering::SeqCst);
    in_flight.close();
    let drain = ms(ctx.settings.worker.drain_timeout_ms);
    if !in_flight.is_empty() {
        info!(tasks = in_flight.len(), ?drain, "draining in-flight tasks");
    }
    if tokio::time::timeout(drain, in_flight.wait()).await.is_err() {
        warn!(
            tasks = in_flight.len(),
            "drain deadline passed; requeueing what is left"
        );
        drain_expired.cancel();
        in_flight.wait().await;
    }
    let broker = result?;
    if let Some(b) = broker {
        let _ = b.connection.close(200, "worker stopping".into()).await;
    }
    metrics.broker_connected.set(0);
    pool.close();
    pool.manager().wait_cleanups().await;
    driver.stop().await;
    http_stop.cancel();
    let _ = http_task.await;
    info!("worker stopped");
    Ok(())
}

/// Connects (with backoff, forever), consumes, and spawns a handler per
/// delivery, until shutdown. Returns the live broker, if any, for closing.
async fn consume_until_shutdown(
    ctx: &Arc<Ctx>,
    ready: &AtomicBool,
    in_flight: &TaskTracker,
    drain_expired: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Broker>>, WorkerError> {
    let amqp = &ctx.settings.amqp;
    let mut backoff = ms(amqp.reconnect_initial_ms);
    let mut first = true;
    let tag = format!("{}-{}", ctx.name, uuid::Uuid::new_v4().simple());
    loop {
        let prefetch = ctx.settings.pool.max_size.min(u16::MAX as usize) as u16;
        let connected = tokio::select! {
            r = Broker::connect(amqp, prefetch) => r,
            _ = shutdown.cancelled() => return Ok(None),
        };
        let broker = match connected {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, amqp = %amqp.url, "broker connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Ok(None),
                }
                backoff = (backoff * 2).min(ms(amqp.reconnect_max_ms));
                continue;
            }
        };
        if let Err(e) = broker.declare_topology(amqp).await {
            if first {
                return Err(WorkerError::Topology(e));
            }
            warn!(error = %e, "declaring topology failed; reconnecting");
            continue;
        }
        let mut consumer = match broker.consume(&amqp.task_queue, &tag).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "consume failed; reconnecting");
                continue;
            }
        };
        first = false;
        backoff = ms(amqp.reconnect_initial_ms);
        let broker = Arc::new(broker);
        ready.store(true, Ordering::SeqCst);
        ctx.metrics.broker_connected.set(1);
        info!(queue = %amqp.task_queue, prefetch, "connected to broker; consuming");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    info!("shutdown requested: no new tasks will be taken");
                    let _ = broker.channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    return Ok(Some(broker));
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let (ctx, broker, drain) = (ctx.clone(), broker.clone(), drain_expired.clone());
                        in_flight.spawn(async move { handle(ctx, broker, delivery, drain).await });
                    }
                    Some(Err(e)) => { warn!(error = %e, "broker connection lost"); break; }
                    None => { warn!("consumer was cancelled by the broker"); break; }
                }
            }
        }
        // Deliveries in flight on the lost connection are redelivered by the
        // broker; their handlers' acks fail harmlessly on the dead channel.
        ready.store(false, Ordering::SeqCst);
        ctx.metrics.broker_connected.set(0);
        let _ = broker.connection.close(320, "reconnecting".into()).await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
    }
}

/// Handles one delivery from decoding to ack.
async fn handle(ctx: Arc<Ctx>, broker: Arc<Broker>, delivery: Delivery, drain: CancellationToken) {
    ctx.metrics.tasks_in_flight.inc();
    let headers = delivery.properties.headers().as_ref();
    // A redelivery means a run ended with no answer (worker, browser or
    // connection died): it counts as an attempt, so poison never loops.
    let redeliveries = if delivery.redelivered {
        broker::header_int(headers, "x-delivery-count")
            .unwrap_or(1)
            .max(1)
    } else {
        0
    };
    let attempt = (broker::header_int(headers, broker::ATTEMPT_HEADER)
        .unwrap_or(1)
        .max(1)
        + redeliveries)
        .min(u32::MAX as i64) as u32;
    match task::decode(&delivery.data, ctx.limits) {
        Err(invalid) => {
            let span = tracing::info_span!(
                "task",
                task_id = invalid.id.as_deref().unwrap_or("?"),
                attempt
            );
            ctx.reject_invalid(&broker, &delivery, invalid)
                .instrument(span)
                .await
        }
        Ok(task) => {
            let span = tracing::info_span!(
                "task",
                task_id = %task.id,
                attempt,
                session_id = tracing::field::Empty
            );
            ctx.run_task(&broker, &delivery, task, attempt, &drain)
                .instrument(span)
                .await
        }
    }
    ctx.metrics.tasks_in_flight.dec();
    ctx.metrics.observe_pool(ctx.pool.status());
}

impl Ctx {
    async fn run_task(
        &self,
        broker: &Broker,
        delivery: &Delivery,
        task: Task,
        attempt: u32,
        drain: &CancellationToken,
    ) {
        if delivery.redelivered && self.completed.lock().unwrap().contains(&task.id) {
            info!("redelivery of a task already answered; acking it");
            ack(delivery).await;
            return;
        }
        let max_attempts = task
            .max_attempts
            .unwrap_or(self.settings.task.default_max_attempts);
        let mut history: Vec<AttemptRecord> = broker::header_str(
            delivery.properties.headers().as_ref(),
            broker::HISTORY_HEADER,
        )
        .and_then(|h| serde_json::from_str(&h).ok())
        .unwrap_or_default();
        if attempt > max_attempts {
            history.push(AttemptRecord {
                attempt: attempt - 1,
                reason: "worker_lost".into(),
                message: "the delivery came back unanswered: a worker or its broker connection died while running it".into(),
                step: None,
                worker: "unknown".into(),
            });
            self.give_up(
                broker,
                delivery,
                &task,
                attempt - 1,
                history,
                Duration::ZERO,
            )
            .await;
            return;
        }

        let Some(mut session) = self.checkout(drain).await else {
            // No run happened: hand the task back without counting an attempt.
            self.hand_back(broker, delivery, attempt).await;
            return;
        };
        session.set_busy(true);
        let session_id = session.id.clone();
        tracing::Span::current().record("session_id", session_id.as_str());
        let started = Instant::now();
        let deadline = ms(task
            .timeout_ms
            .unwrap_or(self.settings.task.default_timeout_ms));
        let mut outputs = Map::new();
        let progress = AtomicUsize::new(0);
        let run = steps::run(
            &session.client,
            &task.steps,
            self.timeouts,
            &mut outputs,
            &progress,
        );
        let outcome = tokio::select! {
            r = tokio::time::timeout(deadline, run) => r,
            _ = drain.cancelled() => {
                warn!(session_id = %session_id, "drain deadline passed mid-task; requeueing it");
                let s = Object::take(session);
                s.kill_browser();
                self.hand_back(broker, delivery, attempt).await;
                return;
            }
        };
        let elapsed = started.elapsed();
        // Either the run produced an answer, or its session died under it.
        let run = match outcome {
            Ok(Ok(())) => Ok((Status::Ok, None)),
            Ok(Err(StepFailure {
                step,
                failure: Failure::Page { kind, message },
            })) => Ok((
                Status::Failed,
                Some(TaskError {
                    kind: kind.into(),
                    message,
                    step: Some(step),
                    history: vec![],
                }),
            )),
            Ok(Err(StepFailure {
                step,
                failure: Failure::Dead { reason, message },
            })) => Err((reason, message, step)),
            Err(_) => {
                // A hung browser may not answer a polite close: kill it.
                session.kill_browser();
                let message = format!("task exceeded its deadline of {} ms", deadline.as_millis());
                Err(("deadline", message, progress.load(Ordering::Relaxed)))
            }
        };
        let (status, error) = match run {
            Ok(answer) => answer,
            Err((reason, message, step)) => {
                let death = AttemptRecord {
                    attempt,
                    reason: reason.into(),
                    message,
                    step: Some(step),
                    worker: self.name.clone(),
                };
                let s = Object::take(session);
                self.session_died(
                    broker,
                    delivery,
                    &task,
                    s,
                    max_attempts,
                    history,
                    death,
                    elapsed,
                )
                .await;
                return;
            }
        };
        session.uses += 1;
        session.set_busy(false);
        drop(session);
        let result = TaskResult {
            id: task.id.clone(),
            status,
            attempts: attempt,
            outputs,
            error,
            worker: self.name.clone(),
            duration_ms: elapsed.as_millis() as u64,
        };
        let outcome = if status == Status::Ok { "ok" } else { "failed" };
        if self.answer(broker, delivery, &result).await {
            self.count(outcome, elapsed);
            self.metrics.task_attempts.observe(attempt as f64);
            if let Some(e) = &result.error {
                info!(kind = %e.kind, step = ?e.step, duration_ms = result.duration_ms, "task failed on the page");
            } else {
                info!(duration_ms = result.duration_ms, "task ok");
            }
        }
    }

    /// Borrows a session, retrying while none can be opened (chromedriver
    /// restarting, Chromium slow to start) for up to a minute. `None` when the
    /// drain deadline passed or no session could be had.
    async fn checkout(&self, drain: &CancellationToken) -> Option<browser::PooledSession> {
        let mut pause = Duration::from_millis(250);
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let got = tokio::select! {
                s = self.pool.get() => s,
                _ = drain.cancelled() => return None,
            };
            match got {
                Ok(s) => return Some(s),
                Err(e) if Instant::now() < give_up => {
                    warn!(error = %e, retry_in = ?pause, "no browser session available yet");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = drain.cancelled() => return None,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    error!(error = %e, "no browser session for a minute; handing the task back");
                    return None;
                }
            }
        }
    }

    /// Gives a task back to the queue without counting an attempt (it did not
    /// run, or we interrupted it ourselves): republish as is, then ack. A
    /// nack-requeue would be simpler but raises the quorum delivery count.
    async fn hand_back(&self, broker: &Broker, delivery: &Delivery, attempt: u32) {
        let props = with_attempt(&delivery.properties, attempt);
        match broker
            .publish(&self.settings.amqp.task_queue, &delivery.data, props)
            .await
        {
            Ok(()) => ack(delivery).await,
            Err(e) => {
                warn!(error = %e, "handing the task back failed; requeueing it");
                requeue(delivery).await;
            }
        }
    }

    /// A session died under a task: discard it, then republish the task for
    /// another attempt or, at `max_attempts`, give up on it.
    #[allow(clippy::too_many_arguments)]
    async fn session_died(
        &self,
        broker: &Broker,
        delivery: &Delivery,
        task: &Task,
        session: browser::Session,
        max_attempts: u32,
        mut history: Vec<AttemptRecord>,
        death: AttemptRecord,
        elapsed: Duration,
    ) {
        warn!(session_id = %session.id, reason = %death.reason, step = ?death.step,
            error = %death.message, "Session appears dead; discarding it");
        self.pool.manager().note_death(&death.reason);
        drop(session);
        let attempt = death.attempt;
        history.push(death);
        if attempt >= max_attempts {
            self.give_up(broker, delivery, task, attempt, history, elapsed)
                .await;
            return;
        }
        let props = with_attempt(&delivery.properties, attempt + 1);
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            broker::HISTORY_HEADER.into(),
            broker::string(&serde_json::to_string(&history).unwrap_or_default()),
        );
        let props = props.with_headers(headers);
        match broker
            .publish(&self.settings.amqp.task_queue, &delivery.data, props)
            .await
        {
            Ok(()) => {
                ack(delivery).await;
                self.count("republished", elapsed);
                info!(next_attempt = attempt + 1, max_attempts, "task republished");
            }
            Err(e) => error!(error = %e, "republishing failed; the broker will redeliver the task"),
        }
    }

    /// Final failure after `max_attempts`: a `session_died` result and the
    /// message in the dead-letter queue, both confirmed before the ack.
    async fn give_up(
        &self,
        broker: &Broker,
        delivery: &Delivery,
        task: &Task,
        attempts: u32,
        history: Vec<AttemptRecord>,
        elapsed: Duration,
    ) {
        let detail = format!("its browser session died on each of {attempts} attempts");
        if let Err(e) = self
            .dead_letter(broker, delivery, "max_attempts", &detail)
            .await
        {
            error!(error = %e, "dead-lettering failed; the broker will redeliver the task");
            return;
        }
        let result = TaskResult {
            id: task.id.clone(),
            status: Status::Failed,
            attempts,
            outputs: Map::new(),
            error: Some(TaskError {
                kind: "session_died".into(),
                message: detail,
                step: history.last().and_then(|h| h.step),
                history,
            }),
            worker: self.name.clone(),
            duration_ms: elapsed.as_millis() as u64,
        };
        if self.answer(broker, delivery, &result).await {
            self.count("dead_lettered", elapsed);
            self.metrics.task_attempts.observe(attempts as f64);
            warn!(attempts, "task dead-lettered after max_attempts");
        }
    }

    /// An undecodable message: dead-letter it with the reason, answer it when
    /// it has a usable id, ack it, carry on.
    async fn reject_invalid(&self, broker: &Broker, delivery: &Delivery, invalid: InvalidTask) {
        warn!(reason = %invalid.reason, "invalid task message; dead-lettering it");
        if let Err(e) = self
            .dead_letter(broker, delivery, "invalid_task", &invalid.reason)
            .await
        {
            error!(error = %e, "dead-lettering failed; the broker will redeliver the message");
            return;
        }
        self.count("dead_lettered", Duration::ZERO);
        match invalid.id {
            Some(id) => {
                let result = TaskResult {
                    id,
                    status: Status::Failed,
                    attempts: 1,
                    outputs: Map::new(),
                    error: Some(TaskError {
                        kind: "invalid_task".into(),
                        message: invalid.reason,
                        step: None,
                        history: vec![],
                    }),
                    worker: self.name.clone(),
                    duration_ms: 0,
                };
                self.answer(broker, delivery, &result).await;
            }
            None => ack(delivery).await,
        }
    }

    async fn dead_letter(
        &self,
        broker: &Broker,
        delivery: &Delivery,
        reason: &str,
        detail: &str,
    ) -> Result<(), BrokerError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(broker::REASON_HEADER.into(), broker::string(reason));
        headers.insert(broker::DETAIL_HEADER.into(), broker::string(detail));
        headers.insert("x-browserfleet-worker".into(), broker::string(&self.name));
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        broker
            .publish(&self.settings.amqp.dead_letter_queue, &delivery.data, props)
            .await?;
        self.metrics
            .dead_lettered
            .with_label_values(&[reason])
            .inc();
        Ok(())
    }

    /// Publishes `result` (to `reply_to`, else the result queue), waits for
    /// the confirm, then acks. Returns whether the task is now answered.
    async fn answer(&self, broker: &Broker, delivery: &Delivery, result: &TaskResult) -> bool {
        let p = &delivery.properties;
        let queue = p
            .reply_to()
            .as_ref()
            .map(|q| q.as_str().to_string())
            .filter(|q| !q.is_empty())
            .unwrap_or_else(|| self.settings.amqp.result_queue.clone());
        let correlation = p
            .correlation_id()
            .clone()
            .unwrap_or_else(|| ShortString::from(result.id.as_str()));
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_correlation_id(correlation)
            .with_message_id(result.id.as_str().into())
            .with_headers(FieldTable::default());
        let body = serde_json::to_vec(result).expect("results always serialize");
        match broker.publish(&queue, &body, props).await {
            Ok(()) => {
                self.completed.lock().unwrap().insert(result.id.clone());
                ack(delivery).await;
                true
            }
            Err(e) => {
                error!(error = %e, %queue, "publishing the result failed; the task will be redelivered");
                if matches!(e, BrokerError::ConfirmTimeout(..) | BrokerError::Nacked(_)) {
                    requeue(delivery).await;
                }
                false
            }
        }
    }

    fn count(&self, outcome: &str, elapsed: Duration) {
        self.metrics.tasks.with_label_values(&[outcome]).inc();
        self.metrics
            .task_duration
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }
}

/// The task message's properties with the attempt header set to `attempt`.
fn with_attempt(props: &BasicProperties, attempt: u32) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        broker::ATTEMPT_HEADER.into(),
        AMQPValue::LongLongInt(attempt.into()),
    );
    props.clone().with_headers(headers)
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The channel is gone; the broker redelivers, and the completed-id
        // memory keeps us from running it twice.
        warn!(error = %e, "ack failed (stale delivery after a reconnect?)");
    }
}

async fn requeue(delivery: &Delivery) {
    let opts = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.nack(opts).await {
        warn!(error = %e, "nack failed (stale delivery after a reconnect?)");
    }
}

/// A bounded memory of task ids whose final result was confirmed.
struct CompletedIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl CompletedIds {
    fn new(cap: usize) -> Self {
        CompletedIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }
    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }
    fn insert(&mut self, id: String) {
        if self.cap == 0 || !self.set.insert(id.clone()) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}
