"""
APPO: Agentic Procedural Policy Optimization (arXiv 2606.12384), in one file.

RL for tool-using LLM agents. Each prompt gets N rollouts that may call a python or a search
tool; every rollout is branched at the B tokens with the highest Branching Score (uncertain
*and* consequential, Eqs. 3-5), so that a prompt ends with M rollouts that share prefixes; credit
is assigned per procedure with dual-group advantages averaged over shared prefixes (Eq. 6) and a
future-aware, dual-clipped PPO loss (Eqs. 7-8). GRPO and ARPO run on the same code path.

    python appo.py                        # embedded default: toy tool world, tiny model, CPU, offline
    python appo.py --algo=grpo            # the same run with a baseline (also: --algo=arpo)
    python appo.py --help                 # every setting, its default and the paper's value
    python -m pytest -q test_appo.py      # the tests

A real model on one GPU (see README.md for the full command and memory settings):

    python appo.py --model=Qwen/Qwen2.5-0.5B-Instruct --train_data=train_10k.parquet \
        --search_cache=search_cache.json --lr=1e-6 --max_response_tokens=4096 ...

Order of this file: settings, reward, the equations (pure functions), the agent loop and the
rollout tree, the toy world, infrastructure, main().
"""
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import string
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.nn.functional as F

from math_verify import parse as mv_parse, verify as mv_verify

import report
import tools


# ---------------------------------------------------------------------------------------------
# Settings: one dataclass, `python appo.py --key=value`. Defaults are the embedded CPU run;
# each docstring gives the paper's value (APPO_SPEC.md section 5) where it differs.
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    # --- run ---
    out_dir: str = "out/appo"
    """Output folder: config.json, metrics.jsonl, summary.json, checkpoints (and the toy world)."""
    seed: int = 0
    """Seed for python, numpy and torch."""
    device: str = "auto"
    """'auto' picks cuda, then mps, then cpu."""
    resume: bool = False
    """Continue from the last checkpoint in out_dir (RL only; the toy world and SFT are cached)."""
    dist_timeout: float = 30.0
    """torchrun: minutes a rank waits in a collective for the others (while rank 0 writes a checkpoint,
    say) before the run stops with an error; NCCL's own default is 10. The cold-start SFT and the toy
    world are built before the process group exists, and evaluation is split over the ranks, so no
    rank waits in a collective for hours of rank 0's work."""

    # --- model and data ---
    model: str = ""
    """Hugging Face model name or path. Empty: build the toy world's tiny model (embedded default)."""
    train_data: str = ""
    """verl parquet (chat `prompt`, `reward_model.ground_truth`, `ability`) or JSONL
    (`question`, `answer` str or list, `kind` math|qa). Empty: the toy world's train split."""
    val_data: str = ""
    """Validation split (same formats) for pass@k at the SFT checkpoint. Empty: the toy's."""
    pass_k: int = 8
    """Samples per validation question for pass@k of the SFT checkpoint (0 or 1 = skip)."""
    test_data: str = ""
    """Held-out split evaluated before and after RL, same formats. Empty: the toy test split."""
    eval_limit: int = 0
    """Questions of test_data evaluated before and after RL (0 = all)."""
    system_prompt: str = ""
    """System prompt for JSONL questions (parquet rows bring their own). Empty: one listing the
    tools of tools.toolbox() (see default_system_prompt); the toy uses its own short one."""
    dtype: str = "auto"
    """Compute dtype of forward passes: auto (bfloat16 on a GPU that supports it, else float32) |
    float32 | bfloat16. Weights and AdamW state stay float32 either way (master weights); bfloat16
    runs the forward passes under autocast. Updating bf16 weights directly loses most small
    updates: at lr 1e-6 only ~2% of the weights changed in 10 steps (measured)."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (needed for 1.5B models on 24 GB)."""

    # --- tools ---
    search_corpus: str = ""
    """Search-R1 / FlashRAG JSONL corpus for the in-process BM25 search (toy: its generated corpus)."""
    search_url: str = ""
    """URL of a Search-R1 retriever server (POST {"queries", "topk", "return_scores"})."""
    search_cache: str = ""
    """JSON file query -> result text, tried before the other backends (paper: search_cache.json)."""
    search_topk: int = 1
    """Passages per search. Paper code: 3-5 (use --search_topk=3 with a real retriever); the toy's
    questions need exactly one passage per search, and 1 keeps its sequences short."""
    max_tool_calls: int = 3
    """Tool calls per rollout; further calls are answered with a limit message. Paper code: 3
    (reasoning) / 6 (deep search)."""
    tool_timeout: float = 5.0
    """Seconds a python call may run."""

    # --- rollout tree (spec section 2) ---
    algo: str = "appo"
    """appo | grpo (M independent rollouts, one group, b=0) | arpo (branch after tool results by
    entropy, all rollouts trained with plain group advantages, b=0)."""
    n_initial: int = 4
    """N: initial rollouts per prompt. Paper: 4 (code: 8)."""
    branch_points: int = 3
    """B: branch points per rollout and round. Paper: 3."""
    group_size: int = 16
    """M: rollouts per prompt in all. Paper: 16. One round gives (B+1)*N."""
    keep_branch_token: bool = True
    """True: a branch at t keeps the chosen token y_t and re-samples from y_{t+1} (spec section 2
    step 4, revised; the reference code), so the uncertain fork token gets the branches' credit
    (Eq. 6). False: re-sample y_t itself (the earlier rule, kept as an ablation)."""
    branch_score: str = "bs"
    """bs (Eq. 5) | entropy | random: how branch points are ranked (Table 4 ablation)."""
    omega_anchor: str = "prev"
    """pi_anchor of Eq. 4 at branching time: prev (weights before the latest update) | ref
    (initial weights) | sampler (Omega compares a fresh forward pass with the log-probs recorded
    while sampling: reference-code parity, non-zero only through numerical mismatch such as
    bf16). A Decision: see README."""
    half_life: float = 32.0
    """h in gamma = 2^(-1/h) for Eqs. 4 and 7. Paper: 32 (code: 64)."""
    temperature: float = 0.7
    """Sampling temperature tau (also used in Eq. 3 and the loss). Paper code: 1.0. The toy uses 0.7,
    chosen on its validation split: after RL 62.3% at 0.7 vs 47.0% at 1.0 (the tiny model's sampled
    copies of names and digits fail more often at 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1.0 = off, the unbiased on-policy choice)."""
    max_response_tokens: int = 192
    """Response budget incl. tool results. Paper: 4096 reasoning / 8192 deep search; toy: 192."""
    gen_batch_size: int = 128
    """Sequences generated together (lower it for big models)."""
    logit_chunk: int = 1024
    """Response positions per chunk when log-probs are computed for training: one chunk's
    (micro_batch, chunk, vocab) float32 logits exist at a time, recomputed in the backward pass."""

    # --- update (spec section 3) ---
    steps: int = 100
    """RL steps. The toy: 100 (about 3 minutes here; validation accuracy was still rising at 60)."""
    prompts_per_step: int = 8
    """Prompts per RL step. Paper: 128 (code: 96)."""
    mini_batch_prompts: int = 4
    """Prompts per PPO mini-batch (one optimizer step each). Paper: 16."""
    ppo_epochs: int = 1
    """Passes over the step's rollouts."""
    micro_batch_size: int = 32
    """Rollouts per forward/backward; gradients accumulate over a mini-batch. Lower it on a GPU."""
    lr: float = 2.5e-4
    """AdamW learning rate. Paper code: 1e-6 for 7B; the 0.6M-parameter toy needs far more. Chosen on
    the toy's validation split, the same for every algorithm: 1e-3 collapsed arithmetic (21.0% after
    APPO, seed 0); 5e-4 was unstable on seed 1 (APPO 9.0%: approx-KL spikes, then every rollout
    identical); 2.5e-4 has the best mean over APPO and GRPO on seeds 0-2 (README)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max gradient norm."""
    clip_low: float = 0.2
    """PPO ratio clip below (code: 0.2)."""
    clip_high: float = 0.28
    """PPO ratio clip above (code: 0.28, clip-higher)."""
    dual_clip: float = 3.0
    """c: dual clip for negative advantages, and Eq. 7's participation bound log c."""
    future_weight: float = 0.5
    """b of Eq. 7 (0 = 'w/o future-aware advantage'). Paper: 0.5 (code: 1.0). appo only."""
    dual_group: bool = True
    """Eq. 6 dual groups (False = one group of all M; the prefix rule stays). appo only."""
    kl_coef: float = 0.0
    """beta for KL(pi_theta || pi_ref). Paper: 0 (code: 0.001)."""
    save_every: int = 10
    """RL steps between checkpoints (a checkpoint is also written at the end)."""
    tree_every: int = 10
    """RL steps between rollout-tree pages (tree_step<N>.html; also the last step). 0 = none."""
    tree_prompts: int = 3
    """Prompts of a step shown on its tree page."""
    report_to: str = ""
    """Also send the metrics to: tensorboard | wandb (optional; needs that package installed)."""

    # --- embedded default: the toy world (toy.py) and its cold-start SFT ---
    toy_dir: str = ""
    """Where the toy world, its untrained model and its SFT checkpoint are cached (empty: out_dir).
    Runs that share it start RL from the same SFT checkpoint (the algorithm comparison does)."""
    toy_test_size: int = 1000
    """Held-out test questions (a third of each type). 1,000: the standard error of one accuracy
    is then ~1.5 points instead of ~3 at 200."""
    toy_val_size: int = 300
    """Validation questions: every toy setting was chosen on these, never on the test split."""
    toy_rl_size: int = 1200
    """Questions RL trains on; none of them is in the SFT traces."""
    toy_sft_size: int = 3600
    """Questions with a teacher trace for the cold-start SFT."""
    toy_wrong_rate: float = 0.6
    """How often the SFT teacher takes the wrong option at its question's decision (answers from
    memory, searches the decoy name, stops a hop short). Above 0.5, so greedy decoding after SFT
    takes the wrong option while samples often take the right one: RL has something to find."""
    toy_error_rate: float = 0.05
    """How often a teacher trace first recovers from a slip (a python syntax error, an empty search),
    so the SFT data covers what RL rollouts meet."""
    toy_hidden: int = 128
    """Hidden size of the toy model (0.61M parameters in all; 192 was slower and no better)."""
    toy_layers: int = 3
    """Layers of the toy model (4 measured no better after 1,500 SFT steps, on validation)."""
    toy_heads: int = 4
    """Attention heads of the toy model."""
    sft_data: str = ""
    """Cold-start SFT traces (JSONL: chat `messages` ending with the assistant's turn, or question +
    response) with the tag protocol inline. With --model, SFT runs first (cached in out_dir/sft)
    and RL starts from it; `python toy.py natural DIR` writes such traces for a real chat model."""
    sft_epochs: float = 0.0
    """Passes over the SFT traces; > 0 overrides sft_steps."""
    sft_steps: int = 4000
    """Cold-start SFT steps (paper: 3 epochs of 54K traces). The toy: 4,000 x 16 traces (~18 epochs,
    ~8.4 minutes on 2 cores): on the validation split the right tool procedure then gives the right
    answer 79-87 % of the time on seeds 0-2 (2,500 steps: 53-94 %; seed 1 could not copy digits)."""
    sft_batch_size: int = 16
    """Traces per SFT step."""
    sft_lr: float = 3e-3
    """SFT peak learning rate (paper: 7e-6 for 7B)."""
    sft_warmup: int = 30
    """SFT warm-up steps (linear), then cosine decay to 10 %."""


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


