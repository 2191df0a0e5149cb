"""RFC 8693 token exchange against cistern with authlib as the client.

    authlib_exchange.py TOKEN_URL SUBJECT_TOKEN ROLE [SCOPE]

OAuth2Session (a public client: token_endpoint_auth_method "none").fetch_token
with grant_type token-exchange, subject_token_type jwt ($SUBJECT_TOKEN_TYPE
overrides it), role and optional scope. authlib sends
`Content-Type: application/x-www-form-urlencoded;charset=UTF-8`.
Output (one JSON line):
  success        the token response JSON as the server sent it        exit 0
  OAuth error    {"error": ..., "error_description": ...}             exit 2
  anything else  {"error_type": ..., "message": ...}                  exit 1
"""

import json
import os
import sys

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TIMEOUT_S = 10


def main(argv):
    if len(argv) not in (3, 4):
        print(json.dumps({"error_type": "usage",
                          "message": "usage: authlib_exchange.py TOKEN_URL SUBJECT_TOKEN ROLE [SCOPE]"}))
        return 1
    token_url, subject_token, role = argv[:3]
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.requests_client import OAuth2Session

    raw = {}

    def keep_raw(resp):
        # authlib decorates the token (expires_at); keep the server's own JSON.
        try:
            raw["body"] = resp.json()
        except ValueError:
            raw["body"] = None
        return resp

    session = OAuth2Session(client_id="authlib-peer", token_endpoint_auth_method="none")
    session.register_compliance_hook("access_token_response", keep_raw)
    params = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": os.environ.get("SUBJECT_TOKEN_TYPE", JWT_TYPE),
        "role": role,
    }
    if len(argv) == 4:
        params["scope"] = argv[3]
    try:
        session.fetch_token(token_url, timeout=TIMEOUT_S, **params)
    except OAuthError as exc:
        print(json.dumps({"error": exc.error, "error_description": exc.description}))
        return 2
    except Exception as exc:  # transport errors, non-JSON bodies: not an OAuth answer
        print(json.dumps({"error_type": type(exc).__name__, "message": str(exc)}))
        return 1
    print(json.dumps(raw.get("body")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
