"""Tools for a tool-using LLM agent: the tag protocol, a python tool and a search tool.

The agent writes `<python> code </python>` or `<search> query </search>`; generation stops at the
closing tag, the environment runs the call and appends ` <result>\\n...\\n</result>`. Each tool is
one plain function `tool(payload, earlier_calls) -> str`; `toolbox()` binds their backends into the
one mapping name -> callable from which the tags, the stop strings and the parsing are derived.
No training code; this file needs only the Python 3.11+ standard library.

    from tools import Search, toolbox, run_call, format_result
    box = toolbox(search_backend=Search(corpus="wiki.jsonl"))   # or url=..., cache=..., several at once
    name, payload, result = run_call(box, text, earlier_calls)  # the call `text` ends with
    text += format_result(result)

    python tools.py --bench 100000                       # BM25 build time and query latency

The python tool is resource-limited, NOT a security boundary: run untrusted code in a container.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import inspect
import itertools
import json
import math
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from collections import Counter, defaultdict
from typing import Sequence

##### Tag protocol #####

def stop_strings(names) -> tuple[str, ...]:
    """Where generation pauses for a tool: each tool's closing tag. Example: ("</python>", "</search>")."""
    return tuple(f"</{name}>" for name in names)


def parse_tool_call(text: str, names=("python", "search"), after: int = 0) -> tuple[str | None, str] | None:
    """The tool call `text` ends with: (name, payload); (None, reason) when it is malformed; None
    when the text does not end (modulo whitespace) with a closing tool tag (it ended some other
    way: EOS, `</answer>`, length) and there is nothing to run. Never raises.

    `after`: how many characters at the end of `text` came with the token that completed the
    closing tag. A BPE token such as `on>.` ends `</python>` and goes on, so the tag may end
    anywhere in those characters; the call is then the last complete <tool>...</tool> block
    and what follows it in that token is ignored. 0: the text must end with the tag.
    Malformed: no opening tag, empty payload, another tool tag inside. The model stopped and waits
    for a result, so the caller answers with the reason as an error text (see run_call).
    Example: parse_tool_call("x <python>print(1)</python>") -> ("python", "print(1)");
             parse_tool_call("x <python>print(1)</python>.", after=4) -> ("python", "print(1)").
    """
    end = len(text)
    text = text.rstrip()
    closes = [(text.rfind(f"</{t}>") + len(t) + 3, t) for t in names if f"</{t}>" in text]
    close, name = max(closes, default=(-1, None))                   # the last closing tag, where it ends
    if name is None or close < min(len(text), end - after):
        return None
    body = text[: close - len(f"</{name}>")]
    start = body.rfind(f"<{name}>")
    if start < 0:
        return None, f"</{name}> without a matching <{name}>."
    payload = body[start + len(name) + 2:]
    if re.search("</?(?:" + "|".join(map(re.escape, names)) + ")>", payload):
        return None, f"nested or unbalanced tool tags inside <{name}>...</{name}>."
    if not payload.strip():
        return None, f"empty <{name}> block."
    return name, payload.strip()


def format_result(text: str) -> str:
    """What the environment appends after a tool call."""
    return " <result>\n" + text.rstrip() + "\n</result>"


RESULT_SPAN = re.compile(r" <result>\n.*?\n</result>", re.DOTALL)   # exactly what format_result appends
_TAG = re.compile(r"<(/?)([A-Za-z_]\w*)>")


def unbalanced_tags(text: str) -> bool:
    """Outside the tool results, some <tag> is not closed or is closed without opening (a response cut
    off inside a call, say). Any tag counts, so a new tool needs no change here.
    Example: "<python>x</python> <result>\n<b>\n</result>" -> False; "<python>print(1)" -> True."""
    opened = Counter()
    for slash, tag in _TAG.findall(RESULT_SPAN.sub(" ", text)):             # the model's own text
        opened[tag] += -1 if slash else 1
    return any(opened.values())


def default_system_prompt(box: dict) -> str:
    """The system prompt that teaches the tag protocol, listing the tools of `box`."""
    return (f"Solve the question step by step. You can call tools: {describe(box)}. Each result comes "
            "back inside <result> </result>. End with <answer> \\boxed{final answer} </answer>.")


##### Python tool #####

