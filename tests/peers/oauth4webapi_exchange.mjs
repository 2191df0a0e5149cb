// RFC 8693 token exchange against cistern with npm `oauth4webapi` as the client.
//
//   node oauth4webapi_exchange.mjs AS_METADATA_URL SUBJECT_TOKEN ROLE [SCOPE]
//
// Discovers the token endpoint (RFC 8414, issuer-equality enforced), then
// genericTokenEndpointRequest with grant_type token-exchange, no client
// authentication (the ID token is the credential), subject_token_type jwt,
// `role`, and `scope` when given; processGenericTokenEndpointResponse checks
// the response. $SUBJECT_TOKEN_TYPE overrides the subject_token_type.
// As a public client, oauth4webapi's None() sends `client_id` in the body.
// Output (one JSON line):
//   success          the token response JSON                      exit 0
//   OAuth error      {"error": ..., "error_description": ...}     exit 2
//   anything else    {"error_type": ..., "message": ...}          exit 1

import * as oauth from 'oauth4webapi';
import { describeError, discover, httpOptions } from './_oauth4webapi.mjs';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const [metadataUrl, subjectToken, role, scope] = process.argv.slice(2);
const out = (o, code) => {
  console.log(JSON.stringify(o));
  process.exit(code);
};
if (!role) out({ error_type: 'usage', message: 'usage: oauth4webapi_exchange.mjs AS_METADATA_URL SUBJECT_TOKEN ROLE [SCOPE]' }, 1);

try {
  const as = await discover(metadataUrl);
  // A public client: the id is only a label, nothing authenticates it.
  const client = { client_id: 'oauth4webapi-peer' };
  const params = new URLSearchParams({
    subject_token: subjectToken,
    subject_token_type: process.env.SUBJECT_TOKEN_TYPE ?? 'urn:ietf:params:oauth:token-type:jwt',
    role,
  });
  if (scope !== undefined) params.set('scope', scope);
  const res = await oauth.genericTokenEndpointRequest(
    as, client, oauth.None(), TOKEN_EXCHANGE, params, httpOptions(as.token_endpoint),
  );
  // oauth4webapi normalises fields (token_type is lower-cased); print what
  // the server sent once the library has accepted it.
  const raw = await res.clone().json().catch(() => null);
  await oauth.processGenericTokenEndpointResponse(as, client, res);
  out(raw, 0);
} catch (err) {
  if (err instanceof oauth.ResponseBodyError) {
    out({ error: err.error, error_description: err.error_description ?? null, status: err.status }, 2);
  }
  out(describeError(err), 1);
}
