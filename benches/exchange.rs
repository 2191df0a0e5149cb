//! Exchange-path benchmarks: minting (ES256, EdDSA), the compact-JWS signer
//! alone, and the raw aws-lc-rs crypto ceiling (RS256 verify with a
//! pre-parsed key, ES256 sign with a cached key) measured side by side.
//!
//! Run with `cargo bench --features bench-fixtures --bench exchange`.

// Setup failures should abort the bench loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, ParsedPublicKey,
    RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, RsaKeyPair,
};
use cistern::clock::{Clock, SystemClock};
use cistern::config::SigningAlgorithm;
use cistern::mint::{self, fixtures};
use criterion::{Criterion, criterion_group, criterion_main};

const ISSUER: &str = "https://cistern.example.com";

fn mint_benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let token = fixtures::verified_id_token().expect("fixture payload");
    let grant = fixtures::grant("https://deploy.example.com", Duration::from_secs(900));
    let now = clock.now_millis();

    let mut group = c.benchmark_group("mint");
    for alg in [SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
        let ring = fixtures::key_ring(&tmp.path().join(alg.as_str()), alg, Arc::clone(&clock))
            .expect("key ring");
        let sample = mint::mint(&ring, ISSUER, &grant, &token, now).expect("mint");
        eprintln!(
            "{} access token: {} bytes",
            alg.as_str(),
            sample.access_token.len()
        );
        group.bench_function(alg.as_str(), |b| {
            b.iter(|| mint::mint(&ring, ISSUER, black_box(&grant), black_box(&token), now))
        });
        let payload = sample
            .access_token
            .split('.')
            .nth(1)
            .map(|p| {
                use base64::Engine as _;
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p)
                    .expect("payload")
            })
            .expect("three segments");
        group.bench_function(format!("sign_compact/{}", alg.as_str()), |b| {
            b.iter(|| ring.sign_compact("at+jwt", black_box(&payload)))
        });
    }
    group.finish();
}

/// The crypto ceiling the exchange is compared against, measured in the same run.
fn ceiling_benches(c: &mut Criterion) {
    // A 1.4 KB signing input, the size of a GitLab ID token's header.payload.
    let msg = vec![b'a'; 1400];
    let rng = SystemRandom::new();

    let rsa = RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa key");
    let mut sig = vec![0; rsa.public_modulus_len()];
    rsa.sign(&RSA_PKCS1_SHA256, &rng, &msg, &mut sig)
        .expect("rsa sign");
    let rsa_pub = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, rsa.public_key().as_ref())
        .expect("rsa public key");
    assert!(rsa_pub.verify_sig(&msg, &sig).is_ok());

    let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec key");

    let mut group = c.benchmark_group("ceiling");
    group.bench_function("rs256_verify_preparsed", |b| {
        b.iter(|| rsa_pub.verify_sig(black_box(&msg), black_box(&sig)))
    });
    group.bench_function("es256_sign_cached", |b| {
        b.iter(|| ec.sign(&rng, black_box(&msg)))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = mint_benches, ceiling_benches
}
criterion_main!(benches);
