//! The chromedriver process a worker spawns (the default), its supervision,
//! and the Chromium launcher that ties browsers to their driver's lifetime.
//!
//! With `webdriver.url` set none of this runs: the worker only talks to that URL.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ms, WebDriverSettings};
use crate::metrics::Metrics;

/// Why the WebDriver endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A binary is missing from PATH.
    #[error("`{binary}` ({key}) was not found on PATH: install it (Debian: apt-get install -y chromium chromium-driver) or set {key}")]
    NotFound {
        /// The binary looked for.
        binary: String,
        /// The config key that names it.
        key: &'static str,
    },
    /// Chromium and chromedriver disagree on the major version.
    #[error("Chromium {chromium} and ChromeDriver {driver} have different major versions; ChromeDriver only drives its own major version. Install matching versions (Debian: apt-get install -y chromium chromium-driver), point webdriver.chromium / webdriver.chromedriver at a matching pair, or set webdriver.check_versions = false")]
    VersionMismatch {
        /// Chromium's version string.
        chromium: String,
        /// ChromeDriver's version string.
        driver: String,
    },
    /// Spawning or probing a process failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// chromedriver started but never accepted connections.
    #[error("chromedriver did not listen on port {0} within 20 s")]
    NotListening(u16),
}

/// A WebDriver endpoint: either an external URL or a supervised chromedriver.
pub struct Driver {
    url: String,
    launcher: Option<PathBuf>,
    stop: CancellationToken,
    supervisor: Option<tokio::task::JoinHandle<()>>,
    // Holds the Chromium launcher script; removed when the driver goes.
    _scratch: Option<tempfile::TempDir>,
}

impl Driver {
    /// Uses `webdriver.url` when set, else spawns and supervises chromedriver.
    pub async fn start(
        settings: &WebDriverSettings,
        metrics: Metrics,
    ) -> Result<Self, DriverError> {
        if !settings.url.is_empty() {
            info!(url = %settings.url, "using external WebDriver");
            return Ok(Driver {
                url: settings.url.clone(),
                launcher: (!settings.chromium.is_empty())
                    .then(|| PathBuf::from(&settings.chromium)),
                stop: CancellationToken::new(),
                supervisor: None,
                _scratch: None,
            });
        }
        let chromedriver = which(&settings.chromedriver).ok_or_else(|| DriverError::NotFound {
            binary: settings.chromedriver.clone(),
            key: "webdriver.chromedriver",
        })?;
        let chromium = if settings.chromium.is_empty() {
            ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .find_map(|b| which(b))
                .ok_or_else(|| DriverError::NotFound {
                    binary: "chromium".into(),
                    key: "webdriver.chromium",
                })?
        } else {
            which(&settings.chromium).ok_or_else(|| DriverError::NotFound {
                binary: settings.chromium.clone(),
                key: "webdriver.chromium",
            })?
        };
        if settings.check_versions {
            check_versions(&chromium, &chromedriver).await?;
        }
        let scratch = tempfile::Builder::new()
            .prefix("browserfleet-driver-")
            .tempdir()
            .map_err(|source| DriverError::Io {
                what: "creating the driver's scratch directory".into(),
                source,
            })?;
        let launcher = write_launcher(scratch.path(), &chromium)?;
        let port = free_port().map_err(|source| DriverError::Io {
            what: "finding a free port for chromedriver".into(),
            source,
        })?;
        let child = spawn_chromedriver(&chromedriver, port).await?;
        let url = format!("http://127.0.0.1:{port}");
        info!(%url, chromium = %chromium.display(), "chromedriver started");
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            child,
            chromedriver,
            port,
            settings.clone(),
            metrics,
            stop.clone(),
        ));
        Ok(Driver {
            url,
            launcher: Some(launcher),
            stop,
            supervisor: Some(supervisor),
            _scratch: Some(scratch),
        })
    }

    /// The WebDriver base URL sessions are opened against.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The browser binary to put in `goog:chromeOptions.binary`, if any.
    pub fn browser_binary(&self) -> Option<&Path> {
        self.launcher.as_deref()
    }

    /// Stops the spawned chromedriver (if any) and waits for it to exit.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(s) = self.supervisor.take() {
            let _ = s.await;
        }
    }
}

/// Keeps chromedriver running: when it dies, restart it on the same port with
/// backoff. Sessions on the dead driver are found dead by their next command
/// or health check and replaced.
async fn supervise(
    mut child: Child,
    binary: PathBuf,
    port: u16,
    settings: WebDriverSettings,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut backoff = ms(settings.restart_initial_ms);
    loop {
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                if stop.is_cancelled() { return; }
                warn!(?status, port, "chromedriver exited; restarting it");
                metrics.chromedriver_restarts.inc();
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = ms(settings.restart_initial_ms);
                }
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(ms(settings.restart_max_ms));
                    match spawn_chromedriver(&binary, port).await {
                        Ok(c) => { child = c; info!(port, "chromedriver restarted"); break; }
                        Err(e) => error!(error = %e, "chromedriver restart failed; retrying"),
                    }
                }
            }
            _ = stop.cancelled() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return;
            }
        }
    }
}

/// Starts chromedriver so that it dies with this worker: `setpriv --pdeathsig
/// KILL` makes the kernel kill it when the worker thread that spawned it exits
/// (tokio's worker threads live as long as the runtime), even on SIGKILL.
async fn spawn_chromedriver(binary: &Path, port: u16) -> Result<Child, DriverError> {
    let mut cmd = match which("setpriv") {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(binary);
            c
        }
        None => {
            warn!("setpriv (util-linux) not found: chromedriver may outlive a killed worker");
            Command::new(binary)
        }
    };
    cmd.arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| DriverError::Io {
        what: format!("spawning {}", binary.display()),
        source,
    })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(DriverError::Io {
                what: format!("chromedriver exited at start ({status})"),
                source: std::io::Error::other("exited"),
            });
        }
        if Instant::now() > deadline {
            let _ = child.start_kill();
            return Err(DriverError::NotListening(port));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes the script chromedriver runs as "the browser": it execs Chromium
/// with a parent-death signal, so a browser never outlives the chromedriver
/// session thread that launched it.
fn write_launcher(dir: &Path, chromium: &Path) -> Result<PathBuf, DriverError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("chromium-launcher");
    let quoted = chromium.display().to_string().replace('\'', r"'\''");
    let script = match which("setpriv") {
        Some(setpriv) => format!(
            "#!/bin/sh\nexec '{}' --pdeathsig KILL -- '{quoted}' \"$@\"\n",
            setpriv.display()
        ),
        None => format!("#!/bin/sh\nexec '{quoted}' \"$@\"\n"),
    };
    let io = |source| DriverError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    std::fs::write(&path, script).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    Ok(path)
}

async fn check_versions(chromium: &Path, chromedriver: &Path) -> Result<(), DriverError> {
    let c = version_of(chromium).await?;
    let d = version_of(chromedriver).await?;
    if major(&c) != major(&d) || major(&c).is_none() {
        return Err(DriverError::VersionMismatch {
            chromium: c,
            driver: d,
        });
    }
    Ok(())
}

async fn version_of(binary: &Path) -> Result<String, DriverError> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| DriverError::Io {
            what: format!("running {} --version", binary.display()),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .unwrap_or("unknown")
        .to_string())
}

fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

/// A port the OS just had free on loopback.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Resolves a binary name against PATH (a path with `/` is taken as is).
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_versions_parse() {
        assert_eq!(major("156.0.8078.73"), Some(156));
        assert_eq!(major("unknown"), None);
    }
}
