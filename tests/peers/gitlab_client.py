"""List a project's access tokens with python-gitlab (GitLab's own Python client).

    python gitlab_client.py --url URL (--token TOKEN | --oauth-token TOKEN) --project ID

URL is the GitLab base (python-gitlab appends /api/v4). Calls
`gl.projects.get(ID, lazy=True).access_tokens.list(get_all=False)` with
`private_token=TOKEN` (sent as the PRIVATE-TOKEN header), or with
`oauth_token=TOKEN` (sent as `Authorization: Bearer`: how a job hands
python-gitlab its cistern token when cistern's proxy is the URL).
Prints one JSON
line: {"ok": true, "count": N} (exit 0) or {"ok": false, "error": "...",
"error_type": "...", "status": HTTP status or null} (exit 1).

python-gitlab's defaults apply: a 429 is retried after its Retry-After
(obey_rate_limit, up to 10 times); 5xx answers are not retried.
"""

import argparse
import json
import sys

import gitlab


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one JSON line too (argparse would print text and exit 2)."""

    def error(self, message):
        print(json.dumps({"ok": False, "error_type": "usage", "error": message, "status": None}))
        sys.exit(1)


def main() -> int:
    parser = _Parser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--url", required=True, help="GitLab base URL, e.g. http://127.0.0.1:4010")
    auth = parser.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token", help="private token (PRIVATE-TOKEN header)")
    auth.add_argument("--oauth-token", help="bearer token (Authorization header)")
    parser.add_argument("--project", required=True, help="project id or URL-encoded path")
    args = parser.parse_args()
    try:
        if args.token is not None:
            gl = gitlab.Gitlab(args.url, private_token=args.token, timeout=10)
        else:
            gl = gitlab.Gitlab(args.url, oauth_token=args.oauth_token, timeout=10)
        tokens = gl.projects.get(args.project, lazy=True).access_tokens.list(get_all=False)
        print(json.dumps({"ok": True, "count": len(tokens)}))
        return 0
    except gitlab.exceptions.GitlabError as e:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error_type": type(e).__name__,
                    "error": str(e),
                    "status": e.response_code,
                }
            )
        )
        return 1
    except Exception as e:  # noqa: BLE001 - report any failure as JSON
        print(json.dumps({"ok": False, "error_type": type(e).__name__, "error": str(e), "status": None}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
