# Guest script for test/vm/iscsi-multipath-vm: the kernel's dm-multipath follows a `pair swap`.
# Logs in to the pair's LUN on both storage systems' targets (path A: the master's, B: the
# mirror's), builds the map with dmsetup (no multipathd), then writes through /dev/mapper/bm until
# dm-multipath has failed path A and moved to B, and one full pass more:
#
#   table   0 SECTORS multipath 0 0 2 1 round-robin 0 1 1 A 1 round-robin 0 1 1 B 1
#           (no features: queue_if_no_path off, so a path error with no path left fails the
#           write; no hardware handler; two priority groups, A's first; one path each)
#   pass p  chunk i (256 KiB) of the first 16 MiB <- chunk (i + p) mod 64 of /tmp/src
#
# "VMTEST: writing" is printed after the first pass (all through A): the host swaps then.
# Every write is O_DIRECT and must succeed. At the end the 16 MiB read back through the map must
# equal the last pass; its sha256 is printed for the host to compare with both volume files.
set -u
rc=0; CH=64
fail() { echo "VMTEST: $1 FAILED"; sed 's/^/VMTEST:   | /' /tmp/out | tail -5; rc=1; }
login() { iscsiadm -m node -o new -T "$2" -p "$1" >/tmp/out 2>&1 && iscsiadm -m node -T "$2" -p "$1" --login >/tmp/out 2>&1; }
# The sd disk whose iSCSI session is to target $1.
disk_of() { for s in /sys/block/sd*; do [ -e "$s/device" ] || continue
    sess=$(readlink -f "$s/device" | grep -o 'session[0-9]*' | head -1)
    [ -n "$sess" ] && [ "$(cat /sys/class/iscsi_session/$sess/targetname)" = "$1" ] && { echo "${s##*/}"; return 0; }
  done; return 1; }
status() { dmsetup status bm 2>/dev/null; }

login "$HOST:$PORT_A" "$TARGET_A" && echo "VMTEST: login A ok" || { fail "login A"; exit 1; }
login "$HOST:$PORT_B" "$TARGET_B" && echo "VMTEST: login B ok" || { fail "login B"; exit 1; }
a=; b=; for i in $(seq 60); do a=$(disk_of "$TARGET_A"); b=$(disk_of "$TARGET_B"); [ -n "$a" ] && [ -n "$b" ] && [ -e /dev/$a ] && [ -e /dev/$b ] && break; sleep 1; done
[ -n "$a" ] && [ -n "$b" ] || { echo "VMTEST: disks FAILED (A '$a' B '$b')"; exit 1; }
MA=$(cat /sys/block/$a/dev); MB=$(cat /sys/block/$b/dev); SECTORS=$(cat /sys/block/$a/size)
[ "$SECTORS" = "$(cat /sys/block/$b/size)" ] || { echo "VMTEST: path sizes differ FAILED"; exit 1; }
echo "VMTEST: paths A /dev/$a ($MA) B /dev/$b ($MB), $SECTORS sectors"
echo "0 $SECTORS multipath 0 0 2 1 round-robin 0 1 1 $MA 1 round-robin 0 1 1 $MB 1" > /tmp/table
dmsetup create bm --noudevsync /tmp/table >/tmp/out 2>&1 && dmsetup mknodes bm >/dev/null 2>&1 && [ -b /dev/mapper/bm ] \
  && echo "VMTEST: dmsetup create ok: $(dmsetup table bm)" || { fail "dmsetup create"; exit 1; }
echo "VMTEST: status before: $(status)"

dd if=/dev/urandom of=/tmp/src bs=256k count=$CH 2>/dev/null
# One pass; stops at the first failed write. Sets $failed_over once path A is marked failed.
pass() { i=0; while [ $i -lt $CH ]; do
    dd if=/tmp/src of=/dev/mapper/bm bs=256k count=1 skip=$(( (i + $1) % CH )) seek=$i oflag=direct >/tmp/out 2>&1 \
      || { fail "write pass $1 chunk $i"; return 1; }
    [ -n "$failed_over" ] || ! status | grep -q " $MA F " || { failed_over=$1/$i; echo "VMTEST: path A failed at pass $1 chunk $i: $(status)"; }
    i=$((i + 1)); done; }
failed_over=; p=0
pass 0 || exit 1
[ -z "$failed_over" ] || { echo "VMTEST: path A failed before the swap FAILED"; exit 1; }
echo "VMTEST: writing (pass 0 done through A: $(status))"
t0=$(date +%s); last=0
while :; do
  p=$((p + 1)); pass $p || exit 1
  if [ -n "$failed_over" ] && [ "${failed_over%/*}" -lt $p ]; then last=$p; break; fi   # a whole pass after the failover
  [ $(( $(date +%s) - t0 )) -lt 600 ] || { echo "VMTEST: path A not failed after $p passes in 600 s FAILED: $(status)"; exit 1; }
done
echo "VMTEST: writes done ($p passes after the first), no write failed"
echo "VMTEST: status after: $(status)"
# What the kernel made of the swap: the sense data sd logged and dm-multipath's path failure.
dmesg | grep -iE 'multipath|sense|standby|i/o error' | sed 's/^/VMTEST: dmesg: /'
i=0; while [ $i -lt $CH ]; do dd if=/tmp/src of=/tmp/expect bs=256k count=1 skip=$(( (i + last) % CH )) seek=$i conv=notrunc 2>/dev/null; i=$((i + 1)); done
want=$(sha256sum /tmp/expect | cut -d' ' -f1)
got=$(dd if=/dev/mapper/bm bs=256k count=$CH iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] && echo "VMTEST: read back sha256 ok $want" || { echo "VMTEST: read back FAILED want $want got $got"; rc=1; }
dmsetup remove bm >/tmp/out 2>&1 || fail "dmsetup remove"
iscsiadm -m node --logoutall=all >/tmp/out 2>&1 && echo "VMTEST: logout ok" || fail logout
exit $rc