def parse_config(argv):
    """`--key=value` pairs -> Config, checked: anything a user can get wrong stops here, before
    any work, with one line and exit code 2."""
    cfg = parse_settings(Config, argv, "appo.py")
    choices = {"algo": ("appo", "grpo", "arpo"), "branch_score": ("bs", "entropy", "random"),
               "omega_anchor": ("prev", "ref", "sampler"), "dtype": ("auto", "float32", "bfloat16"),
               "report_to": ("", "tensorboard", "wandb")}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            stop("appo.py", f"--{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    checks = [
        (cfg.steps >= 0, "--steps must be >= 0"),
        (cfg.prompts_per_step >= 1 and cfg.mini_batch_prompts >= 1,
         "--prompts_per_step and --mini_batch_prompts must be >= 1"),
        (1 <= cfg.n_initial <= cfg.group_size, "need 1 <= --n_initial <= --group_size"),
        (cfg.branch_points >= 0, "--branch_points must be >= 0"),
        (cfg.temperature > 0, "--temperature must be > 0 (the loss and Eq. 3 use softmax(z / tau))"),
        (0 < cfg.top_p <= 1, "--top_p must be in (0, 1]"),
        (cfg.max_response_tokens >= 1 and cfg.gen_batch_size >= 1 and cfg.micro_batch_size >= 1,
         "--max_response_tokens, --gen_batch_size and --micro_batch_size must be >= 1"),
        (cfg.lr > 0 and cfg.sft_lr > 0, "--lr and --sft_lr must be > 0"),
        (cfg.ppo_epochs >= 1 and cfg.save_every >= 1, "--ppo_epochs and --save_every must be >= 1"),
        (cfg.half_life > 0 and cfg.dual_clip > 1, "--half_life must be > 0 and --dual_clip > 1"),
        (0 <= cfg.clip_low < 1 and cfg.clip_high >= 0, "need 0 <= --clip_low < 1 and --clip_high >= 0"),
        (cfg.dist_timeout > 0, "--dist_timeout must be > 0 (minutes)"),
        (cfg.max_tool_calls >= 0 and cfg.tool_timeout > 0,
         "--max_tool_calls must be >= 0, --tool_timeout > 0"),
        (cfg.eval_limit >= 0 and cfg.sft_steps >= 0 and cfg.sft_epochs >= 0 and cfg.sft_batch_size >= 1,
         "--eval_limit, --sft_steps and --sft_epochs must be >= 0, --sft_batch_size >= 1"),
        (not cfg.model or os.path.isdir(cfg.model) or _looks_like_hub_id(cfg.model),
         f"--model={cfg.model!r} is neither a folder nor a Hugging Face Hub id (org/name)"),
    ]
    for ok, message in checks:
        if not ok:
            stop("appo.py", message)
    for key in ("train_data", "val_data", "test_data", "sft_data", "search_corpus", "search_cache"):
        path = getattr(cfg, key)
        if path and not os.path.isfile(path):
            stop("appo.py", f"--{key}={path!r}: no such file")
    if cfg.model and not cfg.train_data:
        stop("appo.py", "--train_data is needed with --model")
    if cfg.report_to:
        import importlib.util
        if importlib.util.find_spec(cfg.report_to) is None:
            stop("appo.py", f"--report_to={cfg.report_to} needs `pip install {cfg.report_to}`")
    return cfg


def _looks_like_hub_id(name):
    """'org/name' or 'name' with Hub-legal characters, not a path a user meant as a folder."""
    return (not name.startswith((".", "/", "~")) and name.count("/") <= 1
            and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None)


@dataclass(frozen=True)
class Recipe:
    """The algorithm as named switches, resolved once from --algo and the ablation settings (spec
    section 4): every baseline and ablation is a combination of these; config.json records them."""
    initial_rollouts: int       # rollouts sampled per prompt before branching (N; GRPO: all M)
    branching: bool             # build the rollout tree (spec section 2)
    candidates: str             # "all" sampled tokens (Eqs. 3-5) | "after_tool" (ARPO: first after a result)
    branch_rule: str            # bs (Eq. 5) | entropy | random: how candidates are ranked
    keep_branch_token: bool     # a branch keeps y_t and re-samples from y_{t+1} (else re-samples y_t)
    train_branches: bool        # branches are in the loss (GRPO, ARPO) or only supply credit (APPO)
    dual_group: bool            # Eq. 6: initial and branch rollouts normalised in separate groups
    prefix_credit: bool         # Eq. 6: tokens shared with branches average both advantages
    future_weight: float        # b of Eq. 7 (0 = off)
    refill: bool                # top up a prompt short of M with fresh rollouts (ARPO at equal budget)


def resolve(cfg):
    """--algo (and the ablation settings) -> Recipe. The one place that reads cfg.algo."""
    if cfg.algo == "grpo":
        return Recipe(cfg.group_size, False, "all", cfg.branch_score, cfg.keep_branch_token, True, False,
                      False, 0.0, False)
    if cfg.algo == "arpo":                  # re-samples at its tool boundary, ranks by entropy, plain groups
        return Recipe(cfg.n_initial, True, "after_tool", "entropy", False, True, False, False, 0.0, True)
    return Recipe(cfg.n_initial, True, "all", cfg.branch_score, cfg.keep_branch_token, False, cfg.dual_group,
                  True, cfg.future_weight, False)


# ---------------------------------------------------------------------------------------------
# Reward (spec section 1): -1 for a bad format, else correctness in [0, 1]. eval.py imports it.
# ---------------------------------------------------------------------------------------------
_TAG = re.compile(r"<(/?)([A-Za-z_]\w*)>")
_RESULT_SPAN = re.compile(r" <result>\n.*?\n</result>", re.DOTALL)   # what the loop appends after a call
_BOXED = re.compile(r"\\boxed\s*\{")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# a plain number, then whitespace and unit words of 2+ letters ("18 dollars"; not "2x", "2 pi")
_NUM_WITH_UNIT = re.compile(r"^\s*(\\?\$?\s*-?[\d,]*\.?\d+)(?:\s|\\[ ,;!])+(?!pi\b)[A-Za-z]{2,}[A-Za-z .]*$")


def extract_answer(response: str) -> str | None:
    """Content of the last \\boxed{...} inside the last complete <answer>...</answer> block.

    Braces are matched, so nested ones are kept; None when there is no closed answer block,
    no \\boxed{ in it, or the box is never closed (a truncated response).
    Example: "<answer>so \\boxed{\\frac{1}{2}}</answer>" -> "\\frac{1}{2}".
    """
    end = response.rfind("</answer>")
    start = response.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    block = response[start + len("<answer>"):end]
    opens = list(_BOXED.finditer(block))
    if not opens:
        return None
    i, depth = opens[-1].end(), 1
    for j in range(i, len(block)):
        depth += {"{": 1, "}": -1}.get(block[j], 0)
        if depth == 0:
            return block[i:j].strip()
    return None


def format_error(response: str) -> str | None:
    """Why a response's format is invalid (spec section 1), or None when it is valid:
    "no_answer" (no <answer> block holding a closed \\boxed{}) or "unbalanced_tags" (outside the
    tool results, some <tag> is not closed, or closed without opening: e.g. a response cut off
    inside a call). Any tag counts, so a new tool needs no change here.
    Example: "<search>x</search> <result>\\n..\\n</result> <answer>\\boxed{1}</answer>" -> None;
             "<python>print(1)" -> "no_answer".
    """
    if extract_answer(response) is None:
        return "no_answer"
    opened = Counter()
    for slash, tag in _TAG.findall(_RESULT_SPAN.sub(" ", response)):      # the model's own text
        opened[tag] += -1 if slash else 1
    return "unbalanced_tags" if any(opened.values()) else None


def format_ok(response: str) -> bool:
    """Spec section 1: an <answer> holding a \\boxed{}, and balanced tool tags (see format_error)."""
    return format_error(response) is None


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, squeeze whitespace.

    Example: "The  Big Apple!" -> "big apple".
    """
    s = "".join(ch for ch in s.lower() if ch not in string.punctuation)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, golds: list[str]) -> float:
    """Max over gold aliases of SQuAD token-F1 between normalised prediction and alias.

    F1 = 2PR/(P+R), P = common/|pred tokens|, R = common/|gold tokens| (multiset overlap).
    Example: token_f1("New York City", ["NYC", "new york"]) -> 0.8  (P=2/3, R=1).
    """
    p_toks = normalize_answer(pred or "").split()
    best = 0.0
    for gold in golds:
        g_toks = normalize_answer(str(gold)).split()
        common = sum((Counter(p_toks) & Counter(g_toks)).values())
        if common:
            prec, rec = common / len(p_toks), common / len(g_toks)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def _light_math_norm(s: str) -> str:
    """Unwrap \\text{..}-like wrappers and drop a unit word after a plain number.

    math_verify already handles \\dfrac, 1,000, 90^\\circ, 50\\%, "10\\text{ cm}"; this only adds
    the cases it was measured to miss ("18 dollars", "\\text{10 dollars}").
    Example: "\\text{10 dollars}" -> "10".
    """
    s = _TEXT_WRAP.sub(r"\1", s.strip())
    m = _NUM_WITH_UNIT.match(s)
    return m.group(1) if m else s


def math_equal(pred: str, gold: str) -> bool:
    """Mathematical equivalence of a boxed answer and a gold answer, via math_verify.

    Cheap exact-string check first; then math_verify parse+verify on "$...$"-wrapped strings
    (numbers, fractions, sets, intervals, symbolic expressions; floats compared after rounding
    to 6 decimals). math_verify's timeouts use SIGALRM, which only works on the main thread, so
    off it the timeout is disabled. Never raises: any failure counts as not equal.
    Example: math_equal("0.5", "\\frac{1}{2}") -> True; math_equal("3", "30") -> False.
    """
    if pred is None or gold is None:
        return False
    pred, gold = _light_math_norm(str(pred)), _light_math_norm(str(gold))
    if not pred or not gold:
        return False
    if pred.replace(" ", "") == gold.replace(" ", ""):
        return True
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every unparsable answer
    try:
        g = mv_parse(f"${gold}$", parsing_timeout=timeout)
        p = mv_parse(f"${pred}$", parsing_timeout=timeout)
        return bool(g and p and mv_verify(g, p, timeout_seconds=timeout))
    except Exception:  # includes math_verify's TimeoutException and sympy errors
        return False


def compute_reward(response: str, golds: list[str], kind: str) -> dict:
    """Spec section 1 reward: -1 for an invalid format, else correctness in [0, 1].

    score is the correctness of the extracted answer whatever the format (eval reports it);
    kind "math": 1.0 if math_equal with any gold alias; kind "qa": max token-F1 over aliases.
    Returns the reward and its parts: format_ok, format_error (see format_error), score, answer.
    Example: compute_reward("<answer>\\boxed{4}</answer>", ["4"], "math")
             -> {"reward": 1.0, "format_ok": True, "format_error": None, "score": 1.0, "answer": "4"}.
    """
    if kind not in ("math", "qa"):
        raise ValueError(f"kind must be 'math' or 'qa', got {kind!r}")
    answer = extract_answer(response)
    if answer is None:
        score = 0.0
    elif kind == "math":
        score = float(any(math_equal(answer, g) for g in golds))
    else:
        score = token_f1(answer, golds)
    error = format_error(response)
    return {"reward": score if error is None else -1.0, "format_ok": error is None, "format_error": error,
            "score": score, "answer": answer}


# ---------------------------------------------------------------------------------------------
# The equations: pure functions on [B, T] tensors (Eqs. 3-8). Copy them into any trainer.
# ---------------------------------------------------------------------------------------------
# Tensors are (B, T): one row per rollout, one column per response token. `mask` is m_t (1 for
# tokens the model sampled, 0 for tool results and padding), bool or 0/1. Nothing here reads a
# config or a global; every function can be copied out on its own (with its helpers).

# Two numbers recur: exponents are clamped to [-20, 20] before exp() (exp(20) ~ 4.9e8, finite),
# and a std below 1e-6 means "all equal" (spec: std < 1e-6 gives Z = 0).


def entropy_from_logits(logits):
    """Eq. 3: H_t = -sum_v p_t(v) log p_t(v), p_t = softmax(z_t / tau), over the full vocabulary.

    The caller divides by the sampling temperature tau first, so H is the entropy of the
    distribution y_t was actually drawn from. log_softmax keeps it finite for huge logits.
    Shape (B, T, V) -> (B, T).
    Example: logits [[[0, 0], [ln 3, 0]]] -> [[ln 2, 0.5623]]  (p = [.75, .25]).
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(dim=-1)  # (B, T); p * log p -> 0 as p -> 0, no NaN


