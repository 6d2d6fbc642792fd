#!/usr/bin/env bash
# Starts a throwaway iSCSI target for the iSCSI tests: tgtd (pure userspace, package tgt) on
# 127.0.0.1:3261 (not the default port: a packaged tgtd may hold 3260) with control port 7
# (clear of any other tgtd), one target whose LUNs are sparse files in DIR.
#   scripts/iscsi-target-up.sh DIR IQN SIZE...     (one LUN per SIZE, numbered from 1)
# Stop it with scripts/iscsi-target-down.sh DIR. One at a time on a machine (a fixed port): the
# tgtd of an earlier run whose test was killed is stopped first.
set -euo pipefail
D="$1"; IQN="$2"; shift 2
pkill -9 -f '^tgtd -f -C 7 ' && sleep 0.5 || true
rm -rf "$D"; mkdir -p "$D"
setsid tgtd -f -C 7 --iscsi portal=127.0.0.1:3261 >"$D/tgtd.log" 2>&1 </dev/null & echo $! >"$D/tgtd.pid"
for _ in $(seq 1 100); do
  tgtadm -C 7 --lld iscsi --op show --mode target >/dev/null 2>&1 && break
  sleep 0.1
done
tgtadm -C 7 --lld iscsi --op new --mode target --tid 1 -T "$IQN"
lun=1
for size in "$@"; do
  truncate -s "$size" "$D/lun$lun.img"
  tgtadm -C 7 --lld iscsi --op new --mode logicalunit --tid 1 --lun "$lun" -b "$D/lun$lun.img"
  lun=$((lun + 1))
done
tgtadm -C 7 --lld iscsi --op bind --mode target --tid 1 -I ALL
