//! `ProgramExternalConnectivity` / `RevokeExternalConnectivity` (published ports) through the
//! plugin router, with the exact JSON dockerd 20.10 sends, over the driver and the in-memory
//! kernel: what ends up in the NAT ruleset and the host-port reservations.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt as _;
use sluice_driver::Driver;
use sluice_driver::ipam::IpamConfig;
use sluice_driver::kernel::fake::FakeKernel;
use sluice_driver::nat::Proto;
use sluice_driver::store::Store;
use tower::ServiceExt as _;

const NID: &str = "a45eeb163d5f42ccd747f827dfe6a23e505e6b221804f242ca378ead7fed74ff";
const EID: &str = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";

fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

async fn call(app: &Router, method: &str, body: &str) -> (StatusCode, serde_json::Value) {
    let req = must(
        Request::builder()
            .method("POST")
            .uri(format!("/{method}"))
            .body(Body::from(body.to_owned())),
        "request",
    );
    let resp = must(app.clone().oneshot(req).await, "call");
    let status = resp.status();
    let bytes = must(resp.into_body().collect().await, "body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

struct Harness {
    app: Router,
    driver: Arc<Driver<FakeKernel>>,
    _dir: tempfile::TempDir,
}

/// A network (internal or not) with one joined endpoint at 10.251.0.200.
async fn harness(internal: bool, generic: &str) -> Harness {
    let dir = must(tempfile::tempdir(), "tempdir");
    let store = must(Store::open(dir.path()), "store");
    let driver = Arc::new(must(
        Driver::open(FakeKernel::default(), store, IpamConfig::default()),
        "driver",
    ));
    let app = sluice_plugin::server::router(driver.clone(), None);
    let internal = if internal {
        r#","com.docker.network.internal":true"#
    } else {
        ""
    };
    let create = format!(
        r#"{{"NetworkID":"{NID}","Options":{{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{{{generic}}}{internal}}},"IPv4Data":[{{"AddressSpace":"sluice-local","Gateway":"10.251.0.1/24","Pool":"10.251.0.0/24"}}],"IPv6Data":[]}}"#
    );
    let (s, v) = call(&app, "NetworkDriver.CreateNetwork", &create).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ep = format!(
        r#"{{"NetworkID":"{NID}","EndpointID":"{EID}","Interface":{{"Address":"10.251.0.200/24","AddressIPv6":"","MacAddress":""}},"Options":{{"com.docker.network.endpoint.exposedports":[{{"Proto":6,"Port":80}}],"com.docker.network.portmap":[{{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}}]}}}}"#
    );
    let (s, v) = call(&app, "NetworkDriver.CreateEndpoint", &ep).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let join = format!(
        r#"{{"NetworkID":"{NID}","EndpointID":"{EID}","SandboxKey":"/var/run/docker/netns/3de55aa38526","Options":{{}}}}"#
    );
    let (s, v) = call(&app, "NetworkDriver.Join", &join).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    Harness {
        app,
        driver,
        _dir: dir,
    }
}

fn program(portmap: &str) -> String {
    format!(
        r#"{{"NetworkID":"{NID}","EndpointID":"{EID}","Options":{{"com.docker.network.endpoint.exposedports":[{{"Proto":6,"Port":80}}],"com.docker.network.portmap":{portmap}}}}}"#
    )
}

#[tokio::test]
async fn program_publishes_and_revoke_unpublishes() {
    let h = harness(false, "").await;
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert_eq!(nat.networks.len(), 1);
    assert_eq!(
        nat.networks[0].masquerade,
        vec![must("10.251.0.0/24".parse(), "cidr")],
        "masquerade is on by default"
    );
    assert!(nat.ports.is_empty(), "nothing published before Program");

    let body = program(
        r#"[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080},{"Proto":17,"IP":"","Port":53,"HostIP":"127.0.0.1","HostPort":0,"HostPortEnd":0}]"#,
    );
    let (s, v) = call(&h.app, "NetworkDriver.ProgramExternalConnectivity", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert_eq!(nat.ports.len(), 2, "{nat:?}");
    let tcp = &nat.ports[0];
    assert_eq!(
        (
            tcp.binding.proto,
            tcp.binding.host_port,
            tcp.binding.container_port
        ),
        (Proto::Tcp, 8080, 80)
    );
    assert_eq!(tcp.container_ip.to_string(), "10.251.0.200");
    let udp = &nat.ports[1];
    assert_eq!(udp.binding.proto, Proto::Udp);
    assert_ne!(udp.binding.host_port, 0, "port 0 means: pick one");
    assert_eq!(
        udp.binding.host_ip.map(|i| i.to_string()),
        Some("127.0.0.1".into())
    );
    assert_eq!(h.driver.kernel().reserved_ports()[EID].len(), 2);
    let ids = format!(r#"{{"NetworkID":"{NID}","EndpointID":"{EID}"}}"#);
    let (_, info) = call(&h.app, "NetworkDriver.EndpointOperInfo", &ids).await;
    let shown = info["Value"]["sluice.ports"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(shown.contains("0.0.0.0:8080->80/tcp"), "{info}");

    for _ in 0..2 {
        let (s, v) = call(&h.app, "NetworkDriver.RevokeExternalConnectivity", &ids).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert!(nat.ports.is_empty());
    assert!(h.driver.kernel().reserved_ports().is_empty());
}

#[tokio::test]
async fn a_taken_port_fails_with_dockers_words_and_publishes_nothing() {
    let h = harness(false, "").await;
    h.driver.kernel().take_port(Proto::Tcp, 8080);
    let body = program(
        r#"[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}]"#,
    );
    let (s, v) = call(&h.app, "NetworkDriver.ProgramExternalConnectivity", &body).await;
    assert_ne!(s, StatusCode::OK);
    let err = v["Err"].as_str().unwrap_or_default();
    assert!(err.contains("port is already allocated"), "{v}");
    assert!(h.driver.kernel().nat().is_some_and(|n| n.ports.is_empty()));
    // A range moves on to the next free port.
    let body = program(
        r#"[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8085}]"#,
    );
    let (s, v) = call(&h.app, "NetworkDriver.ProgramExternalConnectivity", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert_eq!(nat.ports[0].binding.host_port, 8081);
}

#[tokio::test]
async fn internal_networks_publish_nothing_and_masquerade_option_is_honoured() {
    let h = harness(true, "").await;
    let body = program(
        r#"[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}]"#,
    );
    let (s, v) = call(&h.app, "NetworkDriver.ProgramExternalConnectivity", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert!(nat.ports.is_empty());
    assert!(nat.networks[0].internal);
    assert!(nat.networks[0].masquerade.is_empty());
    assert!(h.driver.kernel().reserved_ports().is_empty());

    let h = harness(
        false,
        r#""com.docker.network.bridge.enable_ip_masquerade":"false""#,
    )
    .await;
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert!(nat.networks[0].masquerade.is_empty(), "{nat:?}");
}

#[tokio::test]
async fn bad_port_maps_are_400() {
    let h = harness(false, "").await;
    for (portmap, msg) in [
        (
            r#"[{"Proto":1,"Port":80,"HostPort":8080}]"#,
            "unknown protocol",
        ),
        (
            r#"[{"Proto":6,"Port":80,"HostPort":8090,"HostPortEnd":8080}]"#,
            "inverted",
        ),
        (r#""eighty""#, "com.docker.network.portmap"),
        (
            r#"[{"Proto":6,"Port":80,"HostIP":"::1","HostPort":8080}]"#,
            "IPv6 host address",
        ),
    ] {
        let (s, v) = call(
            &h.app,
            "NetworkDriver.ProgramExternalConnectivity",
            &program(portmap),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{portmap}: {v}");
        assert!(
            v["Err"].as_str().unwrap_or_default().contains(msg),
            "{portmap}: {v}"
        );
    }
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert!(nat.ports.is_empty());
}

#[tokio::test]
async fn deleting_the_network_removes_its_rules_and_ports() {
    let h = harness(false, "").await;
    let body = program(
        r#"[{"Proto":6,"IP":"","Port":80,"HostIP":"","HostPort":8080,"HostPortEnd":8080}]"#,
    );
    let (s, _) = call(&h.app, "NetworkDriver.ProgramExternalConnectivity", &body).await;
    assert_eq!(s, StatusCode::OK);
    // No Revoke, Leave or DeleteEndpoint first (a daemon that died): the network delete
    // still takes everything along.
    let (s, _) = call(
        &h.app,
        "NetworkDriver.DeleteNetwork",
        &format!(r#"{{"NetworkID":"{NID}"}}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let nat = must(h.driver.kernel().nat().ok_or("no ruleset"), "nat");
    assert!(nat.is_empty(), "{nat:?}");
    assert!(h.driver.kernel().reserved_ports().is_empty());
}
