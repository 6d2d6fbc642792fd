#!/usr/bin/env bash
# Stops what scripts/iscsi-target-up.sh DIR started and removes DIR.
set -uo pipefail
D="$1"
tgtadm -C 7 --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1
if [ -f "$D/tgtd.pid" ]; then
  pid=$(cat "$D/tgtd.pid")
  # tgtd ignores SIGTERM while it runs; its target is gone, so nothing is lost.
  kill -9 "$pid" 2>/dev/null
fi
rm -rf "$D"
