//! The plugin socket: an axum router answering Docker's `NetworkDriver.*` and `IpamDriver.*`
//! calls. Each handler is decode → one [`Driver`] call → encode, inside a tracing span that
//! carries the network and endpoint IDs.
//!
//! Docker sends no `Content-Type` and empty bodies on argument-less calls, so bodies are
//! read as bytes and decoded here rather than through axum's `Json` extractor.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRef, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_driver::{Driver, DriverError, Kernel};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::engine::IdentityResolver;
use crate::wire::{
    ActivateResponse, AddressSpacesResponse, AllocateNetworkRequest, AllocateNetworkResponse,
    BadRequest, CapabilitiesResponse, CreateEndpointRequest, CreateEndpointResponse,
    CreateNetworkRequest, DiscoveryRequest, EndpointIdRequest, EndpointInfoResponse,
    EndpointInterfaceResponse, ErrorResponse, InterfaceName, IpamCapabilitiesResponse, JoinRequest,
    JoinResponse, NetworkIdRequest, ReleaseAddressRequest, ReleasePoolRequest,
    RequestAddressRequest, RequestAddressResponse, RequestPoolRequest, RequestPoolResponse,
    parse_ip_or_cidr,
};

/// Media type of plugin responses (what Docker's own helpers send).
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.1+json";
/// IPAM address spaces sluice reports.
const LOCAL_SPACE: &str = "sluice-local";
const GLOBAL_SPACE: &str = "sluice-global";

type Shared<K> = Arc<Driver<K>>;

/// What the handlers share: the driver, and the identity resolver that learns each
/// endpoint's container from the Docker Engine API after Join (never inside the handler).
#[derive(Debug)]
pub struct AppState<K: Kernel> {
    driver: Shared<K>,
    resolver: Option<IdentityResolver>,
    /// Where this host's own address from `DiscoverNew` goes (`--cluster` without
    /// `--advertise-addr`).
    discovery: Option<Discovery>,
}

/// Receives this host's underlay address from Docker's `DiscoverNew` (`"Self": true`): the
/// cluster the driver waits for.
pub type Discovery = Arc<sluice_driver::cluster::deferred::Deferred>;

impl<K: Kernel> Clone for AppState<K> {
    fn clone(&self) -> Self {
        Self {
            driver: self.driver.clone(),
            resolver: self.resolver.clone(),
            discovery: self.discovery.clone(),
        }
    }
}

impl<K: Kernel> FromRef<AppState<K>> for Shared<K> {
    fn from_ref(state: &AppState<K>) -> Self {
        state.driver.clone()
    }
}

/// An error answer: status plus `{"Err": ..., "Error": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        Self::bad(e.0)
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> Self {
        let status = if e.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        warn!(status = self.status.as_u16(), error = %self.message, "request failed");
        let body = ErrorResponse {
            err: self.message.clone(),
            error: self.message,
        };
        reply(self.status, &body)
    }
}

fn reply<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], bytes).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"Err\":\"encoding response: {e}\"}}"),
        )
            .into_response(),
    }
}

fn ok<T: Serialize>(body: &T) -> Response {
    reply(StatusCode::OK, body)
}

fn empty() -> Response {
    ok(&serde_json::Map::new())
}

/// Decodes a JSON body. An empty body is an error: Docker resends a call with an empty
/// body when a connection broke mid-request, and treating that as `{}` would act on nothing.
fn decode<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad(
            "empty request body: this call needs a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed request: {e}")))
}

/// Short form of a 64-hex ID for log fields.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

async fn respond<F>(fut: F) -> Response
where
    F: Future<Output = Result<Response, ApiError>>,
{
    fut.await.unwrap_or_else(IntoResponse::into_response)
}

/// The router for both subsystems. Unknown methods answer 404, which Docker reads as
/// "not implemented". With a `resolver`, every successful Join asks it for the endpoint's
/// container (a channel send; the lookup runs in the resolver's task).
pub fn router<K: Kernel>(driver: Shared<K>, resolver: Option<IdentityResolver>) -> Router {
    router_with_discovery(driver, resolver, None)
}

