#!/usr/bin/env bash
# Compiles the eBPF programs in bpf/*.bpf.c into obj/*.bpf.o, the objects the crate embeds.
#
#   ebpf/build.sh           rebuild every object
#   ebpf/build.sh --check   compile into a temp dir and fail if any object differs from obj/
#
# The objects are kept in the repository so that building the workspace needs no clang. The
# output is reproducible (no paths: DWARF is stripped, BTF keeps relative file names), so CI can
# run --check to prove that obj/ is what the sources compile to with Debian 12's clang 14.
set -euo pipefail
cd "$(dirname "$0")/bpf"
check=0
[[ "${1:-}" == "--check" ]] && check=1
out=../obj
if ((check)); then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
for tool in clang llvm-strip; do
  command -v "$tool" >/dev/null || { echo "ebpf/build.sh: $tool not found (apt-get install clang llvm libbpf-dev)" >&2; exit 1; }
done
multiarch=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
status=0
for src in *.bpf.c; do
  obj="$out/${src%.c}.o"
  clang -O2 -g -target bpf -Wall -Wextra -Werror -fdebug-prefix-map="$PWD"=. \
    -I"/usr/include/$multiarch" -c "$src" -o "$obj"
  llvm-strip -g "$obj"
  if ((check)); then
    if ! cmp -s "$obj" "../obj/${src%.c}.o"; then
      echo "ebpf/obj/${src%.c}.o does not match a fresh compile of ebpf/bpf/$src (run ebpf/build.sh)" >&2
      status=1
    fi
  fi
done
((check)) && ((status == 0)) && echo "ebpf/obj matches ebpf/bpf ($(clang --version | head -1))"
exit $status
