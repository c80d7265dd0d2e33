"""
RULER (Hsieh et al. 2024, NVIDIA/RULER), the long-context benchmark model cards report since 2024: its
synthetic tasks generated as RULER generates them, each prompt exactly `length` tokens of the model's own
tokenizer, and RULER's scoring. `eval.py ruler` runs it on a checkpoint.

    src, tasks = make_sources(tok, list(TASKS), [8192], ["pg19/val.jsonl"], [], seed=0)  # haystack, words, vt's example
    s, _ = make_sample(TASKS["niah_multikey_1"], tok, 8192, index=0, seed=0, src=src)  # s.ids: 8192 ids exactly
    score(TASKS["niah_multikey_1"], " 1234567.", s.answers)                            # RULER's metric, 0..1
    scores = evaluate(model, tok, tasks, [8192], 100, 0, src, batch_size=4)           # {task: {length: 0..100}}

Read from RULER's repository (written anew here): the templates, answer prefixes and tokens to generate
(scripts/data/synthetic/constants.py), the task arguments (scripts/synthetic.yaml), the needles and
haystacks (scripts/data/synthetic/niah.py), the chains and their one-shot example (variable_tracking.py),
the word lists (common_words_extraction.py), the Zipf-coded text (freq_words_extraction.py), the documents
(qa.py), and the metrics (scripts/eval/synthetic/constants.py, evaluate.py): string_match_all, the fraction
of the references found in the answer (every task but QA), string_match_part, 1 if any is (QA).

The prompt is RULER's template with its answer prefix after it (RULER's prompt for base models; vt's reads
"assigned", as RULER's has since May 2025, where earlier versions read "assgined"). Where we differ, and why:
- Length: RULER fits prompt + tokens to generate under the length; here the prompt alone is `length` ids
  (BOS included): the haystack amount is the largest that fits (searched), and the few tokens still missing
  are the haystack's own continuation, put in at a token boundary at the end of the context (fit).
- Words: RULER draws keys and cwe's words from the wonderwords package, which we do not depend on: keys are
  adjective-noun pairs from the small lists below; cwe's words are the distinct words of the haystack.
  Sentences are split by a regular expression, not nltk. Distractor needles never reuse a real key.
- Randomness: every sample has its own random.Random(seed, task, length, index): reproducible alone.
- Decoding stops at EOS, or at a newline once the answer has begun (RULER's newline stop word).
"""

import json
import math
import os
import random
import re
import string
import uuid
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from generation import greedy_batch

# ---- RULER's prompts (scripts/data/synthetic/constants.py) ----------------------------------------------

NIAH = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. I will "
        "quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic {type_needle_v} for "
        "{query} mentioned in the provided text? The special magic {type_needle_v} for {query} mentioned in the "
        "provided text are")
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: "
      "Find all variables that are assigned the value {query} in the text above. Answer: According to the chain(s) "
      "of variable assignment in the text above, {num_v} variables are assigned the value {query}, they are: ")
CWE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
       "that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list? Answer: "
       "The top 10 words that appear most often in the list are:")
FWE = ("Read the following coded text and track the frequency of each coded word. Find the three most frequently "
       "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
       "What are the three most frequently appeared words in the above coded text? Answer: According to the coded "
       "text above, the three most frequently appeared words are:")
QA = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
      "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
      "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query} Answer:")
DOCUMENT = "Document {i}:\n{document}"
DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True))]  # niah.py's needle depths (%)

# keys are "adjective-noun" as RULER's, from these lists instead of wonderwords' (over 60 x 60 = 3600 keys)
ADJECTIVES = ("able acid angry bitter brave bright broad calm cheap clean clever cold cool cruel curly damp dark dear "
              "deep dense dry dull eager early easy empty equal fair false fancy fast fat fierce firm flat fresh "
              "gentle giant glad gold grand great green happy hard harsh heavy high hollow honest huge humble icy "
              "idle jolly keen kind large late lazy light little lively long loud low lucky mad mild modern narrow "
              "neat noble odd old pale plain polite poor proud quick quiet rapid rare raw red rich rough round royal "
              "rude sad safe salty sharp shy silent silly simple slow small smooth soft solid sour spare steep "
              "stiff strange strict strong sweet swift tall tame tender thick thin tidy tiny tough true ugly vast "
              "warm weak wet white wide wild wise witty young").split()
