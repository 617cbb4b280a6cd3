"""Evaluate a model with APPO's agent loop and tools on the paper's 13 benchmarks (its Table 1).

    python eval.py                     # the checkpoint of `python appo.py` on its held-out toy split
    python eval.py --model=Qwen/Qwen2.5-7B-Instruct --data_dir=data/benchmarks --benchmarks=all \
        --search_url=http://localhost:8001/retrieve \
        --judge_url=http://localhost:8000/v1 --judge_model=Qwen/Qwen2.5-72B-Instruct
    python eval.py --benchmarks=aime24,aime25 --n=8 --temperature=0.6 --top_p=0.95   # pass@1, pass@8

Writes under --out_dir: <benchmark>.jsonl (one line per sample, appended as it goes, so a rerun
resumes where it stopped), summary.json and results.md (laid out like the paper's Table 1, with the
published Qwen2.5-7B rows next to yours). The agent loop, the tools and the scorer come from appo.py
and tools.py; this file only adds data loading, the LLM judge and the tables.
"""
import dataclasses
import json
import math
import os
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from appo import compute_reward, extract_answer, normalize_answer
from runtime import DataError, read_jsonl


@dataclass
class EvalArgs:
    model: str = "out/appo/final"
    """Checkpoint dir or Hugging Face id of any causal LM. Default: what `python appo.py` saves."""
    benchmarks: str = "toy"
    """'toy' (the held-out split of the default appo.py run), 'all' (the 13), or a comma list."""
    toy_dir: str = "out/appo/world"
    """Where `python appo.py` writes its toy world: test.jsonl (held-out split) and corpus.jsonl."""
    data_dir: str = ""
    """Directory with <name>/test.jsonl per benchmark; empty: load from the Hugging Face hub."""
    limit: int = 0
    """Evaluate only the first `limit` questions of each benchmark (0: all)."""
    n: int = 1
    """Samples per question; pass@1 is their mean score, pass@n uses the unbiased estimator."""
    temperature: float = 0.0
    """0 = greedy (the default, one sample). Sampling as in the paper's pass@k: 0.6."""
    top_p: float = 0.95
    """Nucleus sampling when temperature > 0."""
    max_response_tokens: int = 0
    """Response budget incl. tool results. 0: the paper's (4096 math/knowledge, 8192 deep search;
    the toy uses appo.Config's default)."""
    max_tool_calls: int = 0
    """Tool calls per response. 0: the reference code's (3 math, 6 knowledge / deep search;
    the toy uses appo.Config's default)."""
    system_prompt: str = ""
    """Empty: the toy run's own (from its saved config.json), else appo.Config's tool-use prompt."""
    search_corpus: str = ""
    """Search-R1 style corpus for BM25 (the toy defaults to toy_dir/corpus.jsonl)."""
    search_url: str = ""
    """Retrieval server (e.g. a Search-R1 /retrieve endpoint); takes precedence over the corpus."""
    search_cache: str = ""
    """JSON file caching search results across runs."""
    search_topk: int = 3
    """Passages per search (reference code: 3-5; the toy uses its run's own setting)."""
    judge_url: str = ""
    """OpenAI-compatible base URL (…/v1) of the LLM judge for WebWalker, GAIA, HLE, Xbench.
    Empty: normalised exact match as a stand-in, marked * in the table."""
    judge_model: str = "Qwen/Qwen2.5-72B-Instruct"
    """Judge model name; the paper's judge is Qwen2.5-72B-Instruct."""
    judge_key: str = ""
    """API key for the judge; empty: $JUDGE_API_KEY or $OPENAI_API_KEY, else none."""
    correct_threshold: float = 0.5
    """A sample counts as correct for pass@k when its score >= this (matters for F1 only)."""
    out_dir: str = "out/eval"
    """Per-sample JSONL files, summary.json and results.md go here."""
    seed: int = 0
    """Seed for random and torch."""
    batch_size: int = 8
    """Samples generated together."""
    device: str = "auto"
    """Passed to appo.Config.device."""


def die(message, code=1):
    """Stop with one clear line on stderr instead of a traceback (appo.stop, this script's name)."""
    from runtime import stop
    stop("eval.py", message, code)


