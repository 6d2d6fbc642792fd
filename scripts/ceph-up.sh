#!/usr/bin/env bash
# Starts a throwaway single-node Ceph 16.2 for the RBD tests: one monitor, one manager and one
# memstore OSD (its data in RAM: CEPH_MEMSTORE_BYTES, default 1 GiB), cephx on, every daemon
# on 127.0.0.1 only. About 11 s.
#   scripts/ceph-up.sh DIR [POOL]
# leaves in DIR: ceph.conf, the admin keyring, ceph.client.flotilla.keyring (a client that may
# use POOL only, as a node would be given), the daemons' pid files (*.pid) and logs (log/).
# Stop it with scripts/ceph-down.sh DIR. One at a time on a machine (fixed loopback ports): the
# daemons of an earlier fixture whose test was killed before stopping it are stopped first.
set -euo pipefail
C="$1"; POOL="${2:-flotilla}"
pkill -f '^ceph-(mon|mgr|osd) -f -c /.*/flotilla-test-ceph/ceph\.conf' && sleep 1 || true
# Every wait is bounded: a daemon that does not come up fails the fixture with its log.
wait_for() {
  local what="$1"; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "ceph-up: $what did not happen within 60 s; logs in $C/log" >&2
  tail -n 20 "$C"/log/*.out >&2 || true
  exit 1
}
rm -rf "$C"; mkdir -p "$C"/{mon/ceph-a,osd/ceph-0,mgr/ceph-x,run,log}
FSID=$(cat /proc/sys/kernel/random/uuid)
cat > "$C/ceph.conf" <<CONF
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
osd crush chooseleaf type = 0
run dir = $C/run
admin socket = $C/run/\$name.asok
log file = $C/log/\$name.log
mon data = $C/mon/\$cluster-\$id
osd data = $C/osd/\$cluster-\$id
mgr data = $C/mgr/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = ${CEPH_MEMSTORE_BYTES:-1073741824}
[client.admin]
keyring = $C/ceph.client.admin.keyring
CONF
ceph-authtool --create-keyring "$C/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$C/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
ceph-authtool "$C/mon.keyring" --import-keyring "$C/ceph.client.admin.keyring" >/dev/null
monmaptool --create --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' --fsid "$FSID" "$C/monmap" >/dev/null
ceph-mon -c "$C/ceph.conf" --mkfs -i a --monmap "$C/monmap" --keyring "$C/mon.keyring"
setsid ceph-mon -f -c "$C/ceph.conf" -i a >"$C/log/mon.out" 2>&1 </dev/null & echo $! >"$C/mon.pid"
ceph=(ceph -c "$C/ceph.conf")
wait_for "the monitor answering" timeout 5 "${ceph[@]}" mon stat
"${ceph[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' -o "$C/mgr/ceph-x/keyring"
setsid ceph-mgr -f -c "$C/ceph.conf" -i x >"$C/log/mgr.out" 2>&1 </dev/null & echo $! >"$C/mgr.pid"
UUID=$(cat /proc/sys/kernel/random/uuid); ID=$("${ceph[@]}" osd new "$UUID")
"${ceph[@]}" auth get-or-create "osd.$ID" mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *' -o "$C/osd/ceph-$ID/keyring"
ceph-osd -c "$C/ceph.conf" -i "$ID" --mkfs --osd-uuid "$UUID" >"$C/log/osd-mkfs.out" 2>&1
setsid ceph-osd -f -c "$C/ceph.conf" -i "$ID" >"$C/log/osd.out" 2>&1 </dev/null & echo $! >"$C/osd.pid"
osd_up() { "${ceph[@]}" osd stat 2>/dev/null | grep -q '1 up'; }
wait_for "the OSD coming up" osd_up
"${ceph[@]}" osd pool create "$POOL" 8 8 >/dev/null 2>&1
rbd -c "$C/ceph.conf" pool init "$POOL"
"${ceph[@]}" auth get-or-create client.flotilla mon 'profile rbd' osd "profile rbd pool=$POOL" -o "$C/ceph.client.flotilla.keyring"
clean() { "${ceph[@]}" pg stat 2>/dev/null | grep -qE '^[0-9]+ pgs: [0-9]+ active\+clean;'; }
wait_for "the placement groups becoming active+clean" clean
