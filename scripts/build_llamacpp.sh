#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-imatrix) from the llama.cpp
# tree vendored in the llama-cpp-python sdist that quantkit's tests pin, into build/llama.cpp/ (gitignored).
# The binaries serve this machine's benchmarks and tests (make test builds llama-quantize, which must read
# quantkit's imatrix files, and llama-perplexity, which writes and reads saved references), so they are
# compiled for this CPU (GGML_NATIVE on).
#
#     scripts/build_llamacpp.sh            # -> build/llama.cpp/bin/llama-quantize ...
#     JOBS=2 PIP=.venv/bin/pip SDIST=path/to/llama_cpp_python-0.3.36.tar.gz scripts/build_llamacpp.sh
#     LLAMA_TARGETS=llama-quantize scripts/build_llamacpp.sh   # one tool only
# Without SDIST the sdist is fetched with pip (from PyPI or the configured index), once.
set -euo pipefail

VERSION=0.3.36
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/build/llama.cpp
PIP=${PIP:-$ROOT/.venv/bin/pip}
JOBS=${JOBS:-$(nproc)}
read -r -a TARGETS <<< "${LLAMA_TARGETS:-llama-quantize llama-perplexity llama-imatrix}"

mkdir -p "$DEST"
if [ ! -d "$DEST/src/vendor/llama.cpp" ]; then
    sdist=${SDIST:-$DEST/llama_cpp_python-$VERSION.tar.gz}
    if [ ! -f "$sdist" ]; then
        "$PIP" download "llama-cpp-python==$VERSION" --no-deps --no-binary llama-cpp-python -d "$DEST"
    fi
    rm -rf "$DEST/src.partial"
    mkdir -p "$DEST/src.partial"
    tar -xzf "$sdist" -C "$DEST/src.partial" --strip-components=1
    mv "$DEST/src.partial" "$DEST/src"
fi

cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF
nice cmake --build "$DEST/cmake" --target "${TARGETS[@]}" -j "$JOBS"
mkdir -p "$DEST/bin"
for t in "${TARGETS[@]}"; do  # static binaries: they run from anywhere
    cp "$DEST/cmake/bin/$t" "$DEST/bin/$t"
    test -x "$DEST/bin/$t"
done
echo "built: ${TARGETS[*]} in $DEST/bin"
