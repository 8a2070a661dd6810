//! `sluice endpoints`, `sluice flows` (with and without `--follow`) and `sluice metrics` end to
//! end: the real binary against the admin API served on a Unix socket in this process, with a
//! flow log the test fills.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use sluice_driver::Driver;
use sluice_driver::ipam::IpamConfig;
use sluice_driver::kernel::fake::FakeKernel;
use sluice_driver::status::{DropReason, FlowRecord};
use sluice_driver::store::Store;
use sluice_plugin::admin;
use sluice_plugin::observe::FlowLog;

fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn command(socket: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.arg("--admin-socket")
        .arg(socket)
        .args(args)
        .env_remove("SLUICE_ADMIN_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn sluice(socket: &Path, args: &[&str]) -> Output {
    must(command(socket, args).output(), "running sluice")
}

fn record(seconds: u64, reason: DropReason) -> FlowRecord {
    FlowRecord {
        seq: 0,
        time_ms: 1_795_843_272_000 + seconds * 1000,
        direction: "ingress".into(),
        src: Some(must("10.251.0.3".parse(), "address")),
        src_port: 40000,
        dst: Some(must("10.251.0.2".parse(), "address")),
        dst_port: 5432,
        proto: 6,
        ifindex: 7,
        endpoint: Some("0f987eed597ecf3c9843".into()),
        container: Some("db".into()),
        reason,
        rule: (reason == DropReason::PolicyDeny).then(|| "web-to-db ingress[0]".to_owned()),
        suppressed: 0,
    }
}

#[test]
fn endpoints_flows_follow_and_metrics() {
    let state = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("sluice.sock");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let admin = Arc::new(
        Driver::open(
            FakeKernel::default(),
            Store::open(state.path()).unwrap(),
            IpamConfig::default(),
        )
        .unwrap(),
    );
    let log = Arc::new(FlowLog::default());
    log.push(record(0, DropReason::PolicyDeny));
    log.push(record(1, DropReason::DefaultDeny));
    let listener = runtime.block_on(admin::bind(&socket)).unwrap();
    let app = admin::router_with_flows(admin, log.clone());
    runtime.spawn(async move { axum::serve(listener, app).await });

    let out = sluice(&socket, &["endpoints"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ENDPOINT  CONTAINER  NETWORK  ADDRESSES  IDENTITY  FLAGS  IN ALLOWED/DROPPED  OUT ALLOWED/DROPPED\n"
    );
    let out = sluice(&socket, &["endpoints", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[]\n");

    let out = sluice(&socket, &["flows"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2026-11-28T05:21:12.000Z ingress 10.251.0.3:40000 -> 10.251.0.2:5432 tcp db (0f987eed597e) policy deny: web-to-db ingress[0]\n\
         2026-11-28T05:21:13.000Z ingress 10.251.0.3:40000 -> 10.251.0.2:5432 tcp db (0f987eed597e) default deny\n"
    );
    let out = sluice(&socket, &["flows", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["reason"], "policy_deny");
    assert_eq!(lines[0]["rule"], "web-to-db ingress[0]");
    assert_eq!(lines[1]["seq"], 2);

    let out = sluice(&socket, &["metrics"]);
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("\nsluice_drop_events_total{reason=\"default_deny\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nsluice_policies 0\n"), "{metrics}");

    // --follow: the backlog, then what happens next.
    let mut child = command(&socket, &["flows", "--follow"]).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for expected in ["policy deny", "default deny"] {
        line.clear();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains(expected), "{line}");
    }
    log.push(record(2, DropReason::Isolation));
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("2026-11-28T05:21:14.000Z ingress ") && line.ends_with(" isolation\n"),
        "{line}"
    );
    // The daemon stopping ends the stream, and the command with it.
    log.close();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
