#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers of hostile input (fuzz/README.md): afl-fuzz (Debian afl++)
# drives SharpFuzz-instrumented copies of KvmSharp.Images/KvmSharp.Boot (a child process per target
# that runs input after input; a fatal error in it is recorded as a crash).
#   scripts/fuzz.sh TARGET SECONDS      run one target (qcow2, kernel, xz, payload); on a crash or
#                                       hang prints the input paths and exits 1
#   scripts/fuzz.sh --ci [SECONDS]      every target for SECONDS (default 60), one line each, last
#                                       line "N passed, N failed" (N counts targets)
#   scripts/fuzz.sh --replay TARGET FILE...   run files through the plain (uninstrumented) build
# Seeds: fuzz/corpus/TARGET plus fuzz/regressions/TARGET. Findings: out/fuzz/findings/TARGET.
# Installs what it needs (pinned), idempotent. Runs under nice: the machine is shared.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

AFL_PKG_VERSION=4.04c-4          # Debian 12 afl++
SHARPFUZZ_VERSION=2.3.0          # NuGet SharpFuzz.CommandLine, same as the SharpFuzz package
TARGETS=(qcow2 kernel xz payload)
OUT=$ROOT/out/fuzz
PLAIN=$OUT/plain
INSTR=                           # set by build()

die() { echo "fuzz: $*" >&2; exit 2; }

setup() {
  if ! command -v afl-fuzz >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "afl++ is missing; run as root or install afl++=$AFL_PKG_VERSION"
    echo "fuzz: installing afl++ $AFL_PKG_VERSION" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The pinned version, else what the archive has now (a point release replaces the old one).
    apt-get install -y -qq "afl++=$AFL_PKG_VERSION" >/dev/null 2>&1 || apt-get install -y -qq afl++ >/dev/null \
      || die "cannot install afl++"
  fi
  local tools=$OUT/tools
  if ! [ -x "$tools/sharpfuzz" ] || ! [ -d "$tools/.store/sharpfuzz.commandline/$SHARPFUZZ_VERSION" ]; then
    rm -rf "$tools"
    dotnet tool install SharpFuzz.CommandLine --version "$SHARPFUZZ_VERSION" --tool-path "$tools" >/dev/null \
      || die "cannot install SharpFuzz.CommandLine $SHARPFUZZ_VERSION"
  fi
}

