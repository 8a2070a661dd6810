//! Container identity (name and labels) from the Docker Engine API.
//!
//! **Why this exists.** The eBPF policy needs to know who an endpoint belongs to: its
//! container's name and labels. Docker 20.10 sends neither in any plugin call (see
//! `docs`/the captured transcript: `RequestAddress` carries `"Options": null`, `CreateEndpoint`
//! and `Join` only carry port options). The only source is the Docker Engine API, where the
//! container is found by the `SandboxKey` of `Join` (`NetworkSettings.SandboxKey`) or by the
//! endpoint ID (`NetworkSettings.Networks.<net>.EndpointID`).
//!
//! **Why asynchronously, never from a plugin handler.** dockerd holds the container's lock
//! while it starts the container, and starting includes the plugin's `Join`. `GET
//! /containers/{id}/json` takes that same lock: measured on 20.10.24, an inspect issued during
//! `docker run` returned only when the start finished (≈ 0.5 s later). An inspect from inside
//! `Join` would therefore wait for the `Join` it is part of: a deadlock until dockerd's 30 s
//! plugin timeout. So the handler only *asks* ([`IdentityResolver::request`], a channel send)
//! and a background task answers on an output channel once the Engine API knows the answer.
//!
//! **How the task knows.** It subscribes to `GET /events` (container `start`, `rename`, `die`,
//! `destroy`; network `connect`, `disconnect`), lists the running containers after every
//! (re)connection (subscribing first, so nothing falls between the listing and the stream), and
//! inspects a container whenever an event names it. The inspections run in their own tasks: an
//! inspect of a starting container blocks until the start is done, which must not stall the
//! rest. Events arrive in this order for `docker run`: `create`, network `connect` (right
//! after `Join`, ≈ 0.4 s before `start`), `start`. A request made right after `Join` therefore
//! usually waits a little: it is kept (bounded, 30 s by default) and answered as soon as an
//! inspection matches it; the latency is logged (`latency_ms`). Requested endpoints stay
//! watched: a `rename` sends their identity again; `die`/`destroy` drop them.
//!
//! Without a reachable Engine API (no socket, permission denied) the resolver still runs,
//! retrying with backoff, and [`IdentityResolver::available`] says `false` with a reason; the
//! driver-option labels (`sluice.label.*`) and CIDR rules do not depend on it.
//!
//! This module owns the Engine API client ([`EngineClient`]) and the resolver; it never calls
//! the driver and never runs inside a plugin handler. The event source is a trait
//! ([`EngineSource`]) so the matching logic is tested without Docker.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sluice_driver::model::ContainerIdentity;
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Where dockerd serves its API unless `--docker-host` says otherwise.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The API version sluice speaks (Docker 20.10); lowered or raised to what the server accepts.
pub const API_VERSION: &str = "1.41";
/// How long one ordinary API call may take. An inspect of a starting container waits for the
/// start (which waits for every plugin call of it), so this is generous.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer read from the API (a listing of many containers).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Longest single event line accepted on the event stream.
const MAX_EVENT_LINE: usize = 1024 * 1024;
/// Inspections run at once while listing.
const LIST_CONCURRENCY: usize = 8;