def discounted_reverse_cumsum(x, gamma):
    """Helper for Eqs. 4 and 7: y_t = sum_{k>=t} gamma^(k-t) x_k along the last dim.

    Computed backwards with y_t = x_t + gamma * y_{t+1}; differentiable, any leading shape.
    Example: x = [1, 2, 3], gamma = 0.5 -> [2.75, 3.5, 3.0].
    """
    running = torch.zeros_like(x[..., 0])  # (...,) y_{T} = 0
    out = []
    for t in reversed(range(x.shape[-1])):
        running = x[..., t] + gamma * running
        out.append(running)
    return torch.stack(out[::-1], dim=-1)  # (..., T)


def future_values(logp, old_logp, mask, half_life=32.0, clip=(1.0, 1.2)):
    """Eq. 4, clipped as Eq. 5 uses it:
    Omega_t = clip(exp(sum_{k>=t} gamma^(k-t) m_k (logp_k - old_logp_k)), clip[0], clip[1]),
    gamma = 2^(-1/half_life).

    `old_logp` is the anchor policy's log-probs (spec section 2: prev / ref / sampler). Returned
    detached: Omega only decides where to branch (and, as Afut, scales advantages in Eq. 7).
    Off-mask positions get a value too (the sum over later sampled tokens); callers use only
    m_t = 1 positions. Each log-ratio and the exponent are clamped to [-20, 20] so exp never
    overflows (a change only for log-ratios beyond +-20).
    Example: log-ratios [0.3, -0.2, 0.1], half_life = 1 (gamma = 0.5): sums [0.225, -0.15, 0.1],
             exp [1.252, 0.861, 1.105] -> Omega = [1.2, 1.0, 1.1052].
    """
    with torch.no_grad():
        gamma = 2.0 ** (-1.0 / half_life)
        log_ratio = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T)
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))  # m_k
        total = discounted_reverse_cumsum(log_ratio, gamma)  # (B, T)
        return total.clamp(-20.0, 20.0).exp().clamp(clip[0], clip[1])  # (B, T)


def zscore(x, mask):
    """Z(x)_t = (x_t - mean) / std over one row's masked positions (population std), Eq. 5.

    A row whose std < 1e-6, or with no masked position, gives 0; off-mask positions give 0.
    Example: x = [[1, 2, 3, 100]], mask = [[1, 1, 1, 0]] -> [[-1.2247, 0, 1.2247, 0]]
             (mean 2, std sqrt(2/3) = 0.8165).
    """
    m = mask.bool()
    x = torch.where(m, x.float(), torch.zeros_like(x, dtype=torch.float))  # ignore off-mask x
    n = m.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1)
    mean = x.sum(dim=-1, keepdim=True) / n  # (B, 1)
    var = (((x - mean) ** 2) * m).sum(dim=-1, keepdim=True) / n  # (B, 1) population variance
    std = var.sqrt()
    z = (x - mean) / std.clamp(min=1e-6)  # (B, T); clamp only avoids 0/0 where we return 0
    return torch.where(m & (std >= 1e-6), z, torch.zeros_like(z))


def branching_score(entropy, omega, mask):
    """Eq. 5: BS_t = Z(Omega_t) * Z(H_t), z-scores over one rollout's candidate positions.

    `omega` is already clipped to [1, 1.2] (future_values does it). Zero off the mask, and
    zero on a row where either score is constant (std ~ 0), e.g. Omega = 1 at step 1.
    Example: H = [[1, 2, 3]], Omega = [[1.0, 1.1, 1.2]] -> Z's both [-1.2247, 0, 1.2247]
             -> BS = [[1.5, 0, 1.5]].
    """
    return zscore(omega, mask) * zscore(entropy, mask)  # (B, T)


