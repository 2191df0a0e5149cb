//! Stage 3 — mint: a [`Grant`](crate::policy::Grant) in, a signed RFC 9068
//! access token out.
