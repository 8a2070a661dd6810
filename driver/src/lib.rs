//! sluice's domain: the network and endpoint lifecycle ([`Driver`]), the IPAM allocator
//! ([`ipam`], pure), the kernel side ([`kernel`] trait, [`link`] netlink wrapper, [`bridge`]
//! mode), the embedded state ([`store`]) and start-up reconciliation.
//!
//! Nothing here knows HTTP: the plugin crate decodes Docker's requests into the types of
//! [`model`] and calls one method of [`Driver`] per protocol call.

pub mod bridge;
pub mod cluster;
pub mod datapath;
pub mod driver;
pub mod firewall;
pub mod ipam;
pub mod kernel;
pub mod link;
pub mod macvlan;
pub mod memory;
pub mod model;
pub mod names;
pub mod nat;
pub mod policy;
pub mod ports;
pub mod status;
pub mod store;
pub mod vxlan;

pub use driver::{Driver, DriverError};
pub use kernel::Kernel;
