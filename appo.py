"""
APPO: Agentic Procedural Policy Optimization (arXiv 2606.12384): the algorithm, in one file.

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

Order of this file, the algorithm top to bottom: settings (Config, Recipe), the reward and evaluation,
the equations (pure functions, Eqs. 3-8), the rollout tree (Eqs. 3-5 choose where to branch), credit
(Eq. 6), the update (Eqs. 7-8), main(). The machinery lives beside it: agent.py (the KV-cached agent
loop and log-probs of responses), runtime.py (settings parsing, data, SFT, devices, torchrun,
checkpoints, logging), tools.py, toy.py (the embedded default's world), report.py (the tree page).
"""
import dataclasses
import logging
import math
import os
import random
import re
import string
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from math_verify import parse as mv_parse, verify as mv_verify

import tools
from agent import entropy_from_logits  # noqa: F401  (Eq. 3, computed where tokens are sampled)
from agent import (Rollout, Sampling, content_token_mask, example_prompt, generate_rollouts,
                   response_logprobs, run_agent, score_rollouts, stack_rows)
from runtime import (Clock, autocast, gather, init_distributed, launch_store, launched, leave_distributed,
                     load_data, log_heldout, log_step, make_reporter, on_device, optimizer_step, parse_settings,
                     pick_device, progress, rank0_first, rank_world, save_hf, seed_everything, start_run,
                     step_batch, stop, write_summary, _looks_like_hub_id)


# ---------------------------------------------------------------------------------------------
# Settings: one dataclass, `python appo.py --key=value`. Defaults are the embedded CPU run;
# each docstring gives the paper's value (and its reference code's) where it differs.
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
    results_as_ready: bool = False
    """Feed each tool result into the agent loop as soon as its call returns, while the other rows keep
    sampling (faster with slow tools). Off by default: which step a result enters then depends on tool
    timing, so sampled runs are not repeatable bit for bit (greedy ones are)."""

    # --- rollout tree (Eqs. 3-5) ---
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
    """True: a branch at t keeps the chosen token y_t and re-samples from y_{t+1} (a README Decision;
    the reference code does it too), so the uncertain fork token gets the branches' credit (Eq. 6).
    False: re-sample y_t itself (the earlier rule, kept as an ablation)."""
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
    """Sampling temperature tau (also used in Eq. 3 and the loss). Paper code: 1.0. The toy: 0.7, chosen
    on its validation split (RESULTS.md)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1.0 = off). Below 1 the policy is the nucleus-filtered,
    renormalised softmax(z / tau): the sampler records its log-probs and the trainer scores the same."""
    max_response_tokens: int = 192
    """Response budget incl. tool results. Paper: 4096 reasoning / 8192 deep search; toy: 192."""
    gen_batch_size: int = 128
    """Sequences generated together (lower it for big models)."""
    logit_chunk: int = 1024
    """Response positions per chunk when log-probs are computed for training: one chunk's
    (micro_batch, chunk, vocab) float32 logits exist at a time, recomputed in the backward pass."""

    # --- update (Eqs. 6-8) ---
    steps: int = 100
    """RL steps (the toy: 100)."""
    prompts_per_step: int = 8
    """Prompts per RL step. Paper: 128 (code: 96)."""
    mini_batch_prompts: int = 4
    """Prompts per PPO mini-batch (one optimizer step each). Paper: 16."""
    ppo_epochs: int = 1
    """Passes over the step's rollouts."""
    micro_batch_size: int = 32
    """Rollouts per forward/backward; gradients accumulate over a mini-batch. Lower it on a GPU."""
    recompute_logp: bool = True
    """pi_old of Eqs. 7-8 and the policy side of Eq. 4 from the trainer's own forward pass (as verl
    recomputes old log-probs), not from the sampler's KV-cached decoding, so both sides of every ratio
    are one computation (README Decisions). The two paths agree to ~1e-6 in float32 but differ by up to
    ~2e-2 under bf16 autocast (measured on CPU; how much depends on the kernels). Costs a no-grad
    forward pass over the rollouts of every PPO mini-batch but the first (that one's own loss pass is
    pi_old), and one over the rollouts being branched.
    False: the sampler's values (exact only in float32)."""
    lr: float = 2.5e-4
    """AdamW learning rate. Paper code: 1e-6 for 7B; the 0.6M-parameter toy needs far more: 2.5e-4,
    chosen on its validation split, the same for every algorithm (RESULTS.md)."""
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
    train_branches: bool = False
    """appo: also train each branch's own tokens, from its fork on, with its Eq. 6 branch-group
    advantage A_b (the tokens before the fork are trained once, through the rollout they were copied
    from). False (paper and reference code): only the N initial rollouts enter the loss, and the
    branches supply credit through Eq. 6's prefix averaging. ARPO, TreeRL and TreePO train every leaf."""
    advantage_scale: float = 1.0
    """Every advantage times this before Eqs. 7-8: a control, not part of the method. With Afut near 1,
    Eq. 7 at b = 0.5 mostly multiplies every advantage by 1.5; b = 0 with 1.5 here separates that
    uniform factor (to which AdamW is nearly blind) from Eq. 7's reweighting (README Decisions)."""
    kl_coef: float = 0.0
    """beta for KL(pi_theta || pi_ref). Paper: 0 (code: 0.001)."""
    eval_every: int = 10
    """RL steps between held-out evaluations during training: greedy accuracy on a fixed subset of the
    validation split (eval_size questions), before step 1, every eval_every steps and after the last;
    logged as heldout/* in metrics.jsonl beside cum/tokens_generated and cum/seconds. 0 = none."""
    eval_size: int = 200
    """Validation questions in that subset (the first ones of val_data; 0 = all). The toy: 200 of its
    300, a standard error of ~3.5 points per point of the curve."""
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
    toy_filler: bool = False
    """The pilot question's setting: the SFT teacher writes one filler word (toy.FILLER, drawn
    uniformly) before every action, e.g. " now<search>Kalove</search>": high entropy after SFT
    (~ln 8 nats) but no consequence for the reward, beside the real decisions. Off: the default world.
    A cached world of the other setting is refused (use another --toy_dir)."""
    toy_hidden: int = 128
    """Hidden size of the toy model (0.61M parameters in all)."""
    toy_layers: int = 3
    """Layers of the toy model."""
    toy_heads: int = 4
    """Attention heads of the toy model."""
    sft_data: str = ""
    """Cold-start SFT traces (JSONL: chat `messages` ending with the assistant's turn, or question +
    response) with the tag protocol inline. With --model, SFT runs first (cached in out_dir/sft)
    and RL starts from it; `python toy.py natural DIR` writes such traces for a real chat model."""
    sft_epochs: float = 0.0
    """Passes over the SFT traces; > 0 overrides sft_steps."""
    sft_steps: int = 3000
    """Cold-start SFT steps (paper: 3 epochs of 54K traces). The toy: 3,000 x 16 traces (~13 epochs),
    chosen on its validation split so that the tool mechanics are reliable on every seed (RESULTS.md)."""
    sft_batch_size: int = 16
    """Traces per SFT step."""
    sft_lr: float = 3e-3
    """SFT peak learning rate (paper: 7e-6 for 7B)."""
    sft_warmup: int = 30
    """SFT warm-up steps (linear), then cosine decay to 10 %."""


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
        (cfg.eval_every >= 0 and cfg.eval_size >= 0, "--eval_every and --eval_size must be >= 0"),
        (cfg.advantage_scale > 0, "--advantage_scale must be > 0"),
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


