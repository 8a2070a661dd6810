//! The [`PolicyEngine`]: the set of applied policies, their persistence as store
//! [`Change`]s, rule-ID and CIDR-identity allocation, and resolution against endpoints.
//!
//! Changes go in two steps so that the owner can do its own work in between (program the
//! datapath, write the store in its own transaction): [`PolicyEngine::plan_apply`] /
//! [`PolicyEngine::plan_remove`] validate and compute the next state without touching
//! anything; [`PolicyEngine::commit`] adopts it. [`PolicyEngine::apply`] and
//! [`PolicyEngine::remove`] do both around one [`Store::apply`].

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher, RandomState};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::document::{PolicyDoc, Protocol, Selector};
use super::resolve::{
    Direction, EndpointView, Enforcement, NetworkView, Resolution, ResolvedPeer, ResolvedRule,
    cidr_endpoints,
};
use super::selector::{BoundSelector, NetworkIndex};
use super::subjects::SubjectIds;
use super::validate::{
    CompiledPeer, CompiledPolicy, CompiledRule, PortMatch, cidr_pieces, compile,
};
use super::{IDENTITY_FIRST_CIDR, IDENTITY_LAST_CIDR, PolicyError};
use crate::store::{Change, Store};

/// Bits of a rule ID that hold the rule index.
const RULE_INDEX_BITS: u32 = 11;
/// Largest policy number: rule IDs are `number << 12 | direction << 11 | index`.
pub const MAX_POLICY_NUMBER: u32 = (1 << 20) - 1;

/// A policy as the store keeps it (table `policies`, key = name, value = this as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// The document as applied.
    pub doc: PolicyDoc,
    /// Stable number of the policy (1..=[`MAX_POLICY_NUMBER`]); kept when the policy is
    /// replaced, so its rule IDs stay the same.
    pub number: u32,
    /// Identity of every CIDR the document mentions (stored with the canonical text as key).
    /// A CIDR mentioned by several policies has the same identity in each.
    #[serde(default)]
    pub cidr_identities: BTreeMap<IpNetwork, u32>,
}

/// Where a rule ID points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    /// Policy name.
    pub policy: String,
    /// Direction.
    pub direction: Direction,
    /// Index in the direction's list.
    pub index: usize,
}

impl std::fmt::Display for RuleRef {
    /// `web-to-db ingress[0]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// The rule ID of rule `index` of `direction` in the policy numbered `number`. Never 0.
#[must_use]
pub fn rule_id(number: u32, direction: Direction, index: usize) -> u32 {
    let dir = match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "validation keeps index below 2^11"
    )]
    let index = index as u32 & ((1 << RULE_INDEX_BITS) - 1);
    (number << (RULE_INDEX_BITS + 1)) | (dir << RULE_INDEX_BITS) | index
}

/// What applying one document did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// A new policy.
    Created,
    /// Replaced a policy of the same name.
    Updated,
    /// Identical to the policy already applied.
    Unchanged,
}

/// One document of an apply, and what happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Policy name.
    pub name: String,
    /// Created, updated or unchanged.
    pub outcome: ApplyOutcome,
}

/// A validated change, not yet adopted: see [`PolicyEngine::plan_apply`]. It holds only
/// what changes (not a copy of the engine: with 100k CIDR peers that copy was the apply's
/// largest transient allocation).
#[derive(Debug, Clone)]
#[must_use = "a plan does nothing until committed"]
pub struct Plan {
    /// New and replaced policies.
    put: Vec<(String, Entry)>,
    /// A removed policy.
    remove: Option<String>,
    /// CIDR identities this plan hands out.
    new_cidrs: BTreeMap<IpNetwork, u32>,
    changes: Vec<Change>,
    applied: Vec<Applied>,
}

impl Plan {
    /// The store changes to write (in the owner's transaction).
    #[must_use]
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Per document, what the apply does (empty for a remove).
    #[must_use]
    pub fn applied(&self) -> &[Applied] {
        &self.applied
    }
}

/// One applied policy (its name is the key in [`PolicyEngine`]'s map). The document itself
/// is not kept: the store has it (`sluice policy get/ls` read it there), and a 40k-peer
/// document is 1 MB even as JSON text. Resolution works on `selector` and `compiled`
/// alone; `digest` tells an unchanged document on apply.
#[derive(Debug, Clone)]
struct Entry {
    number: u32,
    digest: Digest,
    selector: Selector,
    compiled: CompiledPolicy,
}

