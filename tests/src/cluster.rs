//! A multi-host lab on one machine for `mode=vxlan` tests: one "underlay" network namespace
//! with a bridge, N "host" namespaces attached to it (10.79.0.N/24), one etcd on the
//! underlay (10.79.0.100), one sluice daemon per host (own state dir, bpffs path, plugin and
//! admin sockets, `--docker-host none`), and "containers" as namespaces joined through the
//! plugin API the way dockerd would (RequestAddress, CreateEndpoint, Join, then move and
//! configure the interface). Everything is removed on drop; processes are ended by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The underlay of [`Lab::new`] (`/24`): hosts are `.1`, `.2`, …, etcd is `.100`.
pub const UNDERLAY: &str = "10.79.0";
/// The etcd address on the underlay of [`Lab::new`].
pub const ETCD_IP: &str = "10.79.0.100";

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Runs `program args` in the named network namespace (`nsenter --net`, so the mounts,
/// bpffs included, stay the host's).
pub fn in_ns(ns: &str, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args);
    c
}

/// TLS material for etcd and its clients, made with `openssl`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server: (PathBuf, PathBuf),
    /// Client certificate and key.
    pub client: (PathBuf, PathBuf),
}

impl Tls {
    /// Makes a CA, a server certificate for [`ETCD_IP`] and a client certificate in `dir`.
    ///
    /// # Errors
    /// `openssl` failures.
    pub fn generate(dir: &Path) -> Result<Self> {
        let p = |n: &str| dir.join(n);
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
        run(Command::new("openssl").args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sluice-test-ca",
            "-keyout",
            &s(&p("ca.key")),
            "-out",
            &s(&p("ca.pem")),
        ]))?;
        // rustls (webpki) takes X.509 v3 certificates only, the client's own included: both
        // get extensions.
        let ext = p("server.ext");
        std::fs::write(
            &ext,
            format!("subjectAltName=IP:{ETCD_IP},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        )?;
        let client_ext = p("client.ext");
        std::fs::write(&client_ext, "extendedKeyUsage=clientAuth\n")?;
        for (name, cn, extfile) in [("server", "etcd", &ext), ("client", "root", &client_ext)] {
            run(Command::new("openssl").args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &s(&p(&format!("{name}.key"))),
                "-out",
                &s(&p(&format!("{name}.csr"))),
            ]))?;
            let mut c = Command::new("openssl");
            c.args([
                "x509",
                "-req",
                "-days",
                "2",
                "-CA",
                &s(&p("ca.pem")),
                "-CAkey",
                &s(&p("ca.key")),
                "-CAcreateserial",
                "-in",
                &s(&p(&format!("{name}.csr"))),
                "-out",
                &s(&p(&format!("{name}.pem"))),
            ]);
            c.args(["-extfile", &s(extfile)]);
            run(&mut c)?;
        }
        Ok(Self {
            ca: p("ca.pem"),
            server: (p("server.pem"), p("server.key")),
            client: (p("client.pem"), p("client.key")),
        })
    }
}

/// One sluice host.
#[derive(Debug)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Underlay address.
    pub addr: String,
    /// Plugin socket.
    pub plugin: PathBuf,
    /// Admin socket.
    pub admin: PathBuf,
    /// State directory.
    pub state: PathBuf,
    /// bpffs pin directory.
    pub bpf: PathBuf,
    /// The daemon, while running.
    pub daemon: Option<Child>,
    /// Extra daemon flags.
    pub flags: Vec<String>,
    /// Whether the daemon gets `--advertise-addr <addr>` (else it waits for `DiscoverNew`).
    pub advertise: bool,
    log: PathBuf,
}

/// The lab.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    /// Working directory (sockets, state, logs).
    pub dir: tempfile::TempDir,
    /// The underlay namespace.
    pub underlay: String,
    /// The hosts.
    pub hosts: Vec<Host>,
    etcd: Option<Child>,
    containers: Vec<String>,
    counter: usize,
    /// The `--cluster` URL.
    pub url: String,
    /// etcd's address on the underlay.
    pub etcd_ip: String,
    tls: Option<Tls>,
}

