#!/usr/bin/env bash
# bench/virtio/run.sh — virtio-blk and virtio-net throughput of a KvmSharp guest, and the VMM's own
# CPU time per request.
#
# Usage: bench/virtio/run.sh [RUNS]        (root; default RUNS=3; one VM at a time)
#
# Each run:
#   1. host references on the disk image (a raw file in /var/tmp, not tmpfs), coreutils dd:
#      O_DIRECT, BLK_MIB MiB in 1 MiB blocks, write then read (the limit for blkw/blkr); buffered in
#      512 KiB blocks (the kernel's CPU for the pwrite/pread calls the VMM makes); 4 KiB O_DIRECT
#      reads (the limit for blk4) and 4 KiB reads from the page cache (CPU per pread).
#   2. one boot of the minimal test guest (guest/out/minimal/bzImage + guest/out/initrd.cpio, 1 vCPU,
#      256 MiB) with that image as virtio-blk /dev/vda and a virtio-net NIC on a TAP inside a network
#      namespace made by this script (172.31.214.1 host, .2 guest; the host's own network is never
#      touched). The guest script (kvmsharp.run=<base64>) runs these phases, one after the other:
#        idle  `read -t 10` (a shell builtin: 10 s of an idle guest, the background rate)
#        blkw  busybox dd if=/dev/zero of=/dev/vda bs=1M count=BLK_MIB oflag=direct
#        blkr  busybox dd if=/dev/vda of=/dev/null bs=1M count=BLK_MIB iflag=direct
#              (before it the host writes the image back and drops its pages from the page cache,
#              dd iflag=nocache count=0 on that file only, so the guest reads the disk as host dd
#              O_DIRECT does)
#        blk4  busybox dd if=/dev/vda of=/dev/null bs=4k count=SMALL_REQS iflag=direct: small
#              requests, served from the host page cache (blkr has just read the image), so that the
#              VMM's fixed cost per request is not buried under copying 512 KiB
#        ntx   guest→host TCP: nc 172.31.214.1 5001 -e dd if=/dev/zero bs=1M count=NET_MIB
#              (host: sleep | busybox nc -l -p 5001 | wc -c; the byte count is checked)
#        nrx   host→guest TCP: nc 172.31.214.1 5002 -e dd of=/dev/null bs=1M
#              (host: dd if=/dev/zero bs=1M count=NET_MIB | busybox nc -l -p 5002)
#      Around each phase the guest prints "VS <phase>0 …" (counters from /sys/block/vda/stat and
#      /sys/class/net/eth0/statistics, read with the shell's builtin `read`, no process), then the
#      marker "VB <phase>0", and waits for a line on its console; it runs the phase, prints
#      "VB <phase>1", waits again, and prints "VS <phase>1 …". The host follows the serial console
#      and, on each VB marker, samples every thread of the VMM process
#      (/proc/PID/task/TID/{comm,stat (utime, stime, guest_time in ticks),schedstat (ns on CPU)}),
#      then answers with a newline on the VMM's stdin (a FIFO = the guest's console input).
#   3. per phase: CPU time of the I/O thread ("io": ioeventfd kicks, pread/pwrite, TAP I/O, irqfds),
#      of all non-vCPU threads (io, main, console, .NET runtime) and of the vCPU threads ("vcpuN"),
#      from schedstat (ns), divided by the requests the guest completed in the phase (blk: requests
#      completed; net: packets tx+rx on eth0) and by MiB. On a PVM host the vCPU thread's system time
#      includes the host's emulation of guest ring 0.
#
# Prints a markdown table per run and a table of medians over the runs; raw data (console logs,
# /proc samples, parsed rows) under bench/virtio/build/. Exits non-zero when a run fails (boot
# timeout, guest script rc≠0, wrong byte counts, the guest's data not in the image, missing markers).
#
# Environment: BLK_MIB (256; 32 on a PVM host), NET_MIB (128; 4 on a PVM host), IMG (/var/tmp/kvmsharp-virtio-bench.raw),
#   TIMEOUT per boot in s (2400), KVMSHARP (default: a private copy of out/kvmsharp),
#   SMALL_REQS (1000) 4 KiB reads in blk4, KEEP_IMG=1 keeps the image afterwards, MAX_SECTORS_KB (512; 0 = leave the guest's default).
#
# MAX_SECTORS_KB: the guest caps its virtio-blk requests at 512 KiB (128 pages). With the default
# (seg_max = queue size − 2 = 254 segments) a 1 MiB O_DIRECT read or write becomes a 254-segment request
# whose indirect table (256 descriptors) plus the indirect descriptor exceeds the 256-descriptor walk
# budget in VirtQueue.ParseChain: "virtio-blk: malformed descriptor chain", the chain is returned
# with no status written, and the guest's dd still reports success (nothing was read or written). The image is filled with 0xff
# before each boot and checked for zeros afterwards, so such a loss fails the run.
#
# Guest throughput is timed on the host: during each phase a poller samples the VMM's
# /proc/PID/io (rchar/wchar: its pread/pwrite on the image and read/write on the TAP) every 50 ms;
# the rate is the middle 98 % of the phase's bytes over the time they took (busybox dd here prints
# no rate, and the guest's process start-up costs seconds on a PVM host).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
B=$HERE/build
RUNS=${1:-${RUNS:-3}}
# On a PVM host the guest moves ~0.5–2 MiB/s over virtio-blk and ~0.1 MiB/s over TCP (its kernel is
# emulated), so the default sizes there are small; elsewhere those of the issue.
if [ -d /sys/module/kvm_pvm ]; then BLK_MIB=${BLK_MIB:-32} NET_MIB=${NET_MIB:-4}; else BLK_MIB=${BLK_MIB:-256} NET_MIB=${NET_MIB:-128}; fi
IMG=${IMG:-/var/tmp/kvmsharp-virtio-bench.raw}
TIMEOUT=${TIMEOUT:-2400}
MAX_SECTORS_KB=${MAX_SECTORS_KB:-512}
SMALL_REQS=${SMALL_REQS:-1000}
NS=kvmsharp-vb$$
TAP=vbtap0
HOST_IP=172.31.214.1
GUEST_IP=172.31.214.2
KERNEL=$ROOT/guest/out/minimal/bzImage
INITRD=$ROOT/guest/out/initrd.cpio
CMDLINE_BASE="console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog cryptomgr.notests sysctl.kernel.hung_task_timeout_secs=0 rcupdate.rcu_cpu_stall_suppress=1"

