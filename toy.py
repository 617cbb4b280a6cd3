"""The embedded default of appo.py: a toy tool world in which RL visibly improves a tiny model.

A labelled teaching environment, like CartPole for PPO: offline, generated from a seed, small enough
for a laptop CPU, and built so the thing the paper is about can be seen. Every question needs a tool,
and every question type hides one *decision* the cold-start data is noisy about:

    type    example                                      right procedure             decision (where)
    arith   What is 41 + 7 * 51?                         <python>print(41 + 7 * 51)  tool or memory (start) 
    onehop  Where was Kalove, a sibling of Ralove, born? <search>Kalove              which entity (in a call)
    twohop  Where was the founder of Minlo born?         <search>Minlo, then the     search again or answer
                                                         founder's name              (between the hops)

The SFT "teacher" always does the mechanics right (copies operands and names, copies the tool's
output into \\boxed{}), but at each decision it takes the wrong option with probability `wrong_rate`
(answers from memory, searches the other name, stops a hop short), as weak distilled data does.
With wrong_rate > 0.5 greedy decoding of the SFT model takes the wrong option, while sampling
takes the right one often: RL has something real to find, at tokens throughout the sequence.
Some traces also recover from a tool error or an empty search, so RL's -1s are earned.

Splits: SFT traces, RL questions, validation and test are disjoint sets of questions (people,
companies and numbers are shared, so every name is a token the model has seen).
"""
import json
import math
import os
import random
import sys

import tools

SYLLABLES = "ka lo ve ri ta mon zu bel dra fi ne os pra ul gar min so vik al dun pe tor".split()
SYSTEM_PROMPT = "Use tools."    # the toy model learns the protocol from its SFT traces; short = fast
TYPES = ("arith", "onehop", "twohop")
PROTOCOL = "<python>print()</python> <search></search> <result>\n</result> <answer>\\boxed{}</answer>"
FILLER = ("ok", "now", "well", "then", "right", "next", "first", "sure")
"""The filler words of the pilot-question setting (teacher_trace's `filler`): inconsequential choices.
None is a name syllable ("so" is one: a name's "so" token would read as filler) or a word of the
world's text, so a token " now" the agent writes is always a filler word."""
TOOL_MESSAGES = ("Error: the text before </python> or </search> is not a tool call. Error: tool-call limit "
                 "(3) reached; give your answer. Error: timed out after 5 s. SyntaxError NameError")


def make_world(seed, n_families=340, siblings=6, n_companies=450, n_cities=40):
    """Invented people (born in a city, mentored by another person) and companies (based in a city,
    founded by a person), the corpus describing them, and every question about them.
    People come in families: siblings share the last two syllables (Kalove, Ralove), so a one-hop
    question's decoy (a sibling) differs from its subject in the first syllable only, and the
    entity decision is that one token. Returns (questions by type, corpus passages)."""
    rng = random.Random(seed)
    names = _namer(rng)
    cities, families = names(n_cities, 2), names(n_families, 2)
    people, sibling = [], {}
    for family in families:                                  # every name has 3 syllables: fixed lengths
        given = rng.sample([s for s in SYLLABLES if s not in family.lower()], siblings)
        kin = [g.capitalize() + family.lower() for g in given]
        people += kin
        sibling.update({p: kin[(i + 1) % siblings] for i, p in enumerate(kin)})
    companies = names(n_companies, 3, taken=people)
    facts = {"born": {p: rng.choice(cities) for p in people},
             "mentor": {p: rng.choice([q for q in people if q != p]) for p in people},
             "based": {c: rng.choice(cities) for c in companies},
             "founder": {c: rng.choice(people) for c in companies}, "sibling": sibling}
    born, mentor, based, founder = (facts[k] for k in ("born", "mentor", "based", "founder"))
    corpus = [f'"{p}"\n{p} was born in {born[p]}. {p} was mentored by {mentor[p]}.' for p in people]
    corpus += [f'"{c}"\n{c} is a company based in {based[c]}. It was founded by {founder[c]}.'
               for c in companies]
    questions = _questions(rng, people, companies, facts)
    return questions, [{"id": str(i), "contents": text} for i, text in enumerate(corpus)]