@dataclass(frozen=True)
class Recipe:
    """The algorithm as named switches, resolved once from --algo and the ablation settings
    (README "Settings"): every baseline and ablation is a combination of these; config.json records them."""
    initial_rollouts: int       # rollouts sampled per prompt before branching (N; GRPO: all M)
    branching: bool             # build the rollout tree (Eqs. 3-5)
    candidates: str             # "all" sampled tokens (Eqs. 3-5) | "after_tool" (ARPO: first after a result)
    branch_rule: str            # bs (Eq. 5) | entropy | random: how candidates are ranked
    keep_branch_token: bool     # a branch keeps y_t and re-samples from y_{t+1} (else re-samples y_t)
    dual_group: bool            # Eq. 6: initial and branch rollouts normalised in separate groups
    prefix_credit: bool         # Eq. 6 prefix averaging; only initial rollouts trained (else all, one A each)
    future_weight: float        # b of Eq. 7 (0 = off)
    refill: bool                # top up a prompt short of M with fresh rollouts (ARPO at equal budget)
    train_branches: bool = False    # with prefix credit: branches train their own tokens with A_b too
    advantage_scale: float = 1.0    # every advantage times this (a control for Eq. 7's uniform part)


def resolve(cfg):
    """--algo (and the ablation settings) -> Recipe. The one place that reads cfg.algo."""
    if cfg.algo == "grpo":
        return Recipe(cfg.group_size, False, "all", cfg.branch_score, cfg.keep_branch_token, False,
                      False, 0.0, False, advantage_scale=cfg.advantage_scale)
    if cfg.algo == "arpo":                  # re-samples at its tool boundary, ranks by entropy, plain groups
        return Recipe(cfg.n_initial, True, "after_tool", "entropy", False, False, False, 0.0, True,
                      advantage_scale=cfg.advantage_scale)
    return Recipe(cfg.n_initial, True, "all", cfg.branch_score, cfg.keep_branch_token, cfg.dual_group,
                  True, cfg.future_weight, False, cfg.train_branches, cfg.advantage_scale)


# ---------------------------------------------------------------------------------------------
# Reward (the paper's outcome reward): -1 for a bad format, else correctness in [0, 1]. eval.py imports it.
# ---------------------------------------------------------------------------------------------
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
    """Why a response's format is invalid, or None when it is valid:
    "no_answer" (no <answer> block holding a closed \\boxed{}) or "unbalanced_tags" (outside the
    tool results, some <tag> is not closed, or closed without opening: e.g. a response cut off
    inside a call). Any tag counts, so a new tool needs no change here.
    Example: "<search>x</search> <result>\\n..\\n</result> <answer>\\boxed{1}</answer>" -> None;
             "<python>print(1)" -> "no_answer".
    """
    if extract_answer(response) is None:
        return "no_answer"
    return "unbalanced_tags" if tools.unbalanced_tags(response) else None


