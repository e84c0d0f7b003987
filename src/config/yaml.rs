//! The native YAML config (`conf/weir.yaml`), deserialized straight into [`Config`].
//!
//! Unknown keys are rejected everywhere (`deny_unknown_fields`): a typo must not silently fall
//! back to a default. Errors carry the line serde_yaml reports; the findings of
//! [`Config::validate`] get theirs from [`locate`], which finds their key in the text.

use std::path::Path;

use serde_yaml::Value;

use super::validate::{Finding, Key};
use super::{Config, ConfigError, ConfigWarning, Loaded, QueueConfig};

/// Reads the native YAML config. `path` is only used to label errors.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let config: Option<Config> = serde_yaml::from_str(text).map_err(|e| yaml_error(path, &e))?;
    let mut config = config.unwrap_or_default();
    // The text parsed as Config, so it parses as a document too.
    let doc: Value = serde_yaml::from_str(text).unwrap_or(Value::Null);
    apply_contextual_defaults(&mut config, &doc);
    let finding = |f: Finding| (locate(text, &f.at), f.to_string());
    let warnings = config
        .validate()
        .map_err(|f| {
            let (line, message) = finding(f);
            ConfigError::new(path, line, message)
        })?
        .into_iter()
        .map(|f| {
            let (line, message) = finding(f);
            ConfigWarning { line, message }
        })
        .collect();
    Ok(Loaded { config, warnings })
}

/// The two defaults that depend on the rest of the file, which a type's own `Default` cannot
/// see:
///
/// - a listener that does not say `tls` is TLS exactly when a `tls` block is configured (so
///   `listen` + `tls` is a TLS listener, as ServiceQ's SSL_ENABLE);
/// - an `upfront_queue` section that does not set `enabled` or `formats` keeps the upfront
///   queue's defaults for them (off, no request), not the deferred queue's that
///   `QueueConfig::default()` fills in.
fn apply_contextual_defaults(c: &mut Config, doc: &Value) {
    let says_tls = |item: &Value| item.get("tls").is_some();
    let explicit: Vec<bool> = match doc.get("listen") {
        Some(Value::Sequence(items)) => items.iter().map(says_tls).collect(),
        Some(item) => vec![says_tls(item)],
        None => Vec::new(),
    };
    let tls_block = c.tls.is_some();
    for (i, l) in c.listen.iter_mut().enumerate() {
        if !explicit.get(i).copied().unwrap_or(false) {
            l.tls = tls_block;
        }
    }
    if let Some(q) = doc.get("upfront_queue") {
        let upfront = QueueConfig::upfront();
        if q.get("enabled").is_none() {
            c.upfront_queue.enabled = upfront.enabled;
        }
        if q.get("formats").is_none() {
            c.upfront_queue.formats = upfront.formats;
        }
    }
}

/// A serde_yaml error as a [`ConfigError`]: the line moves out of the message into the error.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> ConfigError {
    let mut message = e.to_string();
    let line = e.location().map(|loc| {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = message.find(&suffix) {
            message.replace_range(i..i + suffix.len(), "");
        }
        loc.line()
    });
    ConfigError::new(path, line, message)
}

/// The line of the key `at` in a YAML text: the line of the key itself when it is written in
/// block style, else of its deepest ancestor that is (a key inside `{...}` or `[...]` gives the
/// line of the flow collection's key). `None` when not even the first key is in the text
/// (the value is a default).
///
/// A line scan, not a YAML parser: it follows block-style indentation of `key:` and `- `
/// items, which is how config files are written; anything it cannot follow only makes the
/// line less precise.
pub fn locate(text: &str, at: &[Key]) -> Option<usize> {
    struct Open {
        indent: usize,
        key: Key,
        /// A `- ` item (closed by the next item at its column) rather than a `key:`.
        item: bool,
        /// Items seen so far under this key.
        items: usize,
    }
    let mut open: Vec<Open> = Vec::new();
    let mut best: Option<(usize, usize)> = None; // (depth matched, line)
    for (i, raw) in text.lines().enumerate() {
        let body = raw.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') || body.starts_with("---") {
            continue;
        }
        let mut col = raw.len() - body.len();
        let mut rest = body;
        let mut entries: Vec<Open> = Vec::new();
        if rest == "-" || rest.starts_with("- ") {
            while open
                .last()
                .is_some_and(|o| o.indent > col || (o.item && o.indent == col))
            {
                open.pop();
            }
            let index = match open.last_mut() {
                Some(parent) => {
                    parent.items += 1;
                    parent.items - 1
                }
                None => 0,
            };
            entries.push(Open {
                indent: col,
                key: Key::Index(index),
                item: true,
                items: 0,
            });
            let after = rest[1..].trim_start_matches(' ');
            col += rest.len() - after.len();
            rest = after;
        } else {
            while open.last().is_some_and(|o| o.indent >= col) {
                open.pop();
            }
        }
        if let Some(name) = key_of(rest) {
            entries.push(Open {
                indent: col,
                key: Key::Name(name),
                item: false,
                items: 0,
            });
        }
        for e in entries {
            open.push(e);
            let depth = open.len();
            let matches = depth <= at.len() && open.iter().zip(at).all(|(o, k)| o.key == *k);
            if matches && best.is_none_or(|(d, _)| depth > d) {
                best = Some((depth, i + 1));
                if depth == at.len() {
                    return Some(i + 1);
                }
            }
        }
    }
    best.map(|(_, line)| line)
}

/// The key of a `key: value` (or `key:`) line, unquoted; `None` for other lines.
fn key_of(line: &str) -> Option<String> {
    let quoted = |q: char| {
        let inner = line.strip_prefix(q)?;
        let end = inner.find(q)?;
        inner[end + 1..]
            .trim_start()
            .starts_with(':')
            .then(|| inner[..end].to_string())
    };
    if line.starts_with('"') || line.starts_with('\'') {
        return quoted(line.chars().next()?);
    }
    if line.starts_with(['{', '[', '&', '*', '!', '|', '>']) {
        return None;
    }
    let end = line
        .match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| line[i + 1..].is_empty() || line[i + 1..].starts_with([' ', '\t']))?;
    let key = line[..end].trim_end();
    (!key.is_empty() && !key.contains(" #")).then(|| key.to_string())
}

#[cfg(test)]
mod tests;
