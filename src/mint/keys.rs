//! The signing key ring: cistern's own keys, parsed once and kept parsed.
//!
//! # On disk
//!
//! `signing.key_dir` (mode 0700) holds:
//! - `<kid>.key`: one private key as PKCS#8 DER (v1 for P-256, v2 for
//!   Ed25519), mode 0600. `<kid>` is the key's RFC 7638 thumbprint, checked
//!   against the key itself on every load.
//! - `keys.json`: the manifest, mode 0600:
//!   `{"version":1,"keys":[{"kid":…,"algorithm":"ES256"|"EdDSA","created_at":<unix s>,"retired_at":<unix s>|null}]}`.
//!   Exactly one key has `retired_at: null`: the current key. Retired keys
//!   are published until `max_ttl + 5 minutes` after `retired_at`.
//!
//! Every file is written to a 0600 temporary file in the same directory,
//! fsynced and renamed into place, then the directory is fsynced. A key file
//! that the manifest does not name (a crash between the two writes) is
//! deleted on the next start; key files are never read unless the manifest
//! names them.

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, ParsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::config::{SigningAlgorithm, SigningConfig};

const MANIFEST: &str = "keys.json";
const MANIFEST_VERSION: u32 = 1;
const KEY_SUFFIX: &str = ".key";
/// Publication overlap beyond the longest token lifetime (clock skew, JWKS caches).
const RETIRE_GRACE: Duration = Duration::from_secs(5 * 60);
/// Largest key file read; a PKCS#8 P-256 or Ed25519 key is well under 200 bytes.
const MAX_KEY_FILE: u64 = 4096;
const MAX_MANIFEST_FILE: u64 = 1 << 20;

/// Why the key ring could not be loaded, changed or used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A key file or the key directory is accessible by group or others.
    #[error("{} is accessible by group or others (mode {mode:04o}); it must be owner-only (0600 files, 0700 directory)", path.display())]
    InsecurePermissions {
        /// The offending file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The manifest is unreadable, inconsistent or names a bad key id.
    #[error("invalid key manifest {}: {reason}", path.display())]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key file does not hold a valid private key of its algorithm.
    #[error("{} is not a valid {algorithm} PKCS#8 private key", path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// The algorithm the manifest gives it.
        algorithm: &'static str,
    },
    /// A key file's public key does not hash to the key id it is filed under.
    #[error("{} does not match its key id (thumbprint mismatch)", path.display())]
    KidMismatch {
        /// The key file.
        path: PathBuf,
    },
    /// Key files exist but the manifest does not: refuse rather than silently replace them.
    #[error("{} holds key files but no {MANIFEST}; restore the manifest or remove the key files", dir.display())]
    MissingManifest {
        /// The key directory.
        dir: PathBuf,
    },
    /// The crypto library could not generate a key.
    #[error("key generation failed")]
    Generate,
    /// The crypto library could not sign.
    #[error("signing failed")]
    Sign,
    /// The clock reads before the Unix epoch or beyond what a timestamp can hold.
    #[error("clock out of range")]
    Clock,
}

/// What [`KeyRing::rotate_if_due`] changed, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The current key id after the change. Unchanged (and `retired_kid` is
    /// `None`) when the change only dropped expired keys.
    pub new_kid: String,
    /// The key that stopped signing; still published until it is dropped.
    pub retired_kid: Option<String>,
    /// Retired keys dropped from the ring and deleted from disk.
    pub dropped: Vec<String>,
}

/// cistern's signing keys: one current key that signs, plus retired keys that
/// are still published and verifiable. Readers never block; rotation swaps the
/// whole set atomically.
pub struct KeyRing {
    state: ArcSwap<RingState>,
    dir: PathBuf,
    algorithm: SigningAlgorithm,
    rotation_period_secs: i64,
    retire_after_secs: i64,
    clock: Arc<dyn Clock>,
    /// Serialises rotations (disk writes and the swap); readers do not take it.
    rotate_lock: Mutex<()>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.load();
        f.debug_struct("KeyRing")
            .field("dir", &self.dir)
            .field("algorithm", &self.algorithm)
            .field("current_kid", &state.current.kid)
            .field("published", &state.published.len())
            .finish_non_exhaustive()
    }
}

/// One immutable snapshot of the ring.
struct RingState {
    manifest: Manifest,
    current: Arc<CurrentKey>,
    /// Current key first, then retired keys, newest first.
    published: Vec<Arc<PublicKey>>,
    jwks: Arc<str>,
}

/// The key that signs. Its private half lives only inside aws-lc.
struct CurrentKey {
    kid: String,
    signer: Signer,
    /// base64url of the `at+jwt` header, the one almost every signature uses.
    at_jwt_header_b64: String,
}

enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// Public keys of a key ring, loaded read-only: what an offline verifier
/// (`cistern audit verify`) checks cistern's signatures against.
#[derive(Clone)]
pub struct PublishedKeys(Vec<Arc<PublicKey>>);

impl fmt::Debug for PublishedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|k| k.kid.as_str()))
            .finish()
    }
}