def format_ok(response: str) -> bool:
    """A valid format: an <answer> holding a \\boxed{}, and balanced tool tags (see format_error)."""
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
    """The paper's reward: -1 for an invalid format, else correctness in [0, 1].

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
# Evaluation: the reward of a batch of answers, and the agent answering held-out questions
# ---------------------------------------------------------------------------------------------
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


def evaluate(model, tokenizer, examples, cfg, toolbox, desc="eval", samples=1):
    """The tool agent on `examples` -> answer_metrics: greedy (samples=1, pass@1) or `samples`
    answers per question at the training temperature (pass@k). Under torchrun each rank answers
    every world-th question and every rank gets the metrics of all of them: no rank idles in a
    collective while one evaluates alone, and N GPUs evaluate N times as fast."""
    rank, world = rank_world()
    mine = list(range(rank, len(examples), world))
    rollouts = answer(model, tokenizer, [examples[i] for i in mine], cfg, toolbox, desc, samples)
    for r in rollouts:
        r.example = mine[r.example]
    if world > 1:                                      # what answer_metrics reads, not per-token lists
        light = [dataclasses.replace(r, tokens=[], logp=[], entropy=[], signals={}) for r in rollouts]
        rollouts = sorted((r for part in gather(light) for r in part), key=lambda r: r.example)
    return answer_metrics(examples, rollouts, samples)


def answer(model, tokenizer, examples, cfg, toolbox, desc, samples):
    """`samples` answers per example in gen_batch_size batches; rollout i * samples + j is sample j of
    examples[i] (its `example`)."""
    model.eval()
    sampling = sampling_of(cfg, greedy=samples == 1)
    device = next(model.parameters()).device
    prompts = [example_prompt(tokenizer, e, cfg) for e in examples for _ in range(samples)]
    rollouts, bar = [], progress(total=len(prompts), desc=desc, disable=rank_world()[0] > 0)
    for i in range(0, len(prompts), cfg.gen_batch_size):
        with autocast(device, cfg.dtype):
            part = run_agent(model, tokenizer, prompts[i:i + cfg.gen_batch_size], sampling, toolbox)
        for j, r in enumerate(part):
            r.example = (i + j) // samples
        rollouts += part
        bar.update(len(part))
    bar.close()
    return rollouts


def heldout_metrics(run, examples):
    """The learning curve's point (--eval_every): greedy accuracy on the fixed validation subset ->
    {"heldout/acc": .., "heldout/<type>": ..} (one key per question type or kind)."""
    m = evaluate(run.model, run.tokenizer, examples, run.cfg, run.toolbox, "held-out curve (val)")
    return {f"heldout/{k[4:] if k.startswith('acc/') else k}": v for k, v in m.items()
            if k == "acc" or k.startswith("acc/")}


def evaluate_sft(run, val, test):
    """The starting checkpoint: greedy accuracy on test, pass@k on validation (rank 0 prints)."""
    model, tokenizer, cfg = run.model, run.tokenizer, run.cfg
    before = {"test": evaluate(model, tokenizer, test, cfg, run.toolbox, "test, before RL") if test else {},
              "val": evaluate(model, tokenizer, val, cfg, run.toolbox, f"val pass@{cfg.pass_k}", cfg.pass_k)
              if val and cfg.pass_k > 1 else {}}
    if run.rank == 0:
        print(f"before RL: test accuracy {before['test'].get('acc', float('nan')):.3f}, "
              f"val pass@{cfg.pass_k} {before['val'].get(f'pass@{cfg.pass_k}', float('nan')):.3f}")
    return before


# ---------------------------------------------------------------------------------------------
# The equations: pure functions on [B, T] tensors (Eqs. 3-8). Copy them into any trainer.
# ---------------------------------------------------------------------------------------------
# Tensors are (B, T): one row per rollout, one column per response token. `mask` is m_t (1 for
# tokens the model sampled, 0 for tool results and padding), bool or 0/1. Nothing here reads a
# config or a global; every function can be copied out on its own (with its helpers).

# Eq. 3 (the entropy H_t) is computed where tokens are sampled: agent.entropy_from_logits.
# Two numbers recur: exponents are clamped to [-20, 20] before exp() (exp(20) ~ 4.9e8, finite),
# and a std below 1e-6 means "all equal" (Z = 0 then; a README Decision).


def discount_matrix(n, gamma, dtype=torch.float64, device=None):
    """M[k, t] = gamma^(k - t) for k >= t, else 0, so (x @ M)_t = sum_{k>=t} gamma^(k-t) x_k.
    Example: n = 3, gamma = 0.5 -> [[1, 0, 0], [.5, 1, 0], [.25, .5, 1]]."""
    i = torch.arange(n, device=device)
    lag = i[:, None] - i[None, :]                                       # (n, n) k - t
    powers = torch.tensor(gamma, dtype=dtype, device=device) ** lag.clamp(min=0).to(dtype)
    return torch.where(lag >= 0, powers, torch.zeros((), dtype=dtype, device=device))


def discounted_reverse_cumsum(x, gamma, chunk=128):
    """Helper for Eqs. 4 and 7: y_t = sum_{k>=t} gamma^(k-t) x_k along the last dim.

    No loop over T: the last dim is cut into chunks of `chunk`; one matrix product sums within
    each chunk, a second carries each chunk's start value back over the chunks before it
    (gamma^chunk per chunk), and y_t = (its chunk's sum) + gamma^(chunk end - t) * (the next
    chunk's start). Computed in float64 (float32 on MPS, which has no float64), so the result
    is the float64 sum rounded to x's dtype; powers that underflow (gamma^4096 = 2^-128 at the
    default half-life, a term too small to matter) are 0 or subnormal, never inf or NaN.
    Differentiable, any leading shape, 0 <= gamma <= 1.
    Example: x = [1, 2, 3], gamma = 0.5 -> [2.75, 3.5, 3.0].
    """
    T = x.shape[-1]
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    c = max(1, min(chunk, T))
    n = -(-T // c)                                                      # chunks
    xs = F.pad(x.to(dtype), (0, n * c - T)).unflatten(-1, (n, c))       # (..., n, c) zeros after T add 0
    inside = xs @ discount_matrix(c, gamma, dtype, x.device)            # (..., n, c) sums within a chunk
    starts = inside[..., 0] @ discount_matrix(n, gamma ** c, dtype, x.device)   # (..., n) y at chunk starts
    later = F.pad(starts[..., 1:], (0, 1))                              # (..., n) y at the next chunk's start
    g = torch.tensor(gamma, dtype=dtype, device=x.device)
    to_end = g ** torch.arange(c, 0, -1, dtype=dtype, device=x.device)  # (c,) gamma^(c - t)
    y = inside + later[..., None] * to_end                              # (..., n, c)
    return y.flatten(-2)[..., :T].to(x.dtype)


def future_values(logp, old_logp, mask, half_life=32.0, clip=(1.0, 1.2)):
    """Eq. 4, clipped as Eq. 5 uses it:
    Omega_t = clip(exp(sum_{k>=t} gamma^(k-t) m_k (logp_k - old_logp_k)), clip[0], clip[1]),
    gamma = 2^(-1/half_life).

    `old_logp` is the anchor policy's log-probs (prev / ref / sampler: a README Decision). Returned
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