/// A simulated container attached to a network.
#[derive(Debug, Clone)]
pub struct Container {
    /// Its namespace.
    pub ns: String,
    /// Host index.
    pub host: usize,
    /// Endpoint ID.
    pub endpoint: String,
    /// Address with prefix.
    pub address: String,
    /// MAC.
    pub mac: String,
}

impl Lab {
    /// Builds the underlay and `n` hosts and starts etcd (TLS when `tls` is given).
    ///
    /// # Errors
    /// Any setup step failing (what was made is removed by drop).
    pub fn new(tag: &str, n: usize, tls: Option<&Tls>) -> Result<Self> {
        Self::on_underlay(tag, n, tls, UNDERLAY)
    }

    /// [`Lab::new`] on the underlay `<net>.0/24` (`net` = three octets, e.g. `10.80.1`):
    /// hosts `<net>.1…`, etcd `<net>.100` (TLS certificates name [`ETCD_IP`] only).
    ///
    /// # Errors
    /// Any setup step failing (what was made is removed by drop).
    pub fn on_underlay(tag: &str, n: usize, tls: Option<&Tls>, net: &str) -> Result<Self> {
        sweep();
        let prefix = format!("slm{tag}{}", std::process::id());
        let dir = tempfile::tempdir()?;
        let underlay = format!("{prefix}u");
        let etcd_ip = format!("{net}.100");
        let scheme_url = format!("etcd://{etcd_ip}:2379");
        let mut lab = Self {
            prefix: prefix.clone(),
            dir,
            underlay: underlay.clone(),
            hosts: Vec::new(),
            etcd: None,
            containers: Vec::new(),
            counter: 0,
            url: scheme_url,
            etcd_ip: etcd_ip.clone(),
            tls: tls.cloned(),
        };
        ip(&["netns", "add", &underlay])?;
        run(&mut in_ns(
            &underlay,
            "ip",
            &["link", "add", "ubr", "type", "bridge"],
        ))?;
        run(&mut in_ns(
            &underlay,
            "ip",
            &["addr", "add", &format!("{etcd_ip}/24"), "dev", "ubr"],
        ))?;
        run(&mut in_ns(&underlay, "ip", &["link", "set", "ubr", "up"]))?;
        run(&mut in_ns(&underlay, "ip", &["link", "set", "lo", "up"]))?;
        for i in 1..=n {
            let ns = format!("{prefix}h{i}");
            let addr = format!("{net}.{i}");
            ip(&["netns", "add", &ns])?;
            let (a, b) = (format!("{prefix}a{i}"), format!("{prefix}b{i}"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &a, "netns", &underlay])?;
            ip(&["link", "set", &b, "netns", &ns])?;
            run(&mut in_ns(
                &underlay,
                "ip",
                &["link", "set", &a, "master", "ubr", "up"],
            ))?;
            run(&mut in_ns(&ns, "ip", &["link", "set", &b, "name", "eth0"]))?;
            run(&mut in_ns(
                &ns,
                "ip",
                &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
            ))?;
            run(&mut in_ns(&ns, "ip", &["link", "set", "eth0", "up"]))?;
            run(&mut in_ns(&ns, "ip", &["link", "set", "lo", "up"]))?;
            let hdir = lab.dir.path().join(format!("h{i}"));
            std::fs::create_dir_all(&hdir)?;
            lab.hosts.push(Host {
                ns,
                addr,
                plugin: hdir.join(format!("{prefix}h{i}.sock")),
                admin: hdir.join("admin.sock"),
                state: hdir.join("state"),
                bpf: PathBuf::from(format!("/sys/fs/bpf/sluice/{prefix}h{i}")),
                daemon: None,
                flags: Vec::new(),
                advertise: true,
                log: hdir.join("sluice.log"),
            });
        }
        lab.start_etcd(tls)?;
        Ok(lab)
    }