def _namer(rng):
    """names(n, syllables, taken=()) -> n new capitalised names, none used before."""
    used = set()

    def names(n, parts, taken=()):
        used.update(taken)
        if n > math.perm(len(SYLLABLES), parts) - len(used):
            raise ValueError(f"{n} names of {parts} syllables: too many for {len(SYLLABLES)} syllables")
        out = []
        while len(out) < n:
            # no syllable twice in a name ("Zukaka"): a copy would not know which "ka" it is at
            if (w := "".join(rng.sample(SYLLABLES, parts)).capitalize()) not in used:
                used.add(w)
                out.append(w)
        return out
    return names


def _questions(rng, people, companies, facts):
    """Every question of the world, by type, shuffled."""
    born, mentor, based, founder, sibling = (facts[k] for k in
                                             ("born", "mentor", "based", "founder", "sibling"))
    qa = lambda q, a, t, **plan: {"question": q, "answer": [a], "kind": "qa", "type": t, **plan}
    onehop = [qa(f"Where was {p}, a sibling of {sibling[p]}, born?", born[p], "onehop", hops=[p],
                 decoy=sibling[p], decoy_answer=born[sibling[p]]) for p in people]
    twohop = [qa(f"Where was the mentor of {p} born?", born[mentor[p]], "twohop", hops=[p, mentor[p]],
                 shortcut=born[p]) for p in people]
    for c in companies:        # the shortcut is what the first hop shows
        p = founder[c]
        twohop.append(qa(f"Where was the founder of {c} born?", born[p], "twohop", hops=[c, p],
                         shortcut=based[c]))
        twohop.append(qa(f"Who mentored the founder of {c}?", mentor[p], "twohop", hops=[c, p], shortcut=p))
    arith, seen = [], set()
    while len(arith) < len(twohop):      # one template, fixed digit counts, 3-digit results: fixed offsets
        code = f"{rng.randint(10, 99)} + {rng.randint(2, 9)} * {rng.randint(11, 99)}"
        if code not in seen and 100 <= eval(code) <= 999:
            seen.add(code)
            arith.append({"question": f"What is {code}?", "answer": [str(eval(code))], "kind": "math",
                          "type": "arith", "code": code})
    for pool in (onehop, twohop, arith):
        rng.shuffle(pool)
    return {"arith": arith, "onehop": onehop, "twohop": twohop}


def split_world(questions, sizes):
    """Disjoint splits, each a third of every type: sizes = {split: questions}, taken in order
    test, val, rl, then sft gets what remains (up to its size). Returns {split: [examples]}."""
    out, used = {}, {t: 0 for t in TYPES}
    for split in ("test", "val", "rl", "sft"):
        rows = []
        for i, t in enumerate(TYPES):
            want = sizes[split] // 3 + (i < sizes[split] % 3)
            take = questions[t][used[t]:used[t] + want]
            if len(take) < want:
                raise ValueError(f"the toy world has too few {t} questions for split sizes {sizes}")
            used[t] += want
            rows += take
        random.Random(len(rows)).shuffle(rows)
        out[split] = rows
    return out