NOUNS = ("actor anchor apple arrow badge bakery banana barrel basket beach beard bell bicycle blanket boat bottle "
         "bridge broom bucket butter button cabin camera candle canyon carpet castle cattle cellar chair cheese "
         "cherry chimney circle clock cloud coat coffee comet copper cotton cradle crayon crown cup curtain "
         "desert diamond dinner doctor dragon drawer drum eagle engine falcon farmer feather fence fiddle forest "
         "fountain garden garlic ghost glacier glove goat guitar hammer harbor helmet hill honey horse island "
         "jacket jelly kettle kitten ladder lantern lemon library lion magnet mango marble meadow mirror monkey "
         "needle oven owl paddle palace parrot pencil pepper piano pillow pirate planet pocket potato puzzle "
         "rabbit radio river rocket saddle sailor salad shadow shovel silver spider spoon squirrel statue "
         "stove sugar sunset teapot tiger tomato tower tractor tunnel turtle violin wagon walnut whistle window "
         "wizard zebra").split()


# ---- the tasks (scripts/synthetic.yaml) -------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    name: str
    kind: str            # niah, vt, cwe, fwe, qa
    max_new: int         # RULER's tokens_to_generate
    haystack: str = ""   # niah: essay (the user's text), noise (NOISE repeated), needle (distractor needles)
    key: str = "words"   # niah: what keys and values are (words, numbers, uuids) and how many
    value: str = "numbers"
    k: int = 1
    v: int = 1
    q: int = 1
    dataset: str = ""    # qa: squad or hotpotqa

    @property
    def metric(self):
        return "string_match_part" if self.kind == "qa" else "string_match_all"

    @property
    def needs_haystack(self):
        return self.haystack == "essay" or self.kind == "cwe"


TASKS = {t.name: t for t in [
    Task("niah_single_1", "niah", 128, "noise"),
    Task("niah_single_2", "niah", 128, "essay"),
    Task("niah_single_3", "niah", 128, "essay", value="uuids"),
    Task("niah_multikey_1", "niah", 128, "essay", k=4),
    Task("niah_multikey_2", "niah", 128, "needle"),
    Task("niah_multikey_3", "niah", 128, "needle", key="uuids", value="uuids"),
    Task("niah_multivalue", "niah", 128, "essay", v=4),
    Task("niah_multiquery", "niah", 128, "essay", q=4),
    Task("vt", "vt", 30),
    Task("cwe", "cwe", 120),
    Task("fwe", "fwe", 50),
    Task("qa_1", "qa", 32, dataset="squad"),
    Task("qa_2", "qa", 32, dataset="hotpotqa"),
]}


@dataclass
class Prompt:
    """A prompt's text as head + context + tail; `more` continues the context (what fit() pads with)."""
    head: str
    context: str
    tail: str
    more: str
    answers: list


@dataclass
class Sources:
    """What the tasks draw from: the haystack's words (essay tasks) and its distinct ones (cwe), the QA data
    {"squad" or "hotpotqa": (questions, documents)}, vt's one-shot example, and the haystack units of each
    (task, length)'s first sample, found by make_sources' check: the run starts its search there."""
    words: list = None
    vocab: list = None
    qa: dict = None
    vt_example: tuple = None
    guesses: dict = None


def template_parts(template, **fields):
    """(head, tail): the template filled in, split where its {context} goes."""
    head, tail = template.format(context="\0", **fields).split("\0")
    return head, tail