build() {
  nice dotnet build fuzz/KvmSharp.Fuzz/KvmSharp.Fuzz.csproj -c Release -o "$PLAIN" -nologo -v quiet >"$OUT/build.log" 2>&1 \
    || { cat "$OUT/build.log" >&2; die "build failed"; }
  # Instrument a copy per build (out/fuzz/instrumented/<hash of the dlls>): runs of other targets
  # started from an older build keep theirs, and an unchanged build is not instrumented again.
  # The plain build stays for --replay (instrumented code needs afl's shared memory).
  local stamp; stamp=$(cat "$PLAIN"/*.dll | md5sum | cut -c1-16)
  INSTR=$OUT/instrumented/$stamp
  [ -f "$INSTR/.done" ] && return 0
  find "$OUT/instrumented" -mindepth 1 -maxdepth 1 -mtime +1 -exec rm -rf {} + 2>/dev/null
  mkdir -p "$OUT/instrumented" && rm -rf "$INSTR.new" && cp -r "$PLAIN" "$INSTR.new" || die "cannot copy the build"
  local s=$OUT/tools/sharpfuzz
  { "$s" "$INSTR.new/KvmSharp.Images.dll" && "$s" "$INSTR.new/KvmSharp.Boot.dll" && "$s" "$INSTR.new/kvmsharp.dll" KvmSharp.Cli.Img \
      && "$s" "$INSTR.new/SharpCompress.dll" SharpCompress.Compressors.LZMA; } >"$OUT/instrument.log" 2>&1 \
    || { cat "$OUT/instrument.log" >&2; die "instrumentation failed"; }
  touch "$INSTR.new/.done"
  rm -rf "$INSTR" && mv "$INSTR.new" "$INSTR"
}

# Per target: heap cap (an allocation past it is an OutOfMemoryException, i.e. a crash) and per-input
# timeout in ms (past it afl records a hang). The boot targets may legitimately decompress up to
# PayloadDecompressor.MaxOutput (512 MiB); images get the 256 MiB the issue allows plus the runtime.
heap_limit() { case $1 in qcow2|xz) echo 0x20000000 ;; *) echo 0x80000000 ;; esac; }
timeout_ms() { echo 10000; }

# run TARGET SECONDS -> prints one summary line; returns 0 when no crash or hang was found.
run() {
  local t=$1 secs=$2 findings=$OUT/findings/$1 seeds=$OUT/seeds/$1
  rm -rf "$findings" "$seeds" && mkdir -p "$findings" "$seeds"
  cp fuzz/corpus/"$t"/* "$seeds"/
  [ -d fuzz/regressions/"$t" ] && cp fuzz/regressions/"$t"/* "$seeds"/ 2>/dev/null
  AFL_SKIP_BIN_CHECK=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
  AFL_NO_UI=1 AFL_DEBUG_CHILD=1 AFL_FORKSRV_INIT_TMOUT=60000 DOTNET_GCHeapHardLimit=$(heap_limit "$t") \
    nice afl-fuzz -i "$seeds" -o "$findings" -V "$secs" -t "$(timeout_ms "$t")" -m none \
      -- dotnet "$INSTR/KvmSharp.Fuzz.dll" "$t" >"$findings/afl.log" 2>&1
  local rc=$? stats=$findings/default/fuzzer_stats
  if [ ! -f "$stats" ] || [ "$rc" != 0 ]; then
    # An abort mid-run ("Unable to communicate with fork server") means the target process died
    # in a way the fork server did not survive; the input afl was running is .cur_input.
    echo "fuzz $t: failed: afl-fuzz exited with $rc; see $findings/afl.log"
    grep -a -m1 "PROGRAM ABORT" -A1 "$findings/afl.log" | sed 's/\x1b\[[0-9;]*m//g; s/^/  /'
    [ -f "$findings/default/.cur_input" ] && echo "  last input: $findings/default/.cur_input"
    return 1
  fi
  local stat; stat() { sed -n "s/^$1 *: *//p" "$stats"; }
  local bad=() f start
  for f in "$findings"/default/crashes/id:*; do
    [ -e "$f" ] && bad+=("$f")
  done
  # A hang is confirmed by one replay of the plain build: on a loaded machine (2 cores shared)
  # afl also records inputs that were only starved of CPU.
  for f in "$findings"/default/hangs/id:*; do
    [ -e "$f" ] || continue
    start=$SECONDS
    if [ "$( (timeout "$(( $(timeout_ms "$t") / 1000 ))" dotnet "$PLAIN/KvmSharp.Fuzz.dll" "$t" "$f" >/dev/null 2>&1; echo $?) 2>/dev/null)" = 0 ]; then
      echo "fuzz $t: note: $f timed out under afl but replays in $((SECONDS - start)) s" >&2
    else
      bad+=("$f")
    fi
  done
  local line="$(stat run_time) s, $(stat execs_done) execs, $(stat corpus_count) corpus, coverage $(stat bitmap_cvg)"
  if [ ${#bad[@]} -gt 0 ]; then
    echo "fuzz $t: failed: ${#bad[@]} crash/hang inputs ($line)"
    for f in "${bad[@]:0:10}"; do
      echo "  $f"
      case $f in
        */crashes/*)
          # The replay dies (SIGABRT on an unhandled exception); keep bash's job message out.
          ( timeout 60 dotnet "$PLAIN/KvmSharp.Fuzz.dll" "$t" "$f" >"$findings/replay.txt" 2>&1; : ) 2>/dev/null
          grep -a -m1 -E "Exception|rror" "$findings/replay.txt" | sed "s|^.*: Unhandled|Unhandled|; s/^/    /" ;;
        *) echo "    (hang: no result within $(timeout_ms "$t") ms)" ;;
      esac
    done
    [ ${#bad[@]} -gt 10 ] && echo "  … and $((${#bad[@]} - 10)) more in $findings/default"
    return 1
  fi
  echo "fuzz $t: passed ($line)"
}

valid_target() { local t; for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

mkdir -p "$OUT"
case "${1:-}" in
  --ci)
    secs=${2:-60}
    setup; build
    passed=0 failed=0
    for t in "${TARGETS[@]}"; do
      if run "$t" "$secs"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    done
    echo "$passed passed, $failed failed"
    [ "$failed" = 0 ]
    ;;
  --replay)
    [ $# -ge 3 ] && valid_target "$2" || die "usage: scripts/fuzz.sh --replay TARGET FILE..."
    setup; build
    dotnet "$PLAIN/KvmSharp.Fuzz.dll" "${@:2}"
    ;;
  *)
    [ $# = 2 ] && valid_target "$1" && [[ $2 =~ ^[0-9]+$ ]] \
      || die "usage: scripts/fuzz.sh TARGET SECONDS | --ci [SECONDS] | --replay TARGET FILE...  (targets: ${TARGETS[*]})"
    setup; build
    run "$1" "$2"
    ;;
esac
