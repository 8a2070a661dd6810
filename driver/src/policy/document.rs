//! The policy document as users write it (YAML, one or more documents per file) and as the
//! admin API returns it (JSON, same shape). These types only describe the *syntax*: every
//! struct rejects unknown fields, and [`super::validate`] checks the meaning (CIDRs, port
//! ranges, names) and turns a document into its compiled form.
//!
//! `docs/policy.md` is the reference for users; its examples are test fixtures.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::PolicyError;

/// One policy document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    /// Unique name; applying a document with the name of an existing policy replaces it.
    pub name: String,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The endpoints this policy is for. `{}` selects every endpoint.
    pub selector: Selector,
    /// Traffic *to* the selected endpoints. Absent: this policy does not touch ingress.
    /// Present (even empty or null): ingress becomes default-deny for the selected endpoints.
    #[serde(
        default,
        deserialize_with = "present_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub ingress: Option<Vec<IngressRule>>,
    /// Traffic *from* the selected endpoints; as `ingress`.
    #[serde(
        default,
        deserialize_with = "present_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub egress: Option<Vec<EgressRule>>,
    /// Where each field was in the YAML text (for error messages; never stored).
    #[serde(skip)]
    pub source: super::lines::SourceLines,
}

/// Which endpoints: every condition given must hold (an empty selector matches all).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Docker network: full ID, name, or unique ID prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Container name glob (`*` any run of characters, `?` one character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels that must all be present with exactly these values.
    #[serde(
        default,
        deserialize_with = "label_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
}

impl Selector {
    /// True when the selector has no condition (it selects every endpoint).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.network.is_none() && self.name.is_none() && self.labels.is_empty()
    }
}

impl fmt::Display for Selector {
    /// `network=appnet name=db-* role=db`, or `(all endpoints)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("(all endpoints)");
        }
        let mut parts = Vec::new();
        if let Some(n) = &self.network {
            parts.push(format!("network={n}"));
        }
        if let Some(n) = &self.name {
            parts.push(format!("name={n}"));
        }
        for (k, v) in &self.labels {
            parts.push(format!("{k}={v}"));
        }
        f.write_str(&parts.join(" "))
    }
}

/// What a rule does with the traffic it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through (unless a deny rule also matches).
    Allow,
    /// Drop it, whatever allow rules say.
    Deny,
}

/// A rule of the `ingress` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    /// Allow or deny.
    pub action: Action,
    /// Senders (any of them); absent means any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    /// Protocols and destination ports (any of them); absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

/// A rule of the `egress` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    /// Allow or deny.
    pub action: Action,
    /// Receivers (any of them); absent means any peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    /// Protocols and destination ports (any of them); absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
}

/// The other side of the traffic: exactly one of `selector` or `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Endpoints (sluice containers) matching this selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Addresses in this range (`10.0.0.0/8`, `2001:db8::/32`, or one address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
    /// Ranges inside `cidr` that this peer does not cover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

/// Protocol of a [`PortSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (no ports).
    Icmp,
    /// Every IP protocol (no ports).
    Any,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Any => "any",
        })
    }
}

/// A protocol and optionally a destination port or port range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// `tcp`, `udp`, `icmp` or `any`.
    pub protocol: Protocol,
    /// `5432`, `"5432"` or `"1000-2000"`; absent means every port. TCP and UDP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortValue>,
}

/// A port as written: a number or a string (`"80"`, `"1000-2000"`). Checked by validation,
/// kept as written so that documents round-trip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PortValue {
    /// A bare number (may be out of range; validation says so).
    Number(i64),
    /// A string.
    Text(String),
}

impl fmt::Display for PortValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for PortValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a range like \"1000-2000\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortValue, E> {
                Ok(PortValue::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortValue, E> {
                Ok(PortValue::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortValue, E> {
                Ok(PortValue::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `ingress:` / `egress:` given with no value (YAML null) means an empty list, not "absent":
/// the key's presence is what makes the direction default-deny.
fn present_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Some(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default()))
}

/// Label values are strings, but YAML users write `{tier: 1}` or `{public: true}`: accept
/// integers and booleans as their text. Floats are refused (`1.10` would become `1.1`).
fn label_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct LabelValue(String);
    impl<'de> Deserialize<'de> for LabelValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = LabelValue;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a label value (a string; quote numbers like \"1.10\")")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<LabelValue, E> {
                    Ok(LabelValue(v.to_owned()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<LabelValue, E> {
                    Ok(LabelValue(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<LabelValue, E> {
                    Ok(LabelValue(v.to_string()))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<LabelValue, E> {
                    Ok(LabelValue(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }
    let raw = Option::<BTreeMap<String, LabelValue>>::deserialize(d)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect())
}

/// Parses a file: one or more YAML documents separated by `---`. Empty documents (a
/// leading or trailing `---`, comments only) are skipped. Only the syntax and the shape are
/// checked here; see [`super::validate::compile`] for the meaning.
///
/// # Errors
/// [`PolicyError::Parse`] naming the document (by its `name` when it has one, else by its
/// position) and, where the YAML parser knows them, the field path and line.
pub fn parse_documents(text: &str) -> Result<Vec<PolicyDoc>, PolicyError> {
    // First pass: generic values, to skip empty documents and to name a document in errors.
    let mut values = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(doc).map_err(|e| PolicyError::Parse {
            document: format!("document {}", i + 1),
            message: e.to_string(),
        })?;
        values.push(value);
    }
    // Second pass: typed, straight from the text, so errors carry field paths and lines.
    let lines = super::lines::source_lines(text);
    let mut docs = Vec::new();
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let Some(value) = values.get(i) else { break };
        if value.is_null() {
            continue;
        }
        let document = match value.get("name").and_then(serde_norway::Value::as_str) {
            Some(name) => format!("policy {name:?}"),
            None => format!("document {}", i + 1),
        };
        if !value.is_mapping() {
            return Err(PolicyError::Parse {
                document,
                message: "a policy document must be a mapping with `name`, `selector`, \
                          `ingress` and/or `egress`"
                    .into(),
            });
        }
        let mut parsed = PolicyDoc::deserialize(doc).map_err(|e| PolicyError::Parse {
            document,
            message: e.to_string(),
        })?;
        parsed.source = lines.get(i).cloned().unwrap_or_default();
        docs.push(parsed);
    }
    if docs.is_empty() {
        return Err(PolicyError::Parse {
            document: "input".into(),
            message: "no policy documents found".into(),
        });
    }
    Ok(docs)
}
