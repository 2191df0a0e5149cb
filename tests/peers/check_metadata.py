"""Independent check of cistern's RFC 8414 authorization server metadata.

    check_metadata.py [--allow-http] METADATA_URL

Fetches the document and validates it with authlib's
rfc8414.AuthorizationServerMetadata(doc).validate(), then checks what authlib
does not: the issuer is the one the URL was built from (RFC 8414 §3.3), the
token-exchange grant is listed, jwks_uri serves a JWK Set of public keys, and
the response is JSON.

authlib accepts plain http only for loopback hosts and rejects it elsewhere.
With --allow-http, a document authlib rejects only for using http is
validated again as a copy with https substituted in every URL under the
issuer's origin; the output says so ("https_substituted": true).
Prints one JSON line and exits 0 (ok) or 1.
"""

import json
import sys
from urllib.parse import urlsplit

WELL_KNOWN = "/.well-known/oauth-authorization-server"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TIMEOUT_S = 10


def issuer_of(metadata_url):
    """RFC 8414 §3.1: the well-known segment is inserted after the host."""
    parts = urlsplit(metadata_url)
    if not parts.path.startswith(WELL_KNOWN):
        raise ValueError(f"not an RFC 8414 metadata URL: {metadata_url}")
    return f"{parts.scheme}://{parts.netloc}{parts.path[len(WELL_KNOWN):]}"


def https_copy(doc, origin):
    """The document with http://origin replaced by https://origin in every string URL."""
    https_origin = "https" + origin[len("http"):]

    def swap(v):
        if isinstance(v, str) and v.startswith(origin):
            return https_origin + v[len(origin):]
        return v

    return {k: swap(v) for k, v in doc.items()}


def main(argv):
    allow_http = "--allow-http" in argv
    args = [a for a in argv if a != "--allow-http"]
    if len(args) != 1:
        print(json.dumps({"ok": False, "error": "usage: check_metadata.py [--allow-http] METADATA_URL"}))
        return 1
    url = args[0]
    import requests
    from authlib.oauth2.rfc8414 import AuthorizationServerMetadata

    out = {"ok": False, "checker": "authlib", "https_substituted": False}
    try:
        resp = requests.get(url, timeout=TIMEOUT_S)
        if resp.status_code != 200:
            raise ValueError(f"metadata status {resp.status_code}")
        if resp.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ValueError(f"metadata content-type {resp.headers.get('content-type')!r}")
        doc = resp.json()
        try:
            AuthorizationServerMetadata(doc).validate()
        except ValueError as exc:
            origin = "{0.scheme}://{0.netloc}".format(urlsplit(issuer_of(url)))
            if not (allow_http and "https" in str(exc) and origin.startswith("http://")):
                raise
            AuthorizationServerMetadata(https_copy(doc, origin)).validate()
            out["https_substituted"] = True
            out["note"] = f"authlib refused plain http ({exc}); validated a copy with https"
        expected = issuer_of(url)
        # §3.1 drops a terminating "/" of the issuer when building the URL,
        # so an issuer with one also maps here; flag it, it is an interop trap.
        if doc.get("issuer") not in (expected, expected + "/"):
            raise ValueError(f"issuer {doc.get('issuer')!r} is not {expected!r} (RFC 8414 §3.3)")
        out["issuer_trailing_slash"] = doc["issuer"] != expected
        if TOKEN_EXCHANGE not in doc.get("grant_types_supported", []):
            raise ValueError("grant_types_supported does not list token-exchange")
        jwks = requests.get(doc["jwks_uri"], timeout=TIMEOUT_S)
        jwks.raise_for_status()
        keys = jwks.json().get("keys")
        if not isinstance(keys, list) or not keys:
            raise ValueError("jwks_uri serves no keys")
        private = [k.get("kid") for k in keys if set(k) & {"d", "p", "q", "dp", "dq", "qi", "k"}]
        if private:
            raise ValueError(f"jwks_uri publishes private key material (kids {private})")
        out.update(ok=True, issuer=doc["issuer"], metadata=doc, jwks_kids=[k.get("kid") for k in keys])
    except Exception as exc:  # every failure is a verdict, reported with its type
        out["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