def draw(rng, kind, avoid=()):
    """A key or value as niah.py draws them: a 7-digit number, an adjective-noun pair, or a UUID."""
    while True:
        if kind == "numbers":
            x = str(rng.randint(10**6, 10**7 - 1))
        elif kind == "words":
            x = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        else:
            x = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if x not in avoid:
            return x


# ---- needle in a haystack (niah.py) ---------------------------------------------------------------------

def niah(task, rng, n, src, length):
    """n haystack units (essay words, noise sentences or distractor needles) with the task's needles."""
    keys = []
    for _ in range(max(task.k, task.q)):
        keys.append(draw(rng, task.key, keys))
    values = [[draw(rng, task.value) for _ in range(task.v)] for _ in keys]
    asked = rng.sample(range(len(keys)), task.q)
    needles = [NEEDLE.format(type_needle_v=task.value, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if task.haystack == "essay":
        context, more = essay_context(rng, src.words, n, needles), " " + " ".join(src.words[n:n + 64])
    else:
        def unit():
            if task.haystack == "noise":
                return NOISE
            return NEEDLE.format(type_needle_v=task.value, key=draw(rng, task.key, keys), value=draw(rng, task.value))
        lines = [unit() for _ in range(n)]
        for i, needle in zip(sorted(rng.sample(range(n), len(needles)), reverse=True), needles):
            lines.insert(i, needle)
        context, more = "\n".join(lines), "".join("\n" + unit() for _ in range(8))
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, kind = NIAH, task.value
    if task.q * task.v == 1:  # niah.py's singular: "A special magic number is hidden ..."
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        kind = kind[:-1]
    head, tail = template_parts(template, type_needle_v=kind, query=query)
    return Prompt(head, context, tail, more, [v for i in asked for v in values[i]])


def essay_context(rng, words, n, needles):
    """The first n words, cut into sentences, each needle put between sentences at a depth drawn from DEPTHS."""
    sentences = split_sentences(" ".join(words[:n]).strip())
    cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sentences)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            parts.append(needles[i - 1])
    return " ".join(parts)


def split_sentences(text):
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s] if text else []


# ---- variable tracking (variable_tracking.py) ---------------------------------------------------------------

def vt(task, rng, n, src, length, letters=5, hops=4):
    """One chain of hops + 1 variables (VAR A = 12345, VAR B = VAR A, ...) among n noise lines, after the
    one-shot example (a short solved chain, its names drawn afresh for each sample, as randomize_icl does)."""
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        names += [name] if name not in names else []
    value = rng.randint(10000, 99998)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    lines = [NOISE + "\n"] * n
    for j, i in enumerate(sorted(rng.sample(range(n), len(chain)))):
        lines.insert(i + j, chain[j])
    head, tail = template_parts(VT, query=value, num_v=hops + 1)
    if src is not None and src.vt_example:
        example, answers = src.vt_example
        for name in answers:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        head = example + "\n\n" + head
    context = " ".join(lines).replace(". \n", ".\n")
    return Prompt(head, context, tail, " " + " ".join([NOISE] * 8), names)


def vt_example(tok, seed, budget=500):
    """vt's one-shot example, as RULER makes it: 3-letter names, as much noise as fits in 500 tokens with the
    answer and vt's tokens to generate. Returns (text with its answer and a blank line, the answer)."""
    def render(n):
        p = vt(TASKS["vt"], random.Random(f"ruler:{seed}:vt-example"), n, None, budget, letters=3)
        return p.head + p.context + p.tail + " " + " ".join(p.answers), p.answers
    n = largest(lambda n: len(tok.encode(render(n)[0])) + TASKS["vt"].max_new <= budget, 5, None, 5)
    text, answers = render(n or 5)  # the fewest lines (5) when a tokenizer of short tokens needs more than 500
    return text + "\n\n", answers


# ---- common and frequent words (common_words_extraction.py, freq_words_extraction.py) ------------------