impl Entry {
    fn new(
        doc: &PolicyDoc,
        number: u32,
        compiled: CompiledPolicy,
        keys: &DigestKeys,
    ) -> Result<Self, PolicyError> {
        Ok(Self {
            number,
            digest: keys.digest(doc)?,
            selector: doc.selector.clone(),
            compiled,
        })
    }
}

/// 128 bits of keyed SipHash over a document's JSON encoding (what the store keeps).
type Digest = (u64, u64);

/// The two random SipHash keys of one engine's [`Digest`]s: documents that differ have the
/// same digest with probability 2^-128, whatever their text (nobody can know the keys).
#[derive(Debug, Clone, Default)]
struct DigestKeys(RandomState, RandomState);

impl DigestKeys {
    fn digest(&self, doc: &PolicyDoc) -> Result<Digest, PolicyError> {
        let mut w = DigestWriter(self.0.build_hasher(), self.1.build_hasher());
        // Streamed: no copy of the text.
        serde_json::to_writer(&mut w, doc).map_err(|e| {
            PolicyError::Invalid(vec![format!("policy {:?}: cannot encode: {e}", doc.name)])
        })?;
        Ok((w.0.finish(), w.1.finish()))
    }
}

/// Feeds what is written to two hashers.
struct DigestWriter<H>(H, H);

impl<H: Hasher> std::io::Write for DigestWriter<H> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        self.1.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// CIDR → identity as one sorted vector. A single allocation however many CIDRs: the
/// B-tree it replaces allocated 100k-CIDR policies' entries in thousands of small nodes
/// during the apply, scattered among the apply's freed memory, whose pages they then kept.
#[derive(Debug, Clone, Default)]
struct CidrTable(Vec<(IpNetwork, u32)>);

impl CidrTable {
    fn get(&self, net: &IpNetwork) -> Option<&u32> {
        let i = self.0.binary_search_by(|(n, _)| n.cmp(net)).ok()?;
        self.0.get(i).map(|(_, id)| id)
    }

    fn iter(&self) -> impl Iterator<Item = (IpNetwork, u32)> + '_ {
        self.0.iter().copied()
    }

    /// Adds CIDRs the table does not hold yet.
    fn extend(&mut self, new: impl IntoIterator<Item = (IpNetwork, u32)>) {
        self.0.extend(new);
        self.0.sort_by_key(|(n, _)| *n);
        self.0.dedup_by_key(|(n, _)| *n);
        self.0.shrink_to_fit();
    }

    fn retain(&mut self, keep: impl FnMut(&(IpNetwork, u32)) -> bool) {
        self.0.retain(keep);
        self.0.shrink_to_fit();
    }
}

/// The applied policies. Plain data: the owner (the Driver) serialises access.
#[derive(Debug, Clone, Default)]
pub struct PolicyEngine {
    policies: BTreeMap<String, Entry>,
    /// Union of the policies' CIDR identities.
    cidrs: CidrTable,
    digest_keys: DigestKeys,
}

impl PolicyEngine {
    /// No policies.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine for what the store holds ([`crate::store::Snapshot::policies`]).
    ///
    /// # Errors
    /// A stored policy that no longer validates, or inconsistent numbers or identities.
    /// This is deliberately fatal: starting without a policy would silently open traffic.
    pub fn load(stored: Vec<StoredPolicy>) -> Result<Self, PolicyError> {
        let mut engine = Self::default();
        let mut cidrs = BTreeMap::new();
        let mut numbers = BTreeSet::new();
        let mut problems = Vec::new();
        for s in stored {
            let name = s.doc.name.clone();
            let compiled = match compile(&s.doc) {
                Ok(c) => c,
                Err(errors) => {
                    problems.extend(errors.into_iter().map(|e| format!("stored {e}")));
                    continue;
                }
            };
            if s.number == 0 || s.number > MAX_POLICY_NUMBER || !numbers.insert(s.number) {
                problems.push(format!(
                    "stored policy {name:?}: number {} is invalid or used twice",
                    s.number
                ));
            }
            for net in &compiled.cidrs() {
                match s.cidr_identities.get(net) {
                    Some(id) if (IDENTITY_FIRST_CIDR..=IDENTITY_LAST_CIDR).contains(id) => {
                        match cidrs.insert(*net, *id) {
                            Some(other) if other != *id => problems.push(format!(
                                "stored policy {name:?}: CIDR {net} has identity {id}, another policy has {other}"
                            )),
                            _ => {}
                        }
                    }
                    _ => problems.push(format!(
                        "stored policy {name:?}: CIDR {net} has no valid identity"
                    )),
                }
            }
            let entry = Entry::new(&s.doc, s.number, compiled, &engine.digest_keys)?;
            engine.policies.insert(name, entry);
        }
        let mut seen = BTreeMap::new();
        for (net, id) in &cidrs {
            if let Some(other) = seen.insert(*id, *net) {
                problems.push(format!(
                    "stored policies: identity {id} is used by {other} and {net}"
                ));
            }
        }
        engine.cidrs.extend(cidrs);
        if problems.is_empty() {
            Ok(engine)
        } else {
            Err(PolicyError::Corrupt(problems))
        }
    }

