//! The admin listener: `GET /` (live status page), `GET /status.json`, `GET /metrics`
//! (Prometheus text), `GET /healthz`, `GET /queue`.
//! Bound to loopback by default; it is for operators, not clients.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::Gateway;
use crate::status::{self, Started};

pub struct AdminApp {
    gateway: Arc<Gateway>,
    started: Started,
}

impl AdminApp {
    pub fn new(gateway: Arc<Gateway>) -> AdminApp {
        AdminApp {
            gateway,
            started: Started::now(),
        }
    }

    fn route(&self, method: &http::Method, path: &str) -> (StatusCode, &'static str, Vec<u8>) {
        const JSON: &str = "application/json";
        match (method.as_str(), path) {
            ("GET", "/metrics") => {
                self.gateway.refresh_gauges();
                (
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.gateway.metrics.encode(),
                )
            }
            ("GET", "/healthz") => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            ("GET", "/") => (
                StatusCode::OK,
                "text/html; charset=utf-8",
                status::PAGE.as_bytes().to_vec(),
            ),
            ("GET", "/status.json") => (
                StatusCode::OK,
                JSON,
                status::status_json(&self.gateway, &self.started),
            ),
            ("GET", "/queue") => (
                StatusCode::OK,
                JSON,
                // The queues arrive with the queue issue; until then they are empty and off.
                br#"{"deferred":{"enabled":false,"depth":0,"oldest_age_seconds":0,"dead_letters":[]},"upfront":{"enabled":false,"depth":0,"oldest_age_seconds":0,"dead_letters":[]}}"#.to_vec(),
            ),
            (_, "/metrics" | "/healthz" | "/queue" | "/" | "/status.json") => (
                StatusCode::METHOD_NOT_ALLOWED,
                JSON,
                br#"{"error":"method not allowed"}"#.to_vec(),
            ),
            _ => (StatusCode::NOT_FOUND, JSON, br#"{"error":"not found"}"#.to_vec()),
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let method = req.method.clone();
        let (status, content_type, body) = self.route(&method, &path);
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            // Live values: a cached copy is a wrong one.
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
