//! The bounded pool of ChromeDriver sessions: a deadpool `Manager` whose
//! `create` opens a session with its own profile directory and whose `recycle`
//! is the health check (the seed's `current_url` probe) plus age/use limits.
//!
//! A session leaving the pool for any reason is cleaned up by its `Drop`:
//! WebDriver session deleted, browser processes killed, profile removed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use deadpool::managed::{self, RecycleError, RecycleResult};
use fantoccini::{Client, ClientBuilder};
use serde::Serialize;
use serde_json::{json, Map, Value};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ms, Settings};
use crate::metrics::Metrics;

/// A pool of browser sessions.
pub type Pool = managed::Pool<SessionManager>;
/// A session borrowed from the pool.
pub type PooledSession = managed::Object<SessionManager>;

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The WebDriver refused or failed to open a session.
    #[error("opening a browser session failed: {0}")]
    Create(String),
    /// Opening took longer than `pool.create_timeout_ms`.
    #[error("opening a browser session took longer than {0} ms")]
    CreateTimeout(u64),
    /// The health check failed (recycle only).
    #[error("health check failed: {0}")]
    Unhealthy(String),
}

/// One open browser session.
pub struct Session {
    /// The WebDriver client.
    pub client: Client,
    /// The WebDriver session id.
    pub id: String,
    /// Tasks run on this session.
    pub uses: u64,
    created: Instant,
    profile: Option<tempfile::TempDir>,
    registry: Sessions,
    cleanups: TaskTracker,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("uses", &self.uses)
            .field("age", &self.created.elapsed())
            .finish()
    }
}

impl Session {
    /// Marks this session busy or idle in the `/sessions` listing.
    pub fn set_busy(&self, busy: bool) {
        let uses = self.uses;
        self.registry.update(&self.id, |i| {
            i.state = if busy { "busy" } else { "idle" };
            i.uses = uses;
        });
    }

    /// The browser profile directory (also how its processes are found).
    pub fn profile_dir(&self) -> Option<PathBuf> {
        self.profile.as_ref().map(|p| p.path().to_path_buf())
    }

    /// Kills this session's browser processes now (a hung session).
    pub fn kill_browser(&self) -> usize {
        self.profile
            .as_ref()
            .map(|p| kill_processes_with_arg(&format!("--user-data-dir={}", p.path().display())))
            .unwrap_or(0)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.registry.remove(&self.id);
        let client = self.client.clone();
        let profile = self.profile.take();
        let id = std::mem::take(&mut self.id);
        let cleanup = async move {
            // A dead browser does not answer; do not wait on it for long.
            let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
            if let Some(p) = profile {
                let n = kill_processes_with_arg(&format!("--user-data-dir={}", p.path().display()));
                if n > 0 {
                    info!(session_id = %id, killed = n, "killed leftover browser processes");
                }
                drop(p);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                self.cleanups.spawn_on(cleanup, &h);
            }
            Err(_) => drop(cleanup),
        }
    }
}

/// What `/sessions` shows of one session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// WebDriver session id.
    pub id: String,
    /// `idle` or `busy`.
    pub state: &'static str,
    /// Seconds since the session opened.
    pub age_secs: f64,
    /// Tasks run on it.
    pub uses: u64,
    /// When its health was last checked (Unix seconds), if ever.
    pub last_health_check: Option<f64>,
    #[serde(skip)]
    created: Instant,
}

/// The live sessions of this worker, for `/sessions`.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<BTreeMap<String, SessionInfo>>>);

impl Sessions {
    fn update(&self, id: &str, f: impl FnOnce(&mut SessionInfo)) {
        if let Some(i) = self.0.lock().unwrap().get_mut(id) {
            f(i)
        }
    }
    fn remove(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
    /// A snapshot, ages computed now.
    pub fn list(&self) -> Vec<SessionInfo> {
        self.0
            .lock()
            .unwrap()
            .values()
            .map(|i| SessionInfo {
                age_secs: i.created.elapsed().as_secs_f64(),
                ..i.clone()
            })
            .collect()
    }
}

/// Opens, checks and retires sessions for deadpool.
pub struct SessionManager {
    webdriver_url: String,
    capabilities: Map<String, Value>,
    create_timeout: Duration,
    health_timeout: Duration,
    max_age: Duration,
    max_uses: u64,
    metrics: Metrics,
    sessions: Sessions,
    cleanups: TaskTracker,
    // Dead sessions not yet replaced: the next successful create is a recovery.
    unrecovered: AtomicU64,
}

impl SessionManager {
    /// A manager opening sessions at `webdriver_url` with `browser_binary`.
    pub fn new(
        settings: &Settings,
        webdriver_url: &str,
        browser_binary: Option<&std::path::Path>,
        metrics: Metrics,
    ) -> Self {
        let mut chrome = Map::new();
        chrome.insert("args".into(), json!(settings.webdriver.args));
        if let Some(b) = browser_binary {
            chrome.insert("binary".into(), json!(b.display().to_string()));
        }
        let mut capabilities = Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("goog:chromeOptions".into(), Value::Object(chrome));
        SessionManager {
            webdriver_url: webdriver_url.to_string(),
            capabilities,
            create_timeout: ms(settings.pool.create_timeout_ms),
            health_timeout: ms(settings.pool.health_timeout_ms),
            max_age: Duration::from_secs(settings.pool.max_age_secs),
            max_uses: settings.pool.max_uses,
            metrics,
            sessions: Sessions::default(),
            cleanups: TaskTracker::new(),
            unrecovered: AtomicU64::new(0),
        }
    }

