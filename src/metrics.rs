//! Prometheus metrics of one worker. Every family lives in one private
//! registry; known label values start at 0 so dashboards draw lines at once.
//!
//! This module owns names and labels; the code that observes events calls it.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Why a session was declared dead (label `reason` of `session_deaths_total`).
pub const DEATH_REASONS: &[&str] = &[
    "health_check",
    "unreachable",
    "invalid_session",
    "browser_crashed",
    "command_timeout",
    "deadline",
    "protocol",
];
/// Why a session left the pool on recycle (label `reason` of `session_recycles_total`).
pub const RECYCLE_REASONS: &[&str] = &["age", "uses", "health"];
/// Final or intermediate outcome of one run of a task (label `outcome`).
pub const OUTCOMES: &[&str] = &["ok", "failed", "republished", "dead_lettered"];
/// Why a message went to the dead-letter queue (label `reason`).
pub const DEAD_LETTER_REASONS: &[&str] = &["invalid_task", "max_attempts"];

/// All metric handles of a worker.
#[derive(Clone)]
#[allow(missing_docs)]
pub struct Metrics {
    registry: Registry,
    pub pool_size: IntGauge,
    pub pool_idle: IntGauge,
    pub pool_busy: IntGauge,
    pub pool_max_size: IntGauge,
    pub pool_waiting: IntGauge,
    pub sessions_created: IntCounter,
    pub session_create_duration: Histogram,
    pub session_deaths: IntCounterVec,
    pub session_recoveries: IntCounter,
    pub session_recycles: IntCounterVec,
    pub tasks: IntCounterVec,
    pub task_duration: HistogramVec,
    pub task_attempts: Histogram,
    pub dead_lettered: IntCounterVec,
    pub chromedriver_restarts: IntCounter,
    pub broker_connected: IntGauge,
    pub tasks_in_flight: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every family.
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let gauge = |name: &str, help: &str| {
            reg(
                r,
                IntGauge::new(format!("browserfleet_{name}"), help).unwrap(),
            )
        };
        let counter = |name: &str, help: &str| {
            reg(
                r,
                IntCounter::new(format!("browserfleet_{name}"), help).unwrap(),
            )
        };
        let counter_vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let c = reg(
                r,
                IntCounterVec::new(Opts::new(format!("browserfleet_{name}"), help), &[label])
                    .unwrap(),
            );
            for v in values {
                c.with_label_values(&[v]);
            }
            c
        };
        let seconds_buckets = vec![
            0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0,
        ];

        let build_info = reg(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "browserfleet_build_info",
                    "Always 1; labels carry the worker's version.",
                ),
                &["version"],
            )
            .unwrap(),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let task_duration = reg(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "browserfleet_task_duration_seconds",
                    "Time from taking a task to its outcome, per run.",
                )
                .buckets(seconds_buckets.clone()),
                &["outcome"],
            )
            .unwrap(),
        );
        for o in OUTCOMES {
            task_duration.with_label_values(&[o]);
        }

        Metrics {
            pool_size: gauge("pool_size", "Browser sessions currently open (idle + busy)."),
            pool_idle: gauge("pool_idle", "Open sessions waiting in the pool."),
            pool_busy: gauge("pool_busy", "Open sessions running a task."),
            pool_max_size: gauge("pool_max_size", "Most sessions this worker may open."),
            pool_waiting: gauge("pool_waiting", "Tasks waiting for a session."),
            sessions_created: counter(
                "sessions_created_total",
                "Browser sessions opened, including replacements.",
            ),
            session_create_duration: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "browserfleet_session_create_duration_seconds",
                        "Time to open a browser session.",
                    )
                    .buckets(seconds_buckets.clone()),
                )
                .unwrap(),
            ),
            session_deaths: counter_vec(
                "session_deaths_total",
                "Sessions found dead, by what gave it away.",
                "reason",
                DEATH_REASONS,
            ),
            session_recoveries: counter(
                "session_recoveries_total",
                "Dead sessions replaced by a healthy new one.",
            ),
            session_recycles: counter_vec(
                "session_recycles_total",
                "Sessions retired when returned to use, by reason.",
                "reason",
                RECYCLE_REASONS,
            ),
            tasks: counter_vec(
                "tasks_total",
                "Task runs by outcome: ok, failed (page-level or final), republished (session died, retried), dead_lettered.",
                "outcome",
                OUTCOMES,
            ),
            task_duration,
            task_attempts: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "browserfleet_task_attempts",
                        "Attempts a task took to reach its final result.",
                    )
                    .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0]),
                )
                .unwrap(),
            ),
            dead_lettered: counter_vec(
                "dead_lettered_total",
                "Messages sent to the dead-letter queue, by reason.",
                "reason",
                DEAD_LETTER_REASONS,
            ),
            chromedriver_restarts: counter(
                "chromedriver_restarts_total",
                "Times the spawned chromedriver died and was restarted.",
            ),
            broker_connected: gauge(
                "broker_connected",
                "1 while connected to the broker and consuming, else 0.",
            ),
            tasks_in_flight: gauge("tasks_in_flight", "Deliveries being handled now."),
            registry,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    /// Updates the pool gauges from a deadpool status snapshot.
    pub fn observe_pool(&self, status: deadpool::Status) {
        self.pool_size.set(status.size as i64);
        self.pool_idle.set(status.available as i64);
        self.pool_busy
            .set(status.size.saturating_sub(status.available) as i64);
        self.pool_max_size.set(status.max_size as i64);
        self.pool_waiting.set(status.waiting as i64);
    }
}