TIER = 1e6   # rank offset of the strict tier in Eq. 5's ordering: |BS| <= #candidates, far below it


def branching_score(entropy, omega, mask):
    """Eq. 5, and the order branch points are taken in: BS_t = Z(Omega_t) * Z(H_t), z-scores over
    one rollout's candidate positions (`mask`). `omega` is already clipped to [1, 1.2] (Eq. 4).

    Returns (bs, rank, degenerate):
      bs (B, T): Z(Omega) Z(H), 0 off the mask;
      rank (B, T) float64, what select_branch_points sorts by (ties in position order): first the
        uncertain *and* consequential points, Z(H) > 0 and Z(Omega) > 0 (+TIER), then the rest, each
        tier by BS; on a degenerate row, where Z(Omega) is 0 on every candidate (Omega constant, as
        at step 1 when the anchor equals the policy), by Z(H) alone;
      degenerate (B,) bool.
    Example: H = [[1, 2, 3]], Omega = [[1.0, 1.1, 1.2]] -> Z's both [-1.2247, 0, 1.2247]
             -> bs = [[1.5, 0, 1.5]], rank = [[1.5, 0, 1e6 + 1.5]] (only t = 2 is in the tier).
    """
    cand = mask.bool()
    z_h, z_omega = zscore(entropy, cand).double(), zscore(omega, cand).double()  # (B, T)
    bs = z_h * z_omega  # (B, T)
    degenerate = cand.any(-1) & ~((z_omega != 0) & cand).any(-1)  # (B,) Z(Omega) all 0
    strict = (z_h > 0) & (z_omega > 0)  # (B, T) uncertain and consequential
    rank = torch.where(degenerate[:, None], z_h, bs + TIER * strict)  # (B, T)
    return bs, rank, degenerate


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
    fork[b] > t (a branch keeps y_<fork and re-samples y_fork onward, README Decisions):
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
    adv_hat/mean, afut/mean, the shares of tokens with Afut > 1.01 and at its cap 1.2 (how much Eq. 7
    can reweight), and kl when the KL term is on.
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
        "adv_hat/mean": masked_mean(adv_hat, mask), "afut/mean": masked_mean(afut, mask),
        "afut/above_1.01": masked_mean(afut > 1.01, mask), "afut/at_cap": masked_mean(afut >= 1.2 - 1e-6, mask)})
    return loss, metrics


def select_branch_points(entropy, omega, candidates, k, rule="bs", generator=None):
    """Up to k branch points per rollout (row) among `candidates` (B, T), best first.

    rule "bs": by Eq. 5's rank (branching_score: strict tier, then BS; Z(H) on degenerate rows).
    rule "entropy": by H descending (ablation; ARPO's rule). rule "random": uniform (generator).
    Returns points (per row, positions in rank order), priority (per row, the rank values, which
    compare across rows when a caller keeps the global top), degenerate (B,) bool (always False
    for the other rules). Ties keep position order. Fewer candidates than k gives all; none, [].
    Example: H = [[0, 1, 3, 4]], Omega = [[1.0, 1.2, 1.2, 1.0]], all candidates, k = 2:
             Z(H) = [-1.26, -0.63, 0.63, 1.26], Z(Omega) = [-1, 1, 1, -1], BS = [1.26, -0.63,
             0.63, -1.26]; strict tier = {2} -> points [[2, 0]], priority [[1e6 + 0.63, 1.26]].
    """
    cand = candidates.bool()
    if rule == "bs":
        _, rank, degenerate = branching_score(entropy, omega, cand)
    elif rule in ("entropy", "random"):
        rank, degenerate = entropy.double(), torch.zeros(cand.shape[0], dtype=torch.bool)
    else:
        raise ValueError(f"rule must be 'bs', 'entropy' or 'random', got {rule!r}")
    points, priority = [], []
    for row in range(cand.shape[0]):
        idx = cand[row].nonzero().squeeze(1)  # (n,) candidate positions
        key = rank[row, idx]
        if rule == "random":
            key = torch.rand(len(idx), generator=generator, dtype=torch.double)
        order = torch.argsort(key, descending=True, stable=True)[:k]
        points.append(idx[order].tolist())
        priority.append(key[order].tolist())
    return points, priority, degenerate


