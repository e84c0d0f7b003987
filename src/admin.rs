//! The admin listener: `GET /` (live status page), `GET /status.json`, `GET /metrics`
//! (Prometheus text), `GET /healthz`, `GET /queue`, `DELETE /queue/dead`.
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

    /// `GET /queue`: depth, capacity, oldest age and dead letters of each queue.
    fn queue_status(&self) -> Vec<u8> {
        let state = self.gateway.runtime();
        let q = &self.gateway.queues;
        let body = serde_json::json!({
            "deferred": q.deferred.status(state.config.deferred_queue.enabled),
            "upfront": q.upfront.status(state.config.upfront_queue.enabled),
        });
        body.to_string().into_bytes()
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
            ("GET", "/queue") => (StatusCode::OK, JSON, self.queue_status()),
            ("DELETE", "/queue/dead") => {
                let q = &self.gateway.queues;
                let deferred = q.deferred.purge_dead();
                let upfront = q.upfront.purge_dead();
                let body = serde_json::json!({
                    "purged": deferred + upfront,
                    "deferred": deferred,
                    "upfront": upfront,
                });
                (StatusCode::OK, JSON, body.to_string().into_bytes())
            }
            (_, "/metrics" | "/healthz" | "/queue" | "/queue/dead" | "/" | "/status.json") => (
                StatusCode::METHOD_NOT_ALLOWED,
                JSON,
                br#"{"error":"method not allowed"}"#.to_vec(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                JSON,
                br#"{"error":"not found"}"#.to_vec(),
            ),
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