def dual_group_advantages(rewards, prompt_ids, is_branch):
    """Eq. 6 groups: A_n = (R_n - mean_G R) / (std_G R + 1e-6), G = (prompt_id, is_branch).

    One entry per rollout (1-D tensors or python lists, length R); population std. A group of one,
    or one whose rewards are all equal (std < 1e-6), gives exactly 0: guarding the std keeps rounding
    of the mean from turning equal rewards into tiny non-zero advantages. For the single-group
    ablation (dual_group = False) pass is_branch all False: then G = prompt.
    Example: prompt 0, initial rewards [1, 0], branch rewards [1, 1, 0]
             -> [1.0, -1.0, 0.7071, 0.7071, -1.4142]  (first two are +-0.999998 exactly).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64)  # float64: equal rewards stay equal
    prompt_ids, is_branch = torch.as_tensor(prompt_ids), torch.as_tensor(is_branch)  # lists welcome
    keys = torch.stack([prompt_ids.long(), is_branch.long()], dim=1)  # (R, 2)
    _, group = torch.unique(keys, dim=0, return_inverse=True)  # (R,) group id per rollout
    adv = torch.zeros_like(rewards)
    for g in group.unique():
        members = group == g
        r = rewards[members]
        std = r.std(unbiased=False)
        if std >= 1e-6:
            adv[members] = (r - r.mean()) / (std + 1e-6)
    return adv.float()


def prefix_advantages(adv, root, fork, is_branch, length):
    """Eq. 6 prefix averaging: the per-token base advantage Abase_t of each initial rollout.

    Token t of initial rollout n is shared with every branch b whose root is n and whose
    fork[b] > t (a branch keeps y_<fork and re-samples y_fork onward, spec section 2 step 4):
      Abase_t = A_n                                        if no branch shares t,
      Abase_t = (A_n + mean_{b sharing t} A_b) / 2         otherwise.
    adv, root, fork, is_branch: 1-D over all R rollouts; root[i] = index of the initial
    rollout i descends from (its own index for an initial one); fork is in root's tokens.
    Returns (R_init, length), initial rollouts in their order of appearance.
    Example: one initial rollout A = 1.0, branches forking at t = 2 (A = -1) and t = 4 (A = 0.5),
             length 5 -> [0.375, 0.375, 0.75, 0.75, 1.0].
    """
    init = (~is_branch.bool()).nonzero().squeeze(1)  # (N,) rollout index of each initial one
    branch = is_branch.bool().nonzero().squeeze(1)  # (Nb,)
    row_of = torch.full_like(root, -1)
    row_of[init] = torch.arange(len(init))  # rollout index -> row in the output
    rows = row_of[root[branch]]  # (Nb,) output row of each branch's root
    shares = torch.arange(length)[None, :] < fork[branch][:, None]  # (Nb, T) t < fork_b
    total = torch.zeros(len(init), length).index_add_(0, rows, shares * adv[branch, None].float())
    count = torch.zeros(len(init), length).index_add_(0, rows, shares.float())  # (N, T)
    own = adv[init].float()[:, None].expand(-1, length)  # (N, T) A_n^init
    return torch.where(count > 0, (own + total / count.clamp(min=1)) / 2, own)


def future_aware_advantage(advantages, logp, old_logp, mask, half_life, future_weight, dual_clip):
    """Eq. 7: Ahat_t = Abase_t * (1 + b * Afut_t), with no gradient, where
    Afut_t = clip(exp(F_t), 1, 1.2),  F_t = sum_{k>=t} gamma^(k-t) m_k p_k Delta_k,
    Delta_k = clamp(logp_k - old_logp_k, -20, 20),  p_k = [Delta_k <= log c] (c = dual_clip).

    Afut is Eq. 4's Omega with the old policy as anchor and with tokens the dual clip would
    cap left out of the sum (p_k = 0), so one runaway ratio cannot inflate every earlier token.
    b = future_weight; b = 0 is the "w/o future-aware advantage" ablation (Ahat = Abase).
    Returns (adv_hat, afut), both (B, T) and detached.
    Example: Abase = [[1, 1]], Delta = [[0.1, 0.05]], half_life = 1, b = 0.5:
             F = [0.125, 0.05], Afut = [1.1331, 1.0513] -> Ahat = [[1.5666, 1.5256]].
    """
    with torch.no_grad():
        delta = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T)
        takes_part = mask.bool() & (delta <= math.log(dual_clip))  # (B, T) m_k * p_k
        afut = future_values(logp, old_logp, takes_part, half_life, clip=(1.0, 1.2))  # (B, T)
        return advantages * (1.0 + future_weight * afut), afut


def clipped_token_loss(ratio, adv_hat, clip_low, clip_high, dual_clip):
    """Eq. 8, per token: l_t = max(-Ahat r, -Ahat clip(r, 1 - eps_low, 1 + eps_high)), and
    where Ahat < 0: l_t = min(l_t, -Ahat * c) (dual clip, c = dual_clip).

    Returns (loss, clipped, dual_clipped), all (B, T). clipped marks tokens where the clipped
    term is the larger one (it binds: r > 1 + eps_high with Ahat > 0, r < 1 - eps_low with
    Ahat < 0); dual_clipped marks tokens where the cap -Ahat * c binds. Both carry no gradient.
    Example: Ahat = [1, -1], r = [1.5, 10], eps = (0.2, 0.28), c = 3
             -> l = [-1.28 (clipped), 3.0 (dual-clipped; -Ahat r would be 10)].
    """
    unclipped = -adv_hat * ratio  # (B, T)
    clipped_term = -adv_hat * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    loss = torch.maximum(unclipped, clipped_term)
    cap = -adv_hat * dual_clip  # (B, T) only meaningful where Ahat < 0
    dual_clipped = (adv_hat < 0) & (loss > cap)
    loss = torch.where(dual_clipped, cap, loss)
    return loss, (clipped_term > unclipped).detach(), dual_clipped.detach()


def per_rollout_mean(x, mask):
    """Eq. 8 aggregation: mean over each row's m_t = 1 tokens, then mean over rows.

    Every row counts once whatever its length (token-mean would weight long rollouts more); a
    row with no m_t = 1 token contributes 0 and still counts in the row mean.
    Example: x = [[-1, -1], [2, 9]], mask = [[1, 1], [1, 0]] -> (-1 + 2) / 2 = 0.5
             (token mean would be (-1 - 1 + 2) / 3 = 0).
    """
    m = mask.float()
    row_mean = (x * m).sum(dim=-1) / m.sum(dim=-1).clamp(min=1)  # (B,)
    return row_mean.mean()


def masked_mean(x, mask):
    """Mean of x over all m_t = 1 tokens of the batch, as a python float (for metrics; 0 if none).

    Example: x = [[1, 5], [3, 7]], mask = [[1, 0], [1, 0]] -> 2.0.
    """
    m = mask.bool()
    return x.detach()[m].float().mean().item() if m.any() else 0.0


def appo_policy_loss(logp, old_logp, advantages, mask, *, half_life=32.0, future_weight=0.5,
                     clip_low=0.2, clip_high=0.28, dual_clip=3.0, ref_logp=None, kl_coef=0.0):
    """Eqs. 7-8: the APPO policy loss on initial rollouts. All inputs (B, T); advantages = Abase_t.

    Delta = clamp(logp - old_logp, -20, 20); r = exp(Delta); Ahat from Eq. 7 (no gradient);
    per-token dual-clipped PPO loss; optional + kl_coef * (exp(q) - q - 1), q = ref_logp - logp;
    aggregated per rollout then over rollouts (Eq. 8). Gradient flows only through logp.
    metrics (floats, means over all m_t = 1 tokens): loss, clipfrac, dual_clipfrac (see
    clipped_token_loss), approx_kl = mean of (r - 1) - log r (k3, >= 0), ratio/mean,
    adv_hat/mean, afut/mean, and kl when the KL term is on.
    Example: Abase = [[1, 1]], Delta = [[0.1, 0.05]], half_life = 1, defaults otherwise:
             Ahat = [1.5666, 1.5256], r = [1.1052, 1.0513]
             -> loss = -(1.7314 + 1.6039) / 2 = -1.6676.
    """
    old_logp, advantages = old_logp.detach(), advantages.detach()
    adv_hat, afut = future_aware_advantage(advantages, logp.detach(), old_logp, mask,
                                           half_life, future_weight, dual_clip)  # (B, T) each
    delta = (logp - old_logp).clamp(-20.0, 20.0)  # (B, T) log r_t, the only path to a gradient
    ratio = delta.exp()  # (B, T)
    token_loss, clipped, dual_clipped = clipped_token_loss(ratio, adv_hat, clip_low, clip_high,
                                                           dual_clip)
    metrics = {}
    if ref_logp is not None and kl_coef > 0:
        q = (ref_logp.detach() - logp).clamp(-20.0, 20.0)  # (B, T)
        kl = q.exp() - q - 1.0  # (B, T) low-variance estimator of KL(pi_theta || pi_ref)
        token_loss = token_loss + kl_coef * kl
        metrics["kl"] = masked_mean(kl, mask)
    loss = per_rollout_mean(token_loss, mask)
    metrics.update({
        "loss": loss.item(), "clipfrac": masked_mean(clipped, mask),
        "dual_clipfrac": masked_mean(dual_clipped, mask),
        "approx_kl": masked_mean(ratio - 1.0 - delta, mask), "ratio/mean": masked_mean(ratio, mask),
        "adv_hat/mean": masked_mean(adv_hat, mask), "afut/mean": masked_mean(afut, mask)})
    return loss, metrics


def select_branch_points(entropy, omega, candidates, k, rule="bs", generator=None):
    """Spec section 2 step 3: up to k branch points per rollout (row) among `candidates` (B, T).

    rule "bs": Z-scores over the row's candidates; first the strict tier Z(H) > 0 and
      Z(Omega) > 0 by BS = Z(Omega) Z(H) descending, then the rest by BS descending. Where
      Z(Omega) is 0 on every candidate (degenerate, e.g. step 1), rank by Z(H) alone.
    rule "entropy": by H descending (ablation; ARPO's rule). rule "random": uniform (generator).
    Returns points (per row, positions in rank order), priority (per row, the value ranked by;
    bs strict-tier points get +1e6 so they outrank every fill point when a caller keeps the
    global top), degenerate (B,) bool: rows ranked by Z(H) alone (always False for other rules).
    Ties keep position order. Fewer candidates than k gives all; none gives [].
    Example: H = [[0, 1, 3, 4]], Omega = [[1.0, 1.2, 1.2, 1.0]], all candidates, k = 2:
             Z(H) = [-1.26, -0.63, 0.63, 1.26], Z(Omega) = [-1, 1, 1, -1], BS = [1.26, -0.63,
             0.63, -1.26]; strict tier = {2} -> points [[2, 0]], priority [[1e6 + 0.63, 1.26]].
    """
    cand = candidates.bool()
    z_h, z_omega = zscore(entropy, cand).double(), zscore(omega, cand).double()  # (B, T)
    strict = (z_h > 0) & (z_omega > 0)  # (B, T) uncertain and consequential
    degenerate = cand.any(-1) & ~((z_omega != 0) & cand).any(-1)  # (B,) Z(Omega) all 0
    if rule != "bs":
        degenerate = torch.zeros_like(degenerate)  # only the bs rule falls back to Z(H)
    points, priority = [], []
    for row in range(cand.shape[0]):
        idx = cand[row].nonzero().squeeze(1)  # (n,) candidate positions
        if rule == "random":
            key = torch.rand(len(idx), generator=generator, dtype=torch.double)
        elif rule == "entropy":
            key = entropy[row, idx].double()
        elif rule == "bs":
            # +1e6 puts the strict tier first: |BS| <= #candidates, far below 1e6
            bs = z_h[row, idx] * z_omega[row, idx] + 1e6 * strict[row, idx]
            key = z_h[row, idx] if degenerate[row] else bs
        else:
            raise ValueError(f"rule must be 'bs', 'entropy' or 'random', got {rule!r}")
        order = torch.argsort(key, descending=True, stable=True)[:k]
        points.append(idx[order].tolist())
        priority.append(key[order].tolist())
    return points, priority, degenerate


# ---------------------------------------------------------------------------------------------
# The agent loop: batched sampling that pauses at tool calls (spec section 1)
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One response y_1..y_T to one prompt, with the tree bookkeeping of spec section 2."""
    example: int                                        # index of its question in the batch (Eq. 6's prompt)
    prompt: list                                        # prompt token ids
    tokens: list = field(default_factory=list)          # response y_1..y_T (tool results included)
    mask: list = field(default_factory=list)            # m_t: 1 sampled by the model, 0 tool result
    logp: list = field(default_factory=list)            # log pi_old(y_t | s_t) at tau, from the sampler
    entropy: list = field(default_factory=list)         # H_t of Eq. 3, from the sampler (0 on results)
    calls: list = field(default_factory=list)           # (name, payload, end): end = len(tokens) after result
    done: bool = False
    truncated: bool = False                             # ran out of response tokens
    parent: int = -1                                    # rollout it branched from (-1: initial rollout)
    root: int = -1                                      # initial rollout at the top of its lineage
    fork: int = 0                                       # y_<fork shared with the parent, new from y_fork on
    root_fork: int = 0                                  # where its lineage left the root's tokens
    text: str = ""                                      # decoded response
    reward: float = 0.0
    score: float = 0.0
    format_ok: bool = False
    format_error: str | None = None                     # truncated | no_answer | unbalanced_tags
    branch_pos: int = -1                                # t: the position it was branched at (-1: initial)
    branch_points: list = field(default_factory=list)   # positions where branches of it were made
    signals: dict = field(default_factory=dict)         # per token: omega, z_h, z_omega, bs, candidate
    adv: list = field(default_factory=list)             # per-token base advantage after Eq. 6

    @property
    def tool_calls(self):
        return len(self.calls)

    @property
    def n_generated(self):
        return sum(self.mask)                           # tokens the model sampled (results excluded)


@dataclass
class Sampling:
    """The agent loop's own settings (eval.py builds one without a training Config)."""
    temperature: float = 1.0            # tau: samples come from exactly softmax(z / tau)
    top_p: float = 1.0                  # nucleus sampling; 1.0 = off (on-policy)
    greedy: bool = False                # argmax instead of sampling (evaluation)
    max_response_tokens: int = 192      # response budget, tool results included
    max_tool_calls: int = 3             # further calls are answered with a limit message
    batch_size: int = 128               # rows sampled together


def build_prompt(tokenizer, question, kind="qa", system_prompt=None, messages=None):
    """Prompt token ids: the chat template when the tokenizer has one, else plain text (the toy).
    `messages` (a verl row's chat prompt) replaces the system prompt + question."""
    if messages is None:
        messages = [{"role": "system", "content": system_prompt or default_system_prompt(tools.toolbox())},
                    {"role": "user", "content": question}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    user = " ".join(m["content"] for m in messages if m["role"] != "system")
    return tokenizer(build_prompt_text(user, system), add_special_tokens=False)["input_ids"]


def build_prompt_text(question, system_prompt):
    """The plain-text prompt for a tokenizer without a chat template (the toy's)."""
    return f"{system_prompt}\nQuestion: {question}\n"


def default_system_prompt(box):
    """The system prompt that teaches the tag protocol, listing the tools of `box`."""
    return (f"Solve the question step by step. You can call tools: {tools.describe(box)}. Each result comes "
            "back inside <result> </result>. End with <answer> \\boxed{final answer} </answer>.")


STOPS = tools.stop_strings(["python", "search"]) + ("</answer>",)   # the default tools' stops


@functools.lru_cache(maxsize=8)
def token_texts(tokenizer):
    """The text of every token id as it reads inside a sequence (a leading space kept), decoded
    once, so the agent loop finds stop strings in O(tokens) instead of re-decoding rows."""
    probe = tokenizer.encode("a", add_special_tokens=False)[:1]
    head = tokenizer.decode(probe)
    texts = tokenizer.batch_decode([probe + [i] for i in range(len(tokenizer))])
    return [t[len(head):] if t.startswith(head) else t for t in texts]


def find_stop(tail, piece, stops=STOPS):
    """The stop string that ends inside `piece` when it is appended to `tail`, else None.

    Matching on text, not tokens, finds `</python>` however it was split, also across a
    branch's fork (`tail` holds the text before it). Example: find_stop("x</pyth", "on>") -> "</python>".
    """
    window = tail + piece
    for s in stops:
        if window.find(s, max(0, len(tail) - len(s) + 1)) >= 0:
            return s
    return None


def tail_text(tokens, texts, n=32):
    """The text of the last n tokens (enough to hold the start of any stop string)."""
    return "".join(texts[t] if t < len(texts) else "" for t in tokens[-n:])


def top_p_filter(probs, top_p):
    """Zero each row's tail outside the smallest set of tokens with probability mass >= top_p.

    Example: probs [[0.5, 0.3, 0.2]], top_p 0.7 -> [[0.5, 0.3, 0]] (multinomial renormalises).
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)           # (b, V)
    sorted_p[sorted_p.cumsum(-1) - sorted_p >= top_p] = 0.0      # mass before it already reaches top_p
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


@dataclass
class Decoding:
    """Rows being continued with one KV cache. Cache columns a row does not use (left padding, the
    tail of a longer shared prefix, steps while it waits for a tool) are holes: attention mask 0."""
    cache: object                       # transformers DynamicCache, (b, heads, W, d) per layer
    attn: torch.Tensor                  # (b, W) 1 where the column holds one of the row's tokens
    pos: torch.Tensor                   # (b,) position id of each row's next token
    logits: torch.Tensor = None         # (b, V) next-token logits after the last feed


def feed(model, d, new, pad_id):
    """Append the token list new[i] (possibly empty) to row i in one forward pass. Lists are
    left-padded with holes, so every row's last new token is the last column and its logits are
    the only ones computed (logits_to_keep=1)."""
    device = d.attn.device
    width = max(1, max(map(len, new)))
    ids = torch.tensor([[pad_id] * (width - len(x)) + list(x) for x in new], device=device)   # (b, L)
    block = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in new], device=device)  # (b, L)
    pos = d.pos[:, None] + (block.cumsum(-1) - 1).clamp(min=0)                                 # (b, L)
    d.attn = torch.cat([d.attn, block], dim=1)                                                  # (b, W + L)
    d.logits = model(input_ids=ids, attention_mask=d.attn, position_ids=pos, past_key_values=d.cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1].float()                   # (b, V)
    d.pos = d.pos + block.sum(-1)


def prefix_groups(contexts):
    """For each token list, the index of one it is a prefix of (itself if none), so the rollouts of
    one prompt, or the branches of one parent, are prefilled once.
    Example: [[1, 2], [1, 2, 3], [4], [1, 9]] -> [1, 1, 2, 3]."""
    group, reps = [0] * len(contexts), []
    for i in sorted(range(len(contexts)), key=lambda i: -len(contexts[i])):
        c = contexts[i]
        group[i] = next((j for j in reps if contexts[j][:len(c)] == c), i)
        if group[i] == i:
            reps.append(i)
    return group


def start_decoding(model, contexts, pad_id):
    """Prefill the contexts: each prefix group runs once without its last token, every row takes a
    copy of its group's cache cut to its own length (the rest masked), then each row's last token
    is fed, which gives its next-token logits. Returns (Decoding, prefill tokens computed)."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    group = prefix_groups(contexts)
    reps = sorted(set(group))
    d = Decoding(cache=DynamicCache(config=model.config), attn=torch.zeros(len(reps), 0, dtype=torch.long,
                 device=device), pos=torch.zeros(len(reps), dtype=torch.long, device=device))
    feed(model, d, [contexts[r][:-1] for r in reps], pad_id)
    idx = torch.tensor([reps.index(g) for g in group], device=device)
    d.cache.batch_select_indices(idx)
    own = torch.tensor([len(c) - 1 for c in contexts], device=device)                 # (b,) tokens kept
    d.attn = d.attn[idx] * (d.attn[idx].cumsum(-1) <= own[:, None])                    # (b, W)
    d.pos = own
    feed(model, d, [[c[-1]] for c in contexts], pad_id)
    return d, sum(len(contexts[r]) - 1 for r in reps) + len(contexts)


def keep_rows(d, keep):
    """Drop finished rows from the batch (keep: batch indices that stay)."""
    idx = torch.tensor(keep, dtype=torch.long, device=d.attn.device)
    d.cache.batch_select_indices(idx)
    d.attn, d.pos, d.logits = d.attn[idx], d.pos[idx], d.logits[idx]


def pick_tokens(logits, sampling):
    """One token per row from exactly softmax(z / tau) (top-p only when asked; argmax when greedy)
    -> (tokens, log pi(token) at tau, H of Eq. 3), each (b,)."""
    logp_all = (logits / sampling.temperature).log_softmax(-1)                        # (b, V)
    if sampling.greedy:
        tok = logits.argmax(-1)
    else:
        tok = torch.multinomial(top_p_filter(logp_all.exp(), sampling.top_p), 1)[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)                                     # Eq. 3
    return tok, logp_all.gather(-1, tok[:, None])[:, 0], entropy


def start_call(pool, box, r, tokenizer, max_calls):
    """Start the call a paused rollout asks for, in the background -> future of (name, payload,
    result). It is parsed from the whole response (a branch may have forked inside the call) and
    run with the rollout's earlier calls (the python tool's state); past max_calls nothing runs."""
    if len(r.calls) >= max_calls:
        limit = Future()
        limit.set_result((None, None, f"Error: tool-call limit ({max_calls}) reached; give your answer"))
        return limit
    text = tokenizer.decode(r.tokens, skip_special_tokens=True)
    return pool.submit(tools.run_call, box, text, [(name, payload) for name, payload, _ in r.calls])


@torch.no_grad()
def generate_rollouts(model, tokenizer, rollouts, sampling, box, cost=None):
    """The tool loop (spec section 1), batched, on one KV cache per batch: sample until a closing
    tool tag, </answer>, EOS or the budget; a rollout that stops at a tool tag waits (its call runs
    in the background at once) while the others go on; when none is sampling, the results are fed
    as masked tokens (m_t = 0) into the same cache and sampling resumes. Nothing is prefilled twice:
    not the prompt of N rollouts, not a parent's prefix for its branches, not a rollout after a call.
    `box` is the tools (tools.toolbox()). `cost` (a dict), if given, adds up the work done."""
    texts, pad = token_texts(tokenizer), tokenizer.pad_token_id
    cost = {} if cost is None else cost
    todo = [r for r in rollouts if not r.done]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for s in range(0, len(todo), sampling.batch_size):
            _generate_batch(model, tokenizer, todo[s:s + sampling.batch_size], sampling, box, pool, texts,
                            pad, cost)
    for r in rollouts:
        r.text = tokenizer.decode(r.tokens, skip_special_tokens=True)
    return rollouts


def add_token(r, t, logp, entropy, tail, texts, stops, eos_id, budget):
    """Append a sampled token to rollout r -> (why the turn stops: None, "eos", "length" or the stop
    string that just ended; the new tail text)."""
    r.tokens.append(t), r.mask.append(1), r.logp.append(logp), r.entropy.append(entropy)
    piece = texts[t] if t < len(texts) else ""
    end = "eos" if t == eos_id else find_stop(tail, piece, stops)
    if end is None and len(r.tokens) >= budget:
        end = "length"
    return end, (tail + piece)[-32:]


def add_result(r, call, tokenizer, budget):
    """Append a finished call's result to rollout r as masked tokens (m_t = 0) and record the call
    -> the result's token ids to feed, or None when the budget ran out inside the result."""
    name, payload, result = call
    ids = tokenizer(tools.format_result(result), add_special_tokens=False)["input_ids"]
    kept = ids[:budget - len(r.tokens)]
    r.tokens += kept
    r.mask += [0] * len(kept)
    r.logp += [0.0] * len(kept)
    r.entropy += [0.0] * len(kept)
    if name is not None:                                   # malformed calls and the limit are not calls
        r.calls.append((name, payload, len(r.tokens)))
    if len(kept) < len(ids) or len(r.tokens) >= budget:    # cut inside a tool result
        r.done, r.truncated = True, True
        return None
    return ids


def _generate_batch(model, tokenizer, rows, sampling, box, pool, texts, pad, cost):
    t0 = time.time()
    tool_stops = tools.stop_strings(box)
    stops = tool_stops + ("</answer>",)
    d, prefill = start_decoding(model, [r.prompt + r.tokens for r in rows], pad)
    add = lambda k, v: cost.__setitem__(k, cost.get(k, 0) + v)
    add("prefill_tokens", prefill)
    add("prefill_tokens_per_row", sum(len(r.prompt) + len(r.tokens) for r in rows))      # if rows shared nothing
    tails = [tail_text(r.tokens, texts) for r in rows]
    waiting = {}                                           # batch row -> future of its tool result
    for j, r in enumerate(rows):                           # a branch that kept a whole closing tag
        if r.tokens and r.mask[-1] and tails[j].rstrip().endswith(tool_stops):
            waiting[j] = start_call(pool, box, r, tokenizer, sampling.max_tool_calls)
    live = list(range(len(rows)))                          # batch row b holds rows[live[b]]
    while live:
        new, keep = [], []
        if len(waiting) < len(live):
            tok, logp, entropy = pick_tokens(d.logits, sampling)
            for b, (t, lp, h) in enumerate(zip(tok.tolist(), logp.tolist(), entropy.tolist())):
                j, r = live[b], rows[live[b]]
                if j in waiting:
                    new.append([]), keep.append(b)
                    continue
                end, tails[j] = add_token(r, t, lp, h, tails[j], texts, stops, tokenizer.eos_token_id,
                                          sampling.max_response_tokens)
                if end in tool_stops:
                    waiting[j] = start_call(pool, box, r, tokenizer, sampling.max_tool_calls)
                if end is None or end in tool_stops:
                    new.append([t]), keep.append(b)
                else:                                      # eos, </answer> or the budget: finished
                    r.done, r.truncated = True, end == "length"
        else:                                              # every live row waits: feed the results
            t1 = time.time()
            for b, j in enumerate(live):
                ids = add_result(rows[j], waiting.pop(j).result(), tokenizer, sampling.max_response_tokens)
                tails[j] = tail_text(rows[j].tokens, texts)
                if ids is not None:
                    new.append(ids), keep.append(b)
            add("tool_wait_s", time.time() - t1)
        if keep and len(keep) < len(live):
            keep_rows(d, keep)
        live = [live[b] for b in keep]
        if live:
            feed(model, d, new, pad)
    add("generate_s", time.time() - t0)


def run_agent(model, tokenizer, prompts, sampling, box, cost=None):
    """Answer each prompt (token ids) once with the tool loop. Used by evaluation and eval.py."""
    rollouts = [Rollout(example=i, prompt=list(p), root=i) for i, p in enumerate(prompts)]
    return generate_rollouts(model, tokenizer, rollouts, sampling, box, cost)


# ---------------------------------------------------------------------------------------------
# Log-probabilities of responses under a policy (the branching score and the loss share it)
# ---------------------------------------------------------------------------------------------
def pad_batch(rollouts, pad_id, device):
    """Prompts left-padded and responses right-padded, so response position t is column P + t."""
    P = max(len(r.prompt) for r in rollouts)
    T = max(max(len(r.tokens) for r in rollouts), 1)
    ids, attn, mask = [], [], []
    for r in rollouts:
        p, t = len(r.prompt), len(r.tokens)
        ids.append([pad_id] * (P - p) + r.prompt + r.tokens + [pad_id] * (T - t))
        attn.append([0] * (P - p) + [1] * (p + t) + [0] * (T - t))
        mask.append(r.mask + [0] * (T - t))
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt, device=device)
    return as_tensor(ids, torch.long), as_tensor(attn, torch.long), as_tensor(mask, torch.float), P


def _chunk_logp(hidden, targets, head, temperature, with_entropy):
    """log softmax(head(hidden) / tau)[targets] (and H) for one chunk: (b, c, d) -> (b, c)."""
    logits = head(hidden).float() / temperature                                # (b, c, V)
    logz = logits.logsumexp(-1)                                                # (b, c)
    logp = logits.gather(-1, targets[..., None])[..., 0] - logz                # (b, c)
    if not with_entropy:
        return logp, None
    logp_all = logits - logz[..., None]                                        # (b, c, V)
    return logp, -(logp_all.exp() * logp_all).sum(-1)                          # H, as the sampler computes it


def response_logprobs(model, rollouts, temperature, pad_id, chunk=1024, with_entropy=False):
    """log pi(y_t | s_t) at temperature tau for every response token -> (logp, entropy, mask),
    each (b, T); entropy (Eq. 3) only when asked, without gradient.

    Memory: the vocabulary-sized logits are built from the final hidden states `chunk` tokens
    (rows x positions) at a time, and with gradients on each chunk is recomputed in the
    backward pass (checkpointing), so one chunk's float32 logits exist at a time instead of
    several (b, T, V) copies. Models that post-process their logits (soft-capping, scaling)
    take the plain full-logits path.
    """
    device = next(model.parameters()).device
    ids, attn, mask, P = pad_batch(rollouts, pad_id, device)
    b, T = mask.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                                 # RoPE positions skip left pads
    post = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    if any(getattr(model.config, k, None) for k in post):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=T + 1).logits[:, :-1].float() / temperature
        logp = logits.log_softmax(-1).gather(-1, ids[:, P:, None])[..., 0]
        return logp, entropy_from_logits(logits.detach()) if with_entropy else None, mask
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos,
                              use_cache=False).last_hidden_state[:, P - 1:-1]  # (b, T, d): predicts y_t
    head, targets, step = model.get_output_embeddings(), ids[:, P:], max(1, chunk // b)
    logps, ents = [], []
    for s in range(0, T, step):
        args = (hidden[:, s:s + step], targets[:, s:s + step], head, temperature, with_entropy)
        if torch.is_grad_enabled():
            lp, h = torch.utils.checkpoint.checkpoint(_chunk_logp, *args, use_reentrant=False)
        else:
            lp, h = _chunk_logp(*args)
        logps.append(lp)
        ents.append(h.detach() if with_entropy else None)
    return torch.cat(logps, 1), torch.cat(ents, 1) if with_entropy else None, mask


@torch.no_grad()
def score_rollouts(model, rollouts, temperature, pad_id, micro_batch, chunk):
    """log pi(y_t) of each rollout under `model`, in micro-batches -> list of 1-D CPU tensors."""
    out = []
    for i in range(0, len(rollouts), micro_batch):
        part = rollouts[i:i + micro_batch]
        logp, _, _ = response_logprobs(model, part, temperature, pad_id, chunk)
        out += [logp[j, :len(r.tokens)].float().cpu() for j, r in enumerate(part)]
    return out


def stack_rows(rows, T=None):
    """List of 1-D tensors -> right-padded (b, T) tensor."""
    T = T or max(max(len(x) for x in rows), 1)
    return torch.stack([F.pad(torch.as_tensor(x).float(), (0, T - len(x))) for x in rows])


# ---------------------------------------------------------------------------------------------
# The rollout tree (spec section 2): N rollouts, branch at the top-B points, until M per prompt
# ---------------------------------------------------------------------------------------------
def branch_from(parent, index, t, keep_token=True):
    """A branch of `parent` (rollout `index`) at position t, spec section 2 step 4.

    keep_token (default, the revised rule): keep y_<=t and re-sample from y_{t+1}; the branches
    then estimate the value of having chosen y_t, and Eq. 6 gives y_t their credit. A tool
    result right after y_t is kept too (the same call gives the same result), so the first
    re-sampled token is always one the model writes. keep_token=False: keep y_<t, re-sample y_t.
    The branch's python state is the calls in its prefix. `fork` = first re-sampled position.
    """
    fork = t + 1 if keep_token else t
    while keep_token and fork < len(parent.tokens) and not parent.mask[fork]:
        fork += 1
    return Rollout(
        example=parent.example, prompt=parent.prompt, tokens=parent.tokens[:fork], mask=parent.mask[:fork],
        logp=parent.logp[:fork], entropy=parent.entropy[:fork],
        calls=[c for c in parent.calls if c[2] <= fork], parent=index, root=parent.root, fork=fork,
        root_fork=fork if parent.parent < 0 else parent.root_fork, branch_pos=t)


def candidate_mask(rollouts, content_ids, keep_token=True, after_tool_only=False):
    """Where a branch may fork (spec section 2): sampled tokens (m_t = 1) that are not whitespace
    or punctuation, before the rollout's last sampled token (something must be left to re-sample),
    and in a branch only among its own new tokens. after_tool_only (ARPO): only the first
    sampled token after each tool result."""
    rows = []
    for r in rollouts:
        m = torch.tensor(r.mask, dtype=torch.bool)
        tok = torch.tensor(r.tokens, dtype=torch.long)
        known = tok < len(content_ids)                           # a model vocab can exceed the tokenizer's
        ok = m & known & content_ids[tok.clamp(max=len(content_ids) - 1)]
        if after_tool_only:
            ok = torch.zeros_like(m)
            ok[1:] = m[1:] & ~m[:-1]
        sampled = m.nonzero()
        ok[int(sampled[-1]) if len(sampled) else 0:] = False
        if r.parent >= 0:
            ok[:r.fork + (0 if keep_token else 1)] = False
        rows.append(ok)
    return stack_rows(rows).bool()


def per_prompt(rollouts, n_prompts):
    """How many rollouts each prompt has so far."""
    count = [0] * n_prompts
    for r in rollouts:
        count[r.example] += 1
    return count


@contextlib.contextmanager
def on_device(model, device):
    """Move a frozen copy (the Eq. 4 anchor, the KL reference) to `device` for the block and back
    to the CPU after, so it takes accelerator memory only while it is used."""
    if model is None or device.type == "cpu":
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to("cpu")


def branch_round(model, anchor, rollouts, frontier, count, cfg, recipe, content_ids, pad_id, stats):
    """One round of spec section 2 on the newest rollouts (`frontier`): Eqs. 3-5 score their
    candidates (H_t and log pi come from the sampler), the top-B per rollout are picked, and where
    a prompt would overshoot M the globally best points are kept. -> the new branches (not sampled)."""
    rows = [rollouts[i] for i in frontier]
    score = lambda m: score_rollouts(m, rows, cfg.temperature, pad_id, cfg.micro_batch_size, cfg.logit_chunk)
    if recipe.branch_rule != "bs":
        logp = anchor_logp = [torch.tensor(r.logp) for r in rows]          # Omega unused
    elif cfg.omega_anchor == "sampler":
        logp, anchor_logp = score(model), [torch.tensor(r.logp) for r in rows]
    else:
        with on_device(anchor, next(model.parameters()).device):
            logp, anchor_logp = [torch.tensor(r.logp) for r in rows], score(anchor)
    mask, entropy = stack_rows([r.mask for r in rows]), stack_rows([r.entropy for r in rows])
    omega = future_values(stack_rows(logp), stack_rows(anchor_logp), mask, half_life=cfg.half_life)   # Eq. 4
    cands = candidate_mask(rows, content_ids, recipe.keep_branch_token, recipe.candidates == "after_tool")
    points, priority, degenerate = select_branch_points(entropy, omega, cands, cfg.branch_points,
                                                        rule=recipe.branch_rule)   # Eq. 5, top-B
    stats["tree/omega_degenerate"] += int(degenerate.sum())
    stats["tree/scored"] += int(cands.any(-1).sum())                         # rows that could branch
    stats["tree/rounds"] += 1
    record_signals(rows, entropy, omega, cands)
    by_prompt, new = {}, []
    for i, pts, pri in zip(frontier, points, priority):
        for t, p in zip(pts, pri):
            by_prompt.setdefault(rollouts[i].example, []).append((p, i, t))
    for ex, cand in by_prompt.items():
        cand.sort(key=lambda c: -c[0])
        for _, i, t in cand[:cfg.group_size - count[ex]]:
            new.append(branch_from(rollouts[i], i, t, recipe.keep_branch_token))
            rollouts[i].branch_points.append(t)
    return new


def expand_tree(model, anchor, tokenizer, prompts, cfg, recipe, box, content_ids):
    """All rollouts of one RL step: N per prompt, then rounds of branching until M per prompt.
    Returns (rollouts with the initial ones first, statistics of the tree and of what it cost)."""
    sampling, cost = sampling_of(cfg), {}
    rollouts = [Rollout(example=i, prompt=p) for i, p in enumerate(prompts)
                for _ in range(recipe.initial_rollouts)]
    for i, r in enumerate(rollouts):
        r.root = i
    generate_rollouts(model, tokenizer, rollouts, sampling, box, cost)
    frontier = list(range(len(rollouts)))
    stats = {"tree/omega_degenerate": 0, "tree/scored": 0, "tree/rounds": 0}
    while frontier and recipe.branching:
        count = per_prompt(rollouts, len(prompts))
        frontier = [i for i in frontier if count[rollouts[i].example] < cfg.group_size]
        new = branch_round(model, anchor, rollouts, frontier, count, cfg, recipe, content_ids,
                           tokenizer.pad_token_id, stats) if frontier else []
        if not new:
            break
        generate_rollouts(model, tokenizer, new, sampling, box, cost)
        frontier = list(range(len(rollouts), len(rollouts) + len(new)))
        rollouts += new
    if recipe.refill:   # Decision: ARPO's shortfall (rollouts without tool calls) -> fresh rollouts
        count = per_prompt(rollouts, len(prompts))
        extra = [Rollout(example=e, prompt=prompts[e]) for e in range(len(prompts))
                 for _ in range(cfg.group_size - count[e])]
        for j, r in enumerate(extra):
            r.root = len(rollouts) + j
        generate_rollouts(model, tokenizer, extra, sampling, box, cost)
        rollouts += extra
    stats["cost/prefill_tokens"] = cost.get("prefill_tokens", 0)
    stats["cost/prefill_tokens_per_row"] = cost.get("prefill_tokens_per_row", 0)
    stats.update({f"time/{k}": cost.get(k, 0) for k in ("generate_s", "tool_wait_s")})
    return rollouts, stats


def record_signals(rows, entropy, omega, candidates):
    """Keep each scored rollout's per-token Eq. 4-5 values for the tree page and the metrics."""
    z_h, z_omega = zscore(entropy, candidates), zscore(omega, candidates)
    bs = branching_score(entropy, omega, candidates)
    for j, r in enumerate(rows):
        n = len(r.tokens)
        r.signals = {"omega": omega[j, :n].tolist(), "z_h": z_h[j, :n].tolist(), "bs": bs[j, :n].tolist(),
                     "z_omega": z_omega[j, :n].tolist(), "candidate": candidates[j, :n].int().tolist()}


def sampling_of(cfg, greedy=False):
    """The agent loop's settings out of a training Config."""
    return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, greedy=greedy,
                    max_response_tokens=cfg.max_response_tokens, max_tool_calls=cfg.max_tool_calls,
                    batch_size=cfg.gen_batch_size)


