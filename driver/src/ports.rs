//! Host-port reservations for published ports: sluice holds a bound socket for every
//! published host port, as Docker's port mapper does, so that a port already used by a host
//! process or another container fails at `docker run` with a clear error (EADDRINUSE), and
//! nothing else can take the port while the container runs. The DNAT rules (see
//! [`crate::nat`]) catch the traffic before it could reach these sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::Mutex;

use tracing::{debug, info};

use crate::kernel::KernelError;
use crate::nat::{PortBinding, PortRequest, Proto};

/// A socket holding a host port (never read: holding it open is its whole job).
#[derive(Debug)]
#[expect(dead_code, reason = "the sockets are held, not used")]
enum Held {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Nothing,
}

/// The sockets held per endpoint.
#[derive(Debug, Default)]
pub struct PortReservations {
    held: Mutex<BTreeMap<String, Vec<(PortBinding, Held)>>>,
}

/// Docker's words for a taken port, so users recognise it; any other failure (no such
/// address, a privileged port without `CAP_NET_BIND_SERVICE`) is reported as what it is.
fn taken(ip: IpAddr, port: &str, proto: Proto, error: Option<&std::io::Error>) -> KernelError {
    let message = match error {
        None => format!(
            "Bind for {ip}:{port} failed: port is already allocated (no port of the range is free)"
        ),
        Some(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            format!("Bind for {ip}:{port} failed: port is already allocated ({e})")
        }
        Some(e) => format!("Bind for {ip}:{port} failed: {e}"),
    };
    KernelError::Os {
        op: format!("publish port {port}/{proto}"),
        message,
    }
}

fn bind(proto: Proto, ip: IpAddr, port: u16) -> std::io::Result<(Held, u16)> {
    let addr = SocketAddr::new(ip, port);
    match proto {
        Proto::Tcp => {
            let l = TcpListener::bind(addr)?;
            let port = l.local_addr()?.port();
            Ok((Held::Tcp(l), port))
        }
        Proto::Udp => {
            let u = UdpSocket::bind(addr)?;
            let port = u.local_addr()?.port();
            Ok((Held::Udp(u), port))
        }
        // std has no SCTP socket: the port is not reserved (the DNAT rule still applies),
        // so it cannot be picked either.
        Proto::Sctp if port == 0 => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "sluice cannot pick a free SCTP port: give one",
        )),
        Proto::Sctp => Ok((Held::Nothing, port)),
    }
}

impl PortReservations {
    /// Reserves a host port for every request (the first free one of its range; any free
    /// port for 0) and records them under `endpoint`, replacing what it held before. All or
    /// nothing: on failure nothing new is held.
    ///
    /// # Errors
    /// [`KernelError::Os`] naming the port when it is taken (or no port of a range is free).
    pub fn reserve(
        &self,
        endpoint: &str,
        requests: &[PortRequest],
    ) -> Result<Vec<PortBinding>, KernelError> {
        // What the endpoint held is given up first: a repeated call for the same ports
        // must find them free.
        self.release(endpoint);
        let mut got: Vec<(PortBinding, Held)> = Vec::new();
        for req in requests {
            let ip = req.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let (first, last) = if req.host_port == 0 {
                (0, 0)
            } else {
                (req.host_port, req.host_port_end.max(req.host_port))
            };
            let mut result = None;
            let mut last_error = None;
            for port in first..=last {
                // A range may hold a port this same request list already took.
                if got
                    .iter()
                    .any(|(b, _)| b.proto == req.proto && b.host_port == port && port != 0)
                {
                    continue;
                }
                match bind(req.proto, ip, port) {
                    Ok(held) => {
                        result = Some(held);
                        break;
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            let Some((held, port)) = result else {
                let shown = if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                };
                return Err(taken(ip, &shown, req.proto, last_error.as_ref()));
            };
            let binding = PortBinding {
                proto: req.proto,
                host_ip: req.host_ip,
                host_port: port,
                container_port: req.container_port,
            };
            debug!(%binding, "host port reserved");
            got.push((binding, held));
        }
        let bindings: Vec<PortBinding> = got.iter().map(|(b, _)| *b).collect();
        if !bindings.is_empty() {
            info!(endpoint, ports = ?bindings.iter().map(ToString::to_string).collect::<Vec<_>>(), "host ports reserved");
            if let Ok(mut held) = self.held.lock() {
                held.insert(endpoint.to_owned(), got);
            }
        }
        Ok(bindings)
    }

    /// Closes the sockets of `endpoint`. Idempotent.
    pub fn release(&self, endpoint: &str) {
        let removed = match self.held.lock() {
            Ok(mut held) => held.remove(endpoint),
            Err(poisoned) => poisoned.into_inner().remove(endpoint),
        };
        if let Some(removed) = removed {
            debug!(endpoint, ports = removed.len(), "host ports released");
        }
    }

    /// The bindings held for `endpoint`.
    #[must_use]
    pub fn held(&self, endpoint: &str) -> Vec<PortBinding> {
        self.held
            .lock()
            .map(|h| {
                h.get(endpoint)
                    .map(|v| v.iter().map(|(b, _)| *b).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(proto: Proto, host_port: u16, end: u16) -> PortRequest {
        PortRequest {
            proto,
            container_port: 80,
            host_ip: Some("127.0.0.1".parse().unwrap()),
            host_port,
            host_port_end: end,
        }
    }

    #[test]
    fn a_taken_port_is_a_clear_error_and_nothing_is_held() {
        let squatter = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = squatter.local_addr().unwrap().port();
        let r = PortReservations::default();
        let err = r
            .reserve("ep", &[req(Proto::Udp, 0, 0), req(Proto::Tcp, port, port)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("port is already allocated"), "{err}");
        assert!(err.contains(&port.to_string()), "{err}");
        assert!(r.held("ep").is_empty(), "all or nothing");
    }

    #[test]
    fn an_address_the_host_lacks_is_not_called_a_taken_port() {
        let r = PortReservations::default();
        let mut bad = req(Proto::Tcp, 18_099, 18_099);
        // TEST-NET-1: never a local address here, so the bind fails with EADDRNOTAVAIL.
        bad.host_ip = Some("192.0.2.1".parse().unwrap());
        let err = r.reserve("ep", &[bad]).unwrap_err().to_string();
        assert!(err.contains("Bind for 192.0.2.1:18099 failed"), "{err}");
        assert!(!err.contains("already allocated"), "{err}");
    }

    #[test]
    fn zero_picks_a_port_ranges_skip_taken_ones_and_release_frees() {
        let r = PortReservations::default();
        let any = r.reserve("a", &[req(Proto::Tcp, 0, 0)]).unwrap();
        assert_ne!(any[0].host_port, 0);
        // The port just reserved is taken for others...
        let again = any[0].host_port;
        assert!(r.reserve("b", &[req(Proto::Tcp, again, again)]).is_err());
        // ...a range starting there moves on...
        let ranged = r
            .reserve("b", &[req(Proto::Tcp, again, again.saturating_add(20))])
            .unwrap();
        assert!(ranged[0].host_port > again);
        // ...and it is free again once released.
        r.release("a");
        r.reserve("c", &[req(Proto::Tcp, again, again)]).unwrap();
        // The same endpoint asking again gets its own port back.
        r.reserve("c", &[req(Proto::Tcp, again, again)]).unwrap();
        assert_eq!(r.held("c")[0].host_port, again);
    }
}
