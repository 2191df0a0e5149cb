//! TOML source files with errors that name the file, the line and the field.
//!
//! Config and policy files are deserialized strictly (`deny_unknown_fields`)
//! and then checked semantically. Both kinds of error point at a line:
//! syntax and type errors through the span `toml` reports, semantic errors by
//! looking the offending key path up in the document's spans.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// An error located in a TOML file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path of the offending field (`ceiling.max_ttl`), when known.
    pub field: Option<String>,
    /// What is wrong, in one line.
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for SourceError {}

/// A TOML document kept beside its parsed value, to locate semantic errors.
#[derive(Debug, Clone)]
pub struct Source {
    file: PathBuf,
    text: String,
}

impl Source {
    /// Reads a file.
    pub fn read(file: &Path) -> Result<Self, SourceError> {
        let text = std::fs::read_to_string(file).map_err(|e| SourceError {
            file: file.to_path_buf(),
            line: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Ok(Self::from_text(file, text))
    }

    /// Wraps text already in memory (`file` is used in messages only).
    pub fn from_text(file: &Path, text: String) -> Self {
        Self {
            file: file.to_path_buf(),
            text,
        }
    }

    /// The file name used in messages.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The raw text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Deserializes the whole document strictly.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, SourceError> {
        toml::from_str(&self.text).map_err(|e| {
            let message = e.message().trim().to_owned();
            let field = field_from_message(&message);
            SourceError {
                file: self.file.clone(),
                line: e.span().map(|s| self.line_of_offset(s.start)),
                field,
                message,
            }
        })
    }

    /// An error about the field at dotted `path` (`issuers.gitlab.issuer`);
    /// the line is that of the key's value, or of the nearest table that
    /// exists when the key itself is absent.
    pub fn error(&self, path: &str, message: impl Into<String>) -> SourceError {
        SourceError {
            file: self.file.clone(),
            line: self.line_of_path(path),
            field: Some(path.to_owned()),
            message: message.into(),
        }
    }

    /// 1-based line of the value at a dotted key path, or of its closest parent.
    pub fn line_of_path(&self, path: &str) -> Option<usize> {
        let doc = DeTable::parse(&self.text).ok()?;
        let mut best = None;
        let mut table: &DeTable<'_> = doc.get_ref();
        for part in path.split('.') {
            let Some((key, value)) = table.get_key_value(part) else {
                break;
            };
            best = Some(self.line_of_offset(key.span().start));
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ => break,
            }
        }
        best
    }

    fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }
}

/// Pulls the field name out of serde's "unknown field `x`" / "missing field `x`".
fn field_from_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    if message.starts_with("unknown field") || message.starts_with("missing field") {
        Some(message[start..start + len].to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        inner: Inner,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        ttl: u32,
    }

    fn src(text: &str) -> Source {
        Source::from_text(Path::new("x.toml"), text.to_owned())
    }

    #[test]
    fn a_type_error_names_the_line() {
        let e = src("name = \"a\"\n\n[inner]\nttl = \"ten\"\n")
            .parse::<Doc>()
            .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.to_string().starts_with("x.toml:4"), "{e}");
    }

    #[test]
    fn an_unknown_field_names_the_field_and_line() {
        let e = src("name = \"a\"\nbogus = 1\n[inner]\nttl = 1\n")
            .parse::<Doc>()
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("bogus"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn a_semantic_error_finds_the_line_of_a_nested_key() {
        let s = src("name = \"a\"\n\n[inner]\n\nttl = 1\n");
        assert_eq!(s.error("inner.ttl", "too small").line, Some(5));
        assert_eq!(s.error("inner.missing", "required").line, Some(3));
    }
}
