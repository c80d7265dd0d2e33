"""
The checkpoints people extend today, against transformers (the independent reference), on CPU in fp32:
Qwen2/Qwen2.5 (biases on q, k, v), Qwen3 (q_norm, k_norm, an explicit head_dim), Mistral (a sliding
window in the config), each written by transformers itself with every parameter random (biases and
norms included); Qwen's tokenizer, which adds no BOS; vocabularies padded past the tokenizer; the
families we refuse. Then a Qwen-style checkpoint fine-tuned end to end (1 and 2 processes), sampled and
evaluated.

    python -m pytest tests/test_families.py -q
"""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as ev  # noqa: E402
import generation  # noqa: E402
import sample  # noqa: E402
from data.prepare import main as prepare_data  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from model import Llama  # noqa: E402
from support.checkpoint import CheckpointError  # noqa: E402
from tests.helpers import run_train, write_verse  # noqa: E402

transformers = pytest.importorskip("transformers")
L = 64          # the original context of the test checkpoints
V = 97          # their vocabulary, when no tokenizer comes with them
FAMILIES = ["qwen2", "qwen3", "mistral", "llama"]


def hf_checkpoint(path, family, vocab=V, tied=False, seed=0, **config):
    """A random checkpoint of `family` written by transformers' own save_pretrained (the 5.x
    rope_parameters form), every parameter drawn at random: weights, biases and norm weights alike."""
    kw = {**dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=L, tie_word_embeddings=tied, rope_theta=1e6), **config}
    if family == "qwen3":
        kw.setdefault("head_dim", 32)  # Qwen3 says its head_dim, here 2x hidden / heads, as Qwen3-0.6B does
    cfg = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "llama": transformers.LlamaConfig}[family](**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def theirs(path, rope_parameters=None, **changes):
    """transformers' model of the checkpoint at `path`, fp32, with its config changed as asked."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    if rope_parameters is not None:
        cfg.rope_parameters = {"rope_theta": cfg.rope_parameters["rope_theta"], **rope_parameters}
    for key, value in changes.items():
        setattr(cfg, key, value)
    return transformers.AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()


def tokens(n, vocab=V, seed=0):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# ---- logits against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_with_the_checkpoints_own_rope(tmp_path, family, tied):
    path = hf_checkpoint(tmp_path, family, tied=tied)
    hf_keys = set(transformers.AutoModelForCausalLM.from_pretrained(path).state_dict())
    ours = Llama.from_pretrained(path)
    assert set(ours.state_dict()) == hf_keys  # every tensor, biases and q/k norms included, is read
    idx = tokens(3 * L)
    with torch.no_grad():
        diff = (ours(idx) - theirs(path)(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_yarn_override_matches_transformers(tmp_path, family):
    path = hf_checkpoint(tmp_path, family)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L}
    ours = Llama.from_pretrained(path, rope_scaling=yarn)
    idx = tokens(3 * L, seed=1)
    with torch.no_grad():
        ref = theirs(path, rope_parameters=yarn)(idx).logits
        diff = (ours(idx) - ref).abs().max().item()
        plain = (ours(idx) - theirs(path)(idx).logits).abs().max().item()
    assert diff < 1e-4 and plain > 1e-2, (diff, plain)  # YaRN is applied, and it is transformers' YaRN


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_a_checkpoint_that_ships_yarn_in_the_model_card_form(tmp_path, family):
    """Qwen's model cards add {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": L} to
    config.json (Qwen2.5 says "type", Qwen3 "rope_type"): read as transformers reads it."""
    path = hf_checkpoint(tmp_path, family)
    cfg = json.loads((path / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]  # the hub's files are in the 4.x form: rope_theta beside rope_scaling
    cfg["rope_theta"], cfg["rope_scaling"] = theta, {"type" if family == "qwen2" else "rope_type": "yarn",
                                                     "factor": 4.0, "original_max_position_embeddings": L}
    cfg["max_position_embeddings"] = 4 * L
    (path / "config.json").write_text(json.dumps(cfg))
    ours = Llama.from_pretrained(path)
    assert (ours.config.rope.method, ours.config.rope.factor, ours.config.context_length) == ("yarn", 4.0, 4 * L)
    idx = tokens(4 * L, seed=2)
    with torch.no_grad():
        diff = (ours(idx) - theirs(path)(idx).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_kv_cache_with_dynamic_yarn_past_L_matches_transformers(tmp_path, family):
    """Decoding through the KV cache with dynamic YaRN (rescaled at every token: dynamic_growth=1) gives
    at each length l the logits transformers computes for the whole text with static YaRN at s = l / L."""
    path = hf_checkpoint(tmp_path, family)
    ours = Llama.from_pretrained(path, rope_scaling={"rope_type": "dynamic-yarn", "factor": 1.0})
    seq = tokens(2 * L, seed=3)[0]
    P = L - 4
    ours.setup_cache(1, 2 * L, dynamic_growth=1)
    checked = []
    with torch.no_grad():
        logits = ours.prefill(seq[None, :P])
        for p in range(P, 2 * L):
            if p in (P, L - 1, L, L + 1, L + 9, 2 * L - 1):  # the scale moves at every token past L
                s = p / L
                ref_model = theirs(path) if s <= 1 else theirs(path, rope_parameters={
                    "rope_type": "yarn", "factor": s, "original_max_position_embeddings": L})
                ref = ref_model(seq[None, :p]).logits[:, -1:]
                checked.append((p, (logits - ref).abs().max().item()))
            logits = ours(seq[None, p:p + 1], pos=p, last_only=True)
    assert max(d for _, d in checked) < 1e-4, checked


def test_mistral_export_says_full_attention(tmp_path):
    """A Mistral checkpoint with a window: we warn that attention here is full, train it so, and the export
    says so (sliding_window null): transformers must not load it with a window, nor with its 4096 default."""
    path = hf_checkpoint(tmp_path / "in", "mistral", sliding_window=16)
    ours = Llama.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["sliding_window"] is None and cfg["architectures"] == ["MistralForCausalLM"]
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").sliding_window is None
    idx = tokens(3 * L, seed=4)
    with torch.no_grad():
        diff = (ours(idx) - theirs(tmp_path / "out")(idx).logits).abs().max().item()
        windowed = (ours(idx) - theirs(path)(idx).logits).abs().max().item()
    assert diff < 1e-4 and windowed > 1e-2, (diff, windowed)  # full attention; the window would differ


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_export_round_trip(tmp_path, family):
    path = hf_checkpoint(tmp_path / "in", family, tied=True)
    ours = Llama.from_pretrained(path, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": L})
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert (cfg["model_type"], cfg["architectures"], cfg["sliding_window"], cfg["use_sliding_window"]) == \
        (family, [arch], None, False)
    assert "qkv_bias" not in cfg and "qk_norm" not in cfg  # implied by the family, not keys of its config
    hf = theirs(tmp_path / "out")
    assert type(hf).__name__ == arch and hf.config.rope_parameters["rope_type"] == "yarn"
    idx = tokens(3 * L, seed=5)
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("model_type,what", [("gemma", "sqrt(hidden_size)"), ("gemma2", "soft-capping"),
                                             ("phi3", "fused qkv_proj"), ("mixtral", "mixture of experts"),
                                             ("qwen3_moe", "mixture of experts"), ("deepseek_v3", "MLA")])
def test_unsupported_families_are_refused_naming_what_differs(tmp_path, model_type, what):
    path = hf_checkpoint(tmp_path, "llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": model_type}))
    with pytest.raises(CheckpointError) as e:
        Llama.from_pretrained(path)
    assert what in str(e.value) and model_type in str(e.value) and "\n" not in str(e.value)


def test_dynamic_yarn_is_plain_rope_up_to_L_static_yarn_is_not(tmp_path):
    """Why Qwen's users lose quality on short prompts with static YaRN, and dynamic YaRN does not: up to L
    dynamic YaRN computes exactly what plain RoPE does."""
    path = hf_checkpoint(tmp_path, "qwen3")
    plain = Llama.from_pretrained(path, rope_scaling=None)
    dynamic = Llama.from_pretrained(path, rope_scaling={"rope_type": "dynamic-yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": L})
    static = Llama.from_pretrained(path, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": L})
    idx = tokens(L, seed=6)
    with torch.no_grad():
        assert torch.equal(dynamic(idx), plain(idx))
        assert (static(idx) - plain(idx)).abs().max().item() > 1e-2


# ---- Qwen's tokenizer: no BOS -------------------------------------------------------------------------

def qwen_tokenizer(folder, corpus, bos_in_config=True):
    """A byte-level BPE with Qwen's special tokens and its tokenizer_config.json: bos_token null. Like
    Qwen's, the checkpoint's config.json may still name a bos_token_id, which the tokenizer never adds."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer",
                   "model_max_length": 32768}, f)
    return tok.get_vocab_size(), tok.token_to_id("<|endoftext|>")


