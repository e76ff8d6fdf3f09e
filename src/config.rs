//! Worker configuration: the built-in defaults (`config/default.toml`), an
//! optional file, then `BROWSERFLEET__SECTION__KEY` environment variables.
//!
//! This module owns loading and validating settings; it does not act on them.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The documented defaults, compiled into the binary so a worker runs with no file.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A startup configuration error, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The sources could not be read or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value has the right type but is not acceptable.
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `pool.max_size`.
        key: &'static str,
        /// What was wrong and what is expected.
        message: String,
    },
}

/// All worker settings; see `config/default.toml` for each key's meaning.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct Settings {
    pub worker: WorkerSettings,
    pub amqp: AmqpSettings,
    pub pool: PoolSettings,
    pub webdriver: WebDriverSettings,
    pub task: TaskSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct WorkerSettings {
    pub name: String,
    pub drain_timeout_ms: u64,
    pub completed_ids_memory: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct AmqpSettings {
    pub url: AmqpUrl,
    pub task_queue: String,
    pub result_queue: String,
    pub dead_letter_queue: String,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub confirm_timeout_ms: u64,
}

/// RabbitMQ queue type for the queues the worker declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct PoolSettings {
    pub max_size: usize,
    pub create_timeout_ms: u64,
    pub health_timeout_ms: u64,
    pub max_age_secs: u64,
    pub max_uses: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct WebDriverSettings {
    pub url: String,
    pub chromedriver: String,
    pub chromium: String,
    pub check_versions: bool,
    pub command_timeout_ms: u64,
    pub restart_initial_ms: u64,
    pub restart_max_ms: u64,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct TaskSettings {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_max_attempts: u32,
    pub default_wait_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[allow(missing_docs)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum LogFormat {
    Text,
    Json,
}

/// An AMQP URL whose password is never shown by `Debug`, `Display` or `Serialize`.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// The full URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "<unparsable amqp url>".to_string(),
        }
    }
}

impl From<&str> for AmqpUrl {
    fn from(s: &str) -> Self {
        AmqpUrl(s.to_string())
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({})", self.redacted())
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for AmqpUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl Settings {
    /// Loads defaults, then `file` when given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("BROWSERFLEET__"))
            .collect();
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    message: format!("file {} does not exist", path.display()),
                });
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BROWSERFLEET")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("webdriver.args")
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        match url::Url::parse(self.amqp.url.expose()) {
            Ok(u) if u.scheme() == "amqp" || u.scheme() == "amqps" => {}
            Ok(u) => {
                return Err(invalid(
                    "amqp.url",
                    format!("scheme `{}`: expected amqp:// or amqps://", u.scheme()),
                ))
            }
            Err(e) => {
                return Err(invalid(
                    "amqp.url",
                    format!("not a URL ({e}): expected amqp://user:pass@host:5672/vhost"),
                ))
            }
        }
        for (key, name) in [
            ("amqp.task_queue", &self.amqp.task_queue),
            ("amqp.result_queue", &self.amqp.result_queue),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(key, "expected a queue name of 1 to 255 bytes"));
            }
        }
        if self.amqp.task_queue == self.amqp.dead_letter_queue
            || self.amqp.task_queue == self.amqp.result_queue
        {
            return Err(invalid(
                "amqp.task_queue",
                "must differ from amqp.result_queue and amqp.dead_letter_queue",
            ));
        }
        if self.pool.max_size == 0 || self.pool.max_size > 256 {
            return Err(invalid(
                "pool.max_size",
                format!("{}: expected 1 to 256", self.pool.max_size),
            ));
        }
        if self.pool.max_uses == 0 {
            return Err(invalid("pool.max_uses", "expected at least 1"));
        }
        if !self.webdriver.url.is_empty() {
            if let Err(e) = url::Url::parse(&self.webdriver.url) {
                return Err(invalid(
                    "webdriver.url",
                    format!("not a URL ({e}): expected e.g. http://127.0.0.1:4444, or empty to spawn chromedriver"),
                ));
            }
        }
        for (key, v) in [
            ("pool.create_timeout_ms", self.pool.create_timeout_ms),
            ("pool.health_timeout_ms", self.pool.health_timeout_ms),
            (
                "webdriver.command_timeout_ms",
                self.webdriver.command_timeout_ms,
            ),
            ("task.default_timeout_ms", self.task.default_timeout_ms),
            ("task.max_timeout_ms", self.task.max_timeout_ms),
            ("amqp.confirm_timeout_ms", self.amqp.confirm_timeout_ms),
        ] {
            if v == 0 {
                return Err(invalid(key, "expected a positive number of milliseconds"));
            }
        }
        if self.task.default_timeout_ms > self.task.max_timeout_ms {
            return Err(invalid(
                "task.default_timeout_ms",
                "must not exceed task.max_timeout_ms",
            ));
        }
        if self.task.default_max_attempts == 0 {
            return Err(invalid("task.default_max_attempts", "expected at least 1"));
        }
        let level = &self.log.level;
        if tracing_subscriber::EnvFilter::try_new(level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "`{level}` is not a tracing filter: expected e.g. info or browserfleet=debug"
                ),
            ));
        }
        Ok(())
    }

    /// The name results and logs carry: `worker.name`, else `<hostname>-<pid>`.
    pub fn worker_name(&self) -> String {
        if !self.worker.name.is_empty() {
            return self.worker.name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".to_string());
        format!("{host}-{}", std::process::id())
    }
}

