//! The admin API: JSON over HTTP on a root-only Unix socket (default
//! [`DEFAULT_ADMIN_SOCKET`]), used by `sluice policy`. The server side is an axum [`router`]
//! over a [`PolicyAdmin`] (the daemon backs it with the [`Driver`], so the datapath follows
//! every change); the client side is [`AdminClient`], a small hyper HTTP/1.1 client on the
//! same socket.
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/policies`, body = YAML | `200 {"applied": [{"name", "outcome"}]}`, or `400 {"error"}` and nothing changed |
//! | `GET /v1/policies` | `200 {"policies": [document, ...]}` |
//! | `DELETE /v1/policies/{name}` | `200 {"removed": name}`, or `404 {"error"}` |
//! | `GET /v1/endpoints` | `200 {"endpoints": [EndpointStatus, ...]}` |
//! | `GET /v1/flows` | `200 [FlowRecord, ...]`: the recent drop events, oldest first |
//! | `GET /v1/flows?follow=true` | `200`, newline-delimited JSON: the recent drop events, then each new one |
//! | `GET /metrics` | `200`, Prometheus text format |
//!
//! `docs/policy.md` and `docs/usage.md` document it for users.

use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sluice_driver::policy::{Applied, PolicyDoc, PolicyError, parse_documents};
use sluice_driver::status::{EndpointStatus, FlowRecord, Status};
use sluice_driver::{Driver, DriverError, Kernel};

use crate::server::SocketError;
use tokio::net::UnixStream;
use tracing::{info, warn};

use crate::observe::{FlowLog, render_metrics};

/// Where the CLI looks for the admin API, and where a daemon named `sluice` serves it.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sluice/sluice.sock";
/// Directory of the default admin sockets (mode 0700).
pub const ADMIN_SOCKET_DIR: &str = "/run/sluice";
/// Largest request or response body (policy files, listings).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// The admin socket of a daemon whose plugin name is `plugin_name`: `/run/sluice/<name>.sock`,
/// so several daemons (e.g. in tests) do not collide and the default daemon (`sluice`) is
/// at [`DEFAULT_ADMIN_SOCKET`].
#[must_use]
pub fn default_socket_for(plugin_name: &str) -> PathBuf {
    Path::new(ADMIN_SOCKET_DIR).join(format!("{plugin_name}.sock"))
}

// ---- wire types ----------------------------------------------------------------------

/// Answer to `POST /v1/policies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// One entry per document, in input order.
    pub applied: Vec<Applied>,
}

/// Answer to `GET /v1/policies`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// The applied policies, sorted by name.
    pub policies: Vec<PolicyDoc>,
}

/// Answer to `DELETE /v1/policies/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    /// The name removed.
    pub removed: String,
}

/// Answer to `GET /v1/endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsResponse {
    /// Every endpoint, sorted by ID.
    pub endpoints: Vec<EndpointStatus>,
}

/// Every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong, for humans (several lines for several validation errors).
    pub error: String,
}

// ---- server --------------------------------------------------------------------------

/// An error answer of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message.
    pub message: String,
}

impl AdminError {
    /// An error with this status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<PolicyError> for AdminError {
    fn from(e: PolicyError) -> Self {
        let status = match &e {
            PolicyError::NotFound(_) => StatusCode::NOT_FOUND,
            e if e.is_client_error() => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<DriverError> for AdminError {
    fn from(e: DriverError) -> Self {
        let status = if e.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            warn!(status = self.status.as_u16(), error = %self.message, "admin request failed");
        }
        json(
            self.status,
            &ErrorResponse {
                error: self.message,
            },
        )
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
            .into_response(),
    }
}

/// What the admin API does. The daemon implements it with the driver (so that the
/// datapath follows every change).
pub trait PolicyAdmin: Send + Sync + 'static {
    /// Parses, validates and applies every document of `yaml`: all or nothing.
    fn apply_policies(
        &self,
        yaml: String,
    ) -> impl Future<Output = Result<Vec<Applied>, AdminError>> + Send;

    /// The applied policies, sorted by name.
    fn list_policies(&self) -> impl Future<Output = Result<Vec<PolicyDoc>, AdminError>> + Send;

    /// Removes one policy; [`StatusCode::NOT_FOUND`] when there is none of that name.
    fn remove_policy(&self, name: String) -> impl Future<Output = Result<(), AdminError>> + Send;
}

/// What the observability endpoints read: the daemon's driver, or (without a datapath) the
/// policy count alone.
pub trait StatusAdmin: Send + Sync + 'static {
    /// Endpoints with counters, and the number of policies.
    fn status(&self) -> impl Future<Output = Result<Status, AdminError>> + Send;
}

