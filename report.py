"""Run reports: the rollout-tree page of one RL step, a run index, and metric curves.

Standard library + matplotlib only (imported inside plot_curves, so `import report` stays cheap).
The pages are self-contained: inline CSS and JS, no network resources, so they open from a
copied run folder on any laptop.

Also the pure functions the training loop calls on every step to log where branches land:
token_spans (which part of the agent's text a token is in) and fork_statistics (branch/* metrics).

    write_tree_page(record, "out/appo/tree_step12.html")   # one step's prompts, rollouts, branches
    write_index("out/appo")                                 # out/appo/index.html
    plot_curves(rows_of_metrics_jsonl, "out/appo/curves.png")
"""
import html
import math
import os
import re

SPANS = ("reasoning", "tool_call", "after_result", "answer", "result")
SIGNALS = (                           # (record key, data-* attribute, radio label)
    ("entropy", "h", "entropy H"),
    ("omega", "o", "future value Ω"),
    ("bs", "bs", "Branching Score (as ranked)"),
    ("adv", "a", "advantage"),
)
HOVER_ONLY = (("z_h", "zh"), ("z_omega", "zo"), ("tier", "tier"))   # in the tooltip, not a shading choice
SHORT_RESULT = 160                   # tool results longer than this (chars) are collapsed
CONTEXT_CHARS = 60                   # shared text shown before a branch's continuation
PREVIEW_CHARS = 110                  # continuation text in a collapsed branch's one-line summary


# ---------------------------------------------------------------------------------------------
# Where branches land (pure; called by the training loop every step)
# ---------------------------------------------------------------------------------------------

def _char_labels(tokens, mask):
    """A span label per character of the concatenated text.

    Tool results are blanked (NUL) first, so a tag echoed inside a result opens nothing and an
    unclosed call (cut off by the budget or a result) ends where the result starts.
    """
    text = "".join(tok if m else "\0" * len(tok) for tok, m in zip(tokens, mask))
    labels = ["reasoning"] * len(text)
    for pattern, label in ((r"<answer>.*?(?:</answer>|\x00|\Z)", "answer"),
                           (r"<(python|search)>.*?(?:</\1>|\x00|\Z)", "tool_call")):
        for m in re.finditer(pattern, text, re.S):
            labels[m.start():m.end()] = [label] * (m.end() - m.start())
    return labels


def token_spans(tokens, mask):
    """For each position: "tool_call" (inside <python>..</python> / <search>..</search>, tags
    included), "after_result" (first sampled token after a tool result), "answer" (inside
    <answer>..</answer>), "result" (mask 0) or "reasoning".

    Tags are matched on the joined text, so "<", "/", "pyth", "on", ">" is one closing tag; a
    token overlapping a span by one character belongs to it. Precedence: result, after_result
    (the ARPO-style boundary, counted whatever follows it), tool_call, answer, reasoning.
    Example: ["Hi", "<", "search", ">x</", "search>", " <result>y</result>", "<answer>"], mask
             [1, 1, 1, 1, 1, 0, 1] -> reasoning, tool_call x4, result, after_result.
    """
    labels = _char_labels(tokens, mask)
    out, pos = [], 0
    for i, (tok, m) in enumerate(zip(tokens, mask)):
        chars = labels[pos:pos + len(tok)] or labels[pos:pos + 1]
        pos += len(tok)
        if not m:
            out.append("result")
        elif i > 0 and not mask[i - 1]:
            out.append("after_result")
        else:
            out.append(next((s for s in ("tool_call", "answer") if s in chars), "reasoning"))
    return out


def _mean(xs):
    """Mean, None for nothing to average."""
    return sum(xs) / len(xs) if xs else None