/// Why a compact JWS did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    /// Not three base64url segments with a JSON header.
    #[error("malformed JWS ({0})")]
    Malformed(&'static str),
    /// The header's `typ` is not the one expected.
    #[error("unexpected JWS type")]
    WrongType,
    /// No held key has the header's `kid`.
    #[error("signed by key {0}, which is not held")]
    UnknownKey(String),
    /// `alg` differs from the key's algorithm.
    #[error("algorithm does not match the key")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

impl PublishedKeys {
    /// Reads the key directory's manifest and keys without changing
    /// anything (no generation, rotation or clean-up) and keeps only the
    /// public halves.
    pub fn load(dir: &Path) -> Result<PublishedKeys, KeyError> {
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        Ok(PublishedKeys(load_state(dir, manifest)?.published))
    }

    /// Key ids held.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|k| k.kid.as_str())
    }

    /// Verifies a compact JWS whose header is exactly `{alg, kid, typ}` with
    /// `typ == expected_typ`; returns the kid and the decoded payload.
    pub fn verify_compact(
        &self,
        jws: &str,
        expected_typ: &str,
    ) -> Result<(String, Vec<u8>), JwsError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct OwnHeader {
            alg: String,
            kid: String,
            typ: String,
        }
        let mut parts = jws.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed("not three segments"));
        };
        let decode = |s: &str, what| {
            URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| JwsError::Malformed(what))
        };
        let header: OwnHeader = serde_json::from_slice(&decode(h64, "header")?)
            .map_err(|_| JwsError::Malformed("header json"))?;
        if header.typ != expected_typ {
            return Err(JwsError::WrongType);
        }
        let key = self
            .0
            .iter()
            .find(|k| k.kid == header.kid)
            .ok_or_else(|| JwsError::UnknownKey(header.kid.clone()))?;
        if header.alg != key.algorithm.as_str() {
            return Err(JwsError::WrongAlgorithm);
        }
        let sig = decode(s64, "signature")?;
        let signed = jws
            .as_bytes()
            .get(..h64.len() + 1 + p64.len())
            .ok_or(JwsError::Malformed("not three segments"))?;
        key.verifier
            .verify_sig(signed, &sig)
            .map_err(|_| JwsError::BadSignature)?;
        Ok((header.kid, decode(p64, "payload")?))
    }
}

/// A published key, parsed for verification.
pub(crate) struct PublicKey {
    pub(crate) kid: String,
    pub(crate) algorithm: SigningAlgorithm,
    pub(crate) verifier: ParsedPublicKey,
    jwk: Jwk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    version: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    algorithm: StoredAlgorithm,
    created_at: i64,
    retired_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum StoredAlgorithm {
    ES256,
    EdDSA,
}

impl From<SigningAlgorithm> for StoredAlgorithm {
    fn from(a: SigningAlgorithm) -> Self {
        match a {
            SigningAlgorithm::ES256 => StoredAlgorithm::ES256,
            SigningAlgorithm::EdDSA => StoredAlgorithm::EdDSA,
        }
    }
}

impl From<StoredAlgorithm> for SigningAlgorithm {
    fn from(a: StoredAlgorithm) -> Self {
        match a {
            StoredAlgorithm::ES256 => SigningAlgorithm::ES256,
            StoredAlgorithm::EdDSA => SigningAlgorithm::EdDSA,
        }
    }
}

/// A JWK as published (RFC 7517 / RFC 7518 §6.2 / RFC 8037).
#[derive(Debug, Clone, Serialize)]
struct Jwk {
    kty: &'static str,
    crv: &'static str,
    x: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    kid: String,
    #[serde(rename = "use")]
    use_: &'static str,
    alg: &'static str,
}

#[derive(Serialize)]
struct Jwks<'a> {
    keys: Vec<&'a Jwk>,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    kid: &'a str,
    typ: &'a str,
}

impl KeyRing {
    /// Loads the keys in `cfg.key_dir`, generating the first one on first
    /// start. Creates the directory 0700 and key files 0600 (written to a 0600
    /// temporary file, then renamed); refuses a key file or directory that
    /// group or others can access (the error names it). When the configured
    /// algorithm differs from the current key's, a key of the configured
    /// algorithm becomes current and the old one is retired.
    pub fn open(
        cfg: &SigningConfig,
        clock: Arc<dyn Clock>,
        max_ttl: Duration,
    ) -> Result<KeyRing, KeyError> {
        let dir = cfg.key_dir.clone();
        ensure_private_dir(&dir)?;
        let now = clock.now_secs();
        if now < 0 {
            return Err(KeyError::Clock);
        }
        let manifest_path = dir.join(MANIFEST);
        let state = if manifest_path.exists() {
            let manifest = read_manifest(&manifest_path)?;
            load_state(&dir, manifest)?
        } else {
            if !key_files(&dir)?.is_empty() {
                return Err(KeyError::MissingManifest { dir });
            }
            let (entry, key, public) = create_key(&dir, cfg.algorithm, now)?;
            let manifest = Manifest {
                version: MANIFEST_VERSION,
                keys: vec![entry],
            };
            write_manifest(&dir, &manifest)?;
            tracing::info!(kid = %key.kid, alg = cfg.algorithm.as_str(), "generated the first signing key");
            RingState::new(manifest, Arc::new(key), vec![public])?
        };
        let ring = KeyRing::assemble(state, dir, cfg, clock, max_ttl)?;
        if ring.stored_current_algorithm() != ring.algorithm {
            let rotation = ring.rotate(true)?;
            tracing::info!(
                new_kid = rotation.as_ref().map(|r| r.new_kid.as_str()),
                alg = ring.algorithm.as_str(),
                "signing algorithm changed; rotated to a new key"
            );
        }
        sweep_orphans(&ring.dir, &ring.state.load().manifest)?;
        Ok(ring)
    }