/// The daemon's [`StatusAdmin`]: one [`Driver::status`] call per request.
impl<K: Kernel> StatusAdmin for Driver<K> {
    async fn status(&self) -> Result<Status, AdminError> {
        Ok(Driver::status(self).await)
    }
}

/// The daemon's [`PolicyAdmin`]: policy changes go through the [`Driver`], so the datapath
/// follows every change.
impl<K: Kernel> PolicyAdmin for Driver<K> {
    async fn apply_policies(&self, yaml: String) -> Result<Vec<Applied>, AdminError> {
        let docs = parse_documents(&yaml)?;
        self.apply_policies(docs).await.map_err(driver_error)
    }

    async fn list_policies(&self) -> Result<Vec<PolicyDoc>, AdminError> {
        self.policies().await.map_err(driver_error)
    }

    async fn remove_policy(&self, name: String) -> Result<(), AdminError> {
        Driver::remove_policy(self, &name)
            .await
            .map_err(driver_error)
    }
}

/// Policy errors keep their own status (404 for an unknown name).
fn driver_error(e: DriverError) -> AdminError {
    match e {
        DriverError::Policy(p) => p.into(),
        other => other.into(),
    }
}

/// What the handlers share.
#[derive(Debug)]
struct AdminState<A> {
    admin: Arc<A>,
    flows: Arc<FlowLog>,
}

impl<A> Clone for AdminState<A> {
    fn clone(&self) -> Self {
        Self {
            admin: self.admin.clone(),
            flows: self.flows.clone(),
        }
    }
}

/// The admin router, with an empty flow log (no drop events).
pub fn router<A: PolicyAdmin + StatusAdmin>(admin: Arc<A>) -> Router {
    router_with_flows(admin, Arc::new(FlowLog::default()))
}

/// The admin router; `flows` is the log the daemon's drop-event reader fills.
pub fn router_with_flows<A: PolicyAdmin + StatusAdmin>(
    admin: Arc<A>,
    flows: Arc<FlowLog>,
) -> Router {
    Router::new()
        .route(
            "/v1/policies",
            get(list_handler::<A>).post(apply_handler::<A>),
        )
        .route("/v1/policies/{name}", delete(remove_handler::<A>))
        .route("/v1/endpoints", get(endpoints_handler::<A>))
        .route("/v1/flows", get(flows_handler::<A>))
        .route("/metrics", get(metrics_handler::<A>))
        .fallback(|| async {
            AdminError::new(
                StatusCode::NOT_FOUND,
                "no such API path; see docs/policy.md",
            )
        })
        .with_state(AdminState { admin, flows })
}

async fn endpoints_handler<A: StatusAdmin>(State(s): State<AdminState<A>>) -> Response {
    match s.admin.status().await {
        Ok(status) => json(
            StatusCode::OK,
            &EndpointsResponse {
                endpoints: status.endpoints,
            },
        ),
        Err(e) => e.into_response(),
    }
}

async fn metrics_handler<A: StatusAdmin>(State(s): State<AdminState<A>>) -> Response {
    match s.admin.status().await {
        Ok(status) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            render_metrics(&status, &s.flows),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

/// True when the query string has `name=true` (or `=1`, or a bare `name`).
fn query_flag(query: Option<&str>, name: &str) -> bool {
    query.unwrap_or("").split('&').any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        k == name && matches!(v, "true" | "1" | "yes" | "")
    })
}

