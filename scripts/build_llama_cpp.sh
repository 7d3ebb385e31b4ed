#!/usr/bin/env bash
# Build llama-cpp-python with the `slicegpt` architecture and install it into the current Python.
#
#   scripts/build_llama_cpp.sh            # uses `python` on PATH (the project's venv when active)
#   PYTHON=.venv/bin/python scripts/build_llama_cpp.sh
#
# Fetches the llama-cpp-python sdist from PyPI, adds integrations/llama.cpp (one new model file and
# a small registration patch) to its vendored llama.cpp, and builds a wheel versioned
# `<version>+slicegpt.<hash of the integration>`. Idempotent: an installed build of the same
# integration is kept, and built wheels are cached in $SLICEGPT_CACHE (default
# ~/.cache/slicegpt-export), so a rebuild happens only when the integration changes (about 3 minutes
# on 2 cores). Fails loudly when the patch no longer applies.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
INTEGRATION=$ROOT/integrations/llama.cpp
PY=${PYTHON:-python}
CACHE=${SLICEGPT_CACHE:-$HOME/.cache/slicegpt-export}/llama-cpp-python

die() { echo "build_llama_cpp: error: $*" >&2; exit 1; }

STAMP=$(cat "$INTEGRATION/register-slicegpt.patch" "$INTEGRATION/src/models/slicegpt.cpp" | sha256sum | cut -c1-12)
VERSION="$LLAMA_CPP_PYTHON_VERSION+slicegpt.$STAMP"

installed=$("$PY" -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ]; then
    echo "build_llama_cpp: llama-cpp-python $VERSION is already installed"
    exit 0
fi

mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "build_llama_cpp: fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" \
        || die "could not download llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from the package index"
    tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz -C "$work"
    src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
    vendor=$src/vendor/llama.cpp

    echo "build_llama_cpp: adding the slicegpt architecture"
    [ ! -e "$vendor/src/models/slicegpt.cpp" ] || die "llama.cpp in this sdist already has src/models/slicegpt.cpp"
    patch --directory "$vendor" --strip 1 --forward --batch --dry-run --quiet < "$INTEGRATION/register-slicegpt.patch" >/dev/null \
        || die "integrations/llama.cpp/register-slicegpt.patch no longer applies to llama-cpp-python $LLAMA_CPP_PYTHON_VERSION"
    patch --directory "$vendor" --strip 1 --forward --batch --quiet < "$INTEGRATION/register-slicegpt.patch"
    cp "$INTEGRATION/src/models/slicegpt.cpp" "$vendor/src/models/slicegpt.cpp"
    sed -i "s/^__version__ = \"$LLAMA_CPP_PYTHON_VERSION\"$/__version__ = \"$VERSION\"/" "$src/llama_cpp/__init__.py"
    grep -q "__version__ = \"$VERSION\"" "$src/llama_cpp/__init__.py" || die "could not stamp the version into llama_cpp/__init__.py"

    echo "build_llama_cpp: building the wheel (about 3 minutes on 2 cores)"
    # the multimodal library is not needed; the library is built for this machine's CPU
    CMAKE_ARGS="${CMAKE_ARGS:-} -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$src" || die "building llama-cpp-python failed"
    built=$(ls "$work"/wheel/llama_cpp_python-*.whl) || die "the build produced no wheel"
    mv "$built" "$CACHE/"
    wheel=$CACHE/$(basename "$built")
fi

echo "build_llama_cpp: installing $(basename "$wheel")"
"$PY" -m pip install --quiet --force-reinstall --no-deps "$wheel"
"$PY" -m pip install --quiet "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$PY" -c "import llama_cpp; print('build_llama_cpp: llama_cpp', llama_cpp.__version__)"