def parse_args(argv):
    """--key=value into EvalArgs (appo.py's parser: --help lists the docstrings); a bad key or value
    exits with code 2 and one line."""
    from runtime import parse_settings
    args = parse_settings(EvalArgs, argv, "eval.py")
    if args.n < 1 or args.limit < 0 or args.batch_size < 1:
        die("--n and --batch_size must be >= 1, --limit >= 0", 2)
    if args.n > 1 and args.temperature <= 0:
        die("--n > 1 needs sampling, e.g. --temperature=0.6 --top_p=0.95", 2)
    return args


# ---------------------------------------------------------------------------------------------
# The registry: category, metric and source of each benchmark
# ---------------------------------------------------------------------------------------------
@dataclass
class Benchmark:
    name: str          # directory name under --data_dir and the output file's name
    label: str         # column title in Table 1
    category: str      # math | knowledge | deep search
    metric: str        # math (equivalence of \boxed{}) | f1 (token-F1) | judge (LLM judge)
    hf: tuple = ()     # (dataset id, config or None, split) for datasets.load_dataset: best-known ids

    @property
    def kind(self):    # what the prompt and compute_reward call it
        return "math" if self.metric == "math" else "qa"


BENCHMARKS = [
    Benchmark("aime24", "AIME24", "math", "math", ("HuggingFaceH4/aime_2024", None, "train")),
    Benchmark("aime25", "AIME25", "math", "math", ("math-ai/aime25", None, "test")),
    Benchmark("math500", "MATH500", "math", "math", ("HuggingFaceH4/MATH-500", None, "test")),
    Benchmark("gsm8k", "GSM8K", "math", "math", ("openai/gsm8k", "main", "test")),
    Benchmark("math", "MATH", "math", "math", ("DigitalLearningGmbH/MATH-lighteval", "default", "test")),
    Benchmark("webwalker", "WebWalker", "knowledge", "judge", ("callanwu/WebWalkerQA", None, "main")),
    Benchmark("hotpotqa", "HotpotQA", "knowledge", "f1", ("RUC-NLPIR/FlashRAG_datasets", "hotpotqa", "dev")),
    Benchmark("2wiki", "2Wiki", "knowledge", "f1", ("RUC-NLPIR/FlashRAG_datasets", "2wikimultihopqa", "dev")),
    Benchmark("musique", "MuSiQue", "knowledge", "f1", ("RUC-NLPIR/FlashRAG_datasets", "musique", "dev")),
    Benchmark("bamboogle", "Bamboogle", "knowledge", "f1",
              ("RUC-NLPIR/FlashRAG_datasets", "bamboogle", "test")),
    Benchmark("gaia", "GAIA", "deep search", "judge", ("gaia-benchmark/GAIA", "2023_all", "validation")),
    Benchmark("hle", "HLE", "deep search", "judge", ("cais/hle", None, "test")),
    Benchmark("xbench", "Xbench", "deep search", "judge", ("xbench/DeepSearch", None, "train")),
]
TOY = Benchmark("toy", "Toy", "toy", "by kind")  # each row carries its own kind (math or qa)
CATEGORIES = ["math", "knowledge", "deep search"]
# Paper Table 1, Qwen2.5-7B-Instruct; its average is over these 10 columns.
PUBLISHED = {
    "GRPO": [23.3, 26.7, 78.0, 92.8, 87.8, 22.0, 59.0, 76.1, 30.6, 68.4, 56.5],
    "ARPO": [30.0, 30.0, 78.8, 92.2, 88.8, 26.0, 58.8, 76.1, 31.1, 71.5, 58.3],
    "APPO": [36.7, 30.0, 81.0, 93.2, 90.0, 33.5, 66.5, 81.5, 31.5, 77.6, 62.2],
}


def golds_of(value, name):
    """Gold answer(s) in any shape the files use -> list of alias strings.

    Example: ["NYC", "New York"] -> same; 70 -> ["70"]; '["a", "b"]' -> ["a", "b"];
    gsm8k "... so 18 eggs.\\n#### 1,018" -> ["1018"]; MATH "... \\boxed{5}." -> ["5"].
    """
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v).strip()]
    if isinstance(value, (int, float)):
        return [str(value)]
    if not isinstance(value, str):
        return []
    s = value.strip()
    if name == "gsm8k" and "####" in s:
        return [s.rsplit("####", 1)[1].strip().replace(",", "")]
    if s.startswith("[") and s.endswith("]"):  # an alias list written as a string, but HLE has
        try:                                   # real answers like "[11,19,22]": only all-strings
            v = json.loads(s)
            if v and all(isinstance(x, str) for x in v):
                return v
        except json.JSONDecodeError:
            pass
    return [s] if s else []


