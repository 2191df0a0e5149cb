// A GitLab-shaped OIDC issuer with every knob exposed, for negative tests:
// node:http + jose, tokens signed by hand so headers and claims can be
// anything, JWKS and discovery that can be broken on request.
//
//   node jose_issuer.mjs [PORT] [--self-test]
//
// PORT (argv or $PORT, default 0 = any free port). Prints exactly one line
// `issuer listening on http://127.0.0.1:PORT` on stdout when ready.
//
// GET  /.well-known/openid-configuration   GitLab-like discovery document
// GET  /oauth/discovery/keys               JWKS (RS256 2048-bit keys, kid = RFC 7638 thumbprint)
// POST /mint      JSON {profile?, aud?, ttl?, claims?, header?, forge?, key?, payload_json?}
//                 -> {token, jti, kid}
//   profile       a gitlab_profiles.mjs profile (default "main")
//   aud           string or array (default $DEFAULT_AUD or https://cistern.test)
//   ttl           seconds (default 3600); iat = now, nbf = iat - 5, exp = iat + ttl
//   claims        overrides; null deletes a claim
//   header        overrides of {alg: RS256, kid, typ: JWT}; null deletes
//   forge         null | "alg_none" | "hs256_pubkey" | "bad_sig" | "no_kid" | "embedded_jwk"
//   key           "current" (default) | "previous" (the key before the last rotation)
//                 | "unknown" (a key never published)
//   payload_json  raw payload text used verbatim instead of the claims (e.g. duplicate keys)
// POST /rotate    JSON {keep_old?: bool} -> {kid, previous_kid}: a new current key;
//                 the old one leaves the JWKS unless keep_old
// POST /behaviour JSON {jwks?, discovery?, delay_ms?, size_bytes?, cache_control?,
//                 discovery_overrides?}; modes: ok | 500 | slow | huge | invalid_json
// GET  /stats     {jwks_hits, discovery_hits, mints}; POST /stats/reset zeroes them
//
// --self-test: exercises all of the above against jose.jwtVerify; prints one
// JSON line and exits 0 (ok) or 1.

import http from 'node:http';
import crypto from 'node:crypto';
import * as jose from 'jose';
import { HOST, boundLifetime, listenPort, newRsaKeyPair, readJson, sendJson } from './_peer.mjs';
import { applyOverrides, newJti, profileClaims } from './gitlab_profiles.mjs';

const SELF_TEST = process.argv.includes('--self-test');
const DEFAULT_AUD = process.env.DEFAULT_AUD ?? 'https://cistern.test';
const MODES = new Set(['ok', '500', 'slow', 'huge', 'invalid_json']);
const FORGES = new Set([null, 'alg_none', 'hs256_pubkey', 'bad_sig', 'no_kid', 'embedded_jwk']);
const MAX_DELAY_MS = 60_000;
const MAX_HUGE_BYTES = 64 * 1024 * 1024;

/** What the self-test is doing, for the report of a run that hangs. */
let step = 'start';
/** How long one self-test call may take, and the whole self-test. */
const CALL_TIMEOUT_MS = 15_000;
const SELF_TEST_TIMEOUT_MS = 45_000;
const started = Date.now();

/**
 * Names the self-test's current step and, in self-test mode, writes it to
 * stderr with the time since start: a run the harness has to kill (the
 * event loop blocked, so the watchdog below cannot report) still shows
 * where it was.
 */
function at(what) {
  step = what;
  if (SELF_TEST) console.error(`self-test +${Date.now() - started}ms: ${what}`);
}

/** `fetch` bounded in time; `what` names the step in a hang's report. */
function get(url, what, init = {}) {
  at(what);
  return fetch(url, { ...init, signal: AbortSignal.timeout(CALL_TIMEOUT_MS) });
}

if (SELF_TEST) {
  // Armed before the keys are made and the server listens, so a hang there
  // is reported too (twice in CI the self-test ran past the harness's 60 s
  // with nothing on stderr).
  setTimeout(() => {
    console.log(JSON.stringify({ ok: false, error: `self-test stuck at: ${step}` }));
    process.exit(1);
  }, SELF_TEST_TIMEOUT_MS).unref();
}

boundLifetime();

const b64u = (buf) => Buffer.from(buf).toString('base64url');

