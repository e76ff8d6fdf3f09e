//! Everything about browsers: the chromedriver process, the session pool and
//! what a WebDriver error means. Nothing here knows about the broker.

pub mod driver;
pub mod error;
pub mod pool;

pub use driver::Driver;
pub use error::{classify, Failure};
pub use pool::{Pool, PooledSession, Session, SessionManager, Sessions};

use crate::config::Settings;
use crate::metrics::Metrics;

/// Builds the bounded session pool against `driver`.
pub fn build_pool(settings: &Settings, driver: &Driver, metrics: Metrics) -> Pool {
    let manager = SessionManager::new(settings, driver.url(), driver.browser_binary(), metrics);
    Pool::builder(manager)
        .max_size(settings.pool.max_size)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .expect("a pool with a runtime and max_size >= 1 always builds")
}
