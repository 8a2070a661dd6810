//! An "outside host" for north-south tests: a network namespace joined to the host by a veth
//! pair, with addresses of the test's choosing (`10.77.<n>.0/30`: the host end `.1`, the
//! outside end `.2`), and TCP / UDP services in it that answer each client with the source
//! address they saw. Nothing is ever routed beyond this machine.
//!
//! The services are threads of the test process that entered the namespace (`setns` affects
//! only the calling thread); they stop, and the namespace and the veth go, on drop.

use std::fs::File;
use std::io::{ErrorKind, Write as _};
use std::net::{TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// Prefix of the namespaces this module creates (`sle2eo-<pid>-<n>`).
const NS_PREFIX: &str = "sle2eo-";

/// The outside host.
#[derive(Debug)]
pub struct Outside {
    ns: String,
    host_if: String,
    /// The host's address on the link (`10.77.<n>.1`).
    pub host_ip: String,
    /// The outside host's address (`10.77.<n>.2`).
    pub ip: String,
    /// The link's prefix (`10.77.<n>.0/30`).
    pub cidr: String,
    /// The host's IPv6 address on the link (`fd77:<n>::1`).
    pub host_ip6: String,
    /// The outside host's IPv6 address (`fd77:<n>::2`).
    pub ip6: String,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Deletes the namespaces of test processes that died without cleaning up.
fn sweep() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("sluice tests: removing netns {name} of dead test process {pid}");
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

impl Outside {
    /// Creates the namespace and the link for `10.77.<n>.0/30`. `n` must be unique among the
    /// tests that run at the same time.
    ///
    /// # Errors
    /// When `ip` refuses (not root, name taken).
    pub fn new(n: u8) -> Result<Self> {
        sweep();
        let pid = std::process::id();
        let ns = format!("{NS_PREFIX}{pid}-{n}");
        // IFNAMSIZ: at most 15 bytes.
        let host_if = format!("nso{n}p{}", pid % 1_000_000);
        let peer = format!("nsi{n}p{}", pid % 1_000_000);
        let outside = Self {
            ns: ns.clone(),
            host_if: host_if.clone(),
            host_ip: format!("10.77.{n}.1"),
            ip: format!("10.77.{n}.2"),
            cidr: format!("10.77.{n}.0/30"),
            host_ip6: format!("fd77:{n}::1"),
            ip6: format!("fd77:{n}::2"),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        ip(&["netns", "add", &ns])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ])?;
        ip(&["link", "set", &peer, "netns", &ns])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", outside.host_ip),
            "dev",
            &host_if,
        ])?;
        // nodad: usable at once, no duplicate address detection to wait for.
        ip(&[
            "addr",
            "add",
            &format!("{}/64", outside.host_ip6),
            "dev",
            &host_if,
            "nodad",
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["-n", ns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&["addr", "add", &format!("{}/30", outside.ip), "dev", &peer])?;
        in_ns(&[
            "addr",
            "add",
            &format!("{}/64", outside.ip6),
            "dev",
            &peer,
            "nodad",
        ])?;
        in_ns(&["link", "set", &peer, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(outside)
    }

    /// The namespace's name (for `ip netns exec`).
    #[must_use]
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host end of the link.
    #[must_use]
    pub fn host_interface(&self) -> &str {
        &self.host_if
    }

    /// Runs `program args…` inside the outside namespace (`ip netns exec`).
    ///
    /// # Panics
    /// When it cannot be started.
    #[must_use]
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {} {program}: {e}", self.ns))
    }

    /// `ip route add CIDR via <host end>` in the outside namespace (for traffic to container
    /// addresses when they are not masqueraded).
    ///
    /// # Errors
    /// When `ip` refuses.
    pub fn route_to(&self, cidr: &str) -> Result<()> {
        let via = if cidr.contains(':') {
            &self.host_ip6
        } else {
            &self.host_ip
        };
        ip(&["-n", &self.ns, "route", "replace", cidr, "via", via])
    }

    /// Runs `f` on a new thread inside the namespace until the outside host drops.
    fn spawn_in_ns<F>(&mut self, f: F) -> Result<()>
    where
        F: FnOnce(&AtomicBool) + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.ns);
        let ns_file = File::open(&path).with_context(|| format!("open {path}"))?;
        let stop = self.stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            if let Err(e) = nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET) {
                let _ = ready_tx.send(Err(format!("setns: {e}")));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            f(&stop);
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {
                self.threads.push(handle);
                Ok(())
            }
            Ok(Err(e)) => bail!("{e}"),
            Err(e) => bail!("service thread died: {e}"),
        }
    }

    /// Runs `f` on a short-lived thread inside the namespace and returns its result.
    ///
    /// # Errors
    /// When the namespace cannot be entered or `f` panics.
    pub fn run_in_ns<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = format!("/run/netns/{}", self.ns);
        let ns_file = File::open(&path).with_context(|| format!("open {path}"))?;
        std::thread::spawn(move || {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| anyhow::anyhow!("setns: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.ns))?
    }

    /// `GET http://addr/path` from inside the outside namespace (see [`http_get`]).
    #[must_use]
    pub fn http_get(&self, addr: &str, path: &str) -> Option<String> {
        let (addr, path) = (addr.to_owned(), path.to_owned());
        self.run_in_ns(move || http_get(&addr, &path))
            .ok()
            .flatten()
    }

    /// A TCP service on `<outside ip>:port` that writes the client's address and a newline,
    /// then closes.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub fn serve_tcp(&mut self, port: u16) -> Result<()> {
        self.serve_tcp_on(format!("{}:{port}", self.ip))
    }

    /// [`Outside::serve_tcp`] on the outside host's IPv6 address.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub fn serve_tcp6(&mut self, port: u16) -> Result<()> {
        self.serve_tcp_on(format!("[{}]:{port}", self.ip6))
    }

    fn serve_tcp_on(&mut self, addr: String) -> Result<()> {
        let port = addr.rsplit(':').next().unwrap_or_default().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn_in_ns(move |stop| {
            let listener = match TcpListener::bind(&addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, peer)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = writeln!(stream, "{}", peer.ip());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        rx.recv()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("bind tcp {port}: {e}"))
    }

    /// A UDP service on `<outside ip>:port` that answers each TFTP read request with a file
    /// holding the sender's address and a newline, from the same port (so conntrack maps the
    /// answer back through NAT). TFTP because the busybox of the test image has the `tftp`
    /// applet but no UDP mode in `nc`: `tftp -g -r ip -l /dev/stdout IP PORT`.
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub fn serve_udp(&mut self, port: u16) -> Result<()> {
        let addr = format!("{}:{port}", self.ip);
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn_in_ns(move |stop| {
            let socket = match UdpSocket::bind(&addr).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            }) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::SeqCst) {
                // Opcode 1: read request. The answer: DATA (3), block 1, under 512 bytes,
                // so it is the last; the client's ACK is ignored.
                if let Ok((n, peer)) = socket.recv_from(&mut buf)
                    && n >= 2
                    && buf[..2] == [0, 1]
                {
                    let mut data = vec![0, 3, 0, 1];
                    data.extend_from_slice(format!("{}\n", peer.ip()).as_bytes());
                    let _ = socket.send_to(&data, peer);
                }
            }
        })?;
        rx.recv()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map_err(|e| anyhow::anyhow!("bind udp {port}: {e}"))
    }
}

/// A minimal HTTP/1.0 `GET http://addr/path` (`addr` is `ip:port`) from the calling
/// thread's namespace: the body of a 200 answer, trimmed; `None` on any failure (refused,
/// timed out after 3 s, another status). The host's static busybox `wget` crashes resolving,
/// and curl is not always installed.
#[must_use]
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read as _;
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    // A CGI's own headers may end with a bare "\n\n".
    let (head, body) = text
        .split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))?;
    head.lines()
        .next()
        .is_some_and(|status| status.contains(" 200 "))
        .then(|| body.trim().to_owned())
}

impl Drop for Outside {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = ip(&["netns", "del", &self.ns]);
        // The pair dies with the namespace; in case it did not (a process still inside):
        let _ = ip(&["link", "del", &self.host_if]);
    }
}
