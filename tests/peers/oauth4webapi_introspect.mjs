// RFC 7662 introspection against cistern with npm `oauth4webapi`.
//
//   node oauth4webapi_introspect.mjs AS_METADATA_URL CLIENT_ID CLIENT_SECRET TOKEN
//
// Discovers `introspection_endpoint` (RFC 8414), sends introspectionRequest
// with client_secret_basic, and checks the answer with
// processIntrospectionResponse. Prints the introspection JSON (exit 0), an
// OAuth error (exit 2) or any other failure (exit 1), one JSON line.

import * as oauth from 'oauth4webapi';
import { describeError, discover, httpOptions } from './_oauth4webapi.mjs';

const [metadataUrl, clientId, clientSecret, token] = process.argv.slice(2);
const out = (o, code) => {
  console.log(JSON.stringify(o));
  process.exit(code);
};
if (!token) out({ error_type: 'usage', message: 'usage: oauth4webapi_introspect.mjs AS_METADATA_URL CLIENT_ID CLIENT_SECRET TOKEN' }, 1);

try {
  const as = await discover(metadataUrl);
  const client = { client_id: clientId };
  const res = await oauth.introspectionRequest(
    as, client, oauth.ClientSecretBasic(clientSecret), token, httpOptions(as.introspection_endpoint),
  );
  out(await oauth.processIntrospectionResponse(as, client, res), 0);
} catch (err) {
  if (err instanceof oauth.ResponseBodyError) {
    out({ error: err.error, error_description: err.error_description ?? null, status: err.status }, 2);
  }
  out(describeError(err), 1);
}