def cwe(task, rng, n, src, length, common=10):
    """A numbered list of n distinct words: 10 repeated 30 times, the rest 3 (6 and 1 below 4096 tokens), after
    a solved example of 40 words (20 below 4096)."""
    short = length < 4096
    example = word_list(rng, src.vocab, 20 if short else 40, 3 if short else 10, 1 if short else 3, common)
    listed, answers = word_list(rng, src.vocab, n, 6 if short else 30, 1 if short else 3, common)
    head, tail = template_parts(CWE)
    head = head + example[0] + tail + " ".join(f"{i + 1}. {w}" for i, w in enumerate(example[1])) + "\n" + head
    count, rare = listed.count(". "), [w for w in listed.split()[1::2] if w not in answers] or answers
    more = "".join(f" {count + i + 1}. {rare[i % len(rare)]}" for i in range(32))
    return Prompt(head, listed, tail, more, answers)


def word_list(rng, words, n, common_repeats, rare_repeats, common):
    """('1. w 2. w ...', the common words): n words drawn, the first `common` repeated more, shuffled."""
    drawn = rng.sample(words, len(words))[:n]  # the same order for every n: more words, more of the same list
    items = drawn[:common] * common_repeats + drawn[common:] * rare_repeats
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), drawn[:common]


def fwe(task, rng, n, src, length, letters=6):
    """Coded words of 6 letters, the word of rank k repeated n * k^-2 / zeta(2) times (Zipf, RULER's alpha = 2),
    rank 1 being the dots '...' (noise); the answer is ranks 2-4. The vocabulary is length / 50 words."""
    size = max(length // 50, 5)
    vocab = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=letters)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    vocab[0] = "..."
    words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n / k**2 / (math.pi**2 / 6)))]  # zeta(2) = pi^2/6
    rng.shuffle(words)
    head, tail = template_parts(FWE)
    return Prompt(head, " ".join(words), tail, " ..." * 64, vocab[1:4])


# ---- question answering (qa.py) -------------------------------------------------------------------------

def qa(task, rng, n, src, length, index=0):
    """Question `index` of the dataset, its own documents and n - theirs others, shuffled."""
    questions, docs = src.qa[task.dataset]
    item = questions[index % len(questions)]
    gold, near = item["context"], item.get("more_context", [])
    if n >= len(docs):
        chosen = list(range(len(docs)))
    elif n - len(gold) > len(near):
        taken = set(gold + near)
        chosen = gold + near + rng.sample([i for i in range(len(docs)) if i not in taken], n - len(gold) - len(near))
    else:
        chosen = gold + rng.sample(near, n - len(gold))
    rng.shuffle(chosen)
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(chosen))
    taken = set(chosen)
    spare = [d for d in range(len(docs)) if d not in taken][:8] or chosen
    more = "".join("\n\n" + DOCUMENT.format(i=len(chosen) + i + 1, document=docs[d]) for i, d in enumerate(spare))
    head, tail = template_parts(QA, query=item["query"])
    return Prompt(head, context, tail, more, item["outputs"])


RENDER = {"niah": niah, "vt": vt, "cwe": cwe, "fwe": fwe, "qa": qa}


def units(task, src):
    """(fewest, most) haystack units a prompt of the task can hold (most None: no end)."""
    if task.kind == "niah":
        return (1, len(src.words)) if task.haystack == "essay" else (max(task.k, task.q) * task.v, None)
    if task.kind == "qa":
        questions, docs = src.qa[task.dataset]
        return max(len(q["context"]) for q in questions), len(docs)
    return {"vt": (5, None), "cwe": (11, len(src.vocab or [])), "fwe": (32, None)}[task.kind]


# ---- a prompt of exactly `length` tokens ------------------------------------------------------------

@dataclass
class Sample:
    task: str
    length: int
    index: int
    ids: list       # the prompt, exactly `length` token ids, BOS first if the tokenizer has one
    answers: list   # the references