die() { echo "run.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (netns, TAP, /dev/kvm)"
[ -e /dev/kvm ] || die "no /dev/kvm"
[ -e /dev/net/tun ] || die "no /dev/net/tun"
[ -f "$KERNEL" ] && [ -f "$INITRD" ] || die "no guest: run guest/build.sh"
command -v busybox >/dev/null || die "no host busybox (apt-get install busybox-static)"
case $(stat -f -c %T "$(dirname "$IMG")") in tmpfs|ramfs) die "$IMG is on tmpfs; O_DIRECT needs a disk";; esac
mkdir -p "$B"

# Private copy of the VMM: a rebuild by someone else mid-run must not change the binary under test.
if [ -n "${KVMSHARP:-}" ]; then
    KS=$KVMSHARP; KS_KIND="KVMSHARP=$KVMSHARP"
else
    [ -x "$ROOT/out/kvmsharp" ] || die "no out/kvmsharp: run scripts/build.sh"
    cp "$ROOT/out/kvmsharp" "$B/kvmsharp.new.$$" && mv -f "$B/kvmsharp.new.$$" "$B/kvmsharp"
    KS=$B/kvmsharp
    KS_KIND="out/kvmsharp of $(date -u -r "$ROOT/out/kvmsharp" +%FT%TZ) (copied to bench/virtio/build/)"
fi

conditions() { echo "load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"; }

