"""The agent loop of appo.py: batched sampling on one KV cache that pauses at tool calls, and the
log-probabilities of responses under a policy (the sampler, the Branching Score and the loss share them).

A rollout is a `Rollout`: the prompt, the response tokens y_1..y_T with m_t (1: the model sampled it,
0: a tool result), and the sampler's log pi(y_t) and H_t (Eq. 3) at the sampling temperature tau.
`generate_rollouts` continues a batch of rollouts until each ends (EOS, </answer>, the budget), running
each tool call in the background as soon as its closing tag is sampled, and, through its on_finish hook,
starts the branches of a rollout that just finished in the same batch; `run_agent` answers prompts.
`response_logprobs` scores finished rollouts with a full forward pass (the trainer's path).

Nothing here knows the algorithm: appo.py builds the rollout tree on top of it; eval.py reuses it.
"""
from __future__ import annotations

import functools
import time
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import tools
from tools import default_system_prompt


# ---------------------------------------------------------------------------------------------
# Rollouts, prompts and stop strings
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """One response y_1..y_T to one prompt, with the rollout tree's bookkeeping (appo.py)."""
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
    trained: bool = False                               # in the loss (APPO: initial rollouts, unless train_branches)

    @property
    def tool_calls(self):
        return len(self.calls)

    @property
    def n_generated(self):
        return sum(self.mask)                           # tokens the model sampled (results excluded)


@dataclass
class Sampling:
    """The agent loop's own settings (eval.py builds one without a training Config).

    results_as_ready: a row whose call returned samples on at once instead of waiting until every
    live row waits, so one slow call no longer idles the rows whose calls were quick. The steps at
    which results enter then depend on how long the tools take, so sampled runs are no longer bit
    for bit repeatable (greedy tokens are the same); off (default), the run is deterministic."""
    temperature: float = 1.0            # tau: samples come from exactly softmax(z / tau)
    top_p: float = 1.0                  # nucleus; 1.0 = off. Below 1 pi is the filtered softmax (score so)
    greedy: bool = False                # argmax instead of sampling (evaluation)
    max_response_tokens: int = 192      # response budget, tool results included
    max_tool_calls: int = 3             # further calls are answered with a limit message
    batch_size: int = 128               # rows sampled together
    results_as_ready: bool = False      # feed each result once ready, not when every row waits (see above)


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


OUTSIDE_NUCLEUS = -1e4   # log pi of a token top-p cannot sample; finite on purpose (policy_log_softmax)


def nucleus_mask(logp, top_p):
    """True on each row's nucleus: the smallest set of most probable tokens whose mass reaches top_p.
    Example: logp = log [[0.5, 0.3, 0.2]], top_p 0.7 -> [[True, True, False]]."""
    sorted_logp, order = logp.sort(dim=-1, descending=True, stable=True)
    p = sorted_logp.exp()
    inside = p.cumsum(-1) - p < top_p                                  # the mass before it is still short
    return torch.zeros_like(inside).scatter(-1, order, inside)


def policy_log_softmax(scaled, top_p=1.0):
    """log pi(. | s_t) of the sampling policy from z / tau (the caller divides): softmax, and for
    top_p < 1 restricted to the nucleus and renormalised. The sampler and the trainer both use it,
    so pi_old and pi_theta are the same distribution; the nucleus is recomputed from the current
    logits (for the sampler's weights it is the sampler's set, so the first ratio is 1) and the
    gradient flows through the renormalisation, not through the choice of the set.

    Outside the nucleus: OUTSIDE_NUCLEUS, not -inf. Tool-result tokens (m_t = 0) are often
    outside, for the policy and the reference alike, and -inf - (-inf) is NaN, which masking by
    multiplication does not remove; -1e4 keeps every difference finite. A sampled token that
    leaves the nucleus as the policy moves gets Delta clamped to -20 in the loss: ratio ~ 0, no
    gradient, as for any token the filtered policy cannot produce. top_p = 1: plain log_softmax.
    Example: z / tau = log [0.5, 0.3, 0.2], top_p 0.7 -> [log 0.625, log 0.375, -1e4].
    """
    logp = scaled.log_softmax(-1)
    if top_p >= 1.0:
        return logp
    inside = nucleus_mask(logp.detach(), top_p)
    kept = scaled.masked_fill(~inside, float("-inf")).log_softmax(-1)          # renormalised over the nucleus
    return kept.masked_fill(~inside, OUTSIDE_NUCLEUS)