def make_sample(task, tok, length, index, seed, src, guess=None):
    """Sample `index` of a task at a length: the most haystack that fits in `length` tokens, the rest padded.
    Returns (Sample, haystack units used: the guess for the next sample). ValueError: the length is too short
    for the task, or longer than the haystack can fill."""
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    seen = {}

    def prompt(n):  # the same random draws for every n: one sample, more or less haystack
        if n not in seen:
            p = RENDER[task.kind](task, random.Random(f"ruler:{seed}:{task.name}:{length}:{index}"), n, src, length,
                                  **({"index": index} if task.kind == "qa" else {}))
            seen[n] = p, len(bos) + len(tok.encode(p.head + p.context + p.tail))
        return seen[n]

    lo, hi = units(task, src)
    if guess is None and prompt(lo)[1] <= length:  # the first sample: a guess from two sizes' token counts
        step = max(1, (hi or 64) // 64 if task.haystack == "essay" else 4)
        per = max((prompt(lo + step)[1] - prompt(lo)[1]) / step, 1e-3) if hi is None or lo + step <= hi else 1
        guess = lo + int((length - prompt(lo)[1]) / per)
    n = largest(lambda n: prompt(n)[1] <= length, lo, hi, guess or lo)
    if n is None:
        raise ValueError(f"{task.name}: length {length} is too short: its shortest prompt takes {prompt(lo)[1]} tokens")
    return Sample(task.name, length, index, fit(tok, prompt(n)[0], bos, length, n == hi), prompt(n)[0].answers), n


def fit(tok, p, bos, length, at_end):
    """The prompt's ids, with what `length` still lacks taken from p.more and put in at the token boundary
    where the context ends (the text's own tokens elsewhere, unchanged)."""
    ids = bos + tok.encode(p.head + p.context + p.tail)
    missing = length - len(ids)
    if missing == 0:
        return ids
    fill = tok.encode(p.more)[:missing]
    if at_end or len(fill) < missing:
        raise ValueError(f"the haystack is too short for {length} tokens: give a longer --haystack, or shorter "
                         "--lengths")
    upto = bos + tok.encode(p.head + p.context)
    cut = next((i for i, (a, b) in enumerate(zip(upto, ids)) if a != b), min(len(upto), len(ids)))
    return ids[:cut] + fill + ids[cut:]


def largest(fits, lo, hi, guess):
    """The largest n in [lo, hi] (hi None: no end) with fits(n), for fits true up to some n and false after:
    galloping from the guess (the last sample's n is usually within a few), then bisection. None if not lo."""
    top = math.inf if hi is None else hi + 1  # known not to fit
    n = int(min(max(guess, lo), top - 1))
    (good, bad), step = ((n, top) if fits(n) else (lo - 1, n)), 1
    while bad == top and good + step < top:  # up from a guess that fits
        good, bad, step = (good + step, bad, step * 2) if fits(good + step) else (good, good + step, step)
    while good == lo - 1 and bad - step > lo:  # down from one that does not
        good, bad, step = (bad - step, bad, step) if fits(bad - step) else (good, bad - step, step * 2)
    if good < lo:
        if not fits(lo):
            return None
        good = lo
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


# ---- scoring (scripts/eval/synthetic/constants.py, evaluate.py) ---------------------------------------

def postprocess(text):
    """RULER's postprocess_pred: stripped, control characters made newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(pred, refs):
    """The fraction of the references found in the prediction, ignoring case."""
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


def string_match_part(pred, refs):
    """1 if any reference is found in the prediction, ignoring case, else 0."""
    return float(max(r.lower() in pred.lower() for r in refs))


def score(task, output, answers):
    metric = string_match_part if task.metric == "string_match_part" else string_match_all
    return metric(postprocess(output), answers)


class Stop:
    """When a sequence has finished: at EOS, or at a token holding a newline once the answer has begun
    (a newline before any text does not end it). Built once per tokenizer: which ids hold what."""

    def __init__(self, tok):
        pieces = [tok.decode([i]) for i in range(tok.vocab_size)]
        self.eos = tok.eos_id
        self.newline = {i for i, p in enumerate(pieces) if "\n" in p}
        self.blank = {i for i, p in enumerate(pieces) if not p.strip()}

    def __call__(self, tokens):
        last = tokens[-1]
        if last == self.eos:
            return True
        return last in self.newline and (last not in self.blank or any(t not in self.blank for t in tokens[:-1]))


def answer_text(tok, ids):
    """What the model answered: its tokens decoded, cut at the newline that ended it."""
    text = tok.decode(ids)
    start = len(text) - len(text.lstrip())
    cut = text.find("\n", start)
    return text if cut < 0 else text[:cut]


# ---- the user's inputs -----------------------------------------------------------------------------

def haystack_words(texts):
    """The haystack as RULER reads its essays: all whitespace made single spaces, split into words."""
    return re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ")


def distinct_words(words):
    """cwe's vocabulary: the haystack's distinct lower-case words of 3 letters or more, sorted."""
    return sorted({w for w in (re.sub(r"[^a-z]", "", w.lower()) for w in words) if len(w) >= 3})


def read_qa(path):
    """({"squad" or "hotpotqa": (questions, documents)}) from a SQuAD (v1.1 or v2.0) or a HotpotQA JSON file,
    as qa.py reads them. ValueError for any other file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--qa-file {path}: not JSON ({e})") from None
    try:
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            return {"squad": squad(data["data"])}
        if isinstance(data, list) and data and all(isinstance(d, dict) and "question" in d for d in data):
            return {"hotpotqa": hotpotqa(data)}
    except (KeyError, TypeError, AttributeError):
        pass
    raise ValueError(f"--qa-file {path}: neither SQuAD JSON ({{\"data\": [{{\"paragraphs\": ...}}]}}) nor HotpotQA "
                     "JSON ([{\"question\", \"answer\", \"context\"}, ...])")


def squad(articles):
    docs = sorted({p["context"] for a in articles for p in a["paragraphs"]})
    number = {d: i for i, d in enumerate(docs)}
    questions = []
    for a in articles:
        near = [number[p["context"]] for p in a["paragraphs"]]
        for p in a["paragraphs"]:
            for q in p["qas"]:
                if not q.get("is_impossible", False) and q["answers"]:
                    questions.append({"query": q["question"], "outputs": [x["text"] for x in q["answers"]],
                                      "context": [number[p["context"]]],
                                      "more_context": [i for i in near if i != number[p["context"]]]})
    if not questions:
        raise KeyError("no answerable question")
    return questions, docs


def hotpotqa(items):
    text = lambda title, sentences: f"{title}\n{''.join(sentences)}"  # noqa: E731
    docs = sorted({text(t, p) for d in items for t, p in d["context"]})
    number = {d: i for i, d in enumerate(docs)}
    return [{"query": d["question"], "outputs": [d["answer"]],
             "context": [number[text(t, p)] for t, p in d["context"]]} for d in items], docs


def read_haystack(paths, longest):
    """The haystack's words from .txt/.jsonl/.parquet files and folders (as data/prepare.py reads them) or a
    dataset data/prepare.py wrote (its folder or a .bin split, decoded with its own tokenizer): documents in
    order until there are 4 words for each token of the longest length (RULER's essays hold about 3)."""
    from data.packed import PackedData, find_documents
    from data.tokenizer import load_tokenizer
    folder = paths[0] if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "meta.json")) else None
    if len(paths) == 1 and paths[0].endswith(".bin"):
        folder = os.path.dirname(paths[0]) or "."
    if folder:
        split = os.path.basename(paths[0]).removesuffix(".bin") if paths[0].endswith(".bin") else "val"
        data, tok = PackedData(folder, split), load_tokenizer(folder)
        docs = [(name, lambda ids=ids: tok.decode(ids)) for name, ids in data.documents()]
    else:
        docs = find_documents(paths)
    words = []
    for _, load in docs:
        words += haystack_words([load()])
        if len(words) >= 4 * longest:
            break
    return [w for w in words if w]