cleanup() {
    [ -n "${VMPID:-}" ] && kill "$VMPID" 2>/dev/null || true
    [ -n "${POLLPID:-}" ] && kill "$POLLPID" 2>/dev/null || true
    for p in ${LPIDS:-}; do kill -- "-$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    [ "${KEEP_IMG:-0}" = 1 ] || rm -f "$IMG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- guest script (keep it short: the kernel command line holds 2048 bytes) ---
# M: marker, then wait for the host's newline on the console (sent once it has sampled the VMM).
# Q: the max_sectors_kb work-around (see MAX_SECTORS_KB above).
# busybox nc copies through a 1 KiB buffer, one system call per KiB (~10 ms each in the guest on a PVM
# host), so the guest side of the TCP phases is `nc -e dd`: dd reads/writes the socket itself, 1 MiB
# per call.
Q=""; [ "$MAX_SECTORS_KB" != 0 ] && Q="echo $MAX_SECTORS_KB >/sys/block/vda/queue/max_sectors_kb||exit 8"
GUEST_SCRIPT="S(){ read a b c d e f g x</sys/block/vda/stat;read r</sys/class/net/eth0/statistics/rx_packets;read t</sys/class/net/eth0/statistics/tx_packets;echo \"VS \$1 \$a \$c \$e \$g \$r \$t\";}
M(){ echo VB \$1;read x;}
$Q
ifconfig eth0 $GUEST_IP netmask 255.255.255.0 up||exit 9
S idle0;M idle0;read -t 10 x;M idle1;S idle1
S blkw0;M blkw0;dd if=/dev/zero of=/dev/vda bs=1M count=$BLK_MIB oflag=direct||exit 3;M blkw1;S blkw1
S blkr0;M blkr0;dd if=/dev/vda of=/dev/null bs=1M count=$BLK_MIB iflag=direct||exit 4;M blkr1;S blkr1
S blk40;M blk40;dd if=/dev/vda of=/dev/null bs=4k count=$SMALL_REQS iflag=direct||exit 7;M blk41;S blk41
S ntx0;M ntx0;nc $HOST_IP 5001 -e dd if=/dev/zero bs=1M count=$NET_MIB||exit 5;M ntx1;S ntx1
S nrx0;M nrx0;nc $HOST_IP 5002 -e dd of=/dev/null bs=1M||exit 6;M nrx1;S nrx1"
CMDLINE="$CMDLINE_BASE kvmsharp.run=$(printf '%s' "$GUEST_SCRIPT" | base64 -w0) kvmsharp.exit=poweroff"
[ ${#CMDLINE} -lt 1800 ] || die "command line too long (${#CMDLINE} bytes)"

# --- host side ---
# snap OUT: one line per VMM thread: tid comm sched_ns <stat fields from 3 on>; first line "T <epoch s>"
snap() {
    local out=$1 t c s ss
    {
        echo "T $EPOCHREALTIME"
        for t in /proc/"$VMPID"/task/*; do
            read -r c <"$t/comm" || continue
            read -r ss _ <"$t/schedstat" || continue
            read -r s <"$t/stat" || continue
            echo "${t##*/} ${c// /_} $ss ${s##*) }"
        done
    } >"$out" 2>/dev/null
}

# poll_io OUT: "epoch rchar wchar" of the VMM every 50 ms until killed
poll_io() {
    local x r w
    exec 8<>"$R/sleep"
    while { read -r x r; read -r x w; } <"/proc/$VMPID/io" 2>/dev/null; do
        echo "$EPOCHREALTIME $r $w"
        read -r -t 0.05 -u 8 x || true
    done >"$1"
}

# host dd with O_DIRECT; prints "MiB/s CPU-ms-per-MiB" (dd's user+sys from bash's `time`)
# host_dd write|read [buffered]: buffered = without O_DIRECT, 512 KiB blocks (write into the page cache,
# read with the file's cache dropped): the kernel's CPU for the pwrite/pread the VMM makes per request
host_dd() {
    local o c TIMEFORMAT='%3U %3S' d=direct bs=1M n=$BLK_MIB
    [ "${2:-}" = buffered ] && { d=fullblock bs=512K n=$((BLK_MIB * 2)); }
    if [ "$1" = write ]; then
        local of=oflag=direct; [ $d = direct ] || of=conv=notrunc   # buffered: into the page cache, as the VMM
        c=$( { time LC_ALL=C dd if=/dev/zero of="$IMG" bs=$bs count=$n $of conv=notrunc 2>"$B/dd.err"; } 2>&1 )
    else
        sync "$IMG"; dd if="$IMG" iflag=nocache count=0 status=none   # dirty pages are not dropped
        c=$( { time LC_ALL=C dd if="$IMG" of=/dev/null bs=$bs count=$n iflag=$d 2>"$B/dd.err"; } 2>&1 )
    fi
    o=$(tail -n 1 "$B/dd.err")
    # "268435456 bytes (268 MB, 256 MiB) copied, 1.2 s, 217 MB/s"
    awk -v l="$o" -v c="$c" -v m="$BLK_MIB" 'BEGIN{n=split(l, p, ", "); split(c, t, " "); printf "%.1f %.3f", (l+0)/1048576/(p[n-1]+0), (t[1]+t[2])*1000/m}'
}

echo "## virtio benchmark: $(date -u +%FT%TZ)"
echo
echo "- host: $(uname -r), $(nproc) CPUs, $( [ -d /sys/module/kvm_pvm ] && echo kvm_pvm || echo kvm), CLK_TCK $(getconf CLK_TCK)"
echo "- kvmsharp: $KS_KIND; repository commit $(git -C "$ROOT" rev-parse --short HEAD)"
echo "- image: $IMG ($(stat -f -c %T "$(dirname "$IMG")"), $(df --output=source "$(dirname "$IMG")" | tail -n 1)), BLK_MIB=$BLK_MIB, NET_MIB=$NET_MIB, RUNS=$RUNS"
echo "- before: $(conditions)"
echo

# image: fully allocated (no allocation on first write), BLK_MIB + 16 MiB
dd if=/dev/zero of="$IMG" bs=1M count=$((BLK_MIB + 16)) status=none conv=fsync

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
ip netns exec "$NS" ip tuntap add dev "$TAP" mode tap vnet_hdr
ip netns exec "$NS" ip addr add "$HOST_IP/24" dev "$TAP"
ip netns exec "$NS" ip link set "$TAP" up

# host loopback reference for busybox nc itself (inside the namespace, lo)
nc_loopback() {  # prints MiB/s of the guest's ntx commands run on the host, over lo in the namespace
    ip netns exec "$NS" bash -c '(sleep 60 | busybox nc -l -p 5003 >/dev/null) >/dev/null 2>&1 & sleep 0.5; t0=$EPOCHREALTIME
        busybox nc 127.0.0.1 5003 -e dd if=/dev/zero bs=1M count='"$NET_MIB"' 2>/dev/null; t1=$EPOCHREALTIME
        awk -v a=$t0 -v b=$t1 -v m='"$NET_MIB"' "BEGIN{printf \"%.1f\", m/(b-a)}"'
}

fail=0
ROWS=$B/rows.txt; : >"$ROWS"; : >"$B/sync.txt"; : >"$B/hostcpu.txt"
for run in $(seq "$RUNS"); do
    R=$B/run$run; rm -rf "$R"; mkdir -p "$R"
    echo "### run $run"
    echo
    echo "- before: $(conditions)"
    hw=$(host_dd write); hr=$(host_dd read)
    echo "- host dd O_DIRECT: write ${hw% *} MiB/s (${hw#* } ms CPU/MiB), read ${hr% *} MiB/s (${hr#* } ms CPU/MiB)"
    bw=$(host_dd write buffered); br=$(host_dd read buffered)
    echo "- host dd buffered, 512 KiB blocks (the system calls the VMM makes): write ${bw% *} MiB/s (${bw#* } ms CPU/MiB), read ${br% *} MiB/s (${br#* } ms CPU/MiB)"
    # 4 KiB: O_DIRECT (limit for blk4) and buffered from a warm cache (the kernel's CPU per pread the VMM makes)
    h4=$( { TIMEFORMAT='%3U %3S'; time LC_ALL=C dd if="$IMG" of=/dev/null bs=4k count="$SMALL_REQS" iflag=direct 2>"$B/dd.err"; } 2>&1 )
    h4=$(awk -v l="$(tail -n 1 "$B/dd.err")" 'BEGIN{n=split(l, p, ", "); printf "%.1f", (l+0)/1048576/(p[n-1]+0)}')
    dd if="$IMG" of=/dev/null bs=1M count="$BLK_MIB" status=none   # warm
    c4=$( { TIMEFORMAT='%3U %3S'; time dd if="$IMG" of=/dev/null bs=4k count=$((BLK_MIB * 256)) status=none; } 2>&1 )
    c4=$(awk -v c="$c4" -v n=$((BLK_MIB * 256)) 'BEGIN{split(c, t, " "); printf "%.2f", (t[1]+t[2])*1e6/n}')
    echo "- host dd 4 KiB: O_DIRECT read ${h4} MiB/s; buffered from the page cache ${c4} µs CPU per read"
    echo "$run ${hw#* } ${hr#* } ${bw#* } ${br#* } $c4" >>"$B/hostcpu.txt"
    hw=${hw% *}; hr=${hr% *}

    # listeners (inside the namespace): ntx sink, nrx source
    # (setsid: each in its own process group, killed as a group afterwards)
    # (the sink's stdin must never end: busybox nc half-closes on stdin EOF and the guest's nc then quits)
    setsid ip netns exec "$NS" sh -c "sleep 100000 | busybox nc -l -p 5001 | wc -c >$R/ntx.bytes" & LPIDS="$!"
    setsid ip netns exec "$NS" sh -c "dd if=/dev/zero bs=1M count=$NET_MIB status=none | busybox nc -l -p 5002" & LPIDS="$LPIDS $!"

    # image filled with 0xff: after the run the guest's zeros must be there
    (set +o pipefail; tr '\0' '\377' </dev/zero | dd of="$IMG" bs=1M count="$BLK_MIB" iflag=fullblock conv=notrunc,fsync status=none)
    rm -f "$R/sleep"; mkfifo "$R/sleep"
    LOG=$R/console.log; : >"$LOG"
    # the VMM's stdin (the guest's console input) is a FIFO: the host acknowledges each marker with a newline
    rm -f "$R/in"; mkfifo "$R/in"; exec 7<>"$R/in"
    t0=$EPOCHREALTIME
    ip netns exec "$NS" "$KS" run --cpus 1 --memory 256M --kernel "$KERNEL" --initrd "$INITRD" \
        --net "tap=$TAP,mac=52:54:00:31:d6:02" --disk "$IMG,id=bench" --cmdline "$CMDLINE" \
        <"$R/in" >"$LOG" 2>&1 &
    VMPID=$!
    deadline=$((SECONDS + TIMEOUT))
    stop_poll() { [ -n "${POLLPID:-}" ] && { kill "$POLLPID" 2>/dev/null || true; wait "$POLLPID" 2>/dev/null || true; POLLPID=""; }; return 0; }
    rc=""
    while :; do
        if IFS= read -r -t 15 line; then st=0; else st=$?; fi
        if [ $st != 0 ]; then
            [ $st -gt 128 ] || break   # EOF: the VMM is gone (tail --pid)
            if [ $SECONDS -gt $deadline ]; then echo "- TIMEOUT after $TIMEOUT s"; kill "$VMPID" 2>/dev/null || true; fi
            continue
        fi
        line=${line//$'\r'/}
        case $line in
            "VB blkw1"*) snap "$R/snap-blkw1"; stop_poll
                # outside any phase: write back what the guest wrote (into the host page cache) and drop
                # the image's cached pages, so that blkr reads the disk as host dd O_DIRECT does
                ts=$EPOCHREALTIME; sync "$IMG"; echo "$ts $EPOCHREALTIME" >"$R/sync"
                dd if="$IMG" iflag=nocache count=0 status=none; echo >&7 ;;
            "VB "*) set -- $line; snap "$R/snap-$2"
                case $2 in *0) poll_io "$R/io-${2%0}" & POLLPID=$! ;; *1) stop_poll ;; esac
                echo >&7 ;;
            "VS "*) echo "$line" >>"$R/counters" ;;
            *"KVMSHARP-END rc="*) rc=${line##*rc=} ;;
        esac
    done < <(tail -n +1 -F --pid="$VMPID" "$LOG" 2>/dev/null)
    set +e; wait "$VMPID"; vmrc=$?; set -e
    exec 7>&-
    VMPID=""
    t1=$EPOCHREALTIME
    for p in $LPIDS; do kill -- "-$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; LPIDS=""
    echo "- VMM exit status $vmrc, guest script rc=${rc:-none}, $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.0f", b-a}') s wall; after: $(conditions)"
    nl=$(nc_loopback || echo nan)
    echo "- host busybox nc over lo in the namespace (reference): $nl MiB/s"
    if [ "$vmrc" != 0 ] || [ "${rc:-x}" != 0 ]; then
        echo "- **run failed**; last console lines:"; tail -n 15 "$LOG" | sed 's/^/    /'; fail=1; echo; continue
    fi
    ntxb=$(cat "$R/ntx.bytes" 2>/dev/null || echo 0)
    [ "$ntxb" = $((NET_MIB * 1048576)) ] || { echo "- **host received $ntxb bytes, not $((NET_MIB * 1048576))**"; fail=1; }
    if cmp -s -n $((BLK_MIB * 1048576)) "$IMG" /dev/zero; then echo "- image: the guest's $BLK_MIB MiB of zeros are all there"
    else echo "- **image: the guest's writes are not all in the file** ($(cmp -n $((BLK_MIB * 1048576)) "$IMG" /dev/zero 2>&1 | head -1))"; fail=1; fi
    bad=$(grep -c "malformed descriptor chain" "$LOG" || true)
    [ "$bad" = 0 ] || { echo "- **$bad \"malformed descriptor chain\" lines on the console**"; fail=1; }

    # guest rates from the I/O poller: blkw wchar, blkr rchar, ntx wchar (TAP writes), nrx rchar (TAP reads)
    rate() {  # file column(2=rchar,3=wchar) expected_MiB -> "MiB/s bytes"
        awk -v c="$2" -v m="$3" 'NR==1 {v0=$c} {t[NR]=$1; v[NR]=$c} END {
            tot=v[NR]-v0; if (tot < 0.9*m*1048576) { printf "nan %d\n", tot; exit }
            for (i=1;i<=NR;i++) { if (v[i]-v0 <= 0.01*tot) a=i; if (!b && v[i]-v0 >= 0.99*tot) b=i }
            printf "%.2f %d\n", 0.98*tot/1048576/(t[b]-t[a]), tot }' "$1"
    }
    GD=("$(rate "$R/io-blkw" 3 "$BLK_MIB")" "$(rate "$R/io-blkr" 2 "$BLK_MIB")" "$(rate "$R/io-ntx" 3 "$NET_MIB")" "$(rate "$R/io-nrx" 2 "$NET_MIB")"
        "$(rate "$R/io-blk4" 2 "$(awk -v n="$SMALL_REQS" 'BEGIN{print n*4/1024}')")")
    for i in 0 1 2 3 4; do case ${GD[$i]} in nan*) echo "- **phase $i: the VMM moved only ${GD[$i]#* } bytes**"; fail=1 ;; esac; done

    sy=$(awk '{printf "%.2f", $2-$1}' "$R/sync")
    echo "- host \`sync\` of the image after blkw (the guest's writes sat in the host page cache): $sy s;" \
         "blkw including it: $(awk -v m="$BLK_MIB" -v g="${GD[0]% *}" -v s="$sy" 'BEGIN{printf "%.1f", m/(m/g+s)}') MiB/s"
    echo "$run $sy" >>"$B/sync.txt"

    # per phase: idle blkw blkr blk4 ntx nrx
    for ph in idle blkw blkr blk4 ntx nrx; do
        for f in "$R/snap-${ph}0" "$R/snap-${ph}1"; do [ -s "$f" ] || { echo "- **missing $f**"; fail=1; continue 3; }; done
        case $ph in
            idle) g=- lim=- ;; blkw) g=${GD[0]% *} lim=$hw ;; blkr) g=${GD[1]% *} lim=$hr ;; blk4) g=${GD[4]% *} lim=$h4 ;;
            ntx) g=${GD[2]% *} lim=$nl ;; nrx) g=${GD[3]% *} lim=$nl ;;
        esac
        awk -v ph="$ph" -v run="$run" -v g="$g" -v lim="$lim" -v hz="$(getconf CLK_TCK)" \
            -v c0="$(grep "^VS ${ph}0 " "$R/counters")" -v c1="$(grep "^VS ${ph}1 " "$R/counters")" '
            # snapshot lines: tid comm sched_ns state ppid ... ($15 utime, $16 stime, $44 guest_time)
            FNR==1 { f++; t[f]=$2; next }
            { k=$1; if (f==1) { n0[k]=$3; u0[k]=$15; s0[k]=$16; gt0[k]=$44 }
              else { n1[k]=$3; u1[k]=$15; s1[k]=$16; gt1[k]=$44; cm[k]=$2 } }
            END {
                for (k in n1) {
                    v = (cm[k] ~ /^vcpu[0-9]+$/) ? "v" : (cm[k] == "io" ? "i" : "o")
                    ns[v] += n1[k]-n0[k]; us[v] += u1[k]-u0[k]; ss[v] += s1[k]-s0[k]; gs[v] += gt1[k]-gt0[k]
                }
                split(c0, a, " "); split(c1, b, " ")
                # VS name reads sectors_read writes sectors_written rx_packets tx_packets
                rd=b[3]-a[3]; wr=b[5]-a[5]; mib=((b[4]-a[4])+(b[6]-a[6]))*512/1048576; pk=(b[7]-a[7])+(b[8]-a[8])
                if (ph=="blkw") req=wr; else if (ph=="blkr" || ph=="blk4") req=rd; else req=pk
                if (ph=="ntx" || ph=="nrx") mib=0   # filled from NET_MIB by the caller
                dur=t[2]-t[1]; tick=1000/hz
                # run phase dur_s req mib guest_MiBs limit_MiBs | nonvcpu_ms io_ms vcpu_ms | io_user_ms io_sys_ms vcpu_user_ms vcpu_sys_ms vcpu_guest_ms other_user+sys_ms
                printf "%s %s %.2f %d %.2f %s %s %.2f %.2f %.2f %d %d %d %d %d %d\n", run, ph, dur, req, mib, g, lim,
                    (ns["i"]+ns["o"])/1e6, ns["i"]/1e6, ns["v"]/1e6,
                    us["i"]*tick, ss["i"]*tick, us["v"]*tick, ss["v"]*tick, gs["v"]*tick, (us["o"]+ss["o"])*tick
            }' "$R/snap-${ph}0" "$R/snap-${ph}1" | awk -v nm="$NET_MIB" '{ if ($2=="ntx"||$2=="nrx") $5=nm; print }' >>"$ROWS"
    done

    echo
    echo "| phase | s | requests | MiB | guest MiB/s | limit MiB/s | non-vCPU CPU ms (io) | vCPU CPU ms | io user/sys ms | vCPU user/sys/guest ms (ticks) |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    awk -v run="$run" '$1==run {printf "| %s | %.1f | %d | %.1f | %s | %s | %.1f (%.1f) | %.1f | %d/%d | %d/%d/%d |\n", $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15}' "$ROWS"
    echo