def teacher_trace(ex, search, rng, wrong_rate, error_rate, filler=False):
    """One cold-start SFT response with the tag protocol inline: the right mechanics always; the
    wrong option at the example's decision with probability `wrong_rate`; with `error_rate` a
    recovered slip first (a python syntax error, or a search with nothing in it).

    filler: a word drawn uniformly from FILLER stands before every action (each tool call and the
    answer), in place of the space after a tool result and at the very start, with its own leading
    space so the tokenizer makes it one token (` [a-z]+`):
        " now<search>Kalove</search> <result>\\n...\\n</result> then<answer>\\boxed{Belne}</answer>"
    Equivalent choices (high entropy after SFT, ~ln 8 nats) that change nothing: the tool-call
    parser takes the last <tool>...</tool> block of a segment and ignores the text before it, and the
    reward reads only what is inside <answer>. Off, the rng is not drawn from for it: the same traces.
    """
    gap = lambda: f" {rng.choice(FILLER)}" if filler else " "         # what stands before an action
    box = lambda a: f"<answer>\\boxed{{{a}}}</answer>"
    call = lambda tag, payload, result: f"<{tag}>{payload}</{tag}>{tools.format_result(result)}{gap()}"
    wrong, slip = rng.random() < wrong_rate, rng.random() < error_rate
    text = gap() if filler else ""
    if ex["type"] == "arith":
        if wrong:                                           # from memory: a tiny model cannot multiply
            return text + box(int(ex["answer"][0]) + rng.choice([-1, 1]) * rng.randint(1, 60))
        if slip:
            text += call("python", f"print({ex['code']}", tools.python_tool(f"print({ex['code']}"))
        return text + call("python", f"print({ex['code']})", ex["answer"][0]) + box(ex["answer"][0])
    if slip:
        text += call("search", "who was it", search("who was it"))          # stopwords only: no result
    if ex["type"] == "onehop":
        entity, answer = (ex["decoy"], ex["decoy_answer"]) if wrong else (ex["hops"][0], ex["answer"][0])
        return text + call("search", entity, search(entity)) + box(answer)
    text += call("search", ex["hops"][0], search(ex["hops"][0]))
    if wrong:                                               # one hop short
        return text + box(ex["shortcut"])
    return text + call("search", ex["hops"][1], search(ex["hops"][1])) + box(ex["answer"][0])


def fork_role(tokens, mask, t):
    """What a fork at t branches on, in the toy's terms (tokens: a response's token texts, as in the
    tree records; a branch keeps y_t and re-samples from y_{t+1} by default):
    "filler"   a FILLER word the model wrote (teacher_trace's `filler`: high entropy, no consequence);
    "decision" the choice of action (<python>, <search>, <answer>: tool or memory, search again or
               answer) or the first syllable of a searched name (which entity: siblings differ there);
    "other"    copying (digits, names, code), closing tags, what is boxed.
    Example: tokens [" now", "<search>", "Ka", "lo", "ve", "</search>"], mask [1] * 6:
             t = 0 -> "filler", t = 1 -> "decision", t = 2 -> "decision", t = 3 -> "other".
    """
    if tokens[t].strip() in FILLER and mask[t]:
        return "filler"
    if tokens[t] in ("<python>", "<search>", "<answer>") or (t > 0 and tokens[t - 1] == "<search>"):
        return "decision"
    return "other"


def procedure_ok(ex, rollout):
    """Did the rollout take the right option at the example's decision (whatever came after)?"""
    payloads = [p for n, p, _ in rollout.calls]
    if ex["type"] == "arith":
        return any(n == "python" for n, _, _ in rollout.calls)
    if ex["type"] == "onehop":
        return ex["hops"][0] in payloads
    return all(h in payloads for h in ex["hops"])


