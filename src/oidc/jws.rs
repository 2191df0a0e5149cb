//! Compact JWS parsing, by hand, strictly.
//!
//! Only the compact serialization of an RS256 JWS is accepted: exactly three
//! segments of unpadded base64url (RFC 7515 §2, App. C) with canonical
//! trailing bits. The header is parsed into a typed struct (duplicate members
//! are an error, RFC 7515 §5.2) and checked before anything else is looked at:
//!
//! * `alg` must be exactly `"RS256"` (case-sensitive, RFC 7515 §4.1.1);
//!   `none`, `HS*`, `PS*`, `ES*`, … are refused as
//!   [`VerifyError::UnsupportedAlgorithm`].
//! * `crit`, in any form (even `null` or `[]`), is refused: cistern
//!   understands no extension, so RFC 7515 §4.1.11 requires rejection.
//! * `jwk`, `jku`, `x5u` and `x5c` are refused outright. cistern never uses them
//!   (keys come only from the configured issuer's JWKS), but a token that
//!   carries them is either an attack (CVE-2018-0114, `jku` SSRF) or not
//!   GitLab's, so refusing is safer than ignoring.
//! * `typ`, when present, must be `JWT` (case-insensitive). In particular
//!   `at+jwt` — cistern's own access tokens — is refused, so a minted token
//!   can never be replayed as a subject token (RFC 8725 §3.11).

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, IgnoredAny};
use serde::{Deserialize, Deserializer};

use super::VerifyError;

/// Largest RSA signature accepted (8192-bit modulus).
pub(crate) const MAX_SIGNATURE_BYTES: usize = 1024;
/// Largest decoded header accepted; GitLab's is ~80 bytes.
const MAX_HEADER_BYTES: usize = 1024;

/// The three segments of a compact JWS, still encoded.
#[derive(Clone, Copy)]
pub(crate) struct Compact<'t> {
    /// `BASE64URL(header) "." BASE64URL(payload)`: the signed bytes.
    pub(crate) signing_input: &'t str,
    pub(crate) header_b64: &'t str,
    pub(crate) payload_b64: &'t str,
    pub(crate) signature_b64: &'t str,
}

/// Splits a compact JWS into exactly three non-empty-header segments.
pub(crate) fn split(token: &str) -> Result<Compact<'_>, VerifyError> {
    let mut dots = token.match_indices('.').map(|(i, _)| i);
    let (Some(d1), Some(d2), None) = (dots.next(), dots.next(), dots.next()) else {
        return Err(VerifyError::Malformed(
            "expected three dot-separated segments".into(),
        ));
    };
    let header_b64 = &token[..d1];
    let payload_b64 = &token[d1 + 1..d2];
    let signature_b64 = &token[d2 + 1..];
    if header_b64.is_empty() || payload_b64.is_empty() || signature_b64.is_empty() {
        return Err(VerifyError::Malformed("empty segment".into()));
    }
    Ok(Compact {
        signing_input: &token[..d2],
        header_b64,
        payload_b64,
        signature_b64,
    })
}

/// Strict base64url decoding (no padding, no whitespace, canonical trailing bits).
pub(crate) fn decode(segment: &str, what: &str) -> Result<Vec<u8>, VerifyError> {
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| VerifyError::Malformed(format!("{what} is not unpadded base64url")))
}

/// A decoded RSA signature, kept on the stack.
pub(crate) struct Signature {
    buf: [u8; MAX_SIGNATURE_BYTES],
    len: usize,
}

impl Signature {
    /// Decodes the signature segment.
    pub(crate) fn decode(segment: &str) -> Result<Self, VerifyError> {
        // 4 chars carry 3 bytes; anything longer cannot be an RSA-8192 signature.
        if segment.len() > MAX_SIGNATURE_BYTES.div_ceil(3) * 4 {
            return Err(VerifyError::Malformed("signature too long".into()));
        }
        let mut buf = [0u8; MAX_SIGNATURE_BYTES];
        let len = URL_SAFE_NO_PAD
            .decode_slice(segment, &mut buf)
            .map_err(|_| VerifyError::Malformed("signature is not unpadded base64url".into()))?;
        Ok(Self { buf, len })
    }

    /// The signature bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The JOSE header, after every check in the module docs passed.
#[derive(Debug)]
pub(crate) struct Header<'h> {
    /// Key id; `None` when absent (the caller refuses such tokens).
    pub(crate) kid: Option<Cow<'h, str>>,
}

/// Decodes the header segment into a buffer the parsed [`Header`] borrows from.
pub(crate) fn decode_header(compact: &Compact<'_>) -> Result<Vec<u8>, VerifyError> {
    if compact.header_b64.len() > MAX_HEADER_BYTES.div_ceil(3) * 4 {
        return Err(VerifyError::Malformed("header too long".into()));
    }
    decode(compact.header_b64, "header")
}