/// [`router`] whose `DiscoverNew` hands this host's own address to `discovery`.
pub fn router_with_discovery<K: Kernel>(
    driver: Shared<K>,
    resolver: Option<IdentityResolver>,
    discovery: Option<Discovery>,
) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/NetworkDriver.GetCapabilities", post(capabilities))
        .route("/NetworkDriver.CreateNetwork", post(create_network::<K>))
        .route("/NetworkDriver.DeleteNetwork", post(delete_network::<K>))
        .route("/NetworkDriver.AllocateNetwork", post(allocate_network))
        .route("/NetworkDriver.FreeNetwork", post(free_network))
        .route("/NetworkDriver.CreateEndpoint", post(create_endpoint::<K>))
        .route("/NetworkDriver.EndpointOperInfo", post(endpoint_info::<K>))
        .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint::<K>))
        .route("/NetworkDriver.Join", post(join::<K>))
        .route("/NetworkDriver.Leave", post(leave::<K>))
        .route(
            "/NetworkDriver.ProgramExternalConnectivity",
            post(program_external::<K>),
        )
        .route(
            "/NetworkDriver.RevokeExternalConnectivity",
            post(revoke_external::<K>),
        )
        .route("/NetworkDriver.DiscoverNew", post(discover_new::<K>))
        .route("/NetworkDriver.DiscoverDelete", post(discover))
        .route("/IpamDriver.GetCapabilities", post(ipam_capabilities))
        .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
        .route("/IpamDriver.RequestPool", post(request_pool::<K>))
        .route("/IpamDriver.ReleasePool", post(release_pool::<K>))
        .route("/IpamDriver.RequestAddress", post(request_address::<K>))
        .route("/IpamDriver.ReleaseAddress", post(release_address::<K>))
        .fallback(not_found)
        .with_state(AppState {
            driver,
            resolver,
            discovery,
        })
}

/// Docker probes optional methods (ProgramExternalConnectivity on every container start)
/// and reads 404 as "not implemented", so this is logged at debug, not as a failure.
///
/// Handlers that need no body still take it: a response sent before the body is read makes
/// hyper close the connection, and a client still writing its body then sees EPIPE instead
/// of the answer.
async fn not_found(uri: Uri, _body: Bytes) -> Response {
    debug!(%uri, "unknown plugin method: 404");
    let message = format!("{} is not implemented by sluice", uri.path());
    reply(
        StatusCode::NOT_FOUND,
        &ErrorResponse {
            err: message.clone(),
            error: message,
        },
    )
}

async fn activate(_body: Bytes) -> Response {
    ok(&ActivateResponse {
        implements: vec!["NetworkDriver", "IpamDriver"],
    })
}

async fn capabilities(_body: Bytes) -> Response {
    ok(&CapabilitiesResponse {
        scope: "local",
        connectivity_scope: "local",
    })
}

async fn ipam_capabilities(_body: Bytes) -> Response {
    ok(&IpamCapabilitiesResponse {
        requires_mac_address: false,
        requires_request_replay: false,
    })
}

async fn address_spaces(_body: Bytes) -> Response {
    ok(&AddressSpacesResponse {
        local: LOCAL_SPACE,
        global: GLOBAL_SPACE,
    })
}

async fn create_network<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: CreateNetworkRequest = decode(&body)?;
        let span = info_span!("CreateNetwork", network = %short(&req.network_id));
        async move {
            let req = req.into_domain()?;
            d.create_network(req).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

async fn delete_network<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: NetworkIdRequest = decode(&body)?;
        let span = info_span!("DeleteNetwork", network = %short(&req.network_id));
        async move {
            d.delete_network(&req.network_id).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

/// Swarm managers call this for global-scope drivers; the returned options are all that
/// workers receive, so they are echoed.
async fn allocate_network(body: Bytes) -> Response {
    respond(async move {
        let req: AllocateNetworkRequest = decode(&body)?;
        info!(network = %short(&req.network_id), "AllocateNetwork");
        Ok(ok(&AllocateNetworkResponse {
            options: req.options.unwrap_or_default(),
        }))
    })
    .await
}

async fn free_network(body: Bytes) -> Response {
    respond(async move {
        let req: NetworkIdRequest = decode(&body)?;
        info!(network = %short(&req.network_id), "FreeNetwork");
        Ok(empty())
    })
    .await
}

async fn create_endpoint<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: CreateEndpointRequest = decode(&body)?;
        let span = info_span!("CreateEndpoint", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            let created = d.create_endpoint(req.into_domain()?).await?;
            Ok(ok(&CreateEndpointResponse {
                interface: created.mac.map(|m| EndpointInterfaceResponse {
                    mac_address: sluice_driver::model::format_mac(&m),
                }),
            }))
        }
        .instrument(span)
        .await
    })
    .await
}