def corpus_of(folder):
    return [open(os.path.join(folder, n)).read() for n in sorted(os.listdir(folder))]


def test_qwen_tokenizer_adds_no_bos(tmp_path):
    write_verse(tmp_path / "verse", 4, 50)
    n, eot = qwen_tokenizer(tmp_path / "tok", corpus_of(tmp_path / "verse"))
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"bos_token_id": eot, "eos_token_id": eot}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (-1, eot, n)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")  # what transformers does with it
    assert ref("the king speaks")["input_ids"] == tok.encode("the king speaks")
    # add_bos_token false says the same; true (Llama 2's tokenizer_config) adds the named one
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "bos_token": "<|im_start|>"}))
    assert load_tokenizer(str(tmp_path / "tok")).bos_id == -1
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<|im_start|>"}))
    assert load_tokenizer(str(tmp_path / "tok")).bos_id == eot  # config.json names it first


# ---- end to end: a Qwen checkpoint fine-tuned, sampled, evaluated -------------------------------------------

# what a Qwen checkpoint's config says of its context, and the L a new RoPE method takes from it
QWEN_CONTEXT = {"qwen3": (40960, 32768, "note: L = 32768: Qwen3 was pretrained at 32768 tokens"),
                "qwen2": (32768, 32768, "note: L = 32768, the max_position_embeddings of config.json")}


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def qwen_run(tmp_path_factory, request):
    """A Qwen checkpoint as its users have it: written by transformers, a tokenizer without BOS, a
    vocabulary padded 32 rows past the tokenizer, a config that names no pretraining context (Qwen3's
    max_position_embeddings of 40960 is not it). Data prepared with its tokenizer; YaRN s=4 fine-tunes
    with one process and with two (FSDP2)."""
    family = request.param
    d = tmp_path_factory.mktemp(family)
    write_verse(d / "verse", 8, 200)
    n, eot = qwen_tokenizer(d / "ckpt", corpus_of(d / "verse"))
    hf_checkpoint(d / "ckpt", family, vocab=n + 32, max_position_embeddings=QWEN_CONTEXT[family][0],
                  bos_token_id=eot, eos_token_id=eot)
    prepare_data(["--input", str(d / "verse"), "--out", str(d / "data"), "--tokenizer", str(d / "ckpt"),
                  "--val-fraction", "0.25"])
    runs = {}
    for nproc in (None, 2):
        out = d / f"out-{nproc or 1}"
        r = run_train(["--init", d / "ckpt", "--data", d / "data", "--out", out, "--yarn-scale", "4", "--seq-len", "128",
                       "--steps", "3", "--batch-size", "2", "--lr", "1e-3", "--warmup", "1", "--save-every", "0"],
                      nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc or 1] = (out, r.stdout + r.stderr)  # the notes and the plan go to stdout
    return family, d, n, runs