def normalize_row(raw, name):
    """One raw record -> {question, golds}; None when it has no question or no gold."""
    question = next((raw[k] for k in ("question", "problem", "Question", "query") if raw.get(k)), None)
    golds = []
    for key in ("golden_answers", "answer", "Final answer", "final_answer", "Answer", "answers"):
        if key in raw and raw[key] is not None:
            golds = golds_of(raw[key], name)
            break
    if not golds and raw.get("solution"):  # MATH: the gold is the last \boxed{} of the solution
        boxed = extract_answer(f"<answer>{raw['solution']}</answer>")
        golds = [boxed] if boxed else []
    if not isinstance(question, str) or not golds:
        return None
    return {"question": question, "golds": golds, "kind": raw.get("kind")}


def read_benchmark(path, name):
    """Rows of a local test.jsonl (runtime.read_jsonl); a malformed line stops with the file and line."""
    rows = []
    for lineno, raw in read_jsonl(path, numbered=True):
        row = normalize_row(raw, name) if isinstance(raw, dict) else None
        if row is None:
            raise DataError(f"{path}:{lineno}: no question (question/problem/Question) or no "
                            "gold answer (answer/golden_answers/Final answer/solution)")
        rows.append(row)
    return rows


def load_benchmark(bench, args):
    """Rows {question, golds, kind} of one benchmark, or a string saying why it was skipped."""
    if bench is TOY:
        path = os.path.join(args.toy_dir, "test.jsonl")
        if not os.path.exists(path):
            return f"{path} not found: run `python appo.py` first (it writes the toy world)"
        rows = read_benchmark(path, "toy")
    elif args.data_dir:
        path = os.path.join(args.data_dir, bench.name, "test.jsonl")
        if not os.path.exists(path):
            return f"{path} not found"
        rows = read_benchmark(path, bench.name)
    else:
        try:
            import datasets
            dataset_id, config, split = bench.hf
            ds = datasets.load_dataset(dataset_id, config, split=split)
        except Exception as e:  # offline, gated, renamed: skip it, say why
            return f"cannot load {bench.hf[0]} from the Hugging Face hub ({type(e).__name__}: {str(e)[:150]})"
        rows = []
        for i, raw in enumerate(ds):
            row = normalize_row(dict(raw), bench.name)
            if row is None:
                raise DataError(f"{bench.hf[0]} {split} row {i}: no question or no gold answer")
            rows.append(row)
    for row in rows:
        row["kind"] = row["kind"] if bench is TOY else bench.kind
        if row["kind"] not in ("math", "qa"):
            raise DataError(f"{bench.name}: kind must be math or qa, got {row['kind']!r}")
    return rows[:args.limit] if args.limit > 0 else rows


# ---------------------------------------------------------------------------------------------
# Scoring: appo's scorer, plus an LLM judge for WebWalker, GAIA, HLE and Xbench
# ---------------------------------------------------------------------------------------------
JUDGE_PROMPT = """You are grading an answer to a question against the reference answer(s).
Question: {question}
Reference answer(s): {golds}
Predicted answer: {pred}
The predicted answer is correct if it means the same as one of the reference answers (ignore
formatting, capitalisation and harmless extra detail; a partial or different answer is incorrect).
Reply with exactly one word: correct or incorrect."""


class JudgeError(Exception):
    """The judge endpoint could not be reached or answered nonsense."""


def ask_judge(question, golds, pred, url, model, key="", timeout=60, retries=3):
    """1.0 if the judge says "correct", else 0.0. POSTs to {url}/chat/completions."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "user",
         "content": JUDGE_PROMPT.format(question=question, golds=" | ".join(golds), pred=pred)}]})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    for attempt in range(retries):
        try:
            req = urllib.request.Request(url.rstrip("/") + "/chat/completions", body.encode(), headers)
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                reply = json.load(resp)["choices"][0]["message"]["content"].strip().lower()
            return 0.0 if "incorrect" in reply else float("correct" in reply)
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
            error = e
            time.sleep(min(2 ** attempt, 10) if attempt + 1 < retries else 0)
    raise JudgeError(f"judge at {url} failed {retries} times: {type(error).__name__}: {error}")


def score_response(response, row, metric, judge=None):
    """compute_reward's dict with score replaced by the judge (or its exact-match stand-in)."""
    r = compute_reward(response, row["golds"], row["kind"])
    if metric == "judge" and r["answer"] is not None:
        if judge is not None:
            r["score"] = judge(row["question"], row["golds"], r["answer"])
        else:  # stand-in without a judge: normalised exact match
            r["score"] = float(normalize_answer(r["answer"]) in {normalize_answer(g) for g in row["golds"]})
    elif metric == "judge":
        r["score"] = 0.0
    return r


