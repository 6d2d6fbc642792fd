#!/usr/bin/env bash
# Installs what Flotilla needs on Debian 12, idempotently: only missing packages are installed.
#   scripts/install-deps.sh run    what `make run` needs (build tools)
#   scripts/install-deps.sh test   what `make test` needs (the same, plus cargo-nextest)
set -euo pipefail

purpose="${1:-run}"
packages=(build-essential pkg-config ca-certificates)
case "$purpose" in
  run) ;;
  test) ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The Rust toolchain comes from rustup (Debian 12's rustc is too old for this workspace).
if ! command -v cargo >/dev/null && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
  echo "error: cargo not found. Install Rust with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi

if [ "$purpose" = test ]; then
  for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
      rustup component add "$component"
    fi
  done
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "installing cargo-nextest from crates.io"
    cargo install cargo-nextest --locked
  fi
fi