done

# --- medians over runs ---
echo "### medians over $RUNS runs"
echo
echo "Requests: blk = requests the guest completed (/sys/block/vda/stat), net = packets tx+rx on the guest's eth0."
echo "CPU from schedstat (ns) except the user/sys split (ticks of $((1000 / $(getconf CLK_TCK))) ms, coarse)."
echo "\"non-vCPU\" = every thread but vcpuN: io, main, console, .NET runtime (timer, thread pool, signal handler)."
echo "\"net of idle\" subtracts the non-vCPU rate of the idle phase × the phase's duration."
echo
echo "| phase | requests | KiB/request | guest MiB/s | limit MiB/s | guest ÷ limit | io thread µs/request | io user/sys µs/request | non-vCPU µs/request | non-vCPU net of idle µs/request | io thread ms/MiB | vCPU thread ms/request |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
awk '
function med(arr, n,   i, j, t) { for (i=2;i<=n;i++) { t=arr[i]; for (j=i-1;j>=1 && arr[j]>t;j--) arr[j+1]=arr[j]; arr[j+1]=t }
    return n ? ((n%2) ? arr[(n+1)/2] : (arr[n/2]+arr[n/2+1])/2) : "nan" }
{ r=$1; p=$2; D[r,p]=$3; Q[r,p]=$4; M[r,p]=$5; G[r,p]=$6; L[r,p]=$7; NV[r,p]=$8; IO[r,p]=$9; V[r,p]=$10; IU[r,p]=$11; IS[r,p]=$12; runs[r]=1 }
END {
    split("blkw blkr blk4 ntx nrx", P, " ")
    for (pi=1; pi<=5; pi++) {
        p=P[pi]; n=0
        for (r in runs) if ((r,p) in D && Q[r,p] > 0) {
            n++; q=Q[r,p]
            idle_rate = ((r,"idle") in D && D[r,"idle"] > 0) ? NV[r,"idle"]/D[r,"idle"] : 0
            a1[n]=q; a2[n]=M[r,p]*1024/q; a3[n]=G[r,p]; a4[n]=L[r,p]; a5[n]=(L[r,p]>0 ? G[r,p]/L[r,p] : 0)
            a6[n]=IO[r,p]*1000/q; a7[n]=IU[r,p]*1000/q; a8[n]=IS[r,p]*1000/q; a9[n]=NV[r,p]*1000/q
            a10[n]=(NV[r,p]-idle_rate*D[r,p])*1000/q; a11[n]=IO[r,p]/M[r,p]; a12[n]=V[r,p]/q
        }
        if (!n) continue
        printf "| %s | %d | %.1f | %.2f | %.1f | %.4f | **%.1f** | %.0f / %.0f | %.1f | %.1f | %.3f | %.0f |\n", p, med(a1,n), med(a2,n), med(a3,n), med(a4,n),
            med(a5,n), med(a6,n), med(a7,n), med(a8,n), med(a9,n), med(a10,n), med(a11,n), med(a12,n)
    }
    n=0; for (r in runs) if ((r,"idle") in D) { n++; b1[n]=NV[r,"idle"]/D[r,"idle"]; b2[n]=V[r,"idle"]/D[r,"idle"]; b3[n]=IO[r,"idle"]/D[r,"idle"] }
    if (n) printf "\nIdle guest (10 s of `read -t 10`), medians: non-vCPU threads %.2f ms CPU per s (io thread %.2f), vCPU thread %.1f ms CPU per s.\n", med(b1,n), med(b3,n), med(b2,n)
}' "$ROWS"
median() { sort -g | awk '{v[NR]=$1} END {if (NR==0) print "nan"; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
echo
echo "Host dd, CPU of dd itself (user+sys), medians: O_DIRECT 1 MiB write $(cut -d' ' -f2 "$B/hostcpu.txt" | median) ms/MiB, read $(cut -d' ' -f3 "$B/hostcpu.txt" | median) ms/MiB;" \
     "buffered 512 KiB (into the page cache / from a cold cache) write $(cut -d' ' -f4 "$B/hostcpu.txt" | median) ms/MiB, read $(cut -d' ' -f5 "$B/hostcpu.txt" | median) ms/MiB;" \
     "4 KiB buffered read from the page cache $(cut -d' ' -f6 "$B/hostcpu.txt" | median) µs per read."
echo "Host \`sync\` of the image after blkw (the guest's writes went to the host page cache): median $(cut -d' ' -f2 "$B/sync.txt" | median) s."
echo
echo "- after: $(conditions)"
echo "- raw: bench/virtio/build/rows.txt (one line per run and phase; columns documented in run.sh), run*/console.log, run*/snap-*"
exit $fail
