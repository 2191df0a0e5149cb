//! The one normalized form of a request path: what routes and rules match
//! *and* what is forwarded, so the two can never disagree (security.md P3).
//!
//! - Percent-encoding is made canonical per segment (RFC 3986 §6.2.2):
//!   encoded unreserved characters are decoded (`%2E` is `.`, `%41` is `A`),
//!   everything else outside `pchar` is encoded, hex digits uppercase. An
//!   encoded `/` (`%2F`) stays encoded and inside its segment, so
//!   `group%2Fproject` is one segment both here and upstream.
//! - Dot segments are resolved after decoding (so `%2e%2e` is `..`); a `..`
//!   above the root is refused rather than clamped.
//! - Empty segments (`//`) are dropped; a trailing `/` is kept.
//! - `;` (path parameters, which servers resolve differently), `\`, control
//!   bytes and malformed `%` escapes are refused.
//!
//! Query and fragment are never part of the path.

/// Why a path was refused. Each maps to a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path.
    #[error("the path must start with /")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    /// `;`, `\` or a control byte.
    #[error("the path contains a character the proxy does not forward (; \\ or a control byte)")]
    RefusedByte,
    /// `..` would leave the root.
    #[error("the path climbs above its root")]
    AboveRoot,
    /// Longer than [`MAX_PATH`].
    #[error("the path is too long")]
    TooLong,
}

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 8 * 1024;

/// A normalized absolute path, as segments (each in canonical encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    segments: Vec<String>,
    trailing_slash: bool,
}

impl NormalPath {
    /// Normalizes the path component of a request target.
    pub fn parse(raw: &str) -> Result<NormalPath, PathError> {
        if raw.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        let rest = raw.strip_prefix('/').ok_or(PathError::NotAbsolute)?;
        let mut segments: Vec<String> = Vec::new();
        let mut trailing_slash = false;
        let parts: Vec<&str> = rest.split('/').collect();
        let last = parts.len() - 1;
        for (i, part) in parts.into_iter().enumerate() {
            let seg = canonical_segment(part.as_bytes())?;
            match seg.as_str() {
                "" => {
                    if i == last && !segments.is_empty() {
                        trailing_slash = true;
                    }
                }
                "." => trailing_slash = i == last && !segments.is_empty(),
                ".." => {
                    if segments.pop().is_none() {
                        return Err(PathError::AboveRoot);
                    }
                    trailing_slash = i == last && !segments.is_empty();
                }
                _ => {
                    segments.push(seg);
                    trailing_slash = false;
                }
            }
        }
        Ok(NormalPath {
            segments,
            trailing_slash,
        })
    }

    /// The segments, each canonically encoded.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The path without its first `n` segments (a route's prefix).
    pub fn strip_segments(&self, n: usize) -> NormalPath {
        let segments = self.segments.get(n..).unwrap_or_default().to_vec();
        NormalPath {
            trailing_slash: self.trailing_slash && !segments.is_empty(),
            segments,
        }
    }

    /// Whether the path starts with `prefix`'s segments.
    pub fn starts_with(&self, prefix: &[String]) -> bool {
        self.segments.len() >= prefix.len() && self.segments[..prefix.len()] == *prefix
    }

    /// The path as text: `/` for the root.
    pub fn as_text(&self) -> String {
        let mut out = String::with_capacity(self.segments.iter().map(|s| s.len() + 1).sum());
        for s in &self.segments {
            out.push('/');
            out.push_str(s);
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }
}

/// `pchar` minus `%` and `;`: bytes a canonical segment keeps literally.
fn is_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn push_encoded(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

/// One raw segment in canonical encoding.
fn canonical_segment(raw: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let decoded = (h << 4) | l;
            if decoded.is_ascii_control() {
                return Err(PathError::RefusedByte);
            }
            if is_unreserved(decoded) {
                out.push(char::from(decoded));
            } else {
                push_encoded(&mut out, decoded);
            }
            i += 3;
            continue;
        }
        if b == b';' || b == b'\\' || b.is_ascii_control() {
            return Err(PathError::RefusedByte);
        }
        if is_literal(b) {
            out.push(char::from(b));
        } else {
            push_encoded(&mut out, b);
        }
        i += 1;
    }
    Ok(out)
}

