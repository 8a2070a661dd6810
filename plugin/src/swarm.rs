//! Swarm support: the driver's scope as a setting.
//!
//! Swarm-scoped networks need a driver whose `GetCapabilities` answers `Scope: global`, and
//! Docker 20.10 refuses to create any network of such a driver outside swarm ("This node is
//! not a swarm manager"). So the scope is chosen per installation: `--scope local` (the
//! default) for ordinary hosts, `--scope global` (`SLUICE_SCOPE=global`) on swarm nodes.
//! With `global` the swarm manager calls `AllocateNetwork`/`FreeNetwork` (answered in
//! [`crate::server`]: the options are echoed, since they are all that workers receive) and
//! service records travel between nodes (Docker only gossips them for drivers whose
//! `ConnectivityScope` is global).

use axum::Router;
use axum::response::{IntoResponse as _, Response};
use axum::routing::post;

use crate::wire::CapabilitiesResponse;

/// What `NetworkDriver.GetCapabilities` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    /// Networks exist on one host (every host outside swarm; config-only/`--config-from`
    /// networks in swarm).
    #[default]
    Local,
    /// Networks are swarm-wide: the manager allocates them and their subnets; only accepted by
    /// Docker on swarm nodes.
    Global,
}

impl Scope {
    /// The word Docker expects.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Global => "global",
        }
    }

    /// The `GetCapabilities` answer for this scope (data and connectivity scope alike).
    #[must_use]
    pub fn capabilities(self) -> CapabilitiesResponse {
        CapabilitiesResponse {
            scope: self.as_str(),
            connectivity_scope: self.as_str(),
        }
    }
}

/// `--cluster-address`: an IP address, or nothing (an empty value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterAddress(pub Option<std::net::IpAddr>);

/// Parses `--cluster-address` / `SLUICE_CLUSTER_ADDRESS`.
///
/// # Errors
/// When the value is neither empty nor an IP address.
pub fn parse_cluster_address(value: &str) -> Result<ClusterAddress, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(ClusterAddress(None));
    }
    value
        .parse()
        .map(|ip| ClusterAddress(Some(ip)))
        .map_err(|_| format!("{value:?} is not an IP address (nor empty)"))
}

/// `router` (which answers `local`) with `GetCapabilities` answering `scope`: the plugin
/// router handles every other call.
pub fn with_scope(router: Router, scope: Scope) -> Router {
    if scope == Scope::Local {
        return router;
    }
    let caps = move || async move { capabilities(scope) };
    Router::new()
        .route("/NetworkDriver.GetCapabilities", post(caps))
        .fallback_service(router)
}

fn capabilities(scope: Scope) -> Response {
    let body = serde_json::to_vec(&scope.capabilities()).unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/vnd.docker.plugins.v1.1+json",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    async fn call(app: &Router, method: &str) -> (u16, serde_json::Value) {
        let res = app
            .clone()
            .oneshot(
                Request::post(format!("/{method}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    fn inner() -> Router {
        Router::new()
            .route(
                "/NetworkDriver.GetCapabilities",
                post(|| async { capabilities(Scope::Local) }),
            )
            .route(
                "/Plugin.Activate",
                post(|| async { r#"{"Implements":["x"]}"# }),
            )
    }

    #[tokio::test]
    async fn global_scope_answers_global_and_passes_everything_else_on() {
        let app = with_scope(inner(), Scope::Global);
        let (s, v) = call(&app, "NetworkDriver.GetCapabilities").await;
        assert_eq!(s, 200);
        assert_eq!(v["Scope"], "global");
        assert_eq!(v["ConnectivityScope"], "global");
        let (s, v) = call(&app, "Plugin.Activate").await;
        assert_eq!((s, v["Implements"][0].as_str()), (200, Some("x")));
    }

    #[test]
    fn cluster_address_is_an_ip_or_empty() {
        assert_eq!(parse_cluster_address(""), Ok(ClusterAddress(None)));
        assert_eq!(
            parse_cluster_address("192.0.2.7"),
            Ok(ClusterAddress(Some("192.0.2.7".parse().unwrap())))
        );
        let err = parse_cluster_address("node-1").unwrap_err();
        assert!(err.contains("\"node-1\" is not an IP address"), "{err}");
    }

    #[tokio::test]
    async fn local_scope_leaves_the_router_alone() {
        let app = with_scope(inner(), Scope::Local);
        let (_, v) = call(&app, "NetworkDriver.GetCapabilities").await;
        assert_eq!(v["Scope"], "local");
    }
}
