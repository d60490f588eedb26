#!/usr/bin/env bash
# Download the wheels that tests/gpu/wheels.txt pins (CPython 3.12, manylinux x86_64), check each
# against its sha256, and optionally pack them into a bundle cut into pieces for a host with no
# network (smoke.sh stage / install join and check them there).
#
#   fetch_wheels.sh DIR                       download into DIR and check
#   fetch_wheels.sh DIR --bundle OUT [SIZE]   also write OUT/wheels.tar.part-* (SIZE each, default
#                                             54M: a piece plus the checkout fit one 64 MiB transfer)
#                                             and OUT/wheels.tar.sha256
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${1:?usage: fetch_wheels.sh DIR [--bundle OUT [SIZE]]}
mkdir -p "$DIR"

specs=$(awk '!/^#/ && NF>=3 {print $1}' "$HERE/wheels.txt")
# shellcheck disable=SC2086
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64 \
    -d "$DIR" $specs
(cd "$DIR" && awk '!/^#/ && NF>=3 {print $3"  "$2}' "$HERE/wheels.txt" | sha256sum -c --quiet)
echo "checked $(awk '!/^#/ && NF>=3' "$HERE/wheels.txt" | wc -l) wheels in $DIR"

if [ "${2:-}" = "--bundle" ]; then
    OUT=${3:?--bundle needs a directory}
    SIZE=${4:-54M}
    mkdir -p "$OUT"
    rm -f "$OUT"/wheels.tar "$OUT"/wheels.tar.part-* "$OUT"/wheels.tar.sha256
    files=$(awk '!/^#/ && NF>=3 {print $2}' "$HERE/wheels.txt" | sort)
    # Reproducible: the same wheels always make the same bundle, and so the same sha256.
    # shellcheck disable=SC2086
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --mode=a+r,u+w -cf "$OUT/wheels.tar" -C "$DIR" $files
    (cd "$OUT" && sha256sum wheels.tar >wheels.tar.sha256)
    split -b "$SIZE" -a 2 "$OUT/wheels.tar" "$OUT/wheels.tar.part-"
    rm "$OUT/wheels.tar"
    ls -l "$OUT"/wheels.tar.part-*
    cat "$OUT/wheels.tar.sha256"
fi