impl<'h> Header<'h> {
    /// Parses and checks the header JSON.
    pub(crate) fn parse(bytes: &'h [u8]) -> Result<Self, VerifyError> {
        let raw: RawHeader<'h> = serde_json::from_slice(bytes)
            .map_err(|e| VerifyError::Malformed(format!("header: {e}")))?;
        match raw.alg {
            Member::Present(JStr(a)) if a == "RS256" => {}
            Member::Present(JStr(a)) => {
                return Err(VerifyError::UnsupportedAlgorithm(truncate(&a)));
            }
            Member::Absent => return Err(VerifyError::UnsupportedAlgorithm(String::new())),
        }
        if raw.crit.is_present() {
            return Err(VerifyError::RefusedHeader("crit".into()));
        }
        for (name, m) in [
            ("jwk", &raw.jwk),
            ("jku", &raw.jku),
            ("x5u", &raw.x5u),
            ("x5c", &raw.x5c),
        ] {
            if m.is_present() {
                return Err(VerifyError::RefusedHeader(name.into()));
            }
        }
        if let Member::Present(JStr(t)) = &raw.typ
            && !t.eq_ignore_ascii_case("JWT")
        {
            return Err(VerifyError::RefusedHeader(format!("typ {:?}", truncate(t))));
        }
        Ok(Header {
            kid: match raw.kid {
                Member::Present(JStr(k)) => Some(k),
                Member::Absent => None,
            },
        })
    }
}

/// Attacker-chosen strings reach logs only bounded (and `{:?}`-escaped by the caller).
fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The header as sent. Unknown members are ignored (RFC 7515 §4: unless
/// `crit` names them, which is refused); known ones must not repeat.
#[derive(Deserialize)]
struct RawHeader<'h> {
    #[serde(default, borrow)]
    alg: Member<JStr<'h>>,
    #[serde(default, borrow)]
    kid: Member<JStr<'h>>,
    #[serde(default, borrow)]
    typ: Member<JStr<'h>>,
    #[serde(default)]
    crit: Member<IgnoredAny>,
    #[serde(default)]
    jwk: Member<IgnoredAny>,
    #[serde(default)]
    jku: Member<IgnoredAny>,
    #[serde(default)]
    x5u: Member<IgnoredAny>,
    #[serde(default)]
    x5c: Member<IgnoredAny>,
}

/// A JSON object member that is either absent or present with a `T`.
/// Unlike `Option<T>`, a present `null` is not "absent": it must parse as `T`.
#[derive(Debug, Default)]
pub(crate) enum Member<T> {
    #[default]
    Absent,
    Present(T),
}

impl<T> Member<T> {
    fn is_present(&self) -> bool {
        matches!(self, Member::Present(_))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Member<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Member::Present)
    }
}

