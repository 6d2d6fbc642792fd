#!/usr/bin/env bash
# Starts a throwaway NFS server for the NFS tests: nfs-ganesha (userspace, VFS backend) and
# rpcbind in their own network namespace, which only a veth pair joins to this host: both
# listen on every address they see, so in here they see only 198.18.253.2 (and the host side
# is 198.18.253.1, a benchmarking range nothing routes). QEMU and the agent reach
# nfs://198.18.253.2/export/... The export is DIR/export, owned by QEMU's user (64055), whom
# the tests' pools make their files as.
#   scripts/nfs-server-up.sh DIR
# Stop it with scripts/nfs-server-down.sh DIR. One at a time on a machine (fixed names): what an
# earlier run whose test was killed left is stopped first.
set -euo pipefail
D="$1"
NS=fltnfs-test
"$(dirname "$0")/nfs-server-down.sh" "$D"
mkdir -p "$D/export"
chown 64055:64055 "$D/export"
ip netns add "$NS"
ip link add fltnfs-h type veth peer name fltnfs-n
ip link set fltnfs-n netns "$NS"
ip addr add 198.18.253.1/30 dev fltnfs-h
ip link set fltnfs-h up
ip -n "$NS" addr add 198.18.253.2/30 dev fltnfs-n
ip -n "$NS" link set fltnfs-n up
ip -n "$NS" link set lo up
cat > "$D/ganesha.conf" <<CONF
NFS_CORE_PARAM { NFS_Port = 2049; MNT_Port = 20048; Enable_NLM = false; Enable_RQUOTA = false;
                 Mount_Path_Pseudo = true; Protocols = 3, 4; }
NFSv4 { Graceless = true; RecoveryBackend = fs; }
NFS_KRB5 { Active_krb5 = false; }
EXPORT { Export_Id = 77; Path = $D/export; Pseudo = /export; Access_Type = RW;
         Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; SecType = sys;
         Attr_Expiration_Time = 0; FSAL { Name = VFS; } }
LOG { Default_Log_Level = EVENT; }
CONF
ip netns exec "$NS" setsid rpcbind -f >"$D/rpcbind.log" 2>&1 </dev/null & echo $! >"$D/rpcbind.pid"
sleep 0.2
ip netns exec "$NS" setsid ganesha.nfsd -F -f "$D/ganesha.conf" -L "$D/ganesha.log" \
  -p "$D/ganesha.pidfile" -N NIV_EVENT >"$D/ganesha.out" 2>&1 </dev/null & echo $! >"$D/ganesha.pid"
for _ in $(seq 1 100); do
  rpcinfo -p 198.18.253.2 2>/dev/null | grep -q mountd && exit 0
  sleep 0.1
done
echo "nfs-server-up: ganesha did not register within 10 s:" >&2
cat "$D/ganesha.out" "$D/ganesha.log" >&2 || true
exit 1