/// Milliseconds to a `Duration`, for the `*_ms` keys.
pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let s = Settings::load_from(None, env(&[])).unwrap();
        assert_eq!(s.amqp.task_queue, "browserfleet.tasks");
        assert_eq!(s.amqp.result_queue, "browserfleet.results");
        assert_eq!(s.amqp.dead_letter_queue, "browserfleet.dead");
        assert_eq!(s.amqp.queue_type, QueueType::Quorum);
        assert_eq!(s.metrics.listen.to_string(), "127.0.0.1:9898");
        assert!(s.webdriver.url.is_empty());
        assert!(s.webdriver.args.iter().any(|a| a == "--no-sandbox"));
    }

    #[test]
    fn env_overrides_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.toml");
        std::fs::write(
            &file,
            "[pool]\nmax_size = 3\n[amqp]\ntask_queue = \"from-file\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&file),
            env(&[
                ("BROWSERFLEET__POOL__MAX_SIZE", "5"),
                (
                    "BROWSERFLEET__WEBDRIVER__ARGS",
                    "--headless=new,--no-sandbox",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.pool.max_size, 5, "env wins over file");
        assert_eq!(s.amqp.task_queue, "from-file", "file wins over default");
        assert_eq!(s.amqp.result_queue, "browserfleet.results");
        assert_eq!(s.webdriver.args, vec!["--headless=new", "--no-sandbox"]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Settings::load_from(None, env(&[("BROWSERFLEET__POOL__MAX_SIZE", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.max_size"), "{e}");
        let e = Settings::load_from(None, env(&[("BROWSERFLEET__POOL__MAX_SIZE", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pool.max_size") && e.contains("expected 1 to 256"),
            "{e}"
        );
        let e = Settings::load_from(None, env(&[("BROWSERFLEET__AMQP__URL", "http://x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("amqp.url") && e.contains("amqp://"), "{e}");
        let e = Settings::load_from(None, env(&[("BROWSERFLEET__AMQP__QUEUE_TYPE", "stream")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue_type"), "{e}");
    }

    #[test]
    fn the_amqp_password_is_never_shown() {
        let s = Settings::load_from(
            None,
            env(&[("BROWSERFLEET__AMQP__URL", "amqp://bob:hunter2@mq:5672/%2f")]),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
        assert!(s.amqp.url.redacted().contains("bob:***@mq"));
        assert_eq!(s.amqp.url.expose(), "amqp://bob:hunter2@mq:5672/%2f");
    }
}
