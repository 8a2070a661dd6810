//! Policy subjects: one `POLICY` key space per distinct *set of policies* selecting endpoints,
//! not one per endpoint. Every endpoint that the same policies select gets the same subject
//! (`EndpointInfo::subject` in the datapath), so a `selector: {}` policy with 100k CIDRs costs
//! 100k entries whether it selects one endpoint or a thousand, and an endpoint that joins an
//! existing rule set adds no `POLICY` entry as a subject at all.
//!
//! Peer selectors never depend on the subject (they are bound once per resolution), so the
//! rules of an endpoint are exactly the rules of the policies selecting it: endpoints with the
//! same set have the same rules.

use std::collections::{BTreeMap, BTreeSet};

/// First subject handed out (0 is `SUBJECT_NONE`: no policy selects the endpoint).
pub(crate) const FIRST_SUBJECT: u32 = 1;
/// Last subject handed out, inclusive.
pub(crate) const LAST_SUBJECT: u32 = u32::MAX >> 1;

/// Interns sets of policy numbers as subjects. Stable: a set keeps its subject for as long as
/// some endpoint has it, and a freed subject is not handed out again until the counter wraps
/// (so entries of a just-retired subject are never mistaken for a new set's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectIds {
    by_set: BTreeMap<Vec<u32>, u32>,
    next: u32,
}

impl Default for SubjectIds {
    fn default() -> Self {
        Self {
            by_set: BTreeMap::new(),
            next: FIRST_SUBJECT,
        }
    }
}

impl SubjectIds {
    /// The subject of the endpoints selected by exactly the policies numbered `set` (sorted,
    /// not empty); a new one if no endpoint had this set.
    pub fn intern(&mut self, set: &[u32]) -> u32 {
        if let Some(id) = self.by_set.get(set) {
            return *id;
        }
        let used: BTreeSet<u32> = self.by_set.values().copied().collect();
        let mut id = self.next;
        while used.contains(&id) {
            id = if id >= LAST_SUBJECT {
                FIRST_SUBJECT
            } else {
                id + 1
            };
        }
        self.next = if id >= LAST_SUBJECT {
            FIRST_SUBJECT
        } else {
            id + 1
        };
        self.by_set.insert(set.to_vec(), id);
        id
    }

    /// The subject of the set `set` (sorted), if some endpoint has it.
    #[must_use]
    pub fn get(&self, set: &[u32]) -> Option<u32> {
        self.by_set.get(set).copied()
    }

    /// Forgets every subject not in `used`.
    pub fn retain(&mut self, used: &BTreeSet<u32>) {
        self.by_set.retain(|_, id| used.contains(id));
    }

    /// Number of subjects in use.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_set.len()
    }

    /// True when no subject is in use.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.by_set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_set_same_subject_and_freed_ones_are_not_reused_at_once() {
        let mut ids = SubjectIds::default();
        let a = ids.intern(&[1]);
        let b = ids.intern(&[1, 2]);
        assert_ne!(a, b);
        assert_eq!(ids.intern(&[1]), a);
        assert_eq!(ids.len(), 2);
        ids.retain(&BTreeSet::from([b]));
        assert_eq!(ids.len(), 1);
        // [1] comes back with a new subject, not its old one.
        let a2 = ids.intern(&[1]);
        assert_ne!(a2, a);
        assert_ne!(a2, b);
        assert_eq!(ids.intern(&[1, 2]), b);
    }

    #[test]
    fn the_counter_wraps_around_used_subjects() {
        let mut ids = SubjectIds {
            by_set: BTreeMap::from([(vec![7], FIRST_SUBJECT)]),
            next: LAST_SUBJECT,
        };
        assert_eq!(ids.intern(&[1]), LAST_SUBJECT);
        assert_eq!(
            ids.intern(&[2]),
            FIRST_SUBJECT + 1,
            "skips the used first one"
        );
    }
}
