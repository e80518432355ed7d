"""Test helpers: tiny random-weight models and tokenizers, the CLI run in-process, a live server on 127.0.0.1."""

from __future__ import annotations

import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import readmoe  # noqa: F401  (registers the Auto classes)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
from serve_process import free_port  # noqa: E402,F401  (one definition for the tests and the benchmarks)

VOCAB = 260  # 256 byte symbols + specials


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built offline: every byte is a token, no training needed."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split("", "isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma norms are (1 + w) with w = 0 at init: give them some signal
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    return m


ARCHS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def write_dense_dir(d):
    """A tiny Llama checkpoint directory with a tokenizer, as a user would point --model at."""
    tiny_llama().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def write_corpus_dir(root):
    """Three small domains in the three accepted layouts: a sub-directory, a .txt and a .jsonl file."""
    import json

    (root / "prose").mkdir(parents=True)
    for i in range(30):
        (root / "prose" / f"doc{i}.txt").write_text(f"The quiet river number {i} runs past the old mill.\n\n" * 20)
    (root / "code.txt").write_text("\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 8 for i in range(400)))
    (root / "chat.jsonl").write_text("\n".join(json.dumps({"text": f"Hello {i}, how are you today? Fine, thanks. " * 12})
                                              for i in range(80)))
    return root


def cli(*args) -> None:
    """The CLI in-process, outside any test's fixtures (for module-scoped set-ups); fails on a non-zero exit."""
    import pytest

    from readmoe import cli as readmoe_cli

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["readmoe", *map(str, args)])
        try:
            readmoe_cli.main()
        except SystemExit as e:
            assert e.code in (0, None), f"readmoe {' '.join(map(str, args))} exited with {e.code}"


def tiny_moe():
    """A tiny Llama carved into three experts whose router picks different experts for different tokens."""
    from readmoe.carve import build_model, domain_sets

    dense = tiny_llama()
    L, I = len(dense.model.layers), dense.config.intermediate_size
    sets = domain_sets(torch.rand(3, L, I, generator=torch.Generator().manual_seed(0)), 0.5)
    moe = build_model(dense, sets, ["a", "b", "c"], 0.5, "domain", "test")
    with torch.no_grad():
        moe.router.head.weight.normal_(0, 1.0)
    return moe


def masked_dense_logits(dense, ids, keep_sets):
    """The dense model with every down_proj input masked to the neurons in `keep_sets[layer]`."""
    hooks = []
    for layer, keep in zip(dense.model.layers, keep_sets):
        mask = torch.zeros(layer.mlp.down_proj.in_features)
        mask[keep] = 1.0
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, inp, k=mask: (inp[0] * k,)))
    try:
        return dense(ids).logits
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------- running the CLI in-process


def run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever the test's own set-up printed
    from readmoe import cli

    monkeypatch.setattr(sys, "argv", ["readmoe", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def fails(monkeypatch, capsys, match, *args):
    code, _, err = run(monkeypatch, capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert "Traceback" not in err


# ---------------------------------------------------------------- a live HTTP server on 127.0.0.1


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


class LiveServer:
    """uvicorn in a thread of this process, so a test can look at the engine behind the HTTP API."""

    def __init__(self, app, port: int | None = None):
        import threading

        import uvicorn

        self.app, self.port = app, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the server did not stop"
