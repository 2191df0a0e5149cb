// GitLab stand-in: npm `oidc-provider` (a certified OpenID Provider nobody on
// the team wrote) configured to look like GitLab's CI ID token issuer.
//
//   node gitlab_issuer.mjs [PORT] [--self-test]
//
// PORT (argv or $PORT, default 0 = any free port). Prints exactly one line
// `issuer listening on http://127.0.0.1:PORT` on stdout when ready.
//
// What it serves (oidc-provider's own endpoints, GitLab's paths where they matter):
//   GET  /.well-known/openid-configuration   discovery (issuer = the URL above)
//   GET  /oauth/discovery/keys               JWKS: one RS256 2048-bit key, kid = RFC 7638 thumbprint
//   POST /oauth/token                        client_credentials; clients are the profile names
//   GET  /mint?profile=main&aud=URI[&aud=URI2][&ttl=SECS][&claims=JSON]
//        test helper: one client_credentials request through the provider, returns
//        {token, jti, iat, exp}. `claims` is a JSON object of overrides (null deletes).
//
// Tokens are oidc-provider JWT access tokens reshaped by formats.customizers.jwt
// into GitLab ID tokens: header typ JWT, nbf = iat - 5, a UUID jti, no
// client_id/scope, GitLab's claims with GitLab's JSON types (see gitlab_profiles.mjs).
//
// --self-test: start, mint every profile, verify each token with jose.jwtVerify
// against the served JWKS and check the GitLab shape; prints one JSON line and
// exits 0 (ok) or 1.

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';
import * as jose from 'jose';
import { HOST, boundLifetime, listenPort, newRsaKeyPair, sendJson } from './_peer.mjs';
import { PROFILES, applyOverrides, gitlabTypeProblems, newJti, profileClaims } from './gitlab_profiles.mjs';

const SELF_TEST = process.argv.includes('--self-test');
const DEFAULT_AUD = process.env.DEFAULT_AUD ?? 'https://cistern.test';
const DEFAULT_TTL = 3600; // GitLab: the job's timeout, 1 h by default.
const MAX_TTL = 24 * 3600;
const CLIENT_SECRET = 'not-a-secret-test-client';
// Only /mint (same process) may ask the token endpoint for per-token
// audiences, TTLs and claim overrides; it proves it with this value.
const INTERNAL = randomUUID();

boundLifetime();

const { privateKey } = newRsaKeyPair();
const privateJwk = await jose.exportJWK(privateKey);
const kid = await jose.calculateJwkThumbprint(privateJwk, 'sha256');
const signingJwk = { ...privateJwk, kid, alg: 'RS256', use: 'sig' };

// Listen first so the issuer URL can carry the real port when PORT=0.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(listenPort(), HOST, resolve);
});
const ISSUER = `http://${HOST}:${server.address().port}`;

/** Per-token options sent by /mint, or null for ordinary token requests. */
function mintOptions(ctx) {
  if (!ctx || ctx.get('x-mint-internal') !== INTERNAL) return null;
  try {
    return JSON.parse(ctx.get('x-mint-options') || '{}');
  } catch {
    return null;
  }
}

const provider = new Provider(ISSUER, {
  jwks: { keys: [signingJwk] },
  routes: { jwks: '/oauth/discovery/keys', token: '/oauth/token' },
  clients: PROFILES.map((p) => ({
    client_id: p,
    client_secret: CLIENT_SECRET,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
  })),
  cookies: { keys: [randomUUID()] },
  ttl: { ClientCredentials: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? DEFAULT_TTL },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => DEFAULT_AUD,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resourceIndicator) => ({
        scope: '',
        audience: resourceIndicator,
        accessTokenTTL: mintOptions(ctx)?.ttl ?? DEFAULT_TTL,
        accessTokenFormat: 'jwt',
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  formats: {
    customizers: {
      // Reshape oidc-provider's RFC 9068 access token into a GitLab ID token.
      jwt: (ctx, token, t) => {
        const opts = mintOptions(ctx);
        const { iss, iat, exp, aud } = t.payload;
        const { sub, ...custom } = profileClaims(token.clientId);
        t.header = { typ: 'JWT' };
        // GitLab's claim order: custom claims, then the registered ones.
        const payload = {
          ...custom,
          jti: newJti(),
          iss,
          iat,
          nbf: iat - 5,
          exp,
          sub,
          aud: opts?.aud ?? aud,
        };
        t.payload = applyOverrides(payload, opts?.claims);
      },
    },
  },
});
provider.on('server_error', (_ctx, err) => console.error('oidc-provider server_error:', err));

// Test helper route, ahead of the provider's own routes.
provider.use(async (ctx, next) => {
  if (ctx.path !== '/mint') return next();
  if (ctx.method !== 'GET') {
    ctx.status = 405;
    return undefined;
  }
  try {
    const q = new URL(ctx.href).searchParams;
    const profile = q.get('profile') ?? 'main';
    profileClaims(profile); // throws on an unknown profile
    const auds = q.getAll('aud');
    const ttl = q.has('ttl') ? Number(q.get('ttl')) : DEFAULT_TTL;
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > MAX_TTL) throw new Error(`ttl must be 1..${MAX_TTL}`);
    const claims = q.has('claims') ? JSON.parse(q.get('claims')) : undefined;
    const resource = auds[0] ?? DEFAULT_AUD;
    const res = await fetch(`${ISSUER}/oauth/token`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${profile}:${CLIENT_SECRET}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
        'x-mint-internal': INTERNAL,
        'x-mint-options': JSON.stringify({ ttl, claims, aud: auds.length > 1 ? auds : undefined }),
      },
      body: new URLSearchParams({ grant_type: 'client_credentials', resource }),
      signal: AbortSignal.timeout(10_000),
    });
    const body = await res.json();
    if (res.status !== 200) throw new Error(`token endpoint ${res.status}: ${JSON.stringify(body)}`);
    const p = jose.decodeJwt(body.access_token);
    ctx.type = 'application/json';
    ctx.body = { token: body.access_token, jti: p.jti, iat: p.iat, exp: p.exp };
  } catch (err) {
    ctx.status = 400;
    ctx.body = { error: String(err?.message ?? err) };
  }
  return undefined;
});

