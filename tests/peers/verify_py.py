"""Independent verification of a cistern access token with two Python JOSE libraries.

    verify_py.py JWKS_URL ISSUER AUDIENCE TOKEN

PyJWT: PyJWKClient picks the key by kid; jwt.decode with ES256/EdDSA only,
issuer, audience, and exp/iat/iss/aud/sub/jti required; typ must be at+jwt.
jwcrypto: the JWKS fetched with requests; jwt.JWT with check_claims for iss,
aud, exp, iat, sub and jti, and an algorithm allow-list.
Both must pass. Prints one JSON line and exits 0 (ok) or 1.
"""

import json
import sys

ALGORITHMS = ["ES256", "EdDSA"]
REQUIRED = ["exp", "iat", "iss", "aud", "sub", "jti"]
TIMEOUT_S = 10


def check_typ(header):
    """RFC 9068 §4: typ is at+jwt (media types compare case-insensitively)."""
    typ = str(header.get("typ", ""))
    if typ.lower() not in ("at+jwt", "application/at+jwt"):
        raise ValueError(f"typ is {typ!r}, not at+jwt")


def with_pyjwt(jwks_url, issuer, audience, token):
    import jwt

    header = jwt.get_unverified_header(token)
    check_typ(header)
    client = jwt.PyJWKClient(jwks_url, cache_keys=False, timeout=TIMEOUT_S)
    key = client.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key,
        algorithms=ALGORITHMS,
        audience=audience,
        issuer=issuer,
        options={"require": REQUIRED, "verify_signature": True},
    )


def with_jwcrypto(jwks_url, issuer, audience, token):
    import requests
    from jwcrypto import jwk, jwt

    resp = requests.get(jwks_url, timeout=TIMEOUT_S)
    resp.raise_for_status()
    keys = jwk.JWKSet.from_json(resp.text)
    checked = jwt.JWT(
        jwt=token,
        key=keys,
        algs=ALGORITHMS,
        check_claims={
            "iss": issuer,
            "aud": audience,
            "exp": None,
            "iat": None,
            "sub": None,
            "jti": None,
        },
    )
    check_typ(json.loads(checked.header))
    return json.loads(checked.claims)


def main(argv):
    if len(argv) != 4:
        print(json.dumps({"ok": False, "error": "usage: verify_py.py JWKS_URL ISSUER AUDIENCE TOKEN"}))
        return 1
    jwks_url, issuer, audience, token = argv
    results = {}
    ok = True
    for name, verify in (("pyjwt", with_pyjwt), ("jwcrypto", with_jwcrypto)):
        try:
            results[name] = {"ok": True, "claims": verify(jwks_url, issuer, audience, token)}
        except Exception as exc:  # every failure is a verdict, reported with its type
            ok = False
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({"ok": ok, "verifier": "python", **results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
