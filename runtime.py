"""The machinery of appo.py, kept out of the algorithm: settings parsing, data loading, cold-start SFT
and the toy world, models and devices, torchrun, and a run's checkpoints, logs and summary.

Functions take the run's settings object (appo.Config) as an argument; this module never imports appo.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

import report
import tools
from agent import (Rollout, build_prompt, build_prompt_text, chunk_logp, response_logprobs, result_ids,
                   token_texts)


# ---------------------------------------------------------------------------------------------
# Settings: --key=value into a dataclass, with --help from its docstrings
# ---------------------------------------------------------------------------------------------
def field_docs(cls):
    """{field: docstring} for a dataclass whose fields each carry a docstring line below them.

    The docstrings are the one place a setting is explained; --help prints them."""
    import ast
    import inspect
    import textwrap
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def settings_help(cls, prog):
    """What `--help` prints: the usage docstring's first lines, then every setting with its default."""
    import textwrap
    docs, lines = field_docs(cls), [f"usage: python {prog} [--key=value ...]", ""]
    for f in dataclasses.fields(cls):
        lines.append(f"  --{f.name}={f.default!r}" if f.type is str else f"  --{f.name}={f.default}")
        lines += textwrap.wrap(docs.get(f.name, ""), 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def stop(prog, message, code=2):
    """One clear line on stderr and an exit code (2: settings or data a user can fix), no traceback."""
    print(f"{prog}: {message}", file=sys.stderr)
    sys.exit(code)


def parse_settings(cls, argv, prog):
    """`--key=value` (or `--key value`; a bare `--flag` means True) -> an instance of dataclass `cls`.

    `-h`/`--help` prints every setting's docstring and default. An unknown key or a value of the
    wrong type exits with code 2 and one line naming it (and, for a key, the valid ones).
    """
    if any(a in ("-h", "--help") for a in argv):
        print(settings_help(cls, prog))
        sys.exit(0)
    fields, values, i = {f.name: f for f in dataclasses.fields(cls)}, {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        key, eq, value = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or key not in fields:
            stop(prog, f"unknown setting {arg!r}. Valid: {', '.join(fields)}")
        kind = fields[key].type
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif kind is bool:
                value = "true"
            else:
                stop(prog, f"--{key} needs a value, e.g. --{key}={fields[key].default!r}")
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                values[key] = value.lower() in ("true", "1", "yes")
            else:
                values[key] = kind(value)
        except ValueError:
            stop(prog, f"--{key}={value!r} is not a valid {kind.__name__}")
    return cls(**values)


def _looks_like_hub_id(name):
    """'org/name' or 'name' with Hub-legal characters, not a path a user meant as a folder."""
    return (not name.startswith((".", "/", "~")) and name.count("/") <= 1
            and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None)


# ---------------------------------------------------------------------------------------------
# Data: JSONL and verl parquet rows, checked before any work
# ---------------------------------------------------------------------------------------------
class DataError(ValueError):
    """A data row a user must fix; the message starts with `file:line`."""


def read_jsonl(path, numbered=False):
    """JSON Lines -> list of objects (or (line number, object) pairs); bad JSON -> DataError."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows if numbered else [row for _, row in rows]


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def load_examples(path):
    """verl parquet or JSONL -> [{question, answer: [aliases], kind, messages}], every row checked.

    verl rows: chat `prompt`, `reward_model.ground_truth`, `ability` (math -> math, else qa).
    JSONL rows: `question`, `answer` (string, number or list of aliases), optional `kind` math|qa.
    A bad row raises DataError naming the file and line (parquet: row) before any work starts.
    """
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq                            # ships with `datasets`
        rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    else:
        rows = read_jsonl(path, numbered=True)
    out = []
    for n, row in rows:
        where = f"{path}:{n}" if not path.endswith(".parquet") else f"{path}: row {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: a row must be an object, got {type(row).__name__}")
        if "prompt" in row and "reward_model" in row:                 # verl format
            try:
                messages = [{"role": m["role"], "content": m["content"].replace("\x08", "\\b")}
                            for m in row["prompt"]]                    # the paper's \b became a backspace
                gold = row["reward_model"]["ground_truth"]
            except (KeyError, TypeError, AttributeError) as e:
                raise DataError(f"{where}: malformed verl row ({e!r})") from None
            question = (row.get("extra_info") or {}).get("question") or messages[-1]["content"]
            kind = "math" if row.get("ability") == "math" else "qa"
        elif "question" in row and "answer" in row:
            messages, gold, question = None, row["answer"], row["question"]
            kind = row.get("kind") or "qa"
        else:
            raise DataError(f"{where}: needs `question` and `answer` (or verl `prompt` and `reward_model`)")
        if kind not in ("math", "qa"):
            raise DataError(f"{where}: kind must be 'math' or 'qa', got {kind!r}")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: the question must be a non-empty string")
        golds = [str(g) for g in gold] if isinstance(gold, (list, tuple)) else [str(gold)]
        if gold is None or not golds or not all(g.strip() for g in golds):
            raise DataError(f"{where}: the answer must be a non-empty string, number or list of them")
        out.append({"question": question, "answer": golds, "kind": kind, "messages": messages,
                    **({"type": str(row["type"])} if row.get("type") else {})})   # reported per type
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def load_data(cfg):
    """-> (model to start from, train, val, test). Data rows are checked before any work; without
    --model the toy world is built (cached under toy_dir) and its splits are used."""
    try:
        train, val, test = (load_examples(p) if p else None
                            for p in (cfg.train_data, cfg.val_data, cfg.test_data))
        traces = load_traces(cfg.sft_data) if cfg.sft_data else None
    except DataError as e:
        stop("appo.py", str(e))
    os.makedirs(cfg.out_dir, exist_ok=True)
    model_path = cfg.model
    if cfg.model and cfg.sft_data:                              # the paper's cold start, then RL
        model_path = cold_start(cfg, cfg.model, traces, os.path.join(cfg.out_dir, "sft"))
    if not cfg.model:                                           # embedded default: the toy world
        try:
            model_path, splits = build_toy(cfg)
        except ValueError as e:                                 # a cached world built with other settings
            stop("appo.py", str(e))
        train, val, test = train or splits["rl"], val or splits["val"], test or splits["test"]
    test = (test or [])[:cfg.eval_limit] if cfg.eval_limit else (test or [])
    return model_path, train, val or [], test


def step_batch(train, cfg, step):
    """The step's prompts: a sample of the train split drawn from (seed, step) alone, so a resumed run
    draws what the uninterrupted one did."""
    order = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(train)), min(cfg.prompts_per_step,
                                                                                      len(train)))
    return [train[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Cold-start SFT (the paper's first stage) and the embedded toy world
# ---------------------------------------------------------------------------------------------
def trace_segments(response):
    """An SFT response -> [(text, is_tool_result)], split at its ` <result>\n...\n</result>` spans
    (exactly what the agent loop appends after a call, so tokens split the same way as in RL).
    Example: "<python>print(1)</python> <result>\n1\n</result> <answer>\\boxed{1}</answer>"
             -> [("<python>print(1)</python>", False), (" <result>\n1\n</result>", True),
                 (" <answer>\\boxed{1}</answer>", False)].
    """
    parts, pos = [], 0
    for m in tools.RESULT_SPAN.finditer(response):
        parts += [(response[pos:m.start()], False), (m.group(0), True)]
        pos = m.end()
    parts.append((response[pos:], False))
    return [(text, is_result) for text, is_result in parts if text]


def sft_rollout(tokenizer, prompt, response):
    """One SFT example as a Rollout: the response's own text is m_t = 1 (trained), its tool results
    m_t = 0, and EOS closes the turn. Each segment is tokenised alone, as the agent loop does
    (results with special-token strings as plain text, result_ids)."""
    r = Rollout(example=0, prompt=prompt)
    for text, is_result in trace_segments(response):
        ids = (result_ids(tokenizer, text) if is_result
               else tokenizer(text, add_special_tokens=False)["input_ids"])
        r.tokens += ids
        r.mask += [0 if is_result else 1] * len(ids)
    r.tokens.append(tokenizer.eos_token_id)
    r.mask.append(1)
    return r


def load_traces(path):
    """Cold-start SFT traces (JSONL) -> [{messages (the prompt turns) or question, kind, response}].
    A row holds chat `messages` ending with the assistant's turn, or `question` + `response`; the
    response carries the tag protocol inline (<python>..</python> <result>..</result> ...
    <answer>\\boxed{..}</answer>). A row without an assistant turn, or with tags that do not balance,
    raises DataError naming the file and line."""
    out = []
    for n, row in read_jsonl(path, numbered=True):
        where = f"{path}:{n}"
        messages = row.get("messages") if isinstance(row, dict) else None
        if messages is not None:
            if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
                raise DataError(f"{where}: `messages` must end with the assistant's turn")
            row = {"messages": messages[:-1], "question": "", "response": messages[-1].get("content") or ""}
        elif not isinstance(row, dict) or not row.get("question") or "response" not in row:
            raise DataError(f"{where}: needs `messages` (ending with the assistant's turn) or "
                            "question + response")
        if tools.unbalanced_tags(row["response"]):
            raise DataError(f"{where}: the response's tags do not balance (every <tag> needs its </tag>)")
        out.append({"messages": row.get("messages"), "question": row["question"],
                    "kind": row.get("kind", "qa"), "response": row["response"]})
    if not out:
        raise DataError(f"{path}: no traces")
    return out


def pack(lengths, capacity):
    """First-fit decreasing: sequence lengths -> bins (lists of indices) of at most `capacity` tokens.
    Example: pack([5, 2, 4, 3], 7) -> [[0, 1], [2, 3]]."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            bins.append([]), room.append(capacity)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= lengths[i]
    return bins


def packed_batch(rows, pad_id, device):
    """SFT Rollouts packed several to a row, rows as wide as the longest trace (pack) -> input ids and
    position ids (n, L), each trace's positions restarting at 0 (Hugging Face models then attend within
    a trace only), per position the next token and whether it is trained (its m_t = 1), and the order
    of the traces in the rows. A random batch of the toy's traces (14 to 213 tokens) padded row by row
    is ~43 % padding; packed, ~10 %.
    Example: traces of 5, 2 and 3 tokens -> 2 rows of 5: [a a a a a], [c c c b b], order [0, 2, 1]."""
    seqs = [r.prompt + r.tokens for r in rows]
    trained = [[0] * (len(r.prompt) - 1) + r.mask + [0] for r in rows]      # position j predicts seq[j+1]
    width = max(map(len, seqs))
    ids, pos, tgt, on, order = [], [], [], [], []
    for b in pack([len(x) for x in seqs], width):
        fill = width - sum(len(seqs[i]) for i in b)
        ids.append([t for i in b for t in seqs[i]] + [pad_id] * fill)
        pos.append([p for i in b for p in range(len(seqs[i]))] + list(range(fill)))   # padding: its own span
        tgt.append([t for i in b for t in seqs[i][1:] + [pad_id]] + [pad_id] * fill)
        on.append([m for i in b for m in trained[i]] + [0] * fill)
        order += b
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_tensor(ids), as_tensor(pos), as_tensor(tgt), as_tensor(on).bool(), order


def packed_logprobs(model, ids, pos, targets, trained, chunk=1024):
    """log p(next token) at the trained positions of a packed batch -> 1-D tensor. No attention mask:
    the model sees the packing in the position ids (a new trace starts where they drop)."""
    hidden = model.base_model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[trained]
    head, y = model.get_output_embeddings(), targets[trained]
    return torch.cat([chunk_logp(hidden[None, s:s + chunk], y[None, s:s + chunk], head, 1.0)[0][0]
                      for s in range(0, len(y), chunk)])


def packing_works(model, rows, pad_id):
    """Whether this model attends within each packed trace only: the packed log-probs of a few traces
    match the row-by-row ones (a model whose masks ignore packed position ids would mix traces)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        ids, pos, tgt, on, order = packed_batch(rows, pad_id, device)
        packed = packed_logprobs(model, ids, pos, tgt, on).float()
        logp, _, _ = response_logprobs(model, rows, 1.0, pad_id)
    trained = lambda j: logp[j, :len(rows[j].tokens)][torch.tensor(rows[j].mask, device=device).bool()]
    padded = torch.cat([trained(j) for j in order]).float()
    return packed.shape == padded.shape and torch.allclose(packed, padded, atol=1e-3, rtol=1e-3)


def sft(model, rows, *, steps, batch_size, lr, warmup, seed, pad_id, dtype="float32", desc="sft"):
    """Cold-start SFT: next-token loss on the m_t = 1 tokens of `rows` (Rollouts), mean over tokens.

    Each step's batch is drawn at random and packed (packed_batch: several traces per row, ~1.5x the
    throughput of padding each on the toy; the same loss). A model that does not read packing from the
    position ids (packing_works) takes padded batches. AdamW (betas 0.9 / 0.95), linear warm-up for
    `warmup` steps, then cosine decay to 10 % of lr; batches drawn with a seeded generator. Returns the
    per-step losses."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95),
                            fused=device.type in ("cpu", "cuda"))          # one kernel: ~6 % of a toy step
    shape = lambda s: (min(1.0, (s + 1) / max(warmup, 1))
                       * (0.55 + 0.45 * math.cos(math.pi * s / max(steps, 1))))   # warm-up, cosine to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    packed = steps > 0 and packing_works(model, rows[:8], pad_id)
    model.train()
    losses, bar = [], progress(range(steps), desc=desc)
    for _ in bar:
        batch = rng.sample(rows, min(batch_size, len(rows)))
        with autocast(device, dtype):
            if packed:
                loss = -packed_logprobs(model, *packed_batch(batch, pad_id, device)[:4]).mean()
            else:
                logp, _, mask = response_logprobs(model, batch, 1.0, pad_id)
                loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return losses


