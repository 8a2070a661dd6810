//! Matching selectors against endpoints: name globs, labels, and Docker network references
//! (full ID, name, or unique ID prefix, in that order, as `docker network inspect` does).

use std::collections::{BTreeMap, BTreeSet};

use super::document::Selector;
use super::resolve::{EndpointView, NetworkView};

/// A container name glob: `*` matches any run of characters (also none), `?` exactly one;
/// everything else matches itself. The whole name must match.
#[must_use]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` seen and the name position it was tried at.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == '?' || c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// What a selector's `network` value refers to, worked out once per resolution.
#[derive(Debug, Default)]
pub(crate) struct NetworkIndex {
    ids: BTreeSet<String>,
    by_name: BTreeMap<String, BTreeSet<String>>,
}

/// Result of looking up a `network` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NetworkRef {
    /// These network IDs (one, or several networks sharing a name).
    Ids(BTreeSet<String>),
    /// No known network has this ID, name or ID prefix.
    Unknown,
    /// The value is a prefix of several network IDs and names none.
    Ambiguous(Vec<String>),
}

impl NetworkIndex {
    /// Indexes the networks given plus the networks the endpoints are on.
    pub(crate) fn new(networks: &[NetworkView], endpoints: &[EndpointView]) -> Self {
        let mut index = Self::default();
        for n in networks {
            index.ids.insert(n.id.clone());
            if let Some(name) = &n.name {
                index
                    .by_name
                    .entry(name.clone())
                    .or_default()
                    .insert(n.id.clone());
            }
        }
        for ep in endpoints {
            index.ids.insert(ep.network_id.clone());
        }
        index
    }

    /// Full ID first, then name, then a unique ID prefix.
    pub(crate) fn lookup(&self, reference: &str) -> NetworkRef {
        if self.ids.contains(reference) {
            return NetworkRef::Ids(BTreeSet::from([reference.to_owned()]));
        }
        if let Some(ids) = self.by_name.get(reference) {
            return NetworkRef::Ids(ids.clone());
        }
        let prefixed: Vec<String> = self
            .ids
            .iter()
            .filter(|id| id.starts_with(reference))
            .cloned()
            .collect();
        match prefixed.len() {
            0 => NetworkRef::Unknown,
            1 => NetworkRef::Ids(prefixed.into_iter().collect()),
            _ => NetworkRef::Ambiguous(prefixed),
        }
    }
}

/// A selector with its network reference looked up.
#[derive(Debug)]
pub(crate) struct BoundSelector<'a> {
    selector: &'a Selector,
    /// `None`: no network condition. `Some(empty)`: the reference matched no network.
    networks: Option<BTreeSet<String>>,
}

impl<'a> BoundSelector<'a> {
    /// Binds `selector`; a problem with its network reference is pushed to `warnings`.
    pub(crate) fn bind(
        selector: &'a Selector,
        index: &NetworkIndex,
        warnings: &mut Vec<String>,
        context: &dyn Fn() -> String,
    ) -> Self {
        let networks = selector.network.as_ref().map(|r| match index.lookup(r) {
            NetworkRef::Ids(ids) => ids,
            NetworkRef::Unknown => BTreeSet::new(),
            NetworkRef::Ambiguous(ids) => {
                warnings.push(format!(
                    "{}: network {r:?} is an ambiguous ID prefix ({} networks); it selects nothing",
                    context(),
                    ids.len()
                ));
                BTreeSet::new()
            }
        });
        Self { selector, networks }
    }

    /// True when `ep` satisfies every condition.
    pub(crate) fn matches(&self, ep: &EndpointView) -> bool {
        if let Some(nets) = &self.networks
            && !nets.contains(&ep.network_id)
        {
            return false;
        }
        if let Some(pattern) = &self.selector.name {
            match &ep.name {
                Some(name) if glob_match(pattern, name) => {}
                _ => return false,
            }
        }
        self.selector
            .labels
            .iter()
            .all(|(k, v)| ep.labels.get(k) == Some(v))
    }

