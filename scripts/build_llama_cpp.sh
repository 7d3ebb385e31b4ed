#!/usr/bin/env bash
# Build llama.cpp with the `slicegpt` architecture: llama-cpp-python (installed into the current Python) and
# llama.cpp's own programs (into build/llama.cpp/bin).
#
#   scripts/build_llama_cpp.sh            # uses `python` on PATH (the project's venv when active)
#   PYTHON=.venv/bin/python scripts/build_llama_cpp.sh
#
# Fetches the llama-cpp-python sdist from PyPI, adds integrations/llama.cpp (one new model file and
# a small registration patch) to its vendored llama.cpp, and builds from that one patched tree:
#
# * a wheel versioned `<version>+slicegpt.<hash of the integration>`, installed into $PYTHON;
# * llama-server, llama-cli, llama-completion (single-prompt generation: this llama.cpp's llama-cli is
#   conversation-first), llama-bench and llama-perplexity, statically linked, CPU backend, Release, into
#   build/llama.cpp/bin (git-ignored) with a `slicegpt-version` file naming the same version.
#
# Idempotent: an installed build of the same integration is kept (a second run only checks it), and both
# are cached in $SLICEGPT_CACHE (default ~/.cache/slicegpt-export), so a rebuild happens only when the
# integration changes. From a clean cache on the 2-core machine: the wheel about 3 minutes, the programs
# 21 more (measured while other work shared the machine: 11 CPU-minutes, so about 6 on two idle cores).
# Fails loudly when the patch no longer applies.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
TOOLS=(llama-server llama-cli llama-completion llama-bench llama-perplexity)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INTEGRATION=$ROOT/integrations/llama.cpp
PY=${PYTHON:-python}
CACHE_ROOT=${SLICEGPT_CACHE:-$HOME/.cache/slicegpt-export}
CACHE=$CACHE_ROOT/llama-cpp-python
BIN=$ROOT/build/llama.cpp/bin
JOBS=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

die() { echo "build_llama_cpp: error: $*" >&2; exit 1; }
say() { echo "build_llama_cpp: $*"; }

STAMP=$(cat "$INTEGRATION/register-slicegpt.patch" "$INTEGRATION/src/models/slicegpt.cpp" | sha256sum | cut -c1-12)
VERSION="$LLAMA_CPP_PYTHON_VERSION+slicegpt.$STAMP"
TOOLS_CACHE=$CACHE_ROOT/llama.cpp-tools/$VERSION

work=""
cleanup() { if [ -n "$work" ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

# The sdist unpacked once into $work with the integration added; sets $src and $vendor.
src=""
prepare_source() {
    [ -z "$src" ] || return 0
    work=$(mktemp -d)
    say "fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" \
        || die "could not download llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from the package index"
    tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz -C "$work"
    src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
    vendor=$src/vendor/llama.cpp

    say "adding the slicegpt architecture"
    [ ! -e "$vendor/src/models/slicegpt.cpp" ] || die "llama.cpp in this sdist already has src/models/slicegpt.cpp"
    # no fuzz: a hunk whose context lines changed upstream fails here instead of landing near its old place
    patch --directory "$vendor" --strip 1 --forward --batch --fuzz 0 --dry-run --quiet < "$INTEGRATION/register-slicegpt.patch" >/dev/null \
        || die "integrations/llama.cpp/register-slicegpt.patch no longer applies to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION"
    patch --directory "$vendor" --strip 1 --forward --batch --fuzz 0 --quiet < "$INTEGRATION/register-slicegpt.patch"
    cp "$INTEGRATION/src/models/slicegpt.cpp" "$vendor/src/models/slicegpt.cpp"
    sed -i "s/^__version__ = \"$LLAMA_CPP_PYTHON_VERSION\"$/__version__ = \"$VERSION\"/" "$src/llama_cpp/__init__.py"
    grep -q "__version__ = \"$VERSION\"" "$src/llama_cpp/__init__.py" || die "could not stamp the version into llama_cpp/__init__.py"
}

build_wheel() {
    prepare_source
    say "building the wheel (about 3 minutes on 2 cores)"
    # the multimodal library is not needed; the library is built for this machine's CPU
    CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$src" || die "building llama-cpp-python failed"
    built=$(ls "$work"/wheel/llama_cpp_python-*.whl) || die "the build produced no wheel"
    mv "$built" "$CACHE/"
}

build_tools() {
    prepare_source
    say "building ${TOOLS[*]} (6 to 21 minutes on 2 cores)"
    local started=$SECONDS
    # static (the programs are copied out of the build tree); no web UI (its assets would be downloaded), no
    # HTTPS (only for fetching models); the CPU backend built for this machine's CPU, as the wheel is
    cmake -S "$vendor" -B "$work/tools" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF \
        >"$work/cmake-configure.log" 2>&1 || { tail -n 30 "$work/cmake-configure.log" >&2; die "configuring llama.cpp failed"; }
    cmake --build "$work/tools" --config Release --parallel "$JOBS" --target "${TOOLS[@]}" \
        >"$work/cmake-build.log" 2>&1 || { tail -n 30 "$work/cmake-build.log" >&2; die "building the llama.cpp programs failed"; }
    local staged=$TOOLS_CACHE.tmp.$$
    rm -rf "$staged"
    mkdir -p "$staged"
    for tool in "${TOOLS[@]}"; do
        cp "$work/tools/bin/$tool" "$staged/" || die "the build produced no $tool"
    done
    echo "$VERSION" >"$staged/slicegpt-version"
    rm -rf "$TOOLS_CACHE"
    mv "$staged" "$TOOLS_CACHE"
    say "built the programs in $((SECONDS - started)) s"
}

tools_in() {  # whether folder $1 holds every program of this version
    [ "$(cat "$1/slicegpt-version" 2>/dev/null)" = "$VERSION" ] || return 1
    for tool in "${TOOLS[@]}"; do [ -x "$1/$tool" ] || return 1; done
}

check_tools() {
    for tool in llama-server llama-completion; do
        "$BIN/$tool" --version >/dev/null 2>&1 || die "$BIN/$tool does not run"
    done
    say "llama.cpp programs $VERSION in $BIN: ${TOOLS[*]}"
}

mkdir -p "$CACHE"

# the bindings
installed=$("$PY" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ]; then
    say "llama-cpp-python $VERSION is already installed"
else
    wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        build_wheel
        wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
    fi
    say "installing $(basename "$wheel")"
    "$PY" -m pip install --quiet --force-reinstall --no-deps "$wheel"
    "$PY" -m pip install --quiet "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
    "$PY" -c "import llama_cpp; print('build_llama_cpp: llama_cpp', llama_cpp.__version__)"
fi

# the programs
if tools_in "$BIN"; then
    check_tools
    exit 0
fi
tools_in "$TOOLS_CACHE" || build_tools
say "installing the programs into $BIN"
rm -rf "$BIN.tmp"
mkdir -p "$(dirname "$BIN")"
cp -R "$TOOLS_CACHE" "$BIN.tmp"
rm -rf "$BIN"
mv "$BIN.tmp" "$BIN"
check_tools