/** An RS256 signing key with its public JWK (GitLab's JWKS key shape). */
async function newKey() {
  const { privateKey, publicKey } = newRsaKeyPair();
  const { kty, n, e } = publicKey.export({ format: 'jwk' });
  const kid = await jose.calculateJwkThumbprint({ kty, n, e }, 'sha256');
  return { privateKey, publicKey, kid, jwk: { kty, kid, e, n, use: 'sig', alg: 'RS256' } };
}

at('making the first key');
let current = await newKey();
let previous = null;
let published = [current];
const stats = { jwks_hits: 0, discovery_hits: 0, mints: 0 };
const defaultBehaviour = () => ({
  jwks: 'ok',
  discovery: 'ok',
  delay_ms: 10_000,
  size_bytes: 2 * 1024 * 1024,
  cache_control: 'max-age=86400, public, must-revalidate, no-transform',
  discovery_overrides: {},
});
let behaviour = defaultBehaviour();

const server = http.createServer();
at('starting the server');
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(listenPort(), HOST, resolve);
});
const ISSUER = `http://${HOST}:${server.address().port}`;

function discoveryDoc() {
  return applyOverrides(
    {
      issuer: ISSUER,
      authorization_endpoint: `${ISSUER}/oauth/authorize`,
      token_endpoint: `${ISSUER}/oauth/token`,
      revocation_endpoint: `${ISSUER}/oauth/revoke`,
      introspection_endpoint: `${ISSUER}/oauth/introspect`,
      userinfo_endpoint: `${ISSUER}/oauth/userinfo`,
      jwks_uri: `${ISSUER}/oauth/discovery/keys`,
      scopes_supported: ['api', 'read_api', 'openid', 'profile', 'email'],
      response_types_supported: ['code'],
      response_modes_supported: ['query', 'fragment', 'form_post'],
      grant_types_supported: ['authorization_code', 'password', 'client_credentials', 'refresh_token'],
      token_endpoint_auth_methods_supported: ['client_secret_basic', 'client_secret_post'],
      subject_types_supported: ['public'],
      id_token_signing_alg_values_supported: ['RS256'],
      claim_types_supported: ['normal'],
      claims_supported: ['iss', 'sub', 'aud', 'exp', 'iat', 'project_path', 'ci_config_ref_uri',
        'ref_path', 'sha', 'environment', 'jti'],
      code_challenge_methods_supported: ['plain', 'S256'],
    },
    behaviour.discovery_overrides,
  );
}

/** Serves `body` (an object) under the given failure mode. */
async function serveWithMode(res, mode, body, headers) {
  if (mode === '500') return sendJson(res, 500, { error: 'internal server error' });
  if (mode === 'invalid_json') {
    res.writeHead(200, { 'content-type': 'application/json', ...headers });
    return res.end(JSON.stringify(body).slice(0, 20));
  }
  if (mode === 'huge') {
    // Valid JSON, far over any sane size limit: the real document plus padding.
    const text = JSON.stringify(body);
    const pad = Math.max(0, behaviour.size_bytes - text.length - 16);
    const huge = `${text.slice(0, -1)},"padding":"${'x'.repeat(pad)}"}`;
    res.writeHead(200, { 'content-type': 'application/json', ...headers });
    return res.end(huge);
  }
  if (mode === 'slow') {
    await new Promise((r) => setTimeout(r, behaviour.delay_ms));
    if (res.destroyed) return undefined;
  }
  return sendJson(res, 200, body, headers);
}

/** Signs `input` as RS256 with a node KeyObject. */
const rs256 = (input, key) => crypto.sign('sha256', Buffer.from(input), key);

