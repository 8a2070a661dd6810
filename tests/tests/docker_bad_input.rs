//! Docker end-to-end: bad input, straight over the plugin socket and through the docker CLI.
//! sluice must refuse it clearly, keep serving, and lose nothing. Subnets under 10.34.0.0/16.

use std::time::Duration;

use sluice_tests::docker::{self, Env, assert_subnet_free};

const NETWORK_ID: &str = "5cdf432b9218efa3a4cdb1c360f5d3859f2c76d21ec9701c194cb39579b6a3fc";
const ENDPOINT_ID: &str = "0f987eed597ecf3c9843814cfa7aa94478a534ffdc9850a75ed7a99f8135266e";

fn env() -> &'static Env {
    docker::shared()
}

/// Parses a plugin answer's body, which must be JSON.
fn json(method: &str, status: u16, body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| {
        panic!("{method} answered {status} with a non-JSON body ({e}): {body:?}")
    })
}

/// Asserts a 400 answer carrying a non-empty `{"Err": …}`.
fn assert_bad_request(env: &Env, method: &str, body: &[u8]) {
    let (status, text) = env.plugin_call(method, body);
    assert_eq!(
        status,
        400,
        "{method} with body {:?} should be refused with 400, got {status}: {text}",
        String::from_utf8_lossy(body)
    );
    let err = json(method, status, &text);
    assert!(
        err["Err"].as_str().is_some_and(|e| !e.is_empty()),
        "{method}: the 400 answer should carry {{\"Err\": …}}: {text}"
    );
}

/// A network with two talking containers, made before the bad input, checked after it.
fn make_witness(env: &Env, net: &str, subnet: &str, a: &str, b: &str) {
    assert_subnet_free(subnet);
    env.create_network(net, &["--subnet", subnet]);
    env.run_container(net, a, &[]);
    env.run_container(net, b, &[]);
    env.assert_ping(a, b);
}

/// The witness network is still listed and its containers still talk, by IP and by name; a
/// new container still joins it.
fn check_witness(env: &Env, net: &str, a: &str, b: &str, c: &str) {
    let listed = env.docker_ok(["network", "ls", "--format", "{{.Name}}"]);
    assert!(listed.lines().any(|l| l == net), "{net} is gone: {listed}");
    let b_ip = env.container_ip(b, net);
    env.assert_ping(a, &b_ip);
    env.assert_ping(b, a);
    env.run_container(net, c, &[]);
    env.assert_ping(c, a);
}

