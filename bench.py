"""Benchmarks for appo.py: what one update costs in memory.

    python bench.py memory [logit_chunk]   # peak RSS of one PPO update, 152k vocab, T = 1,024 (CPU)
    python bench.py stops                  # stop-string detection cost per 4,096-token row
    python bench.py compare [0,1,2]        # APPO vs GRPO vs ARPO and the ablations, seeds 0-2 (hours)

Each benchmark runs in this process and prints one line; run it in a fresh process so the
peak (ru_maxrss) belongs to it alone.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import appo


def memory(logit_chunk="1024", vocab=151_936, T=1024, P=64, rows=4):
    """Peak memory of one ppo_update on a synthetic Qwen2-shaped model (hidden 128, 2 layers,
    tied embeddings: 19.8M parameters, almost all of them the 152k x 128 embedding), `rows`
    rollouts of P prompt + T response tokens in one micro-batch. The logits of such a batch are
    rows x T x vocab float32 = 2.3 GiB per copy; the update's peak shows how many copies exist."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    cfg = appo.Config(micro_batch_size=rows, mini_batch_prompts=1, temperature=1.0, device="cpu",
                      logit_chunk=int(logit_chunk))
    train = [appo.Rollout(example=0, prompt=torch.randint(0, vocab - 1000, (P,)).tolist(),
                          tokens=torch.randint(0, vocab - 1000, (T,)).tolist(), mask=[1] * T,
                          logp=[-12.0] * T) for _ in range(rows)]
    advs = [torch.randn(T) for _ in train]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.time()
    model.train()
    out = appo.ppo_update(model, optimizer, train, advs, None, cfg, appo.resolve(cfg), pad_id=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"one update, {rows} x ({P} + {T}) tokens, vocab {vocab}, {params:.1f}M params, logit_chunk "
          f"{cfg.logit_chunk}: peak RSS {peak / 1024:.0f} MiB, +{(peak - base) / 1024:.0f} MiB over the "
          f"process before the update; {time.time() - start:.1f} s; optimizer steps "
          f"{out['update/optimizer_steps']}")


def stops(T=4096, repeat=20):
    """What the agent loop pays per token to find stop strings: appo.find_stop on a 4,096-token
    row of 1-3 character pieces with no stop in it (the worst case: every token is checked)."""
    pieces = [("abc", "d", "ef", " ", "<", "/", "py")[i % 7] for i in range(T)]
    start = time.perf_counter()
    for _ in range(repeat):
        tail = ""
        for piece in pieces:
            assert appo.find_stop(tail, piece) is None
            tail = (tail + piece)[-32:]
    ms = 1000 * (time.perf_counter() - start) / repeat
    print(f"stop detection: {ms:.2f} ms per {T}-token row ({1000 * ms / T:.2f} us per token)")


# Every algorithm and ablation of the comparison, as appo.py settings; all at the same budget M.
VARIANTS = {                                  # run folder: (label in the table, settings)
    "appo": ("APPO", []), "grpo": ("GRPO", ["--algo=grpo"]), "arpo": ("ARPO", ["--algo=arpo"]),
    "bs_entropy": ("APPO, entropy-only branching score", ["--branch_score=entropy"]),
    "no_future": ("APPO, b = 0 (no Eq. 7)", ["--future_weight=0"]),
    "one_group": ("APPO, one group (no Eq. 6 dual groups)", ["--dual_group=False"]),
    "resample_yt": ("APPO, branches re-sample y_t (old rule)", ["--keep_branch_token=False"])}


def compare(seeds="0,1,2", out="out/compare", *extra):
    """The algorithm comparison on the toy: for each seed, one world and SFT checkpoint shared by
    every variant (--toy_dir), then each variant's RL run from it. Runs one after another (each
    uses the whole machine), skips runs whose summary.json exists (so it resumes), and writes
    out/results.md: held-out accuracy after RL (mean +- std over seeds), gain over SFT, tokens
    generated and seconds per RL step. `extra` settings are passed to every run."""
    rows = {}
    for seed in seeds.split(","):
        toy_dir = os.path.join(out, f"seed{seed}", "toy")
        for name, (label, args) in VARIANTS.items():
            run = os.path.join(out, f"seed{seed}", name)
            if not os.path.exists(os.path.join(run, "summary.json")):
                cmd = [sys.executable, "appo.py", f"--seed={seed}", f"--out_dir={run}",
                       f"--toy_dir={toy_dir}", *args, *extra]
                print(" ".join(cmd), flush=True)
                with open(os.path.join(out, "log.txt"), "a") as log:
                    os.makedirs(run, exist_ok=True)
                    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
            with open(os.path.join(run, "summary.json")) as f, open(os.path.join(run, "timing.json")) as g:
                rows.setdefault(label, []).append((json.load(f), json.load(g)))
    table = comparison_table(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    print(table)


def comparison_table(rows):
    """Markdown: one row per variant, mean +- std over seeds."""
    def ms(xs, scale=1.0, digits=1):
        xs = [x * scale for x in xs]
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        return f"{statistics.mean(xs):.{digits}f} +- {sd:.{digits}f}"
    kinds = sorted(k for k in next(iter(rows.values()))[0][0]["after_rl"] if k.startswith("acc/"))
    head = ["variant", "seeds", "test acc after RL (%)", "gain over SFT (points)",
            *[f"{k[4:]} after (%)" for k in kinds], "tokens generated / step", "s / RL step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in rows.items():
        s = [r[0] for r in runs]
        cells = [name, str(len(runs)), ms([x["after_rl"]["acc"] for x in s], 100),
                 ms([x["gain"]["acc"] for x in s], 100),
                 *[ms([x["after_rl"][k] for x in s], 100) for k in kinds],
                 ms([x["rl"]["tokens_generated_per_step"] for x in s], digits=0),
                 ms([t["time/rollout_s"] + t["time/reward_s"] + t["time/update_s"] for _, t in runs],
                    1 / s[0]["steps"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    benchmarks = {"memory": memory, "stops": stops, "compare": compare}
    if len(sys.argv) < 2 or sys.argv[1] not in benchmarks:
        sys.exit(f"usage: python bench.py {{{'|'.join(benchmarks)}}} [args]")
    benchmarks[sys.argv[1]](*sys.argv[2:])
