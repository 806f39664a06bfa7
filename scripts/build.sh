#!/usr/bin/env bash
# Builds the NativeAOT binary out/kvmsharp. Needs the .NET SDK pinned in global.json and clang/gcc
# with zlib (NativeAOT links natively); installs the native prerequisites when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v clang >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq clang zlib1g-dev >/dev/null
fi
if [ ! -e /usr/include/zlib.h ] && [ "$(id -u)" = 0 ]; then
  apt-get install -y -qq zlib1g-dev >/dev/null
fi

dotnet publish src/KvmSharp.Cli/KvmSharp.Cli.csproj -c Release -r linux-x64 -o out/publish -nologo -v quiet "$@"
mkdir -p out
# Replace atomically: a running kvmsharp keeps its old inode ("Text file busy" otherwise).
cp out/publish/kvmsharp out/kvmsharp.new && mv -f out/kvmsharp.new out/kvmsharp
echo "built $(pwd)/out/kvmsharp ($(du -h out/kvmsharp | cut -f1))"