MEMORY_LIMIT_MB = 1024  # RLIMIT_AS; Python + numpy start in ~100 MB of address space
OUTPUT_LIMIT = 4000  # characters kept: the first and last half, with a marker between

# Runs in the fresh interpreter: limits first, then silent replay of history, then the new code.
_RUNNER = r'''
import ast, json, linecache, os, random, resource, signal, sys, traceback
with open("request.json") as f:
    req = json.load(f)
os.remove("request.json")  # the user's code should find an empty working directory
mem = req["memory_mb"] << 20
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (req["cpu_s"], req["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

class ToolTimeout(BaseException):  # BaseException: `except Exception` in user code won't eat it
    pass
def on_alarm(*_):
    raise ToolTimeout
signal.signal(signal.SIGALRM, on_alarm)
random.seed(0)  # so a replayed block draws the same numbers it drew the first time
ns = {"__name__": "__main__", "__builtins__": __builtins__}

def run(src, name, echo, env):
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)  # source in tracebacks
    tree = ast.parse(src, name)
    last = None
    if echo and tree.body and isinstance(tree.body[-1], ast.Expr):  # REPL: show last value
        last = ast.Expression(tree.body.pop().value)
    signal.setitimer(signal.ITIMER_REAL, req["timeout"])
    try:
        exec(compile(tree, name, "exec"), env)
        if last is not None:
            value = eval(compile(last, name, "eval"), env)
            if value is not None:
                print(repr(value))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)

# Replay with stdout/stderr (the fds, so child processes too) sent to /dev/null.
saved = os.dup(1), os.dup(2)
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1); os.dup2(null, 2)
for i, block in enumerate(req["history"]):
    trial = dict(ns)  # a block that fails is skipped: the names it bound are dropped
    try:
        run(block, f"<cell {i + 1}>", False, trial)
        ns = trial
    except BaseException:
        pass
sys.stdout.flush(); sys.stderr.flush()
os.dup2(saved[0], 1); os.dup2(saved[1], 2)

try:
    run(req["code"], "<cell>", True, ns)
except ToolTimeout:
    print(f"\nError: timed out after {req['timeout']:g} s.")
except SystemExit as e:
    if e.code not in (None, 0):
        print(f"SystemExit: {e.code}")
except BaseException as e:
    ns.clear()  # frees what a memory bomb allocated, so formatting the error has room
    sys.stdout.flush()
    tb = e.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell"):
        tb = tb.tb_next  # drop this runner's own frames
    print("".join(traceback.format_exception(type(e), e, tb)).rstrip())
sys.stdout.flush()
'''


def python_tool(code: str, history: Sequence[str] = (), timeout: float = 5.0) -> str:
    """Run `code` in a fresh, resource-limited interpreter and return what it printed.

    `history`: the earlier python blocks of this rollout, replayed silently first so variables
    persist across calls (a branch that forks after two calls passes those two blocks and gets
    their state). Pass every earlier block: one that raises is skipped, the names it bound are
    dropped (in-place changes to existing objects stay, as in a REPL). `random` is seeded so
    replays draw the same numbers. Each block gets `timeout` seconds (SIGALRM in the child);
    the whole process group is SIGKILLed at timeout * (len(history) + 1) + 1 s regardless.
    Returns stdout+stderr (a bare last expression is echoed), the error's traceback, or a
    timeout message; capped at OUTPUT_LIMIT characters. Never raises for bad code.
    """
    budget = timeout * (len(history) + 1) + 1.0
    request = {"code": code, "history": list(history), "timeout": max(timeout, 0.01),
               "memory_mb": MEMORY_LIMIT_MB, "cpu_s": math.ceil(budget) + 1}
    with tempfile.TemporaryDirectory(prefix="python_tool_", ignore_cleanup_errors=True) as cwd:
        with open(os.path.join(cwd, "request.json"), "w") as f:
            json.dump(request, f)
        # -s -P: no user site, no cwd on sys.path (like -I, but -I would ignore PYTHONHASHSEED).
        # Limits are set inside the child: preexec_fn is unsafe with the thread pool below.
        proc = subprocess.Popen(
            [sys.executable, "-s", "-P", "-c", _RUNNER], cwd=cwd, env=_scrubbed_env(cwd),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)  # own process group, so killpg reaches its children
        try:
            out, timed_out = _collect(proc, time.monotonic() + budget)
        finally:
            _kill_group(proc)
            proc.stdout.close()
    text = out.decode("utf-8", errors="replace")
    if timed_out:
        return (text + f"\nError: timed out after {timeout:g} s (process killed).").strip()
    if proc.returncode < 0:  # killed by a signal: CPU limit, segfault, ...
        return (text + f"\nError: process died ({signal.Signals(-proc.returncode).name}).").strip()
    return text.strip() or "(no output)"


