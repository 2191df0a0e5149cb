//! cistern: a security token service for CI/CD pipelines.
//!
//! The exchange follows the data, one module per stage:
//! [`oidc`] (verify) → [`policy`] (decide) → [`mint`] (issue) →
//! [`store`] (record) → [`http`] (respond). Each stage hands the next a
//! proof type that only it can build: [`oidc::VerifiedIdToken`],
//! [`policy::Grant`], [`mint::MintedToken`]. Read `docs/architecture.md` first.

pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dev;
pub mod exchange;
pub mod http;
pub mod metrics;
pub mod mint;
pub mod oidc;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod revoke;
pub mod source;
pub mod store;