def build_tokenizer(texts):
    """A word-level tokenizer over the world's own text, built without training (deterministic): each
    tag of the protocol (`<search>`, `</result>`, `\\boxed{`...) is one token, a lowercase word takes
    the space before it (` was`), and every other space, punctuation mark, digit and name syllable is
    its own token. Names are then 2-3 syllable tokens and numbers 3 digits, of fixed length, so every
    copy the agent makes (operands into code, a name into a search, a tool's output into the answer) is
    at a fixed offset, and a ~200-token vocabulary keeps the model fast; tags and word-spaces as single
    tokens make the toy's sequences ~30 % shorter, which every phase of a run pays for. Text the world
    never contains (a Python traceback in a tool result) reads as <|unk|>.
    Example: "<search>Kalove</search> was" -> ["<search>", "Ka", "lo", "ve", "</search>", " was"]."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    syllables = sorted(SYLLABLES + [s.capitalize() for s in SYLLABLES], key=lambda s: (-len(s), s))
    tags = r"</?(?:search|python|result|answer)>|\\boxed\{"
    pre = pre_tokenizers.Split(Regex("|".join([tags, r" [a-z]+", r"\s", r"[^\w\s]", r"\d", *syllables])),
                               "isolated")
    texts = [*texts, PROTOCOL, tools.NO_RESULTS, TOOL_MESSAGES]         # the tag protocol is always known
    pieces = {p for text in texts for p, _ in pre.pre_tokenize_str(text)} | set(syllables) | set("0123456789")
    vocab = {"<|pad|>": 0, "<|eos|>": 1, "<|unk|>": 2}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer, tok.decoder = pre, decoders.Fuse()       # spaces are in tokens: decoding joins them
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>",
                                   unk_token="<|unk|>")


def build_model(tokenizer, seed, hidden, layers, heads):
    """A tiny Llama-architecture model (saved and loaded like any Hub model). Not Qwen2: transformers
    5 swaps in Qwen2's own tokenizer for a qwen2 config, dropping ours."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build(out_dir, seed, sizes, wrong_rate, error_rate, hidden, layers, heads, prompt_text, filler=False):
    """Write the world (splits, corpus, SFT traces) and the untrained model + tokenizer under
    out_dir/world and out_dir/init; cached: a second call reads them back. `prompt_text(question)`
    renders a prompt as appo.py will. `filler`: teacher_trace's; recorded in world/settings.json (a
    world without it has none), and a cached world of the other setting raises ValueError.
    Returns {split: examples}, the corpus path, the init dir."""
    world, init = os.path.join(out_dir, "world"), os.path.join(out_dir, "init")
    names = list(sizes) + ["corpus"]
    paths = {k: os.path.join(world, f"{k}.jsonl") for k in names}
    settings = os.path.join(world, "settings.json")
    if all(os.path.exists(p) for p in paths.values()):
        cached = {"filler": False}                          # worlds cached before the setting existed
        if os.path.exists(settings):
            with open(settings) as f:
                cached = json.load(f)
        if cached["filler"] != filler:
            raise ValueError(f"the toy world cached in {world} was built with toy_filler={cached['filler']}, "
                             f"this run asks for toy_filler={filler}: use another --toy_dir (or --out_dir)")
    else:
        questions, corpus = make_world(seed)
        splits = split_world(questions, sizes)
        search = tools.Search(corpus=corpus, topk=1)
        rng = random.Random(seed)
        splits["sft"] = [dict(ex, response=teacher_trace(ex, search, rng, wrong_rate, error_rate, filler))
                         for ex in splits["sft"]]
        os.makedirs(world, exist_ok=True)
        with open(settings, "w") as f:                      # first: complete splits imply their settings
            json.dump({"filler": filler}, f)
        for k in names:
            _write_jsonl(paths[k], corpus if k == "corpus" else splits[k])
    splits = {k: _read_jsonl(paths[k]) for k in sizes}
    if not os.path.exists(os.path.join(init, "config.json")):
        texts = [prompt_text(ex["question"]) + ex.get("response", "")
                 for rows in splits.values() for ex in rows]
        texts += [p["contents"] for p in _read_jsonl(paths["corpus"])]
        tokenizer = build_tokenizer(texts)
        build_model(tokenizer, seed, hidden, layers, heads).save_pretrained(init)
        tokenizer.save_pretrained(init)
    return splits, paths["corpus"], init


# ---------------------------------------------------------------------------------------------
# The same world for a real chat model (SmolLM2, Qwen): natural-language traces, noisy decisions
# ---------------------------------------------------------------------------------------------
# Like teacher_trace, but in plain sentences around the calls, so a pretrained chat model learns the
# tag protocol from a few hundred examples, and with the same decisions left to RL: at each question's
# decision the teacher takes the wrong option with probability `wrong_rate`. Each sentence comes in a
# few equivalent phrasings (inconsequential choices, as the pilot's filler words) around the one word
# that decides: "I'll compute this with Python." / "I'll compute this in my head." `python toy.py
# natural DIR` writes them.
ARITH_INTRO = ("I'll compute this {how}.", "Let me calculate this {how}.", "I will evaluate the expression {how}.")
TOOL, MEMORY = "with Python", "in my head"            # the arith decision: the word after the phrasing
ARITH_OUTRO = ("The result is {a}.", "Python prints {a}, so {code} = {a}.", "So the answer is {a}.")
MENTAL = ("{code} = {a}.", "That gives {a}.", "{code} comes to {a}.")     # from memory: a wrong number
SEARCH_INTRO = ("I need to find {goal}.", "To answer this, I need to know {goal}.",
                "Let me search for {goal}.")