def fork_statistics(rollouts, with_roles=True):
    """branch/* metrics of one step's rollouts: where the chosen fork points t lie.

    branch/fork_rel_pos: mean of (sampled tokens before t) / (sampled tokens in the rollout);
    branch/fork_span/<span>: share of forks per token_spans span (all five keys, summing to 1);
    branch/H_fork vs branch/H_candidates and branch/omega_fork vs branch/omega_candidates:
    mean H_t / Omega_t at the forks vs over all candidate positions (Omega keys only where some
    rollout has omega). branch/n_forks: how many forks. Empty input -> {}.
    The pilot question (toy.fork_role, a toy_filler world): branch/fork_role/<role> share of forks
    per role (filler, decision, other: all three, summing to 1), against the base rate
    branch/candidate_role/<filler, decision> (share of candidate positions), and
    branch/omega_fork_<filler, decision>: mean Omega_t at forks of that role (where there are some).
    The roles are read off the toy's tokens (a FILLER word, a one-token action tag); a real tokenizer
    splits tags and words otherwise, so with_roles=False leaves the role keys out rather than report
    every fork as "other".
    """
    from toy import fork_role        # here, so `import report` needs nothing beyond the standard library
    if not rollouts:
        return {}
    rel, spans, roles, cand_roles = [], [], [], []
    h_fork, h_cand, o_fork, o_cand, o_role = [], [], [], [], {"filler": [], "decision": []}
    for r in rollouts:
        tokens, mask, ent, omega = r["tokens"], r["mask"], r.get("entropy"), r.get("omega")
        points = [t for t in r.get("branch_points") or [] if 0 <= t < len(tokens)]
        if points:
            labels = token_spans(tokens, mask)
            n = max(sum(mask), 1)
            rel += [sum(mask[:t]) / n for t in points]
            spans += [labels[t] for t in points]
        cands = [t for t, c in enumerate(r.get("candidate") or []) if c]
        point_roles = [fork_role(tokens, mask, t) for t in points] if with_roles else []
        roles += point_roles
        cand_roles += [fork_role(tokens, mask, t) for t in cands] if with_roles else []
        if ent is not None:
            h_fork += [ent[t] for t in points]
            h_cand += [ent[t] for t in cands]
        if omega is not None:
            o_fork += [omega[t] for t in points]
            o_cand += [omega[t] for t in cands]
            for t, role in zip(points, point_roles):
                if role in o_role:
                    o_role[role].append(omega[t])
    out = {"branch/n_forks": len(spans)}
    if spans:
        out["branch/fork_rel_pos"] = _mean(rel)
    out.update({f"branch/fork_span/{s}": spans.count(s) / max(len(spans), 1) for s in SPANS})
    if with_roles:
        out.update({f"branch/fork_role/{s}": roles.count(s) / max(len(roles), 1)
                    for s in ("filler", "decision", "other")})
        out.update({f"branch/candidate_role/{s}": cand_roles.count(s) / max(len(cand_roles), 1)
                    for s in ("filler", "decision")})
    for key, xs in (("H_fork", h_fork), ("H_candidates", h_cand), ("omega_fork", o_fork),
                    ("omega_candidates", o_cand), ("omega_fork_filler", o_role["filler"]),
                    ("omega_fork_decision", o_role["decision"])):
        if xs:
            out[f"branch/{key}"] = _mean(xs)
    return out


# ---------------------------------------------------------------------------------------------
# The rollout-tree page
# ---------------------------------------------------------------------------------------------

def esc(s):
    """Every piece of record text goes through here: tokens contain `<python>` and quotes."""
    return html.escape(str(s), quote=True)


def fmt(x):
    """Numbers in data-* attributes and the tooltip (4 significant digits; None -> "")."""
    return "" if x is None else f"{x:.4g}"


def fmt2(x):
    """Rewards and scores as people read them."""
    return "–" if x is None else f"{x:.2f}"


def fork_point(parent, child):
    """The branch point t of `parent` that `child` was forked at.

    The record keeps the child's fork (first re-sampled position): t + 1 past any tool result
    when the branch token is kept (the default), t itself when it is re-sampled (ARPO).
    """
    points = set(parent.get("branch_points") or [])
    fork, mask = child["fork"], parent["mask"]
    t = min(fork, len(mask)) - 1
    while t > 0 and not mask[t]:
        t -= 1
    if t in points or fork not in points:
        return max(t, 0)
    return fork


def children_at(rollouts):
    """{parent id: {t: [branches forked at t]}} over rollouts whose parent is in the record."""
    by_id = {r["id"]: r for r in rollouts}
    kids = {}
    for r in rollouts:
        parent = by_id.get(r["parent"])
        if r["parent"] >= 0 and parent is not None:
            t = fork_point(parent, r)
            kids.setdefault(parent["id"], {}).setdefault(t, []).append(r)
    return kids