/// Encodes `value` as exactly one canonical segment (a `/` inside becomes
/// `%2F`): how identity values are put into rule templates.
pub fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if is_literal(b) {
            out.push(char::from(b));
        } else {
            push_encoded(&mut out, b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        NormalPath::parse(p).map(|n| n.as_text())
    }

    #[test]
    fn dot_segments_and_duplicate_slashes_resolve() {
        assert_eq!(norm("/").unwrap(), "/");
        assert_eq!(norm("//").unwrap(), "/");
        assert_eq!(norm("/a//b").unwrap(), "/a/b");
        assert_eq!(norm("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(norm("/a/b/").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/.").unwrap(), "/a/b/");
        assert_eq!(norm("/a/b/..").unwrap(), "/a/");
        assert_eq!(norm("/a/..").unwrap(), "/");
        assert_eq!(norm("/..").unwrap_err(), PathError::AboveRoot);
        assert_eq!(norm("/a/../../b").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn encoded_dots_are_dot_segments() {
        assert_eq!(norm("/projects/1/%2e%2e/2").unwrap(), "/projects/2");
        assert_eq!(norm("/projects/1/%2E%2e/%2E/2").unwrap(), "/projects/2");
        assert_eq!(norm("/%2e%2e").unwrap_err(), PathError::AboveRoot);
    }

    #[test]
    fn percent_encoding_is_canonical_and_slash_stays_encoded() {
        assert_eq!(norm("/a%41%7e").unwrap(), "/aA~");
        assert_eq!(norm("/projects/g%2fp").unwrap(), "/projects/g%2Fp");
        assert_eq!(
            NormalPath::parse("/projects/g%2Fp/x").unwrap().segments(),
            ["projects", "g%2Fp", "x"]
        );
        assert_eq!(norm("/a%20b").unwrap(), "/a%20b");
        assert_eq!(norm("/a\"b{").unwrap(), "/a%22b%7B");
        assert_eq!(norm("/%25").unwrap(), "/%25");
        assert_eq!(norm("/caf%C3%A9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn refused_bytes_and_escapes() {
        assert_eq!(norm("/a;b").unwrap_err(), PathError::RefusedByte);
        assert_eq!(norm("/a\\b").unwrap_err(), PathError::RefusedByte);
        assert_eq!(norm("/a%00").unwrap_err(), PathError::RefusedByte);
        assert_eq!(norm("/a%0a").unwrap_err(), PathError::RefusedByte);
        assert_eq!(norm("/a%").unwrap_err(), PathError::BadEscape);
        assert_eq!(norm("/a%g1").unwrap_err(), PathError::BadEscape);
        assert_eq!(norm("a").unwrap_err(), PathError::NotAbsolute);
        assert_eq!(norm(&"/a".repeat(5000)).unwrap_err(), PathError::TooLong);
        // An encoded `;` is data, not a parameter.
        assert_eq!(norm("/a%3bb").unwrap(), "/a%3Bb");
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in [
            "/a/./b//c/../d/",
            "/x%2e%2E/%2fy/%41",
            "/projects/g%2Fp/repository/files/a%2Fb.txt/raw",
        ] {
            let once = norm(p).unwrap();
            assert_eq!(norm(&once).unwrap(), once, "{p}");
        }
    }

    #[test]
    fn stripping_a_prefix() {
        let p = NormalPath::parse("/proxy/gitlab/projects/1/").unwrap();
        assert!(p.starts_with(&["proxy".into(), "gitlab".into()]));
        assert_eq!(p.strip_segments(2).as_text(), "/projects/1/");
        assert_eq!(
            NormalPath::parse("/proxy/gitlab/")
                .unwrap()
                .strip_segments(2)
                .as_text(),
            "/"
        );
    }

    #[test]
    fn identity_values_encode_as_one_segment() {
        assert_eq!(encode_segment("group/sub/proj"), "group%2Fsub%2Fproj");
        assert_eq!(encode_segment("42"), "42");
        assert_eq!(encode_segment("a b"), "a%20b");
    }
}
