#!/usr/bin/env bash
# Build the folder bench/gpu_session.sh runs from, for a GPU machine with python 3.12 + torch and no
# network (here: the device machine; its package list says what it lacks):
#
#   bash bench/gpu_pack.sh DEST        # e.g. /path/to/checkout/.gpu (then ignore it in .git/info/exclude)
#
# DEST/whl      cp312 manylinux wheels of what that machine lacks. ray's wheel (78 MB) is repacked
#               without ray/jars (Java workers, 32 MB) and ray/dashboard/client/build (the web UI;
#               vallex starts Ray without the dashboard), its RECORD rewritten to match; deepspeed is
#               an sdist: built here as a pure wheel (DS_BUILD_OPS=0: no compiled ops).
# DEST/src      vallex/ and bench/ of this checkout
# DEST/prepare  the smoke test's corpus and recognizer (python bench/gpu_smoke.py --prepare-only)
# DEST/gpu_session.sh
# Needs pip with access to the package index, and this checkout's environment (torch, vallex).
set -euo pipefail
DEST=${1:?usage: bench/gpu_pack.sh DEST}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python}
mkdir -p "$DEST/whl" "$DEST/src"
DL=$(mktemp -d)
PLAT="--python-version 3.12 --implementation cp --only-binary=:all: --no-deps --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
# shellcheck disable=SC2086
$PY -m pip download -q $PLAT -d "$DL" ray==2.58.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing_extensions==4.16.0 packaging==26.4 hjson==3.1.0 jsonschema==4.26.0 \
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tensorboardX==2.6.5
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DL" deepspeed==0.19.8
$PY - "$DL" "$DEST/whl" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
drop = ("ray/jars/", "ray/dashboard/client/build/")
for whl in sorted(src.glob("*.whl")):
    if not whl.name.startswith("ray-"):
        shutil.copy(whl, dst / whl.name)
        continue
    with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            if info.filename.startswith(drop):
                continue
            data = zi.read(info)
            if info.filename == "ray-2.58.0.dist-info/RECORD":  # the files left, and only those
                data = "".join(l for l in data.decode().splitlines(True) if not l.startswith(drop)).encode()
            zo.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # keeps each file's mode
print(f"wheels: {sum(p.stat().st_size for p in dst.glob('*.whl')) / 2**20:.1f} MiB")
EOF
rm -rf "$DL" "$DEST/src/vallex" "$DEST/src/bench"
cp -r "$ROOT/vallex" "$ROOT/bench" "$ROOT/job.yaml" "$DEST/src/"
find "$DEST/src" -name __pycache__ -prune -exec rm -rf {} +
cp "$ROOT/bench/gpu_session.sh" "$DEST/"
if [ ! -f "$DEST/prepare/recognizer.pt" ]; then
  PYTHONPATH=$ROOT $PY "$ROOT/bench/gpu_smoke.py" --prepare-only --out "$DEST"
fi
du -sh "$DEST"/*