async fn endpoint_info<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: EndpointIdRequest = decode(&body)?;
        Ok(ok(&EndpointInfoResponse {
            value: d.endpoint_info(&req.endpoint_id).await,
        }))
    })
    .await
}

async fn delete_endpoint<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: EndpointIdRequest = decode(&body)?;
        let span = info_span!("DeleteEndpoint", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            d.delete_endpoint(&req.network_id, &req.endpoint_id).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

async fn join<K: Kernel>(State(app): State<AppState<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: JoinRequest = decode(&body)?;
        let span = info_span!("Join", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            let info = app
                .driver
                .join(&req.network_id, &req.endpoint_id, &req.sandbox_key)
                .await?;
            if let Some(resolver) = &app.resolver {
                resolver.request(req.endpoint_id.clone(), req.sandbox_key.clone());
            }
            Ok(ok(&JoinResponse {
                interface_name: InterfaceName {
                    src_name: info.src_name,
                    dst_prefix: info.dst_prefix,
                },
                gateway: info.gateway.map(|g| g.to_string()).unwrap_or_default(),
                gateway_ipv6: info.gateway_v6.map(|g| g.to_string()).unwrap_or_default(),
                disable_gateway_service: true,
            }))
        }
        .instrument(span)
        .await
    })
    .await
}

async fn leave<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: EndpointIdRequest = decode(&body)?;
        let span = info_span!("Leave", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            d.leave(&req.network_id, &req.endpoint_id).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

/// Published ports (`docker run -p`): called after Join for the endpoint that gives the
/// container its gateway. An error fails `docker run` with its message.
async fn program_external<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: crate::wire::ProgramExternalRequest = decode(&body)?;
        let span = info_span!("ProgramExternalConnectivity", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            let ports = req.port_requests()?;
            d.program_external(&req.network_id, &req.endpoint_id, ports)
                .await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

async fn revoke_external<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: EndpointIdRequest = decode(&body)?;
        let span = info_span!("RevokeExternalConnectivity", network = %short(&req.network_id), endpoint = %short(&req.endpoint_id));
        async move {
            d.revoke_external(&req.network_id, &req.endpoint_id).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

/// `DiscoverNew`: this host's own address (swarm's data-path address) is the underlay
/// address when none was given; other nodes' events are only logged (peers come from etcd).
async fn discover_new<K: Kernel>(State(app): State<AppState<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: DiscoveryRequest = decode(&body)?;
        info!(kind = req.discovery_type, data = %req.discovery_data, "DiscoverNew");
        if let (Some(sink), Some(addr)) = (&app.discovery, req.self_address()) {
            sink.discovered(addr);
        }
        Ok(empty())
    })
    .await
}

async fn discover(uri: Uri, body: Bytes) -> Response {
    respond(async move {
        let req: DiscoveryRequest = decode(&body)?;
        info!(method = %uri.path(), kind = req.discovery_type, data = %req.discovery_data, "discovery event");
        Ok(empty())
    })
    .await
}

async fn request_pool<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: RequestPoolRequest = decode(&body)?;
        let span =
            info_span!("RequestPool", pool = %req.pool, sub_pool = %req.sub_pool, v6 = req.v6);
        async move {
            let pool = d.request_pool(&req.into_domain()?).await?;
            Ok(ok(&RequestPoolResponse {
                pool_id: pool.id,
                pool: pool.subnet.to_string(),
                data: std::collections::BTreeMap::new(),
            }))
        }
        .instrument(span)
        .await
    })
    .await
}

async fn release_pool<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: ReleasePoolRequest = decode(&body)?;
        let span = info_span!("ReleasePool", pool = %req.pool_id);
        async move {
            d.release_pool(&req.pool_id).await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

async fn request_address<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: RequestAddressRequest = decode(&body)?;
        let span = info_span!("RequestAddress", pool = %req.pool_id, address = %req.address);
        async move {
            let addr = d
                .request_address(&req.pool_id, req.preferred()?, req.kind())
                .await?;
            Ok(ok(&RequestAddressResponse {
                address: addr.to_string(),
                data: std::collections::BTreeMap::new(),
            }))
        }
        .instrument(span)
        .await
    })
    .await
}

