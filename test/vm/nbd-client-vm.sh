#!/usr/bin/env bash
# Attach NBD exports served on the host with the real Linux NBD client (the nbd.ko kernel module
# driven by nbd-client) inside a throwaway VM, and put a filesystem on each.
#
# usage: test/vm/nbd-client-vm.sh [--timeout SECS] [--tls DIR] LABEL:PORT:EXPORT[:CONNS[:TLS]] ...
#   LABEL   a word naming the target in the output, e.g. "memory" or "file"
#   PORT    TCP port of an NBD server listening on the host's 127.0.0.1
#   EXPORT  export name
#   CONNS   sockets the kernel opens to the export (nbd-client -C; default 1); more than one
#           is only safe when the server advertises CAN_MULTI_CONN
#   TLS     "tls": nbd-client -x with DIR/ca.pem, DIR/client.pem and DIR/client-key.pem (given by
#           --tls, checked against the server's certificate for "localhost");
#           "tls-nocert": the same without the client certificate, and the target passes only if
#           the server refuses it
#
# How it works: the VM is Debian's cloud kernel, booted by qemu (software emulation unless
# BLOCKMIRROR_VM_ACCEL says otherwise) with a busybox initramfs that holds nbd-client, mkfs.ext4 and
# e2fsck. qemu's user-mode network makes the host's loopback reachable from the guest as 10.0.2.2.
# The guest walks the targets one after another, each on its own /dev/nbdN:
#   attach -> mkfs.ext4 (discards, i.e. TRIM) -> mount -> write 32 MiB of random data + sync
#   -> umount -> e2fsck -fn -> detach, re-attach (so every byte comes from the server again)
#   -> mount -> sha256 must match -> umount -> detach.
# Every result is a line "VMTEST: LABEL: ...". For each target that passes, the guest prints
#   "VMTEST: LABEL: sha256 HEX" (the file /f on the filesystem), so the host can check the
#   export's bytes itself afterwards.
# Exit status: 0 iff every target passed; 1 if a target failed; 2 for a usage or setup error
# (a missing tool is a setup error, never a silent skip).
#
# The kernel is downloaded once (apt-get download, needs Debian's package index) and cached in
# ${XDG_CACHE_HOME:-$HOME/.cache}/blockmirror-vm.
set -euo pipefail

prog=${0##*/}
die() { echo "$prog: $*" >&2; exit 2; }

timeout_s=600
tls_dir=
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) timeout_s=$2; shift 2 ;;
    --tls) tls_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || die "usage: $prog [--timeout SECS] LABEL:PORT:EXPORT ..."
for t in "$@"; do
  [[ $t =~ ^[A-Za-z0-9_-]+:[0-9]+:[A-Za-z0-9._-]+(:[1-8](:(tls|tls-nocert))?)?$ ]] ||
    die "bad target '$t' (want LABEL:PORT:EXPORT[:CONNS[:TLS]], plain words, CONNS 1-8, TLS tls or tls-nocert)"
  if [[ $t =~ :tls ]]; then
    [ -n "$tls_dir" ] && [ -f "$tls_dir/ca.pem" ] || die "target '$t' needs --tls DIR with ca.pem, client.pem and client-key.pem"
  fi
