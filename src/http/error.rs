//! One error type for every handler, with one mapping to the wire
//! (RFC 6749 §5.2 / RFC 8693 §2.2.2 codes). Clients get fixed, helpful text;
//! the full error goes to the log, never a token.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::exchange::ExchangeError;
use crate::oidc::VerifyError;
use crate::policy::Denial;
use crate::provider::ProviderError;

/// An OAuth error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthCode {
    /// `invalid_request`
    InvalidRequest,
    /// `invalid_client`
    InvalidClient,
    /// `invalid_grant` (RFC 6749 §5.2: the grant is revoked)
    InvalidGrant,
    /// `invalid_scope`
    InvalidScope,
    /// `invalid_target` (RFC 8693 / RFC 8707)
    InvalidTarget,
    /// `unsupported_grant_type`
    UnsupportedGrantType,
    /// `temporarily_unavailable`
    TemporarilyUnavailable,
    /// `server_error`
    ServerError,
}

impl OAuthCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthCode::InvalidRequest => "invalid_request",
            OAuthCode::InvalidClient => "invalid_client",
            OAuthCode::InvalidGrant => "invalid_grant",
            OAuthCode::InvalidScope => "invalid_scope",
            OAuthCode::InvalidTarget => "invalid_target",
            OAuthCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthCode::TemporarilyUnavailable => "temporarily_unavailable",
            OAuthCode::ServerError => "server_error",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            OAuthCode::InvalidClient => StatusCode::UNAUTHORIZED,
            OAuthCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            OAuthCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// An error answered to an HTTP client.
#[derive(Debug, Clone)]
pub struct AppError {
    /// The OAuth code.
    pub code: OAuthCode,
    /// `error_description`: printable ASCII, no `"` or `\` (RFC 6749 §5.2).
    pub description: String,
}

impl AppError {
    /// An error with a code and description.
    pub fn new(code: OAuthCode, description: impl Into<String>) -> Self {
        Self {
            code,
            description: sanitize(&description.into()),
        }
    }

    /// `invalid_request` with a description.
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(OAuthCode::InvalidRequest, description)
    }

    /// A server fault: the client learns nothing of the cause.
    pub fn internal() -> Self {
        Self::new(
            OAuthCode::ServerError,
            "internal error; the request was not completed",
        )
    }
}

/// RFC 6749 §5.2: `error_description` is %x20-21 / %x23-5B / %x5D-7E.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if (' '..='~').contains(&c) && c != '"' && c != '\\' {
                c
            } else {
                '\''
            }
        })
        .take(300)
        .collect()
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    error_description: &'a str,
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut res = (
            self.code.status(),
            Json(Body {
                error: self.code.as_str(),
                error_description: &self.description,
            }),
        )
            .into_response();
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.code == OAuthCode::TemporarilyUnavailable {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        res.extensions_mut().insert(self.code);
        res
    }
}

impl From<&ExchangeError> for AppError {
    fn from(e: &ExchangeError) -> Self {
        match e {
            ExchangeError::Verify(VerifyError::KeysUnavailable(_)) => AppError::new(
                OAuthCode::TemporarilyUnavailable,
                VerifyError::KeysUnavailable(String::new()).public_description(),
            ),
            ExchangeError::Verify(v) => AppError::invalid_request(v.public_description()),
            ExchangeError::Denied(d) => {
                let code = match d {
                    Denial::UnknownRole { .. } | Denial::AudienceMismatch { .. } => {
                        OAuthCode::InvalidTarget
                    }
                    Denial::ScopeNotAllowed { .. } => OAuthCode::InvalidScope,
                    _ => OAuthCode::InvalidRequest,
                };
                AppError::new(code, d.public_description())
            }
            ExchangeError::Replay => AppError::invalid_request(crate::exchange::REPLAY_DESCRIPTION),
            // RFC 6749 §5.2 `invalid_grant`: the grant (here the subject
            // token's identity) is revoked. `access_denied` belongs to the
            // authorization endpoint, and RFC 8693's `invalid_target` is
            // about the requested audience, which is not the cause.
            ExchangeError::Offboarded(_) => AppError::new(
                OAuthCode::InvalidGrant,
                crate::exchange::OFFBOARDED_DESCRIPTION,
            ),
            // The record could not be made durable (a failing audit sink in
            // fail-closed mode, a store shutting down): nothing was handed
            // out, and trying again later may work.
            ExchangeError::Store(crate::store::StoreError::Unavailable(_)) => AppError::new(
                OAuthCode::TemporarilyUnavailable,
                "the audit log cannot record this request right now; try again later",
            ),
            ExchangeError::Downstream(ProviderError::Refused { status, .. }) => AppError::new(
                OAuthCode::InvalidTarget,
                format!(
                    "the downstream service refused to issue a credential for this project ({status}); ask the role's owner"
                ),
            ),
            ExchangeError::Downstream(ProviderError::Unavailable { .. }) => AppError::new(
                OAuthCode::TemporarilyUnavailable,
                "the downstream service is unavailable; try again later",
            ),
            ExchangeError::Downstream(ProviderError::NeedsAuthorization { provider, .. }) => {
                AppError::new(
                    OAuthCode::TemporarilyUnavailable,
                    format!(
                        "the OAuth provider {provider} needs an operator to re-authorize it (cistern provider authorize {provider}); try again later"
                    ),
                )
            }
            ExchangeError::Downstream(_) => AppError::internal(),
            ExchangeError::Mint(_) | ExchangeError::Store(_) => AppError::internal(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_reduced_to_the_characters_rfc_6749_allows() {
        let e = AppError::invalid_request("bad \"quote\" and \\ and é\n");
        assert!(
            e.description
                .chars()
                .all(|c| (' '..='~').contains(&c) && c != '"' && c != '\\')
        );
    }
}