# ---------------------------------------------------------------------------------------------
# The rollout tree: N rollouts, branch at the top-B points, until M per prompt
# ---------------------------------------------------------------------------------------------
def branch_from(parent, index, t, keep_token=True):
    """A branch of `parent` (rollout `index`) at position t (README Decisions).

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


def candidate_mask(rollouts, content_mask, keep_token=True, after_tool_only=False):
    """Where a branch may fork: sampled tokens (m_t = 1) that are not whitespace
    or punctuation, before the rollout's last sampled token (something must be left to re-sample),
    and in a branch only among its own new tokens. after_tool_only (ARPO): only the first
    sampled token after each tool result."""
    rows = []
    for r in rollouts:
        m = torch.tensor(r.mask, dtype=torch.bool)
        tok = torch.tensor(r.tokens, dtype=torch.long)
        known = tok < len(content_mask)                           # a model vocab can exceed the tokenizer's
        ok = m & known & content_mask[tok.clamp(max=len(content_mask) - 1)]
        if after_tool_only:
            ok = torch.zeros_like(m)
            ok[1:] = m[1:] & ~m[:-1]
        sampled = m.nonzero()
        ok[int(sampled[-1]) if len(sampled) else 0:] = False
        if r.parent >= 0:
            ok[:r.fork + (0 if keep_token else 1)] = False
        rows.append(ok)
    return stack_rows(rows).bool()


def per_prompt(rollouts):
    """How many rollouts each prompt (its `example` index) has so far; 0 for a prompt with none."""
    return Counter(r.example for r in rollouts)


def tree_signals(model, anchor, rows, cfg, recipe, pad_id):
    """Eqs. 3-4 on the rollouts about to be branched -> (H_t, Omega_t, m_t), each (B, T). H_t is the
    sampler's (the distribution y_t was drawn from); both sides of Omega come from the trainer's forward
    pass (cfg.recompute_logp: an anchor equal to the policy gives exactly 1, README Decisions)."""
    score = lambda m: score_rollouts(m, rows, cfg.temperature, pad_id, cfg.micro_batch_size, cfg.logit_chunk,
                                     top_p=cfg.top_p)
    sampled = [torch.tensor(r.logp) for r in rows]
    if recipe.branch_rule != "bs":
        logp = anchor_logp = sampled                                        # Omega unused
    elif cfg.omega_anchor == "sampler":                                     # reference-code parity
        logp, anchor_logp = score(model), sampled
    else:
        logp = score(model) if cfg.recompute_logp else sampled
        with on_device(anchor, next(model.parameters()).device):
            anchor_logp = score(anchor)
    mask, entropy = stack_rows([r.mask for r in rows]), stack_rows([r.entropy for r in rows])
    omega = future_values(stack_rows(logp), stack_rows(anchor_logp), mask, half_life=cfg.half_life)   # Eq. 4
    return entropy, omega, mask


def pick_branch_points(model, anchor, rows, cfg, recipe, content_mask, pad_id):
    """Eqs. 3-5 on finished rollouts: H and Omega per token (tree_signals), the candidates, and each
    rollout's top-B by Eq. 5's rank; the signals are kept on the rollouts (record_signals).
    -> (points and priority per rollout, as select_branch_points; counts for the step metrics)."""
    entropy, omega, _ = tree_signals(model, anchor, rows, cfg, recipe, pad_id)
    cands = candidate_mask(rows, content_mask, recipe.keep_branch_token, recipe.candidates == "after_tool")
    points, priority, degenerate = select_branch_points(entropy, omega, cands, cfg.branch_points,
                                                        rule=recipe.branch_rule)   # Eq. 5, top-B
    record_signals(rows, entropy, omega, cands)
    return points, priority, {"tree/omega_degenerate": int(degenerate.sum()),     # scored: could branch
                              "tree/scored": int(cands.any(-1).sum())}


def branch_round(model, anchor, rollouts, frontier, cfg, recipe, content_mask, pad_id):
    """One round of branching on the newest rollouts (`frontier`, indices into `rollouts`): each rollout's
    top-B points (pick_branch_points); where a prompt would overshoot M the globally best points are kept.
    -> (the new branches, not yet sampled; this round's counts for the step metrics)."""
    rows = [rollouts[i] for i in frontier]
    points, priority, stats = pick_branch_points(model, anchor, rows, cfg, recipe, content_mask, pad_id)
    stats["tree/rounds"] = 1
    count, by_prompt, new = per_prompt(rollouts), {}, []
    for i, pts, pri in zip(frontier, points, priority):
        for t, p in zip(pts, pri):
            by_prompt.setdefault(rollouts[i].example, []).append((p, i, t))
    for ex, cand in by_prompt.items():
        cand.sort(key=lambda c: -c[0])
        for _, i, t in cand[:cfg.group_size - count[ex]]:
            new.append(branch_from(rollouts[i], i, t, recipe.keep_branch_token))
            rollouts[i].branch_points.append(t)
    return new, stats


def branch_as_finished(model, anchor, rollouts, cfg, recipe, content_mask, pad_id, stats):
    """The first round of branching, streamed: generate_rollouts' on_finish hook. The initial rollouts
    that finish at a decoding step get their top-B points at once (pick_branch_points), and their
    branches are sampled in the same batch while the other rollouts still run. The points are those
    branch_round would pick with all N rollouts finished: Eqs. 3-5 z-score within each rollout, and
    the per-prompt cut cannot bind in this round when B N <= M - N (expand_tree checks). Branches end
    there (one round). -> (the hook, the list its branches go to, in the order they were made)."""
    index, branches = {id(r): i for i, r in enumerate(rollouts)}, []

    def on_finish(done):
        rows, kids = [r for r in done if id(r) in index], {}            # initial rollouts, not branches
        if rows:
            points, _, counts = pick_branch_points(model, anchor, rows, cfg, recipe, content_mask, pad_id)
            for k, v in counts.items():
                stats[k] += v
            for r, pts in zip(rows, points):
                kids[id(r)] = [branch_from(r, index[id(r)], t, recipe.keep_branch_token) for t in pts]
                r.branch_points += pts
                branches.extend(kids[id(r)])
        return [kids.get(id(r), []) for r in done]
    return on_finish, branches


def expand_tree(model, anchor, tokenizer, prompts, cfg, recipe, toolbox, content_mask):
    """All rollouts of one RL step: N per prompt, then rounds of branching until M per prompt.

    The first round is streamed when its per-prompt cut cannot bind, B N <= M - N (the paper's
    M = (B + 1) N): each initial rollout is branched as soon as it finishes and its branches join the
    running batch (branch_as_finished), so none waits for the slowest initial rollout. With M < (B + 1) N
    the round keeps each prompt's globally best points and waits for all N (branch_round). Later rounds
    (a prompt still short of M: rollouts with fewer than B candidates, as ARPO's, or M > (B + 1) N) and
    ARPO's refill need the whole previous round, so they run round by round after it.
    Returns (rollouts: the initial ones first, then each round's branches, those of the streamed round
    by parent, best point first; statistics of the tree and of what it cost)."""
    sampling, cost, pad = sampling_of(cfg), {}, tokenizer.pad_token_id
    rollouts = [Rollout(example=i, prompt=p) for i, p in enumerate(prompts)
                for _ in range(recipe.initial_rollouts)]
    for i, r in enumerate(rollouts):
        r.root = i
    stats = {"tree/omega_degenerate": 0, "tree/scored": 0, "tree/rounds": 0}
    if recipe.branching and recipe.initial_rollouts * (cfg.branch_points + 1) <= cfg.group_size:
        hook, new = branch_as_finished(model, anchor, rollouts, cfg, recipe, content_mask, pad, stats)
        held = anchor if recipe.branch_rule == "bs" and cfg.omega_anchor != "sampler" else None  # Omega's
        with on_device(held, next(model.parameters()).device):        # once for the tree, not per row
            generate_rollouts(model, tokenizer, rollouts, sampling, toolbox, cost, on_finish=hook)
        stats["tree/rounds"] = 1
        frontier = list(range(len(rollouts), len(rollouts) + len(new)))
        rollouts += sorted(new, key=lambda b: b.parent)                 # stable: each parent's best first
    else:
        generate_rollouts(model, tokenizer, rollouts, sampling, toolbox, cost)
        frontier = list(range(len(rollouts)))
    branch_s = cost.get("on_finish_s", 0)
    while frontier and recipe.branching:
        count = per_prompt(rollouts)
        frontier = [i for i in frontier if count[rollouts[i].example] < cfg.group_size]
        t0 = time.time()
        new, counts = branch_round(model, anchor, rollouts, frontier, cfg, recipe, content_mask,
                                   pad) if frontier else ([], {})
        branch_s += time.time() - t0
        for k, v in counts.items():
            stats[k] += v
        if not new:
            break
        generate_rollouts(model, tokenizer, new, sampling, toolbox, cost)
        frontier = list(range(len(rollouts), len(rollouts) + len(new)))
        rollouts += new
    if recipe.refill:   # Decision: ARPO's shortfall (rollouts without tool calls) -> fresh rollouts
        count = per_prompt(rollouts)
        extra = [Rollout(example=e, prompt=prompts[e]) for e in range(len(prompts))
                 for _ in range(cfg.group_size - count[e])]
        for j, r in enumerate(extra):
            r.root = len(rollouts) + j
        generate_rollouts(model, tokenizer, extra, sampling, toolbox, cost)
        rollouts += extra
    stats["cost/prefill_tokens"] = cost.get("prefill_tokens", 0)
    stats["cost/prefill_tokens_per_row"] = cost.get("prefill_tokens_per_row", 0)
    stats["cost/decode_steps"] = cost.get("decode_steps", 0)
    stats.update({f"time/{k}": cost.get(k, 0) for k in ("generate_s", "tool_wait_s")})
    stats["time/branch_s"] = branch_s                                   # Eqs. 3-5: scoring and choosing
    return rollouts, stats


def record_signals(rows, entropy, omega, candidates):
    """Keep each scored rollout's per-token Eq. 4-5 values for the tree page and the metrics: `bs` is
    what Eq. 5 ranked the candidates by within their tier (BS, or Z(H) on a degenerate rollout), `tier`
    marks the uncertain-and-consequential points that come first."""
    z_h, z_omega = zscore(entropy, candidates), zscore(omega, candidates)
    _, rank, _ = branching_score(entropy, omega, candidates)
    tier = rank >= TIER / 2
    ranked = (rank - TIER * tier).float()
    for j, r in enumerate(rows):
        n = len(r.tokens)
        r.signals = {"omega": omega[j, :n].tolist(), "z_h": z_h[j, :n].tolist(), "bs": ranked[j, :n].tolist(),
                     "tier": tier[j, :n].int().tolist(), "z_omega": z_omega[j, :n].tolist(),
                     "candidate": candidates[j, :n].int().tolist()}


def sampling_of(cfg, greedy=False):
    """The agent loop's settings out of a training Config."""
    return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, greedy=greedy,
                    max_response_tokens=cfg.max_response_tokens, max_tool_calls=cfg.max_tool_calls,
                    batch_size=cfg.gen_batch_size, results_as_ready=cfg.results_as_ready)