fn ndjson_line(record: &FlowRecord) -> Bytes {
    let mut line = serde_json::to_vec(record).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn flows_handler<A: StatusAdmin>(
    State(s): State<AdminState<A>>,
    uri: axum::http::Uri,
) -> Response {
    if !query_flag(uri.query(), "follow") {
        return json(StatusCode::OK, &s.flows.recent());
    }
    let (recent, rx) = s.flows.follow();
    let backlog = futures::stream::iter(
        recent
            .into_iter()
            .map(|r| Ok::<_, std::convert::Infallible>(ndjson_line(&r))),
    );
    let closed = Box::pin(s.flows.closed());
    let live = futures::stream::unfold((rx, closed), |(mut rx, mut closed)| async move {
        loop {
            let next = tokio::select! {
                next = rx.recv() => next,
                () = &mut closed => return None,
            };
            match next {
                Ok(r) => return Some((Ok(ndjson_line(&r)), (rx, closed))),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "a `sluice flows --follow` client fell behind");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(futures::StreamExt::chain(backlog, live)),
    )
        .into_response()
}

async fn apply_handler<A: PolicyAdmin>(State(s): State<AdminState<A>>, body: Bytes) -> Response {
    let admin = s.admin;
    let yaml = match String::from_utf8(body.to_vec()) {
        Ok(t) => t,
        Err(_) => {
            return AdminError::new(StatusCode::BAD_REQUEST, "the body is not UTF-8 text")
                .into_response();
        }
    };
    match admin.apply_policies(yaml).await {
        Ok(applied) => {
            for a in &applied {
                info!(policy = %a.name, outcome = ?a.outcome, "policy applied");
            }
            json(StatusCode::OK, &ApplyResponse { applied })
        }
        Err(e) => e.into_response(),
    }
}

async fn list_handler<A: PolicyAdmin>(State(s): State<AdminState<A>>) -> Response {
    match s.admin.list_policies().await {
        Ok(policies) => json(StatusCode::OK, &ListResponse { policies }),
        Err(e) => e.into_response(),
    }
}

async fn remove_handler<A: PolicyAdmin>(
    State(s): State<AdminState<A>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match s.admin.remove_policy(name.clone()).await {
        Ok(()) => {
            info!(policy = %name, "policy removed");
            json(StatusCode::OK, &RemoveResponse { removed: name })
        }
        Err(e) => e.into_response(),
    }
}

/// Binds the admin socket at `path` with mode 0600, creating a missing parent directory
/// with mode 0700 (an existing one is left as it is) and replacing a stale socket.
///
/// # Errors
/// When the socket is in use or cannot be bound.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    crate::server::bind_with_modes(path, Some(0o700), Some(0o600)).await
}

// ---- client --------------------------------------------------------------------------

/// Errors of [`AdminClient`], worded for the command line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach the sluice admin API: is the sluice daemon running? (socket {})", .0.display())]
    NotRunning(PathBuf),
    /// The socket is root's.
    #[error("permission denied on {}: the admin API is for root (try sudo)", .0.display())]
    PermissionDenied(PathBuf),
    /// The server answered with an error.
    #[error("{message}")]
    Server {
        /// HTTP status.
        status: StatusCode,
        /// The server's message.
        message: String,
    },
    /// The exchange failed.
    #[error("admin API on {}: {message}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        message: String,
    },
}

