//! The results dashboard: one page, its script and its style sheet, embedded in the binary
//! (nothing from a CDN; it works offline). The page holds no data: its script reads the API
//! with the read token the user gives it (in the link's `#token=` fragment, which browsers
//! never send, or in its form), keeps the token in the tab's session storage, and sends it only
//! to this origin. Served under a Content-Security-Policy that allows nothing but this origin's
//! script, style and API, so a task name or an alert explanation cannot run as script.

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/app.css");

/// The policy every dashboard response carries.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // A new binary serves a new page at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: to the dashboard.
pub(crate) async fn root() -> Redirect {
    Redirect::to("/dashboard")
}

/// `GET /dashboard`.
pub(crate) async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /dashboard/app.js`.
pub(crate) async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /dashboard/app.css`.
pub(crate) async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_script_and_style() {
        assert!(PAGE.contains(r#"<script src="/dashboard/app.js" defer></script>"#));
        assert!(PAGE.contains(r#"href="/dashboard/app.css""#));
        // No inline script, no remote asset: the policy would block them.
        assert_eq!(PAGE.matches("<script").count(), 1);
        for s in [PAGE, SCRIPT, STYLE] {
            assert!(!s.contains("https://"), "a remote URL in a dashboard asset");
            assert!(!s.contains("style=\""), "an inline style the policy blocks");
        }
        // Values from the API never become markup.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("outerHTML"));
        assert!(!SCRIPT.contains("insertAdjacentHTML") && !SCRIPT.contains("eval("));
    }
}