# ---------------------------------------------------------------------------------------------
# Credit (Eq. 6) and the update (Eqs. 7-8)
# ---------------------------------------------------------------------------------------------
def rollout_advantages(rollouts, recipe):
    """Base advantage per token for the rollouts that are trained -> (trained rollouts, rows).
    With prefix credit (APPO): Eq. 6 groups (dual or one), prefix-averaged on the initial rollouts,
    which alone are trained; with recipe.train_branches the branches are trained too, each with its
    own A_b (the loss reads only their tokens from the fork on: loss_mask). Without (GRPO, ARPO): one
    group per prompt, every rollout trained, one value per rollout. Every value times
    recipe.advantage_scale (1 unless the control asks)."""
    R = torch.tensor([r.reward for r in rollouts])
    prompt = torch.tensor([r.example for r in rollouts])
    is_branch = torch.tensor([r.parent >= 0 for r in rollouts])
    scale = recipe.advantage_scale
    if not recipe.prefix_credit:
        adv = dual_group_advantages(R, prompt, torch.zeros_like(is_branch)) * scale
        rows = [torch.full((len(r.tokens),), float(a)) for r, a in zip(rollouts, adv)]
        for r, a in zip(rollouts, rows):
            r.adv, r.trained = a.tolist(), True
        return rollouts, rows
    adv = dual_group_advantages(R, prompt, is_branch if recipe.dual_group else torch.zeros_like(is_branch))
    adv = adv * scale
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
            if recipe.train_branches:
                train.append(r)
                rows.append(torch.full((len(r.tokens),), a))
    for r in train:
        r.trained = True
    return train, rows


