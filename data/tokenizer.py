"""
Text to token ids and back, for the tokenizers a checkpoint may bring: a sentencepiece tokenizer.model
(Llama 2) or a Hugging Face tokenizer.json (Llama 3, SmolLM, Qwen); or a small sentencepiece BPE trained
on one's own documents, in the manner of Llama 2's.

    tok = load_tokenizer("path/to/Llama-2-7b-hf")   # a checkpoint directory, a tokenizer.model or a tokenizer.json
    ids = tok.encode("Once upon a time")            # no BOS/EOS: packing (data/packed.py) decides where they go
    text = tok.decode(ids)
    model = train_tokenizer(docs, 4096)             # docs: (name, load) pairs; returns the tokenizer.model bytes

What guards it: a missing tokenizer is a FileNotFoundError, a file that is not one a ValueError naming it
(commands turn both into one line); a BOS goes before a text only where the tokenizer itself puts one,
as transformers does: tokenizer_config.json's add_bos_token (or a null bos_token: Qwen's) when it says, else
a tokenizer.json's post-processor (template_bos; SmolLM2's adds none, whatever config.json names), else a
sentencepiece model's BOS; the EOS id of a tokenizer.json comes from the checkpoint's configs, else from
well-known tokens (special_id), else -1 (none).
"""

import io
import os

import sentencepiece as spm

from support.jsonfile import TOKENIZER_CONFIG_TYPES, read_json

# Special tokens to try, in order, when a tokenizer.json comes without a config that names them.
BOS_TOKENS = ["<s>", "<|begin_of_text|>"]
EOS_TOKENS = ["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"]


class Tokenizer:
    """Text <-> ids. encode() adds no BOS/EOS: packing decides where those go."""

    def __init__(self, backend, vocab_size, bos_id, eos_id, files):
        self.backend = backend  # a SentencePieceProcessor or a tokenizers.Tokenizer
        self.vocab_size = vocab_size
        self.bos_id = bos_id  # -1 when the tokenizer has none
        self.eos_id = eos_id
        self.files = files  # what to copy next to a checkpoint or a prepared dataset

    def encode(self, text):
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        ids = [int(i) for i in ids]  # numpy and torch integers are not accepted by either backend
        if isinstance(self.backend, spm.SentencePieceProcessor):
            return self.backend.decode(ids)
        # sentencepiece drops BOS/EOS when decoding; do the same so both backends read alike
        return self.backend.decode(ids, skip_special_tokens=True)


def load_tokenizer(path):
    """A tokenizer.model, a tokenizer.json, or a directory holding one (tokenizer.model preferred)."""
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if path.endswith(".model"):
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model ({e})") from None
        bos_id = sp.bos_id() if adds_bos(os.path.dirname(path)) is not False else -1
        return Tokenizer(sp, sp.get_piece_size(), bos_id, sp.eos_id(), [path])
    if path.endswith(".json"):
        return load_hf_tokenizer(path)
    raise ValueError(f"{path}: expected a tokenizer.model, a tokenizer.json or a directory")


def load_hf_tokenizer(path):
    try:
        import tokenizers  # optional: only needed for tokenizer.json checkpoints
    except ImportError:
        raise ValueError(f"reading {path} needs the tokenizers package: pip install tokenizers") from None
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a bare Exception on bad files
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e})") from None
    folder = os.path.dirname(path)
    added, says = template_bos(tok), adds_bos(folder)
    if says is None:  # tokenizer_config.json says nothing: what the tokenizer's own post-processor adds
        bos_id = added
    else:
        bos_id = (added if added >= 0 else special_id(tok, folder, "bos", BOS_TOKENS)) if says else -1
    eos_id = special_id(tok, folder, "eos", EOS_TOKENS)
    files = [path]
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        files.append(os.path.join(folder, "tokenizer_config.json"))  # names BOS/EOS when the copy stands alone
    return Tokenizer(tok, tok.get_vocab_size(with_added_tokens=True), bos_id, eos_id, files)


def template_bos(tok):
    """The id a tokenizer.json's own post-processor puts before every text (a BOS template: Llama 2 and 3,
    Mistral), or -1 where it adds none (SmolLM2, Qwen, GPT-2: config.json may still name a bos_token_id).
    Read from what it does, encoding a text with its special tokens and without, whatever the template's form."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    return full[0] if len(full) > len(bare) and full[1:1 + len(bare)] == bare else -1


def adds_bos(folder):
    """Whether tokenizer_config.json says that a BOS goes before the text: add_bos_token, or a bos_token of
    null (Qwen2.5 and Qwen3, whose config.json still names a bos_token_id that their tokenizer never adds);
    None where it says nothing (the tokenizer itself then decides: a sentencepiece model adds BOS, as
    transformers' LlamaTokenizer does, a tokenizer.json what its post-processor adds)."""
    try:
        cfg = read_json(os.path.join(folder, "tokenizer_config.json"), TOKENIZER_CONFIG_TYPES)
    except OSError:
        return None
    if isinstance(cfg.get("add_bos_token"), bool):
        return cfg["add_bos_token"]
    return False if "bos_token" in cfg and cfg["bos_token"] is None else None


def special_id(tok, folder, kind, candidates):
    """BOS or EOS id of a tokenizer.json: the checkpoint's configs first, then well-known tokens."""
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        try:
            cfg = read_json(os.path.join(folder, name), TOKENIZER_CONFIG_TYPES)  # a file we cannot use: one line
        except OSError:
            continue
        value = cfg.get(f"{kind}_token_id")
        if isinstance(value, list) and value:  # Llama 3.1 instruct lists several EOS ids; the first is the base one
            value = value[0]
        if isinstance(value, int) and not 0 <= value < tok.get_vocab_size(with_added_tokens=True):
            raise ValueError(f"{os.path.join(folder, name)}: {kind}_token_id {value} is outside the vocabulary of "
                             f"{tok.get_vocab_size(with_added_tokens=True)} tokens of its tokenizer.json")
        if isinstance(value, int):
            return value
        token = cfg.get(f"{kind}_token")  # tokenizer_config.json names the token, as a string or {"content": ...}
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    for token in candidates:
        if tok.token_to_id(token) is not None:
            return tok.token_to_id(token)
    return -1  # no such token: PackedData then starts blocks without BOS


def train_tokenizer(docs, vocab_size, seed=0):
    """A sentencepiece BPE in the manner of Llama 2's, trained on the documents; returns the model file."""

    def sentences():
        # sentencepiece learns from short "sentences": we give it lines, cut to 1000 characters so that
        # none exceeds its max_sentence_length (4192 bytes), past which it silently skips a sentence
        for _, load in docs:
            for line in load().splitlines():
                for i in range(0, len(line), 1000):
                    chunk = line[i : i + 1000]
                    if chunk.strip():
                        yield chunk

    spm.set_random_generator_seed(seed)  # sampling the sentences is the only randomness
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,  # unseen characters become UTF-8 bytes, never <unk>
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama 2's ids
        character_coverage=1.0,
        # identity normalisation and kept whitespace: decode(encode(text)) gives back the text exactly
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # no dummy space before each text: a word at the start of a line then gets the pieces it was
        # trained with (training sentences are lines), and decoding any slice of ids is plain concatenation
        add_dummy_prefix=False,
        split_digits=True,  # as Llama does: numbers are read digit by digit
        input_sentence_size=2_000_000,  # a random sample of sentences is plenty and bounds time and memory
        shuffle_input_sentence=True,
        num_threads=2,  # the result depends on it (it is stored in the model), so it is fixed
        minloglevel=2,  # sentencepiece's training log is long; keep errors only
    )
    return model.getvalue()
