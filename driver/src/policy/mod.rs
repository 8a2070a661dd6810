//! Policy documents: parsing ([`parse_documents`]), validation, the applied set
//! ([`PolicyEngine`], persisted in the store's `policies` table) and resolution against the
//! endpoints that exist ([`PolicyEngine::resolve`] → [`ResolvedRule`]s between identities),
//! the input of the datapath's policy compiler. `docs/policy.md` is the user reference.
//!
//! Semantics in short:
//! - a policy's `selector` picks endpoints (container name glob, labels, network);
//! - a policy with an `ingress` (`egress`) section makes that direction **default-deny** for
//!   the endpoints it selects; rules then allow or deny by peer, protocol and port;
//! - **deny wins** over allow; a CIDR's `except` prefixes are simply not covered;
//! - policy is stateful: replies of an allowed flow pass by conntrack, not by rules.
//!
//! What the Driver keeps in sync (see the report in `docs/policy.md`, "Internals"): call
//! [`PolicyEngine::resolve`] after every apply/remove and every endpoint, identity, label
//! or network-name change, and hand the [`Resolution`] to the datapath.

mod document;
mod engine;
pub mod lines;
mod resolve;
mod selector;
mod subjects;
mod to_datapath;
mod validate;

pub use document::{
    Action, EgressRule, IngressRule, Peer, PolicyDoc, PortSpec, PortValue, Protocol, Selector,
    parse_documents,
};
pub use engine::{
    Applied, ApplyOutcome, MAX_POLICY_NUMBER, Plan, PolicyEngine, RuleRef, StoredPolicy, rule_id,
};
pub use resolve::{
    Direction, EndpointView, Enforcement, LABEL_OPTION_PREFIX, NetworkView, Resolution,
    ResolvedPeer, ResolvedRule, Verdict, merge_labels,
};
pub use selector::glob_match;
pub use subjects::SubjectIds;
pub use validate::{MAX_NAME_LEN, MAX_RULES_PER_DIRECTION, PortRange};

use crate::store::StoreError;

// Identities, as the datapath defines them (`sluice_common`; mirrored here until the driver
// depends on that crate — `tests::identity_constants_match_the_datapath` pins the values).
/// Wildcard peer: a rule for any peer.
pub const IDENTITY_ANY: u32 = 0;
/// An address the ipcache does not know.
pub const IDENTITY_WORLD: u32 = 2;
/// First identity of an endpoint.
pub const IDENTITY_FIRST_ENDPOINT: u32 = 256;
/// First identity of a CIDR.
pub const IDENTITY_FIRST_CIDR: u32 = 1 << 24;
/// Last identity of a CIDR (inclusive).
pub const IDENTITY_LAST_CIDR: u32 = (1 << 25) - 1;

/// Errors of the policy layer.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The input is not YAML, or not shaped like a policy document.
    #[error("{document}: {message}")]
    Parse {
        /// `policy "NAME"` or `document N`.
        document: String,
        /// The parser's message (field path and line where known).
        message: String,
    },
    /// Documents that parsed but are wrong; every problem, one per line.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// No policy of this name.
    #[error("no policy named {0:?}")]
    NotFound(String),
    /// The stored policies are inconsistent (see [`PolicyEngine::load`]).
    #[error("stored policies are inconsistent: {}", .0.join("; "))]
    Corrupt(Vec<String>),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PolicyError {
    /// True when the caller's input was at fault (HTTP 400/404) rather than sluice.
    #[must_use]
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::Parse { .. } | Self::Invalid(_) | Self::NotFound(_)
        )
    }
}

/// Parses and validates `text` without applying it: what `apply` would reject, this rejects.
///
/// # Errors
/// As [`parse_documents`] and [`PolicyEngine::plan_apply`].
pub fn check(text: &str) -> Result<Vec<PolicyDoc>, PolicyError> {
    let docs = parse_documents(text)?;
    let _plan = PolicyEngine::new().plan_apply(docs.clone())?;
    Ok(docs)
}

#[cfg(test)]
mod tests;