def test_qwen_fine_tune_exports_what_transformers_loads(qwen_run):
    family, d, n, runs = qwen_run
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    for nproc, (out, err) in runs.items():
        # L was not guessed silently: the one line says which L and why
        assert QWEN_CONTEXT[family][2] in err, err
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["model_type"], cfg["architectures"], cfg["use_sliding_window"], cfg["sliding_window"]) == \
            (family, [arch], False, None)
        assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
        assert cfg["max_position_embeddings"] == 131072 and cfg["vocab_size"] == n + 32
        # vLLM caps the context at the tokenizer's model_max_length: the export's says the new one
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 131072
        ours, hf = Llama.from_pretrained(out), theirs(out)
        idx = tokens(128, vocab=n, seed=7)
        with torch.no_grad():
            assert (ours(idx) - hf(idx).logits).abs().max().item() < 1e-4
    one, two = (Llama.from_pretrained(runs[k][0]).state_dict() for k in (1, 2))
    for name in one:  # the same training in one process and in two
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4)


def test_qwen_samples_without_bos_and_never_a_padding_id(qwen_run, capsys):
    family, d, n, runs = qwen_run
    out = runs[1][0]
    model, tok = Llama.from_pretrained(out), load_tokenizer(str(out))
    ids = tok.encode("the king")  # no BOS in front
    with torch.no_grad():  # the padding rows made to win the first argmax: only real tokens may be drawn
        logits = model(torch.tensor([ids]))[0, -1, :n]
        best = int(logits.argmax())
        model.lm_head.weight[n:] = (10 if logits[best] > 0 else -10) * model.lm_head.weight[best]
    model.save_pretrained(out / "padded", extra_files=[out / "tokenizer.json", out / "tokenizer_config.json"])
    sample.main(["--model", str(out / "padded"), "--prompt", "the king", "--temperature", "0",
                 "--max-new-tokens", "8", "--device", "cpu", "--dtype", "float32"])
    text = capsys.readouterr().out
    new, _ = generation.generate(Llama.from_pretrained(out / "padded"), ids, 8, vocab=tok.vocab_size,
                                 eos_id=tok.eos_id)
    assert max(new) < n and text == tok.decode(new) + "\n"
    full = generation.generate(Llama.from_pretrained(out / "padded"), ids, 1)[0]
    assert full[0] >= n  # without the tokenizer's size, a padding id would have been drawn