# ---------------------------------------------------------------------------------------------
# Credit and update (spec section 3)
# ---------------------------------------------------------------------------------------------
def rollout_advantages(rollouts, recipe):
    """Base advantage per token for the rollouts that are trained -> (trained rollouts, rows).
    With prefix credit (APPO): Eq. 6 groups (dual or one), prefix-averaged on the initial rollouts,
    which alone are trained. Without (GRPO, ARPO): one group per prompt, every rollout trained, one
    value per rollout."""
    R = torch.tensor([r.reward for r in rollouts])
    prompt = torch.tensor([r.example for r in rollouts])
    is_branch = torch.tensor([r.parent >= 0 for r in rollouts])
    if not recipe.prefix_credit:
        adv = dual_group_advantages(R, prompt, torch.zeros_like(is_branch))
        rows = [torch.full((len(r.tokens),), float(a)) for r, a in zip(rollouts, adv)]
        for r, a in zip(rollouts, rows):
            r.adv = a.tolist()
        return rollouts, rows
    adv = dual_group_advantages(R, prompt, is_branch if recipe.dual_group else torch.zeros_like(is_branch))
    root = torch.tensor([r.root for r in rollouts])
    fork = torch.tensor([r.root_fork for r in rollouts])
    T = max(max(len(r.tokens) for r in rollouts), 1)
    per_token = prefix_advantages(adv, root, fork, is_branch, T)              # (N_init, T)
    train = [r for r in rollouts if r.parent < 0]                             # initial rollouts come first
    rows = [per_token[i, :len(r.tokens)] for i, r in enumerate(train)]
    for r, a in zip(train, rows):
        r.adv = a.tolist()
    for r, a in zip(rollouts, adv.tolist()):
        if r.parent >= 0:
            r.adv = [a] * len(r.tokens)                                       # branches: their own A_b
    return train, rows


