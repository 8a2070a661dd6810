//! The admin API: JSON over HTTP on a root-only Unix socket (default
//! [`DEFAULT_ADMIN_SOCKET`]), used by `sluice policy`. The server side is an axum [`router`]
//! over a [`PolicyAdmin`] (the daemon backs it; [`EngineAdmin`] is a self-contained one over
//! a [`PolicyEngine`] and the store); the client side is [`AdminClient`], a small hyper
//! HTTP/1.1 client on the same socket.
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/policies`, body = YAML | `200 {"applied": [{"name", "outcome"}]}`, or `400 {"error"}` and nothing changed |
//! | `GET /v1/policies` | `200 {"policies": [document, ...]}` |
//! | `DELETE /v1/policies/{name}` | `200 {"removed": name}`, or `404 {"error"}` |
//!
//! `docs/policy.md` documents it for users.

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
use sluice_driver::policy::{Applied, PolicyDoc, PolicyEngine, PolicyError, parse_documents};
use sluice_driver::store::Store;
use sluice_driver::{Driver, DriverError, Kernel};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tracing::{info, warn};

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
/// datapath follows every change); [`EngineAdmin`] implements it on its own.
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

/// A [`PolicyAdmin`] over a [`PolicyEngine`] and the store, without the datapath.
#[derive(Debug)]
pub struct EngineAdmin {
    engine: Mutex<PolicyEngine>,
    store: Store,
}

impl EngineAdmin {
    /// Loads the stored policies.
    ///
    /// # Errors
    /// When the store cannot be read or its policies are inconsistent.
    pub fn open(store: Store) -> Result<Self, AdminError> {
        let snapshot = store
            .load()
            .map_err(|e| AdminError::from(PolicyError::from(e)))?;
        let engine = PolicyEngine::load(snapshot.policies)?;
        Ok(Self {
            engine: Mutex::new(engine),
            store,
        })
    }

    /// A copy of the engine (for tests and status).
    pub async fn engine(&self) -> PolicyEngine {
        self.engine.lock().await.clone()
    }
}

impl PolicyAdmin for EngineAdmin {
    async fn apply_policies(&self, yaml: String) -> Result<Vec<Applied>, AdminError> {
        let docs = parse_documents(&yaml)?;
        let mut engine = self.engine.lock().await;
        Ok(engine.apply(&self.store, docs)?)
    }

    async fn list_policies(&self) -> Result<Vec<PolicyDoc>, AdminError> {
        Ok(self
            .engine
            .lock()
            .await
            .list()
            .map(|p| p.doc.clone())
            .collect())
    }

    async fn remove_policy(&self, name: String) -> Result<(), AdminError> {
        Ok(self.engine.lock().await.remove(&self.store, &name)?)
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
        Ok(self.policies().await)
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

/// The admin router.
pub fn router<A: PolicyAdmin>(admin: Arc<A>) -> Router {
    Router::new()
        .route(
            "/v1/policies",
            get(list_handler::<A>).post(apply_handler::<A>),
        )
        .route("/v1/policies/{name}", delete(remove_handler::<A>))
        .fallback(|| async {
            AdminError::new(
                StatusCode::NOT_FOUND,
                "no such API path; see docs/policy.md",
            )
        })
        .with_state(admin)
}

async fn apply_handler<A: PolicyAdmin>(State(admin): State<Arc<A>>, body: Bytes) -> Response {
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

async fn list_handler<A: PolicyAdmin>(State(admin): State<Arc<A>>) -> Response {
    match admin.list_policies().await {
        Ok(policies) => json(StatusCode::OK, &ListResponse { policies }),
        Err(e) => e.into_response(),
    }
}

async fn remove_handler<A: PolicyAdmin>(
    State(admin): State<Arc<A>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    match admin.remove_policy(name.clone()).await {
        Ok(()) => {
            info!(policy = %name, "policy removed");
            json(StatusCode::OK, &RemoveResponse { removed: name })
        }
        Err(e) => e.into_response(),
    }
}

/// Why the admin socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// Another daemon answers on it.
    #[error("another sluice daemon is already serving the admin API on {0}; stop it first")]
    InUse(PathBuf),
    /// File system or bind failure.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Binds the admin socket at `path` with mode 0600, creating a missing parent directory
/// with mode 0700 (an existing one is left as it is) and replacing a stale socket.
///
/// # Errors
/// When the socket is in use or cannot be bound.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, AdminSocketError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io = |op, source| AdminSocketError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io("creating the directory of", e))?;
    }
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(AdminSocketError::InUse(path.to_path_buf()));
        }
        info!(socket = %path.display(), "replacing stale admin socket");
        tokio::fs::remove_file(path)
            .await
            .map_err(|e| io("removing stale socket", e))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| io("binding", e))?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(|e| io("setting the mode of", e))?;
    Ok(listener)
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

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<T, ClientError> {
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
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| protocol(format!("reading the answer: {e}")))?
            .to_bytes();
        drop(sender);
        driver.abort();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes).map_or_else(
                |_| format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
                |e| e.error,
            );
            return Err(ClientError::Server { status, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| protocol(format!("unexpected answer: {e}")))
    }
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

    use super::*;

    struct Harness {
        app: Router,
        admin: Arc<EngineAdmin>,
        dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let admin = Arc::new(EngineAdmin::open(store).unwrap());
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
        assert_eq!(h.admin.engine().await.len(), 1);

        // Persisted: once the first handles are gone, a new admin over the same store sees
        // the same.
        let Harness { app, admin, dir } = h;
        drop((app, admin));
        let again = EngineAdmin::open(Store::open(dir.path()).unwrap()).unwrap();
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
            "policy \"new\": ingress[0].ports[0]: port range 2000-1000 is reversed"
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
        assert!(matches!(
            bind(&socket).await,
            Err(AdminSocketError::InUse(_))
        ));

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
