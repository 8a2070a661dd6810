//! The sluice Docker plugin: the libnetwork remote-driver and IPAM wire protocol
//! ([`wire`]), the axum router on the plugin's Unix socket ([`server`]) and the daemon's
//! start-up and shutdown ([`daemon`]). Everything past decoding is the driver crate's.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cluster;
pub mod daemon;
pub mod engine;
pub mod observe;
pub mod privileges;
pub mod server;
pub mod swarm;
pub mod wire;
