#!/usr/bin/env bash
# Installs the third-party test peers (tests/peers): npm packages from the
# committed package-lock.json and a Python venv from requirements.txt, both
# exact pins. Idempotent: a stamp of the lock file skips work already done;
# pass --force to reinstall anyway. Prints the installed versions.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$root/tests/peers"
force=0
[[ "${1:-}" == "--force" ]] && force=1

die() { echo "install-test-peers: $*" >&2; exit 1; }
stamp_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

command -v node >/dev/null || die "node not found (Node.js >= 20 is required)"
command -v npm >/dev/null || die "npm not found"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
(( node_major >= 20 )) || die "Node.js >= 20 is required, found $(node --version)"
python="${PYTHON:-python3}"
# python-gitlab 8 needs 3.10.
command -v "$python" >/dev/null || die "$python not found (CPython >= 3.10 is required)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "CPython >= 3.10 is required, found $("$python" --version)"

cd "$peers"

# npm: exactly the lock file.
npm_stamp="$(stamp_of package.json package-lock.json; node --version)"
if (( force )) || [[ ! -f node_modules/.cistern-stamp ]] \
  || [[ "$(cat node_modules/.cistern-stamp)" != "$npm_stamp" ]]; then
  echo "install-test-peers: npm ci in tests/peers"
  npm ci --no-audit --no-fund
  echo "$npm_stamp" > node_modules/.cistern-stamp
else
  echo "install-test-peers: npm packages up to date"
fi

# Python: a venv with the pinned requirements.
py_stamp="$(stamp_of requirements.txt; "$python" --version)"
if (( force )) || [[ ! -x .venv/bin/python ]] || [[ ! -f .venv/.cistern-stamp ]] \
  || [[ "$(cat .venv/.cistern-stamp)" != "$py_stamp" ]]; then
  echo "install-test-peers: creating tests/peers/.venv"
  rm -rf .venv
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --no-input --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip check
  echo "$py_stamp" > .venv/.cistern-stamp
else
  echo "install-test-peers: Python venv up to date"
fi

echo "install-test-peers: versions"
echo "  node $(node --version)"
node -e '
  for (const p of ["oidc-provider", "jose", "oauth4webapi", "@stoplight/prism-cli"]) {
    const v = JSON.parse(require("fs").readFileSync(`node_modules/${p}/package.json`, "utf8")).version;
    console.log(`  ${p} ${v}`);
  }'
.venv/bin/python - <<'PY'
import platform
from importlib.metadata import version
print(f"  python {platform.python_version()}")
for p in ("PyJWT", "cryptography", "jwcrypto", "Authlib", "requests", "python-gitlab"):
    print(f"  {p} {version(p)}")
PY