def _scrubbed_env(home: str) -> dict[str, str]:
    """Nothing from the parent's environment (keys, tokens, proxies) reaches the code."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home,
            "LANG": "C.UTF-8", "PYTHONUTF8": "1", "PYTHONHASHSEED": "0",  # same sets on replay
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}  # BLAS thread pools would eat the address-space limit


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, bool]:
    """Read output until the runner exits or the deadline passes; keep only head and tail."""
    fd, head, tail, total = proc.stdout.fileno(), bytearray(), bytearray(), 0

    def read() -> bool:
        nonlocal tail, total
        chunk = os.read(fd, 1 << 16)
        total += len(chunk)
        head.extend(chunk[: max(0, OUTPUT_LIMIT - len(head))])
        tail = (tail + chunk)[-OUTPUT_LIMIT:]
        return bool(chunk)

    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0] and not read():
            try:  # EOF while running: the code closed stdout; wait for its exit or the deadline
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            break
    timed_out = proc.poll() is None
    _kill_group(proc)  # also after a clean exit: children it left behind die here
    stop = time.monotonic() + 0.5  # drain what was written before the kill
    while time.monotonic() < stop and select.select([fd], [], [], 0.05)[0] and read():
        pass
    if total <= OUTPUT_LIMIT:
        return bytes(head), timed_out
    half = OUTPUT_LIMIT // 2
    marker = f"\n... [output cut: {total - 2 * half} bytes omitted] ...\n".encode()
    return bytes(head[:half]) + marker + bytes(tail[-half:]), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid thanks to start_new_session
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


##### Search tool #####

NO_RESULTS = "No search results found."  # the wording of the cached results' own misses
_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has had have he her his in is it its of on "
    "or she that the their this to was were what when where which who whom why how with".split())


def _tokenize(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _STOPWORDS]


class BM25:
    """Okapi BM25 (Lucene idf, Pyserini's k1=0.9, b=0.4) with an inverted index.

    Each posting stores its final term weight, so scoring a query is additions only.
    """

    def __init__(self, texts: Sequence[str], k1: float = 0.9, b: float = 0.4):
        ids: dict[str, array] = defaultdict(lambda: array("i"))
        tfs: dict[str, array] = defaultdict(lambda: array("i"))
        lengths = array("i")
        for doc, text in enumerate(texts):
            counts = Counter(_tokenize(text))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                ids[term].append(doc)
                tfs[term].append(tf)
        n, avg = len(lengths), max(1.0, sum(lengths) / max(1, len(lengths)))
        norm = [k1 * (1 - b + b * length / avg) for length in lengths]
        self.postings: dict[str, tuple[array, array, float]] = {}  # ids, weights, max weight
        for term, docs in ids.items():
            idf = math.log(1 + (n - len(docs) + 0.5) / (len(docs) + 0.5))
            weights = array("f", [idf * tf * (k1 + 1) / (tf + norm[d])
                                  for d, tf in zip(docs, tfs[term])])
            self.postings[term] = (docs, weights, max(weights))

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best passages with a positive score, best first. Exact.

        MaxScore pruning: rare (high-weight) terms first; once no unseen passage could still
        reach the current k-th score, common terms only update the candidates (by bisection)
        instead of walking their long posting lists.
        """
        terms = [(*self.postings[t], q) for t, q in Counter(_tokenize(query)).items()
                 if t in self.postings]
        terms.sort(key=lambda term: -term[2] * term[3])
        reach = [0.0] * (len(terms) + 1)  # reach[j]: most a passage can still gain from terms j..
        for j in range(len(terms) - 1, -1, -1):
            reach[j] = reach[j + 1] + terms[j][2] * terms[j][3]
        scores: dict[int, float] = defaultdict(float)
        pruned = False
        for j, (docs, weights, _, q) in enumerate(terms):
            if len(scores) >= k:
                kth = heapq.nlargest(k, scores.values())[-1]
                pruned = pruned or kth > reach[j]
                if pruned:  # keep only candidates that can still reach the k-th score
                    scores = {d: s for d, s in scores.items() if s + reach[j] >= kth}
            if not pruned:
                for d, w in zip(docs, weights):
                    scores[d] += q * w
            elif 8 * len(scores) < len(docs):  # few candidates: look each one up
                for d in scores:
                    i = bisect.bisect_left(docs, d)
                    if i < len(docs) and docs[i] == d:
                        scores[d] += q * weights[i]
            else:
                for d, w in zip(docs, weights):
                    if d in scores:
                        scores[d] += q * w
        return heapq.nlargest(k, scores, key=scores.__getitem__)


class Search:
    """`search(query) -> str`: top passages as `Doc 1 (Title: ...) text` lines (Search-R1).

    corpus: path to JSONL ({"id", "contents": "\\"Title\\"\\ntext"} or {"title", "text"}), or a list
    of such dicts or plain strings; searched with in-process BM25. url: a Search-R1 retriever
    (`POST {"queries": [q], "topk": k, "return_scores": true}`). cache: path to a JSON object
    {query: result text} or such a dict; looked up first, keys compared lowercased, punctuation
    and a "search query:" prefix ignored. Order: cache, then corpus, then url.
    """

    def __init__(self, corpus=None, url=None, cache=None, topk=3, timeout=10.0, retries=2):
        self.url, self.topk, self.timeout, self.retries = url, topk, timeout, retries
        self.cache = None
        if cache is not None:
            if not isinstance(cache, dict):
                with open(cache, encoding="utf-8") as f:
                    cache = json.load(f)
            self.cache = {}
            for key, value in cache.items():
                self.cache.setdefault(_cache_key(key), value)
        self.passages, self.index = None, None
        if corpus is not None:
            self.passages = [_as_passage(item) for item in _read_corpus(corpus)]
            self.index = BM25([f"{title} {text}" for title, text in self.passages])

    def __call__(self, query: str) -> str:
        query = " ".join(str(query).split())
        if not query:
            return "Search error: empty query."
        if self.cache is not None and _cache_key(query) in self.cache:
            return self.cache[_cache_key(query)]
        if self.index is not None:
            hits = self.index.top(query, self.topk)
            if hits or not self.url:
                return _format_docs([self.passages[i] for i in hits])
        if self.url:
            return self._remote(query)
        if self.cache is None:
            return "Search error: no search backend configured (corpus, url or cache)."
        return NO_RESULTS

    def _remote(self, query: str) -> str:
        body = json.dumps({"queries": [query], "topk": self.topk, "return_scores": True}).encode()
        request = urllib.request.Request(self.url, data=body,
                                         headers={"Content-Type": "application/json"})
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.5 * attempt)  # brief backoff for a restarting or busy server
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.load(response)
                break
            except (urllib.error.URLError, OSError, ValueError) as e:  # refused, timeout, HTTP error
                error = e
        else:
            return f"Search error: retriever at {self.url} failed ({error!r})."
        try:
            docs = payload["result"][0][: self.topk]
            return _format_docs([_as_passage(d.get("document", d)) for d in docs])
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            return f"Search error: unexpected retriever response ({e!r})."