    /// True when the network condition (alone) holds for `network_id`.
    pub(crate) fn network_matches(&self, network_id: &str) -> bool {
        self.networks
            .as_ref()
            .is_none_or(|nets| nets.contains(network_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, n) in [
            ("db-*", "db-1"),
            ("db-*", "db-"),
            ("*", ""),
            ("*", "anything"),
            ("d?-1", "db-1"),
            ("*-db", "web-db"),
            ("a*b*c", "aXXbYYc"),
            ("a*b*c", "abc"),
            ("*b*", "abc"),
            ("exact", "exact"),
            ("ü?", "üx"),
        ] {
            assert!(glob_match(p, n), "{p} should match {n}");
        }
        for (p, n) in [
            ("db-*", "web-1"),
            ("db-?", "db-10"),
            ("?", ""),
            ("exact", "exact2"),
            ("exact", "exac"),
            ("a*b*c", "aXXbYY"),
            ("*-db", "web-db2"),
        ] {
            assert!(!glob_match(p, n), "{p} should not match {n}");
        }
    }

    fn ep(network: &str, name: Option<&str>, labels: &[(&str, &str)]) -> EndpointView {
        EndpointView {
            endpoint_id: "e".into(),
            identity: 300,
            network_id: network.into(),
            name: name.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            addresses: vec![],
        }
    }

    fn net(id: &str, name: &str) -> NetworkView {
        NetworkView {
            id: id.into(),
            name: Some(name.into()),
        }
    }

    #[test]
    fn network_references() {
        let index = NetworkIndex::new(
            &[
                net("aaaa1111", "appnet"),
                net("aaab2222", "other"),
                net("bbbb3333", "aaaa"),
            ],
            &[ep("cccc4444", None, &[])],
        );
        let ids = |v: &[&str]| NetworkRef::Ids(v.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(index.lookup("aaaa1111"), ids(&["aaaa1111"]));
        assert_eq!(index.lookup("appnet"), ids(&["aaaa1111"]));
        // A name beats an ID prefix.
        assert_eq!(index.lookup("aaaa"), ids(&["bbbb3333"]));
        assert_eq!(index.lookup("aaab"), ids(&["aaab2222"]));
        // Networks known only through endpoints are found by ID.
        assert_eq!(index.lookup("cccc"), ids(&["cccc4444"]));
        assert!(matches!(index.lookup("aa"), NetworkRef::Ambiguous(v) if v.len() == 2));
        assert_eq!(index.lookup("zzz"), NetworkRef::Unknown);
    }

    #[test]
    fn selectors_and_all_conditions() {
        let index = NetworkIndex::new(&[net("aaaa1111", "appnet")], &[]);
        let mut warnings = Vec::new();
        let sel = Selector {
            network: Some("appnet".into()),
            name: Some("db-*".into()),
            labels: BTreeMap::from([("role".into(), "db".into())]),
        };
        let b = BoundSelector::bind(&sel, &index, &mut warnings, &|| "x".into());
        assert!(b.matches(&ep("aaaa1111", Some("db-1"), &[("role", "db"), ("x", "y")])));
        assert!(!b.matches(&ep("other", Some("db-1"), &[("role", "db")])));
        assert!(!b.matches(&ep("aaaa1111", Some("web-1"), &[("role", "db")])));
        assert!(!b.matches(&ep("aaaa1111", Some("db-1"), &[("role", "web")])));
        assert!(!b.matches(&ep("aaaa1111", Some("db-1"), &[])));
        // An endpoint whose container is not known yet has no name: a name glob misses.
        assert!(!b.matches(&ep("aaaa1111", None, &[("role", "db")])));
        let all = Selector::default();
        let b = BoundSelector::bind(&all, &index, &mut warnings, &|| "x".into());
        assert!(b.matches(&ep("whatever", None, &[])));
        let unknown = Selector {
            network: Some("nope".into()),
            ..Selector::default()
        };
        let b = BoundSelector::bind(&unknown, &index, &mut warnings, &|| "x".into());
        assert!(!b.matches(&ep("aaaa1111", Some("a"), &[])));
        assert!(warnings.is_empty());
    }
}