/// Errors of the Engine API client and the resolver.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The socket file is missing: dockerd is not running (yet), or `--docker-host` is wrong.
    #[error(
        "the Docker Engine API socket {} does not exist (dockerd not running, or wrong --docker-host)",
        path.display()
    )]
    NoSocket {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but this process may not connect to it.
    #[error(
        "permission denied on the Docker Engine API socket {} (sluice needs root or the docker group)",
        path.display()
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// Any other failure to connect (refused: dockerd stopped and left its socket).
    #[error("cannot connect to the Docker Engine API at {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection closed mid-way, protocol error).
    #[error("HTTP exchange with the Docker Engine API failed ({what}): {source}")]
    Http {
        /// The call.
        what: String,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The answer's body could not be read, or was too large.
    #[error("reading the Docker Engine API answer to {what}: {message}")]
    Body {
        /// The call.
        what: String,
        /// What went wrong.
        message: String,
    },
    /// The API answered with an error status.
    #[error("the Docker Engine API answered {what} with {status}: {message}")]
    Status {
        /// The call.
        what: String,
        /// HTTP status.
        status: u16,
        /// Docker's `message`, or the body.
        message: String,
    },
    /// `404` for a container: it does not exist (any more).
    #[error("no such container {id}")]
    NoSuchContainer {
        /// The container ID or name asked for.
        id: String,
    },
    /// The API (or one event line) sent something that is not the JSON expected.
    #[error("bad JSON from the Docker Engine API ({what}): {source}")]
    BadJson {
        /// What was being decoded.
        what: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// A valid JSON answer that misses something required.
    #[error("unexpected answer from the Docker Engine API ({what}): {message}")]
    Unexpected {
        /// What was being decoded.
        what: String,
        /// What is missing or wrong.
        message: String,
    },
    /// `--docker-host` names something other than a Unix socket.
    #[error("unsupported Docker host {0:?}: only unix:///path is supported")]
    UnsupportedHost(String),
    /// The API did not answer in time.
    #[error("the Docker Engine API did not answer {what} within {after:?}")]
    Timeout {
        /// The call.
        what: String,
        /// The time allowed.
        after: Duration,
    },
    /// The request could not be built (an ID with characters a URI cannot hold).
    #[error("invalid Docker Engine API request {what}: {source}")]
    Request {
        /// The call.
        what: String,
        /// The builder's error.
        #[source]
        source: hyper::http::Error,
    },
}

impl EngineError {
    /// True for errors of one event line, after which the stream goes on.
    #[must_use]
    pub fn is_bad_event(&self) -> bool {
        matches!(self, Self::BadJson { .. } | Self::Unexpected { .. })
    }

    /// True when the error says the Engine API cannot be reached at all (as opposed to one
    /// call failing).
    #[must_use]
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::NoSocket { .. }
                | Self::PermissionDenied { .. }
                | Self::Connect { .. }
                | Self::Http { .. }
                | Self::Timeout { .. }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// data

/// What the resolver needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerInfo {
    /// Full container ID.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// `Config.Labels`.
    pub labels: BTreeMap<String, String>,
    /// `NetworkSettings.SandboxKey` (the path `Join` receives), `None` when it has none (not
    /// running, or `--network container:…`).
    pub sandbox_key: Option<String>,
    /// Network ID → endpoint ID, for every network it is connected to with an endpoint.
    pub endpoints: BTreeMap<String, String>,
    /// `State.Running`.
    pub running: bool,
}

impl ContainerInfo {
    /// Decodes the answer of `GET /containers/{id}/json` (`docker inspect`).
    ///
    /// # Errors
    /// [`EngineError::BadJson`] when it is not such an object, [`EngineError::Unexpected`]
    /// when the ID is empty.
    pub fn from_inspect_json(body: &[u8]) -> Result<Self, EngineError> {
        let raw: RawInspect =
            serde_json::from_slice(body).map_err(|source| EngineError::BadJson {
                what: "container inspect".to_owned(),
                source,
            })?;
        if raw.id.is_empty() {
            return Err(EngineError::Unexpected {
                what: "container inspect".to_owned(),
                message: "empty Id".to_owned(),
            });
        }
        let endpoints = raw
            .network_settings
            .networks
            .unwrap_or_default()
            .into_values()
            .filter(|n| !n.network_id.is_empty() && !n.endpoint_id.is_empty())
            .map(|n| (n.network_id, n.endpoint_id))
            .collect();
        Ok(Self {
            name: raw.name.strip_prefix('/').unwrap_or(&raw.name).to_owned(),
            id: raw.id,
            labels: raw.config.labels.unwrap_or_default(),
            sandbox_key: Some(raw.network_settings.sandbox_key).filter(|k| !k.is_empty()),
            endpoints,
            running: raw.state.running,
        })
    }

    /// The identity of `endpoint_id` as belonging to this container.
    #[must_use]
    pub fn identity(&self, endpoint_id: &str) -> ContainerIdentity {
        ContainerIdentity {
            endpoint_id: endpoint_id.to_owned(),
            container_id: self.id.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
        }
    }

    /// True when the container has this endpoint.
    #[must_use]
    pub fn has_endpoint(&self, endpoint_id: &str) -> bool {
        self.endpoints.values().any(|e| e == endpoint_id)
    }
}

#[derive(Debug, Deserialize)]
struct RawInspect {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: RawState,
    #[serde(rename = "Config")]
    config: RawConfig,
    #[serde(rename = "NetworkSettings")]
    network_settings: RawNetworkSettings,
}

#[derive(Debug, Deserialize)]
struct RawState {
    #[serde(rename = "Running")]
    running: bool,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
struct RawNetworkSettings {
    #[serde(rename = "SandboxKey", default)]
    sandbox_key: String,
    #[serde(rename = "Networks", default)]
    networks: Option<BTreeMap<String, RawEndpointSettings>>,
}

#[derive(Debug, Deserialize)]
struct RawEndpointSettings {
    #[serde(rename = "NetworkID", default)]
    network_id: String,
    #[serde(rename = "EndpointID", default)]
    endpoint_id: String,
}

#[derive(Debug, Deserialize)]
struct RawSummary {
    #[serde(rename = "Id")]
    id: String,
}

#[derive(Debug, Deserialize)]
struct RawVersion {
    #[serde(rename = "ApiVersion")]
    api_version: String,
    #[serde(rename = "MinAPIVersion", default)]
    min_api_version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawError {
    message: String,
}

/// What kind of object an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventType {
    /// `"Type": "container"`.
    Container,
    /// `"Type": "network"`.
    Network,
    /// Anything else (the resolver does not subscribe to those).
    Other(String),
}

/// One line of `GET /events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    /// `Type`.
    pub kind: EventType,
    /// `Action` (`start`, `die`, `rename`, `connect`, …).
    pub action: String,
    /// `Actor.ID`: the container, or the network for network events.
    pub actor_id: String,
    /// `Actor.Attributes`: a container's labels plus `name` and `image`; a network event's
    /// `container`, `name` and `type`.
    pub attributes: BTreeMap<String, String>,
    /// `timeNano`, 0 when absent.
    pub time_nano: i64,
}

impl EngineEvent {
    /// Decodes one event line.
    ///
    /// # Errors
    /// [`EngineError::BadJson`] when the line is not an event object (`Type`, `Action` and
    /// `Actor.ID` are required), [`EngineError::Unexpected`] when the actor ID is empty.
    pub fn parse(line: &[u8]) -> Result<Self, EngineError> {
        let raw: RawEvent =
            serde_json::from_slice(line).map_err(|source| EngineError::BadJson {
                what: "event".to_owned(),
                source,
            })?;
        if raw.actor.id.is_empty() {
            return Err(EngineError::Unexpected {
                what: "event".to_owned(),
                message: format!("{} {} event without Actor.ID", raw.kind, raw.action),
            });
        }
        let kind = match raw.kind.as_str() {
            "container" => EventType::Container,
            "network" => EventType::Network,
            _ => EventType::Other(raw.kind),
        };
        Ok(Self {
            kind,
            action: raw.action,
            actor_id: raw.actor.id,
            attributes: raw.actor.attributes.unwrap_or_default(),
            time_nano: raw.time_nano,
        })
    }

    /// The container the event is about: the actor of a container event, the `container`
    /// attribute of a network event.
    #[must_use]
    pub fn container_id(&self) -> Option<&str> {
        match self.kind {
            EventType::Container => Some(self.actor_id.as_str()),
            EventType::Network => self.attributes.get("container").map(String::as_str),
            EventType::Other(_) => None,
        }
        .filter(|id| !id.is_empty())
    }
}

#[derive(Debug, Deserialize)]
struct RawEvent {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Actor")]
    actor: RawActor,
    #[serde(rename = "timeNano", default)]
    time_nano: i64,
}

#[derive(Debug, Deserialize)]
struct RawActor {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------------------------------------
// client

/// Aborts a task when dropped (the connection driver of one HTTP exchange).
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client of the Docker Engine API on a Unix socket: one HTTP/1.1 connection per call.
#[derive(Debug, Clone)]
pub struct EngineClient {
    socket: PathBuf,
    /// The API version in the paths (`1.41`), adjusted by [`EngineClient::ping`].
    api_version: Arc<Mutex<String>>,
    timeout: Duration,
}

impl EngineClient {
    /// A client of the API on `socket`; no I/O until the first call.
    #[must_use]
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            api_version: Arc::new(Mutex::new(API_VERSION.to_owned())),
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// A client for a `DOCKER_HOST`-style address: `unix:///path` or a plain absolute path.
    ///
    /// # Errors
    /// [`EngineError::UnsupportedHost`] for `tcp://`, `ssh://` and anything else.
    pub fn from_docker_host(host: &str) -> Result<Self, EngineError> {
        let path = host.strip_prefix("unix://").unwrap_or(host);
        if path.starts_with('/') && !path.contains("://") {
            Ok(Self::new(path))
        } else {
            Err(EngineError::UnsupportedHost(host.to_owned()))
        }
    }

    /// Sets how long one call may take (not the event stream, which has no end).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The API version used in request paths.
    #[must_use]
    pub fn api_version(&self) -> String {
        self.api_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `GET /_ping`, then `GET /version` to choose the API version: [`API_VERSION`] when the
    /// server accepts it, else the nearest it accepts.
    ///
    /// # Errors
    /// When the API cannot be reached or does not answer `OK`.
    pub async fn ping(&self) -> Result<(), EngineError> {
        let (status, body) = self.get("ping", "/_ping").await?;
        if status != StatusCode::OK || body.trim_ascii() != b"OK" {
            return Err(EngineError::Status {
                what: "ping".to_owned(),
                status: status.as_u16(),
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let (status, body) = self.get("version", "/version").await?;
        check_status("version", status, &body)?;
        let version: RawVersion =
            serde_json::from_slice(&body).map_err(|source| EngineError::BadJson {
                what: "version".to_owned(),
                source,
            })?;
        let chosen = negotiate(&version.api_version, version.min_api_version.as_deref());
        let mut current = self
            .api_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != chosen {
            info!(
                server = %version.api_version,
                min = ?version.min_api_version,
                using = %chosen,
                "Docker Engine API version negotiated"
            );
            *current = chosen;
        }
        Ok(())
    }

    /// `GET /v1.41/containers/{id}/json`.
    ///
    /// # Errors
    /// [`EngineError::NoSuchContainer`] for a 404, else as any call.
    pub async fn container(&self, id: &str) -> Result<ContainerInfo, EngineError> {
        let path = format!(
            "/v{}/containers/{}/json",
            self.api_version(),
            query_escape(id)
        );
        let (status, body) = self.get("container inspect", &path).await?;
        if status == StatusCode::NOT_FOUND {
            return Err(EngineError::NoSuchContainer { id: id.to_owned() });
        }
        check_status("container inspect", status, &body)?;
        ContainerInfo::from_inspect_json(&body)
    }

    /// The running containers: `GET /v1.41/containers/json`, then an inspect of each (the
    /// summary has no `SandboxKey`). Containers that vanish meanwhile are left out; one that
    /// cannot be inspected is left out with a warning.
    ///
    /// # Errors
    /// When the listing fails, or the API becomes unreachable.
    pub async fn list_running(&self) -> Result<Vec<ContainerInfo>, EngineError> {
        let path = format!("/v{}/containers/json", self.api_version());
        let (status, body) = self.get("container list", &path).await?;
        check_status("container list", status, &body)?;
        let summaries: Vec<RawSummary> =
            serde_json::from_slice(&body).map_err(|source| EngineError::BadJson {
                what: "container list".to_owned(),
                source,
            })?;
        let limit = Arc::new(Semaphore::new(LIST_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for summary in summaries {
            let client = self.clone();
            let limit = Arc::clone(&limit);
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result = client.container(&summary.id).await;
                (summary.id, result)
            });
        }
        let mut out = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let Ok((id, result)) = joined else {
                continue;
            };
            match result {
                Ok(info) => out.push(info),
                Err(EngineError::NoSuchContainer { .. }) => {}
                Err(e) if e.is_unreachable() => return Err(e),
                Err(e) => {
                    warn!(container = %short(&id), error = %e, "cannot inspect container; left out")
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// `GET /v1.41/networks`: network ID → name, for policy selectors that name a network
    /// (Docker does not tell plugins their networks' names).
    ///
    /// # Errors
    /// When the API cannot be reached, refuses, or answers something else than a list.
    pub async fn network_names(&self) -> Result<BTreeMap<String, String>, EngineError> {
        #[derive(Deserialize)]
        struct RawNetwork {
            #[serde(rename = "Id")]
            id: String,
            #[serde(rename = "Name")]
            name: String,
        }
        let path = format!("/v{}/networks", self.api_version());
        let (status, body) = self.get("network list", &path).await?;
        check_status("network list", status, &body)?;
        let networks: Vec<RawNetwork> =
            serde_json::from_slice(&body).map_err(|source| EngineError::BadJson {
                what: "network list".to_owned(),
                source,
            })?;
        Ok(networks.into_iter().map(|n| (n.id, n.name)).collect())
    }

    /// `GET /v1.41/events` for the container and network events the resolver needs, as a
    /// stream of newline-delimited JSON.
    ///
    /// # Errors
    /// When the API cannot be reached or refuses.
    pub async fn events(&self) -> Result<EventStream, EngineError> {
        let filters = r#"{"type":["container","network"],"event":["start","rename","die","destroy","connect","disconnect"]}"#;
        let path = format!(
            "/v{}/events?filters={}",
            self.api_version(),
            query_escape(filters)
        );
        let exchange = self.exchange("events", &path);
        let (response, conn) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| EngineError::Timeout {
                what: "events".to_owned(),
                after: self.timeout,
            })??;
        let status = response.status();
        if !status.is_success() {
            let body = read_body("events", response.into_body()).await?;
            return Err(status_error("events", status, &body));
        }
        Ok(EventStream {
            source: Source::Http {
                body: response.into_body(),
                buf: Vec::new(),
                done: false,
                _conn: conn,
            },
        })
    }

    async fn get(&self, what: &str, path: &str) -> Result<(StatusCode, Bytes), EngineError> {
        let call = async {
            let (response, _conn) = self.exchange(what, path).await?;
            let status = response.status();
            let body = read_body(what, response.into_body()).await?;
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| EngineError::Timeout {
                what: what.to_owned(),
                after: self.timeout,
            })?
    }

    async fn exchange(
        &self,
        what: &str,
        path: &str,
    ) -> Result<(hyper::Response<Incoming>, AbortOnDrop), EngineError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect_error(&self.socket, e))?;
        let http = |source| EngineError::Http {
            what: what.to_owned(),
            source,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(http)?;
        let conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "Docker Engine API connection closed");
            }
        }));
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            // Docker's Go server refuses HTTP/1.1 without a Host header.
            .header(hyper::header::HOST, "docker")
            .body(Empty::new())
            .map_err(|source| EngineError::Request {
                what: what.to_owned(),
                source,
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        Ok((response, conn))
    }
}

fn connect_error(path: &Path, e: std::io::Error) -> EngineError {
    let path = path.to_owned();
    match e.kind() {
        std::io::ErrorKind::NotFound => EngineError::NoSocket { path },
        std::io::ErrorKind::PermissionDenied => EngineError::PermissionDenied { path },
        _ => EngineError::Connect { path, source: e },
    }
}

async fn read_body(what: &str, body: Incoming) -> Result<Bytes, EngineError> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| EngineError::Body {
            what: what.to_owned(),
            message: e.to_string(),
        })
}

fn check_status(what: &str, status: StatusCode, body: &[u8]) -> Result<(), EngineError> {
    if status.is_success() {
        Ok(())
    } else {
        Err(status_error(what, status, body))
    }
}

fn status_error(what: &str, status: StatusCode, body: &[u8]) -> EngineError {
    let message = serde_json::from_slice::<RawError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).trim().to_owned());
    EngineError::Status {
        what: what.to_owned(),
        status: status.as_u16(),
        message,
    }
}

/// `"1.41"` → `(1, 41)`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// [`API_VERSION`] if the server's range holds it; else the server's maximum (older server)
/// or minimum (newer server that dropped 1.41).
fn negotiate(server_max: &str, server_min: Option<&str>) -> String {
    let ours = parse_version(API_VERSION);
    let Some(max) = parse_version(server_max) else {
        return API_VERSION.to_owned();
    };
    if ours.is_some_and(|o| max < o) {
        return server_max.trim().to_owned();
    }
    match server_min.and_then(|m| parse_version(m).map(|p| (m, p))) {
        Some((m, min)) if ours.is_some_and(|o| min > o) => m.trim().to_owned(),
        _ => API_VERSION.to_owned(),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first 12 characters of an ID, for logs.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

// ---------------------------------------------------------------------------------------------
// event stream

/// Events from the Engine API (or, in tests, from a channel). Cancel-safe: [`EventStream::next`]
/// may be dropped in a `select!` without losing events.
#[derive(Debug)]
pub struct EventStream {
    source: Source,
}

#[derive(Debug)]
enum Source {
    Http {
        body: Incoming,
        buf: Vec<u8>,
        done: bool,
        _conn: AbortOnDrop,
    },
    Channel(mpsc::Receiver<Result<EngineEvent, EngineError>>),
}

impl EventStream {
    /// A stream fed by a channel: for fake event sources. It ends when every sender is gone.
    #[must_use]
    pub fn from_channel(rx: mpsc::Receiver<Result<EngineEvent, EngineError>>) -> Self {
        Self {
            source: Source::Channel(rx),
        }
    }

    /// The next event. `Some(Err(e))` with [`EngineError::is_bad_event`] is one bad line and
    /// the stream goes on; other errors end it; `None` means it ended (dockerd stopped).
    pub async fn next(&mut self) -> Option<Result<EngineEvent, EngineError>> {
        match &mut self.source {
            Source::Channel(rx) => rx.recv().await,
            Source::Http {
                body, buf, done, ..
            } => loop {
                if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    return Some(EngineEvent::parse(line));
                }
                if *done {
                    return None;
                }
                match body.frame().await {
                    None => {
                        *done = true;
                        // A last line without its newline.
                        let rest = std::mem::take(buf);
                        let rest = rest.trim_ascii();
                        if !rest.is_empty() {
                            return Some(EngineEvent::parse(rest));
                        }
                        return None;
                    }
                    Some(Err(source)) => {
                        *done = true;
                        buf.clear();
                        return Some(Err(EngineError::Http {
                            what: "events".to_owned(),
                            source,
                        }));
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            if buf.len() + data.len() > MAX_EVENT_LINE {
                                *done = true;
                                buf.clear();
                                return Some(Err(EngineError::Body {
                                    what: "events".to_owned(),
                                    message: format!(
                                        "an event line is longer than {MAX_EVENT_LINE} bytes"
                                    ),
                                }));
                            }
                            buf.extend_from_slice(&data);
                        }
                    }
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the source trait

/// Where the resolver gets containers and events from: the Engine API ([`EngineClient`]), or
/// a fake in tests.
pub trait EngineSource: Send + Sync + 'static {
    /// Checks that the API answers (before every connection).
    fn ping(&self) -> impl Future<Output = Result<(), EngineError>> + Send;
    /// Inspects one container.
    fn container(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerInfo, EngineError>> + Send;
    /// Every running container.
    fn list_running(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, EngineError>> + Send;
    /// Subscribes to the events.
    fn events(&self) -> impl Future<Output = Result<EventStream, EngineError>> + Send;
}

impl EngineSource for EngineClient {
    fn ping(&self) -> impl Future<Output = Result<(), EngineError>> + Send {
        EngineClient::ping(self)
    }
    fn container(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerInfo, EngineError>> + Send {
        EngineClient::container(self, id)
    }
    fn list_running(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, EngineError>> + Send {
        EngineClient::list_running(self)
    }
    fn events(&self) -> impl Future<Output = Result<EventStream, EngineError>> + Send {
        EngineClient::events(self)
    }
}

// ---------------------------------------------------------------------------------------------
// resolver

/// Settings of the [`IdentityResolver`].
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// How long a request for an unknown endpoint waits for its container.
    pub request_timeout: Duration,
    /// First wait before reconnecting to the Engine API; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// While requests wait, the running containers are listed again this often, in case an
    /// event was missed.
    pub relist_interval: Duration,
    /// How long [`IdentityResolver::start`] waits for the first connection attempt.
    pub start_wait: Duration,
    /// Requests kept waiting at most; more are refused with a warning.
    pub max_pending: usize,
    /// Capacity of the output channel.
    pub output_capacity: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            relist_interval: Duration::from_secs(2),
            start_wait: Duration::from_secs(3),
            max_pending: 4096,
            output_capacity: 256,
        }
    }
}

/// Whether the resolver can currently reach the Engine API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// The first connection attempt has not finished.
    Connecting,
    /// Connected: events flow.
    Available,
    /// Not connected; retrying in the background. The reason is for the log.
    Unavailable(String),
}

/// Counters and sizes of the resolver, for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Connected to the Engine API now.
    pub available: bool,
    /// Successful connections so far (1 + reconnections).
    pub connections: u64,
    /// Running containers known.
    pub containers: usize,
    /// Requests waiting for their container.
    pub pending: usize,
    /// Endpoints whose identity was sent and is followed (renames).
    pub watched: usize,
    /// Requests answered.
    pub resolved: u64,
    /// Identities sent again because the container changed.
    pub updated: u64,
    /// Requests that found no container in time.
    pub timed_out: u64,
}

/// Resolves endpoints to their container's identity in a background task.
///
/// Cheap to clone; the task stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct IdentityResolver {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<Availability>,
    _task: AbortOnDrop,
}

#[derive(Debug)]
enum Command {
    Request {
        endpoint_id: String,
        sandbox_key: String,
        at: Instant,
    },
    Forget(String),
    Stats(oneshot::Sender<ResolverStats>),
}

impl IdentityResolver {
    /// Starts the resolver against the Engine API and waits (up to
    /// [`ResolverConfig::start_wait`]) for the first connection attempt, so that
    /// [`IdentityResolver::available`] tells whether the API is reachable. It keeps retrying
    /// in the background either way. Identities arrive on the returned receiver.
    pub async fn start(
        client: EngineClient,
        config: ResolverConfig,
    ) -> (Self, mpsc::Receiver<ContainerIdentity>) {
        Self::start_with(Arc::new(client), config).await
    }

    /// Like [`IdentityResolver::start`] with any [`EngineSource`] (a fake in tests).
    pub async fn start_with<S: EngineSource>(
        source: Arc<S>,
        config: ResolverConfig,
    ) -> (Self, mpsc::Receiver<ContainerIdentity>) {
        let (out_tx, out_rx) = mpsc::channel(config.output_capacity.max(1));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (status_tx, mut status_rx) = watch::channel(Availability::Connecting);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let start_wait = config.start_wait;
        let actor = Actor {
            source,
            backoff: config.reconnect_min,
            config,
            out: out_tx,
            out_closed: false,
            status: status_tx,
            last_failure: None,
            internal: internal_tx,
            containers: HashMap::new(),
            by_sandbox: HashMap::new(),
            by_endpoint: HashMap::new(),
            pending: HashMap::new(),
            watched: HashMap::new(),
            inflight: HashMap::new(),
            conn: Conn::Down {
                retry_at: Instant::now(),
            },
            next_relist: None,
            relisting: false,
            stats: ResolverStats::default(),
        };
        let task = tokio::spawn(actor.run(cmd_rx, internal_rx));
        let _ = tokio::time::timeout(
            start_wait,
            status_rx.wait_for(|s| *s != Availability::Connecting),
        )
        .await;
        let resolver = Self {
            shared: Arc::new(Shared {
                commands: cmd_tx,
                status: status_rx,
                _task: AbortOnDrop(task),
            }),
        };
        (resolver, out_rx)
    }

    /// True while connected to the Engine API.
    #[must_use]
    pub fn available(&self) -> bool {
        *self.shared.status.borrow() == Availability::Available
    }

    /// Connected, connecting, or why not.
    #[must_use]
    pub fn availability(&self) -> Availability {
        self.shared.status.borrow().clone()
    }

    /// Why the Engine API is not reachable now; `None` while it is.
    #[must_use]
    pub fn unavailable_reason(&self) -> Option<String> {
        match &*self.shared.status.borrow() {
            Availability::Available => None,
            Availability::Connecting => {
                Some("no answer from the Docker Engine API yet; still trying".to_owned())
            }
            Availability::Unavailable(reason) => Some(reason.clone()),
        }
    }

    /// Waits until connected (true) or `timeout` passes (false).
    pub async fn wait_available(&self, timeout: Duration) -> bool {
        let mut status = self.shared.status.clone();
        tokio::time::timeout(timeout, status.wait_for(|s| *s == Availability::Available))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Asks for the identity of the endpoint that `Join` just connected to `sandbox_key`.
    /// Never blocks and never calls the Engine API: call it from the `Join` path, after the
    /// driver's work. The answer comes on the output channel, at once when the container is
    /// known, else as soon as it appears (within [`ResolverConfig::request_timeout`]).
    pub fn request(&self, endpoint_id: impl Into<String>, sandbox_key: impl Into<String>) {
        let command = Command::Request {
            endpoint_id: endpoint_id.into(),
            sandbox_key: sandbox_key.into(),
            at: Instant::now(),
        };
        if self.shared.commands.send(command).is_err() {
            warn!("the identity resolver has stopped; request ignored");
        }
    }

    /// Stops waiting for and following `endpoint_id` (after `Leave` / `DeleteEndpoint`).
    pub fn forget(&self, endpoint_id: impl Into<String>) {
        let _ = self
            .shared
            .commands
            .send(Command::Forget(endpoint_id.into()));
    }

    /// Current counters; `None` when the task has stopped.
    pub async fn stats(&self) -> Option<ResolverStats> {
        let (tx, rx) = oneshot::channel();
        self.shared.commands.send(Command::Stats(tx)).ok()?;
        rx.await.ok()
    }
}

#[derive(Debug)]
enum Internal {
    Connected(Result<(EventStream, Vec<ContainerInfo>), EngineError>),
    Inspected {
        id: String,
        result: Result<ContainerInfo, EngineError>,
    },
    Listed(Result<Vec<ContainerInfo>, EngineError>),
}

#[derive(Debug)]
enum Conn {
    Down { retry_at: Instant },
    Connecting,
    Up(EventStream),
}

#[derive(Debug)]
struct Pending {
    sandbox_key: String,
    requested: Instant,
    deadline: Instant,
}

#[derive(Debug)]
struct Watched {
    container_id: String,
    sent: ContainerIdentity,
}

/// An inspection in flight: run it again when it returns (an event came meanwhile), and
/// whether to drop watched endpoints the container no longer has (after `disconnect`).
#[derive(Debug, Default)]
struct Inflight {
    again: bool,
    prune: bool,
}

enum Step {
    Command(Option<Command>),
    Internal(Option<Internal>),
    Event(Option<Result<EngineEvent, EngineError>>),
    Tick,
}

#[derive(Debug)]
struct Actor<S> {
    source: Arc<S>,
    config: ResolverConfig,
    out: mpsc::Sender<ContainerIdentity>,
    out_closed: bool,
    status: watch::Sender<Availability>,
    last_failure: Option<String>,
    internal: mpsc::UnboundedSender<Internal>,
    containers: HashMap<String, ContainerInfo>,
    by_sandbox: HashMap<String, String>,
    by_endpoint: HashMap<String, String>,
    pending: HashMap<String, Pending>,
    watched: HashMap<String, Watched>,
    inflight: HashMap<String, Inflight>,
    conn: Conn,
    backoff: Duration,
    next_relist: Option<Instant>,
    relisting: bool,
    stats: ResolverStats,
}

impl<S: EngineSource> Actor<S> {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
        loop {
            let wake = self.next_wake();
            let step = tokio::select! {
                c = commands.recv() => Step::Command(c),
                m = internal.recv() => Step::Internal(m),
                e = next_event(&mut self.conn) => Step::Event(e),
                () = sleep_until(wake) => Step::Tick,
            };
            match step {
                Step::Command(None) => {
                    debug!("identity resolver: every handle dropped; stopping");
                    return;
                }
                Step::Command(Some(c)) => self.on_command(c).await,
                // `self.internal` keeps the channel open, so `None` does not happen.
                Step::Internal(None) => {}
                Step::Internal(Some(m)) => self.on_internal(m).await,
                Step::Event(e) => self.on_event(e).await,
                Step::Tick => self.on_tick().await,
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake = self.pending.values().map(|p| p.deadline).min();
        let mut earliest = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        match &self.conn {
            Conn::Down { retry_at } => earliest(*retry_at),
            Conn::Up(_) => {
                if let Some(t) = self.next_relist
                    && !self.relisting
                {
                    earliest(t);
                }
            }
            Conn::Connecting => {}
        }
        wake
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                endpoint_id,
                sandbox_key,
                at,
            } => self.on_request(endpoint_id, sandbox_key, at).await,
            Command::Forget(endpoint_id) => {
                self.pending.remove(&endpoint_id);
                self.watched.remove(&endpoint_id);
            }
            Command::Stats(tx) => {
                let mut stats = self.stats.clone();
                stats.available = matches!(self.conn, Conn::Up(_));
                stats.containers = self.containers.len();
                stats.pending = self.pending.len();
                stats.watched = self.watched.len();
                let _ = tx.send(stats);
            }
        }
    }

    async fn on_request(&mut self, endpoint_id: String, sandbox_key: String, at: Instant) {
        if endpoint_id.is_empty() {
            warn!(sandbox = %sandbox_key, "identity request without an endpoint ID; ignored");
            return;
        }
        let found = self
            .by_endpoint
            .get(&endpoint_id)
            .or_else(|| {
                Some(&sandbox_key)
                    .filter(|k| !k.is_empty())
                    .and_then(|k| self.by_sandbox.get(k))
            })
            .and_then(|id| self.containers.get(id))
            .cloned();
        if let Some(info) = found {
            self.resolve(&endpoint_id, &info, at).await;
            return;
        }
        if self.pending.len() >= self.config.max_pending && !self.pending.contains_key(&endpoint_id)
        {
            warn!(
                endpoint = %short(&endpoint_id),
                pending = self.pending.len(),
                "too many identity requests waiting; this one is dropped"
            );
            return;
        }
        debug!(
            endpoint = %short(&endpoint_id),
            sandbox = %sandbox_key,
            "container not known yet; waiting for it"
        );
        self.pending.insert(
            endpoint_id,
            Pending {
                sandbox_key,
                requested: at,
                deadline: at + self.config.request_timeout,
            },
        );
        match &mut self.conn {
            // Docker is calling Join, so the API is probably back: try now.
            Conn::Down { retry_at } => *retry_at = Instant::now(),
            Conn::Up(_) => {
                if self.next_relist.is_none() {
                    self.next_relist = Some(Instant::now() + self.config.relist_interval);
                }
            }
            Conn::Connecting => {}
        }
    }

    async fn on_internal(&mut self, message: Internal) {
        match message {
            Internal::Connected(Ok((events, containers))) => {
                self.stats.connections += 1;
                info!(
                    containers = containers.len(),
                    reconnection = self.stats.connections > 1,
                    "connected to the Docker Engine API; container identities resolve"
                );
                self.backoff = self.config.reconnect_min;
                self.last_failure = None;
                self.conn = Conn::Up(events);
                self.status.send_replace(Availability::Available);
                self.replace_all(containers).await;
                self.next_relist = (!self.pending.is_empty())
                    .then(|| Instant::now() + self.config.relist_interval);
            }
            Internal::Connected(Err(e)) => {
                let reason = e.to_string();
                if self.last_failure.as_deref() != Some(&reason) {
                    warn!(error = %reason, retry_in = ?self.backoff, "Docker Engine API not reachable; retrying");
                } else {
                    debug!(error = %reason, retry_in = ?self.backoff, "Docker Engine API still not reachable");
                }
                self.last_failure = Some(reason.clone());
                self.status.send_replace(Availability::Unavailable(reason));
                self.conn = Conn::Down {
                    retry_at: Instant::now() + self.backoff,
                };
                self.backoff = (self.backoff * 2).min(self.config.reconnect_max);
            }
            Internal::Inspected { id, result } => {
                let state = self.inflight.remove(&id).unwrap_or_default();
                match result {
                    Ok(info) if info.running => self.upsert(info, state.prune).await,
                    Ok(_) | Err(EngineError::NoSuchContainer { .. }) => self.remove_container(&id),
                    Err(e) => {
                        warn!(container = %short(&id), error = %e, "cannot inspect container")
                    }
                }
                if state.again {
                    self.inspect(id, state.prune);
                }
            }
            Internal::Listed(result) => {
                self.relisting = false;
                match result {
                    Ok(containers) => {
                        for info in containers {
                            self.upsert(info, false).await;
                        }
                    }
                    Err(e) => debug!(error = %e, "listing containers failed"),
                }
                self.next_relist = (!self.pending.is_empty())
                    .then(|| Instant::now() + self.config.relist_interval);
            }
        }
    }

    async fn on_event(&mut self, event: Option<Result<EngineEvent, EngineError>>) {
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) if e.is_bad_event() => {
                warn!(error = %e, "bad Docker event ignored");
                return;
            }
            end => {
                let reason = match end {
                    Some(Err(e)) => format!("Docker Engine API event stream failed: {e}"),
                    _ => "Docker Engine API event stream ended (dockerd stopped?)".to_owned(),
                };
                warn!(reason = %reason, "reconnecting to the Docker Engine API");
                self.status
                    .send_replace(Availability::Unavailable(format!("{reason}; reconnecting")));
                self.backoff = self.config.reconnect_min;
                self.conn = Conn::Down {
                    retry_at: Instant::now() + self.config.reconnect_min,
                };
                return;
            }
        };
        let Some(container) = event.container_id().map(str::to_owned) else {
            return;
        };
        debug!(kind = ?event.kind, action = %event.action, container = %short(&container), "Docker event");
        match (&event.kind, event.action.as_str()) {
            (EventType::Container, "start" | "rename") | (EventType::Network, "connect") => {
                self.inspect(container, false);
            }
            (EventType::Network, "disconnect") => self.inspect(container, true),
            (EventType::Container, "die" | "destroy") => {
                self.remove_container(&container);
                // An inspection that started before the container died would bring it back.
                if let Some(inflight) = self.inflight.get_mut(&container) {
                    inflight.again = true;
                }
            }
            _ => {}
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(e, _)| e.clone())
            .collect();
        for endpoint_id in expired {
            if let Some(p) = self.pending.remove(&endpoint_id) {
                self.stats.timed_out += 1;
                warn!(
                    endpoint = %short(&endpoint_id),
                    sandbox = %p.sandbox_key,
                    waited_ms = millis(now - p.requested),
                    "no container found for endpoint; its name and labels stay unknown"
                );
            }
        }
        match &self.conn {
            Conn::Down { retry_at } if *retry_at <= now => {
                self.conn = Conn::Connecting;
                let source = Arc::clone(&self.source);
                let tx = self.internal.clone();
                tokio::spawn(async move {
                    let result = connect(&*source).await;
                    let _ = tx.send(Internal::Connected(result));
                });
            }
            Conn::Up(_) if self.next_relist.is_some_and(|t| t <= now) && !self.relisting => {
                self.next_relist = None;
                if !self.pending.is_empty() {
                    self.relisting = true;
                    let source = Arc::clone(&self.source);
                    let tx = self.internal.clone();
                    tokio::spawn(async move {
                        let result = source.list_running().await;
                        let _ = tx.send(Internal::Listed(result));
                    });
                }
            }
            _ => {}
        }
    }

    /// Inspects `id` in its own task (it may block while the container starts).
    fn inspect(&mut self, id: String, prune: bool) {
        if let Some(inflight) = self.inflight.get_mut(&id) {
            inflight.again = true;
            inflight.prune |= prune;
            return;
        }
        self.inflight.insert(
            id.clone(),
            Inflight {
                again: false,
                prune,
            },
        );
        let source = Arc::clone(&self.source);
        let tx = self.internal.clone();
        tokio::spawn(async move {
            let result = source.container(&id).await;
            let _ = tx.send(Internal::Inspected { id, result });
        });
    }

    /// Records a running container, answers the requests it matches and sends changed
    /// identities of its watched endpoints. With `prune`, watched endpoints it no longer has
    /// are dropped.
    async fn upsert(&mut self, info: ContainerInfo, prune: bool) {
        self.unindex(&info.id);
        if let Some(key) = &info.sandbox_key {
            self.by_sandbox.insert(key.clone(), info.id.clone());
        }
        for endpoint in info.endpoints.values() {
            self.by_endpoint.insert(endpoint.clone(), info.id.clone());
        }

        let matched: Vec<(String, Instant)> = self
            .pending
            .iter()
            .filter(|(endpoint, p)| {
                info.has_endpoint(endpoint)
                    || (!p.sandbox_key.is_empty()
                        && info.sandbox_key.as_deref() == Some(p.sandbox_key.as_str()))
            })
            .map(|(endpoint, p)| (endpoint.clone(), p.requested))
            .collect();
        for (endpoint, requested) in matched {
            self.pending.remove(&endpoint);
            self.resolve(&endpoint, &info, requested).await;
        }

        let mut changed = Vec::new();
        self.watched.retain(|endpoint, w| {
            if w.container_id != info.id {
                return true;
            }
            if prune && !info.has_endpoint(endpoint) {
                debug!(endpoint = %short(endpoint), "endpoint left its container; no longer followed");
                return false;
            }
            let identity = info.identity(endpoint);
            if identity != w.sent {
                w.sent = identity.clone();
                changed.push(identity);
            }
            true
        });
        for identity in changed {
            self.stats.updated += 1;
            info!(
                endpoint = %short(&identity.endpoint_id),
                container = %short(&identity.container_id),
                name = %identity.name,
                labels = identity.labels.len(),
                "container identity changed"
            );
            self.send(identity).await;
        }
        self.containers.insert(info.id.clone(), info);
    }

    /// Replaces every known container with a fresh listing (after a (re)connection).
    async fn replace_all(&mut self, containers: Vec<ContainerInfo>) {
        let listed: std::collections::HashSet<&str> =
            containers.iter().map(|c| c.id.as_str()).collect();
        let gone: Vec<String> = self
            .containers
            .keys()
            .filter(|id| !listed.contains(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.remove_container(&id);
        }
        for info in containers {
            self.upsert(info, true).await;
        }
    }

    fn unindex(&mut self, id: &str) {
        if let Some(old) = self.containers.get(id) {
            if let Some(key) = &old.sandbox_key
                && self.by_sandbox.get(key).is_some_and(|c| c == id)
            {
                self.by_sandbox.remove(key);
            }
            for endpoint in old.endpoints.values() {
                if self.by_endpoint.get(endpoint).is_some_and(|c| c == id) {
                    self.by_endpoint.remove(endpoint);
                }
            }
        }
    }

    fn remove_container(&mut self, id: &str) {
        self.unindex(id);
        if self.containers.remove(id).is_some() {
            debug!(container = %short(id), "container gone");
        }
        self.watched.retain(|_, w| w.container_id != id);
    }

    async fn resolve(&mut self, endpoint_id: &str, info: &ContainerInfo, requested: Instant) {
        let identity = info.identity(endpoint_id);
        let latency_ms = millis(requested.elapsed());
        self.stats.resolved += 1;
        info!(
            latency_ms,
            endpoint = %short(endpoint_id),
            container = %short(&info.id),
            name = %info.name,
            labels = info.labels.len(),
            "resolved container identity"
        );
        self.watched.insert(
            endpoint_id.to_owned(),
            Watched {
                container_id: info.id.clone(),
                sent: identity.clone(),
            },
        );
        self.send(identity).await;
    }

    async fn send(&mut self, identity: ContainerIdentity) {
        if self.out_closed {
            return;
        }
        if self.out.send(identity).await.is_err() {
            self.out_closed = true;
            warn!("nobody consumes container identities any more; they are only logged");
        }
    }
}

/// Ping, subscribe, list: in this order, so no event between the listing and the stream is
/// lost (events that arrive meanwhile wait in the stream).
async fn connect<S: EngineSource>(
    source: &S,
) -> Result<(EventStream, Vec<ContainerInfo>), EngineError> {
    source.ping().await?;
    let events = source.events().await?;
    let containers = source.list_running().await?;
    Ok((events, containers))
}

async fn next_event(conn: &mut Conn) -> Option<Result<EngineEvent, EngineError>> {
    match conn {
        Conn::Up(events) => events.next().await,
        _ => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    // ---- fixtures captured from the harness's private dockerd 20.10.24 ------------------
    //
    // `docker run -d --name web-1 --network capnet --label sluice.role=web
    //  --label "com.example.tier=front end" …`, then `curl --unix-socket … /v1.41/containers/web-1/json`.
    const INSPECT_WEB_1: &str = r##"{
  "Id": "c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92",
  "Created": "2026-11-28T04:35:01.990738188Z",
  "Path": "sh",
  "Args": [
    "-c",
    "trap 'exit 0' TERM; sleep 3600 & wait"
  ],
  "State": {
    "Status": "running",
    "Running": true,
    "Paused": false,
    "Restarting": false,
    "OOMKilled": false,
    "Dead": false,
    "Pid": 17732,
    "ExitCode": 0,
    "Error": "",
    "StartedAt": "2026-11-28T04:35:02.480822976Z",
    "FinishedAt": "0001-01-01T00:00:00Z"
  },
  "Image": "sha256:6cc0640f8e87bccee01323567188406a99abcdac1fa1ee685d623370638e761f",
  "ResolvConfPath": "/tmp/sle2e-17167-0/data/containers/c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92/resolv.conf",
  "HostnamePath": "/tmp/sle2e-17167-0/data/containers/c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92/hostname",
  "HostsPath": "/tmp/sle2e-17167-0/data/containers/c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92/hosts",
  "LogPath": "/tmp/sle2e-17167-0/data/containers/c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92/c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92-json.log",
  "Name": "/web-1",
  "RestartCount": 0,
  "Driver": "overlay2",
  "Platform": "linux",
  "MountLabel": "",
  "ProcessLabel": "",
  "AppArmorProfile": "",
  "ExecIDs": null,
  "HostConfig": {
    "Binds": null,
    "ContainerIDFile": "",
    "LogConfig": {
      "Type": "json-file",
      "Config": {}
    },
    "NetworkMode": "capnet",
    "PortBindings": {},
    "RestartPolicy": {
      "Name": "no",
      "MaximumRetryCount": 0
    },
    "AutoRemove": false,
    "VolumeDriver": "",
    "VolumesFrom": null,
    "CapAdd": null,
    "CapDrop": null,
    "CgroupnsMode": "host",
    "Dns": [],
    "DnsOptions": [],
    "DnsSearch": [],
    "ExtraHosts": null,
    "GroupAdd": null,
    "IpcMode": "private",
    "Cgroup": "",
    "Links": null,
    "OomScoreAdj": 0,
    "PidMode": "",
    "Privileged": false,
    "PublishAllPorts": false,
    "ReadonlyRootfs": false,
    "SecurityOpt": null,
    "UTSMode": "",
    "UsernsMode": "",
    "ShmSize": 67108864,
    "Runtime": "runc",
    "ConsoleSize": [
      0,
      0
    ],
    "Isolation": "",
    "CpuShares": 0,
    "Memory": 0,
    "NanoCpus": 0,
    "CgroupParent": "",
    "BlkioWeight": 0,
    "BlkioWeightDevice": [],
    "BlkioDeviceReadBps": [],
    "BlkioDeviceWriteBps": [],
    "BlkioDeviceReadIOps": [],
    "BlkioDeviceWriteIOps": [],
    "CpuPeriod": 0,
    "CpuQuota": 0,
    "CpuRealtimePeriod": 0,
    "CpuRealtimeRuntime": 0,
    "CpusetCpus": "",
    "CpusetMems": "",
    "Devices": [],
    "DeviceCgroupRules": null,
    "DeviceRequests": null,
    "KernelMemory": 0,
    "KernelMemoryTCP": 0,
    "MemoryReservation": 0,
    "MemorySwap": 0,
    "MemorySwappiness": null,
    "OomKillDisable": false,
    "PidsLimit": null,
    "Ulimits": [],
    "CpuCount": 0,
    "CpuPercent": 0,
    "IOMaximumIOps": 0,
    "IOMaximumBandwidth": 0,
    "MaskedPaths": [
      "/proc/asound",
      "/proc/acpi",
      "/proc/kcore",
      "/proc/keys",
      "/proc/latency_stats",
      "/proc/timer_list",
      "/proc/timer_stats",
      "/proc/sched_debug",
      "/proc/scsi",
      "/sys/firmware"
    ],
    "ReadonlyPaths": [
      "/proc/bus",
      "/proc/fs",
      "/proc/irq",
      "/proc/sys",
      "/proc/sysrq-trigger"
    ]
  },
  "GraphDriver": {
    "Data": {
      "LowerDir": "/tmp/sle2e-17167-0/data/overlay2/cd78edd159f8e4ef2f6465f007c24c6b883e03d4fce263c1febb01021f716c8c-init/diff:/tmp/sle2e-17167-0/data/overlay2/6569569e197e0aba0214f1205ff7b9d99fdb9e4c9a3f6e77df0d580cba793dc3/diff",
      "MergedDir": "/tmp/sle2e-17167-0/data/overlay2/cd78edd159f8e4ef2f6465f007c24c6b883e03d4fce263c1febb01021f716c8c/merged",
      "UpperDir": "/tmp/sle2e-17167-0/data/overlay2/cd78edd159f8e4ef2f6465f007c24c6b883e03d4fce263c1febb01021f716c8c/diff",
      "WorkDir": "/tmp/sle2e-17167-0/data/overlay2/cd78edd159f8e4ef2f6465f007c24c6b883e03d4fce263c1febb01021f716c8c/work"
    },
    "Name": "overlay2"
  },
  "Mounts": [],
  "Config": {
    "Hostname": "web-1",
    "Domainname": "",
    "User": "",
    "AttachStdin": false,
    "AttachStdout": false,
    "AttachStderr": false,
    "Tty": false,
    "OpenStdin": false,
    "StdinOnce": false,
    "Env": null,
    "Cmd": [
      "sh",
      "-c",
      "trap 'exit 0' TERM; sleep 3600 & wait"
    ],
    "Image": "sluice-test/busybox:latest",
    "Volumes": null,
    "WorkingDir": "",
    "Entrypoint": null,
    "OnBuild": null,
    "Labels": {
      "com.example.tier": "front end",
      "sluice.role": "web"
    }
  },
  "NetworkSettings": {
    "Bridge": "",
    "SandboxID": "7837149d311d07cc37ba43997784e50fed44aa665f6d8681a91ead456868bdbe",
    "HairpinMode": false,
    "LinkLocalIPv6Address": "",
    "LinkLocalIPv6PrefixLen": 0,
    "Ports": {},
    "SandboxKey": "/tmp/sle2e-17167-0/exec/netns/7837149d311d",
    "SecondaryIPAddresses": null,
    "SecondaryIPv6Addresses": null,
    "EndpointID": "",
    "Gateway": "",
    "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0,
    "IPAddress": "",
    "IPPrefixLen": 0,
    "IPv6Gateway": "",
    "MacAddress": "",
    "Networks": {
      "capnet": {
        "IPAMConfig": null,
        "Links": null,
        "Aliases": [
          "c9b4a536feca",
          "web-1"
        ],
        "NetworkID": "9863bf3fa0a5bb977d2ce109d2506e4600e6b182d13acd45952d7f3cb87f40d8",
        "EndpointID": "28fc5ce6a8530ceeeac3f2105163e89a0820f68c3c209a942be8b13b0a6ad493",
        "Gateway": "10.39.7.1",
        "IPAddress": "10.39.7.2",
        "IPPrefixLen": 24,
        "IPv6Gateway": "",
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "MacAddress": "02:42:0a:27:07:02",
        "DriverOpts": null
      }
    }
  }
}"##;
    /// `docker create --name created-1 --network capnet --label x=y …` (never started).
    const INSPECT_CREATED: &str = r##"{"Id":"316d92734c51d46b2eca821056aec43026b17adadd4ab17105ab4bbbaf7719a0","Created":"2026-11-28T04:35:11.049715042Z","Path":"sleep","Args":["1"],"State":{"Status":"created","Running":false,"Paused":false,"Restarting":false,"OOMKilled":false,"Dead":false,"Pid":0,"ExitCode":0,"Error":"","StartedAt":"0001-01-01T00:00:00Z","FinishedAt":"0001-01-01T00:00:00Z"},"Image":"sha256:6cc0640f8e87bccee01323567188406a99abcdac1fa1ee685d623370638e761f","ResolvConfPath":"","HostnamePath":"","HostsPath":"","LogPath":"","Name":"/created-1","RestartCount":0,"Driver":"overlay2","Platform":"linux","MountLabel":"","ProcessLabel":"","AppArmorProfile":"","ExecIDs":null,"HostConfig":{"Binds":null,"ContainerIDFile":"","LogConfig":{"Type":"json-file","Config":{}},"NetworkMode":"capnet","PortBindings":{},"RestartPolicy":{"Name":"no","MaximumRetryCount":0},"AutoRemove":false,"VolumeDriver":"","VolumesFrom":null,"CapAdd":null,"CapDrop":null,"CgroupnsMode":"host","Dns":[],"DnsOptions":[],"DnsSearch":[],"ExtraHosts":null,"GroupAdd":null,"IpcMode":"private","Cgroup":"","Links":null,"OomScoreAdj":0,"PidMode":"","Privileged":false,"PublishAllPorts":false,"ReadonlyRootfs":false,"SecurityOpt":null,"UTSMode":"","UsernsMode":"","ShmSize":67108864,"Runtime":"runc","ConsoleSize":[0,0],"Isolation":"","CpuShares":0,"Memory":0,"NanoCpus":0,"CgroupParent":"","BlkioWeight":0,"BlkioWeightDevice":[],"BlkioDeviceReadBps":[],"BlkioDeviceWriteBps":[],"BlkioDeviceReadIOps":[],"BlkioDeviceWriteIOps":[],"CpuPeriod":0,"CpuQuota":0,"CpuRealtimePeriod":0,"CpuRealtimeRuntime":0,"CpusetCpus":"","CpusetMems":"","Devices":[],"DeviceCgroupRules":null,"DeviceRequests":null,"KernelMemory":0,"KernelMemoryTCP":0,"MemoryReservation":0,"MemorySwap":0,"MemorySwappiness":null,"OomKillDisable":false,"PidsLimit":null,"Ulimits":[],"CpuCount":0,"CpuPercent":0,"IOMaximumIOps":0,"IOMaximumBandwidth":0,"MaskedPaths":["/proc/asound","/proc/acpi","/proc/kcore","/proc/keys","/proc/latency_stats","/proc/timer_list","/proc/timer_stats","/proc/sched_debug","/proc/scsi","/sys/firmware"],"ReadonlyPaths":["/proc/bus","/proc/fs","/proc/irq","/proc/sys","/proc/sysrq-trigger"]},"GraphDriver":{"Data":{"LowerDir":"/tmp/sle2e-17167-0/data/overlay2/b2f993cbc3fc570dc9f3f56805f5d391af53b05afa0bdafe1c2ad2f05740253c-init/diff:/tmp/sle2e-17167-0/data/overlay2/6569569e197e0aba0214f1205ff7b9d99fdb9e4c9a3f6e77df0d580cba793dc3/diff","MergedDir":"/tmp/sle2e-17167-0/data/overlay2/b2f993cbc3fc570dc9f3f56805f5d391af53b05afa0bdafe1c2ad2f05740253c/merged","UpperDir":"/tmp/sle2e-17167-0/data/overlay2/b2f993cbc3fc570dc9f3f56805f5d391af53b05afa0bdafe1c2ad2f05740253c/diff","WorkDir":"/tmp/sle2e-17167-0/data/overlay2/b2f993cbc3fc570dc9f3f56805f5d391af53b05afa0bdafe1c2ad2f05740253c/work"},"Name":"overlay2"},"Mounts":[],"Config":{"Hostname":"316d92734c51","Domainname":"","User":"","AttachStdin":false,"AttachStdout":true,"AttachStderr":true,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":["sleep","1"],"Image":"sluice-test/busybox:latest","Volumes":null,"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{"x":"y"}},"NetworkSettings":{"Bridge":"","SandboxID":"","HairpinMode":false,"LinkLocalIPv6Address":"","LinkLocalIPv6PrefixLen":0,"Ports":{},"SandboxKey":"","SecondaryIPAddresses":null,"SecondaryIPv6Addresses":null,"EndpointID":"","Gateway":"","GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,"IPAddress":"","IPPrefixLen":0,"IPv6Gateway":"","MacAddress":"","Networks":{"capnet":{"IPAMConfig":null,"Links":null,"Aliases":null,"NetworkID":"","EndpointID":"","Gateway":"","IPAddress":"","IPPrefixLen":0,"IPv6Gateway":"","GlobalIPv6Address":"","GlobalIPv6PrefixLen":0,"MacAddress":"","DriverOpts":null}}}}"##;
    /// `GET /v1.41/events?filters={"type":["container","network"]}` during: run web-1, rename
    /// it to web-renamed, connect and disconnect it to capnet2 (disconnect arrives twice),
    /// stop, rm.
    const EVENTS_WEB_1: &str = r##"{"status":"create","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"create","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-1","sluice.role":"web"}},"scope":"local","time":1795840502,"timeNano":1795840502092077375}
{"Type":"network","Action":"connect","Actor":{"ID":"9863bf3fa0a5bb977d2ce109d2506e4600e6b182d13acd45952d7f3cb87f40d8","Attributes":{"container":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","name":"capnet","type":"slt17167n0"}},"scope":"local","time":1795840502,"timeNano":1795840502121921089}
{"status":"start","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"start","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-1","sluice.role":"web"}},"scope":"local","time":1795840502,"timeNano":1795840502487841789}
{"status":"rename","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"rename","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-renamed","oldName":"/web-1","sluice.role":"web"}},"scope":"local","time":1795840502,"timeNano":1795840502724125728}
{"Type":"network","Action":"create","Actor":{"ID":"f91e98c323f70ad8e29a9e570e3f19664f4901f0cae2a8f2f99d9eb1f16463be","Attributes":{"name":"capnet2","type":"slt17167n0"}},"scope":"local","time":1795840502,"timeNano":1795840502841755795}
{"Type":"network","Action":"connect","Actor":{"ID":"f91e98c323f70ad8e29a9e570e3f19664f4901f0cae2a8f2f99d9eb1f16463be","Attributes":{"container":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","name":"capnet2","type":"slt17167n0"}},"scope":"local","time":1795840502,"timeNano":1795840502909954623}
{"Type":"network","Action":"disconnect","Actor":{"ID":"f91e98c323f70ad8e29a9e570e3f19664f4901f0cae2a8f2f99d9eb1f16463be","Attributes":{"container":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","name":"capnet2","type":"slt17167n0"}},"scope":"local","time":1795840503,"timeNano":1795840503055846086}
{"Type":"network","Action":"disconnect","Actor":{"ID":"f91e98c323f70ad8e29a9e570e3f19664f4901f0cae2a8f2f99d9eb1f16463be","Attributes":{"container":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","name":"capnet2","type":"slt17167n0"}},"scope":"local","time":1795840503,"timeNano":1795840503066246449}
{"status":"kill","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"kill","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-renamed","signal":"15","sluice.role":"web"}},"scope":"local","time":1795840503,"timeNano":1795840503118530001}
{"status":"die","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"die","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","exitCode":"0","image":"sluice-test/busybox:latest","name":"web-renamed","sluice.role":"web"}},"scope":"local","time":1795840503,"timeNano":1795840503172717144}
{"Type":"network","Action":"disconnect","Actor":{"ID":"9863bf3fa0a5bb977d2ce109d2506e4600e6b182d13acd45952d7f3cb87f40d8","Attributes":{"container":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","name":"capnet","type":"slt17167n0"}},"scope":"local","time":1795840503,"timeNano":1795840503259848252}
{"status":"stop","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"stop","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-renamed","sluice.role":"web"}},"scope":"local","time":1795840503,"timeNano":1795840503280043202}
{"status":"destroy","id":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","from":"sluice-test/busybox:latest","Type":"container","Action":"destroy","Actor":{"ID":"c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92","Attributes":{"com.example.tier":"front end","image":"sluice-test/busybox:latest","name":"web-renamed","sluice.role":"web"}},"scope":"local","time":1795840503,"timeNano":1795840503343148463}"##;

    const WEB1_ID: &str = "c9b4a536feca12f3a10a0436e0886da923f10526c6ca90b0da6d2d0e45241b92";
    const WEB1_NET: &str = "9863bf3fa0a5bb977d2ce109d2506e4600e6b182d13acd45952d7f3cb87f40d8";
    const WEB1_EP: &str = "28fc5ce6a8530ceeeac3f2105163e89a0820f68c3c209a942be8b13b0a6ad493";
    const WEB1_SANDBOX: &str = "/tmp/sle2e-17167-0/exec/netns/7837149d311d";

    // ---- parsing ---------------------------------------------------------------------------

    #[test]
    fn inspect_of_a_running_container_parses() {
        let info = ContainerInfo::from_inspect_json(INSPECT_WEB_1.as_bytes()).unwrap();
        assert_eq!(info.id, WEB1_ID);
        assert_eq!(info.name, "web-1", "the leading / is stripped");
        assert_eq!(
            info.labels,
            BTreeMap::from([
                ("com.example.tier".to_owned(), "front end".to_owned()),
                ("sluice.role".to_owned(), "web".to_owned()),
            ])
        );
        assert_eq!(info.sandbox_key.as_deref(), Some(WEB1_SANDBOX));
        assert_eq!(
            info.endpoints,
            BTreeMap::from([(WEB1_NET.to_owned(), WEB1_EP.to_owned())])
        );
        assert!(info.running);
        assert!(info.has_endpoint(WEB1_EP));
        let identity = info.identity("ep-x");
        assert_eq!(identity.endpoint_id, "ep-x");
        assert_eq!(identity.container_id, WEB1_ID);
        assert_eq!(identity.name, "web-1");
        assert_eq!(identity.labels, info.labels);
    }

    #[test]
    fn inspect_of_a_created_container_has_no_sandbox_and_no_endpoints() {
        let info = ContainerInfo::from_inspect_json(INSPECT_CREATED.as_bytes()).unwrap();
        assert_eq!(info.name, "created-1");
        assert!(!info.running);
        assert_eq!(info.sandbox_key, None, "an empty SandboxKey is none");
        assert!(
            info.endpoints.is_empty(),
            "networks without an EndpointID are not endpoints: {:?}",
            info.endpoints
        );
        assert_eq!(info.labels.get("x").map(String::as_str), Some("y"));
    }

    #[test]
    fn inspect_with_null_labels_and_networks_parses() {
        let body = r#"{"Id":"abc","Name":"/n","State":{"Running":true},"Config":{"Labels":null},
            "NetworkSettings":{"SandboxKey":"/s","Networks":null}}"#;
        let info = ContainerInfo::from_inspect_json(body.as_bytes()).unwrap();
        assert!(info.labels.is_empty());
        assert!(info.endpoints.is_empty());
        assert_eq!(info.sandbox_key.as_deref(), Some("/s"));
    }

    #[test]
    fn inspect_rejects_what_is_not_a_container() {
        for body in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"Id":"abc","Name":"/n","State":{"Running":true},"Config":{}}"#,
            r#"{"Id":"abc","Name":"/n","State":{"Running":"yes"},"Config":{},"NetworkSettings":{}}"#,
            r#"{"Id":"abc","Name":"/n","State":{"Running":true},"Config":{"Labels":{"a":1}},"NetworkSettings":{}}"#,
        ] {
            let err = ContainerInfo::from_inspect_json(body.as_bytes()).unwrap_err();
            assert!(
                matches!(err, EngineError::BadJson { .. }),
                "{body:?}: {err}"
            );
        }
        let empty_id =
            r#"{"Id":"","Name":"/n","State":{"Running":true},"Config":{},"NetworkSettings":{}}"#;
        assert!(matches!(
            ContainerInfo::from_inspect_json(empty_id.as_bytes()),
            Err(EngineError::Unexpected { .. })
        ));
    }

    #[test]
    fn events_of_a_container_lifetime_parse() {
        let events: Vec<EngineEvent> = EVENTS_WEB_1
            .lines()
            .map(|l| EngineEvent::parse(l.as_bytes()).unwrap())
            .collect();
        let seen: Vec<(EventType, &str)> = events
            .iter()
            .map(|e| (e.kind.clone(), e.action.as_str()))
            .collect();
        use EventType::{Container as C, Network as N};
        assert_eq!(
            seen,
            [
                (C, "create"),
                (N, "connect"),
                (C, "start"),
                (C, "rename"),
                (N, "create"),
                (N, "connect"),
                (N, "disconnect"),
                (N, "disconnect"),
                (C, "kill"),
                (C, "die"),
                (N, "disconnect"),
                (C, "stop"),
                (C, "destroy"),
            ]
        );
        // Container events carry the labels and the name; network events the container.
        let start = &events[2];
        assert_eq!(start.container_id(), Some(WEB1_ID));
        assert_eq!(start.attributes["name"], "web-1");
        assert_eq!(start.attributes["sluice.role"], "web");
        assert_eq!(start.time_nano, 1_795_840_502_487_841_789);
        let connect = &events[1];
        assert_eq!(connect.actor_id, WEB1_NET);
        assert_eq!(connect.container_id(), Some(WEB1_ID));
        let rename = &events[3];
        assert_eq!(rename.attributes["name"], "web-renamed");
        assert_eq!(rename.attributes["oldName"], "/web-1");
        // A network create names no container.
        assert_eq!(events[4].container_id(), None);
        // The connect event comes right after Join, well before start.
        assert!(start.time_nano - connect.time_nano > 0);
    }

    #[test]
    fn bad_event_lines_are_errors_of_that_line_only() {
        for line in [
            "garbage",
            "{}",
            r#"{"Type":"container","Action":"start"}"#,
            r#"{"Type":"container","Action":"start","Actor":{"Attributes":{}}}"#,
            r#"{"Type":"container","Action":"start","Actor":{"ID":"x","Attributes":{"exitCode":0}}}"#,
        ] {
            let err = EngineEvent::parse(line.as_bytes()).unwrap_err();
            assert!(err.is_bad_event(), "{line:?}: {err}");
            assert!(!err.is_unreachable());
        }
        let empty_actor = r#"{"Type":"container","Action":"start","Actor":{"ID":""}}"#;
        let err = EngineEvent::parse(empty_actor.as_bytes()).unwrap_err();
        assert!(matches!(err, EngineError::Unexpected { .. }) && err.is_bad_event());
        // Unknown types parse, and name no container.
        let volume = r#"{"Type":"volume","Action":"mount","Actor":{"ID":"v"}}"#;
        let e = EngineEvent::parse(volume.as_bytes()).unwrap();
        assert_eq!(e.kind, EventType::Other("volume".to_owned()));
        assert_eq!(e.container_id(), None);
    }

    #[test]
    fn docker_host_forms() {
        let c = EngineClient::from_docker_host("unix:///var/run/docker.sock").unwrap();
        assert_eq!(c.socket(), Path::new("/var/run/docker.sock"));
        let c = EngineClient::from_docker_host("/tmp/d.sock").unwrap();
        assert_eq!(c.socket(), Path::new("/tmp/d.sock"));
        for bad in [
            "tcp://127.0.0.1:2375",
            "ssh://host",
            "unix://relative",
            "docker.sock",
            "",
        ] {
            assert!(
                matches!(
                    EngineClient::from_docker_host(bad),
                    Err(EngineError::UnsupportedHost(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            EngineClient::new(DEFAULT_DOCKER_SOCKET).api_version(),
            "1.41"
        );
    }

    #[test]
    fn api_version_negotiation() {
        assert_eq!(negotiate("1.41", Some("1.12")), "1.41");
        assert_eq!(negotiate("1.47", Some("1.24")), "1.41");
        assert_eq!(
            negotiate("1.40", Some("1.12")),
            "1.40",
            "older server: its maximum"
        );
        assert_eq!(
            negotiate("1.52", Some("1.44")),
            "1.44",
            "1.41 dropped: its minimum"
        );
        assert_eq!(negotiate("garbage", None), "1.41");
        assert_eq!(negotiate("1.50", None), "1.41");
    }

    #[test]
    fn query_escape_encodes_json_filters() {
        assert_eq!(
            query_escape(r#"{"type":["container"]}"#),
            "%7B%22type%22%3A%5B%22container%22%5D%7D"
        );
        assert_eq!(query_escape("abc-1.2_3~"), "abc-1.2_3~");
        assert_eq!(query_escape("a/b"), "a%2Fb");
    }

    #[test]
    fn connect_errors_say_what_is_wrong() {
        let path = Path::new("/run/x.sock");
        let e = connect_error(path, std::io::ErrorKind::NotFound.into());
        assert!(matches!(e, EngineError::NoSocket { .. }));
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = connect_error(path, std::io::ErrorKind::PermissionDenied.into());
        assert!(matches!(e, EngineError::PermissionDenied { .. }));
        assert!(e.to_string().contains("permission denied"), "{e}");
        assert!(e.to_string().contains("/run/x.sock"), "{e}");
        let e = connect_error(path, std::io::ErrorKind::ConnectionRefused.into());
        assert!(matches!(e, EngineError::Connect { .. }) && e.is_unreachable());
    }

    // ---- the HTTP client against a fake Engine API on a Unix socket ------------------------

    /// Serves canned answers; records the request heads. Events: a start line split over two
    /// chunks, a connect line, a garbage line, a die line, then the end of the stream.
    async fn fake_engine(dir: &Path) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
        let path = dir.join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&heads);
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    seen.lock().unwrap().push(head);
                    let reply = |status: &str, body: &str| {
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let gone = "/v1.41/containers/gone/json";
                    let web1 = format!("/v1.41/containers/{WEB1_ID}/json");
                    let out = match path.as_str() {
                        "/_ping" => reply("200 OK", "OK"),
                        "/version" => {
                            reply("200 OK", r#"{"ApiVersion":"1.41","MinAPIVersion":"1.12"}"#)
                        }
                        "/v1.41/containers/json" => reply(
                            "200 OK",
                            &format!(r#"[{{"Id":"{WEB1_ID}"}},{{"Id":"gone"}}]"#),
                        ),
                        p if p == web1 => reply("200 OK", INSPECT_WEB_1),
                        p if p == gone => {
                            reply("404 Not Found", r#"{"message":"No such container: gone"}"#)
                        }
                        p if p.starts_with("/v1.41/events?filters=") => {
                            let lines: Vec<&str> = EVENTS_WEB_1.lines().collect();
                            let (start, connect, die) = (lines[2], lines[1], lines[9]);
                            let _ = stream
                                .write_all(
                                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                      Transfer-Encoding: chunked\r\n\r\n",
                                )
                                .await;
                            let (a, b) = start.split_at(40);
                            let chunks = [
                                a.to_owned(),
                                format!("{b}\n{connect}\n"),
                                "garbage\n".to_owned(),
                                format!("{die}\n"),
                            ];
                            for c in chunks {
                                let _ = stream
                                    .write_all(format!("{:x}\r\n{c}\r\n", c.len()).as_bytes())
                                    .await;
                                let _ = stream.flush().await;
                                tokio::time::sleep(Duration::from_millis(30)).await;
                            }
                            let _ = stream.write_all(b"0\r\n\r\n").await;
                            return;
                        }
                        _ => reply("404 Not Found", r#"{"message":"page not found"}"#),
                    };
                    let _ = stream.write_all(out.as_bytes()).await;
                });
            }
        });
        (path, heads)
    }

    #[tokio::test]
    async fn client_speaks_http_over_the_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, heads) = fake_engine(dir.path()).await;
        let client = EngineClient::new(&socket).with_timeout(Duration::from_secs(5));
        client.ping().await.unwrap();
        assert_eq!(client.api_version(), "1.41");

        let info = client.container(WEB1_ID).await.unwrap();
        assert_eq!(info.name, "web-1");
        assert!(matches!(
            client.container("gone").await,
            Err(EngineError::NoSuchContainer { id }) if id == "gone"
        ));
        let all = client.list_running().await.unwrap();
        assert_eq!(
            all.len(),
            1,
            "a container gone since the listing is left out"
        );
        assert_eq!(all[0].id, WEB1_ID);

        let mut events = client.events().await.unwrap();
        let e = events.next().await.unwrap().unwrap();
        assert_eq!((e.kind, e.action.as_str()), (EventType::Container, "start"));
        let e = events.next().await.unwrap().unwrap();
        assert_eq!((e.kind, e.action.as_str()), (EventType::Network, "connect"));
        let bad = events.next().await.unwrap().unwrap_err();
        assert!(bad.is_bad_event(), "{bad}");
        let e = events.next().await.unwrap().unwrap();
        assert_eq!(e.action, "die", "the stream goes on after a bad line");
        assert!(events.next().await.is_none(), "the stream ended");

        let heads = heads.lock().unwrap().clone();
        assert!(
            heads
                .iter()
                .all(|h| h.to_ascii_lowercase().contains("\r\nhost: docker\r\n")),
            "every request has a Host header: {heads:?}"
        );
        let events_head = heads.iter().find(|h| h.contains("/events?")).unwrap();
        assert!(
            events_head.contains(&query_escape(r#"{"type":["container","network"],"event":["start","rename","die","destroy","connect","disconnect"]}"#)),
            "{events_head}"
        );
    }

    #[tokio::test]
    async fn client_errors_on_a_missing_socket_and_a_refusing_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = EngineClient::new(dir.path().join("none.sock"));
        assert!(matches!(
            missing.ping().await,
            Err(EngineError::NoSocket { .. })
        ));
        let refused_path = dir.path().join("refused.sock");
        drop(std::os::unix::net::UnixListener::bind(&refused_path).unwrap());
        let refused = EngineClient::new(&refused_path);
        assert!(matches!(
            refused.ping().await,
            Err(EngineError::Connect { .. })
        ));
    }

    // ---- the resolver against a fake source ------------------------------------------------

    #[derive(Debug, Default)]
    struct Fake {
        state: Mutex<FakeState>,
        connects: AtomicUsize,
        lists: AtomicUsize,
    }

    #[derive(Debug, Default)]
    struct FakeState {
        containers: HashMap<String, ContainerInfo>,
        events: Option<mpsc::Sender<Result<EngineEvent, EngineError>>>,
        down: Option<String>,
    }

    impl Fake {
        fn add(&self, info: ContainerInfo) {
            self.state
                .lock()
                .unwrap()
                .containers
                .insert(info.id.clone(), info);
        }
        fn remove(&self, id: &str) {
            self.state.lock().unwrap().containers.remove(id);
        }
        fn set_down(&self, reason: Option<&str>) {
            self.state.lock().unwrap().down = reason.map(str::to_owned);
        }
        /// Ends the current event stream (dockerd stopped).
        fn end_stream(&self) {
            self.state.lock().unwrap().events = None;
        }
        async fn emit(&self, event: Result<EngineEvent, EngineError>) {
            let tx = self
                .state
                .lock()
                .unwrap()
                .events
                .clone()
                .expect("no event stream");
            tx.send(event).await.unwrap();
        }
        fn refused(reason: &str) -> EngineError {
            EngineError::Connect {
                path: PathBuf::from("/fake.sock"),
                source: std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    reason.to_owned(),
                ),
            }
        }
    }

    impl EngineSource for Fake {
        fn ping(&self) -> impl Future<Output = Result<(), EngineError>> + Send {
            let r = match &self.state.lock().unwrap().down {
                Some(reason) => Err(Self::refused(reason)),
                None => Ok(()),
            };
            async move { r }
        }
        fn container(
            &self,
            id: &str,
        ) -> impl Future<Output = Result<ContainerInfo, EngineError>> + Send {
            let r = self
                .state
                .lock()
                .unwrap()
                .containers
                .get(id)
                .cloned()
                .ok_or_else(|| EngineError::NoSuchContainer { id: id.to_owned() });
            async move { r }
        }
        fn list_running(
            &self,
        ) -> impl Future<Output = Result<Vec<ContainerInfo>, EngineError>> + Send {
            self.lists.fetch_add(1, Ordering::SeqCst);
            let state = self.state.lock().unwrap();
            let r = match &state.down {
                Some(reason) => Err(Self::refused(reason)),
                None => Ok(state
                    .containers
                    .values()
                    .filter(|c| c.running)
                    .cloned()
                    .collect()),
            };
            async move { r }
        }
        fn events(&self) -> impl Future<Output = Result<EventStream, EngineError>> + Send {
            let mut state = self.state.lock().unwrap();
            let r = match &state.down {
                Some(reason) => Err(Self::refused(reason)),
                None => {
                    self.connects.fetch_add(1, Ordering::SeqCst);
                    let (tx, rx) = mpsc::channel(64);
                    state.events = Some(tx);
                    Ok(EventStream::from_channel(rx))
                }
            };
            async move { r }
        }
    }

    fn container(id: &str, name: &str, sandbox: &str, endpoints: &[(&str, &str)]) -> ContainerInfo {
        ContainerInfo {
            id: id.to_owned(),
            name: name.to_owned(),
            labels: BTreeMap::from([("sluice.role".to_owned(), "web".to_owned())]),
            sandbox_key: Some(sandbox.to_owned()),
            endpoints: endpoints
                .iter()
                .map(|(n, e)| ((*n).to_owned(), (*e).to_owned()))
                .collect(),
            running: true,
        }
    }

    fn event(
        kind: EventType,
        action: &str,
        actor: &str,
        attrs: &[(&str, &str)],
    ) -> Result<EngineEvent, EngineError> {
        Ok(EngineEvent {
            kind,
            action: action.to_owned(),
            actor_id: actor.to_owned(),
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            time_nano: 0,
        })
    }

    fn connect_event(network: &str, container: &str) -> Result<EngineEvent, EngineError> {
        event(
            EventType::Network,
            "connect",
            network,
            &[("container", container)],
        )
    }

    fn config() -> ResolverConfig {
        ResolverConfig {
            request_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(10),
            reconnect_max: Duration::from_millis(50),
            // Long: the tests of the event path must not be rescued by a re-listing.
            relist_interval: Duration::from_secs(600),
            start_wait: Duration::from_secs(2),
            max_pending: 16,
            output_capacity: 16,
        }
    }

    async fn start(
        fake: &Arc<Fake>,
        config: ResolverConfig,
    ) -> (IdentityResolver, mpsc::Receiver<ContainerIdentity>) {
        IdentityResolver::start_with(Arc::clone(fake), config).await
    }

    async fn recv(rx: &mut mpsc::Receiver<ContainerIdentity>) -> ContainerIdentity {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("no identity within 2 s")
            .expect("output channel closed")
    }

    /// Polls the stats until `f` holds (2 s at most).
    async fn until(
        r: &IdentityResolver,
        what: &str,
        f: impl Fn(&ResolverStats) -> bool,
    ) -> ResolverStats {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let stats = r.stats().await.unwrap();
            if f(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "{what}: stats {stats:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn assert_nothing_sent(rx: &mut mpsc::Receiver<ContainerIdentity>) {
        match rx.try_recv() {
            Err(mpsc::error::TryRecvError::Empty) => {}
            other => panic!("expected no identity, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_request_before_the_event_is_answered_when_the_container_appears() {
        let fake = Arc::new(Fake::default());
        let (r, mut rx) = start(&fake, config()).await;
        assert!(r.available(), "{:?}", r.availability());
        assert_eq!(r.unavailable_reason(), None);

        // Join returned; dockerd has not even sent `connect` yet.
        r.request("ep1", "/netns/sb1");
        until(&r, "request pending", |s| s.pending == 1).await;
        assert_nothing_sent(&mut rx);

        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        fake.emit(connect_event("n1", "c1")).await;
        let identity = recv(&mut rx).await;
        assert_eq!(
            identity,
            ContainerIdentity {
                endpoint_id: "ep1".to_owned(),
                container_id: "c1".to_owned(),
                name: "web-1".to_owned(),
                labels: BTreeMap::from([("sluice.role".to_owned(), "web".to_owned())]),
            }
        );
        let stats = until(&r, "resolved", |s| s.resolved == 1).await;
        assert_eq!((stats.pending, stats.watched, stats.containers), (0, 1, 1));
        assert_eq!(
            fake.lists.load(Ordering::SeqCst),
            1,
            "answered by the event, not a listing"
        );
    }

    #[tokio::test]
    async fn a_request_matches_by_sandbox_when_the_endpoint_is_not_listed_yet() {
        let fake = Arc::new(Fake::default());
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep-new", "/netns/sb1");
        until(&r, "request pending", |s| s.pending == 1).await;
        // The inspection shows the sandbox but not (yet) this endpoint.
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep-old")]));
        fake.emit(event(EventType::Container, "start", "c1", &[]))
            .await;
        let identity = recv(&mut rx).await;
        assert_eq!(
            (identity.endpoint_id.as_str(), identity.name.as_str()),
            ("ep-new", "web-1")
        );
    }

    #[tokio::test]
    async fn an_event_before_the_request_answers_it_from_the_cache() {
        let fake = Arc::new(Fake::default());
        let (r, mut rx) = start(&fake, config()).await;
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        fake.emit(event(EventType::Container, "start", "c1", &[]))
            .await;
        until(&r, "container cached", |s| s.containers == 1).await;

        // By endpoint ID alone …
        r.request("ep1", "");
        assert_eq!(recv(&mut rx).await.name, "web-1");
        // … and by sandbox, for a second network joined later.
        r.request("ep2", "/netns/sb1");
        let identity = recv(&mut rx).await;
        assert_eq!(
            (
                identity.endpoint_id.as_str(),
                identity.container_id.as_str()
            ),
            ("ep2", "c1")
        );
        assert_eq!(
            until(&r, "two resolved", |s| s.resolved == 2).await.pending,
            0
        );
    }

    #[tokio::test]
    async fn containers_running_at_start_are_known_from_the_listing() {
        let fake = Arc::new(Fake::default());
        fake.add(container("c1", "db", "/netns/sb1", &[("n1", "ep1")]));
        let mut stopped = container("c2", "stopped", "/netns/sb2", &[]);
        stopped.running = false;
        fake.add(stopped);
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        assert_eq!(recv(&mut rx).await.name, "db");
        assert_eq!(r.stats().await.unwrap().containers, 1);
    }

    #[tokio::test]
    async fn a_request_for_a_sandbox_that_never_appears_times_out() {
        let fake = Arc::new(Fake::default());
        let cfg = ResolverConfig {
            request_timeout: Duration::from_millis(200),
            ..config()
        };
        let (r, mut rx) = start(&fake, cfg).await;
        let asked = Instant::now();
        r.request("ep-ghost", "/netns/ghost");
        let stats = until(&r, "timed out", |s| s.timed_out == 1).await;
        assert!(asked.elapsed() >= Duration::from_millis(200));
        assert_eq!((stats.pending, stats.resolved), (0, 0));
        assert_nothing_sent(&mut rx);
        // Appearing later does not answer a request that was given up.
        fake.add(container(
            "c1",
            "late",
            "/netns/ghost",
            &[("n1", "ep-ghost")],
        ));
        fake.emit(connect_event("n1", "c1")).await;
        until(&r, "container cached", |s| s.containers == 1).await;
        assert_nothing_sent(&mut rx);
        // The resolver still works.
        r.request("ep-ghost", "/netns/ghost");
        assert_eq!(recv(&mut rx).await.name, "late");
    }

    #[tokio::test]
    async fn a_rename_sends_the_identity_again() {
        let fake = Arc::new(Fake::default());
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        assert_eq!(recv(&mut rx).await.name, "web-1");

        fake.add(container(
            "c1",
            "web-renamed",
            "/netns/sb1",
            &[("n1", "ep1")],
        ));
        fake.emit(event(
            EventType::Container,
            "rename",
            "c1",
            &[("name", "web-renamed")],
        ))
        .await;
        let identity = recv(&mut rx).await;
        assert_eq!(
            (identity.endpoint_id.as_str(), identity.name.as_str()),
            ("ep1", "web-renamed")
        );
        assert_eq!(identity.labels["sluice.role"], "web");
        // An event that changes nothing sends nothing.
        fake.emit(connect_event("n1", "c1")).await;
        let stats = until(&r, "updated once", |s| s.updated == 1).await;
        assert_eq!(stats.resolved, 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_nothing_sent(&mut rx);
    }

    #[tokio::test]
    async fn die_and_destroy_drop_the_container() {
        let fake = Arc::new(Fake::default());
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        recv(&mut rx).await;
        fake.remove("c1");
        fake.emit(event(EventType::Container, "die", "c1", &[]))
            .await;
        let stats = until(&r, "dropped", |s| s.containers == 0).await;
        assert_eq!(stats.watched, 0);
        // Its sandbox is unknown again: a request waits.
        r.request("ep1", "/netns/sb1");
        until(&r, "pending", |s| s.pending == 1).await;
        fake.emit(event(EventType::Container, "destroy", "c1", &[]))
            .await;
        assert_eq!(r.stats().await.unwrap().containers, 0);
        r.forget("ep1");
        until(&r, "forgotten", |s| s.pending == 0).await;
    }

    #[tokio::test]
    async fn a_disconnect_stops_following_the_endpoint_it_removed() {
        let fake = Arc::new(Fake::default());
        fake.add(container(
            "c1",
            "web-1",
            "/netns/sb1",
            &[("n1", "ep1"), ("n2", "ep2")],
        ));
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        r.request("ep2", "/netns/sb1");
        recv(&mut rx).await;
        recv(&mut rx).await;
        assert_eq!(r.stats().await.unwrap().watched, 2);
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        fake.emit(event(
            EventType::Network,
            "disconnect",
            "n2",
            &[("container", "c1")],
        ))
        .await;
        until(&r, "ep2 dropped", |s| s.watched == 1).await;
        // A rename now concerns ep1 only.
        fake.add(container("c1", "web-2", "/netns/sb1", &[("n1", "ep1")]));
        fake.emit(event(EventType::Container, "rename", "c1", &[]))
            .await;
        assert_eq!(recv(&mut rx).await.endpoint_id, "ep1");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_nothing_sent(&mut rx);
    }

    #[tokio::test]
    async fn bad_event_lines_do_not_stop_the_resolver() {
        let fake = Arc::new(Fake::default());
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        fake.emit(EngineEvent::parse(b"garbage")).await;
        fake.emit(event(
            EventType::Other("volume".to_owned()),
            "mount",
            "v1",
            &[],
        ))
        .await;
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        fake.emit(connect_event("n1", "c1")).await;
        assert_eq!(recv(&mut rx).await.name, "web-1");
        assert_eq!(
            fake.connects.load(Ordering::SeqCst),
            1,
            "no reconnection for a bad line"
        );
    }

    #[tokio::test]
    async fn it_reconnects_when_the_stream_ends_and_relists() {
        let fake = Arc::new(Fake::default());
        let (r, mut rx) = start(&fake, config()).await;
        assert_eq!(r.stats().await.unwrap().connections, 1);

        // dockerd stops: the stream ends, connecting fails for a while.
        fake.set_down(Some("dockerd is restarting"));
        fake.end_stream();
        let deadline = Instant::now() + Duration::from_secs(2);
        while r.available() {
            assert!(
                Instant::now() < deadline,
                "still available after the stream ended"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A Join meanwhile (dockerd restoring a container): the request waits.
        r.request("ep1", "/netns/sb1");
        fake.add(container("c1", "restored", "/netns/sb1", &[("n1", "ep1")]));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_nothing_sent(&mut rx);
        assert!(
            r.unavailable_reason()
                .unwrap()
                .contains("dockerd is restarting"),
            "{:?}",
            r.unavailable_reason()
        );

        // dockerd is back: reconnect, re-list, answer — without any event.
        fake.set_down(None);
        assert_eq!(recv(&mut rx).await.name, "restored");
        assert!(r.wait_available(Duration::from_secs(1)).await);
        let stats = r.stats().await.unwrap();
        assert_eq!(stats.connections, 2);
        assert!(stats.available);
        // Events flow on the new stream.
        fake.add(container("c2", "new", "/netns/sb2", &[("n1", "ep2")]));
        fake.emit(connect_event("n1", "c2")).await;
        r.request("ep2", "/netns/sb2");
        assert_eq!(recv(&mut rx).await.name, "new");
    }

    #[tokio::test]
    async fn a_container_gone_during_the_outage_is_dropped_at_reconnection() {
        let fake = Arc::new(Fake::default());
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        let (r, mut rx) = start(&fake, config()).await;
        r.request("ep1", "/netns/sb1");
        recv(&mut rx).await;
        fake.remove("c1");
        fake.end_stream();
        until(&r, "reconnected", |s| s.connections == 2).await;
        let stats = r.stats().await.unwrap();
        assert_eq!((stats.containers, stats.watched), (0, 0));
    }

    #[tokio::test]
    async fn a_missed_event_is_made_up_for_by_listing_again() {
        let fake = Arc::new(Fake::default());
        let cfg = ResolverConfig {
            relist_interval: Duration::from_millis(100),
            ..config()
        };
        let (r, mut rx) = start(&fake, cfg).await;
        r.request("ep1", "/netns/sb1");
        fake.add(container("c1", "quiet", "/netns/sb1", &[("n1", "ep1")]));
        assert_eq!(recv(&mut rx).await.name, "quiet");
        assert!(fake.lists.load(Ordering::SeqCst) >= 2);
    }

    #[tokio::test]
    async fn without_an_engine_api_it_is_unavailable_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let client = EngineClient::new(dir.path().join("docker.sock"));
        let (r, _rx) = IdentityResolver::start(client, config()).await;
        assert!(!r.available());
        let reason = r.unavailable_reason().unwrap();
        assert!(
            reason.contains("does not exist") && reason.contains("docker.sock"),
            "{reason}"
        );
        // Requests are accepted (and wait) without panicking.
        r.request("ep1", "/netns/sb1");
        let stats = r.stats().await.unwrap();
        assert!(!stats.available);
        assert_eq!(stats.pending, 1);

        let refused_path = dir.path().join("refused.sock");
        drop(std::os::unix::net::UnixListener::bind(&refused_path).unwrap());
        let (r, _rx) = IdentityResolver::start(EngineClient::new(&refused_path), config()).await;
        assert!(!r.available());
        assert!(
            r.unavailable_reason().unwrap().contains("cannot connect"),
            "{:?}",
            r.availability()
        );
    }

    #[tokio::test]
    async fn a_request_while_the_engine_is_down_is_answered_once_it_is_up() {
        let fake = Arc::new(Fake::default());
        fake.set_down(Some("not yet"));
        let (r, mut rx) = start(&fake, config()).await;
        assert!(
            matches!(r.availability(), Availability::Unavailable(ref why) if why.contains("not yet"))
        );
        r.request("ep1", "/netns/sb1");
        fake.add(container("c1", "early", "/netns/sb1", &[("n1", "ep1")]));
        fake.set_down(None);
        assert_eq!(recv(&mut rx).await.name, "early");
        assert!(r.available());
    }

    #[tokio::test]
    async fn the_task_stops_with_the_last_handle_and_survives_a_dropped_receiver() {
        let fake = Arc::new(Fake::default());
        fake.add(container("c1", "web-1", "/netns/sb1", &[("n1", "ep1")]));
        let (r, rx) = start(&fake, config()).await;
        drop(rx);
        r.request("ep1", "/netns/sb1");
        assert_eq!(until(&r, "resolved", |s| s.resolved == 1).await.watched, 1);
        let clone = r.clone();
        drop(r);
        assert!(clone.stats().await.is_some(), "a clone keeps it running");
        let weak = Arc::downgrade(&fake);
        drop(clone);
        drop(fake);
        let deadline = Instant::now() + Duration::from_secs(2);
        while weak.upgrade().is_some() {
            assert!(Instant::now() < deadline, "the task still holds the source");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn ids_are_shortened_for_logs() {
        assert_eq!(short(WEB1_ID), "c9b4a536feca");
        assert_eq!(short("abc"), "abc");
        let distinct: HashSet<_> = [short(WEB1_ID), short(WEB1_EP)].into_iter().collect();
        assert_eq!(distinct.len(), 2);
    }
}