# ---- the run: samples, greedy answers, scores --------------------------------------------------------

def evaluate(model, tok, tasks, lengths, samples, seed, src, batch_size=1, done=None, log=None, desc="ruler"):
    """{task: {length: score}} (RULER's: the mean of the samples' metric, times 100), over `samples` samples
    of each task at each length, decoded greedily `batch_size` at a time. done: {(task, length, index): line}
    already scored (a resumed run): their prompts are made again and must be the same. log(lines): called with
    each batch's finished lines ({task, length, index, input_ids, answers, output_ids, output, score})."""
    stop, done = Stop(tok), done or {}
    results = {name: {} for name in tasks}
    with tqdm(total=len(tasks) * len(lengths) * samples, desc=desc, unit="sample", disable=None) as bar:
        for length in lengths:
            for name in tasks:
                lines = run_cell(model, tok, TASKS[name], length, samples, seed, src, batch_size, done, log, stop, bar)
                results[name][length] = 100 * sum(line["score"] for line in lines) / len(lines)
    model.cache = None
    return results


def run_cell(model, tok, task, length, samples, seed, src, batch_size, done, log, stop, bar):
    """The lines of one task at one length: those done already, and the rest decoded in batches."""
    lines, batch, guess = [], [], (src.guesses or {}).get((task.name, length))  # sample 0's size, from the check
    for index in range(samples):
        s, guess = make_sample(task, tok, length, index, seed, src, guess)
        old = done.get((task.name, length, index))
        if old is not None:
            if old["input_ids"] != s.ids:
                raise ValueError(f"{task.name} @ {length} sample {index} is not the prompt the samples file holds: "
                                 "it was written by another run (model, haystack or --seed); resume with those")
            lines.append(old)
            bar.update()
            continue
        batch.append(s)
        if len(batch) == batch_size or index == samples - 1:
            outputs = greedy_batch(model, [b.ids for b in batch], task.max_new, stop, vocab=tok.vocab_size)
            new = [sample_line(tok, task, b, out) for b, out in zip(batch, outputs)]
            if log:
                log(new)
            lines += new
            bar.update(len(batch))
            batch = []
    return lines


