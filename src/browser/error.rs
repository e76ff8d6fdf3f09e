//! The one place WebDriver errors are classified: the session is dead
//! (discard it, run the task again elsewhere) or the page let the task down
//! (report a `failed` result, keep the session).

use fantoccini::error::{CmdError, ErrorStatus};

/// What a WebDriver error means for the task and the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The page or the task's own content failed; the session is fine.
    Page {
        /// Result `error.kind`: `no_such_element`, `timeout`, `script_error`, ...
        kind: &'static str,
        /// Detail for the result.
        message: String,
    },
    /// The session can no longer be trusted: discard it and retry the task.
    Dead {
        /// Metric label and history reason (see `metrics::DEATH_REASONS`).
        reason: &'static str,
        /// Detail for the log and the attempt history.
        message: String,
    },
}

impl Failure {
    /// A command that did not answer within its timeout: the session is hung.
    pub fn command_timeout(what: &str, after_ms: u64) -> Self {
        Failure::Dead {
            reason: "command_timeout",
            message: format!("{what} did not answer within {after_ms} ms"),
        }
    }
}

/// Phrases chromedriver puts in `unknown error` replies when the browser side
/// is gone, although the HTTP exchange itself worked.
const BROWSER_GONE: &[&str] = &[
    "session deleted",
    "disconnected",
    "chrome not reachable",
    "tab crashed",
    "target crashed",
    "target window already closed",
    "no such execution context",
    "cannot connect to chrome",
    "session not created",
];

/// Classifies one WebDriver command error.
pub fn classify(e: &CmdError) -> Failure {
    let dead = |reason, message: String| Failure::Dead { reason, message };
    let page = |kind, message: String| Failure::Page { kind, message };
    match e {
        CmdError::Standard(wd) => {
            let msg = wd.message.to_string();
            let lower = msg.to_ascii_lowercase();
            match wd.error {
                // "invalid session id: session deleted as the browser has
                // closed the connection" is a crash, not an expiry.
                _ if BROWSER_GONE.iter().any(|p| lower.contains(p)) => dead("browser_crashed", msg),
                ErrorStatus::InvalidSessionId => dead("invalid_session", msg),
                ErrorStatus::SessionNotCreated | ErrorStatus::NoSuchWindow => {
                    dead("browser_crashed", msg)
                }
                ErrorStatus::NoSuchElement => page("no_such_element", msg),
                ErrorStatus::StaleElementReference => page("stale_element", msg),
                ErrorStatus::InvalidSelector => page("invalid_selector", msg),
                ErrorStatus::JavascriptError => page("script_error", msg),
                ErrorStatus::ScriptTimeout | ErrorStatus::Timeout => page("timeout", msg),
                ErrorStatus::ElementNotInteractable
                | ErrorStatus::ElementClickIntercepted
                | ErrorStatus::ElementNotSelectable
                | ErrorStatus::InvalidElementState => page("element_not_interactable", msg),
                ErrorStatus::InvalidArgument => page("invalid_argument", msg),
                ErrorStatus::InsecureCertificate => page("insecure_certificate", msg),
                ErrorStatus::UnexpectedAlertOpen => page("unexpected_alert", msg),
                ErrorStatus::UnableToCaptureScreen => page("screenshot_failed", msg),
                // Navigation errors (net::ERR_...) arrive as unknown errors
                // from a healthy browser.
                ErrorStatus::UnknownError if lower.contains("net::err_") => {
                    page("navigation_error", msg)
                }
                _ => page("webdriver_error", format!("{:?}: {msg}", wd.error)),
            }
        }
        CmdError::Lost(io) => dead("unreachable", format!("connection to WebDriver lost: {io}")),
        CmdError::Failed(h) => dead("unreachable", format!("WebDriver unreachable: {h}")),
        CmdError::FailedC(h) => dead("unreachable", format!("WebDriver unreachable: {h}")),
        CmdError::NotJson(body) => dead(
            "protocol",
            format!("WebDriver answered with non-JSON: {}", truncate(body, 200)),
        ),
        CmdError::Json(j) => dead("protocol", format!("WebDriver answered with bad JSON: {j}")),
        CmdError::WaitTimeout => page("timeout", "wait timed out".into()),
        CmdError::BadUrl(u) => page("invalid_argument", format!("bad URL: {u}")),
        CmdError::InvalidArgument(what, why) => page("invalid_argument", format!("{what}: {why}")),
        CmdError::ImageDecodeError(d) => page("screenshot_failed", d.to_string()),
        // Anything new or unexpected: assume the worst for the session; the
        // task is retried and dead-lettered after max_attempts, never lost.
        other => dead("protocol", other.to_string()),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fantoccini::error::WebDriver;

    fn wd(status: ErrorStatus, msg: &'static str) -> CmdError {
        CmdError::Standard(WebDriver::new(status, msg))
    }

    #[test]
    fn dead_sessions_and_page_failures_are_told_apart() {
        // Messages as chromedriver writes them.
        assert!(matches!(
            classify(&wd(ErrorStatus::InvalidSessionId, "invalid session id")),
            Failure::Dead {
                reason: "invalid_session",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(
                ErrorStatus::InvalidSessionId,
                "invalid session id: session deleted as the browser has closed the connection"
            )),
            Failure::Dead {
                reason: "browser_crashed",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(
                ErrorStatus::UnknownError,
                "unknown error: session deleted because of page crash"
            )),
            Failure::Dead {
                reason: "browser_crashed",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(ErrorStatus::UnknownError, "chrome not reachable")),
            Failure::Dead { .. }
        ));
        assert!(matches!(
            classify(&CmdError::NotJson("<html>".into())),
            Failure::Dead {
                reason: "protocol",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(ErrorStatus::NoSuchElement, "no such element")),
            Failure::Page {
                kind: "no_such_element",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(ErrorStatus::JavascriptError, "javascript error: boom")),
            Failure::Page {
                kind: "script_error",
                ..
            }
        ));
        assert!(matches!(
            classify(&wd(
                ErrorStatus::UnknownError,
                "unknown error: net::ERR_CONNECTION_REFUSED"
            )),
            Failure::Page {
                kind: "navigation_error",
                ..
            }
        ));
    }
}
