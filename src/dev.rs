//! The development issuer behind `cistern serve --dev`: a GitLab stand-in
//! that publishes a discovery document and a JWKS, and mints GitLab-shaped
//! RS256 ID tokens, so the whole exchange can be tried without a GitLab.
//!
//! It can only be built with a [`DevMode`] proof, whose single constructor
//! [`DevMode::i_am_in_dev_mode`] is easy to grep for: only `serve --dev`
//! may call it. A dev issuer's key is fresh per process and never persisted.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

/// Proof that the process runs in development mode.
#[derive(Debug)]
pub struct DevMode(());

impl DevMode {
    /// Asserts development mode. Only `cistern serve --dev` calls this; any
    /// other call site is a bug to be caught in review (grep for it).
    pub fn i_am_in_dev_mode() -> Self {
        DevMode(())
    }
}

/// Why the development issuer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevError {
    /// The RSA key could not be generated.
    #[error("could not generate the dev issuer key")]
    KeyGeneration,
    /// Signing failed.
    #[error("could not sign the dev token")]
    Signing,
    /// The claims could not be serialized.
    #[error("could not serialize the dev token: {0}")]
    Json(String),
}

/// A development issuer with a fresh RSA-2048 key.
///
/// The private key exists only inside aws-lc's `EVP_PKEY`; cistern never
/// holds its bytes. Dropping it frees the key through aws-lc, whose
/// allocator zeroizes memory on free (`OPENSSL_free` cleanses), so the
/// private key is wiped on drop.
pub struct DevIssuer {
    key: RsaKeyPair,
    kid: String,
    n: String,
    e: String,
}

impl fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIssuer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// Generates a fresh key. Refuses to exist outside dev mode: the proof
    /// can only come from [`DevMode::i_am_in_dev_mode`].
    pub fn generate(proof: DevMode) -> Result<Self, DevError> {
        let DevMode(()) = proof;
        let key = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| DevError::KeyGeneration)?;
        Ok(Self::from_key(key))
    }

    pub(crate) fn from_key(key: RsaKeyPair) -> Self {
        let public = key.public_key();
        let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
        let kid = rfc7638_thumbprint(&n, &e);
        Self { key, kid, n, e }
    }

    /// The key id: the RFC 7638 SHA-256 thumbprint, as GitLab computes it.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK (`kty`, `kid`, `e`, `n`, `use`, `alg`), as GitLab publishes it.
    pub(crate) fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "kid": self.kid,
            "e": self.e,
            "n": self.n,
            "use": "sig",
            "alg": "RS256",
        })
    }

    /// The JWKS document.
    pub fn jwks_json(&self) -> String {
        json!({ "keys": [self.jwk()] }).to_string()
    }

    /// An OpenID discovery document naming `issuer` and `jwks_uri`.
    pub fn discovery_json(&self, issuer: &str, jwks_uri: &str) -> String {
        json!({
            "issuer": issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string()
    }

    /// Mints a GitLab-shaped RS256 ID token (header `alg`/`kid`/`typ: JWT`),
    /// with realistic defaults for every GitLab claim; `overrides` replace or
    /// add claims afterwards (a `null` override sets the claim to `null`;
    /// `sub` is not recomputed from overridden claims).
    pub fn mint_id_token(
        &self,
        issuer: &str,
        audience: &str,
        overrides: &Map<String, Value>,
        now_secs: i64,
        ttl_secs: i64,
    ) -> Result<String, DevError> {
        let mut claims = default_claims(issuer, audience, now_secs, ttl_secs);
        for (k, v) in overrides {
            claims.insert(k.clone(), v.clone());
        }
        let header = json!({"alg": "RS256", "kid": self.kid, "typ": "JWT"});
        let payload = serde_json::to_vec(&claims).map_err(|e| DevError::Json(e.to_string()))?;
        let header = serde_json::to_vec(&header).map_err(|e| DevError::Json(e.to_string()))?;
        self.sign_compact(&header, &payload)
    }

    /// The public key as PKCS#1 and as SPKI DER (tests of key confusion).
    #[cfg(test)]
    pub(crate) fn public_key_ders(&self) -> (Vec<u8>, Vec<u8>) {
        use aws_lc_rs::encoding::AsDer;
        let public = self.key.public_key();
        let spki = public
            .as_der()
            .map(|d| d.as_ref().to_vec())
            .unwrap_or_default();
        (public.as_ref().to_vec(), spki)
    }

    /// Signs arbitrary header and payload bytes as a compact RS256 JWS.
    pub(crate) fn sign_compact(&self, header: &[u8], payload: &[u8]) -> Result<String, DevError> {
        let mut out = URL_SAFE_NO_PAD.encode(header);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut out);
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                out.as_bytes(),
                &mut sig,
            )
            .map_err(|_| DevError::Signing)?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&sig, &mut out);
        Ok(out)
    }
}