    /// Opens keys another process manages (`cistern serve`), never writing:
    /// for `cistern proxy`, which only verifies. No manifest is an error.
    pub fn open_existing(
        cfg: &SigningConfig,
        clock: Arc<dyn Clock>,
        max_ttl: Duration,
    ) -> Result<KeyRing, KeyError> {
        let dir = cfg.key_dir.clone();
        let manifest = read_manifest(&dir.join(MANIFEST))?;
        let state = load_state(&dir, manifest)?;
        KeyRing::assemble(state, dir, cfg, clock, max_ttl)
    }

    fn assemble(
        state: RingState,
        dir: PathBuf,
        cfg: &SigningConfig,
        clock: Arc<dyn Clock>,
        max_ttl: Duration,
    ) -> Result<KeyRing, KeyError> {
        Ok(KeyRing {
            state: ArcSwap::from_pointee(state),
            dir,
            algorithm: cfg.algorithm,
            rotation_period_secs: secs_i64(cfg.rotation_period)?,
            retire_after_secs: secs_i64(max_ttl.saturating_add(RETIRE_GRACE))?,
            clock,
            rotate_lock: Mutex::new(()),
        })
    }

    /// Re-reads the key set from disk when its manifest changed (another
    /// process rotated); returns whether it did.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let manifest = read_manifest(&self.dir.join(MANIFEST))?;
        if manifest == self.state.load().manifest {
            return Ok(false);
        }
        let state = load_state(&self.dir, manifest)?;
        self.state.store(Arc::new(state));
        Ok(true)
    }

    /// Generates a new current key when the current one is older than
    /// `rotation_period`; the previous key stays published (and verifiable)
    /// until `max_ttl + 5 minutes` after the rotation, then is dropped from the
    /// ring and deleted from disk. Returns what changed (for the audit log).
    pub fn rotate_if_due(&self) -> Result<Option<Rotation>, KeyError> {
        self.rotate(false)
    }

    /// The JWKS (current and retired public keys), pre-serialized; rebuilt only on rotation.
    pub fn jwks_json(&self) -> Arc<str> {
        Arc::clone(&self.state.load().jwks)
    }

    /// The configured signing algorithm.
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// The key id of the current signing key.
    pub fn current_kid(&self) -> String {
        self.state.load().current.kid.clone()
    }

    /// Signs a compact JWS with the current key: header `{alg, kid, typ}`,
    /// then `b64url(header).b64url(payload).b64url(signature)`.
    pub fn sign_compact(&self, typ: &str, payload_json: &[u8]) -> Result<String, KeyError> {
        self.sign_compact_with_kid(typ, payload_json)
            .map(|(jws, _)| jws)
    }

    /// [`KeyRing::sign_compact`], also returning the kid of the key that signed.
    pub(crate) fn sign_compact_with_kid(
        &self,
        typ: &str,
        payload_json: &[u8],
    ) -> Result<(String, String), KeyError> {
        let state = self.state.load();
        let key = &state.current;
        let built;
        let header_b64 = if typ == AT_JWT {
            key.at_jwt_header_b64.as_str()
        } else {
            built = encode_header(key.signer.algorithm(), &key.kid, typ)?;
            built.as_str()
        };
        // 86 = base64url of a 64-byte signature (both ES256 and Ed25519).
        let mut out =
            String::with_capacity(header_b64.len() + 2 + payload_json.len().div_ceil(3) * 4 + 86);
        out.push_str(header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(payload_json, &mut out);
        let sig = key.signer.sign(out.as_bytes())?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut out);
        Ok((out, key.kid.clone()))
    }

    /// The published public keys (current and retired), for verifying
    /// signatures made by this ring.
    pub fn published_keys(&self) -> PublishedKeys {
        PublishedKeys(self.state.load().published.clone())
    }

    /// Runs `f` with the published key named `kid`, if any.
    pub(crate) fn with_public_key<R>(
        &self,
        kid: &str,
        f: impl FnOnce(&PublicKey) -> R,
    ) -> Option<R> {
        let state = self.state.load();
        state.published.iter().find(|k| k.kid == kid).map(|k| f(k))
    }

    fn stored_current_algorithm(&self) -> SigningAlgorithm {
        self.state.load().current.signer.algorithm()
    }

    /// One rotation step: a new key when `force`d or due, and drops of
    /// retired keys whose publication window has passed.
    fn rotate(&self, force: bool) -> Result<Option<Rotation>, KeyError> {
        // A poisoned lock only means another rotation panicked; the state it
        // guards is the ArcSwap, which is always whole.
        let _guard = self.rotate_lock.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.clock.now_secs();
        if now < 0 {
            return Err(KeyError::Clock);
        }
        let old = self.state.load_full();
        let current_entry = old.manifest.current()?;
        let due = force
            || now.saturating_sub(current_entry.created_at) >= self.rotation_period_secs
            || SigningAlgorithm::from(current_entry.algorithm) != self.algorithm;
        let expired: Vec<String> = old
            .manifest
            .keys
            .iter()
            .filter(|k| {
                k.retired_at
                    .is_some_and(|r| now >= r.saturating_add(self.retire_after_secs))
            })
            .map(|k| k.kid.clone())
            .collect();
        if !due && expired.is_empty() {
            return Ok(None);
        }

        let mut manifest = old.manifest.clone();
        manifest.keys.retain(|k| !expired.contains(&k.kid));
        let mut published: Vec<Arc<PublicKey>> = old
            .published
            .iter()
            .filter(|k| !expired.contains(&k.kid))
            .cloned()
            .collect();

        let (current, retired_kid) = if due {
            let (entry, key, public) = create_key(&self.dir, self.algorithm, now)?;
            for k in &mut manifest.keys {
                if k.retired_at.is_none() {
                    k.retired_at = Some(now);
                }
            }
            manifest.keys.push(entry);
            published.insert(0, public);
            (Arc::new(key), Some(old.current.kid.clone()))
        } else {
            (Arc::clone(&old.current), None)
        };
        let new_kid = current.kid.clone();
        write_manifest(&self.dir, &manifest)?;
        let state = RingState::new(manifest, current, published)?;
        self.state.store(Arc::new(state));

        for kid in &expired {
            let path = key_path(&self.dir, kid);
            if let Err(e) = fs::remove_file(&path) {
                // The manifest no longer names it, so the next start deletes it.
                tracing::warn!(kid = %kid, path = %path.display(), error = %e, "could not delete a dropped signing key");
            }
        }
        if !expired.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(Some(Rotation {
            new_kid,
            retired_kid,
            dropped: expired,
        }))
    }
}