READ = ("The passage says {fact}", "According to the passage, {fact}", "I found that {fact}")
NEXT = ("Now I need to find {goal}.", "Next, I need to know {goal}.", "So I still need to find {goal}.")
ANSWER = ("<answer>\\boxed{{{a}}}</answer>", "<answer>The answer is \\boxed{{{a}}}.</answer>")
FIX_CODE = "I left a parenthesis open. Let me fix the code.\n"
FIX_QUERY = "That search found nothing. I should search for the name itself.\n"
SLIP_QUERY = "who was it"                             # stopwords only: the search finds nothing


def hops_of(ex):
    """A search question -> [(entity to search, what we look for, relation, value)], in order."""
    q, a, (h0, h1) = ex["question"], ex["answer"][0], (ex["hops"] + [None])[:2]
    if ex["type"] == "onehop":
        return [(h0, f"where {h0} was born", "was born in", a)]
    if q.startswith("Where was the mentor of"):
        return [(h0, f"who mentored {h0}", "was mentored by", h1),
                (h1, f"where {h1} was born", "was born in", a)]
    first = (h0, f"who founded {h0}", "was founded by", h1)
    if q.startswith("Who mentored the founder of"):
        return [first, (h1, f"who mentored {h1}", "was mentored by", a)]
    return [first, (h1, f"where {h1} was born", "was born in", a)]


def shortcut_fact(ex):
    """A two-hop question's wrong stop: what the first passage says that reads like an answer
    (the first hop's own birthplace, the company's city, the founder's name) -> (relation, value)."""
    q = ex["question"]
    if q.startswith("Where was the mentor of"):
        return "was born in", ex["shortcut"]
    return ("is based in" if q.startswith("Where was the founder of") else "was founded by"), ex["shortcut"]


def natural_trace(ex, search, rng, wrong_rate=0.0, error_rate=0.0):
    """The assistant's response to one toy question, reasoning in sentences between the calls. The
    mechanics are always right (operands and names copied, results read, tags closed). With
    probability `wrong_rate` it takes the wrong option at the question's decision, as teacher_trace:
      arith   "... in my head." and a wrong number, instead of "... with Python." and the call;
      onehop  searches the sibling named in the question (the decoy) and answers that sibling's city;
      twohop  reads the first passage's other fact and answers it, one hop short.
    With probability `error_rate` it first recovers from a slip (a python syntax error, or a search
    that finds nothing), so the data covers what RL rollouts meet. With both rates 0 it takes the
    right procedure every time, and the rng is drawn from only for the phrasing."""
    a = ex["answer"][0]
    wrong, slip = rng.random() < wrong_rate, rng.random() < error_rate
    if ex["type"] == "arith":
        if wrong:                                     # a 135M model cannot multiply 3-digit numbers
            guess = str(int(a) + rng.choice([-1, 1]) * rng.randint(1, 60))
            return (f"{rng.choice(ARITH_INTRO).format(how=MEMORY)}\n"
                    f"{rng.choice(MENTAL).format(code=ex['code'], a=guess)}\n{rng.choice(ANSWER).format(a=guess)}")
        text = f"{rng.choice(ARITH_INTRO).format(how=TOOL)}\n"
        if slip:
            broken = f"print({ex['code']}"
            text += f"<python>{broken}</python>{tools.format_result(tools.python_tool(broken))} {FIX_CODE}"
        out = tools.python_tool(f"print({ex['code']})")
        assert out == a, (ex, out)
        return (f"{text}<python>print({ex['code']})</python>{tools.format_result(out)} "
                f"{rng.choice(ARITH_OUTRO).format(a=a, code=ex['code'])}\n{rng.choice(ANSWER).format(a=a)}")
    hops = hops_of(ex)
    if ex["type"] == "onehop" and wrong:              # the sibling: the question's other name
        hops = [(ex["decoy"], f"where {ex['decoy']} was born", "was born in", ex["decoy_answer"])]
    text = ""
    for i, (entity, goal, relation, value) in enumerate(hops):
        text += f"{rng.choice(NEXT if i else SEARCH_INTRO).format(goal=goal)}\n"
        if slip and i == 0:
            text += f"<search>{SLIP_QUERY}</search>{tools.format_result(search(SLIP_QUERY))} {FIX_QUERY}"
        result = search(entity)
        assert f"(Title: {entity})" in result and value in result, (ex, result)   # topk=1 found it
        text += f"<search>{entity}</search>{tools.format_result(result)} "
        if ex["type"] == "twohop" and i == 0 and wrong:
            relation, value = shortcut_fact(ex)
            fact = rng.choice(READ).format(fact=f"{entity} {relation} {value}.")
            return text + f"{fact}\n{rng.choice(ANSWER).format(a=value)}"
        text += f"{rng.choice(READ).format(fact=f'{entity} {relation} {value}.')}\n"
    return text + rng.choice(ANSWER).format(a=hops[-1][3])         # the last passage's fact