async function mint(req) {
  const forge = req.forge ?? null;
  if (!FORGES.has(forge)) throw new Error(`unknown forge ${JSON.stringify(forge)}`);
  const ttl = req.ttl ?? 3600;
  if (!Number.isInteger(ttl)) throw new Error('ttl must be an integer');
  let key;
  switch (req.key ?? 'current') {
    case 'current': key = current; break;
    case 'previous':
      if (!previous) throw new Error('no previous key: rotate first');
      key = previous;
      break;
    case 'unknown': key = await newKey(); break;
    default: throw new Error(`unknown key ${JSON.stringify(req.key)}`);
  }
  const { sub, ...custom } = profileClaims(req.profile ?? 'main');
  const iat = Math.floor(Date.now() / 1000);
  const claims = applyOverrides(
    {
      ...custom,
      jti: newJti(),
      iss: ISSUER,
      iat,
      nbf: iat - 5,
      exp: iat + ttl,
      sub,
      aud: req.aud ?? DEFAULT_AUD,
    },
    req.claims,
  );
  let header = { alg: 'RS256', kid: key.kid, typ: 'JWT' };
  if (forge === 'alg_none') header.alg = 'none';
  if (forge === 'hs256_pubkey') header.alg = 'HS256';
  if (forge === 'no_kid') delete header.kid;
  let signer = key.privateKey;
  if (forge === 'embedded_jwk') {
    // Attacker key, published only inside the token's own header.
    const attacker = await newKey();
    header = { ...header, kid: attacker.kid, jwk: attacker.jwk };
    signer = attacker.privateKey;
  }
  header = applyOverrides(header, req.header);
  const payloadText = typeof req.payload_json === 'string' ? req.payload_json : JSON.stringify(claims);
  const input = `${b64u(JSON.stringify(header))}.${b64u(payloadText)}`;
  let sig;
  if (forge === 'alg_none') {
    sig = '';
  } else if (forge === 'hs256_pubkey') {
    // Key confusion: HMAC keyed with the public key's PEM text.
    const pem = key.publicKey.export({ type: 'spki', format: 'pem' });
    sig = b64u(crypto.createHmac('sha256', pem).update(input).digest());
  } else {
    const raw = rs256(input, signer);
    if (forge === 'bad_sig') raw[0] ^= 0x01;
    sig = b64u(raw);
  }
  stats.mints += 1;
  return { token: `${input}.${sig}`, jti: claims.jti, kid: header.kid ?? null };
}

server.on('request', async (req, res) => {
  try {
    const path = new URL(req.url, ISSUER).pathname;
    const route = `${req.method} ${path}`;
    switch (route) {
      case 'GET /.well-known/openid-configuration':
        stats.discovery_hits += 1;
        return await serveWithMode(res, behaviour.discovery, discoveryDoc(), {
          'cache-control': behaviour.cache_control,
        });
      case 'GET /oauth/discovery/keys':
        stats.jwks_hits += 1;
        return await serveWithMode(res, behaviour.jwks, { keys: published.map((k) => k.jwk) }, {
          'cache-control': behaviour.cache_control,
        });
      case 'POST /mint':
        return sendJson(res, 200, await mint(await readJson(req)));
      case 'POST /rotate': {
        const body = await readJson(req);
        previous = current;
        current = await newKey();
        published = body.keep_old ? [...published, current] : [current];
        return sendJson(res, 200, { kid: current.kid, previous_kid: previous.kid });
      }
      case 'POST /behaviour': {
        const body = await readJson(req);
        const next = { ...defaultBehaviour(), ...body };
        for (const f of ['jwks', 'discovery']) {
          if (!MODES.has(next[f])) throw new Error(`${f}: unknown mode ${JSON.stringify(next[f])}`);
        }
        if (!Number.isInteger(next.delay_ms) || next.delay_ms < 0 || next.delay_ms > MAX_DELAY_MS) {
          throw new Error(`delay_ms must be 0..${MAX_DELAY_MS}`);
        }
        if (!Number.isInteger(next.size_bytes) || next.size_bytes < 0 || next.size_bytes > MAX_HUGE_BYTES) {
          throw new Error(`size_bytes must be 0..${MAX_HUGE_BYTES}`);
        }
        behaviour = next;
        return sendJson(res, 200, behaviour);
      }
      case 'GET /stats':
        return sendJson(res, 200, stats);
      case 'POST /stats/reset':
        Object.keys(stats).forEach((k) => { stats[k] = 0; });
        return sendJson(res, 200, stats);
      default:
        return sendJson(res, 404, { error: 'not found' });
    }
  } catch (err) {
    if (!res.headersSent) return sendJson(res, 400, { error: String(err?.message ?? err) });
    return res.destroy();
  }
});

console.log(`issuer listening on ${ISSUER}`);

if (SELF_TEST) {
  let code = 0;
  let report;
  try {
    report = await selfTest();
  } catch (err) {
    code = 1;
    report = { ok: false, error: String(err?.stack ?? err) };
  }
  console.log(JSON.stringify(report));
  server.closeAllConnections();
  server.close();
  process.exit(code);
}