def loss_mask(rollouts, mask, recipe):
    """Which tokens of a micro-batch enter the loss: m_t, and for a branch trained with prefix
    credit (recipe.train_branches) only its own tokens y_fork.. (those before the fork are the
    parent's, trained once, through the parent). Initial rollouts have fork 0: m_t unchanged."""
    if not recipe.prefix_credit:
        return mask
    start = torch.tensor([r.fork for r in rollouts], device=mask.device)     # (b,)
    own = torch.arange(mask.shape[1], device=mask.device)[None, :] >= start[:, None]   # (b, T)
    return mask & own if mask.dtype == torch.bool else mask * own


def update_plan(trained, cfg):
    """The update's schedule, drawn up front: per epoch, per PPO mini-batch (whole prompts, so Eq. 6's
    groups stay together, in shuffled order), the micro-batches as index lists into `trained`."""
    by_prompt = {}
    for i, r in enumerate(trained):
        by_prompt.setdefault(r.example, []).append(i)
    plan = []
    for _ in range(cfg.ppo_epochs):
        order = list(by_prompt)
        random.shuffle(order)
        epoch = []
        for start in range(0, len(order), cfg.mini_batch_prompts):
            idx = [i for e in order[start:start + cfg.mini_batch_prompts] for i in by_prompt[e]]
            epoch.append([idx[m:m + cfg.micro_batch_size] for m in range(0, len(idx), cfg.micro_batch_size)])
        plan.append(epoch)
    return plan


@torch.no_grad()
def old_logprobs(model, trained, micro_batches, cfg, pad_id):
    """log pi_old(y_t) from the trainer's forward pass (cfg.recompute_logp), for the rollouts of
    `micro_batches` (index lists into `trained`), in those micro-batches: the same computation the
    loss will run on the same weights, so a ratio is exactly 1 in any dtype until an optimizer step
    (README Decisions). -> 1-D tensors, in the order of the micro-batches' indices."""
    device, out = next(model.parameters()).device, []
    for micro in micro_batches:
        with autocast(device, cfg.dtype):
            logp, _, _ = response_logprobs(model, [trained[i] for i in micro], cfg.temperature, pad_id,
                                           cfg.logit_chunk, top_p=cfg.top_p)
        out += [logp[j, :len(trained[i].tokens)].float() for j, i in enumerate(micro)]
    return out


def policy_loss_backward(model, rows, old, advs, ref_logps, cfg, recipe, pad_id, weight):
    """Eqs. 7-8 on one micro-batch (`rows` index the trained rollouts): forward under autocast, the
    APPO loss, backward scaled by `weight` (its share of the mini-batch, so gradients accumulate to
    Eq. 8's mean over rollouts). old=None: pi_old is this very forward pass, detached (the first
    mini-batch, before any optimizer step of the update). -> (loss, metrics, the log-probs detached);
    nothing is backpropagated if the loss is not finite."""
    with autocast(next(model.parameters()).device, cfg.dtype):
        logp, _, mask = response_logprobs(model, rows, cfg.temperature, pad_id, cfg.logit_chunk, top_p=cfg.top_p)
    mask = loss_mask(rows, mask, recipe)
    as_rows = lambda xs: stack_rows(xs, logp.shape[1]).to(logp.device)      # (b, T)
    loss, metrics = appo_policy_loss(
        logp, logp.detach() if old is None else as_rows(old), as_rows(advs), mask, half_life=cfg.half_life,
        future_weight=recipe.future_weight, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip, ref_logp=as_rows(ref_logps) if ref_logps else None, kl_coef=cfg.kl_coef)
    if torch.isfinite(loss):
        (loss * weight).backward()
    return loss, metrics, logp.detach()