def cold_start(cfg, init, traces, sft_dir):
    """The paper's first stage: SFT of the model at `init` on `traces` (load_traces rows), loss on
    the assistant's own tokens only; cached: an existing checkpoint at sft_dir is used as it is.
    -> sft_dir, which RL (or a later run, --model=sft_dir) starts from."""
    if os.path.exists(os.path.join(sft_dir, "config.json")):
        return sft_dir
    model, tokenizer = load_model(init, cfg)
    rows = [sft_rollout(tokenizer, build_prompt(tokenizer, t["question"], t["kind"], cfg.system_prompt,
                                                t.get("messages")), t["response"]) for t in traces]
    steps = cfg.sft_steps
    if cfg.sft_epochs > 0:
        steps = math.ceil(cfg.sft_epochs * len(rows) / cfg.sft_batch_size)
    t0 = time.time()
    losses = sft(model, rows, steps=steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                 warmup=cfg.sft_warmup, seed=cfg.seed, pad_id=tokenizer.pad_token_id, dtype=cfg.dtype)
    seconds = round(time.time() - t0, 1)
    save_hf(model, tokenizer, sft_dir, record={      # a later run that finds it cached can say what it cost
        "stage": "cold-start SFT", "from": init, "traces": len(rows), "steps": steps,
        "batch_size": cfg.sft_batch_size, "lr": cfg.sft_lr, "seconds": seconds,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})
    if losses:
        print(f"cold-start SFT: {steps} steps on {len(rows)} traces in {seconds:.0f} s, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return sft_dir


def build_toy(cfg):
    """The embedded default (toy.py): world, tokenizer, tiny model and cold-start SFT, each cached
    in out_dir. -> (SFT checkpoint dir, splits {sft, rl, val, test})."""
    import toy
    sizes = {"test": cfg.toy_test_size, "val": cfg.toy_val_size, "rl": cfg.toy_rl_size,
             "sft": cfg.toy_sft_size}
    splits, corpus, init = toy.build(
        cfg.toy_dir or cfg.out_dir, cfg.seed, sizes, cfg.toy_wrong_rate, cfg.toy_error_rate, cfg.toy_hidden,
        cfg.toy_layers, cfg.toy_heads,
        prompt_text=lambda q: build_prompt_text(q, toy.SYSTEM_PROMPT), filler=cfg.toy_filler)
    cfg.search_corpus = cfg.search_corpus or corpus
    cfg.system_prompt = toy.SYSTEM_PROMPT
    sft_dir = os.path.join(cfg.toy_dir or cfg.out_dir, "sft")
    if os.path.exists(os.path.join(sft_dir, "config.json")):
        return sft_dir, splits
    if not os.path.exists(os.path.join(sft_dir, "config.json")):
        tokenizer = load_model(init, cfg)[1]
        if tokenizer.tokenize("Kalove 714") != ["Ka", "lo", "ve", " ", "7", "1", "4"]:
            raise RuntimeError(f"the toy tokenizer did not load back intact from {init} "
                               f"({type(tokenizer).__name__})")
    return cold_start(cfg, init, splits["sft"], sft_dir), splits


# ---------------------------------------------------------------------------------------------
# Models and devices: float32 master weights, bf16 autocast, frozen copies
# ---------------------------------------------------------------------------------------------
def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():                               # under torchrun: this rank's GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(name, device):
    """--dtype -> the dtype forward passes run in (weights stay float32)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device, name):
    """Forward passes in bf16 over float32 master weights (a no-op context for float32)."""
    dtype = compute_dtype(name, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_model(name_or_path, cfg):
    """Any Hugging Face causal LM -> (model, tokenizer) on cfg.device, weights in float32 (the
    master weights AdamW updates; cfg.dtype only sets the autocast dtype of forward passes).
    A model or tokenizer that cannot be loaded stops with one line (exit code 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    device = pick_device(cfg.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32).to(device)
    except (OSError, ValueError) as e:
        stop("appo.py", f"cannot load model {name_or_path!r}: {str(e).strip().splitlines()[0]}")
    disable_dropout(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
        model.config.use_cache = True      # generation still uses the KV cache
    model.eval()
    return model, tokenizer


def disable_dropout(model):
    """Dropout off everywhere (TRL's default for RL too): sampling runs in eval mode and the loss in
    train mode, so with dropout the two would be different functions and the PPO ratio noise. Covers
    nn.Dropout modules and the float rates attention layers read in forward (`attention_dropout`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout", "resid_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    for key, value in list(vars(model.config).items()):
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(model.config, key, 0.0)                      # saved checkpoints keep it off
    return model


def frozen_copy(model):
    """A gradient-free copy of the policy kept on the CPU (moved to the accelerator only to score)."""
    twin = copy.deepcopy(model).to("cpu").eval()
    twin.requires_grad_(False)
    return twin


@contextlib.contextmanager
def on_device(model, device):
    """Move a frozen copy (the Eq. 4 anchor, the KL reference) to `device` for the block and back
    to the CPU after, so it takes accelerator memory only while it is used. A model already there
    stays there (an enclosing block moved it: the streamed branching round holds the anchor on the
    device for the whole tree, and each scoring inside it must not move it back)."""
    if model is None or device.type == "cpu" or next(model.parameters()).device == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def make_search(cfg):
    """The search tool from the settings (cache first, then corpus or URL), or None."""
    if not (cfg.search_corpus or cfg.search_url or cfg.search_cache):
        return None
    return tools.Search(corpus=cfg.search_corpus or None, url=cfg.search_url or None,
                        cache=cfg.search_cache or None, topk=cfg.search_topk)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, **kw)


# ---------------------------------------------------------------------------------------------
# torchrun: ranks, the process group, gradient averaging, the optimizer step
# ---------------------------------------------------------------------------------------------
def launched():
    """(rank, world) this process was started as, read from torchrun's environment before any process
    group exists: (0, 1) for a plain `python appo.py`."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def under_torchrun():
    """True when a launcher started this process as a rank (a 1-process torchrun included, so that
    the NCCL path can be tried on one GPU)."""
    return launched()[1] > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def launch_store(timeout_min):
    """torchrun's key-value store (TCPStore), joined before the process group, or None in a plain
    process: ranks wait there for rank 0's one-off work, which no collective timeout then limits."""
    if not under_torchrun():
        return None
    rank, world = launched()
    store, _, _ = next(torch.distributed.rendezvous("env://", rank, world,
                                                    timeout=timedelta(minutes=timeout_min)))
    return store


RANK0_DONE = "appo/rank0_done"


def rank0_first(fn, rank, store):
    """fn() on rank 0, then on the other ranks once it returned (they read what it cached: the toy
    world, the SFT checkpoint). They wait on the store, not in a collective, so a cold-start SFT of
    any length cannot time them out; if rank 0 fails, torchrun stops them."""
    if store is None:
        return fn()
    if rank == 0:
        out = fn()
        store.set(RANK0_DONE, "1")
        return out
    store.wait([RANK0_DONE], timedelta(days=30))
    return fn()


def init_distributed(device=None, timeout_min=30.0, store=None):
    """Under torchrun join the process group -> (rank, world): nccl on this rank's GPU (LOCAL_RANK,
    made the current device first: all_gather_object and NCCL put their buffers on the current
    device, which is GPU 0 on every rank otherwise), gloo when the run's device is the CPU. `store`:
    the one launch_store joined (rank 0 may host it, so it cannot be made twice). A plain
    `python appo.py` returns (0, 1) and makes no torch.distributed call."""
    if not under_torchrun():
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        device = device or pick_device("auto")
        rank, world = launched()
        kw = {"timeout": timedelta(minutes=timeout_min)}
        if store is not None:
            kw.update(store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
        if device.type == "cuda":
            index = int(os.environ.get("LOCAL_RANK", "0")) if device.index is None else device.index
            torch.cuda.set_device(index)
            dist.init_process_group("nccl", device_id=torch.device("cuda", index), **kw)
        else:
            dist.init_process_group("gloo", **kw)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed():
    """The end of a torchrun process: wait for every rank, then take the process group down. A rank
    that exits with the group still up can abort in gloo's teardown ("terminate called without an
    active exception": 3 of 11 two-rank test runs here) and so fail the whole launch."""
    if distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world():
    """(rank, world) in the joined process group; (0, 1) without one."""
    if not distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def gather(obj):
    """Every rank's `obj` on every rank (a list of one in a single process)."""
    if not distributed():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier():
    if distributed():
        torch.distributed.barrier()


GRAD_BUCKET_BYTES = 32 * 2 ** 20


def grad_buckets(params, limit=GRAD_BUCKET_BYTES):
    """Consecutive parameters of one dtype and device, up to `limit` bytes of gradient each (a
    parameter larger than the limit is a bucket alone)."""
    buckets, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or size + nbytes > limit or (p.dtype, p.device) != (last.dtype, last.device):
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def sync_gradients(model, finite, n_local, bucket_bytes=GRAD_BUCKET_BYTES):
    """Data parallel: turn each rank's gradient of its own rollout mean into the gradient of the mean
    over every rank's rollouts (each weighted by its n_local rows; what DistributedDataParallel does
    for equal shares, written out because the chunked log-prob path calls the model's layers, not a
    wrapped forward), and agree on whether every rank's loss was finite. Gradients travel flattened
    in buckets of ~32 MB: one all-reduce per bucket and one host sync in all, instead of one of each
    per parameter (~290 for a 0.5B model). One process: nothing to do."""
    if not distributed():
        return finite
    dist, device = torch.distributed, next(model.parameters()).device
    head = torch.tensor([float(not finite), float(n_local)], device=device)
    dist.all_reduce(head)                                            # ranks with a bad loss, rows in all
    bad, n = head.tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:                                           # unused here, maybe not elsewhere
            p.grad = torch.zeros_like(p)
    for bucket in grad_buckets(params, bucket_bytes):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        flat *= n_local / n
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
    return bad == 0


def optimizer_step(model, optimizer, finite, n_rows, grad_clip):
    """The generic part of one update: average gradients over ranks (torchrun), clip, step, or skip the
    step when any rank's loss or the gradient is not finite. -> the gradient norm, or None if skipped."""
    finite = sync_gradients(model, finite, n_rows)                           # torchrun: mean over ranks
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if finite else None
    if finite and torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)                                    # free them until the next
    return float(grad_norm) if finite and torch.isfinite(grad_norm) else None


# ---------------------------------------------------------------------------------------------
# A run: start or resume, log each step, checkpoint, summarise
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training run holds between steps (infrastructure, kept out of the math)."""
    cfg: object                         # appo.Config
    recipe: object                      # appo.Recipe
    model: object
    tokenizer: object
    optimizer: object
    anchor: object                      # pi_anchor of Eq. 4 (a CPU copy; None for the sampler anchor)
    ref: object                         # the initial policy, for the KL term or the ref anchor
    toolbox: dict                           # the tools
    start: int = 0                      # last finished step (a resumed run goes on from it)
    before: dict = None                 # the SFT checkpoint's evaluation, measured once
    rank: int = 0                       # this process under torchrun (0 alone logs, evaluates, saves)
    plotted: float = 0.0                # when curves.png was last drawn (time.time())
    tokens_so_far: int = 0              # RL tokens generated up to the last step (cum/tokens_generated)
    seconds_so_far: float = 0.0         # RL step seconds up to it: rollout + reward + update (cum/seconds)

    @property
    def metrics_path(self):
        return os.path.join(self.cfg.out_dir, "metrics.jsonl")


def start_run(cfg, recipe, model_path, rank=0, world=1):
    """Model, anchor, reference, optimizer and tools; from the last checkpoint when --resume."""
    ckpt = find_checkpoint(os.path.join(cfg.out_dir, "ckpt")) if cfg.resume else None
    model, tokenizer = load_model(ckpt or model_path, cfg)
    seed_everything(cfg.seed + rank)            # RL draws the same whether or not the toy was just built
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({**dataclasses.asdict(cfg), "recipe": dataclasses.asdict(recipe), "world": world,
                       "backend": torch.distributed.get_backend() if distributed() else None,
                       "torch_threads": torch.get_num_threads()}, f, indent=2)    # results depend on it (CPU)
    needs_ref = cfg.kl_coef > 0 or cfg.omega_anchor == "ref"
    ref = frozen_copy(load_model(model_path, cfg)[0]) if needs_ref else None
    anchor = {"prev": frozen_copy(model), "ref": ref, "sampler": None}[cfg.omega_anchor]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(cfg, recipe, model, tokenizer, optimizer, anchor, ref,
              tools.toolbox(search_backend=make_search(cfg), timeout=cfg.tool_timeout), rank=rank)
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False,
                           map_location=load_onto(next(model.parameters()).device))
        run.optimizer.load_state_dict(state["optimizer"])
        if state.get("anchor") is not None:
            run.anchor.load_state_dict(state["anchor"])
        run.start, run.before = state["step"], state["before"]
        set_rng_state(state["rng"][rank])                      # every rank's own stream
        if rank == 0:
            kept = [m for m in read_jsonl(run.metrics_path) if m["step"] <= run.start] \
                if os.path.exists(run.metrics_path) else []
            write_jsonl(run.metrics_path, kept)                # drop steps logged after the checkpoint
            last = kept[-1] if kept else {}
            run.tokens_so_far, run.seconds_so_far = last.get("cum/tokens_generated", 0), last.get("cum/seconds", 0.0)
            print(f"resumed from {ckpt} at step {run.start}")
    elif rank == 0 and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)
    return run


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"].cpu())                   # RNG states must be CPU byte tensors
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_hf(model, tokenizer, path, extra=None, record=None):
    """Write a Hugging Face checkpoint (plus `extra` torch state, and `record`, a dict saying what made
    it, as record.json) atomically: a crash at any moment leaves the previous one at `path`, or at
    `path`.old mid-swap, which load_checkpoint also finds."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        torch.save(extra, os.path.join(tmp, "trainer_state.pt"))
    if record is not None:
        with open(os.path.join(tmp, "record.json"), "w") as f:
            json.dump(record, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_onto(device):
    """torch.load's map_location for a trainer state: what was saved from an accelerator (AdamW's
    moments, from rank 0's GPU) comes back on `device`, this rank's, instead of on the GPU it was
    saved from (without it every rank puts a copy on cuda:0); CPU tensors (RNG states, AdamW's step
    counts) stay on the CPU, where set_rng_state and AdamW expect them."""
    return lambda storage, location: storage if location == "cpu" else storage.to(device=device)


def find_checkpoint(path):
    for p in (path, path + ".old"):
        if os.path.exists(os.path.join(p, "trainer_state.pt")):
            return p
    return None


def save_checkpoint(run, step):
    """HF checkpoint + optimizer, anchor, every rank's RNG and the SFT evaluation, atomically (see
    save_hf), written by rank 0."""
    rngs = gather(rng_state())
    if run.rank == 0:
        save_hf(run.model, run.tokenizer, os.path.join(run.cfg.out_dir, "ckpt"), extra={
            "step": step, "optimizer": run.optimizer.state_dict(), "before": run.before, "rng": rngs,
            "anchor": run.anchor.state_dict() if run.cfg.omega_anchor == "prev" else None})
    barrier()


def step_metrics(step, batch, rollouts, tree, update, seconds):
    """One line of metrics.jsonl: reward and its parts, accuracy / tool calls / bad formats by
    question type, the share of prompts whose M rewards are all equal (credit/equal_rewards: every
    advantage 0, nothing learned from them), the tree, what the step cost, the update. Names are
    namespaced."""
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    by_type = {}
    for r in rollouts:
        by_type.setdefault(batch[r.example].get("type", batch[r.example]["kind"]), []).append(r)
    sampled = [h for r in rollouts for h, metrics in zip(r.entropy[r.fork:], r.mask[r.fork:]) if metrics]
    metrics = {"step": step, "reward/mean": mean([r.reward for r in rollouts]),
         "reward/score": mean([r.score for r in rollouts]),
         "reward/format_ok": mean([r.format_ok for r in rollouts]),
         "acc/initial": mean([r.score for r in rollouts if r.parent < 0])}
    metrics.update({f"acc/{t}": mean([r.score for r in rs]) for t, rs in sorted(by_type.items())})
    metrics.update({f"tools/calls_{t}": mean([r.tool_calls for r in rs]) for t, rs in sorted(by_type.items())})
    for cause in ("truncated", "no_answer", "unbalanced_tags"):
        metrics[f"format/{cause}"] = mean([r.format_error == cause for r in rollouts])
    rewards = {}
    for r in rollouts:
        rewards.setdefault(r.example, []).append(r.reward)
    metrics["credit/equal_rewards"] = mean([max(rs) - min(rs) < 1e-6 for rs in rewards.values()])
    metrics.update({"tree/rollouts": len(rollouts), "tree/branches": sum(r.parent >= 0 for r in rollouts),
              **tree,
              "cost/tokens_generated": sum(sum(r.mask[r.fork:]) for r in rollouts),
              "cost/tool_calls": sum(sum(1 for c in r.calls if c[2] > r.fork) for r in rollouts),
              "policy/entropy": mean(sampled), **update,
              **{f"time/{k}_s": round(v, 3) for k, v in seconds.items()}})
    return metrics


def rollout_record(r, index, texts):
    """One rollout for the tree page: its tokens as text and every per-token signal (report.py)."""
    sig = r.signals
    return {"id": index[id(r)], "parent": index.get(r.parent, -1), "root": index.get(r.root, -1),
            "fork": r.fork,
            "branch_pos": r.branch_pos, "tokens": [texts[t] if t < len(texts) else "" for t in r.tokens],
            "mask": r.mask, "entropy": r.entropy, "omega": sig.get("omega"), "z_h": sig.get("z_h"),
            "z_omega": sig.get("z_omega"), "bs": sig.get("bs"), "tier": sig.get("tier"),
            "candidate": sig.get("candidate"),
            "adv": r.adv or None, "branch_points": r.branch_points, "reward": r.reward, "score": r.score,
            "format_ok": r.format_ok, "tool_calls": r.tool_calls, "truncated": r.truncated,
            "trained": r.trained}


def step_record(step, cfg, batch, rollouts, texts, n_prompts):
    """The data of one step's tree page: the first n_prompts prompts with all their rollouts."""
    prompts = []
    for e in range(min(n_prompts, len(batch))):
        mine = [(i, r) for i, r in enumerate(rollouts) if r.example == e]
        index = {i: k for k, (i, _) in enumerate(mine)} | {id(r): k for k, (_, r) in enumerate(mine)}
        ex = batch[e]
        prompts.append({"question": ex["question"], "answer": ex["answer"], "kind": ex["kind"],
                        "rollouts": [rollout_record(r, index, texts) for _, r in mine]})
    return {"step": step, "algo": cfg.algo, "run": cfg.out_dir, "prompts": prompts}


def make_reporter(cfg):
    """Optional mirrors of metrics.jsonl: TensorBoard or Weights & Biases -> log(metrics) or None."""
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        return lambda m: [writer.add_scalar(k, v, m["step"]) for k, v in m.items()
                          if k != "step" and isinstance(v, (int, float))] and writer.flush()
    if cfg.report_to == "wandb":
        import wandb
        run = wandb.init(project="appo", dir=cfg.out_dir, config=dataclasses.asdict(cfg))
        return lambda m: run.log(m, step=m["step"])
    return None


def print_step(m, steps):
    print(f"step {m['step']}/{steps} reward {m['reward/mean']:+.3f} score {m['reward/score']:.3f} "
          f"bad {1 - m['reward/format_ok']:.2f} branches {m['tree/branches']} "
          f"degenerate {m['tree/omega_degenerate']} tokens {m['cost/tokens_generated']} "
          f"loss {m.get('loss/loss', float('nan')):+.4f} clip {m.get('loss/clipfrac', 0):.3f} "
          f"kl {m.get('loss/approx_kl', 0):.4f} t {m['time/rollout_s']:.1f}+{m['time/update_s']:.1f}s",
          flush=True)


def combine_ranks(metrics):
    """One step's metrics from every rank -> one line: counts (tree sizes, costs) add up, seconds
    are the slowest rank's (the step waits for it), the rest (means, rates) is averaged over ranks.
    One rank: unchanged."""
    if len(metrics) == 1:
        return metrics[0]
    count = ("tree/rollouts", "tree/branches", "tree/scored", "tree/omega_degenerate", "cost/", "branch/n_forks")
    out = {}
    for k in metrics[0]:
        v = [m[k] for m in metrics if k in m]
        out[k] = sum(v) if k.startswith(count) else max(v) if k.startswith("time/") or k == "step" \
            else sum(v) / len(v)
    return out


PLOT_EVERY_S = 60.0     # curves.png takes ~1.4 s to draw: at most once a minute, and at the last step


def spend(run, tokens, seconds):
    """The run's budget so far, after a step that generated `tokens` in `seconds` -> the cum/* keys
    (training only: held-out evaluation, logging and checkpoints are not counted)."""
    run.tokens_so_far += tokens
    run.seconds_so_far += seconds
    return {"cum/tokens_generated": run.tokens_so_far, "cum/seconds": round(run.seconds_so_far, 3)}


def log_heldout(run, step, curve):
    """A metrics.jsonl row of the held-out curve alone: step 0, the checkpoint RL starts from."""
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **curve, **spend(run, 0, 0.0)}) + "\n")
        print(f"step {step}: held-out accuracy (val, greedy) {curve['heldout/acc']:.3f}", flush=True)


def log_step(run, step, batch, rollouts, tree, update, seconds, reporter, curve=None):
    """metrics.jsonl (and the optional mirror), the tree page every tree_every steps, and at each
    checkpoint the run's index page and the curves (redrawn if a minute has passed, and at the end).
    `curve`: the held-out metrics measured after this step, if any."""
    cfg, texts = run.cfg, token_texts(run.tokenizer)
    m = step_metrics(step, batch, rollouts, tree, update, seconds)
    m.update(report.fork_statistics([rollout_record(r, {id(r): 0}, texts) for r in rollouts],
                                    with_roles=not cfg.model))         # toy.fork_role reads the toy's tokens
    m = combine_ranks(gather(m))
    m.update(curve or {})
    m.update(spend(run, m["cost/tokens_generated"], sum(m[f"time/{k}_s"] for k in ("rollout", "reward", "update"))))
    if run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        print_step(m, cfg.steps)
        if reporter:
            reporter(m)
    if run.rank == 0 and cfg.tree_every and (step % cfg.tree_every == 0 or step == cfg.steps):
        record = step_record(step, cfg, batch, rollouts, texts, cfg.tree_prompts)
        with open(os.path.join(cfg.out_dir, f"tree_step{step}.json"), "w") as f:
            json.dump(record, f)
        report.write_tree_page(record, os.path.join(cfg.out_dir, f"tree_step{step}.html"))
    if step % cfg.save_every == 0 or step == cfg.steps:
        save_checkpoint(run, step)
        if run.rank == 0 and (step == cfg.steps or time.time() - run.plotted >= PLOT_EVERY_S):
            report.plot_curves(read_jsonl(run.metrics_path), os.path.join(cfg.out_dir, "curves.png"))
            run.plotted = time.time()
        if run.rank == 0:
            report.write_index(cfg.out_dir)


class Clock:
    """Wall seconds of a run's phases, in order: lap(name) ends the phase that ran since the last lap.
    Example: c = Clock(); ...SFT...; c.lap("sft"); ...; c.lap("rl") -> c.phases == {"sft": .., "rl": ..}."""
    def __init__(self):
        self.start = self.last = time.time()
        self.phases = {}

    def lap(self, name):
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def time_report(phases, rows):
    """One line: where a run's time went, its RL phase split into the steps' own parts (metrics rows)."""
    rl = {k: sum(m.get(f"time/{k}_s", 0.0) for m in rows) for k in ("rollout", "reward", "update", "heldout")}
    parts = []
    for name, sec in phases.items():
        if name == "RL" and rows:
            other = sec - sum(rl.values())
            inner = ", ".join(f"{k} {v:.0f}" for k, v in rl.items() if v or k != "heldout")
            inner += f", logging and checkpoints {other:.0f}"
            parts.append(f"RL {len(rows)} steps {sec:.0f} ({inner})")
        else:
            parts.append(f"{name} {sec:.0f}")
    return f"where the time went ({sum(phases.values()):.0f} s): " + " | ".join(parts)


def write_summary(cfg, before, after, metrics_path, clock, start=0):
    """summary.json: what the run measured, identical for the same command and seed on one machine
    (timings go to timing.json, the one thing that differs between two runs: the wall time, each phase
    of `clock` and the RL steps' parts summed). start: the step a resumed run went on from; `clock`
    then timed only this process, so the printed split counts only its own steps."""
    logged = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    rows = [m for m in logged if "tree/rollouts" in m]           # RL steps (not the step-0 held-out row)
    curve = [m for m in logged if "heldout/acc" in m]
    mean = lambda k: round(sum(m[k] for m in rows) / len(rows), 4) if rows else None
    summary = {"algo": cfg.algo, "seed": cfg.seed, "steps": cfg.steps, "before_rl": before, "after_rl": after,
               "gain": {k: round(after[k] - before["test"][k], 4) for k in after if k.startswith("acc")},
               "rl": {"tokens_generated_per_step": mean("cost/tokens_generated"),
                      "tool_calls_per_step": mean("cost/tool_calls"), "grad_norm": mean("update/grad_norm"),
                      "skipped_nonfinite": sum(m["update/skipped_nonfinite"] for m in rows)},
               "heldout_curve": {"step": [m["step"] for m in curve], "acc": [round(m["heldout/acc"], 4) for m in curve],
                                 "tokens": [m["cum/tokens_generated"] for m in curve]}}
    keys = sorted({k for m in rows for k in m if k.startswith("time/")})
    timing = {"wall_s": round(time.time() - clock.start, 1), **({"resumed_from_step": start} if start else {}),
              "phases_s": {k: round(v, 1) for k, v in clock.phases.items()},
              **{k: round(sum(m.get(k, 0.0) for m in rows), 1) for k in keys}}
    for name, obj in (("summary.json", summary), ("timing.json", timing)):
        with open(os.path.join(cfg.out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    if after:
        kinds = ", ".join(f"{k[4:]} {before['test'][k]:.2f} -> {after[k]:.2f}"
                          for k in after if k.startswith("acc/"))
        print(f"held-out accuracy: before RL {before['test']['acc']:.3f}, after RL {after['acc']:.3f} "
              f"({kinds})")
    print(time_report(clock.phases, [m for m in rows if m["step"] > start]) + " seconds")
    return summary
