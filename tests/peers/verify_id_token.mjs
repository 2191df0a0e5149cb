// Verifies a GitLab-style ID token with npm `jose`, the way a careful relying
// party would: RS256 only, typ JWT, exact issuer, audience, exp/nbf/iat.
// Used to prove the test issuers' tokens are well-formed except for the
// defect a test put in on purpose.
//
//   node verify_id_token.mjs JWKS_URL ISSUER AUDIENCE TOKEN
//
// Prints one JSON line: {"ok":true,"header":{...},"payload":{...}} exit 0,
// or {"ok":false,"error":"...","code":"..."} exit 1.

import * as jose from 'jose';

const [jwksUrl, issuer, audience, token] = process.argv.slice(2);
const out = (o, code) => {
  console.log(JSON.stringify({ verifier: 'jose-id-token', ...o }));
  process.exit(code);
};
if (!token) out({ ok: false, error: 'usage: verify_id_token.mjs JWKS_URL ISSUER AUDIENCE TOKEN' }, 1);

try {
  const keys = jose.createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 5000 });
  const { payload, protectedHeader } = await jose.jwtVerify(token, keys, {
    issuer,
    audience,
    typ: 'JWT',
    algorithms: ['RS256'],
    requiredClaims: ['iss', 'sub', 'aud', 'exp', 'iat', 'nbf', 'jti'],
  });
  out({ ok: true, header: protectedHeader, payload }, 0);
} catch (err) {
  out({ ok: false, error: String(err?.message ?? err), code: err?.code ?? null }, 1);
}