def sft_row(ex, search, rng, system_prompt, wrong_rate=0.0, error_rate=0.0):
    response = natural_trace(ex, search, rng, wrong_rate, error_rate)
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": ex["question"]},
                {"role": "assistant", "content": response}]
    return {"messages": messages, "question": ex["question"], "response": response, "kind": ex["kind"],
            "type": ex["type"], "answer": ex["answer"]}


def export_natural(out_dir, seed=0, n_sft=600, n_rl=300, n_val=150, n_test=150, wrong_rate=0.0, error_rate=0.0):
    """Write sft.jsonl (natural_trace at these rates), rl.jsonl, val.jsonl, test.jsonl (disjoint
    questions, a third of each type; val and test keep the decision fields of toy.procedure_ok) and
    corpus.jsonl into out_dir. Returns {file name: rows written}."""
    questions, corpus = make_world(seed)
    splits = split_world(questions, {"test": n_test, "val": n_val, "rl": n_rl, "sft": n_sft})
    search, rng = tools.Search(corpus=corpus, topk=1), random.Random(seed)
    system_prompt = tools.default_system_prompt(tools.toolbox())
    plain = lambda rows: [{k: ex[k] for k in ("question", "answer", "kind", "type")} for ex in rows]
    files = {"sft.jsonl": [sft_row(ex, search, rng, system_prompt, wrong_rate, error_rate) for ex in splits["sft"]],
             "rl.jsonl": plain(splits["rl"]), "val.jsonl": splits["val"], "test.jsonl": splits["test"],
             "corpus.jsonl": corpus}
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        _write_jsonl(os.path.join(out_dir, name), rows)
    return {name: len(rows) for name, rows in files.items()}


def _write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


NATURAL = {"seed": 0, "sft": 600, "rl": 300, "val": 150, "test": 150, "wrong_rate": 0.0, "error_rate": 0.0}


def natural_main(argv):
    """python toy.py natural OUT_DIR [--seed=0 --sft=600 --rl=300 --val=150 --test=150 --wrong_rate=0
    --error_rate=0]"""
    usage = "usage: python toy.py natural OUT_DIR " + " ".join(f"[--{k}={v}]" for k, v in NATURAL.items())
    if len(argv) < 2 or argv[0] != "natural" or argv[1].startswith("--"):
        sys.exit(usage)
    opts = dict(NATURAL)
    for arg in argv[2:]:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts or not value:
            sys.exit(f"toy.py natural: unknown or empty flag {arg!r}\n{usage}")
        try:
            opts[key] = type(NATURAL[key])(value)
        except ValueError:
            sys.exit(f"toy.py natural: --{key} takes a number, not {value!r}")
    if not (0 <= opts["wrong_rate"] <= 1 and 0 <= opts["error_rate"] <= 1):
        sys.exit("toy.py natural: --wrong_rate and --error_rate are probabilities in [0, 1]")
    try:
        print(export_natural(argv[1], opts["seed"], opts["sft"], opts["rl"], opts["val"], opts["test"],
                             opts["wrong_rate"], opts["error_rate"]))
    except ValueError as e:                            # split sizes the world cannot fill
        sys.exit(f"toy.py natural: {e}")


if __name__ == "__main__":
    natural_main(sys.argv[1:])