    /// The live sessions, for `/sessions`.
    pub fn sessions(&self) -> Sessions {
        self.sessions.clone()
    }

    /// Records a session found dead, so its replacement counts as a recovery.
    pub fn note_death(&self, reason: &str) {
        self.metrics
            .session_deaths
            .with_label_values(&[reason])
            .inc();
        self.unrecovered.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until every discarded session is cleaned up.
    pub async fn wait_cleanups(&self) {
        self.cleanups.close();
        self.cleanups.wait().await;
    }

    async fn open(&self) -> Result<Session, SessionError> {
        let profile = tempfile::Builder::new()
            .prefix("browserfleet-profile-")
            .tempdir()
            .map_err(|e| SessionError::Create(format!("creating a profile directory: {e}")))?;
        let mut caps = self.capabilities.clone();
        if let Some(Value::Object(chrome)) = caps.get_mut("goog:chromeOptions") {
            if let Some(Value::Array(args)) = chrome.get_mut("args") {
                args.push(json!(format!(
                    "--user-data-dir={}",
                    profile.path().display()
                )));
            }
        }
        let builder = ClientBuilder::rustls()
            .map_err(|e| SessionError::Create(format!("TLS setup: {e}")))
            .map(|mut b| {
                b.capabilities(caps);
                b
            })?;
        let client = builder
            .connect(&self.webdriver_url)
            .await
            .map_err(|e| SessionError::Create(e.to_string()))?;
        let id = client
            .session_id()
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Ok(Session {
            client,
            id,
            uses: 0,
            created: Instant::now(),
            profile: Some(profile),
            registry: self.sessions.clone(),
            cleanups: self.cleanups.clone(),
        })
    }
}

impl managed::Manager for SessionManager {
    type Type = Session;
    type Error = SessionError;

    async fn create(&self) -> Result<Session, SessionError> {
        let started = Instant::now();
        let session = match tokio::time::timeout(self.create_timeout, self.open()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SessionError::CreateTimeout(
                    self.create_timeout.as_millis() as u64
                ))
            }
        };
        self.metrics
            .session_create_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.sessions_created.inc();
        self.sessions.0.lock().unwrap().insert(
            session.id.clone(),
            SessionInfo {
                id: session.id.clone(),
                state: "idle",
                age_secs: 0.0,
                uses: 0,
                last_health_check: None,
                created: session.created,
            },
        );
        let recovered = self
            .unrecovered
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if recovered {
            self.metrics.session_recoveries.inc();
            info!(session_id = %session.id, create_ms = started.elapsed().as_millis() as u64,
                "Created new session replacing a dead one");
        } else {
            info!(session_id = %session.id, create_ms = started.elapsed().as_millis() as u64,
                "Created new session");
        }
        Ok(session)
    }

    async fn recycle(&self, s: &mut Session, _: &managed::Metrics) -> RecycleResult<SessionError> {
        let retire = |reason: &'static str, why: String| {
            self.metrics
                .session_recycles
                .with_label_values(&[reason])
                .inc();
            info!(session_id = %s.id, uses = s.uses, reason, "retiring session: {why}");
            Err(RecycleError::Message(why.into()))
        };
        if s.created.elapsed() > self.max_age {
            return retire("age", format!("older than {:?}", self.max_age));
        }
        if s.uses >= self.max_uses {
            return retire("uses", format!("used {} times", s.uses));
        }
        let check = tokio::time::timeout(self.health_timeout, s.client.current_url()).await;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .ok();
        let uses = s.uses;
        self.sessions.update(&s.id, |i| {
            i.last_health_check = now;
            i.uses = uses;
        });
        let problem = match check {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.health_timeout),
        };
        warn!(session_id = %s.id, reason = "health_check", error = %problem, "Session appears dead");
        self.note_death("health_check");
        self.metrics
            .session_recycles
            .with_label_values(&["health"])
            .inc();
        Err(RecycleError::Backend(SessionError::Unhealthy(problem)))
    }
}

/// SIGKILLs every process whose command line has `arg` (a session's
/// `--user-data-dir=`), found through /proc. Returns how many were signalled.
pub fn kill_processes_with_arg(arg: &str) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes())
            && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok()
        {
            n += 1;
        }
    }
    n
}