    /// Validates `docs` (all of them, before anything changes) and plans applying them: a
    /// document replaces the policy of the same name.
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] with every problem of every document, or when two documents
    /// share a name, or when numbers run out.
    pub fn plan_apply(&self, docs: Vec<PolicyDoc>) -> Result<Plan, PolicyError> {
        let mut errors = Vec::new();
        let mut compiled = Vec::new();
        let mut names = BTreeSet::new();
        for mut doc in docs {
            if !names.insert(doc.name.clone()) {
                errors.push(format!(
                    "policy {:?}: appears more than once in this input",
                    doc.name
                ));
                continue;
            }
            match compile(&doc) {
                Ok(c) => {
                    // Field positions only serve validation errors; a 100k-entry document
                    // has 200k of them.
                    doc.source = super::lines::SourceLines::default();
                    compiled.push((doc, c));
                }
                Err(e) => errors.extend(e),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyError::Invalid(errors));
        }
        let mut put = Vec::new();
        let mut new_cidrs = BTreeMap::new();
        let mut changes = Vec::new();
        let mut applied = Vec::new();
        let mut used_numbers: BTreeSet<u32> = self.policies.values().map(|e| e.number).collect();
        // Identities in use now or handed out by this plan: never reused within a plan.
        let mut used_ids: BTreeSet<u32> = self.cidrs.iter().map(|(_, id)| id).collect();
        for (doc, c) in compiled {
            let existing = self.policies.get(&doc.name);
            let number = existing.map_or(0, |e| e.number);
            let entry = Entry::new(&doc, number, c, &self.digest_keys)?;
            if existing.is_some_and(|e| e.digest == entry.digest) {
                applied.push(Applied {
                    name: doc.name,
                    outcome: ApplyOutcome::Unchanged,
                });
                continue;
            }
            let number = match existing {
                Some(e) => e.number,
                None => allocate(&used_numbers, 1, MAX_POLICY_NUMBER).ok_or_else(|| {
                    PolicyError::Invalid(vec![format!(
                        "policy {:?}: too many policies (at most {MAX_POLICY_NUMBER})",
                        doc.name
                    )])
                })?,
            };
            used_numbers.insert(number);
            let mut cidr_identities = BTreeMap::new();
            for net in entry.compiled.cidrs() {
                let id = match self.cidrs.get(&net).or_else(|| new_cidrs.get(&net)) {
                    Some(id) => *id,
                    None => {
                        let id = allocate(&used_ids, IDENTITY_FIRST_CIDR, IDENTITY_LAST_CIDR)
                            .ok_or_else(|| {
                                PolicyError::Invalid(vec![format!(
                                    "policy {:?}: too many distinct CIDRs across all policies",
                                    doc.name
                                )])
                            })?;
                        used_ids.insert(id);
                        new_cidrs.insert(net, id);
                        id
                    }
                };
                cidr_identities.insert(net, id);
            }
            applied.push(Applied {
                name: doc.name.clone(),
                outcome: if existing.is_some() {
                    ApplyOutcome::Updated
                } else {
                    ApplyOutcome::Created
                },
            });
            put.push((doc.name.clone(), Entry { number, ..entry }));
            changes.push(Change::PutPolicy(StoredPolicy {
                doc,
                number,
                cidr_identities,
            }));
        }
        Ok(Plan {
            put,
            remove: None,
            new_cidrs,
            changes,
            applied,
        })
    }

    /// Plans removing the policy `name`.
    ///
    /// # Errors
    /// [`PolicyError::NotFound`].
    pub fn plan_remove(&self, name: &str) -> Result<Plan, PolicyError> {
        if !self.policies.contains_key(name) {
            return Err(PolicyError::NotFound(name.to_owned()));
        }
        Ok(Plan {
            put: Vec::new(),
            remove: Some(name.to_owned()),
            new_cidrs: BTreeMap::new(),
            changes: vec![Change::DeletePolicy(name.to_owned())],
            applied: Vec::new(),
        })
    }

    /// Adopts a plan made from this engine (after its changes were written).
    pub fn commit(&mut self, plan: Plan) -> Vec<Applied> {
        let mut shrinks = false;
        if let Some(name) = &plan.remove {
            shrinks |= self.policies.remove(name).is_some();
        }
        for (name, entry) in plan.put {
            shrinks |= self.policies.insert(name, entry).is_some();
        }
        self.cidrs.extend(plan.new_cidrs);
        if shrinks {
            // A removed or replaced policy may have been the last to mention a CIDR.
            let mentioned: BTreeSet<IpNetwork> = self
                .policies
                .values()
                .flat_map(|e| e.compiled.cidr_pieces())
                .collect();
            self.cidrs.retain(|(net, _)| mentioned.contains(net));
        }
        plan.applied
    }

    /// Validates, persists in one store transaction and adopts `docs`: all or nothing.
    ///
    /// # Errors
    /// Validation errors (nothing changed) and store failures (nothing changed).
    pub fn apply(
        &mut self,
        store: &Store,
        docs: Vec<PolicyDoc>,
    ) -> Result<Vec<Applied>, PolicyError> {
        let plan = self.plan_apply(docs)?;
        store.apply(plan.changes())?;
        Ok(self.commit(plan))
    }

    /// Removes the policy `name` from the store and the engine.
    ///
    /// # Errors
    /// [`PolicyError::NotFound`] and store failures (nothing changed).
    pub fn remove(&mut self, store: &Store, name: &str) -> Result<(), PolicyError> {
        let plan = self.plan_remove(name)?;
        store.apply(plan.changes())?;
        self.commit(plan);
        Ok(())
    }

    /// The applied policies' names and numbers, by name. (Their documents are in the store:
    /// see [`Entry`].)
    pub fn numbers(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.policies
            .iter()
            .map(|(name, e)| (name.as_str(), e.number))
    }

    /// The number of policy `name`.
    #[must_use]
    pub fn number(&self, name: &str) -> Option<u32> {
        self.policies.get(name).map(|e| e.number)
    }

    /// The identities of the CIDRs policy `name` mentions (as the store keeps them).
    #[must_use]
    pub fn cidr_identities_of(&self, name: &str) -> Option<BTreeMap<IpNetwork, u32>> {
        let e = self.policies.get(name)?;
        Some(
            e.compiled
                .cidr_pieces()
                .filter_map(|net| self.cidrs.get(&net).map(|id| (net, *id)))
                .collect(),
        )
    }

    /// Number of policies.
    #[must_use]
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True without policies.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Every CIDR the policies mention, with its identity.
    pub fn cidr_identities(&self) -> impl Iterator<Item = (IpNetwork, u32)> + '_ {
        self.cidrs.iter()
    }

    /// Which policy rule a rule ID (from a drop event) names.
    #[must_use]
    pub fn rule_ref(&self, id: u32) -> Option<RuleRef> {
        let number = id >> (RULE_INDEX_BITS + 1);
        let direction = if id & (1 << RULE_INDEX_BITS) == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let index = (id & ((1 << RULE_INDEX_BITS) - 1)) as usize;
        let (name, entry) = self.policies.iter().find(|(_, e)| e.number == number)?;
        let count = match direction {
            Direction::Ingress => entry.compiled.ingress.as_ref(),
            Direction::Egress => entry.compiled.egress.as_ref(),
        }
        .map_or(0, Vec::len);
        (index < count).then(|| RuleRef {
            policy: name.clone(),
            direction,
            index,
        })
    }

    /// Enforced directions of one endpoint, without resolving everything.
    #[must_use]
    pub fn enforced(&self, endpoint: &EndpointView, networks: &[NetworkView]) -> Enforcement {
        self.selection(endpoint, networks).1
    }

    /// The numbers of the policies selecting one endpoint (sorted: the set its subject
    /// interns, see [`SubjectIds`]) and its enforced directions, without resolving everything.
    #[must_use]
    pub fn selection(
        &self,
        endpoint: &EndpointView,
        networks: &[NetworkView],
    ) -> (Vec<u32>, Enforcement) {
        let index = NetworkIndex::new(networks, std::slice::from_ref(endpoint));
        let mut warnings = Vec::new();
        let mut set = Vec::new();
        let mut out = Enforcement::default();
        for e in self.policies.values() {
            let sel = BoundSelector::bind(&e.selector, &index, &mut warnings, &|| String::new());
            if sel.matches(endpoint) {
                out.ingress |= e.compiled.ingress.is_some();
                out.egress |= e.compiled.egress.is_some();
                set.push(e.number);
            }
        }
        set.sort_unstable();
        (set, out)
    }

    /// The peers of every rule of `entry`.
    fn peers(entry: &Entry) -> impl Iterator<Item = &CompiledPeer> {
        [&entry.compiled.ingress, &entry.compiled.egress]
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|rule| rule.peers.as_ref())
            .flatten()
    }

    /// The peer selectors of every rule of `entry`.
    fn peer_selectors(entry: &Entry) -> impl Iterator<Item = &Selector> {
        Self::peers(entry).filter_map(|peer| match peer {
            CompiledPeer::Selector(s) => Some(&**s),
            CompiledPeer::Cidr { .. } => None,
        })
    }

    /// Every subject and peer selector of every policy.
    fn selectors(&self) -> impl Iterator<Item = &Selector> {
        self.policies
            .values()
            .flat_map(|e| std::iter::once(&e.selector).chain(Self::peer_selectors(e)))
    }

    /// Whether some subject or peer selector of some policy matches `endpoint` (`networks`:
    /// every network; the index is then the one [`PolicyEngine::resolve`] builds). When
    /// neither an endpoint's old nor its new identity matches, a change of its name or labels
    /// alters no rule, subject or enforced direction: the driver then skips the resolution.
    #[must_use]
    pub fn could_select(&self, endpoint: &EndpointView, networks: &[NetworkView]) -> bool {
        Self::matching(self.selectors(), endpoint, networks)
    }

    /// Whether every peer selector matches both `old` and `new` (two views of one endpoint:
    /// same identity and network, its name or labels changed) or neither. Then the change
    /// alters no rule's peers: a rule names the endpoint by its identity, which both share.
    /// (A selector such as `{}` matches an endpoint whatever its name: learning the name of
    /// each new container then costs no resolution of a large policy.)
    #[must_use]
    pub fn same_peer_matches(
        &self,
        old: &EndpointView,
        new: &EndpointView,
        networks: &[NetworkView],
    ) -> bool {
        // Both views are on one network.
        let index = NetworkIndex::new(networks, std::slice::from_ref(old));
        // Warnings are the full resolution's business.
        self.policies
            .values()
            .flat_map(Self::peer_selectors)
            .all(|s| {
                let bound = BoundSelector::bind(s, &index, &mut Vec::new(), &String::new);
                bound.matches(old) == bound.matches(new)
            })
    }

    fn matching<'a>(
        mut selectors: impl Iterator<Item = &'a Selector>,
        endpoint: &EndpointView,
        networks: &[NetworkView],
    ) -> bool {
        let index = NetworkIndex::new(networks, std::slice::from_ref(endpoint));
        // Warnings are the full resolution's business.
        selectors.any(|s| {
            BoundSelector::bind(s, &index, &mut Vec::new(), &String::new).matches(endpoint)
        })
    }

    /// Whether some selector's network condition covers `endpoint`'s network: a nameless
    /// endpoint there is pending ([`Resolution::pending`], as [`PolicyEngine::resolve`]
    /// decides it).
    #[must_use]
    pub fn covers_network(&self, endpoint: &EndpointView, networks: &[NetworkView]) -> bool {
        let index = NetworkIndex::new(networks, std::slice::from_ref(endpoint));
        self.selectors().any(|s| {
            BoundSelector::bind(s, &index, &mut Vec::new(), &String::new)
                .network_matches(&endpoint.network_id)
        })
    }

    /// Whether some CIDR peer contains one of `addresses` (its `except`s not considered: a
    /// `true` too many only costs a resolution). An endpoint there is a peer of its rules.
    #[must_use]
    pub fn cidr_covers(&self, addresses: &[std::net::IpAddr]) -> bool {
        !addresses.is_empty()
            && self.policies.values().flat_map(Self::peers).any(|peer| {
                matches!(peer, CompiledPeer::Cidr { net, .. }
                    if addresses.iter().any(|a| net.contains(*a)))
            })
    }

    /// Whether some selector names a network: only then can a network's name matter.
    #[must_use]
    pub fn names_networks(&self) -> bool {
        self.selectors().any(|s| s.network.is_some())
    }

    /// Resolves the policies against the endpoints that exist now (all networks) and the
    /// networks' names. Pure: call it again whenever policies, endpoints, their identities,
    /// names, labels or addresses, or network names change. Subjects are numbered afresh; the
    /// driver keeps them stable across calls with [`PolicyEngine::resolve_with`].
    #[must_use]
    pub fn resolve(&self, endpoints: &[EndpointView], networks: &[NetworkView]) -> Resolution {
        self.resolve_with(endpoints, networks, &mut SubjectIds::default())
    }

    /// [`PolicyEngine::resolve`], with policy subjects interned in `subjects` (endpoints
    /// selected by the same policies share one; subjects no endpoint has any more are freed).
    #[must_use]
    pub fn resolve_with(
        &self,
        endpoints: &[EndpointView],
        networks: &[NetworkView],
        subjects: &mut SubjectIds,
    ) -> Resolution {
        let index = NetworkIndex::new(networks, endpoints);
        let mut res = Resolution::default();
        for ep in endpoints {
            for addr in &ep.addresses {
                res.endpoint_addresses.insert(*addr, ep.identity);
            }
        }
        // Networks some selector could pick endpoints on (for pending identities).
        let mut selectors_cover = Vec::new();
        // Pass 1: whom each policy selects, and so each endpoint's set of policies.
        let mut selected: Vec<Vec<u32>> = Vec::with_capacity(self.policies.len());
        let mut sets: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (name, e) in &self.policies {
            let subject_sel = BoundSelector::bind(&e.selector, &index, &mut res.warnings, &|| {
                format!("policy {name:?}: selector")
            });
            let ids: Vec<u32> = endpoints
                .iter()
                .filter(|ep| subject_sel.matches(ep))
                .map(|ep| ep.identity)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            for id in &ids {
                let enf = res.enforced.entry(*id).or_default();
                enf.ingress |= e.compiled.ingress.is_some();
                enf.egress |= e.compiled.egress.is_some();
                sets.entry(*id).or_default().push(e.number);
            }
            selected.push(ids);
            selectors_cover.push(subject_sel);
        }
        for (id, mut set) in sets {
            set.sort_unstable();
            res.subject_of.insert(id, subjects.intern(&set));
        }
        subjects.retain(&res.subject_of.values().copied().collect());
        // Pass 2: the rules, per subject rather than per endpoint.
        // A vector sorted and deduplicated at the end: a set's nodes for 100k rules were
        // one of the largest transient allocations of a resync.
        let mut rules = Vec::new();
        for ((name, e), ids) in self.policies.iter().zip(&selected) {
            let policy_subjects: Vec<u32> = ids
                .iter()
                .filter_map(|id| res.subject_of.get(id).copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let dirs = [
                (Direction::Ingress, "from", &e.compiled.ingress),
                (Direction::Egress, "to", &e.compiled.egress),
            ];
            let mut peer_selectors = Vec::new();
            for (direction, field, list) in dirs {
                for (i, rule) in list.iter().flatten().enumerate() {
                    let id = rule_id(e.number, direction, i);
                    let peers = self.peer_identities(
                        rule,
                        endpoints,
                        &index,
                        &res.endpoint_addresses,
                        &mut res.warnings,
                        &mut peer_selectors,
                        &|j| format!("policy {name:?}: {direction}[{i}].{field}[{j}].selector"),
                    );
                    let ports = rule.ports.clone().unwrap_or_else(|| {
                        vec![PortMatch {
                            protocol: Protocol::Any,
                            ports: None,
                        }]
                    });
                    if policy_subjects.is_empty() {
                        continue;
                    }
                    for peer in &peers {
                        if let ResolvedPeer::Cidr(net) = peer
                            && let Some(cidr_id) = self.cidrs.get(net)
                        {
                            res.cidr_identities.insert(*net, *cidr_id);
                        }
                        for p in &ports {
                            rules.push(ResolvedRule {
                                rule_id: id,
                                direction,
                                subjects: policy_subjects.clone(),
                                peer: *peer,
                                protocol: p.protocol,
                                ports: p.ports,
                                action: rule.action,
                            });
                        }
                    }
                }
            }
            selectors_cover.extend(peer_selectors);
        }
        res.pending = endpoints
            .iter()
            .filter(|ep| ep.name.is_none())
            .filter(|ep| {
                selectors_cover
                    .iter()
                    .any(|s| s.network_matches(&ep.network_id))
            })
            .map(|ep| ep.identity)
            .collect();
        rules.sort_unstable();
        rules.dedup();
        rules.shrink_to_fit();
        res.rules = rules;
        res
    }

    #[expect(clippy::too_many_arguments, reason = "internal helper of resolve")]
    fn peer_identities<'a>(
        &self,
        rule: &'a CompiledRule,
        endpoints: &[EndpointView],
        index: &NetworkIndex,
        endpoint_addresses: &BTreeMap<std::net::IpAddr, u32>,
        warnings: &mut Vec<String>,
        bound: &mut Vec<BoundSelector<'a>>,
        context: &dyn Fn(usize) -> String,
    ) -> Vec<ResolvedPeer> {
        let Some(peers) = &rule.peers else {
            return vec![ResolvedPeer::Any];
        };
        // Sorted and deduplicated at the end: one allocation for a 40k-peer rule, not a set.
        let mut out = Vec::with_capacity(peers.len());
        for (j, peer) in peers.iter().enumerate() {
            match peer {
                CompiledPeer::Selector(s) => {
                    let sel = BoundSelector::bind(s, index, warnings, &|| context(j));
                    out.extend(
                        endpoints
                            .iter()
                            .filter(|ep| sel.matches(ep))
                            .map(|ep| ResolvedPeer::Identity(ep.identity)),
                    );
                    bound.push(sel);
                }
                CompiledPeer::Cidr { net, except } => {
                    out.extend(cidr_pieces(*net, except).map(ResolvedPeer::Cidr));
                    out.extend(
                        cidr_endpoints(*net, except, endpoint_addresses)
                            .into_iter()
                            .map(ResolvedPeer::Identity),
                    );
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The lowest free number in `lo..=hi` above every used one; when the top is reached, the
/// lowest free one. Handing out numbers upwards keeps a just-freed number (whose rule IDs or
/// identity may still sit in the datapath or in a drop event) out of use for a while.
fn allocate(used: &BTreeSet<u32>, lo: u32, hi: u32) -> Option<u32> {
    let above = used.range(lo..=hi).next_back().map_or(lo, |m| m + 1);
    if above <= hi {
        return Some(above);
    }
    (lo..=hi).find(|n| !used.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_round_trip_and_are_never_zero() {
        assert_eq!(rule_id(1, Direction::Ingress, 0), 4096);
        assert_eq!(rule_id(1, Direction::Egress, 2), 4096 + 2048 + 2);
        assert_eq!(
            rule_id(MAX_POLICY_NUMBER, Direction::Egress, 2047),
            u32::MAX
        );
    }

    #[test]
    fn allocation_goes_up_then_wraps() {
        let used = BTreeSet::from([1, 2, 5]);
        assert_eq!(allocate(&used, 1, 10), Some(6));
        assert_eq!(allocate(&BTreeSet::new(), 1, 10), Some(1));
        let used = BTreeSet::from([2, 10]);
        assert_eq!(allocate(&used, 1, 10), Some(1));
        let full: BTreeSet<u32> = (1..=3).collect();
        assert_eq!(allocate(&full, 1, 3), None);
    }
}