# ---------------------------------------------------------------------------------------------
# The loop: generate, score, append; resumable
# ---------------------------------------------------------------------------------------------
def read_done(path, rows):
    """Records already in path, keyed (idx, sample); drops a half-written last line."""
    done = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
        f.truncate(keep)  # an interrupted write leaves a partial line; the sample is redone
    for lineno, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        rec = json.loads(line)
        if rec["idx"] >= len(rows) or rows[rec["idx"]]["question"] != rec["question"]:
            raise DataError(f"{path}:{lineno}: from a different dataset or order; use another --out_dir")
        done[(rec["idx"], rec["sample"])] = rec
    return done


def evaluate(rows, generate_fn, score_fn, out_path, n=1, batch_size=8, desc=""):
    """All n samples of every row, scored; each appended to out_path as soon as it exists.

    generate_fn(questions, kinds) -> objects with .text, .tool_calls, .n_generated;
    score_fn(response, row) -> compute_reward-like dict. (idx, sample) pairs already in out_path
    are not generated again, so an interrupted run resumes. Returns the records, in order.
    """
    from tqdm import tqdm
    done = read_done(out_path, rows)
    todo = [(i, s) for i in range(len(rows)) for s in range(n) if (i, s) not in done]
    bar = tqdm(total=len(rows) * n, initial=len(rows) * n - len(todo), desc=desc, file=sys.stderr)
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            outs = generate_fn([rows[i]["question"] for i, _ in batch], [rows[i]["kind"] for i, _ in batch])
            for (i, s), out in zip(batch, outs):
                r = score_fn(out.text, rows[i])
                rec = {"idx": i, "sample": s, "question": rows[i]["question"], "golds": rows[i]["golds"],
                       "kind": rows[i]["kind"], "response": out.text, "answer": r["answer"],
                       "score": r["score"], "format_ok": r["format_ok"],
                       "tool_calls": out.tool_calls, "n_generated": out.n_generated}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                done[(i, s)] = rec
            bar.update(len(batch))
    bar.close()
    return [done[(i, s)] for i in range(len(rows)) for s in range(n)]


# ---------------------------------------------------------------------------------------------
# Metrics and tables
# ---------------------------------------------------------------------------------------------
def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples with c correct.

    Example: pass_at_k(5, 2, 2) = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; pass_at_k(n, c, 1) = c/n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize(records, n, threshold):
    """pass@1 = mean score over all samples (mean F1 for F1 benchmarks); pass@n over questions
    counts samples with score >= threshold as correct; tool calls and tokens are per sample."""
    by_q = {}
    for rec in records:
        by_q.setdefault(rec["idx"], []).append(rec["score"])
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    out = {"questions": len(by_q), "samples_per_question": n, "pass@1": mean([r["score"] for r in records])}
    if n > 1:
        out[f"pass@{n}"] = mean([pass_at_k(len(s), sum(x >= threshold for x in s), n) for s in by_q.values()])
    out.update(format_ok=mean([float(r["format_ok"]) for r in records]),
               tool_calls=mean([r["tool_calls"] for r in records]),
               generated_tokens=mean([r["n_generated"] for r in records]))
    return out


def averages(results):
    """Category averages, the paper's 10-benchmark average (math + knowledge) and the 13's,
    each over the benchmarks evaluated; 'complete' says whether none was missing."""
    out = {}
    groups = {c: [b for b in BENCHMARKS if b.category == c] for c in CATEGORIES}
    groups["avg10"] = groups["math"] + groups["knowledge"]
    groups["avg13"] = BENCHMARKS
    for key, members in groups.items():
        vals = [results[b.name]["pass@1"] for b in members if b.name in results]
        out[key] = {"value": sum(vals) / len(vals) if vals else None, "complete": len(vals) == len(members)}
    return out