def token_html(r, i, span, points, candidate):
    """One sampled token with its signals in data-* attributes (the tooltip and shading read them)."""
    cls = ["t"]
    if candidate and candidate[i]:
        cls.append("c")
    if span in ("tool_call", "answer"):
        cls.append({"tool_call": "tc", "answer": "an"}[span])
    if i in points:
        cls.append("bp")
    attrs = [f'class="{" ".join(cls)}"', f'data-i="{i}"']
    for key, attr in [(k, a) for k, a, _ in SIGNALS] + list(HOVER_ONLY):
        values = r.get(key)
        if values is not None:
            attrs.append(f'data-{attr}="{fmt(values[i])}"')
    return f'<span {" ".join(attrs)}>{esc(r["tokens"][i])}</span>'


def result_html(text, first, n):
    """A tool result (mask 0 run starting at `first`, n tokens): grey monospace, collapsed if long."""
    if len(text) <= SHORT_RESULT:
        return f'<span class="res" data-i="{first}">{esc(text)}</span>'
    head = " ".join(text.split())[:80]
    return (f'<details class="res" data-i="{first}"><summary>tool result · {n} tokens · '
            f'{len(text)} chars: {esc(head)}…</summary><pre>{esc(text)}</pre></details>')


def tokens_html(r, spans, start, end):
    """Positions start..end-1 of rollout r: sampled tokens as spans, each tool result as one box."""
    out, i, mask = [], start, r["mask"]
    points = set(r.get("branch_points") or [])
    while i < end:
        if mask[i]:
            out.append(token_html(r, i, spans[i], points, r.get("candidate")))
            i += 1
            continue
        j = i
        while j < end and not mask[j]:
            j += 1
        out.append(result_html("".join(r["tokens"][i:j]), i, j - i))
        i = j
    return "".join(out)


def marker_html(r, t, branches):
    """The visible fork marker after token t of rollout r (data-pos / data-rollout for tools)."""
    ids = " ".join(str(b["id"]) for b in branches)
    what = f"branches {', '.join('#' + str(b['id']) for b in branches)}" if branches else "no branch kept"
    title = f"rollout #{r['id']} branched after position t={t}: {what}"
    label = ",".join(str(b["id"]) for b in branches) or "–"
    return (f'<span class="fork" data-pos="{t}" data-rollout="{r["id"]}" data-branches="{ids}" '
            f'title="{esc(title)}">↳{label}</span>')


def body_html(r, start, kids):
    """Rollout r's tokens from `start`, cut after each branch point with the branches forked there.

    Branches (and their branches) nest right under their fork, so the tree reads top-down.
    """
    n, spans = len(r["tokens"]), token_spans(r["tokens"], r["mask"])
    here = kids.get(r["id"], {})
    out, pos = [], start
    for t in sorted(set(r.get("branch_points") or []) | set(here)):
        if not 0 <= t < n:
            continue
        cut = max(t + 1, pos)
        out.append(tokens_html(r, spans, pos, cut))
        out.append(marker_html(r, t, here.get(t, [])))
        out += [branch_html(b, t, kids) for b in here.get(t, [])]
        pos = cut
    out.append(tokens_html(r, spans, pos, n))
    return "".join(out)


def reward_badge(x, name):
    """A reward/score chip coloured from red (-1) over white (0) to green (1)."""
    if x is None:
        return f'<span class="bd">{name} –</span>'
    v = max(-1.0, min(1.0, float(x)))
    colour = f"rgba(40,160,70,{0.15 + 0.5 * v:.2f})" if v >= 0 else f"rgba(220,60,50,{0.15 - 0.5 * v:.2f})"
    return f'<span class="bd" style="background:{colour}">{name} {fmt2(x)}</span>'


def meta_html(r):
    """Per-rollout facts: reward, score, format, tool calls, truncated, trained."""
    yes = lambda v, word: f'<span class="bd{"" if v else " bad"}">{word} {"✓" if v else "✗"}</span>'
    calls = r.get("tool_calls", 0)
    parts = [reward_badge(r.get("reward"), "reward"), reward_badge(r.get("score"), "score"),
             yes(r.get("format_ok"), "format"),
             f'<span class="bd">{esc(calls)} tool call{"" if calls == 1 else "s"}</span>']
    if r.get("truncated"):
        parts.append('<span class="bd bad">truncated</span>')
    if r.get("trained") is False:
        parts.append('<span class="bd dim">not trained</span>')
    return " ".join(parts)