/// A JSON string, borrowed from the input when it has no escapes.
#[derive(Debug)]
pub(crate) struct JStr<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for JStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> de::Visitor<'de> for V<'a> {
            type Value = JStr<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<JStr<'a>, E> {
                Ok(JStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<JStr<'a>, E> {
                Ok(JStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}

/// Reads the unverified `iss`, only to pick which configured issuer verifies
/// the token. Absent or non-string `iss` → [`VerifyError::UntrustedIssuer`].
pub(crate) fn peek_iss(payload: &[u8]) -> Result<Cow<'_, str>, VerifyError> {
    #[derive(Deserialize)]
    struct Peek<'p> {
        #[serde(default, borrow)]
        iss: Member<JStr<'p>>,
    }
    match serde_json::from_slice::<Peek<'_>>(payload) {
        Ok(Peek {
            iss: Member::Present(JStr(iss)),
        }) => Ok(iss),
        Ok(Peek {
            iss: Member::Absent,
        }) => Err(VerifyError::UntrustedIssuer),
        // Error path only: tell "not JSON" apart from "iss of the wrong type/duplicated".
        Err(e) => match serde_json::from_slice::<IgnoredAny>(payload) {
            Ok(_) => Err(VerifyError::UntrustedIssuer),
            Err(_) => Err(VerifyError::Malformed(format!("payload: {e}"))),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn header(json: &str) -> Result<(), VerifyError> {
        Header::parse(json.as_bytes()).map(|_| ())
    }

    #[test]
    fn a_gitlab_header_parses_and_borrows_its_kid() {
        let bytes = br#"{"alg":"RS256","kid":"abc","typ":"JWT"}"#;
        let h = Header::parse(bytes).unwrap();
        assert!(matches!(h.kid, Some(Cow::Borrowed("abc"))));
    }

    #[test]
    fn alg_none_in_every_spelling_is_refused() {
        for alg in ["none", "None", "NONE", "nOnE"] {
            let e = header(&format!(r#"{{"alg":"{alg}","kid":"k"}}"#)).unwrap_err();
            assert_eq!(e, VerifyError::UnsupportedAlgorithm(alg.into()));
        }
    }

    #[test]
    fn every_algorithm_but_exact_rs256_is_refused() {
        for alg in [
            "HS256", "HS512", "PS256", "RS512", "ES256", "EdDSA", "rs256", "RS256 ", " RS256", "",
        ] {
            let e = header(&format!(r#"{{"alg":"{alg}","kid":"k"}}"#)).unwrap_err();
            assert!(
                matches!(e, VerifyError::UnsupportedAlgorithm(_)),
                "{alg:?}: {e}"
            );
        }
        assert!(matches!(
            header(r#"{"kid":"k"}"#),
            Err(VerifyError::UnsupportedAlgorithm(_))
        ));
        for bad in [r#"{"alg":null}"#, r#"{"alg":["RS256"]}"#, r#"{"alg":256}"#] {
            assert!(
                matches!(header(bad), Err(VerifyError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn crit_in_any_form_is_refused() {
        for crit in [
            r#"["exp"]"#,
            "[]",
            r#"["b64"],"b64":false"#,
            r#"["x"]"#,
            "null",
        ] {
            let e = header(&format!(r#"{{"alg":"RS256","crit":{crit}}}"#)).unwrap_err();
            assert_eq!(e, VerifyError::RefusedHeader("crit".into()), "{crit}");
        }
    }

    #[test]
    fn embedded_and_remote_key_headers_are_refused() {
        for (m, v) in [
            ("jwk", r#"{"kty":"RSA"}"#),
            ("jku", r#""http://127.0.0.1:1/keys""#),
            ("x5u", r#""http://127.0.0.1:1/x5u""#),
            ("x5c", r#"["AAAA"]"#),
        ] {
            let e = header(&format!(r#"{{"alg":"RS256","kid":"k","{m}":{v}}}"#)).unwrap_err();
            assert_eq!(e, VerifyError::RefusedHeader(m.into()));
        }
    }

    #[test]
    fn typ_must_be_jwt_in_any_case_when_present() {
        for ok in [r#""JWT""#, r#""jwt""#, r#""Jwt""#] {
            header(&format!(r#"{{"alg":"RS256","typ":{ok}}}"#)).unwrap();
        }
        header(r#"{"alg":"RS256"}"#).unwrap();
        for bad in [r#""at+jwt""#, r#""application/at+JWT""#, r#""JOSE""#] {
            let e = header(&format!(r#"{{"alg":"RS256","typ":{bad}}}"#)).unwrap_err();
            assert!(matches!(e, VerifyError::RefusedHeader(_)), "{bad}");
        }
        assert!(matches!(
            header(r#"{"alg":"RS256","typ":null}"#),
            Err(VerifyError::Malformed(_))
        ));
    }

    #[test]
    fn duplicate_header_members_are_refused() {
        let e = header(r#"{"alg":"RS256","alg":"none"}"#).unwrap_err();
        assert!(
            matches!(e, VerifyError::Malformed(ref m) if m.contains("duplicate")),
            "{e}"
        );
        let e = header(r#"{"alg":"RS256","kid":"a","kid":"b"}"#).unwrap_err();
        assert!(matches!(e, VerifyError::Malformed(_)));
    }

    #[test]
    fn only_three_non_empty_segments_split() {
        assert!(split("a.b.c").is_ok());
        for bad in [
            "a.b", "a.b.c.d", "a.b.c.", ".b.c", "a..c", "a.b.", "abc", "",
        ] {
            assert!(
                matches!(split(bad), Err(VerifyError::Malformed(_))),
                "{bad}"
            );
        }
        let c = split("h.p.s").unwrap();
        assert_eq!(c.signing_input, "h.p");
    }

    #[test]
    fn base64_must_be_unpadded_canonical_and_without_whitespace() {
        assert_eq!(decode(&b64("ab"), "x").unwrap(), b"ab");
        for bad in ["YWI=", "YW I", "YWI\n", "YWJ", "YW+I", "YW/I"] {
            // "YWJ" has non-zero unused trailing bits.
            assert!(decode(bad, "x").is_err(), "{bad:?}");
        }
        assert!(Signature::decode("YWI=").is_err());
        assert!(Signature::decode(&"A".repeat(2000)).is_err());
        assert_eq!(Signature::decode("YWI").unwrap().as_bytes(), b"ab");
    }

    #[test]
    fn iss_is_peeked_without_the_rest_of_the_claims() {
        assert_eq!(
            peek_iss(br#"{"iss":"https://x","a":[1]}"#).unwrap(),
            "https://x"
        );
        for bad in [
            &br#"{"iss":["https://x"]}"#[..],
            br#"{"iss":1}"#,
            br#"{"iss":null}"#,
            br#"{}"#,
            br#"{"iss":"a","iss":"b"}"#,
        ] {
            assert_eq!(peek_iss(bad).unwrap_err(), VerifyError::UntrustedIssuer);
        }
        assert!(matches!(
            peek_iss(b"not json"),
            Err(VerifyError::Malformed(_))
        ));
    }
}