async fn release_address<K: Kernel>(State(d): State<Shared<K>>, body: Bytes) -> Response {
    respond(async move {
        let req: ReleaseAddressRequest = decode(&body)?;
        let span = info_span!("ReleaseAddress", pool = %req.pool_id, address = %req.address);
        async move {
            d.release_address(&req.pool_id, parse_ip_or_cidr(&req.address)?)
                .await?;
            Ok(empty())
        }
        .instrument(span)
        .await
    })
    .await
}

/// Errors of the socket set-up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the socket.
    #[error("another sluice daemon is already serving {0}; stop it first")]
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
        source: std::io::Error,
    },
}

/// Binds the Unix socket at `path`, creating its directory and replacing a stale socket
/// (one nobody answers on). A live one is an error: two daemons must not share a name.
///
/// # Errors
/// When the socket is in use or cannot be bound.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    bind_with_modes(path, None, None).await
}

/// As [`bind`], creating a missing parent directory with `dir_mode` (an existing one is
/// left as it is) and giving the socket `socket_mode` (the admin socket: 0700 and 0600).
///
/// # Errors
/// When the socket is in use or cannot be bound.
pub async fn bind_with_modes(
    path: &Path,
    dir_mode: Option<u32>,
    socket_mode: Option<u32>,
) -> Result<tokio::net::UnixListener, SocketError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io = |op, source| SocketError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        if let Some(mode) = dir_mode {
            builder.mode(mode);
        }
        builder
            .create(dir)
            .map_err(|e| io("creating the directory of", e))?;
    }
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        info!(socket = %path.display(), "replacing stale socket");
        tokio::fs::remove_file(path)
            .await
            .map_err(|e| io("removing stale socket", e))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|e| io("binding", e))?;
    if let Some(mode) = socket_mode {
        tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| io("setting the mode of", e))?;
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use sluice_driver::ipam::IpamConfig;
    use sluice_driver::kernel::fake::FakeKernel;
    use sluice_driver::store::Store;
    use tower::ServiceExt;

    use super::*;

    struct Harness {
        app: Router,
        driver: Shared<FakeKernel>,
        _dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let driver =
            Arc::new(Driver::open(FakeKernel::default(), store, IpamConfig::default()).unwrap());
        Harness {
            app: router(driver.clone(), None),
            driver,
            _dir: dir,
        }
    }

    /// Sends a request the way dockerd does: POST, no Content-Type, Accept header only.
    async fn call(app: &Router, method: &str, body: &str) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/{method}"))
            .header("Accept", "application/vnd.docker.plugins.v1.2+json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn argumentless_calls_accept_empty_bodies_without_content_type() {
        let h = harness();
        let (s, v) = call(&h.app, "Plugin.Activate", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            v["Implements"],
            serde_json::json!(["NetworkDriver", "IpamDriver"])
        );
        let (s, v) = call(&h.app, "NetworkDriver.GetCapabilities", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["Scope"], "local");
        let (s, v) = call(&h.app, "IpamDriver.GetCapabilities", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["RequiresMACAddress"], false);
        let (s, v) = call(&h.app, "IpamDriver.GetDefaultAddressSpaces", "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["LocalDefaultAddressSpace"], LOCAL_SPACE);
    }

    #[tokio::test]
    async fn empty_body_where_one_is_needed_is_400() {
        let h = harness();
        for method in [
            "NetworkDriver.CreateNetwork",
            "NetworkDriver.CreateEndpoint",
            "NetworkDriver.Join",
            "IpamDriver.RequestPool",
            "IpamDriver.RequestAddress",
        ] {
            let (s, v) = call(&h.app, method, "").await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method}");
            assert!(v["Err"].as_str().unwrap().contains("empty request body"));
        }
    }

    #[tokio::test]
    async fn malformed_json_and_wrong_types_are_400() {
        let h = harness();
        let (s, v) = call(&h.app, "NetworkDriver.CreateNetwork", "{not json").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["Err"].as_str().unwrap().contains("malformed"));
        let (s, _) = call(&h.app, "NetworkDriver.DeleteNetwork", r#"{"NetworkID":5}"#).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn unknown_methods_are_404() {
        let h = harness();
        let (s, _) = call(&h.app, "NetworkDriver.GwAllocCheck", "{}").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _) = call(&h.app, "VolumeDriver.Create", "{}").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    /// A reply before the body is read would make hyper close the connection under a client
    /// still writing (EPIPE on its side, seen in CI). Over a real socket: no answer while the
    /// body is outstanding, the answer once it is sent.
    #[tokio::test]
    async fn answers_wait_for_the_whole_body() {
        use std::time::Duration;

        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let h = harness();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.sock");
        let listener = bind(&path).await.unwrap();
        let server = tokio::spawn(axum::serve(listener, h.app.clone()).into_future());
        for method in [
            "NetworkDriver.Frobnicate",
            "Plugin.Activate",
            "NetworkDriver.GetCapabilities",
            "IpamDriver.GetCapabilities",
            "IpamDriver.GetDefaultAddressSpaces",
        ] {
            let mut stream = tokio::net::UnixStream::connect(&path).await.unwrap();
            let head = format!(
                "POST /{method} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut buf = [0_u8; 64];
            let early =
                tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
            assert!(early.is_err(), "{method} answered before its body arrived");
            stream.write_all(b"{}").await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            let text = String::from_utf8_lossy(&raw);
            assert!(text.starts_with("HTTP/1.1 "), "{method}: {text}");
        }
        server.abort();
    }

    #[tokio::test]
    async fn ipam_errors_are_non_200_with_error_field() {
        let h = harness();
        let body = r#"{"AddressSpace":"sluice-local","Pool":"10.251.0.0/24","SubPool":"","Options":{},"V6":false}"#;
        let (s, v) = call(&h.app, "IpamDriver.RequestPool", body).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["PoolID"], "10.251.0.0/24");
        let overlap = r#"{"AddressSpace":"sluice-local","Pool":"10.251.0.0/16","SubPool":"","Options":{},"V6":false}"#;
        let (s, v) = call(&h.app, "IpamDriver.RequestPool", overlap).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["Error"].as_str().unwrap().contains("overlaps"), "{v}");
        assert_eq!(v["Err"], v["Error"]);
        let out = r#"{"PoolID":"10.251.0.0/24","Address":"10.9.9.9","Options":null}"#;
        let (s, v) = call(&h.app, "IpamDriver.RequestAddress", out).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["Error"].as_str().unwrap().contains("outside"), "{v}");
    }

    #[tokio::test]
    async fn automatic_pools_differ_on_each_call() {
        let h = harness();
        let auto =
            r#"{"AddressSpace":"sluice-local","Pool":"","SubPool":"","Options":{},"V6":false}"#;
        let (_, a) = call(&h.app, "IpamDriver.RequestPool", auto).await;
        let (_, b) = call(&h.app, "IpamDriver.RequestPool", auto).await;
        assert_ne!(a["Pool"], b["Pool"]);
    }

    /// The sequence dockerd 20.10 sends for `docker network create` + `docker run --ip`,
    /// from the capture, through to teardown.
    #[tokio::test]
    async fn docker_sequence_end_to_end() {
        let h = harness();
        let nid = "a45eeb163d5f42ccd747f827dfe6a23e505e6b221804f242ca378ead7fed74ff";
        let eid = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";
        let steps = [
            (
                "IpamDriver.RequestPool",
                r#"{"AddressSpace":"sluice-local","Pool":"10.251.0.0/24","SubPool":"10.251.0.128/25","Options":{},"V6":false}"#,
            ),
            (
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.1","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
            ),
            (
                "IpamDriver.RequestAddress",
                r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.2","Options":null}"#,
            ),
        ];
        for (m, b) in steps {
            let (s, v) = call(&h.app, m, b).await;
            assert_eq!(s, StatusCode::OK, "{m}: {v}");
        }
        let create = format!(
            r#"{{"NetworkID":"{nid}","Options":{{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{{"com.docker.network.driver.mtu":"1400","mode":"bridge"}}}},"IPv4Data":[{{"AddressSpace":"sluice-local","AuxAddresses":{{"r":"10.251.0.2/24"}},"Gateway":"10.251.0.1/24","Pool":"10.251.0.0/24"}}],"IPv6Data":[]}}"#
        );
        let (s, v) = call(&h.app, "NetworkDriver.CreateNetwork", &create).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v, serde_json::json!({}));
        let (s, v) = call(
            &h.app,
            "IpamDriver.RequestAddress",
            r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.200","Options":null}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["Address"], "10.251.0.200/24");
        let ep = format!(
            r#"{{"NetworkID":"{nid}","EndpointID":"{eid}","Interface":{{"Address":"10.251.0.200/24","AddressIPv6":"","MacAddress":""}},"Options":{{"com.docker.network.endpoint.exposedports":[{{"Proto":6,"Port":80}}],"com.docker.network.portmap":[]}}}}"#
        );
        let (s, v) = call(&h.app, "NetworkDriver.CreateEndpoint", &ep).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        // Address was set by the daemon: only the MAC comes back.
        assert_eq!(
            v,
            serde_json::json!({"Interface": {"MacAddress": "02:42:0a:fb:00:c8"}})
        );
        let join = format!(
            r#"{{"NetworkID":"{nid}","EndpointID":"{eid}","SandboxKey":"/var/run/docker/netns/3de55aa38526","Options":{{}}}}"#
        );
        let (s, v) = call(&h.app, "NetworkDriver.Join", &join).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["InterfaceName"]["SrcName"], "slvc0f987eed597");
        assert_eq!(v["InterfaceName"]["DstPrefix"], "eth");
        assert_eq!(v["Gateway"], "10.251.0.1");
        assert_eq!(v["DisableGatewayService"], true);
        let ids = format!(r#"{{"NetworkID":"{nid}","EndpointID":"{eid}"}}"#);
        let (s, v) = call(&h.app, "NetworkDriver.EndpointOperInfo", &ids).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["Value"]["sluice.host_veth"], "slvh0f987eed597");
        for m in ["NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint"] {
            // Twice: both are idempotent.
            for _ in 0..2 {
                let (s, v) = call(&h.app, m, &ids).await;
                assert_eq!(s, StatusCode::OK, "{m}: {v}");
            }
        }
        assert_eq!(
            h.driver.kernel().links().len(),
            1,
            "only the bridge is left"
        );
        let (s, _) = call(
            &h.app,
            "IpamDriver.ReleaseAddress",
            r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.200"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let del = format!(r#"{{"NetworkID":"{nid}"}}"#);
        for _ in 0..2 {
            let (s, _) = call(&h.app, "NetworkDriver.DeleteNetwork", &del).await;
            assert_eq!(s, StatusCode::OK);
        }
        for b in [
            r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.1"}"#,
            r#"{"PoolID":"10.251.0.0/24","Address":"10.251.0.2"}"#,
        ] {
            let (s, _) = call(&h.app, "IpamDriver.ReleaseAddress", b).await;
            assert_eq!(s, StatusCode::OK);
        }
        let (s, _) = call(
            &h.app,
            "IpamDriver.ReleasePool",
            r#"{"PoolID":"10.251.0.0/24"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert!(h.driver.kernel().links().is_empty());
        assert!(h.driver.pools().await.is_empty());
    }

    #[tokio::test]
    async fn join_of_unknown_endpoint_is_a_clear_error_and_deletes_are_idempotent() {
        let h = harness();
        let (s, v) = call(
            &h.app,
            "NetworkDriver.Join",
            r#"{"NetworkID":"n0","EndpointID":"e0","SandboxKey":"/x","Options":{}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["Err"].as_str().unwrap().contains("unknown network n0"));
        for m in [
            "NetworkDriver.Leave",
            "NetworkDriver.DeleteEndpoint",
            "NetworkDriver.EndpointOperInfo",
        ] {
            let (s, _) = call(&h.app, m, r#"{"NetworkID":"n0","EndpointID":"e0"}"#).await;
            assert_eq!(s, StatusCode::OK, "{m}");
        }
        let (s, _) = call(
            &h.app,
            "NetworkDriver.DeleteNetwork",
            r#"{"NetworkID":"n0"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test]
    async fn allocate_network_echoes_options_and_discovery_is_accepted() {
        let h = harness();
        let (s, v) = call(
            &h.app,
            "NetworkDriver.AllocateNetwork",
            r#"{"NetworkID":"x9a","Options":{"mode":"bridge"},"IPv4Data":[],"IPv6Data":null}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["Options"]["mode"], "bridge");
        let (s, _) = call(
            &h.app,
            "NetworkDriver.FreeNetwork",
            r#"{"NetworkID":"x9a"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let (s, _) = call(
            &h.app,
            "NetworkDriver.DiscoverNew",
            r#"{"DiscoveryType":1,"DiscoveryData":{"Address":"192.0.2.11","BindAddress":"0.0.0.0","Self":true}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test]
    async fn discover_new_about_this_node_gives_the_underlay_address() {
        let dir = tempfile::tempdir().unwrap();
        let deferred = Arc::new(sluice_driver::cluster::deferred::Deferred::new());
        let driver = Arc::new(
            Driver::open(
                FakeKernel::default(),
                Store::open(dir.path()).unwrap(),
                IpamConfig::default(),
            )
            .unwrap()
            .with_cluster(deferred.clone()),
        );
        let rx = deferred.address();
        let app = router_with_discovery(driver.clone(), None, Some(deferred.clone()));
        let create = r#"{"NetworkID":"vx1","Options":{"com.docker.network.generic":{"mode":"vxlan"}},"IPv4Data":[{"AddressSpace":"sluice-local","Pool":"10.81.5.0/24","Gateway":"10.81.5.1/24"}],"IPv6Data":[]}"#;
        let (s, v) = call(&app, "NetworkDriver.CreateNetwork", create).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["Err"]
                .as_str()
                .unwrap()
                .contains("no underlay address: pass --advertise-addr or join a swarm"),
            "{v}"
        );
        assert!(driver.networks().await.is_empty(), "nothing half-created");
        // Other nodes, deletions and other event types say nothing about this host.
        for (method, body) in [
            (
                "NetworkDriver.DiscoverNew",
                r#"{"DiscoveryType":1,"DiscoveryData":{"Address":"192.0.2.12","Self":false}}"#,
            ),
            (
                "NetworkDriver.DiscoverNew",
                r#"{"DiscoveryType":2,"DiscoveryData":{"Address":"192.0.2.13","Self":true}}"#,
            ),
            (
                "NetworkDriver.DiscoverDelete",
                r#"{"DiscoveryType":1,"DiscoveryData":{"Address":"192.0.2.14","Self":true}}"#,
            ),
        ] {
            let (s, _) = call(&app, method, body).await;
            assert_eq!(s, StatusCode::OK, "{method} {body}");
            assert_eq!(*rx.borrow(), None, "{method} {body}");
        }
        let (s, _) = call(
            &app,
            "NetworkDriver.DiscoverNew",
            r#"{"DiscoveryType":1,"DiscoveryData":{"Address":"192.0.2.11","BindAddress":"0.0.0.0","Self":true}}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(*rx.borrow(), Some("192.0.2.11".parse().unwrap()));
        // Once the daemon has joined with it (tests/tests/cluster_privileged.rs runs the
        // real join), the same request succeeds.
        deferred.set(Arc::new(sluice_driver::cluster::fake::FakeCluster {
            store: Arc::default(),
            host: "192.0.2.11".into(),
            vtep: "192.0.2.11".parse().unwrap(),
        }));
        let (s, v) = call(&app, "NetworkDriver.CreateNetwork", create).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let net = &driver.networks().await[0];
        assert_eq!(
            net.vxlan.as_ref().map(|v| v.local),
            Some("192.0.2.11".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn bad_request_keeps_earlier_state() {
        let h = harness();
        let (s, _) = call(
            &h.app,
            "IpamDriver.RequestPool",
            r#"{"AddressSpace":"sluice-local","Pool":"10.251.0.0/24","SubPool":"","Options":{},"V6":false}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        for junk in ["{", "[]", r#"{"PoolID":7}"#, "null"] {
            let (s, _) = call(&h.app, "IpamDriver.RequestAddress", junk).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{junk}");
        }
        assert_eq!(h.driver.pools().await.len(), 1);
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p/sluice.sock");
        let first = bind(&path).await.unwrap();
        let err = bind(&path).await.unwrap_err();
        assert!(matches!(err, SocketError::InUse(_)));
        drop(first);
        // The file is still there but nobody listens: replaced.
        assert!(path.exists());
        let _second = bind(&path).await.unwrap();
    }
}
