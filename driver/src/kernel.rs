//! The kernel side of the driver, as a trait, so the protocol and state logic can be tested
//! without root against a fake, and the real implementation ([`crate::bridge::LinuxKernel`])
//! can be tested on its own in a throwaway network namespace.

use std::future::Future;

use ipnetwork::IpNetwork;

/// A bridge-mode network as the kernel should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Bridge name (≤ 15 bytes).
    pub name: String,
    /// MTU of the bridge, if set.
    pub mtu: Option<u32>,
    /// Gateway addresses to assign, with prefix.
    pub addresses: Vec<IpNetwork>,
    /// `--internal`: forwarding off on the bridge.
    pub internal: bool,
}

/// One endpoint's veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    /// Host end, attached to `bridge`.
    pub host: String,
    /// Container end, left in the host namespace for Docker to move.
    pub peer: String,
    /// The bridge the host end joins.
    pub bridge: String,
    /// MTU for both ends.
    pub mtu: Option<u32>,
    /// MAC of the container end.
    pub peer_mac: [u8; 6],
}

/// Errors from the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A netlink request failed.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done, e.g. `create bridge slbr123`.
        op: String,
        /// The underlying error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A file (sysctl) or command failed.
    #[error("{op}: {message}")]
    Os {
        /// What was being done.
        op: String,
        /// Why it failed.
        message: String,
    },
    /// Several teardown steps failed; all were attempted.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Many(Vec<KernelError>),
}

/// What the driver needs from the kernel. Every method is idempotent: creating what exists
/// adopts and reconfigures it, deleting what is gone succeeds. Creation rolls back what it
/// made when a later step fails.
pub trait Kernel: Send + Sync + 'static {
    /// Creates (or adopts) the bridge, sets MTU, addresses, forwarding and brings it up.
    /// Also lets traffic between the bridge's ports through the host firewall.
    fn ensure_bridge(
        &self,
        spec: &BridgeSpec,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes the bridge and its firewall rule. Idempotent.
    fn delete_bridge(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates (or adopts) the veth pair, host end on the bridge and up, peer with its MAC.
    fn ensure_veth(&self, spec: &VethSpec) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes a link by name (deleting one veth end removes both). Idempotent.
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Names of all links in the host namespace that sluice could have created
    /// ([`crate::names::is_sluice_link`]).
    fn sluice_links(&self) -> impl Future<Output = Result<Vec<String>, KernelError>> + Send;
}

/// An in-memory [`Kernel`] for tests of the protocol and state logic without root. It
/// records the links that exist and can be told to fail the next operation.
#[cfg(any(test, feature = "fake-kernel"))]
pub mod fake {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::{BridgeSpec, Kernel, KernelError, VethSpec};

    /// A link the fake kernel holds.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum FakeLink {
        /// A bridge.
        Bridge(BridgeSpec),
        /// The host end of a veth pair.
        VethHost(VethSpec),
        /// The container end of a veth pair.
        VethPeer(String),
    }

    /// The fake.
    #[derive(Debug, Default)]
    pub struct FakeKernel {
        links: Mutex<BTreeMap<String, FakeLink>>,
        fail_next: Mutex<Option<String>>,
    }

    impl FakeKernel {
        /// Makes the next operation fail with `message`.
        pub fn fail_next(&self, message: &str) {
            if let Ok(mut f) = self.fail_next.lock() {
                *f = Some(message.to_owned());
            }
        }

        /// The links that exist now.
        #[must_use]
        pub fn links(&self) -> BTreeMap<String, FakeLink> {
            self.links.lock().map(|l| l.clone()).unwrap_or_default()
        }

        /// Adds a link behind sluice's back (a leftover from a crash, say).
        pub fn insert(&self, name: &str, link: FakeLink) {
            if let Ok(mut l) = self.links.lock() {
                l.insert(name.to_owned(), link);
            }
        }

        fn check(&self, op: &str) -> Result<(), KernelError> {
            let failure = self.fail_next.lock().ok().and_then(|mut f| f.take());
            match failure {
                Some(message) => Err(KernelError::Os {
                    op: op.to_owned(),
                    message,
                }),
                None => Ok(()),
            }
        }

        fn with_links<T>(&self, f: impl FnOnce(&mut BTreeMap<String, FakeLink>) -> T) -> T {
            match self.links.lock() {
                Ok(mut l) => f(&mut l),
                Err(poisoned) => f(&mut poisoned.into_inner()),
            }
        }
    }

    impl Kernel for FakeKernel {
        async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<(), KernelError> {
            self.check("ensure_bridge")?;
            self.with_links(|l| l.insert(spec.name.clone(), FakeLink::Bridge(spec.clone())));
            Ok(())
        }

        async fn delete_bridge(&self, name: &str) -> Result<(), KernelError> {
            self.check("delete_bridge")?;
            self.with_links(|l| l.remove(name));
            Ok(())
        }

        async fn ensure_veth(&self, spec: &VethSpec) -> Result<(), KernelError> {
            self.check("ensure_veth")?;
            self.with_links(|l| {
                if !l.contains_key(&spec.bridge) {
                    return Err(KernelError::Os {
                        op: format!("attach {} to {}", spec.host, spec.bridge),
                        message: "no such bridge".into(),
                    });
                }
                l.insert(spec.host.clone(), FakeLink::VethHost(spec.clone()));
                l.insert(spec.peer.clone(), FakeLink::VethPeer(spec.host.clone()));
                Ok(())
            })
        }

        async fn delete_link(&self, name: &str) -> Result<(), KernelError> {
            self.check("delete_link")?;
            self.with_links(|l| {
                if let Some(FakeLink::VethHost(spec)) = l.remove(name) {
                    l.remove(&spec.peer);
                }
                l.retain(|_, v| !matches!(v, FakeLink::VethPeer(host) if host == name));
            });
            Ok(())
        }

        async fn sluice_links(&self) -> Result<Vec<String>, KernelError> {
            self.check("sluice_links")?;
            Ok(self.with_links(|l| {
                l.keys()
                    .filter(|n| crate::names::is_sluice_link(n))
                    .cloned()
                    .collect()
            }))
        }
    }
}