def ppo_update(model, optimizer, train, advs, ref_logps, cfg, recipe, pad_id):
    """PPO mini-batches over prompts, micro-batches for memory; one optimizer step per mini-batch.
    pi_old is the sampler's log-probs (same weights, nothing recomputed). Forward passes run
    under autocast when cfg.dtype asks for bf16; weights and optimizer state stay float32.
    A non-finite loss or gradient skips that optimizer step and is counted."""
    device = next(model.parameters()).device
    by_prompt = {}
    for i, r in enumerate(train):
        by_prompt.setdefault(r.example, []).append(i)
    sums, n_rows, skipped, updates, norms = {}, 0, 0, 0, []
    for _ in range(cfg.ppo_epochs):
        order = list(by_prompt)
        random.shuffle(order)
        for start in range(0, len(order), cfg.mini_batch_prompts):
            idx = [i for e in order[start:start + cfg.mini_batch_prompts] for i in by_prompt[e]]
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for m0 in range(0, len(idx), cfg.micro_batch_size):
                micro = idx[m0:m0 + cfg.micro_batch_size]
                with autocast(device, cfg.dtype):
                    logp, _, mask = response_logprobs(model, [train[i] for i in micro], cfg.temperature,
                                                      pad_id, cfg.logit_chunk)
                T = logp.shape[1]
                row = lambda xs: stack_rows([xs[i] for i in micro], T).to(device)
                loss, metrics = appo_policy_loss(
                    logp, row([r.logp for r in train]), row(advs), mask, half_life=cfg.half_life,
                    future_weight=recipe.future_weight, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    dual_clip=cfg.dual_clip, ref_logp=row(ref_logps) if ref_logps else None,
                    kl_coef=cfg.kl_coef)
                if not torch.isfinite(loss):
                    finite = False
                    break
                (loss * len(micro) / len(idx)).backward()                      # Eq. 8: mean over rollouts
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * len(micro)
                n_rows += len(micro)
            finite = sync_gradients(model, finite, len(idx))                   # torchrun: mean over ranks
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if finite else None
            if not finite or not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)                              # free them until the next
            updates += 1
            norms.append(float(grad_norm))
    out = {f"loss/{k}": v / max(n_rows, 1) for k, v in sums.items()}
    out.update({"update/skipped_nonfinite": skipped, "update/optimizer_steps": updates,
                "update/grad_norm": sum(norms) / len(norms) if norms else 0.0})
    return out


