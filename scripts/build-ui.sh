#!/usr/bin/env bash
# Builds the web UI into ui/dist (which the flotilla binary embeds): installs the npm packages
# pinned in ui/package-lock.json when the lock changed, and builds again only when a source
# changed. Needs Node.js and npm (scripts/install-deps.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/../ui"
lock="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ "$(cat node_modules/.flotilla-lock 2>/dev/null)" != "$lock" ]; then
  echo "installing the web UI's npm packages into ui/node_modules"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock" > node_modules/.flotilla-lock
fi
sources="$( (find src -type f; ls index.html vite.config.ts tsconfig.json package-lock.json ../openapi/v3/apis/flotilla.dev/v1alpha1.json) | sort | xargs sha256sum | sha256sum | cut -d' ' -f1)"
if [ -f dist/index.html ] && [ "$(cat node_modules/.flotilla-sources 2>/dev/null)" = "$sources" ]; then
  exit 0
fi
npm run --silent build
echo "$sources" > node_modules/.flotilla-sources