async function selfTest() {
  const post = async (path, body) => {
    const r = await get(`${ISSUER}${path}`, `POST ${path} ${JSON.stringify(body ?? {}).slice(0, 80)}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body ?? {}),
    });
    const b = await r.json();
    if (r.status !== 200) throw new Error(`${path} ${r.status}: ${JSON.stringify(b)}`);
    return b;
  };
  const disc = await (await get(`${ISSUER}/.well-known/openid-configuration`, 'discovery')).json();
  if (disc.issuer !== ISSUER) throw new Error('discovery issuer mismatch');
  const aud = 'https://cistern.example.com';
  // A fresh remote set each time: jose caches keys, rotation checks need a cold cache.
  const verify = (token) => {
    at(`verifying ${step}`);
    return jose.jwtVerify(token, jose.createRemoteJWKSet(new URL(disc.jwks_uri)), {
      issuer: ISSUER, audience: aud, algorithms: ['RS256'],
    });
  };
  const rejected = async (token) => {
    try {
      await verify(token);
    } catch (err) {
      return err.code ?? err.name;
    }
    throw new Error('a forged token verified');
  };
  const good = await post('/mint', { aud });
  const { payload, protectedHeader } = await verify(good.token);
  if (payload.nbf !== payload.iat - 5 || protectedHeader.typ !== 'JWT') throw new Error('not GitLab-shaped');
  if ((await post('/mint', { aud })).jti === good.jti) throw new Error('jti reused');
  const forged = {};
  for (const forge of ['alg_none', 'hs256_pubkey', 'bad_sig', 'embedded_jwk']) {
    forged[forge] = await rejected((await post('/mint', { aud, forge })).token);
  }
  // Correctly signed, only the kid is missing: jose picks the JWKS's single
  // key, so this one verifies; a verifier that insists on kid must refuse it.
  const noKid = await post('/mint', { aud, forge: 'no_kid' });
  if (noKid.kid !== null || 'kid' in jose.decodeProtectedHeader(noKid.token)) throw new Error('no_kid has a kid');
  await verify(noKid.token);
  forged.unknown_key = await rejected((await post('/mint', { aud, key: 'unknown' })).token);
  const noIss = await verify((await post('/mint', { aud, claims: { project_id: null } })).token);
  if ('project_id' in noIss.payload) throw new Error('null did not delete a claim');
  // Rotation: the old key leaves the JWKS.
  const before = await post('/mint', { aud });
  const rot = await post('/rotate');
  if (rot.previous_kid !== before.kid) throw new Error('rotate reported the wrong previous kid');
  await verify((await post('/mint', { aud })).token);
  forged.rotated_out = await rejected(before.token);
  await verify((await post('/mint', { aud, key: 'previous', header: { kid: rot.kid } })).token)
    .then(() => { throw new Error('previous key verified under the new kid'); }, () => {});
  // Behaviours.
  await post('/stats/reset');
  const jwksStatus = async () => (await get(disc.jwks_uri, 'JWKS status')).status;
  await post('/behaviour', { jwks: '500' });
  if ((await jwksStatus()) !== 500) throw new Error('500 mode');
  await post('/behaviour', { jwks: 'invalid_json' });
  const bad = await (await get(disc.jwks_uri, 'JWKS invalid_json')).text();
  let parsed = true;
  try { JSON.parse(bad); } catch { parsed = false; }
  if (parsed) throw new Error('invalid_json mode produced JSON');
  await post('/behaviour', { jwks: 'huge', size_bytes: 1024 * 1024 });
  const huge = await (await get(disc.jwks_uri, 'JWKS huge')).text();
  if (huge.length < 1024 * 1024 - 64 || !JSON.parse(huge).keys) throw new Error('huge mode');
  await post('/behaviour', { jwks: 'slow', delay_ms: 300 });
  const t0 = Date.now();
  if ((await jwksStatus()) !== 200 || Date.now() - t0 < 290) throw new Error('slow mode');
  await post('/behaviour', { discovery_overrides: { issuer: 'https://evil.example' } });
  const d2 = await (await get(`${ISSUER}/.well-known/openid-configuration`, 'discovery overrides')).json();
  if (d2.issuer !== 'https://evil.example') throw new Error('discovery overrides');
  await post('/behaviour', {});
  const stats = await (await get(`${ISSUER}/stats`, 'stats')).json();
  if (stats.jwks_hits !== 4 || stats.discovery_hits !== 1) throw new Error(`stats ${JSON.stringify(stats)}`);
  return { ok: true, issuer: ISSUER, rejected: forged, stats };
}