# ---------------------------------------------------------------------------------------------
# The loop: prefill once, sample, pause at tool calls, feed results, drop finished rows
# ---------------------------------------------------------------------------------------------
def entropy_from_logp(logp, probs=None):
    """Eq. 3 from log-probabilities: H_t = -sum_v p_t(v) log p_t(v), over the last dim (the vocabulary).
    p log p -> 0 as p -> 0 (and a token outside the nucleus, log p = -1e4, adds exactly 0): no NaN.
    `probs`: logp.exp() when the caller has it already (the sampler draws from it).
    Example: logp = log [[0.75, 0.25]] -> [0.5623]."""
    return -((logp.exp() if probs is None else probs) * logp).sum(-1)


def entropy_from_logits(logits):
    """Eq. 3: H_t = -sum_v p_t(v) log p_t(v), p_t = softmax(z_t / tau), over the full vocabulary.

    The caller divides by the sampling temperature tau first, so H is the entropy of the
    distribution y_t was actually drawn from. log_softmax keeps it finite for huge logits.
    The sampler records this H_t for every sampled token (pick_tokens), where Eq. 5 reads it.
    Shape (B, T, V) -> (B, T).
    Example: logits [[[0, 0], [ln 3, 0]]] -> [[ln 2, 0.5623]]  (p = [.75, .25]).
    """
    return entropy_from_logp(F.log_softmax(logits.float(), dim=-1))  # (B, T)


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
    d.logits = model(input_ids=ids, attention_mask=d.attn, position_ids=pos, cache=d.cache,       # 5.24+
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
    """Drop finished rows from the batch (keep: batch indices that stay; an index given twice copies
    that row, as a branch joining the batch takes its parent's cache row)."""
    idx = torch.tensor(keep, dtype=torch.long, device=d.attn.device)
    d.cache.batch_select_indices(idx)
    d.attn, d.pos, d.logits = d.attn[idx], d.pos[idx], d.logits[idx]


def squeeze_holes(d, factor=2):
    """Drop hole columns once the cache is more than `factor` times as wide as its fullest row.

    Results fed as they arrive cost every other row a hole per result token, so without this the
    width would grow by the sum of all results instead of their max. Each row's columns move
    right, in order; keys are stored already rotated (RoPE) and positions live in d.pos, so the
    next logits are unchanged. Only plain DynamicLayer caches are squeezed (a sliding-window
    layer keeps fewer columns than d.attn has; it is left as it is).
    Example: attn [[1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], factor 2 -> [[1, 1], [0, 1]].
    """
    from transformers.cache_utils import DynamicLayer
    width, full = d.attn.shape[1], int(d.attn.sum(-1).max())
    layers = [x for x in getattr(d.cache, "layers", []) if x.is_initialized]   # a scripted model may use one
    plain = all(type(x) is DynamicLayer and x.keys.shape[-2] == width for x in layers)
    if width <= factor * full or not layers or not plain:
        return
    order = d.attn.sort(dim=-1, stable=True).indices[:, width - full:]             # (b, full) holes first
    for layer in layers:
        idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
    d.attn = d.attn.gather(1, order)


def sample_rows(probs):
    """One draw per row of (b, V) probabilities by inverting the CDF (a float64 cumsum and a binary
    search): the distribution torch.multinomial(probs, 1) draws from, ~20x faster on a CPU for a 49k
    vocabulary (multinomial's CPU kernel: ~100 ms for 64 rows; this: ~5 ms, measured). A token of
    probability 0 is never drawn (u stays below the total).
    Example: probs [[0.1, 0.2, 0.7]] -> 2 for u in [0.3, 1), 1 for u in [0.1, 0.3), 0 below."""
    cdf = probs.double().cumsum(-1)                                                   # (b, V)
    total = cdf[:, -1:]
    u = torch.minimum(torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total,
                      torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def pick_tokens(logits, sampling):
    """One token per row from exactly the policy, softmax(z / tau) (top-p filtered and renormalised
    when top_p < 1; argmax when greedy) -> (tokens, log pi(token), H of Eq. 3 of that policy), each (b,)."""
    logp_all = policy_log_softmax(logits / sampling.temperature, sampling.top_p)       # (b, V)
    probs = logp_all.exp()
    tok = logits.argmax(-1) if sampling.greedy else sample_rows(probs)
    entropy = entropy_from_logp(logp_all, probs)                                         # Eq. 3
    return tok, logp_all.gather(-1, tok[:, None])[:, 0], entropy


def start_call(pool, toolbox, r, tokenizer, max_calls):
    """Start the call a paused rollout asks for, in the background -> future of (name, payload,
    result). It is parsed from the whole response (a branch may have forked inside the call) and
    run with the rollout's earlier calls (the python tool's state); past max_calls nothing runs.
    The closing tag may end inside the last token (`on>.`), so that token's text may follow it."""
    if len(r.calls) >= max_calls:
        limit = Future()
        limit.set_result((None, None, f"Error: tool-call limit ({max_calls}) reached; give your answer"))
        return limit
    text = tokenizer.decode(r.tokens, skip_special_tokens=True)
    after = len(text) - len(tokenizer.decode(r.tokens[:-1], skip_special_tokens=True))   # the last token's
    return pool.submit(tools.run_call, toolbox, text, [(name, payload) for name, payload, _ in r.calls], after)


@torch.no_grad()
def generate_rollouts(model, tokenizer, rollouts, sampling, toolbox, cost=None, on_finish=None):
    """The tool loop, batched, on one KV cache per batch: sample until a closing
    tool tag, </answer>, EOS or the budget; a rollout that stops at a tool tag waits (its call runs
    in the background at once) while the others go on, and its result is fed as masked tokens
    (m_t = 0) into the same cache when every live row waits, or as soon as it is ready with
    sampling.results_as_ready (see Sampling). Nothing is prefilled twice: not the
    prompt of N rollouts, not a parent's prefix for its branches, not a rollout after a call.
    `toolbox` is the tools (tools.toolbox()). `cost` (a dict), if given, adds up the work done.

    on_finish(done) -> new rollouts: called, synchronously, with the rollouts that finished at a
    decoding step (in batch order), before their rows leave the cache; it returns one list per
    finished rollout of rollouts that continue from a prefix of it (its branches). They join the
    running batch at once, each from a copy of its parent's cache row (_join_phase), and are
    finished like any other row (also passed to on_finish when they finish). Those that find the
    batch full (sampling.batch_size) are queued and start, prefilled, in a later batch. The
    caller keeps the rollouts it returned: they are not added to `rollouts`."""
    pad = tokenizer.pad_token_id
    cost = {} if cost is None else cost
    pending, added = [r for r in rollouts if not r.done], []
    with ThreadPoolExecutor(max_workers=8) as pool:
        loop = ToolLoop(tokenizer, token_texts(tokenizer), sampling, toolbox, pool, on_finish)
        while pending:
            batch, pending = pending[:sampling.batch_size], pending[sampling.batch_size:]
            joined, queued = _generate_batch(model, loop, batch, pad, cost)
            pending += queued                                  # branches that found the batch full
            added += joined + queued
    for r in rollouts + added:
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


def result_ids(tokenizer, text):
    """Token ids of a tool result, special-token strings in it read as plain text: a search hit
    or a program that prints `<|im_end|>` must not become the control token (the model would see
    its turn end, or padding, inside a result). The agent loop and SFT both tokenise results so.
    Example (test_appo.char_tokenizer): " <|eos|>" -> the ids of its 8 characters, no EOS id."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def add_result(r, call, tokenizer, budget):
    """Append a finished call's result to rollout r as masked tokens (m_t = 0) and record the call
    -> the result's token ids to feed, or None when the budget ran out inside the result."""
    name, payload, result = call
    ids = result_ids(tokenizer, tools.format_result(result))
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


def _add_cost(cost, key, value):
    """cost[key] += value, a missing key counting as 0 (the agent loop's cost ledger).
    Example: c = {}; _add_cost(c, "tool_wait_s", 0.5); _add_cost(c, "tool_wait_s", 1.0)
             -> c == {"tool_wait_s": 1.5}.
    """
    cost[key] = cost.get(key, 0) + value


@dataclass
class Turns:
    """One batch of the tool loop: its rollouts, the ones still in the batch, those waiting for a tool."""
    rows: list                                         # the rollouts of the batch
    live: list                                         # batch row b (of the KV cache) holds rows[live[b]]
    tails: list                                        # per rollout: the text of its last tokens (find_stop)
    waiting: dict = field(default_factory=dict)        # rollout index -> future of its tool result


@dataclass
class ToolLoop:
    """What every step of a batch reads: the tokenizer and its token texts, the settings, the tools."""
    tokenizer: object
    texts: list                                        # token_texts(tokenizer)
    sampling: Sampling
    toolbox: dict                                      # tools.toolbox()
    pool: ThreadPoolExecutor                           # runs the calls in the background
    on_finish: object = None                           # finished rollouts -> branches (generate_rollouts)
    tool_stops: tuple = field(init=False)              # the closing tags of toolbox's tools

    def __post_init__(self):
        self.tool_stops = tools.stop_strings(self.toolbox)

    def start_call(self, r):
        return start_call(self.pool, self.toolbox, r, self.tokenizer, self.sampling.max_tool_calls)


def ends_with_tool_stop(r, texts, tool_stops):
    """Whether rollout r's last token is one it sampled and completes a closing tool tag (a branch that
    kept the whole tag waits for its call at once). The tag may end inside that token (`on>.`)."""
    if not r.tokens or not r.mask[-1]:
        return False
    t = r.tokens[-1]
    piece = texts[t] if t < len(texts) else ""
    return find_stop(tail_text(r.tokens[:-1], texts), piece, tool_stops) is not None


def _sample_phase(loop, turns, logits, new, finished):
    """Phase 1 of a decoding step: one token for each live row that is not waiting for a tool. A row
    that closes a tool tag starts its call in the background and waits from now on; EOS,
    </answer> or the budget finish it (batch row added to `finished`). new[b] gets the token."""
    if len(turns.waiting) == len(turns.live):
        return
    # every row draws, waiting ones too, as the loop always did: the same random stream as before
    tok, logp, entropy = pick_tokens(logits, loop.sampling)
    stops, s = loop.tool_stops + ("</answer>",), loop.sampling
    for b, (t, lp, h) in enumerate(zip(tok.tolist(), logp.tolist(), entropy.tolist())):
        j, r = turns.live[b], turns.rows[turns.live[b]]
        if j in turns.waiting:
            continue
        end, turns.tails[j] = add_token(r, t, lp, h, turns.tails[j], loop.texts, stops,
                                        loop.tokenizer.eos_token_id, s.max_response_tokens)
        if end in loop.tool_stops:
            turns.waiting[j] = loop.start_call(r)
        if end is None or end in loop.tool_stops:
            new[b].append(t)
        else:                                          # eos, </answer> or the budget
            r.done, r.truncated = True, end == "length"
            finished.add(b)


def _feed_results_phase(loop, turns, new, finished):
    """Phase 2: every waiting row whose tool result is ready gets it as masked tokens (m_t = 0),
    appended to new[b], so it is fed in the same forward pass as the other rows' sampled tokens
    and the row samples again at the next step. A result cut by the budget finishes the row.
    Runs every step with results_as_ready, else only at steps where every live row waited."""
    for b, j in enumerate(turns.live):
        future = turns.waiting.get(j)
        if future is None or not future.done():
            continue
        del turns.waiting[j]
        r = turns.rows[j]
        ids = add_result(r, future.result(), loop.tokenizer, loop.sampling.max_response_tokens)
        turns.tails[j] = tail_text(r.tokens, loop.texts)
        if ids is None:
            finished.add(b)
        else:
            new[b] += ids


def _join_phase(loop, turns, finished, cost):
    """Phase 3, with loop.on_finish: the rollouts that finished at this step (batch order) go to the
    hook while their rows are still in the cache; the rollouts it returns join the batch as long
    as it has room (sampling.batch_size) -> (joins: (parent's batch row, parent, rollout), the
    rest in order, queued for a later batch). Time spent in the hook is cost's on_finish_s.
    In a full batch a finished parent frees its own row only, so one branch joins and the others
    wait for a later batch (prefilled there, siblings sharing their prefix). Keeping the parent's
    row until rows free up would hold rows that sample nothing: every finished initial rollout of
    a full batch would hold one (tried: 3.7x the generation time at gen_batch_size 32 on the toy)."""
    if loop.on_finish is None or not finished:
        return [], []
    done = sorted(finished)
    t0 = time.time()
    kids = loop.on_finish([turns.rows[turns.live[b]] for b in done])
    _add_cost(cost, "on_finish_s", time.time() - t0)
    pairs = [(b, turns.rows[turns.live[b]], r) for b, rs in zip(done, kids) for r in rs if not r.done]
    room = max(0, loop.sampling.batch_size - (len(turns.live) - len(finished)))
    return pairs[:room], [r for _, _, r in pairs[room:]]


def _drop_finished(d, turns, new, finished, parents=()):
    """Phase 4: take the finished rows out of the batch and its KV cache, and append one copy of
    the row of each parent in `parents` (batch rows; a finished row may be copied) for a joining
    rollout -> the token lists of the rows that stay (to be fed).
    Example: live [4, 7, 9], finished {1} -> live [4, 9]; parents [1, 1] too -> cache rows [0, 2, 1, 1]."""
    keep = [b for b in range(len(turns.live)) if b not in finished]
    rows = keep + list(parents)
    if rows and rows != list(range(len(turns.live))):
        keep_rows(d, rows)
    turns.live = [turns.live[b] for b in keep]
    return [new[b] for b in keep]


def common_prefix(a, b, n):
    """The length of the longest common prefix of lists a and b, at most n.
    Example: common_prefix([1, 2, 3], [1, 2, 4], 3) -> 2."""
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _continue_joined(d, loop, turns, joins, cost):
    """Phase 5: start the joined rollouts on the copies of their parents' rows (the last rows of d)
    without prefilling anything. The parent's row holds its first d.pos tokens (prompt + response,
    fed in order; its last sampled token, or a result cut by the budget, never was); the copy's
    attention mask keeps the first `kept` real columns, the context both share (kept <
    len(context)), pos = kept, and the rest of the context, a branch's last token, is fed with
    the other rows' tokens -> those token lists. A context that ends in a closing tool tag waits
    for its call at once, as at the start of a batch.
    Example: parent fed [p, a, b, c] (d.pos 4), branch context [p, a, b] -> kept 2, feeds [b]."""
    out, first = [], len(turns.live)
    for k, (_, parent, r) in enumerate(joins):
        row, ctx = first + k, r.prompt + r.tokens
        kept = common_prefix(ctx, parent.prompt + parent.tokens, min(int(d.pos[row]), len(ctx) - 1))
        d.attn[row] *= d.attn[row].cumsum(-1) <= kept                       # (W,) the parent's first kept
        d.pos[row] = kept
        j = len(turns.rows)
        turns.rows.append(r)
        turns.live.append(j)
        turns.tails.append(tail_text(r.tokens, loop.texts))
        if ends_with_tool_stop(r, loop.texts, loop.tool_stops):
            turns.waiting[j] = loop.start_call(r)
        out.append(ctx[kept:])
        _add_cost(cost, "prefill_tokens", len(ctx) - kept)
        _add_cost(cost, "prefill_tokens_per_row", len(ctx))
    return out


def _wait_when_idle(turns, cost, as_ready):
    """When every live row waits for a tool nothing can be sampled: block until the first result
    is ready (as_ready) or all are (else, the deterministic schedule). That time is the batch's
    tool_wait_s. -> whether every live row was waiting."""
    futures = list(turns.waiting.values())
    if len(futures) < len(turns.live):
        return False
    t0 = time.time()
    if not (as_ready and any(f.done() for f in futures)):
        wait(futures, return_when=FIRST_COMPLETED if as_ready else ALL_COMPLETED)
    _add_cost(cost, "tool_wait_s", time.time() - t0)
    return True


def _generate_batch(model, loop, rows, pad, cost):
    """The tool loop on one batch of rollouts (at most sampling.batch_size), on one KV cache.

    Prefill (shared prefixes once), then one forward pass per step with, for each live row, the
    token it sampled and/or its tool result. With sampling.results_as_ready a result is fed as
    soon as it is ready, so a row whose call returned samples again while slower calls still run
    elsewhere, and only when every live row waits does the loop block, on the first result;
    without, results are fed when every live row waits, after blocking on all of them. With
    loop.on_finish, rows that finish are handed to it and the rollouts it returns join the batch
    (phases 3-5) -> (the rollouts that joined, those queued for a later batch). cost gets
    prefill_tokens (computed), prefill_tokens_per_row (as if rows shared nothing), tool_wait_s
    (blocked with nothing to sample), decode_steps (forward passes after the prefill), on_finish_s
    (in the hook) and generate_s (the whole batch, the hook's time excluded).
    Example (results_as_ready): rows A (slow search) and B (instant python) both stop at a closing
    tag; B's result is fed at the next step and B goes on sampling while A's search runs.
    """
    t0, hook0 = time.time(), cost.get("on_finish_s", 0)
    d, prefill = start_decoding(model, [r.prompt + r.tokens for r in rows], pad)
    _add_cost(cost, "prefill_tokens", prefill)
    _add_cost(cost, "prefill_tokens_per_row", sum(len(r.prompt) + len(r.tokens) for r in rows))
    tails = [tail_text(r.tokens, loop.texts) for r in rows]
    turns = Turns(rows=list(rows), live=list(range(len(rows))), tails=tails)
    for j, r in enumerate(rows):
        if ends_with_tool_stop(r, loop.texts, loop.tool_stops):
            turns.waiting[j] = loop.start_call(r)
    as_ready, queued = loop.sampling.results_as_ready, []
    while turns.live:
        idle = _wait_when_idle(turns, cost, as_ready)
        new, finished = [[] for _ in turns.live], set()
        _sample_phase(loop, turns, d.logits, new, finished)
        if as_ready or idle:
            _feed_results_phase(loop, turns, new, finished)
        joins, later = _join_phase(loop, turns, finished, cost)
        queued += later
        new = _drop_finished(d, turns, new, finished, [b for b, _, _ in joins])
        new += _continue_joined(d, loop, turns, joins, cost)
        if turns.live:
            feed(model, d, new, pad)
            _add_cost(cost, "decode_steps", 1)
            if as_ready:                               # results enter one by one: holes pile up
                squeeze_holes(d)
    _add_cost(cost, "generate_s", time.time() - t0 - (cost.get("on_finish_s", 0) - hook0))
    return turns.rows[len(rows):], queued


def run_agent(model, tokenizer, prompts, sampling, toolbox, cost=None):
    """Answer each prompt (token ids) once with the tool loop. Used by evaluation and eval.py."""
    rollouts = [Rollout(example=i, prompt=list(p), root=i) for i, p in enumerate(prompts)]
    return generate_rollouts(model, tokenizer, rollouts, sampling, toolbox, cost)


# ---------------------------------------------------------------------------------------------
# Log-probabilities of responses under a policy (the trainer's path)
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


def _nucleus_logp(scaled, targets, with_entropy, top_p):
    """log pi(targets) (and H) under the top-p policy, as the sampler computes them: (b, c, V) -> (b, c)."""
    logp_all = policy_log_softmax(scaled, top_p)                               # (b, c, V)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    return logp, entropy_from_logp(logp_all) if with_entropy else None


def plain_head(head):
    """Whether the output layer is a bias-free nn.Linear (logits = h W^T), as in Llama, Qwen, SmolLM."""
    return isinstance(head, torch.nn.Linear) and head.bias is None


def head_logits(hidden, head, temperature):
    """z / tau for one chunk as float32 (b, c, V). A plain head takes 1/tau on the hidden states
    (W (h / tau) = (W h) / tau: a (b, c, d) product instead of one over the vocabulary), in the
    autocast dtype with explicit casts, so TargetLogProb's backward rebuilds exactly these numbers."""
    if not plain_head(head):
        return head(hidden).float() / temperature
    return _linear_logits(hidden, head.weight, temperature, _compute_dtype(hidden))


def _compute_dtype(x):
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _linear_logits(hidden, weight, temperature, dtype):
    out = F.linear((hidden / temperature).to(dtype), weight.to(dtype))
    return out.to(torch.promote_types(dtype, torch.float32))                 # bf16 -> float32 logits


class TargetLogProb(torch.autograd.Function):
    """log softmax(W h / tau)[target] for one chunk through a plain head: (b, c, d) -> (b, c).

    The backward rebuilds the chunk's logits from the hidden states instead of keeping them (one
    chunk's float32 logits exist at a time, as with checkpointing) and forms d logp / dz = onehot -
    softmax in place: a few passes over the (b, c, V) logits instead of the ~10 that autograd through
    logsumexp, gather and the division by tau takes (the vocabulary dominates a small model's update).
    The forward is exactly _chunk_logp's, so pi_old from a no-grad pass and the loss agree bit for bit.
    """
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):
        dtype = _compute_dtype(hidden)
        logits = _linear_logits(hidden, weight, temperature, dtype)               # (b, c, V)
        logz = logits.logsumexp(-1)                                                # (b, c)
        ctx.dtype, ctx.temperature = dtype, temperature
        ctx.save_for_backward(hidden, weight, targets, logz)
        return logits.gather(-1, targets[..., None])[..., 0] - logz

    @staticmethod
    def backward(ctx, grad):                                                       # grad: (b, c)
        hidden, weight, targets, logz = ctx.saved_tensors
        tau, dtype = ctx.temperature, ctx.dtype
        scaled, w = (hidden / tau).to(dtype), weight.to(dtype)                     # (b, c, d), (V, d)
        g = F.linear(scaled, w).to(logz.dtype)                                     # z / tau again
        g.sub_(logz[..., None]).exp_().mul_(-grad[..., None])                      # -grad * softmax
        g.scatter_add_(-1, targets[..., None], grad[..., None])                    # + grad at y_t
        g = g.to(dtype)
        grad_hidden = (g @ w).to(hidden.dtype) / tau if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g.flatten(0, -2).T @ scaled.flatten(0, -2)).to(weight.dtype)   # (V, d)
        return grad_hidden, grad_weight, None, None


