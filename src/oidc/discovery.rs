//! OpenID Connect discovery: from a configured issuer to its `jwks_uri`.
//!
//! The discovery URL is built once, from the configured issuer only (never
//! from token content, cf. octo-sts CVE-2025-52477). The document's `issuer`
//! must equal the configured issuer exactly (OIDC Discovery §4.3, mix-up
//! defence), and `jwks_uri` must stay on the issuer's host or an operator-
//! allowed one, over https (plain http only for loopback test issuers).

use serde::Deserialize;
use url::Url;

use crate::config::is_loopback_host;

/// Why a discovery document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DiscoveryError {
    /// Not JSON, or `issuer`/`jwks_uri` missing, duplicated or not strings.
    #[error("discovery document is invalid: {0}")]
    Invalid(String),
    /// `issuer` differs from the configured issuer.
    #[error("discovery issuer {found:?} does not equal the configured issuer")]
    IssuerMismatch {
        /// What the document said (bounded).
        found: String,
    },
    /// `jwks_uri` is not an acceptable URL.
    #[error("jwks_uri refused: {0}")]
    JwksUri(String),
}

/// `{issuer}/.well-known/openid-configuration`, with any trailing `/` of the
/// issuer removed first (OIDC Discovery §4).
pub(crate) fn discovery_url(issuer: &str) -> Result<Url, url::ParseError> {
    Url::parse(&format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    ))
}

/// The rules a `jwks_uri` must follow, fixed at start-up.
#[derive(Debug, Clone)]
pub(crate) struct JwksUriRules {
    /// The configured issuer string, compared byte for byte.
    pub(crate) issuer: String,
    /// The issuer's host.
    pub(crate) issuer_host: String,
    /// Further allowed hosts (lower-cased).
    pub(crate) allowed_hosts: Vec<String>,
    /// Whether http is allowed for loopback hosts.
    pub(crate) allow_insecure_http: bool,
}

impl JwksUriRules {
    /// Parses a discovery document and returns its checked `jwks_uri`.
    pub(crate) fn jwks_uri(&self, body: &[u8]) -> Result<Url, DiscoveryError> {
        #[derive(Deserialize)]
        struct Doc {
            issuer: String,
            jwks_uri: String,
        }
        let doc: Doc =
            serde_json::from_slice(body).map_err(|e| DiscoveryError::Invalid(e.to_string()))?;
        if doc.issuer != self.issuer {
            return Err(DiscoveryError::IssuerMismatch {
                found: doc.issuer.chars().take(256).collect(),
            });
        }
        self.check_jwks_uri(&doc.jwks_uri)
    }

    fn check_jwks_uri(&self, raw: &str) -> Result<Url, DiscoveryError> {
        let bad = |m: &str| Err(DiscoveryError::JwksUri(m.to_owned()));
        let Ok(url) = Url::parse(raw) else {
            return bad("not an absolute URL");
        };
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http && is_loopback_host(&url) => {}
            _ => return bad("must be https"),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return bad("must not contain userinfo");
        }
        if url.fragment().is_some() {
            return bad("must not contain a fragment");
        }
        let Some(host) = url.host_str() else {
            return bad("has no host");
        };
        let host = host.to_ascii_lowercase();
        if host != self.issuer_host && !self.allowed_hosts.contains(&host) {
            return bad("host is neither the issuer's nor in allowed_jwks_hosts");
        }
        Ok(url)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn rules() -> JwksUriRules {
        JwksUriRules {
            issuer: "https://gitlab.example.com".into(),
            issuer_host: "gitlab.example.com".into(),
            allowed_hosts: vec!["keys.example.net".into()],
            allow_insecure_http: false,
        }
    }

    fn doc(issuer: &str, jwks: &str) -> Vec<u8> {
        serde_json::json!({"issuer": issuer, "jwks_uri": jwks})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_discovery_url_is_built_from_the_issuer_without_its_trailing_slash() {
        assert_eq!(
            discovery_url("https://gitlab.example.com/")
                .unwrap()
                .as_str(),
            "https://gitlab.example.com/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://example.com/gitlab")
                .unwrap()
                .as_str(),
            "https://example.com/gitlab/.well-known/openid-configuration"
        );
    }

    #[test]
    fn a_gitlab_document_yields_its_jwks_uri() {
        let u = rules()
            .jwks_uri(&doc(
                "https://gitlab.example.com",
                "https://gitlab.example.com/oauth/discovery/keys",
            ))
            .unwrap();
        assert_eq!(u.path(), "/oauth/discovery/keys");
        rules()
            .jwks_uri(&doc(
                "https://gitlab.example.com",
                "https://KEYS.example.net/k",
            ))
            .unwrap();
    }

    #[test]
    fn an_issuer_that_differs_in_any_byte_is_refused() {
        for iss in [
            "https://gitlab.example.com/",
            "https://GITLAB.example.com",
            "http://gitlab.example.com",
            "https://gitlab.example.com.evil",
        ] {
            let e = rules()
                .jwks_uri(&doc(iss, "https://gitlab.example.com/k"))
                .unwrap_err();
            assert!(matches!(e, DiscoveryError::IssuerMismatch { .. }), "{iss}");
        }
    }

    #[test]
    fn jwks_uris_elsewhere_or_insecure_are_refused() {
        for uri in [
            "https://evil.example.com/keys",
            "http://gitlab.example.com/keys",
            "https://user@gitlab.example.com/keys",
            "https://gitlab.example.com/keys#x",
            "/oauth/discovery/keys",
            "http://127.0.0.1/keys",
            "file:///etc/passwd",
        ] {
            let e = rules()
                .jwks_uri(&doc("https://gitlab.example.com", uri))
                .unwrap_err();
            assert!(matches!(e, DiscoveryError::JwksUri(_)), "{uri}");
        }
    }

    #[test]
    fn invalid_documents_are_refused() {
        for body in [
            &b"<html>"[..],
            br#"{"issuer":"https://gitlab.example.com"}"#,
            br#"{"issuer":["https://gitlab.example.com"],"jwks_uri":"https://gitlab.example.com/k"}"#,
            br#"{"issuer":"https://gitlab.example.com","jwks_uri":"https://gitlab.example.com/k","jwks_uri":"https://evil/k"}"#,
        ] {
            assert!(matches!(
                rules().jwks_uri(body),
                Err(DiscoveryError::Invalid(_))
            ));
        }
    }
}