/// The RFC 9068 `typ` of cistern's access tokens.
pub(crate) const AT_JWT: &str = "at+jwt";

impl RingState {
    fn new(
        manifest: Manifest,
        current: Arc<CurrentKey>,
        published: Vec<Arc<PublicKey>>,
    ) -> Result<Self, KeyError> {
        let jwks = Jwks {
            keys: published.iter().map(|k| &k.jwk).collect(),
        };
        // Serializing plain strings cannot fail; map it anyway rather than panic.
        let jwks = serde_json::to_string(&jwks).map_err(|_| KeyError::Sign)?;
        Ok(RingState {
            manifest,
            current,
            published,
            jwks: Arc::from(jwks),
        })
    }
}

impl Manifest {
    fn current(&self) -> Result<&KeyEntry, KeyError> {
        // Checked at load and kept by every rotation; an error here is a bug,
        // reported instead of panicking.
        self.keys
            .iter()
            .find(|k| k.retired_at.is_none())
            .ok_or_else(|| KeyError::BadManifest {
                path: PathBuf::from(MANIFEST),
                reason: "no current key".into(),
            })
    }
}

impl CurrentKey {
    fn new(kid: String, signer: Signer) -> Result<Self, KeyError> {
        let at_jwt_header_b64 = encode_header(signer.algorithm(), &kid, AT_JWT)?;
        Ok(CurrentKey {
            kid,
            signer,
            at_jwt_header_b64,
        })
    }
}

impl Signer {
    fn algorithm(&self) -> SigningAlgorithm {
        match self {
            Signer::Es256(_) => SigningAlgorithm::ES256,
            Signer::EdDsa(_) => SigningAlgorithm::EdDSA,
        }
    }

    fn sign(&self, msg: &[u8]) -> Result<aws_lc_rs::signature::Signature, KeyError> {
        match self {
            // aws-lc-rs draws its own randomness; the argument exists for ring compatibility.
            Signer::Es256(k) => k
                .sign(&SystemRandom::new(), msg)
                .map_err(|_| KeyError::Sign),
            Signer::EdDsa(k) => k.try_sign(msg).map_err(|_| KeyError::Sign),
        }
    }

    fn public_key_bytes(&self) -> &[u8] {
        match self {
            Signer::Es256(k) => k.public_key().as_ref(),
            Signer::EdDsa(k) => k.public_key().as_ref(),
        }
    }

    fn parse(alg: SigningAlgorithm, pkcs8: &[u8]) -> Option<Signer> {
        match alg {
            SigningAlgorithm::ES256 => {
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
                    .ok()
                    .map(Signer::Es256)
            }
            SigningAlgorithm::EdDSA => Ed25519KeyPair::from_pkcs8(pkcs8).ok().map(Signer::EdDsa),
        }
    }
}

