//! The operator's one-time authorization of a refresh-token provider: the
//! authorization code grant (RFC 6749 §4.1) with PKCE S256 (RFC 7636), a
//! `state` bound to this attempt, and a loopback redirect (RFC 8252 §7.3).
//! The pieces here are pure; `cli/provider.rs` runs the listener.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq as _;
use url::Url;
use zeroize::Zeroizing;

/// Why an authorization attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizeError {
    /// The system random generator failed.
    #[error("no system randomness")]
    Random,
    /// The redirect did not carry this attempt's `state` (a stale tab, or a forgery).
    #[error("the redirect's state does not match this authorization attempt")]
    StateMismatch,
    /// The IdP answered with an error (RFC 6749 §4.1.2.1).
    #[error("the IdP refused the authorization: {0}")]
    Refused(String),
    /// The redirect carried neither a code nor an error.
    #[error("the redirect carries no authorization code")]
    NoCode,
}

/// One attempt's secrets: the PKCE verifier and the `state`. Never printed.
pub struct Attempt {
    /// PKCE `code_verifier`: 43 characters of base64url (32 random bytes).
    pub verifier: Zeroizing<String>,
    /// `state`: 32 random bytes, base64url.
    pub state: Zeroizing<String>,
}

fn random_b64(bytes: usize) -> Result<Zeroizing<String>, AuthorizeError> {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    aws_lc_rs::rand::fill(&mut b).map_err(|_| AuthorizeError::Random)?;
    Ok(Zeroizing::new(URL_SAFE_NO_PAD.encode(&*b)))
}

/// The S256 challenge of a verifier: `BASE64URL(SHA256(verifier))`.
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

impl Attempt {
    /// A fresh verifier and state.
    pub fn new() -> Result<Attempt, AuthorizeError> {
        Ok(Attempt {
            verifier: random_b64(32)?,
            state: random_b64(32)?,
        })
    }

    /// The URL the operator opens: `base` with the authorization request
    /// appended to whatever query it already has.
    pub fn url(
        &self,
        base: &Url,
        client_id: &str,
        redirect_uri: &str,
        scopes: &[String],
        extra: &std::collections::BTreeMap<String, String>,
    ) -> Url {
        let mut url = base.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", client_id)
                .append_pair("redirect_uri", redirect_uri);
            if !scopes.is_empty() {
                q.append_pair("scope", &scopes.join(" "));
            }
            q.append_pair("state", &self.state)
                .append_pair("code_challenge", &challenge(&self.verifier))
                .append_pair("code_challenge_method", "S256");
            for (k, v) in extra {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// Reads the redirect's query: the code if `state` is this attempt's
    /// (compared in constant time) and the IdP sent one.
    pub fn code_from(&self, query: &str) -> Result<Zeroizing<String>, AuthorizeError> {
        let mut state = None;
        let mut code = None;
        let mut error = None;
        let mut description = None;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "state" => &mut state,
                "code" => &mut code,
                "error" => &mut error,
                "error_description" => &mut description,
                _ => continue,
            };
            if slot.is_some() {
                // RFC 6749 §3.1: parameters must not repeat.
                return Err(AuthorizeError::StateMismatch);
            }
            *slot = Some(Zeroizing::new(v.into_owned()));
        }
        let matches = state.as_ref().is_some_and(|s| {
            s.len() == self.state.len() && bool::from(s.as_bytes().ct_eq(self.state.as_bytes()))
        });
        if !matches {
            return Err(AuthorizeError::StateMismatch);
        }
        if let Some(e) = error {
            let text: String = format!(
                "{} {}",
                e.as_str(),
                description.as_ref().map_or("", |d| d.as_str())
            )
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect();
            return Err(AuthorizeError::Refused(text.trim_end().to_owned()));
        }
        code.filter(|c| !c.is_empty()).ok_or(AuthorizeError::NoCode)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_s256_challenge_is_rfc_7636s_example() {
        // RFC 7636 Appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn attempts_are_random_and_verifiers_are_within_rfc_7636s_bounds() {
        let a = Attempt::new().unwrap();
        let b = Attempt::new().unwrap();
        assert_ne!(*a.verifier, *b.verifier);
        assert_ne!(*a.state, *b.state);
        assert_eq!(a.verifier.len(), 43);
        assert!(
            a.verifier
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~".contains(c))
        );
    }

    #[test]
    fn the_url_carries_the_request_and_keeps_the_base_query() {
        let a = Attempt::new().unwrap();
        let base = Url::parse("https://idp.example/authorize?tenant=x").unwrap();
        let extra = BTreeMap::from([("prompt".to_owned(), "consent".to_owned())]);
        let url = a.url(
            &base,
            "cistern",
            "http://127.0.0.1:9/callback",
            &["openid".into(), "offline_access".into()],
            &extra,
        );
        let q: BTreeMap<String, String> = url.query_pairs().into_owned().collect();
        assert_eq!(q["tenant"], "x");
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], "cistern");
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:9/callback");
        assert_eq!(q["scope"], "openid offline_access");
        assert_eq!(q["state"], *a.state);
        assert_eq!(q["code_challenge"], challenge(&a.verifier));
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["prompt"], "consent");
        // The verifier itself never leaves.
        assert!(!url.as_str().contains(a.verifier.as_str()));
    }

    #[test]
    fn the_redirect_is_accepted_only_with_this_attempts_state() {
        let a = Attempt::new().unwrap();
        let st = a.state.as_str();
        assert_eq!(
            a.code_from(&format!("code=abc&state={st}"))
                .unwrap()
                .as_str(),
            "abc"
        );
        assert_eq!(
            a.code_from("code=abc&state=other").unwrap_err(),
            AuthorizeError::StateMismatch
        );
        assert_eq!(
            a.code_from("code=abc").unwrap_err(),
            AuthorizeError::StateMismatch
        );
        assert_eq!(
            a.code_from(&format!("code=abc&state={st}&state={st}"))
                .unwrap_err(),
            AuthorizeError::StateMismatch
        );
        assert_eq!(
            a.code_from(&format!("state={st}")).unwrap_err(),
            AuthorizeError::NoCode
        );
        assert_eq!(
            a.code_from(&format!(
                "error=access_denied&error_description=End-User%20aborted&state={st}"
            ))
            .unwrap_err(),
            AuthorizeError::Refused("access_denied End-User aborted".into())
        );
        // An error with a wrong state is a state mismatch, not the IdP's word.
        assert_eq!(
            a.code_from("error=access_denied&state=x").unwrap_err(),
            AuthorizeError::StateMismatch
        );
    }
}
