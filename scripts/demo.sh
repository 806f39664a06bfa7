#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: install prerequisites, build the test guest and
# kvmsharp, then boot the minimal guest to a shell on this terminal (Ctrl-A x quits; `exit`
# in the guest reboots it, which ends kvmsharp with code 0).
# Without a usable /dev/kvm the guest runs inside the nested KVM host (scripts/kvm-host.sh: QEMU's
# emulated AMD-V), which says so on the first line; KVMSHARP_KVM_HOST=direct|nested forces a choice.
set -euo pipefail
cd "$(dirname "$0")/.."
where=$(scripts/kvm-host.sh --where)
[ "$where" = nested ] && echo "demo: no usable /dev/kvm here: the guest runs in a nested KVM host under QEMU's emulated AMD-V (slower than hardware; about a minute to the shell)"
scripts/setup.sh
targets=(--only initrd --only minimal)
[ "$where" = nested ] && targets+=(--only kvmhost)
guest/build.sh "${targets[@]}"
scripts/build.sh
exec scripts/kvm-host.sh -- out/kvmsharp run \
  --kernel guest/out/minimal/bzImage \
  --initrd guest/out/initrd.cpio \
  --cpus "${CPUS:-2}" --memory "${MEMORY:-512M}" \
  --cmdline "${CMDLINE:-console=ttyS0 reboot=k panic=1 nokaslr i8042.noaux i8042.nomux i8042.dumbkbd i8042.nopnp no_timer_check tsc=reliable random.trust_cpu=on mitigations=off nowatchdog}"
