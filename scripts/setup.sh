#!/usr/bin/env bash
# Installs what KvmSharp's build, demo and tests need on Debian 12 (run as root; idempotent).
set -euo pipefail
PKGS=(gcc clang zlib1g-dev libc6-dev linux-libc-dev qemu-utils e2fsprogs busybox-static cpio iproute2 acpica-tools
      qemu-system-x86)   # the nested KVM host (scripts/kvm-host.sh) and the reference VMM
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! command -v dotnet >/dev/null 2>&1; then
  echo "setup: the .NET 10 SDK is required (see global.json)" >&2
  exit 1
fi