    fn start_etcd(&mut self, tls: Option<&Tls>) -> Result<()> {
        let data = self.dir.path().join("etcd");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}:2379", self.etcd_ip);
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let mut cmd = in_ns(
            &self.underlay,
            "etcd",
            &[
                "--name",
                "lab",
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "lab=http://127.0.0.1:2380",
            ],
        );
        if let Some(t) = tls {
            cmd.args(["--client-cert-auth", "--trusted-ca-file"])
                .arg(&t.ca);
            cmd.arg("--cert-file")
                .arg(&t.server.0)
                .arg("--key-file")
                .arg(&t.server.1);
        }
        self.etcd = Some(
            cmd.stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("starting etcd")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut probe = in_ns(
                &self.underlay,
                "etcdctl",
                &["--endpoints", &client, "endpoint", "health"],
            );
            if let Some(t) = tls {
                probe
                    .arg("--cacert")
                    .arg(&t.ca)
                    .arg("--cert")
                    .arg(&t.client.0)
                    .arg("--key")
                    .arg(&t.client.1);
            }
            if probe
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become healthy; log: {}",
                    self.log_of("etcd.log")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `etcdctl` against the lab's etcd (from the underlay).
    pub fn etcdctl(&self, args: &[&str], extra: &[String]) -> Output {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let endpoints = format!("{scheme}://{}:2379", self.etcd_ip);
        let mut c = in_ns(
            &self.underlay,
            "etcdctl",
            &[
                "--endpoints",
                &endpoints,
                "--dial-timeout",
                "5s",
                "--command-timeout",
                "10s",
            ],
        );
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca);
            c.arg("--cert")
                .arg(&t.client.0)
                .arg("--key")
                .arg(&t.client.1);
        }
        c.args(extra).args(args).env("ETCDCTL_API", "3");
        c.output().unwrap_or_else(|e| panic!("etcdctl: {e}"))
    }

    /// Keys and values under `prefix` in the lab's etcd, sorted by key.
    ///
    /// # Panics
    /// When etcdctl fails.
    #[must_use]
    pub fn etcd_get(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", "--prefix", prefix], &[]);
        assert!(
            out.status.success(),
            "etcdctl get {prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Key line, value line (empty for an empty value), for each key.
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.split('\n').collect();
        lines
            .chunks(2)
            .filter(|kv| kv.len() == 2 && !kv[0].is_empty())
            .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
            .collect()
    }

    fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// A host's daemon log.
    #[must_use]
    pub fn host_log(&self, h: usize) -> String {
        std::fs::read_to_string(&self.hosts[h].log).unwrap_or_default()
    }

    /// Starts host `h`'s daemon and waits for its sockets.
    ///
    /// # Errors
    /// The daemon exits or its sockets do not appear.
    pub fn start_daemon(&mut self, h: usize) -> Result<()> {
        let url = self.url.clone();
        let host = &mut self.hosts[h];
        let _ = std::fs::remove_file(&host.plugin);
        let _ = std::fs::remove_file(&host.admin);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)?;
        let bin = crate::docker::sluice_bin();
        let mut cmd = in_ns(&host.ns, &bin.to_string_lossy(), &[]);
        cmd.arg("--admin-socket").arg(&host.admin).arg("daemon");
        cmd.arg("--plugin-socket").arg(&host.plugin);
        cmd.arg("--state-dir").arg(&host.state);
        cmd.arg("--bpf-dir").arg(&host.bpf);
        cmd.args(["--docker-host", "none", "--cluster", &url]);
        if host.advertise {
            cmd.args(["--advertise-addr", &host.addr]);
        }
        cmd.args(["--cluster-lease-ttl", "3", "--log-level", "debug"]);
        cmd.args(&host.flags);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting sluice")?;
        host.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(host.plugin.exists() && host.admin.exists()) {
            if let Some(Ok(Some(status))) = host.daemon.as_mut().map(Child::try_wait) {
                bail!(
                    "sluice on {} exited ({status}): {}",
                    host.ns,
                    std::fs::read_to_string(&host.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("sluice on {} did not start", host.ns);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Kills host `h`'s daemon (SIGKILL: no clean shutdown, as if the host died).
    pub fn kill_daemon(&mut self, h: usize) {
        if let Some(mut c) = self.hosts[h].daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// One plugin API call on host `h`: `(HTTP ok, body)`.
    ///
    /// # Panics
    /// When curl cannot run or the body is not JSON.
    #[must_use]
    pub fn call(&self, h: usize, method: &str, body: &Value) -> (bool, Value) {
        let out = Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.hosts[h].plugin)
            .args(["-X", "POST", "-d", &body.to_string()])
            .arg(format!("http://plugin/{method}"))
            .output()
            .unwrap_or_else(|e| panic!("curl: {e}"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').unwrap_or((&text, "000"));
        let value = serde_json::from_str(json).unwrap_or_else(|_| json!({ "raw": json }));
        (code.trim() == "200", value)
    }

    /// [`Lab::call`] that must succeed.
    ///
    /// # Panics
    /// On an error reply.
    pub fn call_ok(&self, h: usize, method: &str, body: &Value) -> Value {
        let (ok, v) = self.call(h, method, body);
        assert!(ok, "{method} on host {h}: {v}");
        v
    }

    /// Creates the `mode=vxlan` network for `subnet` on host `h` as dockerd does
    /// (RequestPool, the gateway's RequestAddress, CreateNetwork); returns (network ID, pool ID).
    ///
    /// # Panics
    /// On an error reply.
    pub fn create_network(&self, h: usize, subnet: &str, options: &Value) -> (String, String) {
        let pool = self.call_ok(h, "IpamDriver.RequestPool", &json!({"AddressSpace": "LocalDefault", "Pool": subnet, "SubPool": "", "Options": {}, "V6": false}));
        let pool_id = pool["PoolID"].as_str().unwrap_or_default().to_owned();
        let gw = self.call_ok(h, "IpamDriver.RequestAddress", &json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}));
        let net_id = hex_id(&format!("{}-{h}-{subnet}", self.prefix));
        let (ok, v) = self.try_create_network(
            h,
            &net_id,
            subnet,
            gw["Address"].as_str().unwrap_or_default(),
            options,
        );
        assert!(ok, "CreateNetwork on host {h}: {v}");
        (net_id, pool_id)
    }

    /// A bare `CreateNetwork` (for error cases).
    #[must_use]
    pub fn try_create_network(
        &self,
        h: usize,
        net_id: &str,
        subnet: &str,
        gateway: &str,
        options: &Value,
    ) -> (bool, Value) {
        let mut generic = json!({"mode": "vxlan"});
        if let (Some(g), Some(o)) = (generic.as_object_mut(), options.as_object()) {
            g.extend(o.clone());
        }
        self.call(h, "NetworkDriver.CreateNetwork", &json!({
            "NetworkID": net_id,
            "Options": {"com.docker.network.generic": generic},
            "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": subnet, "Gateway": gateway, "AuxAddresses": {}}],
            "IPv6Data": []
        }))
    }

    /// RequestAddress + CreateEndpoint on host `h` (no Join); returns (endpoint ID, address, MAC).
    ///
    /// # Panics
    /// On an error reply.
    pub fn create_endpoint(
        &self,
        h: usize,
        net: &str,
        pool: &str,
        id: &str,
        labels: &[(&str, &str)],
    ) -> (String, String) {
        let addr = self.call_ok(
            h,
            "IpamDriver.RequestAddress",
            &json!({"PoolID": pool, "Address": "", "Options": null}),
        );
        let address = addr["Address"].as_str().unwrap_or_default().to_owned();
        let mut options = serde_json::Map::new();
        for (k, v) in labels {
            options.insert(format!("sluice.label.{k}"), json!(v));
        }
        options.insert("sluice.name".into(), json!(id));
        let created = self.call_ok(
            h,
            "NetworkDriver.CreateEndpoint",
            &json!({
                "NetworkID": net, "EndpointID": endpoint_id(id),
                "Interface": {"Address": address, "AddressIPv6": "", "MacAddress": ""},
                "Options": options,
            }),
        );
        let mac = created["Interface"]["MacAddress"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (address, mac)
    }

    /// A container on host `h`: an endpoint, joined, its interface moved into a fresh
    /// namespace as `eth0` with its address and default route.
    ///
    /// # Errors
    /// A failing `ip` step.
    ///
    /// # Panics
    /// On an error reply of the plugin.
    pub fn container(
        &mut self,
        h: usize,
        net: &str,
        pool: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<Container> {
        self.counter += 1;
        let ns = format!("{}c{}", self.prefix, self.counter);
        ip(&["netns", "add", &ns])?;
        self.containers.push(ns.clone());
        let (address, mac) = self.create_endpoint(h, net, pool, name, labels);
        let joined = self.call_ok(h, "NetworkDriver.Join", &json!({
            "NetworkID": net, "EndpointID": endpoint_id(name), "SandboxKey": format!("/run/netns/{ns}"), "Options": {},
        }));
        let src = joined["InterfaceName"]["SrcName"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let gw = joined["Gateway"].as_str().unwrap_or_default().to_owned();
        run(&mut in_ns(
            &self.hosts[h].ns,
            "ip",
            &["link", "set", &src, "netns", &ns],
        ))?;
        run(&mut in_ns(
            &ns,
            "ip",
            &["link", "set", &src, "name", "eth0"],
        ))?;
        run(&mut in_ns(
            &ns,
            "ip",
            &["addr", "add", &address, "dev", "eth0"],
        ))?;
        run(&mut in_ns(&ns, "ip", &["link", "set", "eth0", "up"]))?;
        run(&mut in_ns(&ns, "ip", &["link", "set", "lo", "up"]))?;
        if !gw.is_empty() {
            run(&mut in_ns(
                &ns,
                "ip",
                &["route", "add", "default", "via", &gw],
            ))?;
        }
        Ok(Container {
            ns,
            host: h,
            endpoint: endpoint_id(name),
            address,
            mac,
        })
    }

    /// `sluice <args>` against host `h`'s admin socket.
    #[must_use]
    pub fn cli(&self, h: usize, args: &[&str]) -> Output {
        Command::new(crate::docker::sluice_bin())
            .arg("--admin-socket")
            .arg(&self.hosts[h].admin)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("sluice cli: {e}"))
    }

    /// `sluice policy apply` of the YAML `doc` on host `h` (written to the lab's directory).
    ///
    /// # Panics
    /// When the CLI fails.
    pub fn apply_policy(&self, h: usize, doc: &str) {
        let file = self.dir.path().join(format!("policy-{h}.yaml"));
        std::fs::write(&file, doc).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        let applied = self.cli(h, &["policy", "apply", "-f", &file.to_string_lossy()]);
        assert!(
            applied.status.success(),
            "sluice policy apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    /// JSON of `ip -j` / `bridge -j` run in host `h`.
    #[must_use]
    pub fn json_in(&self, h: usize, program: &str, args: &[&str]) -> Value {
        let out = in_ns(&self.hosts[h].ns, program, args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

/// Removes what killed runs left: namespaces `slm<tag><pid>…` and their pin directories,
/// for PIDs that are gone.
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let pins = std::fs::read_dir("/sys/fs/bpf/sluice")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let dead = |name: &str| {
        let Some(rest) = name.strip_prefix("slm").and_then(|r| r.get(1..)) else {
            return false;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let tail = &rest[digits.len()..];
        !digits.is_empty()
            && !tail.is_empty()
            && tail[..1].chars().all(|c| "uhc".contains(c))
            && !Path::new(&format!("/proc/{digits}")).exists()
    };
    for n in names.iter().filter(|n| dead(n)) {
        let _ = Command::new("ip").args(["netns", "del", n]).output();
    }
    for p in pins.iter().filter(|n| dead(n)) {
        let _ = std::fs::remove_dir_all(Path::new("/sys/fs/bpf/sluice").join(p));
    }
}

/// One ping from `from` to `to` (one second of patience).
#[must_use]
pub fn ping(from: &Container, to: &Container) -> bool {
    let ip = to.address.split('/').next().unwrap_or_default();
    in_ns(&from.ns, "ping", &["-c1", "-W1", ip])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Waits (up to `limit`) until `check` holds; returns whether it did.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A 64-hex endpoint ID derived from a readable name.
#[must_use]
pub fn endpoint_id(name: &str) -> String {
    hex_id(name)
}

/// 64 hex digits from FNV-1a hashes of `name` (IDs whose prefixes differ, as Docker's do).
#[must_use]
pub fn hex_id(name: &str) -> String {
    (0u8..4)
        .map(|salt| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in name.bytes().chain([salt]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        })
        .collect()
}

impl Drop for Lab {
    fn drop(&mut self) {
        for h in 0..self.hosts.len() {
            if let Some(mut c) = self.hosts[h].daemon.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
        }
        for ns in self
            .containers
            .iter()
            .chain(self.hosts.iter().map(|h| &h.ns))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.underlay])
            .output();
        for h in &self.hosts {
            let _ = std::fs::remove_dir_all(&h.bpf);
        }
    }
}