/// A client of the admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    /// A client for the API on `socket`.
    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// `POST /v1/policies`.
    ///
    /// # Errors
    /// As [`ClientError`]; a refused file is [`ClientError::Server`] with every problem.
    pub async fn apply(&self, yaml: String) -> Result<Vec<Applied>, ClientError> {
        let r: ApplyResponse = self.call("POST", "/v1/policies", yaml.into()).await?;
        Ok(r.applied)
    }

    /// `GET /v1/policies`.
    ///
    /// # Errors
    /// As [`ClientError`].
    pub async fn list(&self) -> Result<Vec<PolicyDoc>, ClientError> {
        let r: ListResponse = self.call("GET", "/v1/policies", Bytes::new()).await?;
        Ok(r.policies)
    }

    /// `DELETE /v1/policies/{name}`.
    ///
    /// # Errors
    /// As [`ClientError`]; an unknown name is [`ClientError::Server`] with status 404.
    pub async fn remove(&self, name: &str) -> Result<(), ClientError> {
        let path = format!("/v1/policies/{}", encode_path_segment(name));
        let _r: RemoveResponse = self.call("DELETE", &path, Bytes::new()).await?;
        Ok(())
    }

    /// `GET /v1/endpoints`.
    ///
    /// # Errors
    /// As [`ClientError`].
    pub async fn endpoints(&self) -> Result<Vec<EndpointStatus>, ClientError> {
        let r: EndpointsResponse = self.call("GET", "/v1/endpoints", Bytes::new()).await?;
        Ok(r.endpoints)
    }

    /// `GET /v1/flows`: the recent drop events, oldest first.
    ///
    /// # Errors
    /// As [`ClientError`].
    pub async fn flows(&self) -> Result<Vec<FlowRecord>, ClientError> {
        self.call("GET", "/v1/flows", Bytes::new()).await
    }

    /// `GET /metrics`: the Prometheus text.
    ///
    /// # Errors
    /// As [`ClientError`].
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self.call_bytes("GET", "/metrics", Bytes::new()).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `GET /v1/flows?follow=true`: calls `each` with the recent drop events, then with every
    /// new one, until the daemon closes the stream or `each` returns `false`.
    ///
    /// # Errors
    /// As [`ClientError`]; a line that is not a drop event is [`ClientError::Protocol`].
    pub async fn follow_flows(
        &self,
        mut each: impl FnMut(FlowRecord) -> bool,
    ) -> Result<(), ClientError> {
        let protocol = |message: String| ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        };
        let (status, mut body, driver) = self
            .send("GET", "/v1/flows?follow=true", Bytes::new())
            .await?;
        if !status.is_success() {
            let bytes = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|e| protocol(format!("reading the answer: {e}")))?
                .to_bytes();
            driver.abort();
            return Err(server_error(status, &bytes));
        }
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| protocol(format!("reading the stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let record = serde_json::from_slice(&line)
                    .map_err(|e| protocol(format!("unexpected line: {e}")))?;
                if !each(record) {
                    driver.abort();
                    return Ok(());
                }
            }
            if pending.len() > MAX_BODY {
                return Err(protocol("a line longer than the body limit".into()));
            }
        }
        driver.abort();
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
        let bytes = self.call_bytes(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            message: format!("unexpected answer: {e}"),
        })
    }

    async fn call_bytes(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let (status, incoming, driver) = self.send(method, path, body).await?;
        let bytes = Limited::new(incoming, MAX_BODY)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol {
                socket: self.socket.clone(),
                message: format!("reading the answer: {e}"),
            })?
            .to_bytes();
        driver.abort();
        if !status.is_success() {
            return Err(server_error(status, &bytes));
        }
        Ok(bytes)
    }

    /// Sends one request; the answer's status, its body, and the connection task (abort it
    /// when done with the body).
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<
        (
            StatusCode,
            hyper::body::Incoming,
            tokio::task::JoinHandle<Result<(), hyper::Error>>,
        ),
        ClientError,
    > {
        let protocol = |message: String| ClientError::Protocol {
            socket: self.socket.clone(),
            message,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied(self.socket.clone())
                }
                _ => protocol(format!("connecting: {e}")),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| protocol(format!("handshake: {e}")))?;
        let driver = tokio::spawn(conn);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "sluice")
            .header(header::CONTENT_TYPE, "application/yaml")
            .body(Full::new(body))
            .map_err(|e| protocol(format!("building the request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| protocol(format!("request failed: {e}")))?;
        // The sender lives as long as the body is read: the connection stays open for it.
        let driver = tokio::spawn(async move {
            let result = driver.await;
            drop(sender);
            result.unwrap_or(Ok(()))
        });
        Ok((response.status(), response.into_body(), driver))
    }
}

fn server_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorResponse>(bytes).map_or_else(
        |_| format!("{status}: {}", String::from_utf8_lossy(bytes).trim()),
        |e| e.error,
    );
    ClientError::Server { status, message }
}

/// Percent-encodes everything but unreserved characters (policy names need none of it,
/// but a mistyped name must still reach the server intact to be reported).
fn encode_path_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---- output --------------------------------------------------------------------------