#[test]
fn bad_requests_on_the_plugin_socket_are_refused_and_harmless() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    make_witness(env, "bad-sock-base", "10.34.1.0/24", "sock-a", "sock-b");

    // Undecodable bodies: 400 with {"Err": …}.
    assert_bad_request(
        env,
        "NetworkDriver.CreateNetwork",
        br#"{"NetworkID": "abc", "#,
    );
    assert_bad_request(env, "NetworkDriver.CreateNetwork", br#"{"NetworkID": 5}"#);
    assert_bad_request(env, "NetworkDriver.CreateNetwork", b"");
    assert_bad_request(env, "NetworkDriver.CreateNetwork", b"not json at all");
    assert_bad_request(env, "IpamDriver.RequestPool", br#"{"AddressSpace": ["x"]}"#);
    assert_bad_request(
        env,
        "NetworkDriver.Join",
        br#"{"NetworkID": {}, "EndpointID": 1}"#,
    );

    // Unknown methods: 404, which Docker reads as "not implemented".
    let (status, text) = env.plugin_call("NetworkDriver.Frobnicate", b"{}");
    assert_eq!(status, 404, "unknown method: {text}");
    let (status, text) = env.plugin_call("Nonsense", b"");
    assert_eq!(status, 404, "unknown method: {text}");

    // Join for an endpoint sluice never created: an error that says what is wrong.
    let join = format!(
        r#"{{"NetworkID":"{NETWORK_ID}","EndpointID":"{ENDPOINT_ID}","SandboxKey":"/var/run/docker/netns/0123456789ab","Options":{{}}}}"#
    );
    let (status, text) = env.plugin_call("NetworkDriver.Join", join.as_bytes());
    assert_ne!(
        status, 200,
        "Join for an unknown endpoint must fail: {text}"
    );
    let err = json("NetworkDriver.Join", status, &text);
    let msg = err["Err"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        msg.contains("endpoint") || msg.contains(&ENDPOINT_ID[..12]) || msg.contains("network"),
        "Join's Err should name the unknown endpoint/network: {text}"
    );

    // Deletes and Leave for unknown IDs are idempotent: 200 {}.
    for (method, body) in [
        (
            "NetworkDriver.DeleteNetwork",
            format!(r#"{{"NetworkID":"{NETWORK_ID}"}}"#),
        ),
        (
            "NetworkDriver.DeleteEndpoint",
            format!(r#"{{"NetworkID":"{NETWORK_ID}","EndpointID":"{ENDPOINT_ID}"}}"#),
        ),
        (
            "NetworkDriver.Leave",
            format!(r#"{{"NetworkID":"{NETWORK_ID}","EndpointID":"{ENDPOINT_ID}"}}"#),
        ),
    ] {
        let (status, text) = env.plugin_call(method, body.as_bytes());
        assert_eq!(
            status, 200,
            "{method} for unknown IDs should succeed: {text}"
        );
        assert_eq!(
            json(method, status, &text),
            serde_json::json!({}),
            "{method} for unknown IDs should answer {{}}"
        );
    }

    // Still serving the handshake, and nothing was lost.
    let (status, text) = env.plugin_call("Plugin.Activate", b"");
    assert_eq!(status, 200, "Activate after bad input: {text}");
    let implements = json("Plugin.Activate", status, &text)["Implements"].clone();
    assert!(
        implements.as_array().is_some_and(
            |a| a.contains(&"NetworkDriver".into()) && a.contains(&"IpamDriver".into())
        ),
        "Activate: {text}"
    );
    check_witness(env, "bad-sock-base", "sock-a", "sock-b", "sock-c");
    assert_subnet_free("10.34.5.0/24");
    env.create_network("bad-sock-new", &["--subnet", "10.34.5.0/24"]);
    env.run_container("bad-sock-new", "sock-new", &[]);
    env.assert_ping("sock-new", "10.34.5.1");
}

#[test]
fn bad_cli_input_fails_clearly_and_nothing_is_lost() {
    if docker::skip_unless_root() {
        return;
    }
    let env = env();
    let d = env.driver().to_owned();
    make_witness(env, "bad-cli-base", "10.34.2.0/24", "cli-a", "cli-b");

    // A subnet overlapping an existing sluice network.
    let err = env.docker_fails([
        "network",
        "create",
        "-d",
        &d,
        "--ipam-driver",
        &d,
        "--subnet",
        "10.34.2.128/25",
        "bad-cli-overlap",
    ]);
    eprintln!("overlapping subnet refused: {}", err.trim());
    assert!(
        err.contains("overlaps"),
        "an overlapping subnet should be refused with a message saying it overlaps: {err}"
    );
    let listed = env.docker_ok(["network", "ls", "--format", "{{.Name}}"]);
    assert!(!listed.lines().any(|l| l == "bad-cli-overlap"), "{listed}");

    // An exhausted pool: a /29 holds the gateway and 5 containers, not 6.
    assert_subnet_free("10.34.3.0/29");
    env.create_network("bad-cli-small", &["--subnet", "10.34.3.0/29"]);
    for i in 1..=5 {
        env.run_container("bad-cli-small", &format!("small-{i}"), &[]);
    }
    let err = env.docker_fails([
        "run",
        "-d",
        "--name",
        "small-6",
        "--network",
        "bad-cli-small",
        docker::IMAGE,
        "sleep",
        "3600",
    ]);
    eprintln!("6th container on a /29 refused: {}", err.trim());
    let lower = err.to_lowercase();
    assert!(
        lower.contains("address")
            && ["no free", "exhaust", "no available", "no more", "full"]
                .iter()
                .any(|w| lower.contains(w)),
        "the 6th container on a /29 should fail saying no address is free: {err}"
    );
    // Freeing one address makes room again.
    env.docker_ok(["rm", "-f", "small-6", "small-5"]);
    env.run_container("bad-cli-small", "small-7", &[]);
    env.assert_ping("small-7", "small-1");

    // --ip outside the network's subnet.
    let err = env.docker_fails([
        "run",
        "-d",
        "--name",
        "cli-outside-ip",
        "--network",
        "bad-cli-base",
        "--ip",
        "10.34.9.9",
        docker::IMAGE,
        "sleep",
        "3600",
    ]);
    eprintln!("--ip outside the subnet refused: {}", err.trim());
    assert!(
        !err.trim().is_empty(),
        "no error message for --ip outside the subnet"
    );
    // --ip already taken by a running container.
    let taken = env.container_ip("cli-a", "bad-cli-base");
    let err = env.docker_fails([
        "run",
        "-d",
        "--name",
        "cli-taken-ip",
        "--network",
        "bad-cli-base",
        "--ip",
        &taken,
        docker::IMAGE,
        "sleep",
        "3600",
    ]);
    eprintln!("taken --ip refused: {}", err.trim());
    assert!(!err.trim().is_empty(), "no error message for a taken --ip");
    // The owner of that address is unaffected.
    env.assert_ping("cli-b", &taken);

    // The daemon still serves, and nothing was lost.
    check_witness(env, "bad-cli-base", "cli-a", "cli-b", "cli-c");
    assert!(
        env.can_ping("small-1", "small-2", Duration::from_secs(15)),
        "containers on bad-cli-small stopped talking\n{}",
        env.logs_tail()
    );
    assert_subnet_free("10.34.6.0/24");
    env.create_network("bad-cli-new", &["--subnet", "10.34.6.0/24"]);
    env.run_container("bad-cli-new", "cli-new", &[]);
    env.assert_ping("cli-new", "10.34.6.1");
}
