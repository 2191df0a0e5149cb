// Independent verifier of a cistern access token with npm `jose`.
//
//   node verify_jose.mjs JWKS_URL ISSUER AUDIENCE TOKEN
//
// jwtVerify with a remote JWKS, typ at+jwt (RFC 9068), exact issuer, the
// audience, algorithms ES256/EdDSA only. Prints one JSON line:
//   {"ok":true,"verifier":"jose","header":{...},"payload":{...}}   exit 0
//   {"ok":false,"verifier":"jose","error":"...","code":"..."}      exit 1

import * as jose from 'jose';

const [jwksUrl, issuer, audience, token] = process.argv.slice(2);
const out = (o, code) => {
  console.log(JSON.stringify({ verifier: 'jose', ...o }));
  process.exit(code);
};
if (!token) out({ ok: false, error: 'usage: verify_jose.mjs JWKS_URL ISSUER AUDIENCE TOKEN' }, 1);

try {
  const keys = jose.createRemoteJWKSet(new URL(jwksUrl), { timeoutDuration: 5000 });
  const { payload, protectedHeader } = await jose.jwtVerify(token, keys, {
    issuer,
    audience,
    typ: 'at+jwt',
    algorithms: ['ES256', 'EdDSA'],
    requiredClaims: ['iss', 'sub', 'aud', 'exp', 'iat', 'jti', 'client_id'],
  });
  out({ ok: true, header: protectedHeader, payload }, 0);
} catch (err) {
  out({ ok: false, error: String(err?.message ?? err), code: err?.code ?? null }, 1);
}
