//! The browser client (plain HTML, CSS and ES modules next to this file),
//! embedded in the binary and served at `/`. No build step: what is in this
//! directory is what the browser gets.
//!
//! Every response carries a strict Content-Security-Policy (same origin only,
//! plus `ws:`/`wss:` for the socket and `blob:` images for attachments) and an
//! ETag; `Cache-Control: no-cache` makes browsers revalidate, so a new binary's
//! files are picked up at once and unchanged ones cost a 304.

use axum::{
    Router,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $file:literal, $ct:expr) => {
        Asset { path: $path, content_type: $ct, body: include_bytes!($file) }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("/", "index.html", HTML),
    asset!("/index.html", "index.html", HTML),
    asset!("/style.css", "style.css", "text/css; charset=utf-8"),
    asset!("/app.js", "app.js", JS),
    asset!("/api.js", "api.js", JS),
    asset!("/transport.js", "transport.js", JS),
    asset!("/view.js", "view.js", JS),
    asset!("/favicon.svg", "favicon.svg", "image/svg+xml"),
];

pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self' ws: wss:; manifest-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Routes for every embedded file (no state needed).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |r, a| r.route(a.path, get(move |h: HeaderMap| async move { serve(a, &h) })))
}

fn serve(asset: &'static Asset, req: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", fnv1a(asset.body));
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().trim_start_matches("W/") == etag));
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, HeaderValue::from_str(&etag).expect("hex etag")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    if fresh { (StatusCode::NOT_MODIFIED, headers).into_response() } else { (headers, asset.body).into_response() }
}

/// FNV-1a: a stable content hash for the ETag (not a security property).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_the_page_imports_is_served_as_javascript() {
        let served = |p: &str| ASSETS.iter().find(|a| a.path == p).map(|a| a.content_type);
        for a in ASSETS.iter().filter(|a| a.content_type == JS) {
            let text = std::str::from_utf8(a.body).unwrap();
            for line in text.lines().filter(|l| l.starts_with("import ")) {
                let spec = line.rsplit(['"', '\'']).nth(1).unwrap();
                let path = spec.trim_start_matches('.');
                assert_eq!(served(path), Some(JS), "{} imports {spec}, which is not served", a.path);
            }
        }
        assert_eq!(served("/"), Some(HTML));
    }

    #[test]
    fn if_none_match_gives_304() {
        let a = &ASSETS[0];
        let first = serve(a, &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        let mut h = HeaderMap::new();
        h.insert(header::IF_NONE_MATCH, first.headers()[header::ETAG].clone());
        assert_eq!(serve(a, &h).status(), StatusCode::NOT_MODIFIED);
    }
}
