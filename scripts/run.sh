#!/usr/bin/env bash
# Starts Flotilla all-in-one in the foreground (Ctrl-C stops it). Used by `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  data_dir="${FLOTILLA_DATA_DIR:-/var/lib/flotilla}"
  bin_dir=/usr/local/bin
else
  data_dir="${FLOTILLA_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/flotilla}"
  bin_dir="$HOME/.local/bin"
fi

# Put the CLI on the PATH (`flotilla up` points its config at this server unless the user has one).
mkdir -p "$bin_dir"
install -m 0755 target/release/flotilla "$bin_dir/flotilla"

# The tiny example guest (examples/tiny-vm.yaml boots it).
OUT="$data_dir/guests/tiny" scripts/build-tiny-guest.sh

cat <<MSG
Starting Flotilla all-in-one (server, controllers and a local agent on qemu:///system, virtualisation
type ${FLOTILLA_VIRT_TYPE}); data in $data_dir. In another terminal:
  flotilla get nodes
  flotilla apply -f examples/tiny-vm.yaml
  flotilla get vms -w              # Ctrl-C once it is Running
  flotilla vm log tiny
  flotilla vm console tiny         # interactive; Ctrl-] leaves
The web UI is at https://${FLOTILLA_LISTEN:-127.0.0.1:7443}/ui/ (the token is in $data_dir/admin.yaml).
MSG
exec "$bin_dir/flotilla" up --data-dir "$data_dir" --virt-type "${FLOTILLA_VIRT_TYPE}" ${FLOTILLA_LISTEN:+--listen "$FLOTILLA_LISTEN"}
