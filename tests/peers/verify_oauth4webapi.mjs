// Independent RFC 9068 resource-server validation of a cistern access token
// with npm `oauth4webapi`.
//
//   node verify_oauth4webapi.mjs AS_METADATA_URL AUDIENCE TOKEN
//
// discoveryRequest + processDiscoveryResponse (the metadata's issuer must be
// the one the URL names), then validateJwtAccessToken: typ at+jwt, iss equal
// to the metadata issuer, aud, exp, signature with keys from jwks_uri, and
// string sub/jti/client_id. http is allowed for loopback URLs only.
// Prints one JSON line: {"ok":true,...,"claims":{...}} exit 0, or
// {"ok":false,...,"error_type","message"} exit 1.

import * as oauth from 'oauth4webapi';
import { describeError, discover, httpOptions } from './_oauth4webapi.mjs';

const [metadataUrl, audience, token] = process.argv.slice(2);
const out = (o, code) => {
  console.log(JSON.stringify({ verifier: 'oauth4webapi', ...o }));
  process.exit(code);
};
if (!token) out({ ok: false, message: 'usage: verify_oauth4webapi.mjs AS_METADATA_URL AUDIENCE TOKEN' }, 1);

try {
  const as = await discover(metadataUrl);
  // The RS sees the token the way a real request carries it.
  const request = new Request('http://127.0.0.1/resource', {
    headers: { authorization: `Bearer ${token}` },
  });
  const claims = await oauth.validateJwtAccessToken(as, request, audience, {
    signingAlgorithms: ['ES256', 'EdDSA'],
    ...httpOptions(as.jwks_uri),
  });
  out({ ok: true, issuer: as.issuer, claims }, 0);
} catch (err) {
  out({ ok: false, ...describeError(err) }, 1);
}