def _chunk_logp(hidden, targets, head, temperature, with_entropy, top_p=1.0):
    """log pi(targets) (and H) for one chunk, pi = softmax(head(hidden) / tau), top-p filtered when
    top_p < 1 (policy_log_softmax, as the sampler): (b, c, d) -> (b, c)."""
    logits = head_logits(hidden, head, temperature)                            # (b, c, V)
    if top_p < 1.0:
        return _nucleus_logp(logits, targets, with_entropy, top_p)
    logz = logits.logsumexp(-1)                                                # (b, c)
    logp = logits.gather(-1, targets[..., None])[..., 0] - logz                # (b, c)
    if not with_entropy:
        return logp, None
    logp_all = logits - logz[..., None]                                        # (b, c, V)
    return logp, entropy_from_logp(logp_all)                                   # H, as the sampler computes it


def chunk_logp(hidden, targets, head, temperature, with_entropy=False, top_p=1.0):
    """_chunk_logp with the memory-saving gradient path: TargetLogProb for a plain head (top_p 1, no
    entropy), checkpointing otherwise; without gradients _chunk_logp itself -> (logp, H or None)."""
    if torch.is_grad_enabled() and plain_head(head) and top_p == 1.0 and not with_entropy:
        return TargetLogProb.apply(hidden, head.weight, targets, temperature), None
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_chunk_logp, hidden, targets, head, temperature,
                                                 with_entropy, top_p, use_reentrant=False)
    return _chunk_logp(hidden, targets, head, temperature, with_entropy, top_p)