/// base64url(SHA-256 of the canonical `{"e","kty","n"}` JSON) — RFC 7638.
fn rfc7638_thumbprint(n: &str, e: &str) -> String {
    let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(d.as_ref())
}

fn default_claims(issuer: &str, audience: &str, now: i64, ttl: i64) -> Map<String, Value> {
    let jti = uuid::Uuid::new_v4().to_string();
    let v = json!({
        "project_id": "42",
        "project_path": "acme/payments",
        "namespace_id": "7",
        "namespace_path": "acme",
        "job_project_id": "42",
        "job_project_path": "acme/payments",
        "job_namespace_id": "7",
        "job_namespace_path": "acme",
        "user_id": "1",
        "user_login": "dev-user",
        "user_email": "dev-user@example.com",
        "user_access_level": "maintainer",
        "pipeline_id": "1001",
        "pipeline_source": "push",
        "job_id": "5001",
        "ref": "main",
        "ref_type": "branch",
        "ref_path": "refs/heads/main",
        "ref_protected": "true",
        "runner_id": 1,
        "runner_environment": "self-hosted",
        "sha": "0123456789abcdef0123456789abcdef01234567",
        "project_visibility": "private",
        "ci_config_ref_uri": "gitlab.example.com/acme/payments//.gitlab-ci.yml@refs/heads/main",
        "ci_config_sha": "0123456789abcdef0123456789abcdef01234567",
        "job_source": "push",
        "jti": jti,
        "iss": issuer,
        "iat": now,
        "nbf": now.saturating_sub(5),
        "exp": now.saturating_add(ttl),
        "sub": "project_path:acme/payments:ref_type:branch:ref:main",
        "aud": audience,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::oidc::claims_without_verification;

    #[test]
    fn the_kid_is_the_rfc7638_thumbprint() {
        // RFC 7638 §3.1 example key and thumbprint.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            rfc7638_thumbprint(n, "AQAB"),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn a_minted_token_carries_gitlab_claims_with_overrides_applied() {
        let dev = DevIssuer::generate(DevMode::i_am_in_dev_mode()).unwrap();
        let mut o = Map::new();
        o.insert("ref".into(), json!("release"));
        let t = dev
            .mint_id_token("https://gl.test", "https://cistern.test", &o, 1_000, 300)
            .unwrap();
        let c = claims_without_verification(&t).unwrap();
        assert_eq!(c.git_ref, "release");
        assert_eq!(c.project_id.0, 42);
        assert_eq!(c.runner_id, Some(1));
        assert_eq!(
            (c.iat.0, c.nbf.map(|n| n.0), c.exp.0),
            (1_000, Some(995), 1_300)
        );
        assert!(uuid::Uuid::parse_str(&c.jti).is_ok());
        assert!(c.aud.contains("https://cistern.test"));
        let header: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(t.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header, json!({"alg":"RS256","kid":dev.kid(),"typ":"JWT"}));
    }

    #[test]
    fn the_jwks_and_discovery_documents_name_the_key_and_issuer() {
        let dev = DevIssuer::generate(DevMode::i_am_in_dev_mode()).unwrap();
        let jwks: Value = serde_json::from_str(&dev.jwks_json()).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], dev.kid());
        assert_eq!(jwks["keys"][0]["e"], "AQAB");
        let d: Value =
            serde_json::from_str(&dev.discovery_json("https://i", "https://i/k")).unwrap();
        assert_eq!(
            (d["issuer"].as_str(), d["jwks_uri"].as_str()),
            (Some("https://i"), Some("https://i/k"))
        );
        assert!(!format!("{dev:?}").contains(&dev.n));
    }
}
