// An OAuth 2.0 / OpenID authorization server for cistern's refresh-token
// provider: npm `oidc-provider` (certified, nobody on the team wrote it) with
// the authorization code grant (PKCE required), single-use refresh tokens
// (`rotateRefreshToken: true`, with oidc-provider's reuse detection: a
// consumed refresh token presented again revokes the whole grant), opaque
// access tokens, userinfo and introspection, and devInteractions (its
// built-in login and consent forms, which the tests fill in over HTTP).
//
//   node oauth_refresh_idp.mjs [PORT]
//
// Environment:
//   CLIENT_SECRET            the client's secret (default: a test value)
//   REUSE_GRACE_SECS         a consumed refresh token stays usable this long
//                            (0 = single use at once, the default); models
//                            Okta's "grace period for token rotation" and
//                            Auth0's "reuse interval" through oidc-provider's
//                            documented adapter interface (see GraceAdapter)
//   ACCESS_TOKEN_TTL         access token lifetime in seconds (default 7200, GitLab's)
//
// Prints exactly one line `idp listening on http://127.0.0.1:PORT` when ready.
//
// Test-only control routes (the tests are the only callers):
//   POST /control/hold       hold the answer of the next refresh_token grant:
//                            the grant runs (the old token is consumed, the new
//                            one saved) and the response waits
//   GET  /control/held       answers once an answer is being held (long poll, ≤ 30 s)
//   POST /control/release    sends held answers
//   GET  /control/issued     every refresh and access token this server issued,
//                            in order (so a test can look for them in logs)
//   GET  /control/stats      counts of token requests by grant type and outcome

import http from 'node:http';
import { randomUUID } from 'node:crypto';
import Provider from 'oidc-provider';
import * as jose from 'jose';
import { HOST, boundLifetime, listenPort, newRsaKeyPair } from './_peer.mjs';

boundLifetime();

const CLIENT_SECRET = process.env.CLIENT_SECRET ?? 'not-a-secret-refresh-client';
const GRACE_SECS = Number(process.env.REUSE_GRACE_SECS ?? 0);
const ACCESS_TTL = Number(process.env.ACCESS_TOKEN_TTL ?? 7200);
if (!Number.isFinite(GRACE_SECS) || GRACE_SECS < 0) throw new Error('REUSE_GRACE_SECS');
if (!Number.isInteger(ACCESS_TTL) || ACCESS_TTL < 1) throw new Error('ACCESS_TOKEN_TTL');

// oidc-provider's adapter interface (upsert, find, findByUid, findByUserCode,
// consume, destroy, revokeByGrantId), in memory. The one deviation is
// deliberate and is the point: `consume` records when a model was consumed,
// and `find` reports it consumed only once REUSE_GRACE_SECS have passed,
// which is how an IdP with a reuse grace period behaves.
const storage = new Map(); // `${model}:${id}` -> { payload, expiresAt, consumedAt }

class GraceAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    storage.set(this.key(id), { payload, expiresAt, consumedAt: undefined });
  }

  async find(id) {
    const entry = storage.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      storage.delete(this.key(id));
      return undefined;
    }
    if (entry.consumedAt !== undefined && Date.now() - entry.consumedAt >= GRACE_SECS * 1000) {
      return { ...entry.payload, consumed: Math.floor(entry.consumedAt / 1000) };
    }
    return { ...entry.payload };
  }

  async findByUid(uid) {
    for (const [key, entry] of storage) {
      if (key.startsWith(`${this.model}:`) && entry.payload.uid === uid) return this.find(key.slice(this.model.length + 1));
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const [key, entry] of storage) {
      if (key.startsWith(`${this.model}:`) && entry.payload.userCode === userCode) return this.find(key.slice(this.model.length + 1));
    }
    return undefined;
  }

  async consume(id) {
    const entry = storage.get(this.key(id));
    // The first consumption starts the grace period; reuse does not extend it.
    if (entry && entry.consumedAt === undefined) entry.consumedAt = Date.now();
  }

  async destroy(id) {
    storage.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of storage) {
      if (key.startsWith(`${this.model}:`) && entry.payload.grantId === grantId) storage.delete(key);
    }
  }
}

const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(listenPort(), HOST, resolve);
});
const ISSUER = `http://${HOST}:${server.address().port}`;

const { privateKey } = newRsaKeyPair();
const signingJwk = { ...(await jose.exportJWK(privateKey)), alg: 'RS256', use: 'sig' };

const provider = new Provider(ISSUER, {
  adapter: GraceAdapter,
  jwks: { keys: [signingJwk] },
  clients: [
    {
      client_id: 'cistern',
      client_secret: CLIENT_SECRET,
      // A native client: any loopback port matches (RFC 8252 §7.3).
      application_type: 'native',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
      token_endpoint_auth_method: 'client_secret_basic',
      introspection_endpoint_auth_method: 'client_secret_basic',
    },
  ],
  cookies: { keys: [randomUUID()] },
  findAccount: (_ctx, sub) => ({ accountId: sub, claims: () => ({ sub }) }),
  pkce: { required: () => true },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: ACCESS_TTL,
    AuthorizationCode: 60,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Session: 3600,
    Interaction: 600,
  },
  features: {
    devInteractions: { enabled: true },
    introspection: { enabled: true },
    userinfo: { enabled: true },
    revocation: { enabled: true },
  },
});
provider.on('server_error', (_ctx, err) => console.error('oidc-provider server_error:', err));

const issued = []; // { kind: 'refresh_token' | 'access_token', value }
const stats = {};
let holdNext = false;
let held = []; // resolvers of held answers
let heldWaiters = []; // resolvers of GET /control/held

provider.use(async (ctx, next) => {
  if (ctx.path.startsWith('/control/')) return control(ctx);
  await next();
  if (ctx.path !== '/token' || ctx.method !== 'POST') return undefined;
  const grant = ctx.oidc?.params?.grant_type ?? 'unknown';
  const outcome = ctx.status === 200 ? 'ok' : (ctx.body?.error ?? String(ctx.status));
  stats[`${grant}:${outcome}`] = (stats[`${grant}:${outcome}`] ?? 0) + 1;
  if (ctx.status === 200 && ctx.body) {
    for (const kind of ['refresh_token', 'access_token']) {
      if (ctx.body[kind]) issued.push({ kind, value: ctx.body[kind] });
    }
    if (grant === 'refresh_token' && holdNext) {
      holdNext = false;
      const released = new Promise((resolve) => held.push(resolve));
      for (const w of heldWaiters) w();
      heldWaiters = [];
      await released;
    }
  }
  return undefined;
});

async function control(ctx) {
  ctx.type = 'application/json';
  switch (`${ctx.method} ${ctx.path}`) {
    case 'POST /control/hold':
      holdNext = true;
      ctx.body = { holding: true };
      return undefined;
    case 'GET /control/held': {
      if (held.length === 0) {
        const waited = new Promise((resolve) => heldWaiters.push(resolve));
        await Promise.race([waited, new Promise((r) => setTimeout(r, 30_000))]);
      }
      ctx.body = { held: held.length };
      return undefined;
    }
    case 'POST /control/release': {
      const n = held.length;
      for (const r of held) r();
      held = [];
      ctx.body = { released: n };
      return undefined;
    }
    case 'GET /control/issued':
      ctx.body = issued;
      return undefined;
    case 'GET /control/stats':
      ctx.body = stats;
      return undefined;
    default:
      ctx.status = 404;
      ctx.body = { error: 'no such control route' };
      return undefined;
  }
}

server.on('request', provider.callback());
console.log(`idp listening on ${ISSUER}`);