def _cache_key(query: str) -> str:
    query = query.strip().lower().removeprefix("search query:")
    return " ".join(re.findall(r"\w+", query))


def _read_corpus(corpus):
    if isinstance(corpus, (str, os.PathLike)):
        with open(corpus, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(corpus)


def _as_passage(item) -> tuple[str, str]:
    """(title, text) from a plain string, {"title", "text"} or FlashRAG {"contents"}."""
    if isinstance(item, str):
        return "", item.strip()
    if "contents" in item and "text" not in item:
        title, _, text = item["contents"].partition("\n")
        return title.strip().strip('"'), text.strip()
    return str(item.get("title", "")).strip().strip('"'), str(item.get("text", "")).strip()


def _format_docs(passages: list[tuple[str, str]]) -> str:
    if not passages:
        return NO_RESULTS
    return "\n".join(f"Doc {i} (Title: {title}) {text}" if title else f"Doc {i} {text}"
                     for i, (title, text) in enumerate(passages, 1))


##### The tools: one function each, and one entry in toolbox() #####

def python(code: str, earlier: Sequence = (), *, timeout: float = 5.0) -> str:
    """runs Python and shows what it prints"""
    history = [payload for name, payload in earlier if name == "python"]   # this rollout's python state
    return python_tool(code, history, timeout)


def search(query: str, earlier: Sequence = (), *, backend=None) -> str:
    """searches a knowledge base"""
    return backend(query) if backend is not None else "Error: no search backend configured."


def toolbox(search_backend=None, timeout: float = 5.0) -> dict:
    """The agent's tools with their backends bound: {name: tool(payload, earlier_calls) -> str}.

    `earlier_calls` are the rollout's previous (name, payload) calls, so a tool that keeps state
    (python) rebuilds exactly what the rollout's prefix implies, also on a branch. Tags, stop
    strings, parsing and the system prompt's tool list all come from this mapping: to add a tool,
    write one function like `python` above and add one entry here.
    """
    return {"python": functools.partial(python, timeout=timeout),
            "search": functools.partial(search, backend=search_backend)}


def describe(box: dict) -> str:
    """The tool list for a system prompt, from each tool's first parameter and docstring.
    Example: "<python> code </python> runs Python and shows what it prints"."""
    def one(name, tool):
        fn = tool.func if isinstance(tool, functools.partial) else tool
        arg = next(iter(inspect.signature(fn).parameters))
        return f"<{name}> {arg} </{name}> {(fn.__doc__ or name).strip().splitlines()[0]}"
    return ", ".join(one(name, tool) for name, tool in box.items())


def run_call(box: dict, text: str, earlier: Sequence = (),
             after: int = 0) -> tuple[str | None, str | None, str]:
    """Run the call `text` ends with -> (name, payload, result text). A malformed or unknown call
    gets an error text and name None; a failing tool gets an error text. Never raises. `after`:
    characters of the last token, which may run past the closing tag (see parse_tool_call)."""
    call = parse_tool_call(text, tuple(box), after)
    if call is None or call[0] is None:
        return None, None, f"Error: {call[1] if call else 'the text does not end with a tool call.'}"
    name, payload = call
    try:
        return name, payload, box[name](payload, list(earlier))
    except Exception as e:  # a broken backend must not kill a rollout batch
        return name, payload, f"Error: {name} tool failed ({e!r})."


##### Benchmark #####

def bench(n: int = 100_000, words: int = 100, queries: int = 200, seed: int = 0) -> None:
    """BM25 build time and query latency on `n` synthetic passages (Zipf-distributed vocabulary).

    Queries are drawn from the same Zipf law, once as is, once without the 50 most frequent
    words (stand-ins for the stopwords the tokenizer drops from real text).
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    cum = list(itertools.accumulate(1 / (r + 1) for r in range(len(vocab))))
    corpus = [{"title": f"t{i}", "text": " ".join(rng.choices(vocab, cum_weights=cum, k=words))}
              for i in range(n)]
    start = time.perf_counter()
    search = Search(corpus=corpus)
    print(f"{n} passages x {words} words: index built in {time.perf_counter() - start:.1f} s")
    for label, skip in (("zipf queries", 0), ("zipf queries, top-50 words dropped", 50)):
        lat = []
        for _ in range(queries):
            q = " ".join(w for w in rng.choices(vocab[skip:], cum_weights=cum[: len(vocab) - skip],
                                               k=rng.randint(3, 10)))
            t = time.perf_counter()
            search(q)
            lat.append(1000 * (time.perf_counter() - t))
        lat.sort()
        print(f"{label} ({queries}, 3-10 words): mean {sum(lat) / len(lat):.1f} ms, "
              f"p50 {lat[len(lat) // 2]:.1f} ms, p95 {lat[int(0.95 * len(lat))]:.1f} ms, "
              f"max {lat[-1]:.1f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bench"]:
        bench(int(sys.argv[2]) if len(sys.argv) > 2 else 100_000)
    else:
        print(__doc__)