impl PublicKey {
    fn from_signer(signer: &Signer) -> Result<(String, PublicKey), KeyError> {
        let alg = signer.algorithm();
        let bytes = signer.public_key_bytes();
        let ((x, y), verifier) = match alg {
            SigningAlgorithm::ES256 => {
                // Uncompressed SEC1 point: 0x04 ‖ x ‖ y.
                if bytes.len() != 65 || bytes[0] != 0x04 {
                    return Err(KeyError::Generate);
                }
                let x = URL_SAFE_NO_PAD.encode(&bytes[1..33]);
                let y = URL_SAFE_NO_PAD.encode(&bytes[33..65]);
                let v = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, bytes)
                    .map_err(|_| KeyError::Generate)?;
                ((x, Some(y)), v)
            }
            SigningAlgorithm::EdDSA => {
                if bytes.len() != 32 {
                    return Err(KeyError::Generate);
                }
                let v = ParsedPublicKey::new(&ED25519, bytes).map_err(|_| KeyError::Generate)?;
                ((URL_SAFE_NO_PAD.encode(bytes), None), v)
            }
        };
        let (kty, crv) = kty_crv(alg);
        let kid = thumbprint(kty, crv, &x, y.as_deref());
        let jwk = Jwk {
            kty,
            crv,
            x,
            y,
            kid: kid.clone(),
            use_: "sig",
            alg: alg.as_str(),
        };
        Ok((
            kid.clone(),
            PublicKey {
                kid,
                algorithm: alg,
                verifier,
                jwk,
            },
        ))
    }
}

fn kty_crv(alg: SigningAlgorithm) -> (&'static str, &'static str) {
    match alg {
        SigningAlgorithm::ES256 => ("EC", "P-256"),
        SigningAlgorithm::EdDSA => ("OKP", "Ed25519"),
    }
}

/// RFC 7638 thumbprint: SHA-256 over the required members in lexicographic
/// order without whitespace, base64url. `x`/`y` are base64url, so they need no
/// JSON escaping.
pub(crate) fn thumbprint(kty: &str, crv: &str, x: &str, y: Option<&str>) -> String {
    let canonical = match y {
        Some(y) => format!(r#"{{"crv":"{crv}","kty":"{kty}","x":"{x}","y":"{y}"}}"#),
        None => format!(r#"{{"crv":"{crv}","kty":"{kty}","x":"{x}"}}"#),
    };
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
}

fn encode_header(alg: SigningAlgorithm, kid: &str, typ: &str) -> Result<String, KeyError> {
    let json = serde_json::to_vec(&Header {
        alg: alg.as_str(),
        kid,
        typ,
    })
    .map_err(|_| KeyError::Sign)?;
    Ok(URL_SAFE_NO_PAD.encode(json))
}

fn secs_i64(d: Duration) -> Result<i64, KeyError> {
    i64::try_from(d.as_secs()).map_err(|_| KeyError::Clock)
}

/// A key id is a SHA-256 thumbprint in base64url: 43 characters of `[A-Za-z0-9_-]`.
/// Checking it keeps manifest content from naming paths outside the directory.
fn is_valid_kid(kid: &str) -> bool {
    kid.len() == 43
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(format!("{kid}{KEY_SUFFIX}"))
}

fn io_err<'p>(
    action: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> KeyError + use<'p> {
    move |source| KeyError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn ensure_private_dir(dir: &Path) -> Result<(), KeyError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create key directory", dir))?;
    }
    let meta = fs::metadata(dir).map_err(io_err("inspect key directory", dir))?;
    if !meta.is_dir() {
        return Err(KeyError::Io {
            action: "use key directory",
            path: dir.to_path_buf(),
            source: std::io::Error::other("not a directory"),
        });
    }
    check_private(dir, meta.permissions().mode())
}

fn check_private(path: &Path, mode: u32) -> Result<(), KeyError> {
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Names of `*.key` entries in the directory.
fn key_files(dir: &Path) -> Result<Vec<String>, KeyError> {
    let entries = fs::read_dir(dir).map_err(io_err("list key directory", dir))?;
    Ok(entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(KEY_SUFFIX).then_some(name)
        })
        .collect())
}