def branch_html(b, t, kids):
    """A branch: one-line summary (ids, reward, start of its text), body = its continuation."""
    toks, fork = b["tokens"], b["fork"]
    context = " ".join("".join(toks[:fork]).split())[-CONTEXT_CHARS:]
    preview = " ".join("".join(toks[fork:]).split())[:PREVIEW_CHARS]
    return (f'<details class="br" data-id="{b["id"]}" '
            f'data-parent="{b["parent"]}" data-pos="{t}" data-fork="{fork}" '
            f'data-reward="{fmt(b.get("reward"))}">'
            f'<summary><b>↳ #{b["id"]}</b> <span class="dim">from #{b["parent"]} at t={t}</span> '
            f'{meta_html(b)} <span class="pv">{esc(preview)}</span></summary>'
            f'<div class="txt"><span class="ctx">…{esc(context)}</span>{body_html(b, fork, kids)}</div>'
            f'</details>')


def rollout_html(r, kids):
    """An initial rollout: its facts in the summary line, its whole text (with the tree) below."""
    n_branches = sum(len(v) for v in kids.get(r["id"], {}).values())
    return (f'<details class="roll" open data-id="{r["id"]}"><summary><b>rollout #{r["id"]}</b> '
            f'{meta_html(r)} <span class="dim">{len(r["tokens"])} tokens · {n_branches} direct branches'
            f'</span></summary><div class="txt top">{body_html(r, 0, kids)}</div></details>')


def prompt_html(k, p):
    """One prompt: question, gold answer, a reward summary, then its rollout trees."""
    rs = p["rollouts"]
    ids = {r["id"] for r in rs}
    tops = [r for r in rs if r["parent"] < 0 or r["parent"] not in ids]
    branches = [r for r in rs if r not in tops]
    mean = lambda xs: fmt2(_mean([x["reward"] for x in xs if x.get("reward") is not None]))
    kids = children_at(rs)
    gold = " | ".join(str(a) for a in p.get("answer") or [])
    return (f'<section class="prompt" id="p{k}"><h2>Q{k + 1} '
            f'<span class="dim">[{esc(p.get("kind", ""))}]</span> '
            f'{esc(p["question"])}</h2><p class="gold">gold: <b>{esc(gold)}</b> · {len(tops)} initial '
            f'rollouts (mean reward {mean(tops)}) · {len(branches)} branches (mean reward {mean(branches)})'
            f'</p>{"".join(rollout_html(r, kids) for r in tops)}</section>')


def controls_html():
    """The sticky bar: which signal shades the tokens, the colour scale, expand/collapse."""
    radios = "".join(f'<label><input type="radio" name="sig" value="{a}"{" checked" if a == "bs" else ""}>'
                     f'{esc(label)}</label>' for _, a, label in SIGNALS)
    radios += '<label><input type="radio" name="sig" value="">none</label>'
    return (f'<div class="bar"><span class="sigs">shade sampled tokens by: {radios}</span>'
            f'<span class="legend"><span id="lo"></span><span id="scale"></span><span id="hi"></span>'
            f'<span id="note" class="dim"></span></span>'
            f'<span class="btns"><button data-open="1">expand branches</button>'
            f'<button data-open="0">collapse branches</button></span></div>')


def page_html(record):
    """The whole page as a string."""
    title = f'{record.get("algo", "")} · step {record.get("step", "?")} · {record.get("run", "")}'
    key = ('<p class="dim key">Hover a token for H, Ω, Z(H), Z(Ω), BS and advantage. '
           '<span class="fork">↳4</span> = the rollout was branched after this token into branch #4 '
           '(outlined token = the branch point; click the marker or a branch line to open it). '
           '<span class="res">grey box</span> = tool result (not sampled, not shaded). '
           '<span class="t c">dotted</span> = branch candidate (BS view). Monospace = tool call.</p>')
    body = "".join(prompt_html(k, p) for k, p in enumerate(record.get("prompts", [])))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{CSS}</style></head><body>{controls_html()}<main>'
            f'<h1><a href="index.html">index</a> / {esc(title)}</h1>{key}{body}</main>'
            f'<div id="tip" hidden></div><script>{JS}</script></body></html>')