# ---------------------------------------------------------------------------------------------
# Cold-start SFT (the paper's first stage): traces with the tag protocol inline
# ---------------------------------------------------------------------------------------------
def trace_segments(response):
    """An SFT response -> [(text, is_tool_result)], split at its ` <result>\n...\n</result>` spans
    (exactly what the agent loop appends after a call, so tokens split the same way as in RL).
    Example: "<python>print(1)</python> <result>\n1\n</result> <answer>\\boxed{1}</answer>"
             -> [("<python>print(1)</python>", False), (" <result>\n1\n</result>", True),
                 (" <answer>\\boxed{1}</answer>", False)].
    """
    parts, pos = [], 0
    for m in _RESULT_SPAN.finditer(response):
        parts += [(response[pos:m.start()], False), (m.group(0), True)]
        pos = m.end()
    parts.append((response[pos:], False))
    return [(text, is_result) for text, is_result in parts if text]


def sft_rollout(tokenizer, prompt, response):
    """One SFT example as a Rollout: the response's own text is m_t = 1 (trained), its tool results
    m_t = 0, and EOS closes the turn. Each segment is tokenised alone, as the agent loop does."""
    r = Rollout(example=0, prompt=prompt)
    for text, is_result in trace_segments(response):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r.tokens += ids
        r.mask += [0 if is_result else 1] * len(ids)
    r.tokens.append(tokenizer.eos_token_id)
    r.mask.append(1)
    return r


