//! What crosses the proxy in headers: the job's credentials and anything
//! that could pose as cistern's own never reach the upstream (security.md
//! P1, P3, P5); hop-by-hop headers stop here (RFC 9110 §7.6.1), and
//! upstream URLs in `Location`/`Link` are turned into the proxy's own.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the legacy `Proxy-Connection`
/// and `Keep-Alive`).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers never forwarded, compared after folding `_` to `-`
/// (header names are already lower case): credentials the job holds or
/// that cistern injects, and headers that claim an identity, a client
/// address or an original URL which an upstream might trust.
const NEVER_FORWARDED: &[&str] = &[
    "host",
    "authorization",
    "private-token",
    "job-token",
    "deploy-token",
    "cookie",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-original-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Prefixes of request headers never forwarded (after folding).
const NEVER_FORWARDED_PREFIXES: &[&str] = &["x-forwarded-", "x-auth-request-", "x-cistern-"];

fn folded(name: &HeaderName) -> String {
    name.as_str().replace('_', "-")
}

/// Names listed in `Connection` headers: hop-by-hop for this message.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase().replace('_', "-"))
        .filter(|t| !t.is_empty())
        .collect()
}

/// The request headers to forward: `src` minus hop-by-hop headers (and
/// those `Connection` names), credentials and identity claims, and
/// `injected` (the header cistern is about to set), each compared in
/// every `_`/`-` spelling. The injected header is set afterwards, so no
/// `Connection` token can remove it.
pub fn request_headers(src: &HeaderMap, injected: &HeaderName) -> HeaderMap {
    let listed = connection_listed(src);
    let injected = folded(injected);
    let mut out = HeaderMap::with_capacity(src.len());
    for (name, value) in src {
        let f = folded(name);
        let drop = HOP_BY_HOP.contains(&f.as_str())
            || NEVER_FORWARDED.contains(&f.as_str())
            || NEVER_FORWARDED_PREFIXES.iter().any(|p| f.starts_with(p))
            || f == injected
            || listed.contains(&f);
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The response headers to return: hop-by-hop ones removed, and upstream
/// URLs in `Location`, `Content-Location` and `Link` rewritten from
/// `upstream` (the route's upstream base URL, no trailing `/`) to `public`
/// (the route's public base URL), so paginating clients stay on the proxy.
pub fn response_headers(src: &HeaderMap, upstream: &str, public: &str) -> HeaderMap {
    let listed = connection_listed(src);
    let upstream_path = upstream_path(upstream);
    let public_path = upstream_path.map(|_| upstream_path_of_public(public));
    let mut out = HeaderMap::with_capacity(src.len());
    for (name, value) in src {
        let f = name.as_str();
        if HOP_BY_HOP.contains(&f) || listed.iter().any(|l| l == f) {
            continue;
        }
        let rewritten = match *name {
            header::LOCATION | header::CONTENT_LOCATION => value.to_str().ok().and_then(|v| {
                rewrite_reference(v, upstream, public)
                    .or_else(|| rewrite_absolute_path(v, upstream_path?, public_path?))
            }),
            header::LINK => value
                .to_str()
                .ok()
                .and_then(|v| rewrite_link(v, upstream, public)),
            _ => None,
        };
        match rewritten.and_then(|r| HeaderValue::from_str(&r).ok()) {
            Some(v) => out.append(name.clone(), v),
            None => out.append(name.clone(), value.clone()),
        };
    }
    out
}

/// `https://h/api/v4` → `/api/v4`.
fn upstream_path(base: &str) -> Option<&str> {
    let after_scheme = base.split_once("://")?.1;
    after_scheme.find('/').map(|i| &after_scheme[i..])
}

fn upstream_path_of_public(public: &str) -> &str {
    upstream_path(public).unwrap_or("")
}

/// Whether `rest` continues a URL after a base (end, `/`, `?` or `#`).
fn continues(rest: &str) -> bool {
    rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

fn rewrite_reference(v: &str, upstream: &str, public: &str) -> Option<String> {
    let rest = v.strip_prefix(upstream)?;
    continues(rest).then(|| format!("{public}{rest}"))
}

fn rewrite_absolute_path(v: &str, upstream_path: &str, public_path: &str) -> Option<String> {
    if !v.starts_with('/') || v.starts_with("//") {
        return None;
    }
    let rest = v.strip_prefix(upstream_path)?;
    continues(rest).then(|| format!("{public_path}{rest}"))
}

/// Rewrites each `<URI>` of a `Link` header (RFC 8288) that starts with
/// the upstream base; leaves the rest as it was.
fn rewrite_link(v: &str, upstream: &str, public: &str) -> Option<String> {
    let mut out = String::with_capacity(v.len());
    let mut changed = false;
    let mut rest = v;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        let Some(close) = rest.find('>') else { break };
        let target = &rest[..close];
        match rewrite_reference(target, upstream, public) {
            Some(r) => {
                out.push_str(&r);
                changed = true;
            }
            None => out.push_str(target),
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn credentials_identity_and_spoofing_headers_are_stripped_in_every_spelling() {
        let src = map(&[
            ("Authorization", "Bearer cistern-token"),
            ("PRIVATE-TOKEN", "glpat-job"),
            ("private_token", "glpat-job-underscore"),
            ("X-Forwarded-User", "admin"),
            ("x_forwarded_user", "admin"),
            ("X-Forwarded-For", "10.0.0.1"),
            ("X-Forwarded-Uri", "/allowed"),
            ("X-Original-URL", "/allowed"),
            ("X-Auth-Request-Email", "a@b"),
            ("X_Cistern_Role", "admin"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("Cookie", "_gitlab_session=x"),
            ("Host", "cistern.example"),
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
            ("User-Agent", "python-gitlab"),
        ]);
        let out = request_headers(&src, &HeaderName::from_static("private-token"));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "content-type", "user-agent"]);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_stop_here_but_cannot_remove_the_injected_one() {
        let src = map(&[
            ("Connection", "keep-alive, X-Custom, private-token"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic x"),
            ("X-Custom", "1"),
            ("X-Other", "2"),
        ]);
        let injected = HeaderName::from_static("private-token");
        let mut out = request_headers(&src, &injected);
        out.insert(injected.clone(), HeaderValue::from_static("secret"));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-other", "private-token"]);
    }

    #[test]
    fn upstream_urls_in_location_and_link_point_back_at_the_proxy() {
        let up = "http://127.0.0.1:4010/api/v4";
        let public = "https://cistern.example/proxy/gitlab";
        let src = map(&[
            ("Location", "http://127.0.0.1:4010/api/v4/projects/42"),
            ("Content-Location", "/api/v4/projects?page=2"),
            (
                "Link",
                "<http://127.0.0.1:4010/api/v4/projects?page=2>; rel=\"next\", <https://elsewhere/x>; rel=\"help\"",
            ),
            ("Connection", "close"),
            ("Transfer-Encoding", "chunked"),
        ]);
        let out = response_headers(&src, up, public);
        assert_eq!(
            out["location"],
            "https://cistern.example/proxy/gitlab/projects/42"
        );
        assert_eq!(out["content-location"], "/proxy/gitlab/projects?page=2");
        assert_eq!(
            out["link"],
            "<https://cistern.example/proxy/gitlab/projects?page=2>; rel=\"next\", <https://elsewhere/x>; rel=\"help\""
        );
        assert!(out.get("connection").is_none() && out.get("transfer-encoding").is_none());
    }

    #[test]
    fn look_alike_prefixes_are_not_rewritten() {
        let up = "http://127.0.0.1:4010/api/v4";
        let src = map(&[
            ("Location", "http://127.0.0.1:4010/api/v45/x"),
            ("Link", "<http://127.0.0.1:40100/api/v4>; rel=\"x\""),
        ]);
        let out = response_headers(&src, up, "https://c/p");
        assert_eq!(out["location"], "http://127.0.0.1:4010/api/v45/x");
        assert_eq!(out["link"], "<http://127.0.0.1:40100/api/v4>; rel=\"x\"");
    }
}
