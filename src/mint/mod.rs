//! Stage 3 — mint: a [`Grant`](crate::policy::Grant) in, a signed RFC 9068
//! access token out.
//!
//! - [`keys`]: the signing [`KeyRing`] (ES256 or EdDSA, RFC 7638 key ids,
//!   rotation, the published JWKS). Keys are parsed once and kept parsed; the
//!   compact JWS is assembled by hand over aws-lc-rs.
//! - [`token`]: [`mint`] builds the access token's claims from the grant and
//!   the verified ID token and signs them.
//! - [`verify`]: [`verify_access_token`] checks cistern's own tokens
//!   (introspection, the proxy, tests).

pub mod keys;
pub mod token;
pub mod verify;

#[cfg(any(test, feature = "bench-fixtures"))]
pub mod fixtures;

pub use keys::{JwsError, KeyError, KeyRing, PublishedKeys, Rotation};
pub use token::{MintError, MintedToken, mint, new_jti};
pub use verify::{AccessTokenClaims, OwnTokenError, PipelineClaims, verify_access_token};