def ppo_update(model, optimizer, trained, advs, ref_logps, cfg, recipe, pad_id):
    """PPO mini-batches over prompts, micro-batches for memory; one optimizer step per mini-batch.
    pi_old: the trainer's own forward pass (cfg.recompute_logp, default): the first mini-batch's loss
    pass itself (no optimizer step has happened yet, so it is pi_old exactly), the other mini-batches'
    rows re-scored up front in the first epoch's micro-batches; or the sampler's log-probs. Forward
    passes run under autocast when cfg.dtype asks for bf16; weights and optimizer state stay float32.
    A non-finite loss or gradient skips that optimizer step and is counted."""
    plan = update_plan(trained, cfg)
    old = [r.logp for r in trained]
    if cfg.recompute_logp and plan:
        old = [None] * len(trained)
        later = [m for mini in plan[0][1:] for m in mini]
        for i, logp in zip([i for m in later for i in m], old_logprobs(model, trained, later, cfg, pad_id)):
            old[i] = logp
    sums, n_rows, skipped, norms = {}, 0, 0, []
    for mini in (mini for epoch in plan for mini in epoch):
        optimizer.zero_grad(set_to_none=True)
        finite, size = True, sum(map(len, mini))
        for micro in mini:
            first = old[micro[0]] is None                       # the first mini-batch (recompute_logp)
            loss, metrics, logp = policy_loss_backward(
                model, [trained[i] for i in micro], None if first else [old[i] for i in micro],
                [advs[i] for i in micro], [ref_logps[i] for i in micro] if ref_logps else None, cfg, recipe,
                pad_id, len(micro) / size)
            if first:                                           # kept for the later epochs
                for j, i in enumerate(micro):
                    old[i] = logp[j, :len(trained[i].tokens)].float()
            if not torch.isfinite(loss):
                finite = False
                break
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(micro)
            n_rows += len(micro)
        grad_norm = optimizer_step(model, optimizer, finite, size, cfg.grad_clip)
        if grad_norm is None:
            skipped += 1
        else:
            norms.append(grad_norm)
    out = {f"loss/{k}": v / max(n_rows, 1) for k, v in sums.items()}
    out.update({"update/skipped_nonfinite": skipped, "update/optimizer_steps": len(norms),
                "update/grad_norm": sum(norms) / len(norms) if norms else 0.0})
    return out


# ---------------------------------------------------------------------------------------------
# main: the algorithm box of the paper
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    rank, world = launched()                                    # (0, 1) unless torchrun
    if cfg.prompts_per_step % world or cfg.mini_batch_prompts % world:
        stop("appo.py", f"--prompts_per_step and --mini_batch_prompts must be multiples of the {world} processes")
    recipe, local = resolve(cfg), dataclasses.replace(cfg, mini_batch_prompts=cfg.mini_batch_prompts // world)
    seed_everything(cfg.seed)
    clock = Clock()                                             # where the time goes, printed at the end
    store = launch_store(cfg.dist_timeout)
    model_path, train_split, val, test = rank0_first(lambda: load_data(cfg), rank, store)   # toy world, SFT
    clock.lap("data, toy world and cold-start SFT")
    init_distributed(pick_device(cfg.device), cfg.dist_timeout, store)
    run = start_run(cfg, recipe, model_path, rank, world)
    model, tokenizer, device = run.model, run.tokenizer, next(run.model.parameters()).device
    content_mask, reporter = content_token_mask(tokenizer), make_reporter(cfg) if rank == 0 else None
    clock.lap("model")
    run.before = run.before or evaluate_sft(run, val, test)    # every rank answers its share
    heldout = val[:cfg.eval_size or None] if cfg.eval_every and val else []     # the curve's fixed questions
    if heldout and run.start == 0:
        log_heldout(run, 0, heldout_metrics(run, heldout))     # step 0: the SFT checkpoint
    clock.lap("evaluation before RL")
    for step in range(run.start + 1, cfg.steps + 1):
        batch = step_batch(train_split, cfg, step)[rank::world]     # whole prompts: Eq. 6 groups whole
        ##### rollout tree: expand_tree (the loop: generate_rollouts; Eqs. 3-5 in pick_branch_points, as
        ##### each rollout finishes or by round -> branching_score picks, branch_from branches) #####
        t0 = time.time()
        model.eval()
        with autocast(device, cfg.dtype):
            prompts = [example_prompt(tokenizer, e, cfg) for e in batch]
            rollouts, tree = expand_tree(model, run.anchor, tokenizer, prompts, cfg, recipe, run.toolbox,
                                         content_mask)
        ##### reward: compute_reward, per rollout #####
        t1 = time.time()
        answer_metrics(batch, rollouts)                         # sets reward, score, format_ok / _error
        ##### advantages: rollout_advantages (Eq. 6: dual_group_advantages, prefix_advantages) #####
        trained, advs = rollout_advantages(rollouts, recipe)
        ref_logps = None
        if cfg.kl_coef > 0:
            with on_device(run.ref, device), autocast(device, cfg.dtype):
                ref_logps = score_rollouts(run.ref, trained, cfg.temperature, tokenizer.pad_token_id,
                                           cfg.micro_batch_size, cfg.logit_chunk, top_p=cfg.top_p)
        ##### update: ppo_update (Eqs. 7-8: appo_policy_loss) #####
        t2 = time.time()
        if cfg.omega_anchor == "prev":                          # next step's anchor: the weights before it
            run.anchor.load_state_dict(model.state_dict())
        model.train()
        update = ppo_update(model, run.optimizer, trained, advs, ref_logps, local, recipe,
                            tokenizer.pad_token_id)
        model.eval()
        seconds = {"rollout": t1 - t0, "reward": t2 - t1, "update": time.time() - t2}
        ##### held-out curve, log / checkpoint #####
        curve, t3 = {}, time.time()
        if heldout and (step % cfg.eval_every == 0 or step == cfg.steps):
            curve, seconds["heldout"] = heldout_metrics(run, heldout), time.time() - t3
        log_step(run, step, batch, rollouts, tree, update, seconds, reporter, curve)
    clock.lap("RL")
    ##### final evaluation #####
    after = {}
    if test:                                                    # --steps=0: the checkpoint evaluated above
        after = run.before["test"] if cfg.steps == 0 else evaluate(model, tokenizer, test, cfg, run.toolbox,
                                                                   "test, after RL")
    clock.lap("evaluation after RL")
    summary = None
    if rank == 0:
        save_hf(model, tokenizer, os.path.join(cfg.out_dir, "final"))
        clock.lap("save")
        summary = write_summary(cfg, run.before, after, run.metrics_path, clock, run.start)
    leave_distributed()                                         # every rank waits for rank 0's writes
    return summary


if __name__ == "__main__":
    main()