def response_logprobs(model, rollouts, temperature, pad_id, chunk=1024, with_entropy=False, top_p=1.0):
    """log pi(y_t | s_t) at temperature tau for every response token -> (logp, entropy, mask),
    each (b, T); entropy (Eq. 3) only when asked, without gradient. top_p < 1: pi is the
    nucleus-filtered policy the sampler drew from (policy_log_softmax); pass the sampler's top_p.

    Memory: the vocabulary-sized logits are built from the final hidden states `chunk` tokens
    (rows x positions) at a time, and with gradients each chunk's logits are rebuilt in the
    backward pass (TargetLogProb; checkpointing for top-p and other heads), so one chunk's float32
    logits exist at a time instead of several (b, T, V) copies. Models that post-process their
    logits (soft-capping, scaling) take the plain full-logits path.
    """
    device = next(model.parameters()).device
    ids, attn, mask, P = pad_batch(rollouts, pad_id, device)
    b, T = mask.shape
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                                 # RoPE positions skip left pads
    post = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    if any(getattr(model.config, k, None) for k in post):
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False,
                       logits_to_keep=T + 1).logits[:, :-1].float() / temperature
        if top_p < 1.0:
            logp, entropy = _nucleus_logp(logits, ids[:, P:], with_entropy, top_p)
            return logp, entropy.detach() if with_entropy else None, mask
        logp = logits.log_softmax(-1).gather(-1, ids[:, P:, None])[..., 0]
        return logp, entropy_from_logits(logits.detach()) if with_entropy else None, mask
    hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos,
                              use_cache=False).last_hidden_state[:, P - 1:-1]  # (b, T, d): predicts y_t
    head, targets, step = model.get_output_embeddings(), ids[:, P:], max(1, chunk // b)
    logps, ents = [], []
    for s in range(0, T, step):
        lp, h = chunk_logp(hidden[:, s:s + step], targets[:, s:s + step], head, temperature, with_entropy,
                           top_p)
        logps.append(lp)
        ents.append(h.detach() if with_entropy else None)
    return torch.cat(logps, 1), torch.cat(ents, 1) if with_entropy else None, mask


@torch.no_grad()
def score_rollouts(model, rollouts, temperature, pad_id, micro_batch, chunk, top_p=1.0):
    """log pi(y_t) of each rollout under `model` (top-p filtered when top_p < 1, as sampled), in
    micro-batches -> list of 1-D CPU tensors."""
    out = []
    for i in range(0, len(rollouts), micro_batch):
        part = rollouts[i:i + micro_batch]
        logp, _, _ = response_logprobs(model, part, temperature, pad_id, chunk, top_p=top_p)
        out += [logp[j, :len(r.tokens)].float().cpu() for j, r in enumerate(part)]
    return out


def stack_rows(rows, T=None):
    """List of 1-D tensors -> right-padded (b, T) tensor."""
    T = T or max(max(len(x) for x in rows), 1)
    return torch.stack([F.pad(torch.as_tensor(x).float(), (0, T - len(x))) for x in rows])


def example_prompt(tokenizer, ex, cfg):
    return build_prompt(tokenizer, ex["question"], ex["kind"], cfg.system_prompt, ex.get("messages"))


def content_token_mask(tokenizer):
    """(len(tokenizer),) bool: tokens with a letter or digit in them (whitespace and punctuation
    cannot branch). Ids beyond the tokenizer (a model vocab padded past it) count as False."""
    return torch.tensor([any(ch.isalnum() for ch in t) for t in token_texts(tokenizer)], dtype=torch.bool)