def markdown(results, skipped, judged):
    """results.md: Table 1 layout with the published rows, then a per-benchmark detail table."""
    fmt = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines, notes = [], []
    if any(b.name in results for b in BENCHMARKS):
        avg = averages(results)
        head = [b.label for b in BENCHMARKS] + ["Math", "Knowledge", "Deep search", "Avg (10)", "Avg (13)"]
        lines += ["| Method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        cells = []
        for b in BENCHMARKS:
            star = "*" if b.metric == "judge" and not judged and b.name in results else ""
            cells.append(fmt(results[b.name]["pass@1"]) + star if b.name in results else "–")
        for key in CATEGORIES + ["avg10", "avg13"]:
            partial = not avg[key]["complete"] and avg[key]["value"] is not None
            cells.append(fmt(avg[key]["value"]) + ("†" if partial else ""))
        lines.append("| This run | " + " | ".join(cells) + " |")
        for method, v in PUBLISHED.items():  # paper: no MATH-free split, deep search in another table
            row = [f"{x:.1f}" for x in v[:10]] + ["–"] * 3 + ["–", "–", "–", f"{v[10]:.1f}", "–"]
            lines.append(f"| {method} (paper, Qwen2.5-7B) | " + " | ".join(row) + " |")
        notes.append("Published rows: APPO paper Table 1, Qwen2.5-7B-Instruct; its average is over "
                     "the 10 math + knowledge benchmarks (Avg (10)). Scores are pass@1 × 100.")
        if not judged and any(b.metric == "judge" and b.name in results for b in BENCHMARKS):
            notes.append("* no --judge_url: normalised exact match stands in for the paper's LLM judge "
                         "(Qwen2.5-72B-Instruct); expect lower numbers than a judge gives.")
        if any(not a["complete"] and a["value"] is not None for a in avg.values()):
            notes.append("† average over the benchmarks evaluated only (some skipped or not selected).")
        lines.append("")
    n = next(iter(results.values()))["samples_per_question"] if results else 1
    pass_n = [f"pass@{n}"] if n > 1 else []
    head = ["Benchmark", "Category", "Metric", "Questions", "pass@1", *pass_n, "Format ok",
            "Tool calls / sample", "Tokens / sample"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        b = next((b for b in BENCHMARKS if b.name == name), TOY)
        metric = "exact match*" if b.metric == "judge" and not judged else b.metric
        cells = [name, b.category, metric, str(r["questions"]), fmt(r["pass@1"]),
                 *[fmt(r[k]) for k in pass_n],
                 fmt(r["format_ok"]), f"{r['tool_calls']:.2f}", f"{r['generated_tokens']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes += [f"Skipped {k}: {why}" for k, why in skipped.items()]
    return "\n".join(lines + [""] + [f"{x}  " for x in notes]) + "\n"


# ---------------------------------------------------------------------------------------------
# main: load data, the model and the tools; evaluate; write the tables
# ---------------------------------------------------------------------------------------------
def select(spec):
    """Benchmarks named by --benchmarks ('toy', 'all', or a comma list); unknown -> exit 2."""
    if spec == "all":
        return list(BENCHMARKS)
    known = {b.name: b for b in BENCHMARKS + [TOY]}
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in known]
    if unknown:
        die(f"unknown benchmark(s) {unknown}; known: {list(known)}", 2)
    return [known[s] for s in names]


def agent_settings(args, bench):
    """What appo's agent loop needs for one benchmark -> (Sampling, toolbox, system prompt): this
    run's sampling settings and the paper's budgets; the toy takes the settings its appo.py run
    saved (budgets, system prompt, search top-k), unless overridden here."""
    import appo, tools
    import tools
    saved, run_config = {}, os.path.join(os.path.dirname(os.path.normpath(args.toy_dir)), "config.json")
    if bench is TOY and os.path.exists(run_config):
        with open(run_config) as f:
            saved = json.load(f)
    paper_budget = 8192 if bench.category == "deep search" else 4096          # paper, section 4
    sampling = appo.Sampling(
        temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
        greedy=args.temperature <= 0, batch_size=args.batch_size,
        max_response_tokens=args.max_response_tokens or saved.get("max_response_tokens", paper_budget),
        max_tool_calls=args.max_tool_calls or saved.get("max_tool_calls",
                                                         3 if bench.category == "math" else 6))
    corpus = args.search_corpus or (os.path.join(args.toy_dir, "corpus.jsonl") if bench is TOY else "")
    backend = None
    if corpus or args.search_url or args.search_cache:
        backend = tools.Search(corpus=corpus or None, url=args.search_url or None,
                               cache=args.search_cache or None,
                               topk=saved.get("search_topk", args.search_topk))
    box = tools.toolbox(search_backend=backend, timeout=saved.get("tool_timeout", 5.0))
    return sampling, box, args.system_prompt or saved.get("system_prompt") or tools.default_system_prompt(box)


def make_generate(model, tokenizer, sampling, box, system_prompt):
    """generate_fn for evaluate(): appo's prompt, tools and agent loop; nothing re-implemented."""
    import appo, agent
    device = next(model.parameters()).device

    def generate(questions, kinds):
        prompts = [agent.build_prompt(tokenizer, q, k, system_prompt) for q, k in zip(questions, kinds)]
        with appo.autocast(device, "auto"):
            return appo.run_agent(model, tokenizer, prompts, sampling, box)
    return generate


def check_resume(args):
    """Refuse to mix samples of different settings in one out_dir (resume needs the same run)."""
    keys = ["model", "toy_dir", "data_dir", "n", "temperature", "top_p", "max_response_tokens",
            "max_tool_calls", "system_prompt", "search_corpus", "search_url", "seed"]
    path, now = os.path.join(args.out_dir, "run.json"), {k: getattr(args, k) for k in keys}
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        diff = [k for k in keys if before.get(k) != now[k]]
        if diff:
            die(f"{args.out_dir} holds a run with other settings ({', '.join(diff)}); use another --out_dir")
    with open(path, "w") as f:
        json.dump(now, f, indent=2)


def load_all(benches, args):
    """-> ({name: rows}, {name: why skipped}); a malformed row stops with its file and line."""
    data, skipped = {}, {}
    for bench in benches:
        try:
            rows = load_benchmark(bench, args)
        except (DataError, OSError) as e:
            die(e)
        if isinstance(rows, str):
            print(f"skipping {bench.name}: {rows}", file=sys.stderr)
            skipped[bench.name] = rows
        else:
            data[bench.name] = rows
    return data, skipped


def make_judge(args, benches):
    """The LLM judge as judge(question, golds, prediction) -> score, tried once now; None when no
    --judge_url or no judged benchmark is selected."""
    if not args.judge_url or not any(b.metric == "judge" for b in benches):
        return None
    key = args.judge_key or os.environ.get("JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
    judge = lambda q, g, p: ask_judge(q, g, p, args.judge_url, args.judge_model, key)  # noqa: E731
    try:
        judge("What is 1 + 1?", ["2"], "2")
    except JudgeError as e:
        die(e)
    return judge


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    benches = select(args.benchmarks)
    os.makedirs(args.out_dir, exist_ok=True)
    check_resume(args)

    data, skipped = load_all(benches, args)     # every benchmark loads (or is skipped) before the model
    judge = make_judge(args, [b for b in benches if b.name in data])   # checked now, not after hours

    ##### model and agent loop, then evaluate benchmark by benchmark
    if not (args.search_corpus or args.search_url or args.search_cache) and any(
            b.category != "math" and b.name in data for b in benches if b is not TOY):
        print("warning: no --search_url / --search_corpus: knowledge and deep-search questions are "
              "answered without a search tool", file=sys.stderr)
    results = {}
    if data:
        model, tokenizer = load_agent(args, benches[0])
    for bench in benches:
        if bench.name not in data:
            continue
        generate = make_generate(model, tokenizer, *agent_settings(args, bench))
        score = lambda text, row, m=bench.metric: score_response(text, row, m, judge)  # noqa: E731
        try:
            out_path = os.path.join(args.out_dir, f"{bench.name}.jsonl")
            records = evaluate(data[bench.name], generate, score, out_path,
                               n=args.n, batch_size=args.batch_size, desc=bench.name)
        except (DataError, JudgeError) as e:
            die(e)
        results[bench.name] = summarize(records, args.n, args.correct_threshold)

    ##### tables
    table = markdown(results, skipped, judged=judge is not None)
    summary = {"config": dataclasses.asdict(args), "results": results, "skipped": skipped,
               "averages": averages(results),
               "judge": args.judge_model if judge else "exact match (stand-in)"}
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if not results:
        die("no benchmark could be evaluated (see the skipped list above)")
    return summary


def load_agent(args, bench):
    """(model, tokenizer) through runtime.load_model; seeds set first so sampling is repeatable."""
    import appo, runtime
    import torch
    if args.model == EvalArgs.model and not os.path.isdir(args.model):
        die(f"{args.model} not found: run `python appo.py` first, or pass --model=<checkpoint or HF id>")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return runtime.load_model(args.model, appo.Config(device=args.device))


if __name__ == "__main__":
    main()
