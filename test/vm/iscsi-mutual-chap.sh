# Guest script for linux-iscsi-initiator-vm --script: mutual CHAP with the kernel initiator.
# The target's secret comes in as TARGET_USER/TARGET_SECRET (first line, written by the test).
# 1. a wrong target secret: iscsid must refuse the target (it cannot prove itself), no disk appears;
# 2. the right one: login, write 4 MiB of random data, drop caches, read it back, a fio verify job
#    (the target's CmdSN window and R2T path under a real queue), logout. Needs --with-fio.
set -u
P=$HOST:$PORT; rc=0
fail() { echo "VMTEST: $1 FAILED"; sed 's/^/VMTEST:   | /' /tmp/out | tail -5; rc=1; }
node() { iscsiadm -m node -T "$TARGET" -p $P "$@" >/tmp/out 2>&1; }
set_auth() {
  node -o update -n node.session.auth.authmethod -v CHAP &&
  node -o update -n node.session.auth.username -v "$CHAP_USER" &&
  node -o update -n node.session.auth.password -v "$CHAP_SECRET" &&
  node -o update -n node.session.auth.username_in -v "$TARGET_USER" &&
  node -o update -n node.session.auth.password_in -v "$1"
}
node -o new || { fail "node record"; exit 1; }
set_auth "wrong-target-secret-99" || fail "node auth (wrong)"
if node --login; then fail "login with a wrong target secret succeeded"; node --logout
elif ls /sys/block | grep -q '^sd'; then echo "VMTEST: a disk appeared after a refused login FAILED"; rc=1
else echo "VMTEST: wrong target secret refused ok ($(grep -o 'iscsiadm: .*' /tmp/out | tail -1))"; fi
set_auth "$TARGET_SECRET" || fail "node auth"
node --login && echo "VMTEST: mutual CHAP login ok" || { fail "mutual CHAP login"; exit 1; }
d=; for i in $(seq 60); do for s in /sys/block/sd*; do [ -e "/dev/${s##*/}" ] && d=${s##*/} && break 2; done; sleep 1; done
[ -n "$d" ] || { echo "VMTEST: disk FAILED (no /dev/sd* after login)"; exit 1; }
dd if=/dev/urandom of=/tmp/data bs=1M count=4 2>/dev/null
dd if=/tmp/data of=/dev/$d bs=1M oflag=direct >/tmp/out 2>&1 && sync && echo "VMTEST: write 4 MiB ok" || fail write
echo 3 > /proc/sys/vm/drop_caches
a=$(sha256sum /tmp/data | cut -c1-16)
b=$(dd if=/dev/$d bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-16)
[ "$a" = "$b" ] && echo "VMTEST: read back sha256 ok $a" || { echo "VMTEST: read back FAILED $a $b"; rc=1; }
# A fio verify job on the raw disk (16 MiB of 4 KiB random writes, 16 in flight, crc32c checked on read back).
fio --name=verify --filename=/dev/$d --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16M \
  --offset=8M --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/out 2>&1 && grep -q 'err= 0' /tmp/out \
  && echo "VMTEST: fio verify ok" || fail "fio verify"
node --logout && echo "VMTEST: logout ok" || fail logout
exit $rc
