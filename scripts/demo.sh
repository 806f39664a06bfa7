#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install prerequisites, build the test guest and
# kvmsharp, then boot the minimal guest to a shell on this terminal (Ctrl-A x quits; `exit`
# in the guest reboots it, which ends kvmsharp with code 0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
guest/build.sh --only initrd --only minimal
scripts/build.sh
exec out/kvmsharp run \
  --kernel guest/out/minimal/bzImage \
  --initrd guest/out/initrd.cpio \
  --cpus "${CPUS:-2}" --memory "${MEMORY:-512M}" \
  --cmdline "${CMDLINE:-console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog}"
