#!/usr/bin/env bash
# Installs what Flotilla needs on Debian 12, idempotently: only missing packages are installed.
#   scripts/install-deps.sh run    what `make run` needs (build tools)
#   scripts/install-deps.sh test   what `make test` needs (the same, plus cargo-nextest)
set -euo pipefail

purpose="${1:-run}"
# Build tools (protoc for the etcd client), libvirt and QEMU, and what the agent runs (qemu-img).
packages=(build-essential pkg-config ca-certificates protobuf-compiler libvirt-daemon-system libvirt-dev qemu-system-x86 qemu-utils)
# The tiny guest (both the example and the tests boot it): the Debian cloud kernel, busybox and
# cpio for its initramfs.
packages+=(linux-image-cloud-amd64 busybox-static cpio kmod)
# The agent's network dataplane: dnsmasq serves DHCP and DNS on each overlay network,
# dhcp_release (dnsmasq-utils) frees a deleted port's lease, nftables for the firewall rules.
packages+=(dnsmasq-base dnsmasq-utils nftables)
# The web UI is built with Node.js (scripts/build-ui.sh) unless the machine has it already.
if ! command -v npm >/dev/null; then packages+=(nodejs npm); fi
case "$purpose" in
  run) ;;
  # The Debian guest of the cloud-init end-to-end test is built with debootstrap; tests read
  # seed ISOs back with xorriso and run real etcd clusters; the Python clients (the Kubernetes
  # client, schemathesis) live in a virtual environment; the dataplane tests build namespaces
  # with iproute2 (ip, bridge); the router benchmark measures with iperf3.
  # The RBD tests start a throwaway single-node Ceph (scripts/ceph-up.sh; ceph-common comes with
  # it: the rbd and ceph tools the agent drives) and guests open RBD images through QEMU's rbd
  # block driver (qemu-block-extra) — what every node serving an rbd pool needs.
  test) packages+=(debootstrap e2fsprogs xorriso etcd-server python3-venv iproute2 iperf3)
        packages+=(ceph-mon ceph-osd ceph-mgr ceph-common qemu-block-extra)
        # The iSCSI tests run a userspace target (tgt) and list its LUNs with libiscsi's tools,
        # as nodes serving an iscsi pool do.
        packages+=(tgt libiscsi-bin)
        # The NFS tests run a userspace NFS server (nfs-ganesha with its VFS backend; rpcbind
        # comes with it) in a network namespace of their own.
        packages+=(nfs-ganesha nfs-ganesha-vfs)
        # The identity tests run a real OpenID provider on Node.js (tests/oidc).
        # The web UI's browser suite drives Debian's Chromium (playwright-core, no download).
        packages+=(chromium fonts-dejavu-core) ;;
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
# Some images carry a backported qemu-utils that Breaks Debian 12's qemu-system-x86; QEMU's
# packages must come from one release, so qemu-utils is pinned to the system's own suite.
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
qemu_utils_suite="$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)"
if [[ "$qemu_utils_suite" == *bpo* ]] && ! dpkg-query -W -f='${Status}' qemu-system-x86 2>/dev/null | grep -q "install ok installed"; then
  missing+=(qemu-utils)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  args=()
  for p in "${missing[@]}"; do
    if [ "$p" = qemu-utils ] || [ "$p" = qemu-system-x86 ]; then args+=("$p/$codename"); else args+=("$p"); fi
  done
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${args[@]}"
fi

# No systemd here: start the daemons libvirt needs unless they run.
if ! pgrep -x virtlogd >/dev/null; then $sudo virtlogd -d; fi
if ! pgrep -x libvirtd >/dev/null; then $sudo libvirtd -d; fi
for _ in $(seq 1 50); do
  [ -S /var/run/libvirt/libvirt-sock ] && break
  sleep 0.1
done

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
  scripts/build-tiny-guest.sh
  scripts/build-debian-guest.sh
  # The Python clients of the real-client suites, pinned in tests/clients/requirements.txt, in a
  # virtual environment of Debian's Python; reinstalled only when the pins change.
  venv=target/clients-venv
  stamp="$(sha256sum tests/clients/requirements.txt | cut -d' ' -f1)"
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$stamp" ]; then
    echo "installing the Python clients into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-virtualenv -r tests/clients/requirements.txt
    echo "$stamp" > "$venv/.requirements"
  fi
  # The OpenID provider of the identity tests (tests/oidc: panva's oidc-provider), pinned in
  # its package-lock.json; reinstalled only when the lock changes.
  stamp="$(sha256sum tests/oidc/package-lock.json | cut -d' ' -f1)"
  if [ "$(cat tests/oidc/node_modules/.flotilla-lock 2>/dev/null)" != "$stamp" ]; then
    echo "installing the test OpenID provider into tests/oidc/node_modules"
    (cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)
    echo "$stamp" > tests/oidc/node_modules/.flotilla-lock
  fi
fi