server.on('request', provider.callback());
console.log(`issuer listening on ${ISSUER}`);

if (SELF_TEST) {
  let code = 0;
  let report;
  try {
    report = await selfTest();
  } catch (err) {
    code = 1;
    report = { ok: false, error: String(err?.message ?? err) };
  }
  console.log(JSON.stringify(report));
  server.close();
  process.exit(code);
}

async function selfTest() {
  const disc = await (await fetch(`${ISSUER}/.well-known/openid-configuration`)).json();
  if (disc.issuer !== ISSUER) throw new Error(`discovery issuer ${disc.issuer} != ${ISSUER}`);
  if (disc.jwks_uri !== `${ISSUER}/oauth/discovery/keys`) throw new Error(`jwks_uri ${disc.jwks_uri}`);
  const jwks = await (await fetch(disc.jwks_uri)).json();
  if (jwks.keys.length !== 1 || 'd' in jwks.keys[0]) throw new Error('JWKS must hold one public key');
  const keySet = jose.createRemoteJWKSet(new URL(disc.jwks_uri));
  const aud = 'https://cistern.example.com';
  const mint = async (query) => {
    const r = await fetch(`${ISSUER}/mint?${new URLSearchParams(query)}`);
    const b = await r.json();
    if (r.status !== 200) throw new Error(`/mint ${r.status}: ${JSON.stringify(b)}`);
    return b.token;
  };
  const verify = async (token, { audience = aud, shape = true } = {}) => {
    const { payload, protectedHeader } = await jose.jwtVerify(token, keySet, {
      issuer: ISSUER, audience, algorithms: ['RS256'], typ: 'JWT',
    });
    if (protectedHeader.kid !== kid) throw new Error('kid is not the key thumbprint');
    const problems = shape ? gitlabTypeProblems(payload) : [];
    if (problems.length) throw new Error(`shape: ${problems.join('; ')}`);
    return payload;
  };
  const profiles = {};
  for (const profile of PROFILES) {
    const p = await verify(await mint({ profile, aud }));
    if (p.exp - p.iat !== DEFAULT_TTL) throw new Error(`${profile}: lifetime ${p.exp - p.iat}`);
    profiles[profile] = { sub: p.sub, project_id: p.project_id, job_project_id: p.job_project_id };
  }
  const a = await verify(await mint({ profile: 'main', aud }));
  const b = await verify(await mint({ profile: 'main', aud }));
  if (a.jti === b.jti) throw new Error('two mints share a jti');
  const short = await verify(await mint({ profile: 'main', aud, ttl: '60' }));
  if (short.exp - short.iat !== 60) throw new Error('ttl ignored');
  const multi = await verify(
    await mint(new URLSearchParams([['aud', aud], ['aud', 'https://other.example'], ['profile', 'main']])),
  );
  if (!Array.isArray(multi.aud) || multi.aud.length !== 2) throw new Error('array aud not produced');
  const over = await verify(
    await mint({ aud, claims: JSON.stringify({ ref: 'x', user_email: null }) }),
    { shape: false },
  );
  if (over.ref !== 'x' || 'user_email' in over) throw new Error('claim overrides ignored');
  try {
    await verify(await mint({ aud: 'https://wrong.example' }));
    throw new Error('a token for another audience verified');
  } catch (err) {
    if (!(err instanceof jose.errors.JWTClaimValidationFailed)) throw err;
  }
  // An ordinary token request (no /mint header) cannot pick claims.
  const plain = await fetch(`${ISSUER}/oauth/token`, {
    method: 'POST',
    headers: {
      authorization: `Basic ${Buffer.from(`main:${CLIENT_SECRET}`).toString('base64')}`,
      'content-type': 'application/x-www-form-urlencoded',
      'x-mint-options': JSON.stringify({ claims: { ref: 'evil' } }),
    },
    body: new URLSearchParams({ grant_type: 'client_credentials', resource: aud }),
  });
  const plainPayload = await verify((await plain.json()).access_token);
  if (plainPayload.ref !== 'main') throw new Error('unauthenticated override applied');
  return { ok: true, issuer: ISSUER, kid, profiles };
}
