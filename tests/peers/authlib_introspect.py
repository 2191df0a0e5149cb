"""RFC 7662 introspection against cistern with authlib's OAuth2 client.

    python authlib_introspect.py AS_METADATA_URL CLIENT_ID CLIENT_SECRET TOKEN

Reads `introspection_endpoint` from the RFC 8414 metadata, then calls
authlib's `OAuth2Session.introspect_token` with client_secret_basic. Prints
the introspection JSON (exit 0) or the failure (exit 1), one JSON line.
"""

import json
import sys

import requests
from authlib.integrations.requests_client import OAuth2Session


def main() -> int:
    if len(sys.argv) != 5:
        print(json.dumps({"error_type": "usage", "message": __doc__.strip().splitlines()[2]}))
        return 1
    metadata_url, client_id, client_secret, token = sys.argv[1:]
    try:
        meta = requests.get(metadata_url, timeout=10).json()
        session = OAuth2Session(
            client_id, client_secret, token_endpoint_auth_method="client_secret_basic"
        )
        res = session.introspect_token(meta["introspection_endpoint"], token=token, timeout=10)
        if res.status_code != 200:
            print(json.dumps({"error_type": "http", "status": res.status_code, "body": res.text}))
            return 1
        print(json.dumps(res.json()))
        return 0
    except Exception as e:  # noqa: BLE001 - report any failure as JSON
        print(json.dumps({"error_type": type(e).__name__, "message": str(e)}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
