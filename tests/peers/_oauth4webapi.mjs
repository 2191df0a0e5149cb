// Shared by the oauth4webapi peers: RFC 8414 discovery from a metadata URL.

import * as oauth from 'oauth4webapi';

const WELL_KNOWN = '/.well-known/oauth-authorization-server';

/**
 * The issuer an RFC 8414 metadata URL belongs to: the well-known segment is
 * removed and any path after it is the issuer's path (RFC 8414 §3.1).
 */
export function issuerOfMetadataUrl(metadataUrl) {
  const u = new URL(metadataUrl);
  if (!u.pathname.startsWith(WELL_KNOWN)) {
    throw new Error(`not an RFC 8414 metadata URL: ${metadataUrl}`);
  }
  return new URL(`${u.origin}${u.pathname.slice(WELL_KNOWN.length)}`);
}

/** Options letting oauth4webapi talk plain http, only to loopback. */
export function httpOptions(url) {
  const { hostname } = new URL(url);
  const loopback = hostname === '127.0.0.1' || hostname === '[::1]' || hostname === 'localhost';
  return loopback ? { [oauth.allowInsecureRequests]: true, signal: AbortSignal.timeout(10_000) } : {};
}

/**
 * Fetches and validates the metadata with oauth4webapi: discoveryRequest
 * (RFC 8414 algorithm) + processDiscoveryResponse, which enforces that the
 * document's `issuer` is the issuer the URL was built from.
 */
export async function discover(metadataUrl) {
  const issuer = issuerOfMetadataUrl(metadataUrl);
  const res = await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...httpOptions(metadataUrl) });
  return oauth.processDiscoveryResponse(issuer, res);
}

/** One JSON-able description of an oauth4webapi (or other) error. */
export function describeError(err) {
  const o = { error_type: err?.constructor?.name ?? 'Error', message: String(err?.message ?? err) };
  if (err?.code) o.code = err.code;
  if (err instanceof oauth.ResponseBodyError) {
    o.error = err.error;
    o.error_description = err.error_description ?? null;
    o.status = err.status;
  }
  return o;
}
