//! browserfleet: a RabbitMQ-fed fleet of ChromeDriver workers that never
//! loses a browser task.
//!
//! A producer publishes a [`task::Task`] (JSON) to the task queue; a worker
//! ([`worker::run`]) runs its steps on a session from a bounded, health-checked
//! pool ([`browser`]) and publishes a [`task::TaskResult`]. See README.md for
//! the wire contract and docs/ for operations.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod broker;
pub mod browser;
pub mod config;
pub mod enqueue;
pub mod http;
pub mod metrics;
pub mod steps;
pub mod task;
pub mod worker;