done
[ $# -le 8 ] || die "at most 8 targets"

# Every tool must be there: CI installs them, and a missing one must fail the run, not skip it.
for tool in qemu-system-x86_64 busybox nbd-client mkfs.ext4 e2fsck apt-get apt-cache dpkg ldd gzip timeout; do
  command -v "$tool" >/dev/null 2>&1 ||
    die "$tool is missing (Debian: apt-get install qemu-system-x86 busybox-static nbd-client e2fsprogs)"
done
busybox cpio --help >/dev/null 2>&1 || die "busybox has no cpio applet (install busybox-static)"

# --- kernel: Debian's cloud flavour has virtio-net and nbd as modules and boots fast ------------
cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/blockmirror-vm
mkdir -p "$cache"
kernel=$(ls "$cache"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
if [ -z "$kernel" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    echo "$prog: linux-image-cloud-amd64 is unknown to apt; running apt-get update" >&2
    apt-get update -qq >&2 || die "apt-get update failed"
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package"
  echo "$prog: downloading $pkg into $cache (once)" >&2
  dl=$(mktemp -d "$cache/dl.XXXXXX")
  (cd "$dl" && apt-get download "$pkg" >&2) || { rm -rf "$dl"; die "apt-get download $pkg failed"; }
  mkdir -p "$dl/x"
  dpkg -x "$dl"/"$pkg"_*.deb "$dl/x" || { rm -rf "$dl"; die "dpkg -x failed"; }
  rm -rf "$cache/kernel"
  mv "$dl/x" "$cache/kernel"   # atomic enough: a half-unpacked tree never gets the final name
  rm -rf "$dl"
  kernel=$(ls "$cache"/kernel/boot/vmlinuz-* | head -n1)
fi
moddir=$(ls -d "$cache"/kernel/lib/modules/* | head -n1)

# --- initramfs ------------------------------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,mods,dev,proc,sys,mnt,tmp,etc}
cp "$(command -v busybox)" "$root/bin/busybox"

# Load order matters: each module after the ones it depends on.
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net nbd"
for m in $modules; do
  f=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)
  [ -n "$f" ] || continue              # built into this kernel
  case $f in
    *.xz) command -v xz >/dev/null || die "$f is xz-compressed and xz is missing (apt-get install xz-utils)"
          xz -dc "$f" > "$root/mods/$m.ko" ;;
    *) cp "$f" "$root/mods/$m.ko" ;;
  esac
done
[ -f "$root/mods/nbd.ko" ] || die "the kernel in $cache has no nbd.ko"

# Host binaries plus the shared libraries they link against, at the same paths.
add_binary() {
  local bin=$1 lib
  cp "$bin" "$root/bin/"
  for lib in $(ldd "$bin" | grep -oE '/[^ ]+'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -nL "$lib" "$root$lib"
  done
}
add_binary "$(command -v nbd-client)"
add_binary "$(command -v mkfs.ext4)"
add_binary "$(command -v e2fsck)"

if [ -n "$tls_dir" ]; then mkdir -p "$root/tls" && cp "$tls_dir"/ca.pem "$tls_dir"/client.pem "$tls_dir"/client-key.pem "$root/tls/"; fi

cat > "$root/test.sh" <<'GUEST'
# Runs in the guest (busybox sh). $1 = device index, $2 = label, $3 = port, $4 = export,
# $5 = connections, $6 = tls, tls-nocert or nothing.
n=$1 label=$2 port=$3 export=$4 conns=${5:-1} tls=${6:-} dev=/dev/nbd$1
say() { echo "VMTEST: $label: $*"; }
case $tls in
  tls) tlsargs="--enable-tls --cacertfile /tls/ca.pem --tlshostname localhost --certfile /tls/client.pem --keyfile /tls/client-key.pem" ;;
  tls-nocert) tlsargs="--enable-tls --cacertfile /tls/ca.pem --tlshostname localhost" ;;
  *) tlsargs= ;;
esac
attach() {
  nbd-client 10.0.2.2 "$port" "$dev" -N "$export" -b 4096 -C "$conns" $tlsargs >/tmp/nbd-client.log 2>&1 ||
    { say "nbd-client FAILED: $(tr '\n' ' ' </tmp/nbd-client.log)"; return 1; }
}
if [ "$tls" = tls-nocert ]; then
  if attach; then say "attached WITHOUT a client certificate"; nbd-client -d "$dev" >/dev/null 2>&1; exit 1; fi
  say "refused without a client certificate"
  exit 0
fi
attach || exit 1
say "attached $dev, $(cat /sys/block/nbd$n/size) sectors, $conns connection(s)"
mkfs.ext4 -q -F "$dev" >/tmp/mkfs.log 2>&1 || { say "mkfs.ext4 FAILED: $(tr '\n' ' ' </tmp/mkfs.log)"; exit 1; }
say "mkfs.ext4 ok"
mount -t ext4 "$dev" /mnt || { say "mount FAILED"; exit 1; }
say "mount ok"
dd if=/dev/urandom of=/mnt/f bs=1M count=32 2>/dev/null || { say "write FAILED"; exit 1; }
sync
a=$(sha256sum /mnt/f | cut -d' ' -f1)
say "wrote 32 MiB"
umount /mnt || { say "umount FAILED"; exit 1; }
e2fsck -fn "$dev" >/tmp/fsck.log 2>&1 || { say "e2fsck FAILED: $(tr '\n' ' ' </tmp/fsck.log)"; exit 1; }
say "e2fsck clean"
nbd-client -d "$dev" >/dev/null 2>&1
echo 3 > /proc/sys/vm/drop_caches
attach || exit 1
mount -t ext4 "$dev" /mnt || { say "remount FAILED"; exit 1; }
b=$(sha256sum /mnt/f | cut -d' ' -f1)
umount /mnt
nbd-client -d "$dev" >/dev/null 2>&1
[ "$a" = "$b" ] || { say "reread MISMATCH wrote $a read $b"; exit 1; }
say "reread ok"
say "sha256 $a"
GUEST

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net nbd; do
  [ -f /mods/$m.ko ] && insmod /mods/$m.ko 2>/dev/null
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -e /sys/class/net/eth0 ] && break; sleep 1; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
rc=0; n=0
for t in $(sed -n 's/.*vmtargets=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' '); do
  IFS=: read label port export conns tls <<EOF
$t
EOF
  if sh /test.sh "$n" "$label" "$port" "$export" "${conns:-1}" "${tls:-}"; then echo "VMTEST: $label: PASS"; else echo "VMTEST: $label: FAIL"; rc=1; fi
  n=$((n + 1))
done
echo "VMTEST: exit $rc"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")

# --- boot -----------------------------------------------------------------------------------------
targets=$(IFS=,; echo "$*")
# Software emulation by default: it is slow but the same everywhere. A /dev/kvm that opens is no
# promise (nested KVM has been seen to crawl through the BIOS for minutes), so KVM is opt-in:
# BLOCKMIRROR_VM_ACCEL=kvm.
accel=(-accel "${BLOCKMIRROR_VM_ACCEL:-tcg}")
echo "$prog: booting $(basename "$kernel") (${accel[*]}) for $targets" >&2
status=0
timeout "$timeout_s" qemu-system-x86_64 "${accel[@]}" -m 768 -smp 1 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 vmtargets=$targets" \
  -nic user,model=virtio-net-pci >"$work/console.log" 2>&1 || status=$?
grep -ao 'VMTEST: .*' "$work/console.log" | sed 's/\r$//' | grep -v '^VMTEST: exit' || true
code=$(grep -ao 'VMTEST: exit [0-9]*' "$work/console.log" | tail -n1 | tr -dc 0-9 || true)
if [ -z "$code" ]; then
  [ "$status" = 124 ] && echo "$prog: the VM did not finish within ${timeout_s}s" >&2
  echo "$prog: the guest did not finish (qemu status $status); last console output:" >&2
  tail -c 3000 "$work/console.log" | sed 's/\r$//' >&2
  exit 1
fi
exit "$code"