def sft(model, rows, *, steps, batch_size, lr, warmup, seed, pad_id, dtype="float32", desc="sft"):
    """Cold-start SFT: next-token loss on the m_t = 1 tokens of `rows` (Rollouts), mean over tokens.

    AdamW (betas 0.9 / 0.95), linear warm-up for `warmup` steps, then cosine decay to 10 % of lr;
    batches drawn with a seeded generator. Returns the per-step losses."""
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    shape = lambda s: (min(1.0, (s + 1) / max(warmup, 1))
                       * (0.55 + 0.45 * math.cos(math.pi * s / max(steps, 1))))   # warm-up, cosine to 10 %
    sched = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    model.train()
    losses, bar = [], progress(range(steps), desc=desc)
    for _ in bar:
        batch = rng.sample(rows, min(batch_size, len(rows)))
        with autocast(device, dtype):
            logp, _, mask = response_logprobs(model, batch, 1.0, pad_id)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def build_toy(cfg):
    """The embedded default (toy.py): world, tokenizer, tiny model and cold-start SFT, each cached
    in out_dir. -> (SFT checkpoint dir, splits {sft, rl, val, test})."""
    import toy
    sizes = {"test": cfg.toy_test_size, "val": cfg.toy_val_size, "rl": cfg.toy_rl_size,
             "sft": cfg.toy_sft_size}
    splits, corpus, init = toy.build(
        cfg.toy_dir or cfg.out_dir, cfg.seed, sizes, cfg.toy_wrong_rate, cfg.toy_error_rate, cfg.toy_hidden,
        cfg.toy_layers, cfg.toy_heads,
        prompt_text=lambda q: build_prompt_text(q, toy.SYSTEM_PROMPT))
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
        if format_error(row["response"]) == "unbalanced_tags":
            raise DataError(f"{where}: the response's tags do not balance (every <tag> needs its </tag>)")
        out.append({"messages": row.get("messages"), "question": row["question"],
                    "kind": row.get("kind", "qa"), "response": row["response"]})
    if not out:
        raise DataError(f"{path}: no traces")
    return out


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
    losses = sft(model, rows, steps=steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                 warmup=cfg.sft_warmup, seed=cfg.seed, pad_id=tokenizer.pad_token_id, dtype=cfg.dtype)
    save_hf(model, tokenizer, sft_dir)
    if losses:
        print(f"cold-start SFT: {steps} steps on {len(rows)} traces, "
              f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return sft_dir


# ---------------------------------------------------------------------------------------------
# Infrastructure: data, models, checkpoints, logging (kept out of the math)
# ---------------------------------------------------------------------------------------------
def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def progress(iterable=None, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, mininterval=1.0, **kw)


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():                               # under torchrun: this rank's GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = True      # generation still uses the KV cache
    model.eval()
    return model, tokenizer


def make_search(cfg):
    """The search tool from the settings (cache first, then corpus or URL), or None."""
    if not (cfg.search_corpus or cfg.search_url or cfg.search_cache):
        return None
    return tools.Search(corpus=cfg.search_corpus or None, url=cfg.search_url or None,
                        cache=cfg.search_cache or None, topk=cfg.search_topk)


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


def example_prompt(tokenizer, ex, cfg):
    return build_prompt(tokenizer, ex["question"], ex["kind"], cfg.system_prompt, ex.get("messages"))


def content_token_mask(tokenizer):
    """(len(tokenizer),) bool: tokens with a letter or digit in them (whitespace and punctuation
    cannot branch). Ids beyond the tokenizer (a model vocab padded past it) count as False."""
    return torch.tensor([any(ch.isalnum() for ch in t) for t in token_texts(tokenizer)], dtype=torch.bool)


def save_hf(model, tokenizer, path, extra=None):
    """Write a Hugging Face checkpoint (plus `extra` torch state) atomically: a crash at any moment
    leaves the previous one at `path`, or at `path`.old mid-swap, which load_checkpoint also finds."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        torch.save(extra, os.path.join(tmp, "trainer_state.pt"))
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


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def answer_metrics(examples, rollouts, k=1):
    """Metrics of answers: rollouts[i * k + j] is sample j for examples[i]. Per question type
    (the toy's `type`, else math / qa): accuracy (mean score), tool calls per answer; the share of
    bad formats by cause (truncated, no_answer, unbalanced_tags); tokens the model generated per
    answer; with k > 1, pass@k (a question counts when any sample scores >= 1)."""
    out, by_type = {}, {}
    for i, ex in enumerate(examples):
        by_type.setdefault(ex.get("type", ex["kind"]), []).append(i)
    for r in rollouts:
        ex = examples[r.example]
        res = compute_reward(r.text, ex["answer"], ex["kind"])
        r.reward, r.score, r.format_ok = res["reward"], res["score"], res["format_ok"]
        r.format_error = "truncated" if r.truncated and not r.format_ok else res["format_error"]
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    out["acc"] = mean([r.score for r in rollouts])
    for t, idx in sorted(by_type.items()):
        mine = [rollouts[i * k + j] for i in idx for j in range(k)]
        out[f"acc/{t}"] = mean([r.score for r in mine])
        out[f"tool_calls/{t}"] = mean([r.tool_calls for r in mine])
        if k > 1:
            out[f"pass@{k}/{t}"] = mean([any(rollouts[i * k + j].score >= 1 for j in range(k)) for i in idx])
    if k > 1:
        out[f"pass@{k}"] = mean([any(rollouts[i * k + j].score >= 1 for j in range(k))
                                 for i in range(len(examples))])
    for cause in ("truncated", "no_answer", "unbalanced_tags"):
        out[f"bad_format/{cause}"] = mean([r.format_error == cause for r in rollouts])
    out["tokens/answer"] = mean([sum(r.mask) for r in rollouts])
    return out


def evaluate(model, tokenizer, examples, cfg, box, desc="eval", samples=1):
    """The tool agent on `examples` -> answer_metrics: greedy (samples=1, pass@1) or `samples`
    answers per question at the training temperature (pass@k). Under torchrun each rank answers
    every world-th question and every rank gets the metrics of all of them: no rank idles in a
    collective while one evaluates alone, and N GPUs evaluate N times as fast."""
    rank, world = rank_world()
    mine = list(range(rank, len(examples), world))
    rollouts = answer(model, tokenizer, [examples[i] for i in mine], cfg, box, desc, samples)
    for r in rollouts:
        r.example = mine[r.example]
    if world > 1:                                      # what answer_metrics reads, not per-token lists
        light = [dataclasses.replace(r, tokens=[], logp=[], entropy=[], signals={}) for r in rollouts]
        rollouts = sorted((r for part in gather(light) for r in part), key=lambda r: r.example)
    return answer_metrics(examples, rollouts, samples)


def answer(model, tokenizer, examples, cfg, box, desc, samples):
    """`samples` answers per example in gen_batch_size batches; rollout i * samples + j is sample j of
    examples[i] (its `example`)."""
    model.eval()
    sampling = sampling_of(cfg, greedy=samples == 1)
    device = next(model.parameters()).device
    prompts = [example_prompt(tokenizer, e, cfg) for e in examples for _ in range(samples)]
    rollouts, bar = [], progress(total=len(prompts), desc=desc, disable=rank_world()[0] > 0)
    for i in range(0, len(prompts), cfg.gen_batch_size):
        with autocast(device, cfg.dtype):
            part = run_agent(model, tokenizer, prompts[i:i + cfg.gen_batch_size], sampling, box)
        for j, r in enumerate(part):
            r.example = (i + j) // samples
        rollouts += part
        bar.update(len(part))
    bar.close()
    return rollouts


def frozen_copy(model):
    """A gradient-free copy of the policy kept on the CPU (moved to the accelerator only to score)."""
    twin = copy.deepcopy(model).to("cpu").eval()
    twin.requires_grad_(False)
    return twin


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


# ---------------------------------------------------------------------------------------------
# main: the algorithm box of the paper
# ---------------------------------------------------------------------------------------------
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
        model_path, splits = build_toy(cfg)
        train, val, test = train or splits["rl"], val or splits["val"], test or splits["test"]
    test = (test or [])[:cfg.eval_limit] if cfg.eval_limit else (test or [])
    return model_path, train, val or [], test


def step_metrics(step, batch, rollouts, tree, update, seconds):
    """One line of metrics.jsonl: reward and its parts, accuracy / tool calls / bad formats by
    question type, the tree, what the step cost, the update. Names are namespaced."""
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    by_type = {}
    for r in rollouts:
        by_type.setdefault(batch[r.example].get("type", batch[r.example]["kind"]), []).append(r)
    sampled = [h for r in rollouts for h, m in zip(r.entropy[r.fork:], r.mask[r.fork:]) if m]
    m = {"step": step, "reward/mean": mean([r.reward for r in rollouts]),
         "reward/score": mean([r.score for r in rollouts]),
         "reward/format_ok": mean([r.format_ok for r in rollouts]),
         "acc/initial": mean([r.score for r in rollouts if r.parent < 0])}
    m.update({f"acc/{t}": mean([r.score for r in rs]) for t, rs in sorted(by_type.items())})
    m.update({f"tools/calls_{t}": mean([r.tool_calls for r in rs]) for t, rs in sorted(by_type.items())})
    for cause in ("truncated", "no_answer", "unbalanced_tags"):
        m[f"format/{cause}"] = mean([r.format_error == cause for r in rollouts])
    m.update({"tree/rollouts": len(rollouts), "tree/branches": sum(r.parent >= 0 for r in rollouts),
              **tree,
              "cost/tokens_generated": sum(sum(r.mask[r.fork:]) for r in rollouts),
              "cost/tool_calls": sum(sum(1 for c in r.calls if c[2] > r.fork) for r in rollouts),
              "policy/entropy": mean(sampled), **update,
              **{f"time/{k}_s": round(v, 3) for k, v in seconds.items()}})
    return m


def rollout_record(r, index, texts):
    """One rollout for the tree page: its tokens as text and every per-token signal (report.py)."""
    sig = r.signals
    return {"id": index[id(r)], "parent": index.get(r.parent, -1), "root": index.get(r.root, -1),
            "fork": r.fork,
            "branch_pos": r.branch_pos, "tokens": [texts[t] if t < len(texts) else "" for t in r.tokens],
            "mask": r.mask, "entropy": r.entropy, "omega": sig.get("omega"), "z_h": sig.get("z_h"),
            "z_omega": sig.get("z_omega"), "bs": sig.get("bs"), "candidate": sig.get("candidate"),
            "adv": r.adv or None, "branch_points": r.branch_points, "reward": r.reward, "score": r.score,
            "format_ok": r.format_ok, "tool_calls": r.tool_calls, "truncated": r.truncated,
            "trained": bool(r.adv)}


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


@dataclass
class Run:
    """What a training run holds between steps (infrastructure, kept out of the math)."""
    cfg: Config
    recipe: Recipe
    model: object
    tokenizer: object
    optimizer: object
    anchor: object                      # pi_anchor of Eq. 4 (a CPU copy; None for the sampler anchor)
    ref: object                         # the initial policy, for the KL term or the ref anchor
    box: dict                           # the tools
    start: int = 0                      # last finished step (a resumed run goes on from it)
    before: dict = None                 # the SFT checkpoint's evaluation, measured once
    rank: int = 0                       # this process under torchrun (0 alone logs, evaluates, saves)

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
            print(f"resumed from {ckpt} at step {run.start}")
    elif rank == 0 and os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)
    return run


def save_checkpoint(run, step):
    """HF checkpoint + optimizer, anchor, every rank's RNG and the SFT evaluation, atomically (see
    save_hf), written by rank 0."""
    rngs = gather(rng_state())
    if run.rank == 0:
        save_hf(run.model, run.tokenizer, os.path.join(run.cfg.out_dir, "ckpt"), extra={
            "step": step, "optimizer": run.optimizer.state_dict(), "before": run.before, "rng": rngs,
            "anchor": run.anchor.state_dict() if run.cfg.omega_anchor == "prev" else None})
    barrier()


def log_step(run, step, batch, rollouts, tree, update, seconds, reporter):
    """metrics.jsonl (and the optional mirror), the tree page every tree_every steps, and at each
    checkpoint the curves and the run's index page."""
    cfg, texts = run.cfg, token_texts(run.tokenizer)
    m = step_metrics(step, batch, rollouts, tree, update, seconds)
    m.update(report.fork_statistics([rollout_record(r, {id(r): 0}, texts) for r in rollouts]))
    m = combine_ranks(gather(m))
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
        if run.rank == 0:
            report.plot_curves(read_jsonl(run.metrics_path), os.path.join(cfg.out_dir, "curves.png"))
            report.write_index(cfg.out_dir)


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


def step_batch(train, cfg, step):
    """The step's prompts: a sample of the train split drawn from (seed, step) alone, so a resumed run
    draws what the uninterrupted one did."""
    order = random.Random(cfg.seed * 1_000_003 + step).sample(range(len(train)), min(cfg.prompts_per_step,
                                                                                      len(train)))
    return [train[i] for i in order]


def evaluate_sft(run, val, test):
    """The starting checkpoint: greedy accuracy on test, pass@k on validation (rank 0 prints)."""
    m, tok, cfg = run.model, run.tokenizer, run.cfg
    before = {"test": evaluate(m, tok, test, cfg, run.box, "test, before RL") if test else {},
              "val": evaluate(m, tok, val, cfg, run.box, f"val pass@{cfg.pass_k}", cfg.pass_k)
              if val and cfg.pass_k > 1 else {}}
    if run.rank == 0:
        print(f"before RL: test accuracy {before['test'].get('acc', float('nan')):.3f}, "
              f"val pass@{cfg.pass_k} {before['val'].get(f'pass@{cfg.pass_k}', float('nan')):.3f}")
    return before


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world = launched()                                    # (0, 1) unless torchrun
    if cfg.prompts_per_step % world or cfg.mini_batch_prompts % world:
        stop("appo.py", f"--prompts_per_step and --mini_batch_prompts must be multiples of the {world} processes")
    recipe, local = resolve(cfg), dataclasses.replace(cfg, mini_batch_prompts=cfg.mini_batch_prompts // world)
    seed_everything(cfg.seed)
    t_start = time.time()
    store = launch_store(cfg.dist_timeout)
    model_path, train, val, test = rank0_first(lambda: load_data(cfg), rank, store)   # toy world, SFT
    init_distributed(pick_device(cfg.device), cfg.dist_timeout, store)
    run = start_run(cfg, recipe, model_path, rank, world)
    model, tokenizer, device = run.model, run.tokenizer, next(run.model.parameters()).device
    content_ids, reporter = content_token_mask(tokenizer), make_reporter(cfg) if rank == 0 else None
    run.before = run.before or evaluate_sft(run, val, test)    # every rank answers its share
    for step in range(run.start + 1, cfg.steps + 1):
        batch = step_batch(train, cfg, step)[rank::world]       # whole prompts per rank: Eq. 6 groups stay whole
        ##### rollout tree (spec section 2; Eqs. 3-5 choose the branch points) #####
        t0 = time.time()
        model.eval()
        with autocast(device, cfg.dtype):
            prompts = [example_prompt(tokenizer, e, cfg) for e in batch]
            rollouts, tree = expand_tree(model, run.anchor, tokenizer, prompts, cfg, recipe, run.box,
                                         content_ids)
        ##### reward #####
        t1 = time.time()
        answer_metrics(batch, rollouts)                         # sets reward, score, format_ok / _error
        ##### advantages (Eq. 6) #####
        train_rows, advs = rollout_advantages(rollouts, recipe)
        ref_logps = None
        if cfg.kl_coef > 0:
            with on_device(run.ref, device), autocast(device, cfg.dtype):
                ref_logps = score_rollouts(run.ref, train_rows, cfg.temperature, tokenizer.pad_token_id,
                                           cfg.micro_batch_size, cfg.logit_chunk)
        ##### update (Eqs. 7-8) #####
        t2 = time.time()
        if cfg.omega_anchor == "prev":                          # next step's anchor: the weights before it
            run.anchor.load_state_dict(model.state_dict())
        model.train()
        update = ppo_update(model, run.optimizer, train_rows, advs, ref_logps, local, recipe,
                            tokenizer.pad_token_id)
        model.eval()
        ##### log / checkpoint #####
        log_step(run, step, batch, rollouts, tree, update,
                 {"rollout": t1 - t0, "reward": t2 - t1, "update": time.time() - t2}, reporter)
    ##### final evaluation #####
    after = evaluate(model, tokenizer, test, cfg, run.box, "test, after RL") if test else {}
    if rank > 0:
        return barrier()
    save_hf(model, tokenizer, os.path.join(cfg.out_dir, "final"))
    summary = write_summary(cfg, run.before, after, run.metrics_path, time.time() - t_start)
    barrier()
    return summary


def write_summary(cfg, before, after, metrics_path, wall_s):
    """summary.json: what the run measured, identical for the same command and seed on one machine
    (timings go to timing.json, the one thing that differs between two runs)."""
    rows = read_jsonl(metrics_path) if os.path.exists(metrics_path) else []
    mean = lambda k: round(sum(m[k] for m in rows) / len(rows), 4) if rows else None
    summary = {"algo": cfg.algo, "seed": cfg.seed, "steps": cfg.steps, "before_rl": before, "after_rl": after,
               "gain": {k: round(after[k] - before["test"][k], 4) for k in after if k.startswith("acc")},
               "rl": {"tokens_generated_per_step": mean("cost/tokens_generated"),
                      "tool_calls_per_step": mean("cost/tool_calls"), "grad_norm": mean("update/grad_norm"),
                      "skipped_nonfinite": sum(m["update/skipped_nonfinite"] for m in rows)}}
    timing = {"wall_s": round(wall_s, 1), **{k: round(sum(m[k] for m in rows), 1)
                                             for k in (rows[0] if rows else {}) if k.startswith("time/")}}
    for name, obj in (("summary.json", summary), ("timing.json", timing)):
        with open(os.path.join(cfg.out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    if after:
        kinds = ", ".join(f"{k[4:]} {before['test'][k]:.2f} -> {after[k]:.2f}"
                          for k in after if k.startswith("acc/"))
        print(f"held-out accuracy: before RL {before['test']['acc']:.3f}, after RL {after['acc']:.3f} "
              f"({kinds})")
    print(json.dumps(timing))
    return summary


if __name__ == "__main__":
    main()
