//! A stand-in for the few Docker Engine API calls the daemon's identity resolver makes
//! (`/_ping`, `/version`, container list and inspect, an idle event stream), so that the
//! benchmark's endpoints get container names like under Docker. Without names, endpoints a
//! policy could cover stay "pending" and are dropped (sluice fails closed). The datapath and
//! the driver under test are sluice's own; only Docker's bookkeeping is stood in for.

use std::io::{Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

#[derive(Debug, Clone)]
pub(crate) struct FakeEngine {
    pub(crate) socket: PathBuf,
    containers: Arc<Mutex<Vec<Value>>>,
}

impl FakeEngine {
    pub(crate) fn start(socket: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let listener =
            UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
        let containers = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&containers);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || serve(stream, &shared));
            }
        });
        Ok(Self {
            socket: socket.to_path_buf(),
            containers,
        })
    }

    /// Registers a running container `name` whose endpoint `endpoint` on `network` has the
    /// sandbox `sandbox`.
    pub(crate) fn add(&self, name: &str, sandbox: &str, network: &str, endpoint: &str) {
        let id = format!("{:0<64}", format!("c0{}", endpoint.get(..10).unwrap_or("")));
        let inspect = json!({
            "Id": id, "Name": format!("/{name}"),
            "Config": {"Labels": {}},
            "State": {"Running": true},
            "NetworkSettings": {
                "SandboxKey": sandbox,
                "Networks": {"bench": {"NetworkID": network, "EndpointID": endpoint}},
            },
        });
        if let Ok(mut c) = self.containers.lock() {
            c.push(inspect);
        }
    }
}

fn reply(stream: &mut UnixStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(mut stream: UnixStream, containers: &Mutex<Vec<Value>>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let path = path.split('?').next().unwrap_or("").to_owned();
    let list: Vec<Value> = containers.lock().map(|c| c.clone()).unwrap_or_default();
    if path == "/_ping" {
        reply(&mut stream, "200 OK", "OK");
    } else if path == "/version" {
        reply(
            &mut stream,
            "200 OK",
            r#"{"ApiVersion":"1.41","MinAPIVersion":"1.12"}"#,
        );
    } else if path.ends_with("/containers/json") {
        let ids: Vec<Value> = list.iter().map(|c| json!({"Id": c["Id"]})).collect();
        reply(&mut stream, "200 OK", &Value::from(ids).to_string());
    } else if path.ends_with("/networks") {
        reply(&mut stream, "200 OK", "[]");
    } else if path.ends_with("/events") {
        // An event stream with no events: keep the connection open.
        let _ = stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let _ = stream.read(&mut byte);
    } else if let Some(c) = list.iter().find(|c| {
        c["Id"]
            .as_str()
            .is_some_and(|id| path.ends_with(&format!("/containers/{id}/json")))
    }) {
        reply(&mut stream, "200 OK", &c.to_string());
    } else {
        reply(
            &mut stream,
            "404 Not Found",
            r#"{"message":"No such container"}"#,
        );
    }
}
