//! Shared helpers for sluice tests: throwaway network namespaces ([`netns`]) and a private
//! Docker Engine with a sluice daemon ([`docker`]).

pub mod cluster;
pub mod docker;
pub mod managed;
pub mod netns;
pub mod outside;