def test_qwen_eval_without_bos(qwen_run, capsys):
    family, d, n, runs = qwen_run
    out = runs[1][0]
    ev.main(["ppl", "--model", str(out), "--data", str(d / "data" / "val.bin"), "--lengths", "64,128",
             "--device", "cpu", "--dtype", "float32"])
    assert "perplexity" in capsys.readouterr().out
    ev.main(["passkey", "--model", str(out), "--lengths", "320", "--depths", "0.5", "--trials", "1",
             "--device", "cpu", "--dtype", "float32"])
    assert "passkey retrieval accuracy" in capsys.readouterr().out


def test_a_llama3_scaled_checkpoint_extended_further_says_what_it_does(tmp_path, capsys):
    """Llama 3.1 (llama3 scaling, s=8 over L=8192 in its config) given --rope yarn: the new method takes the
    old one's place over the same L, and the command says so; --original-ctx overrides L."""
    path = hf_checkpoint(tmp_path, "llama", max_position_embeddings=8 * L, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": L, "rope_theta": 5e5})
    (path / "tokenizer_config.json").write_text("{}")
    write_verse(tmp_path / "verse", 2, 20)
    qwen_tokenizer(tmp_path / "tok", corpus_of(tmp_path / "verse"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.replace(tmp_path / "tok" / name, path / name)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))  # room for the tokenizer's ids
    hf_checkpoint(tmp_path / "w", "llama", vocab=400)
    os.replace(tmp_path / "w" / "model.safetensors", path / "model.safetensors")
    args = ["--model", str(path), "--prompt", "the king", "--max-new-tokens", "1", "--device", "cpu",
            "--dtype", "float32", "--rope", "yarn", "--rope-factor", "16"]
    sample.main(args)
    err = capsys.readouterr().err
    assert f"note: yarn s=16 over L={L} replaces this checkpoint's llama3 s=8" in err, err
    assert f"KV cache: {16 * L} tokens" in err and "max_position_embeddings of config.json" not in err
    sample.main(args + ["--original-ctx", str(2 * L)])
    assert f"KV cache: {32 * L} tokens" in capsys.readouterr().err
