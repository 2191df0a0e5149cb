//! The one glob dialect of policy files: `*` is the only metacharacter, it
//! matches any run of characters (including none) *within one segment*, and
//! a pattern is anchored at both ends.
//!
//! Segments are delimited by a separator set chosen per use: `/` for claim
//! bindings (so `grp/*` never reaches `grp/sub/proj`), `:` for scopes, and
//! `:` plus `/` for audiences. Matching splits pattern and value on the
//! separators and matches segment by segment, so a `*` cannot cross one by
//! construction; within a segment the classic greedy two-pointer wildcard
//! match is exact because no separator is left to respect. This is a tiny
//! hand matcher rather than globset: no allocation per match, and no other
//! metacharacters (`?`, `[`, `{`) to surprise policy authors.

/// Separators for claim bindings (`ref`, `project_path`, `environment`, …).
pub(crate) const CLAIM_SEPARATORS: &[char] = &['/'];
/// Separators for scopes (`deploy:*`).
pub(crate) const SCOPE_SEPARATORS: &[char] = &[':'];
/// Separators for audiences: URLs, so a `*` stays inside one host label
/// run or path segment (`https://*.example.com` never matches
/// `https://evil.test/.example.com`).
pub(crate) const AUDIENCE_SEPARATORS: &[char] = &[':', '/'];

/// True when `value` matches `pattern` (see the module doc).
pub(crate) fn matches(pattern: &str, value: &str, separators: &[char]) -> bool {
    if !pattern.contains('*') {
        return pattern == value;
    }
    let mut pats = pattern.split(separators);
    let mut vals = value.split(separators);
    loop {
        match (pats.next(), vals.next()) {
            (None, None) => return true,
            (Some(p), Some(v)) => {
                if !segment_matches(p.as_bytes(), v.as_bytes()) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// Wildcard match of one separator-free segment. Works on bytes: `*` is
/// ASCII and literals compare byte for byte, so UTF-8 needs no special care.
fn segment_matches(p: &[u8], v: &[u8]) -> bool {
    let (mut pi, mut vi) = (0, 0);
    // Position after the last `*` seen, and where its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            pi += 1;
            star = Some((pi, vi));
        } else if pi < p.len() && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            // Let the last `*` swallow one more byte and retry after it.
            pi = sp;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn claim(p: &str, v: &str) -> bool {
        matches(p, v, CLAIM_SEPARATORS)
    }

    #[test]
    fn a_star_stays_within_one_path_segment() {
        assert!(claim("grp/*", "grp/proj"));
        assert!(!claim("grp/*", "grp/sub/proj"));
        assert!(claim("release/*", "release/1"));
        assert!(!claim("release/*", "release/1/x"));
        assert!(claim("grp/*/proj", "grp/sub/proj"));
        assert!(!claim("grp/*/proj", "grp/a/b/proj"));
    }

    #[test]
    fn patterns_are_anchored_at_both_ends() {
        assert!(claim("main", "main"));
        assert!(!claim("main", "xmain"));
        assert!(!claim("main", "mainx"));
        assert!(!claim("rel*", "xrelease"));
        assert!(claim("rel*", "release"));
        assert!(!claim("*-prod", "eu-prod-2"));
    }

    #[test]
    fn stars_match_empty_runs_and_backtrack_inside_a_segment() {
        assert!(claim("release/*", "release/"));
        assert!(claim("a*b*c", "abc"));
        assert!(claim("a*b*c", "axxbyybc"));
        assert!(!claim("a*b*c", "axxbyyb"));
        assert!(claim("*", "anything-without-slash"));
        assert!(!claim("*", "a/b"));
        assert!(claim("é*ü", "éaaü"));
    }

    #[test]
    fn scope_stars_stay_within_one_colon_segment() {
        assert!(matches("deploy:*", "deploy:write", SCOPE_SEPARATORS));
        assert!(!matches("deploy:*", "deploy:write:all", SCOPE_SEPARATORS));
        assert!(!matches("deploy:*", "deployx:write", SCOPE_SEPARATORS));
        assert!(matches("deploy:*", "deploy:a/b", SCOPE_SEPARATORS));
    }

    #[test]
    fn audience_stars_do_not_cross_url_separators() {
        let s = AUDIENCE_SEPARATORS;
        assert!(matches(
            "https://*.example.com",
            "https://deploy.example.com",
            s
        ));
        assert!(!matches(
            "https://*.example.com",
            "https://evil.test/.example.com",
            s
        ));
        assert!(!matches(
            "https://*.example.com",
            "http://deploy.example.com",
            s
        ));
    }
}