def write_tree_page(record, path):
    """One RL step's record -> a standalone page at `path`.

    record: {"step", "algo", "run", "prompts": [{"question", "answer": [...], "kind", "rollouts": [...]}]};
    a rollout: id, parent (-1 initial), root, fork, tokens, mask, entropy / omega / z_h / z_omega / bs /
    tier / adv (per-token lists, any may be None; bs is the value Eq. 5 ranked by, tier marks the
    uncertain-and-consequential points ranked first), candidate, branch_points, reward, score, format_ok,
    tool_calls, truncated, trained. Ids index the prompt's rollout list.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page_html(record))


CSS = """
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#222;background:#fafafa}
main{padding:4px 14px 40px}
h1{font-size:16px;margin:8px 0 2px} h2{font-size:15px;margin:18px 0 2px}
a{color:#3558b0} .dim{color:#777;font-weight:normal} .key{margin:2px 0 6px;font-size:12.5px}
.bar{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid #ccc;padding:6px 14px;
 display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center;font-size:13px}
.bar label{margin-right:8px;white-space:nowrap;cursor:pointer}
.legend{display:flex;align-items:center;gap:6px}
#scale{display:inline-block;width:170px;height:12px;border:1px solid #aaa}
.btns button{font-size:12px;margin-right:4px}
.prompt{border-top:2px solid #bbb;margin-top:10px} .gold{margin:2px 0 6px;font-size:13px}
details.roll{background:#fff;border:1px solid #ccc;border-radius:4px;margin:6px 0;padding:2px 8px}
details>summary{cursor:pointer;font-size:13px}
details.roll>summary{padding:3px 0}
.txt{white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.75;font-size:13.5px;padding:2px 0}
.txt.top{max-height:72vh;overflow-y:auto;border-top:1px solid #eee}
.bd{display:inline-block;padding:0 5px;border-radius:8px;border:1px solid #ddd;font-size:12px;line-height:1.5;
 background:#f4f4f4} .bd.bad{background:#fde3e0} .bd.dim{color:#888}
.t{border-radius:2px} .t:hover{outline:1px solid #333}
.t.tc{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.t.an{font-weight:600}
.t.bp{outline:2px solid #7a3fd0;outline-offset:-1px}
body[data-sig=bs] .t.c{text-decoration:underline dotted #999}
.res{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#ececec;color:#555;
 border:1px solid #d2d2d2;border-radius:3px;padding:0 3px}
details.res{display:block;margin:3px 0;white-space:normal;padding:1px 6px}
details.res summary{color:#666;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
details.res pre{margin:2px 0;max-height:14em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.fork{display:inline-block;background:#7a3fd0;color:#fff;border-radius:7px;font-size:10.5px;line-height:1.3;
 padding:0 4px;margin:0 2px;vertical-align:1px;white-space:nowrap;cursor:pointer}
details.br{display:block;white-space:normal;margin:2px 0 4px 14px;border-left:3px solid #7a3fd0;
 background:#f7f3fd;padding:1px 6px;border-radius:0 3px 3px 0}
details.br>summary{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
details.br[open]>summary{white-space:normal}
details.br .pv{color:#555;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
details.br[open] .pv{display:none}
.ctx{color:#999;font-style:italic}
#tip{position:fixed;z-index:9;background:#222;color:#eee;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;
 padding:5px 8px;border-radius:4px;white-space:pre;pointer-events:none;max-width:420px}
"""

JS = r"""
const toks = Array.from(document.querySelectorAll('.t[data-i]'));
const DIVERGING = {bs: true, a: true};
function quantile(xs, q) {
  if (!xs.length) return 0;
  const s = xs.slice().sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * (s.length - 1)))];
}
function scaleOf(key) {   // the colour range of a signal over the whole page (outliers clipped)
  const xs = toks.map(t => t.dataset[key]).filter(v => v !== undefined && v !== '').map(Number);
  if (DIVERGING[key]) { const m = quantile(xs.map(Math.abs), 0.99) || 1; return [-m, m, xs.length]; }
  return [quantile(xs, 0), quantile(xs, 0.99), xs.length];
}
function colour(v, lo, hi, key) {
  if (DIVERGING[key]) {
    const x = Math.max(-1, Math.min(1, v / hi));
    return x >= 0 ? `rgba(225,60,40,${(0.75 * x).toFixed(3)})` : `rgba(40,110,225,${(-0.75 * x).toFixed(3)})`;
  }
  const x = hi > lo ? Math.max(0, Math.min(1, (v - lo) / (hi - lo))) : 0;
  return `rgba(245,140,0,${(0.8 * x).toFixed(3)})`;
}
function paint(key) {
  document.body.dataset.sig = key;
  const [lo, hi, n] = key ? scaleOf(key) : [0, 0, 0];
  for (const t of toks) {
    const v = key ? t.dataset[key] : undefined;
    t.style.background = (v === undefined || v === '') ? '' : colour(Number(v), lo, hi, key);
  }
  const ends = DIVERGING[key] ? [colour(lo, lo, hi, key), '#fff'] : ['#fff'];
  const grad = key ? `linear-gradient(90deg, ${ends.join(', ')}, ${colour(hi, lo, hi, key)})` : 'none';
  document.getElementById('scale').style.background = grad;
  document.getElementById('lo').textContent = key ? lo.toPrecision(3) : '';
  document.getElementById('hi').textContent = key ? hi.toPrecision(3) + (DIVERGING[key] ? '' : '+') : '';
  document.getElementById('note').textContent = !key ? '' : n < toks.length ?
    `(${toks.length - n} tokens n/a)` : '';
}
document.querySelectorAll('input[name=sig]').forEach(r => r.addEventListener('change', () => paint(r.value)));
document.querySelectorAll('.btns button').forEach(b => b.addEventListener('click', () =>
  document.querySelectorAll('details.br').forEach(d => d.open = b.dataset.open === '1')));
document.addEventListener('click', e => {   // a fork marker opens / closes the branches right after it
  const m = e.target.closest && e.target.closest('.fork');
  for (let el = m && m.nextElementSibling; el && el.matches('details.br'); el = el.nextElementSibling) {
    el.open = !el.open;
  }
});
const tip = document.getElementById('tip');
const show = v => (v === undefined || v === '') ? '–' : v;
document.addEventListener('mouseover', e => {
  const t = e.target.closest && e.target.closest('.t[data-i]');
  if (!t) { tip.hidden = true; return; }
  const d = t.dataset;
  const cand = t.classList.contains('c') ? '  candidate' : '';
  tip.textContent = `t=${d.i}  ${JSON.stringify(t.textContent)}${cand}\nH ${show(d.h)}   Ω ${show(d.o)}\n` +
    `Z(H) ${show(d.zh)}   Z(Ω) ${show(d.zo)}\nBS ${show(d.bs)}${d.tier === '1' ? ' (first tier)' : ''}   A ${show(d.a)}`;
  const r = t.getBoundingClientRect();
  tip.hidden = false;
  tip.style.left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8) + 'px';
  const below = r.bottom + 6 + tip.offsetHeight <= window.innerHeight;
  tip.style.top = (below ? r.bottom + 6 : r.top - tip.offsetHeight - 6) + 'px';
});
paint(document.querySelector('input[name=sig]:checked').value);
"""


# ---------------------------------------------------------------------------------------------
# Run index and curves
# ---------------------------------------------------------------------------------------------

def _step_of(name):
    m = re.search(r"(\d+)", name)
    return int(m.group(1)) if m else -1


def write_index(run_dir):
    """run_dir/index.html: curves.png first (if there; its first row is the held-out curve), then every
    tree_step*.html, in step order."""
    pages = sorted((f for f in os.listdir(run_dir) if f.startswith("tree_step") and f.endswith(".html")),
                   key=lambda f: (_step_of(f), f))
    label = lambda f: f"step {_step_of(f)}" if f == f"tree_step{_step_of(f)}.html" else f[:-5]
    links = "".join(f'<li><a href="{esc(f)}">{esc(label(f))}</a></li>' for f in pages)
    img = ('<p><a href="curves.png"><img src="curves.png" alt="curves" style="max-width:100%"></a></p>'
           if os.path.exists(os.path.join(run_dir, "curves.png")) else "")
    title = esc(os.path.basename(os.path.abspath(run_dir)))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>'
            'body{font:14px/1.5 system-ui,sans-serif;margin:14px 20px} ul{columns:12em}</style></head>'
            f'<body><h1>{title}</h1>{img}<h2>Rollout trees ({len(pages)})</h2><ul>{links}</ul></body></html>')
    with open(os.path.join(run_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)


def _ema(xs, alpha=0.1):
    """Exponential moving average of a list (for curves too noisy to read raw)."""
    out, v = [], None
    for x in xs:
        v = x if v is None else (1 - alpha) * v + alpha * x
        out.append(v)
    return out


def _panel_of(key):
    """The panel a metric goes in: its namespace ("loss/approx_kl" -> "loss"); three-level keys
    get their own panel ("branch/fork_span/answer" -> "branch/fork_span") so shares in [0, 1]
    are not drawn on the axis of counts."""
    parts = key.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else "other"


def _series(metrics):
    """{panel: {key: ([steps], [values])}} over numeric, finite values; missing keys are gaps."""
    panels = {}
    for n, row in enumerate(metrics):
        x = row.get("step", n)
        for key, v in row.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if key == "step" or not numeric:
                continue
            xs, ys = panels.setdefault(_panel_of(key), {}).setdefault(key, ([], []))
            xs.append(x)
            ys.append(v)
    return panels


def _draw_panel(ax, name, series):
    """One namespace's lines. Keys far larger than the panel's typical scale (counts next to
    means, say) go on a right-hand axis, dashed, so the small ones stay readable."""
    scale = {k: max((abs(y) for y in ys), default=0.0) for k, (_, ys) in series.items()}
    typical = sorted(scale.values())[(len(scale) - 1) // 2] if scale else 0.0     # lower median
    right = None
    for i, (key, (xs, ys)) in enumerate(sorted(series.items())):
        big = typical > 0 and scale[key] > 8 * typical
        if big and right is None:
            right = ax.twinx()
            right.tick_params(labelsize=7)
        label = key.rsplit("/", 1)[-1] + (" (right)" if big else "")
        (right if big else ax).plot(xs, ys, ls="--" if big else "-", marker="o" if len(xs) < 30 else None,
                                    ms=3, lw=1.2, label=label, color=f"C{i % 10}")
    ax.set_title(name, fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    handles = ax.lines + (right.lines if right else [])
    if handles:
        ax.legend(handles=handles, fontsize=6 if len(handles) > 6 else 7, loc="best", framealpha=0.6)


HEADLINE = (("step", "RL step"), ("cum/tokens_generated", "tokens generated (cumulative)"),
            ("cum/seconds", "seconds of RL steps (cumulative)"))


def plot_curves(metrics, path):
    """One PNG, a grid of small panels, x = RL step. With a held-out curve (--eval_every) its first
    row answers "does it learn": held-out accuracy against step (with the training rollouts' score,
    smoothed), cumulative tokens and cumulative seconds, then held-out accuracy per question type.
    Below, one panel per metric namespace. Non-numeric values are skipped and a key missing from some
    rows just has gaps, so any metrics.jsonl plots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _series(metrics)
    curve = [m for m in metrics if isinstance(m.get("heldout/acc"), (int, float))]
    head = 4 if curve else 0
    shown = {"heldout", "cum"} if curve else set()
    names = sorted(n for n in panels if n not in shown) or ["(no numeric metrics)"]
    cols = 4 if curve else min(4, len(names))
    rows = math.ceil((head + len(names)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    if curve:
        score = [(m["step"], m.get("cum/tokens_generated"), m.get("cum/seconds"), m["reward/score"])
                 for m in metrics if isinstance(m.get("reward/score"), (int, float))]
        smooth = _ema([s[3] for s in score])
        for i, (ax, (x, label)) in enumerate(zip(axes.flat, HEADLINE)):
            ax.plot([m.get(x, 0) for m in curve], [100 * m["heldout/acc"] for m in curve], "o-", ms=3,
                    lw=1.6, color="C0", label="held-out (val, greedy)")
            ax.plot([s[i] for s in score], [100 * v for v in smooth], lw=1, color="C1", alpha=0.8,
                    label="training rollouts' score (EMA)")
            ax.set_xlabel(label, fontsize=8)
            if x == "cum/tokens_generated":
                ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e3:.0f}k")
            ax.set_ylabel("accuracy (%)", fontsize=8)
            ax.set_title("held-out accuracy" + (f": {100 * curve[0]['heldout/acc']:.1f} -> "
                                                f"{100 * curve[-1]['heldout/acc']:.1f} %" if i == 0 else ""), fontsize=10)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best", framealpha=0.6)
        _draw_panel(axes.flat[3], "heldout (by question type)", panels.get("heldout", {}))
    for ax, name in zip(list(axes.flat)[head:], names):
        _draw_panel(ax, name, panels.get(name, {}))
    for ax in list(axes.flat)[head + len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