/// Reads a file after checking, on the open handle, that it is a regular
/// owner-only file no larger than `max`.
fn read_private_file(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let link = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if !link.file_type().is_file() {
        return Err(KeyError::Io {
            action: "read",
            path: path.to_path_buf(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let meta = file.metadata().map_err(io_err("inspect", path))?;
    check_private(path, meta.permissions().mode())?;
    if meta.len() > max {
        return Err(KeyError::Io {
            action: "read",
            path: path.to_path_buf(),
            source: std::io::Error::other("file too large"),
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0)));
    Read::by_ref(&mut file)
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(buf)
}

/// Writes `bytes` to `dir/name` atomically with mode 0600.
fn write_private_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), KeyError> {
    let path = dir.join(name);
    // tempfile creates the file 0600 (O_EXCL) in the same directory, so the
    // rename is atomic and the content is never visible with wider permissions.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("create a file in", dir))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_err("set permissions on", tmp.path()))?;
    tmp.write_all(bytes).map_err(io_err("write", &path))?;
    tmp.as_file().sync_all().map_err(io_err("sync", &path))?;
    tmp.persist(&path)
        .map_err(|e| io_err("rename into", &path)(e.error))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync key directory", dir))
}

fn read_manifest(path: &Path) -> Result<Manifest, KeyError> {
    let bytes = read_private_file(path, MAX_MANIFEST_FILE)?;
    let bad = |reason: String| KeyError::BadManifest {
        path: path.to_path_buf(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.version != MANIFEST_VERSION {
        return Err(bad(format!("unsupported version {}", manifest.version)));
    }
    let current = manifest
        .keys
        .iter()
        .filter(|k| k.retired_at.is_none())
        .count();
    if current != 1 {
        return Err(bad(format!(
            "{current} keys have no retired_at; exactly one must be current"
        )));
    }
    for (i, k) in manifest.keys.iter().enumerate() {
        if !is_valid_kid(&k.kid) {
            return Err(bad(format!("key {i} has an invalid kid")));
        }
        if manifest.keys[..i].iter().any(|o| o.kid == k.kid) {
            return Err(bad(format!("duplicate kid {}", k.kid)));
        }
    }
    Ok(manifest)
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), KeyError> {
    let json = serde_json::to_vec_pretty(manifest).map_err(|e| KeyError::BadManifest {
        path: dir.join(MANIFEST),
        reason: e.to_string(),
    })?;
    write_private_file(dir, MANIFEST, &json)
}

/// Reads and parses every key the manifest names.
fn load_state(dir: &Path, manifest: Manifest) -> Result<RingState, KeyError> {
    let mut current = None;
    let mut published = Vec::with_capacity(manifest.keys.len());
    // Newest first, so the JWKS lists the current key and then the most recent.
    let mut order: Vec<&KeyEntry> = manifest.keys.iter().collect();
    order.sort_by_key(|k| (k.retired_at.is_some(), std::cmp::Reverse(k.retired_at)));
    for entry in order {
        let path = key_path(dir, &entry.kid);
        let alg = SigningAlgorithm::from(entry.algorithm);
        let der = read_private_file(&path, MAX_KEY_FILE)?;
        let signer = Signer::parse(alg, &der).ok_or_else(|| KeyError::BadKey {
            path: path.clone(),
            algorithm: alg.as_str(),
        })?;
        drop(der);
        let (kid, public) = PublicKey::from_signer(&signer)?;
        if kid != entry.kid {
            return Err(KeyError::KidMismatch { path });
        }
        published.push(Arc::new(public));
        if entry.retired_at.is_none() {
            current = Some(CurrentKey::new(kid, signer)?);
        }
        // A retired key's signer is dropped here: only its public half is kept.
    }
    let current = current.ok_or_else(|| KeyError::BadManifest {
        path: dir.join(MANIFEST),
        reason: "no current key".into(),
    })?;
    RingState::new(manifest, Arc::new(current), published)
}

/// Generates a key of `alg`, writes it to `<kid>.key` and returns its manifest
/// entry, its signing handle and its public half.
fn create_key(
    dir: &Path,
    alg: SigningAlgorithm,
    now: i64,
) -> Result<(KeyEntry, CurrentKey, Arc<PublicKey>), KeyError> {
    let (signer, pkcs8) = match alg {
        SigningAlgorithm::ES256 => {
            let k = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                .map_err(|_| KeyError::Generate)?;
            // `Document` zeroizes its bytes on drop.
            let doc = k.to_pkcs8v1().map_err(|_| KeyError::Generate)?;
            (Signer::Es256(k), doc)
        }
        SigningAlgorithm::EdDSA => {
            let k = Ed25519KeyPair::generate().map_err(|_| KeyError::Generate)?;
            let doc = k.to_pkcs8().map_err(|_| KeyError::Generate)?;
            (Signer::EdDsa(k), doc)
        }
    };
    let (kid, public) = PublicKey::from_signer(&signer)?;
    write_private_file(dir, &format!("{kid}{KEY_SUFFIX}"), pkcs8.as_ref())?;
    drop(pkcs8);
    let entry = KeyEntry {
        kid: kid.clone(),
        algorithm: alg.into(),
        created_at: now,
        retired_at: None,
    };
    Ok((entry, CurrentKey::new(kid, signer)?, Arc::new(public)))
}

/// Deletes key files the manifest does not name, and leftover temporary
/// files (which may hold a partly written private key).
fn sweep_orphans(dir: &Path, manifest: &Manifest) -> Result<(), KeyError> {
    let entries = fs::read_dir(dir).map_err(io_err("list key directory", dir))?;
    let mut removed = false;
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let orphan_key = name
            .strip_suffix(KEY_SUFFIX)
            .is_some_and(|kid| !manifest.keys.iter().any(|k| k.kid == kid));
        let stale_tmp = name.starts_with(".tmp");
        if orphan_key || stale_tmp {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("delete orphaned key file", &path))?;
            tracing::warn!(file = %name, "deleted a key file the manifest does not name");
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::mint::fixtures;

    const T0: i64 = 1_767_225_600;
    const DAY: i64 = 86_400;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn open_at(
        dir: &Path,
        alg: SigningAlgorithm,
        clock: &Arc<ManualClock>,
    ) -> Result<KeyRing, KeyError> {
        fixtures::key_ring(dir, alg, clock.clone())
    }

    fn jwks_kids(ring: &KeyRing) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&ring.jwks_json()).unwrap();
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn first_start_creates_an_owner_only_directory_key_file_and_manifest() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let ring = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        let kid = ring.current_kid();
        assert!(is_valid_kid(&kid));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&key_path(&dir, &kid)), 0o600);
        assert_eq!(mode(&dir.join(MANIFEST)), 0o600);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "only the key and the manifest: {names:?}");
    }

    #[test]
    fn a_read_only_view_never_writes_and_follows_the_owners_rotations() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let cfg = SigningConfig {
            key_dir: dir.clone(),
            algorithm: SigningAlgorithm::ES256,
            rotation_period: Duration::from_secs(86_400),
        };
        // Nothing to read yet: refused, and nothing created.
        assert!(KeyRing::open_existing(&cfg, clock.clone(), Duration::from_secs(3600)).is_err());
        assert!(!dir.exists());
        let owner = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        let view = KeyRing::open_existing(&cfg, clock.clone(), Duration::from_secs(3600)).unwrap();
        assert_eq!(view.current_kid(), owner.current_kid());
        assert!(!view.reload_if_changed().unwrap());
        let rotation = owner.rotate(true).unwrap().unwrap();
        assert_ne!(view.current_kid(), rotation.new_kid);
        assert!(view.reload_if_changed().unwrap());
        assert!(!view.reload_if_changed().unwrap());
        assert_eq!(jwks_kids(&view), jwks_kids(&owner));
        assert!(jwks_kids(&view).contains(&rotation.new_kid));
    }

    #[test]
    fn reopening_the_directory_loads_the_same_key() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_secs(T0));
        for alg in [SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            let dir = tmp.path().join(alg.as_str());
            let first = open_at(&dir, alg, &clock).unwrap();
            let again = open_at(&dir, alg, &clock).unwrap();
            assert_eq!(first.current_kid(), again.current_kid());
            assert_eq!(first.jwks_json(), again.jwks_json());
            let jws = first.sign_compact("at+jwt", b"{}").unwrap();
            let verified = again.with_public_key(&first.current_kid(), |k| {
                let (signed, sig) = jws.rsplit_once('.').unwrap();
                k.verifier
                    .verify_sig(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
                    .is_ok()
            });
            assert_eq!(verified, Some(true));
        }
    }

    #[test]
    fn a_key_file_readable_by_group_is_refused_and_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let kid = open_at(&dir, SigningAlgorithm::ES256, &clock)
            .unwrap()
            .current_kid();
        let path = key_path(&dir, &kid);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap_err();
        assert!(
            matches!(err, KeyError::InsecurePermissions { path: ref p, mode: 0o640 } if *p == path)
        );
        assert!(err.to_string().contains(&format!("{kid}.key")), "{err}");
    }

    #[test]
    fn a_key_directory_open_to_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let clock = Arc::new(ManualClock::at_secs(T0));
        let err = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap_err();
        assert!(matches!(err, KeyError::InsecurePermissions { .. }), "{err}");
    }

    #[test]
    fn key_files_without_a_manifest_are_not_silently_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        fs::remove_file(dir.join(MANIFEST)).unwrap();
        let err = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap_err();
        assert!(matches!(err, KeyError::MissingManifest { .. }), "{err}");
    }

    #[test]
    fn a_key_file_the_manifest_does_not_name_is_deleted_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        let orphan = key_path(&dir, &"A".repeat(43));
        write_private_file(&dir, &format!("{}.key", "A".repeat(43)), b"junk").unwrap();
        assert!(orphan.exists());
        open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        assert!(!orphan.exists());
    }

    #[test]
    fn a_key_filed_under_another_kid_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let kid = open_at(&dir, SigningAlgorithm::ES256, &clock)
            .unwrap()
            .current_kid();
        let other = "B".repeat(43);
        fs::rename(key_path(&dir, &kid), key_path(&dir, &other)).unwrap();
        let manifest = fs::read_to_string(dir.join(MANIFEST))
            .unwrap()
            .replace(&kid, &other);
        write_private_file(&dir, MANIFEST, manifest.as_bytes()).unwrap();
        let err = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap_err();
        assert!(matches!(err, KeyError::KidMismatch { .. }), "{err}");
    }

    #[test]
    fn rotation_keeps_the_previous_key_published_until_max_ttl_plus_five_minutes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let ring = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        let old = ring.current_kid();
        let old_jws = ring.sign_compact("at+jwt", b"{}").unwrap();

        clock.set_secs(T0 + DAY - 1);
        assert_eq!(ring.rotate_if_due().unwrap(), None);

        clock.set_secs(T0 + DAY);
        let r = ring.rotate_if_due().unwrap().unwrap();
        let new = ring.current_kid();
        assert_ne!(new, old);
        assert_eq!(
            r,
            Rotation {
                new_kid: new.clone(),
                retired_kid: Some(old.clone()),
                dropped: vec![]
            }
        );
        assert_eq!(jwks_kids(&ring), vec![new.clone(), old.clone()]);
        assert!(ring.sign_compact("at+jwt", b"{}").unwrap().contains('.'));
        let (signed, sig) = old_jws.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let still_ok = ring.with_public_key(&old, |k| {
            k.verifier.verify_sig(signed.as_bytes(), &sig).is_ok()
        });
        assert_eq!(still_ok, Some(true));

        // The state survives a restart.
        let reopened = open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap();
        assert_eq!(reopened.current_kid(), new);
        assert_eq!(jwks_kids(&reopened), vec![new.clone(), old.clone()]);

        clock.set_secs(T0 + DAY + 3600 + 300 - 1);
        assert_eq!(ring.rotate_if_due().unwrap(), None);
        assert!(key_path(&dir, &old).exists());

        clock.set_secs(T0 + DAY + 3600 + 300);
        let r = ring.rotate_if_due().unwrap().unwrap();
        assert_eq!(
            r,
            Rotation {
                new_kid: new.clone(),
                retired_kid: None,
                dropped: vec![old.clone()]
            }
        );
        assert_eq!(jwks_kids(&ring), vec![new.clone()]);
        assert!(ring.with_public_key(&old, |_| ()).is_none());
        assert!(!key_path(&dir, &old).exists());
        assert_eq!(
            jwks_kids(&open_at(&dir, SigningAlgorithm::ES256, &clock).unwrap()),
            vec![new]
        );
    }

    #[test]
    fn a_changed_algorithm_rotates_to_a_key_of_that_algorithm_and_keeps_the_old_one_published() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let clock = Arc::new(ManualClock::at_secs(T0));
        let es = open_at(&dir, SigningAlgorithm::ES256, &clock)
            .unwrap()
            .current_kid();
        let ring = open_at(&dir, SigningAlgorithm::EdDSA, &clock).unwrap();
        assert_eq!(ring.algorithm(), SigningAlgorithm::EdDSA);
        assert_ne!(ring.current_kid(), es);
        assert_eq!(jwks_kids(&ring), vec![ring.current_kid(), es.clone()]);
        let v: serde_json::Value = serde_json::from_str(&ring.jwks_json()).unwrap();
        assert_eq!(v["keys"][0]["alg"], "EdDSA");
        assert_eq!(v["keys"][1]["alg"], "ES256");
        // Reopening with the same algorithm changes nothing more.
        let again = open_at(&dir, SigningAlgorithm::EdDSA, &clock).unwrap();
        assert_eq!(again.current_kid(), ring.current_kid());
    }

    #[test]
    fn jwks_members_are_exactly_the_published_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_secs(T0));
        let ring = open_at(&tmp.path().join("es"), SigningAlgorithm::ES256, &clock).unwrap();
        let v: serde_json::Value = serde_json::from_str(&ring.jwks_json()).unwrap();
        let k = v["keys"][0].as_object().unwrap();
        let mut names: Vec<_> = k.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str(), k["use"].as_str()),
            (Some("EC"), Some("P-256"), Some("sig"))
        );

        let ring = open_at(&tmp.path().join("ed"), SigningAlgorithm::EdDSA, &clock).unwrap();
        let v: serde_json::Value = serde_json::from_str(&ring.jwks_json()).unwrap();
        let k = v["keys"][0].as_object().unwrap();
        let mut names: Vec<_> = k.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["alg", "crv", "kid", "kty", "use", "x"]);
        assert_eq!(
            (k["kty"].as_str(), k["crv"].as_str()),
            (Some("OKP"), Some("Ed25519"))
        );
    }

    #[test]
    fn the_okp_thumbprint_matches_the_rfc_8037_example() {
        // RFC 8037 Appendix A.3.
        assert_eq!(
            thumbprint(
                "OKP",
                "Ed25519",
                "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                None
            ),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn the_ec_kid_is_the_sha256_of_the_hand_built_canonical_jwk() {
        let tmp = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_secs(T0));
        let ring = open_at(&tmp.path().join("k"), SigningAlgorithm::ES256, &clock).unwrap();
        let v: serde_json::Value = serde_json::from_str(&ring.jwks_json()).unwrap();
        let k = &v["keys"][0];
        let canonical = String::from("{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"")
            + k["x"].as_str().unwrap()
            + "\",\"y\":\""
            + k["y"].as_str().unwrap()
            + "\"}";
        let expected =
            URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes()));
        assert_eq!(ring.current_kid(), expected);
        assert_eq!(k["kid"].as_str(), Some(expected.as_str()));
    }
}