/// `policy "web-to-db" created`, one line per document.
#[must_use]
pub fn format_applied(applied: &[Applied]) -> String {
    let mut out = String::new();
    for a in applied {
        let outcome = match a.outcome {
            sluice_driver::policy::ApplyOutcome::Created => "created",
            sluice_driver::policy::ApplyOutcome::Updated => "updated",
            sluice_driver::policy::ApplyOutcome::Unchanged => "unchanged",
        };
        let _ = writeln!(out, "policy {:?} {outcome}", a.name);
    }
    out
}

/// The `sluice policy ls` table: NAME, SELECTOR, INGRESS RULES, EGRESS RULES. A direction
/// the policy does not touch shows `-`; an empty one `0 (deny all)`.
#[must_use]
pub fn format_table(policies: &[PolicyDoc]) -> String {
    fn count(rules: Option<usize>) -> String {
        match rules {
            None => "-".into(),
            Some(0) => "0 (deny all)".into(),
            Some(n) => n.to_string(),
        }
    }
    let header = [
        "NAME".to_owned(),
        "SELECTOR".to_owned(),
        "INGRESS RULES".to_owned(),
        "EGRESS RULES".to_owned(),
    ];
    let rows: Vec<[String; 4]> = policies
        .iter()
        .map(|p| {
            [
                p.name.clone(),
                p.selector.to_string(),
                count(p.ingress.as_ref().map(Vec::len)),
                count(p.egress.as_ref().map(Vec::len)),
            ]
        })
        .collect();
    let mut widths = [0usize; 4];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt as _;

    use sluice_driver::store::Store;

    use super::*;

    type TestDriver = Driver<sluice_driver::kernel::fake::FakeKernel>;

    /// The daemon's admin backend over an in-memory kernel.
    fn test_driver(store: Store) -> TestDriver {
        Driver::open(
            sluice_driver::kernel::fake::FakeKernel::default(),
            store,
            sluice_driver::ipam::IpamConfig::default(),
        )
        .unwrap()
    }

    struct Harness {
        app: Router,
        admin: Arc<TestDriver>,
        dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let admin = Arc::new(test_driver(store));
        Harness {
            app: router(admin.clone()),
            admin,
            dir,
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        (status, value)
    }

    const TWO: &str = "name: web-to-db\nselector: {labels: {role: db}}\ningress:\n  - action: allow\n    from: [{selector: {labels: {role: web}}}]\n    ports: [{protocol: tcp, port: 5432}]\n---\nname: lockdown\nselector: {network: appnet}\negress: []\n";

    #[tokio::test]
    async fn apply_list_remove() {
        let h = harness();
        let (status, body) = call(&h.app, "POST", "/v1/policies", TWO).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            body,
            serde_json::json!({"applied": [
                {"name": "web-to-db", "outcome": "created"},
                {"name": "lockdown", "outcome": "created"},
            ]})
        );
        let (status, body) = call(&h.app, "POST", "/v1/policies", TWO).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["applied"][0]["outcome"], "unchanged");

        let (status, body) = call(&h.app, "GET", "/v1/policies", "").await;
        assert_eq!(status, StatusCode::OK);
        let list: ListResponse = serde_json::from_value(body).unwrap();
        assert_eq!(
            list.policies
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["lockdown", "web-to-db"]
        );
        assert_eq!(list.policies[0].egress, Some(vec![]));
        assert_eq!(list.policies[0].ingress, None);

        let (status, body) = call(&h.app, "DELETE", "/v1/policies/lockdown", "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({"removed": "lockdown"}));
        let (status, body) = call(&h.app, "DELETE", "/v1/policies/lockdown", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "no policy named \"lockdown\"");
        assert_eq!(h.admin.policies().await.unwrap().len(), 1);

        // Persisted: once the first handles are gone, a new admin over the same store sees
        // the same.
        let Harness { app, admin, dir } = h;
        drop((app, admin));
        let again = test_driver(Store::open(dir.path()).unwrap());
        let names: Vec<String> = again
            .list_policies()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["web-to-db"]);
    }

    #[tokio::test]
    async fn a_bad_file_is_400_and_changes_nothing() {
        let h = harness();
        let (status, _) = call(&h.app, "POST", "/v1/policies", TWO).await;
        assert_eq!(status, StatusCode::OK);
        let bad = "name: web-to-db\nselector: {}\n---\nname: new\nselector: {}\ningress: [{action: allow, ports: [{protocol: udp, port: \"2000-1000\"}]}]\n";
        let (status, body) = call(&h.app, "POST", "/v1/policies", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["error"],
            "policy \"new\": ingress[0].ports[0]: port range 2000-1000 is reversed (line 6)"
        );
        let (_, body) = call(&h.app, "GET", "/v1/policies", "").await;
        let list: ListResponse = serde_json::from_value(body).unwrap();
        assert_eq!(list.policies.len(), 2);
        assert_eq!(
            list.policies[1]
                .selector
                .labels
                .get("role")
                .map(String::as_str),
            Some("db")
        );

        for (body, needle) in [
            ("", "no policy documents found"),
            ("name: x\nselector: {}\nextra: 1\n", "unknown field `extra`"),
            ("{{{", "document 1:"),
        ] {
            let (status, resp) = call(&h.app, "POST", "/v1/policies", body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
            let msg = resp["error"].as_str().unwrap();
            assert!(msg.contains(needle), "{body:?}: {msg}");
        }
        let req = Request::builder()
            .method("POST")
            .uri("/v1/policies")
            .body(Body::from(vec![0xff, 0xfe]))
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn unknown_paths_are_404_json() {
        let h = harness();
        let (status, body) = call(&h.app, "GET", "/v2/nothing", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("no such API path"));
        let (status, _) = call(&h.app, "PUT", "/v1/policies", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn table_and_applied_output() {
        let docs = parse_documents(TWO).unwrap();
        let mut docs = docs;
        docs.extend(parse_documents("name: open\nselector: {}\n").unwrap());
        assert_eq!(
            format_table(&docs),
            "NAME       SELECTOR         INGRESS RULES  EGRESS RULES\n\
             web-to-db  role=db          1              -\n\
             lockdown   network=appnet   -              0 (deny all)\n\
             open       (all endpoints)  -              -\n"
        );
        assert_eq!(
            format_table(&[]),
            "NAME  SELECTOR  INGRESS RULES  EGRESS RULES\n"
        );
        let applied = [Applied {
            name: "a".into(),
            outcome: sluice_driver::policy::ApplyOutcome::Updated,
        }];
        assert_eq!(format_applied(&applied), "policy \"a\" updated\n");
        assert_eq!(encode_path_segment("a b/ü"), "a%20b%2F%C3%BC");
    }

    #[test]
    fn docs_show_the_real_table() {
        let docs_md = include_str!("../../docs/policy.md");
        let examples: Vec<PolicyDoc> = docs_md
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| !b.starts_with("# error:"))
            .flat_map(|b| parse_documents(b).unwrap())
            .collect();
        let pick: Vec<PolicyDoc> = ["appnet-default-deny", "web-to-db", "no-metadata"]
            .iter()
            .map(|n| examples.iter().find(|d| d.name == *n).unwrap().clone())
            .collect();
        let table = format_table(&pick);
        assert!(
            docs_md.contains(&format!("```text\n{table}```")),
            "docs/policy.md should show:\n{table}"
        );
    }

    /// A driver on the fake kernel with one network and one endpoint, its admin router with
    /// a flow log, and the plugin router to drive it.
    struct DriverHarness {
        app: Router,
        driver: Arc<Driver<sluice_driver::kernel::fake::FakeKernel>>,
        flows: Arc<FlowLog>,
        _dir: tempfile::TempDir,
    }

    const NID: &str = "a45eeb163d5f42ccd747f827dfe6a23e505e6b221804f242ca378ead7fed74ff";
    const EID: &str = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";

    async fn driver_harness() -> DriverHarness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let driver = Arc::new(
            Driver::open(
                sluice_driver::kernel::fake::FakeKernel::default(),
                store,
                sluice_driver::ipam::IpamConfig::default(),
            )
            .unwrap(),
        );
        let plugin = crate::server::router(driver.clone(), None);
        let steps = [
            (
                "IpamDriver.RequestPool",
                r#"{"AddressSpace":"sluice-local","Pool":"10.251.0.0/24","SubPool":"","Options":{},"V6":false}"#.to_owned(),
            ),
            (
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.1","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#.to_owned(),
            ),
            (
                "NetworkDriver.CreateNetwork",
                format!(
                    r#"{{"NetworkID":"{NID}","Options":{{"com.docker.network.generic":{{"sluice.isolate":"true"}}}},"IPv4Data":[{{"AddressSpace":"sluice-local","Gateway":"10.251.0.1/24","Pool":"10.251.0.0/24"}}],"IPv6Data":[]}}"#
                ),
            ),
            (
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.2","Options":null}"#.to_owned(),
            ),
            (
                "NetworkDriver.CreateEndpoint",
                format!(
                    r#"{{"NetworkID":"{NID}","EndpointID":"{EID}","Interface":{{"Address":"10.251.0.2/24","AddressIPv6":"","MacAddress":""}},"Options":{{}}}}"#
                ),
            ),
        ];
        for (method, body) in steps {
            let req = Request::builder()
                .method("POST")
                .uri(format!("/{method}"))
                .body(Body::from(body))
                .unwrap();
            let resp = plugin.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                status,
                StatusCode::OK,
                "{method}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let flows = Arc::new(FlowLog::new(100));
        DriverHarness {
            app: router_with_flows(driver.clone(), flows.clone()),
            driver,
            flows,
            _dir: dir,
        }
    }

    async fn get_text(app: &Router, uri: &str) -> (StatusCode, String, String) {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ctype, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn endpoints_flows_and_metrics_over_the_driver() {
        let h = driver_harness().await;
        let (status, body) = call(&h.app, "GET", "/v1/endpoints", "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let list: EndpointsResponse = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(list.endpoints.len(), 1, "{body}");
        let ep = &list.endpoints[0];
        assert_eq!(ep.id, EID);
        assert_eq!(ep.network_id, NID);
        assert_eq!(ep.container, None);
        assert_eq!(ep.addresses, ["10.251.0.2/24".parse().unwrap()]);
        assert!(ep.flags.contains(&"isolate".to_owned()), "{:?}", ep.flags);
        assert_eq!(ep.counters_error, None);
        assert_eq!(body["endpoints"][0]["ingress"]["dropped"]["bytes"], 0);

        // A policy, a resolved container, and a drop event at the endpoint's ifindex.
        let policy = "name: web-to-db\nselector: {}\ningress:\n  - action: allow\n    ports: [{protocol: tcp, port: 5432}]\n";
        let (status, _) = call(&h.app, "POST", "/v1/policies", policy).await;
        assert_eq!(status, StatusCode::OK);
        h.driver
            .set_container(sluice_driver::model::ContainerIdentity {
                endpoint_id: EID.into(),
                container_id: "c0ffee".into(),
                name: "db".into(),
                labels: std::collections::BTreeMap::new(),
            })
            .await
            .unwrap();
        let ep = h.driver.endpoint_status().await.remove(0);
        assert_eq!(ep.container.as_deref(), Some("db"));
        assert_ne!(ep.ifindex, 0);
        let mut event = sluice_driver::datapath::DropEvent {
            ifindex: ep.ifindex,
            rule_id: sluice_driver::policy::rule_id(
                1,
                sluice_driver::policy::Direction::Ingress,
                0,
            ),
            src_port: 40000,
            dst_port: 5432,
            proto: 6,
            direction: sluice_driver::datapath::layout::DIR_INGRESS,
            reason: sluice_driver::datapath::layout::REASON_POLICY_DENY,
            family: sluice_driver::datapath::layout::FAMILY_V4,
            suppressed: 4,
            ..Default::default()
        };
        event.src_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 251, 0, 3]);
        event.dst_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 251, 0, 2]);
        let record = h
            .driver
            .describe_drop(&event, std::time::SystemTime::now())
            .await;
        assert_eq!(record.rule.as_deref(), Some("web-to-db ingress[0]"));
        assert_eq!(record.container.as_deref(), Some("db"));
        assert_eq!(record.endpoint.as_deref(), Some(EID));
        let line = crate::observe::format_flow(&record);
        assert!(
            line.ends_with(" ingress 10.251.0.3:40000 -> 10.251.0.2:5432 tcp db (0f987eed597e) policy deny: web-to-db ingress[0] (+4 suppressed)"),
            "{line}"
        );
        h.flows.push(record);

        let (status, body) = call(&h.app, "GET", "/v1/flows", "").await;
        assert_eq!(status, StatusCode::OK);
        let recent: Vec<FlowRecord> = serde_json::from_value(body).unwrap();
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].seq, 1);
        assert_eq!(
            recent[0].reason,
            sluice_driver::status::DropReason::PolicyDeny
        );

        let (status, ctype, text) = get_text(&h.app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
        for needle in [
            format!(
                "sluice_endpoint_packets_total{{endpoint=\"{EID}\",container=\"db\",network=\"{NID}\",direction=\"ingress\",verdict=\"dropped\"}} 0"
            ),
            "sluice_drop_events_total{reason=\"policy_deny\"} 1".to_owned(),
            "sluice_drop_events_suppressed_total 4".to_owned(),
            "sluice_policies 1".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == needle),
                "missing {needle} in\n{text}"
            );
        }
    }

    #[tokio::test]
    async fn follow_streams_the_backlog_then_new_events() {
        let h = driver_harness().await;
        let mut first = crate::observe::tests_support::record();
        first.reason = sluice_driver::status::DropReason::Isolation;
        h.flows.push(first.clone());
        let req = Request::builder()
            .uri("/v1/flows?follow=true")
            .body(Body::empty())
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-ndjson");
        let mut body = resp.into_body();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let got: FlowRecord = serde_json::from_slice(frame.strip_suffix(b"\n").unwrap()).unwrap();
        assert_eq!(
            (got.seq, got.reason),
            (1, sluice_driver::status::DropReason::Isolation)
        );
        h.flows.push(crate::observe::tests_support::record());
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        let got: FlowRecord = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            (got.seq, got.reason),
            (2, sluice_driver::status::DropReason::PolicyDeny)
        );
        h.flows.close();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .unwrap();
        assert!(end.is_none(), "the stream ends when the log closes");
        assert!(query_flag(Some("a=b&follow=1"), "follow"));
        assert!(!query_flag(Some("follow=false"), "follow"));
        assert!(!query_flag(None, "follow"));
    }

    /// The real client against the real server on a Unix socket.
    #[tokio::test]
    async fn client_over_a_unix_socket() {
        use std::os::unix::fs::PermissionsExt as _;
        let h = harness();
        let sock_dir = tempfile::tempdir().unwrap();
        let socket = sock_dir.path().join("run/sluice/test.sock");
        let listener = bind(&socket).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(socket.parent().unwrap()), 0o700);
        // A second daemon on the same socket is refused.
        let app = h.app.clone();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert!(matches!(bind(&socket).await, Err(SocketError::InUse(_))));

        let client = AdminClient::new(&socket);
        let applied = client.apply(TWO.into()).await.unwrap();
        assert_eq!(applied.len(), 2);
        let listed = client.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        client.remove("lockdown").await.unwrap();
        match client.remove("lockdown").await.unwrap_err() {
            ClientError::Server { status, message } => {
                assert_eq!(status, StatusCode::NOT_FOUND);
                assert_eq!(message, "no policy named \"lockdown\"");
            }
            other => panic!("{other:?}"),
        }
        assert!(client.endpoints().await.unwrap().is_empty());
        assert!(client.flows().await.unwrap().is_empty());
        assert!(
            client
                .metrics()
                .await
                .unwrap()
                .contains("sluice_policies 1\n")
        );
        let err = client.apply("name: x\n".into()).await.unwrap_err();
        assert_eq!(err.to_string(), "policy \"x\": missing field `selector`");
        server.abort();
        let _ = server.await;

        // Stale socket: replaced. Missing socket: a clear hint.
        let listener = bind(&socket).await.unwrap();
        drop(listener);
        std::fs::remove_file(&socket).unwrap();
        let err = AdminClient::new(&socket).list().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the sluice admin API: is the sluice daemon running? (socket {})",
                socket.display()
            )
        );
    }
}
