#!/usr/bin/env bash
# Rebuilds every sample guest in examples/ from source.
#
# The built .wasm files are committed, so nobody needs this toolchain just to
# run spare; run this only after changing a guest's source.
#
# Needs (Debian package names): clang, lld, wasi-libc, libclang-rt-14-dev-wasm32
# (the compiler-rt builtins for wasm32, matching the clang version), wabt, and a
# Rust toolchain with cargo for the component. It installs nothing itself.
#
# Outputs:
#   examples/{primes,echo,hello,cpubound}.wasm      WASI preview-1 command modules
#   examples/hostile/*.wasm                         misbehaving guests for tests
#   examples/hello_component.wasm                   WASI preview-2 command component
#   examples/target/cpubound                        native build of cpubound.c (git-ignored)
#
# Environment:
#   NATIVE_DIR          where the native cpubound goes (default: examples/target)
#   COMPONENTIZE_TARGET cargo target dir for the componentize tool
#                       (default: /tmp/componentize-target, outside the repo)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
native_dir="${NATIVE_DIR:-$here/target}"
componentize_target="${COMPONENTIZE_TARGET:-/tmp/componentize-target}"

die() {
    echo "build.sh: $*" >&2
    exit 1
}

# --- toolchain checks -------------------------------------------------------

command -v clang >/dev/null || die "clang not found: install the Debian package 'clang'"
command -v wasm-ld >/dev/null || die "wasm-ld not found: install the Debian package 'lld'"
[[ -f /usr/include/wasm32-wasi/stdio.h && -f /usr/lib/wasm32-wasi/libc.a ]] ||
    die "the WASI sysroot is missing (/usr/include/wasm32-wasi, /usr/lib/wasm32-wasi): install the Debian package 'wasi-libc'"
builtins="$(clang --target=wasm32-wasi -print-libgcc-file-name)"
if [[ ! -f "$builtins" ]]; then
    clang_major="$(clang -dumpversion | cut -d. -f1)"
    die "$builtins is missing: install the Debian package 'libclang-rt-${clang_major}-dev-wasm32'"
fi
command -v wat2wasm >/dev/null || die "wat2wasm not found: install the Debian package 'wabt'"
command -v wasm-validate >/dev/null || die "wasm-validate not found: install the Debian package 'wabt'"
command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) to build hello_component.wasm"

# --- builds -----------------------------------------------------------------

# -O2 for speed, -s (strip) so the committed files carry no debug info or names.
wasm_cc=(clang --target=wasm32-wasi --sysroot=/usr -O2 -s -Wall -Wextra -Werror)

build_wasm() { # build_wasm OUT.wasm SRC.c [extra clang flags...]
    local out="$1" src="$2"
    shift 2
    "${wasm_cc[@]}" "$@" -o "$out" "$src"
    wasm-validate "$out"
    echo "built $(realpath --relative-to="$repo" "$out") ($(stat -c %s "$out") bytes)"
}

cd "$here"

build_wasm primes.wasm primes.c
build_wasm echo.wasm echo.c
# hello has its own _start and no C start-up code, to stay tiny.
build_wasm hello.wasm hello.c -nostartfiles
build_wasm cpubound.wasm cpubound.c

for guest in loop alloc recurse flood passwd crash entropy; do
    build_wasm "hostile/$guest.wasm" "hostile/$guest.c"
done
wat2wasm hostile/import.wat -o hostile/import.wasm
wasm-validate hostile/import.wasm
echo "built examples/hostile/import.wasm ($(stat -c %s hostile/import.wasm) bytes)"
printf 'this is not a wasm module\n' >hostile/notwasm.wasm
echo "wrote examples/hostile/notwasm.wasm (deliberately not WebAssembly)"

# The native twin of cpubound.wasm, for wasm-vs-native comparisons.
mkdir -p "$native_dir"
clang -O2 -Wall -Wextra -Werror -o "$native_dir/cpubound" cpubound.c
echo "built $native_dir/cpubound (native)"

# The preview-2 component: hello.wasm wrapped with the preview-1 command adapter.
CARGO_TARGET_DIR="$componentize_target" cargo build --quiet --release --locked \
    --manifest-path "$here/componentize/Cargo.toml"
"$componentize_target/release/componentize" hello.wasm hello_component.wasm
echo "built examples/hello_component.wasm ($(stat -c %s hello_component.wasm) bytes)"
