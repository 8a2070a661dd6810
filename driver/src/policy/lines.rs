//! Where each field of a policy document sits in the YAML text, so that validation errors
//! name the line at fault. serde reports lines only for errors it finds itself (syntax,
//! types, unknown fields); checks made after parsing (reversed port ranges, bad CIDRs, ...)
//! know the field path, and this maps the path to a line.

use std::collections::BTreeMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Field path (`ingress[0].ports[1]`) → 1-based line, for one document.
#[derive(Debug, Clone, Default)]
pub struct SourceLines(BTreeMap<String, usize>);

/// Positions never make two documents different.
impl PartialEq for SourceLines {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SourceLines {}

impl SourceLines {
    /// The line of `path`, or of its nearest enclosing field that has one.
    #[must_use]
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.0.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Collector {
    docs: Vec<SourceLines>,
    current: BTreeMap<String, usize>,
    stack: Vec<Frame>,
}

impl Collector {
    /// The path of the node starting now, or `None` when it is a mapping key.
    fn node_path(&mut self, scalar: Option<&str>, line: usize) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    // A key: remember it, and its line (the value may start on the next).
                    let k = scalar.unwrap_or_default().to_owned();
                    self.current.entry(join(path, &k)).or_insert(line);
                    *key = Some(k);
                    None
                }
            },
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
        }
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::DocumentStart => {
                self.current.clear();
                self.stack.clear();
            }
            Event::DocumentEnd => {
                self.docs
                    .push(SourceLines(std::mem::take(&mut self.current)));
            }
            Event::Scalar(value, ..) => {
                if let Some(p) = self.node_path(Some(&value), line) {
                    self.current.entry(p).or_insert(line);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A non-scalar key is not something policies have; treat it as a value.
                let p = self.node_path(None, line).unwrap_or_default();
                self.current.entry(p.clone()).or_insert(line);
                self.stack.push(if matches!(ev, Event::MappingStart(..)) {
                    Frame::Map { path: p, key: None }
                } else {
                    Frame::Seq { path: p, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// The lines of every document of `text`, in order; empty when the text does not parse
/// (serde then reports the syntax error with its own line).
#[must_use]
pub fn source_lines(text: &str) -> Vec<SourceLines> {
    let mut collector = Collector::default();
    let mut parser = Parser::new_from_str(text);
    match parser.load(&mut collector, true) {
        Ok(()) => collector.docs,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_lines_in_block_and_flow_style() {
        let text = "name: a\nselector: {labels: {role: db}}\ningress:\n  - action: allow\n    ports:\n      - {protocol: tcp, port: 5432}\n      - protocol: udp\n        port: \"2000-1000\"\n---\nname: b\n";
        let docs = source_lines(text);
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.line("name"), Some(1));
        assert_eq!(d.line("selector.labels.role"), Some(2));
        assert_eq!(d.line("ingress[0].action"), Some(4));
        assert_eq!(d.line("ingress[0].ports[0]"), Some(6));
        assert_eq!(d.line("ingress[0].ports[1].port"), Some(8));
        // Unknown deeper paths fall back to the nearest known field.
        assert_eq!(d.line("ingress[0].ports[1].port.first"), Some(8));
        assert_eq!(docs[1].line("name"), Some(10));
    }

    #[test]
    fn broken_yaml_gives_no_lines() {
        assert!(source_lines("a: [").is_empty());
    }
}
