//! `sluice policy …` end to end: the real binary against the admin API served on a Unix
//! socket in this process (the daemon's Driver over the in-memory kernel and a temporary store).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use sluice_driver::Driver;
use sluice_driver::ipam::IpamConfig;
use sluice_driver::kernel::fake::FakeKernel;
use sluice_driver::store::Store;
use sluice_plugin::admin;

/// The value of `r`, or a panic naming `what` (helpers are not `#[test]`s, where clippy
/// allows `unwrap`).
fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

fn sluice(socket: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = must(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--admin-socket")
            .arg(socket)
            .args(args)
            .env_remove("SLUICE_ADMIN_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn(),
        "starting sluice",
    );
    if let Some(mut input) = child.stdin.take()
        && let Some(text) = stdin
    {
        must(input.write_all(text.as_bytes()), "writing stdin");
    }
    must(child.wait_with_output(), "waiting for sluice")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Server {
    socket: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    runtime: tokio::runtime::Runtime,
}

fn serve() -> Server {
    let state = must(tempfile::tempdir(), "temporary directory");
    let run = must(tempfile::tempdir(), "temporary directory");
    let socket = run.path().join("sluice.sock");
    let runtime = must(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build(),
        "runtime",
    );
    let store = must(Store::open(state.path()), "store");
    let admin = Arc::new(must(
        Driver::open(FakeKernel::default(), store, IpamConfig::default())
            .map_err(|e| e.to_string()),
        "admin",
    ));
    let listener = must(runtime.block_on(admin::bind(&socket)), "binding");
    runtime.spawn(async move { axum::serve(listener, admin::router(admin)).await });
    Server {
        socket,
        _dirs: (state, run),
        runtime,
    }
}

#[test]
fn apply_ls_rm() {
    let server = serve();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("web-db.yaml");
    std::fs::write(
        &file,
        "name: web-to-db\nselector: {name: \"db-*\", labels: {role: db}}\ningress:\n  - action: allow\n    from: [{selector: {labels: {role: web}}}]\n    ports: [{protocol: tcp, port: 5432}]\n---\nname: lockdown\nselector: {network: appnet}\ningress: []\negress: []\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();

    let out = sluice(&server.socket, &["policy", "apply", "-f", file], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "policy \"web-to-db\" created\npolicy \"lockdown\" created\n"
    );
    let out = sluice(&server.socket, &["policy", "apply", "-f", file], None);
    assert_eq!(
        text(&out.stdout),
        "policy \"web-to-db\" unchanged\npolicy \"lockdown\" unchanged\n"
    );

    let out = sluice(&server.socket, &["policy", "ls"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "NAME       SELECTOR           INGRESS RULES  EGRESS RULES\n\
         lockdown   network=appnet     0 (deny all)   0 (deny all)\n\
         web-to-db  name=db-* role=db  1              -\n"
    );

    // From standard input, and an update.
    let out = sluice(
        &server.socket,
        &["policy", "apply", "-f", "-"],
        Some("name: lockdown\nselector: {network: appnet}\ningress: []\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "policy \"lockdown\" updated\n");

    let out = sluice(&server.socket, &["policy", "rm", "lockdown"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "policy \"lockdown\" removed\n");

    // Errors: the server's message, a non-zero exit, nothing on stdout.
    let out = sluice(&server.socket, &["policy", "rm", "lockdown"], None);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("no policy named \"lockdown\""),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(
        &server.socket,
        &["policy", "apply", "-f", "-"],
        Some(
            "name: a\nselector: {}\n---\nname: b\nselector: {}\negress: [{action: allow, ports: [{protocol: udp, port: \"2000-1000\"}]}]\n",
        ),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("policy \"b\": egress[0].ports[0]: port range 2000-1000 is reversed"),
        "{}",
        text(&out.stderr)
    );
    let out = sluice(&server.socket, &["policy", "ls"], None);
    assert!(
        !text(&out.stdout).contains("\na "),
        "nothing of the bad file applied"
    );

    let out = sluice(
        &server.socket,
        &["policy", "apply", "-f", "/nonexistent.yaml"],
        None,
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("reading /nonexistent.yaml"));
    drop(server.runtime);
}

#[test]
fn a_missing_daemon_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sluice.sock");
    let out = sluice(&socket, &["policy", "ls"], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!(
            "is the sluice daemon running? (socket {})",
            socket.display()
        )),
        "{}",
        text(&out.stderr)
    );
}