def sample_line(tok, task, s, output_ids):
    output = answer_text(tok, output_ids)
    return {"task": s.task, "length": s.length, "index": s.index, "input_ids": s.ids, "answers": s.answers,
            "output_ids": output_ids, "output": output, "score": score(task, output, s.answers)}


def make_sources(tok, tasks, lengths, haystack, qa_files, seed):
    """(Sources, the tasks that can run): the haystack's words (those tasks that need it), the QA data (qa_1
    and qa_2 are left out, in one line, without their file), vt's example; each task's first sample is made
    at every length, so that a length it cannot fill is refused now (ValueError) and not hours into a run."""
    from support.common import note
    src = Sources(qa={})
    for path in qa_files or []:
        src.qa.update(read_qa(path))
    skipped = [t for t in tasks if TASKS[t].kind == "qa" and TASKS[t].dataset not in src.qa]
    if skipped:
        note(f"note: {', '.join(skipped)} skipped: they need --qa-file with SQuAD (qa_1) or HotpotQA (qa_2) JSON")
    tasks = [t for t in tasks if t not in skipped]
    if not tasks:
        raise ValueError("no task left to run")
    if any(TASKS[t].needs_haystack for t in tasks):
        src.words = read_haystack(haystack, max(lengths))
        src.vocab = distinct_words(src.words)
        if len(src.vocab) < 60:
            raise ValueError(f"--haystack has {len(src.vocab)} distinct words; cwe draws 50 or more")
    if "vt" in tasks:
        src.vt_example = vt_example(tok, seed)
    src.guesses = {(name, length): make_sample(TASKS[name], tok, length, 0, seed, src)[1]
                   for name in tasks for length in lengths}
    return src, tasks
