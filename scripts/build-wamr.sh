#!/usr/bin/env bash
# Pre-builds the WebAssembly runtime (WAMR) that the offline `quickjs` engine links, from the
# sources vendored in the v8x crate, without network access. Idempotent: does nothing when
# target/wamr/libvmlib.a is already built from the same v8x version.
#
# Needs: cmake and libsimde-dev (Debian). The v8x crate is located with `cargo metadata`.
set -euo pipefail
cd "$(dirname "$0")/.."

out="$PWD/target/wamr"
manifest=$(cargo metadata --format-version 1 --features quickjs --no-default-features 2>/dev/null |
  python3 -c 'import json,sys
d=json.load(sys.stdin)
print(next(p["manifest_path"] for p in d["packages"] if p["name"]=="v8x"))')
v8x_dir=$(dirname "$manifest")
stamp="$out/.built-from"

if [ -f "$out/libvmlib.a" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$v8x_dir" ]; then
  exit 0
fi
for tool in cmake make cc; do
  command -v "$tool" >/dev/null || { echo "build-wamr: '$tool' is missing (apt-get install cmake build-essential libsimde-dev)" >&2; exit 1; }
done
[ -f /usr/include/simde/simde-common.h ] || { echo "build-wamr: libsimde-dev is missing (apt-get install libsimde-dev)" >&2; exit 1; }

echo "build-wamr: building WAMR from $v8x_dir/vendor/wamr/v82jsc into $out" >&2
rm -rf "$out" && mkdir -p "$out"
# The flags mirror the ones v8x's build.rs passes; the two FETCHCONTENT ones keep CMake offline
# by pointing SIMDe at the Debian headers.
(cd "$out" && cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  -DWAMR_DISABLE_HW_BOUND_CHECK=1 -DWAMR_DISABLE_STACK_HW_BOUND_CHECK=1 \
  -DWAMR_BUILD_TARGET="$(uname -m | sed 's/x86_64/X86_64/; s/aarch64/AARCH64/')" \
  -DFETCHCONTENT_SOURCE_DIR_SIMDE=/usr/include -DFETCHCONTENT_FULLY_DISCONNECTED=ON \
  "$v8x_dir/vendor/wamr/v82jsc" >cmake-configure.log &&
  cmake --build . --config Release -j "$(nproc)" >cmake-build.log) ||
  { echo "build-wamr: cmake failed; see $out/cmake-*.log" >&2; exit 1; }
echo "$v8x_dir" >"$stamp"
