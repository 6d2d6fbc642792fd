#!/usr/bin/env bash
# Stops what scripts/ceph-up.sh DIR started and removes DIR.
set -uo pipefail
C="$1"
for d in osd mgr mon; do
  [ -f "$C/$d.pid" ] && kill "$(cat "$C/$d.pid")" 2>/dev/null
done
for d in osd mgr mon; do
  if [ -f "$C/$d.pid" ]; then
    pid=$(cat "$C/$d.pid")
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  fi
done
rm -rf "$C"
