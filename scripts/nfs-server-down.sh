#!/usr/bin/env bash
# Stops what scripts/nfs-server-up.sh DIR started (also what a killed run left) and removes DIR.
set -uo pipefail
D="$1"
NS=fltnfs-test
if ip netns pids "$NS" >/dev/null 2>&1; then
  for pid in $(ip netns pids "$NS"); do kill -9 "$pid" 2>/dev/null; done
fi
ip netns del "$NS" 2>/dev/null
ip link del fltnfs-h 2>/dev/null
# rpcbind keeps its socket and state on the host's /run.
rm -f /run/rpcbind.sock /run/rpcbind/rpcbind.xdr /run/rpcbind/portmap.xdr
rm -rf "$D"
true
