"""Per-domain neuron statistics: mean |input of down_proj| per layer and neuron.

That input is `act(gate(x)) * up(x)`, the paper's activation. Besides the mean
we keep a random sketch of every neuron's activation profile over tokens
(`sketch[l] = |A_l|^T R`, R Gaussian): inner products of sketches approximate
co-activation, which the domain-free carving clusters on without storing an
I x I matrix per layer. Writes are atomic and per domain, so a killed run
resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import backbone
from .corpus import Corpus
from .atomic import atomic_file
from .errors import UserError

SKETCH_DIM = 64
STATS_FORMAT = "readmoe-stats/1"


@dataclass
class Stats:
    domains: list[str]
    mean: torch.Tensor  # [D, L, I]
    tokens: list[int]
    sketch: torch.Tensor  # [L, I, S], summed over all domains
    sketch_sum: torch.Tensor  # [S]: column sums of R, to centre the sketch
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))


def save_stats(path: Path, st: Stats) -> None:
    tensors = {"sketch": st.sketch.contiguous(), "sketch_sum": st.sketch_sum.contiguous()}
    for i, d in enumerate(st.domains):
        tensors[f"mean/{d}"] = st.mean[i].contiguous()
    meta = dict(st.meta, format=STATS_FORMAT, domains=st.domains, tokens=st.tokens, fingerprint=st.fingerprint)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"readmoe": json.dumps(meta)})


def load_stats(path: str | Path) -> Stats:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"stats file '{path}' not found; create it with `readmoe calibrate`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("readmoe", "{}"))
            if meta.get("format") != STATS_FORMAT:
                raise UserError(f"'{path}' is not a readmoe stats file")
            domains = meta["domains"]
            mean = torch.stack([f.get_tensor(f"mean/{d}") for d in domains]) if domains else torch.empty(0)
            sketch, ssum = f.get_tensor("sketch"), f.get_tensor("sketch_sum")
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - safetensors raises several types for a corrupt file
        raise UserError(f"stats file '{path}' is corrupt or not a safetensors file; re-run `readmoe calibrate`") from None
    return Stats(domains, mean, meta["tokens"], sketch, ssum, meta["fingerprint"], meta)


class ActivationRecorder:
    """Forward pre-hooks on every down_proj accumulating sum |x|, token counts and the sketch.

    Each layer accumulates on the device it runs on (a model dispatched with `device_map="auto"` spreads layers
    over GPUs and the CPU), in fp64 where the device has it: statistics never take the model's bf16."""

    def __init__(self, model, sketch_dim: int = SKETCH_DIM, seed: int = 0):
        self.mlps = backbone.mlps(model)
        self.L = len(self.mlps)
        self.I = self.mlps[0].down_proj.in_features
        self._sum: list[torch.Tensor | None] = [None] * self.L
        self._sketch: list[torch.Tensor | None] = [None] * self.L
        self.sketch_sum = torch.zeros(sketch_dim, dtype=torch.float64)
        self.tokens = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.sketch_dim = sketch_dim
        self._R: dict[torch.device, torch.Tensor] = {}
        self.handles = [m.down_proj.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mlps)]

    @staticmethod
    def _acc_dtype(device: torch.device) -> torch.dtype:
        return torch.float64 if device.type in ("cpu", "cuda") else torch.float32

    def _hook(self, layer: int):
        def hook(_mod, inputs):
            x = inputs[0].detach()
            acc = self._acc_dtype(x.device)
            if self._sum[layer] is None:
                self._sum[layer] = torch.zeros(self.I, dtype=acc, device=x.device)
            if self._sketch[layer] is None:
                self._sketch[layer] = torch.zeros(self.I, self.sketch_dim, dtype=acc, device=x.device)
            elif self._sketch[layer].device != x.device:  # resumed on the CPU, now running elsewhere
                self._sketch[layer] = self._sketch[layer].to(x.device, acc)
            a = x.abs().reshape(-1, x.shape[-1]).float()
            R = self._R.get(x.device)
            if R is None:
                R = self._R[x.device] = self._R[torch.device("cpu")].to(x.device)
            self._sum[layer] += a.sum(0).to(acc)
            self._sketch[layer] += (a.T @ R).to(acc)
        return hook

    def _gather(self, parts: list[torch.Tensor | None], shape) -> torch.Tensor:
        return torch.stack([torch.zeros(shape, dtype=torch.float64) if p is None else p.double().cpu() for p in parts])

    @property
    def sum(self) -> torch.Tensor:
        return self._gather(self._sum, (self.I,))

    @property
    def sketch(self) -> torch.Tensor:
        return self._gather(self._sketch, (self.I, self.sketch_dim))

    def add_sketch(self, sketch: torch.Tensor) -> None:
        """Start from a resumed run's sketch."""
        for l in range(self.L):
            if self._sketch[l] is None:
                self._sketch[l] = torch.zeros(self.I, self.sketch_dim, dtype=torch.float64)
            self._sketch[l] += sketch[l].to(self._sketch[l])

    def run(self, model, batch: torch.Tensor) -> None:
        n = batch.numel()
        self._R = {torch.device("cpu"): torch.randn(n, self.sketch_dim, generator=self.gen)}
        self.sketch_sum += self._R[torch.device("cpu")].sum(0).double()
        with torch.inference_mode():
            model(input_ids=batch.to(model.get_input_embeddings().weight.device), use_cache=False)
        self.tokens += n

    def take_mean(self) -> tuple[torch.Tensor, int]:
        mean, n = (self.sum / max(self.tokens, 1)).float(), self.tokens
        self._sum = [None] * self.L  # made again on first use (inside inference mode, so not zeroed in place here)
        self.tokens = 0
        return mean, n

    def close(self):
        for h in self.handles:
            h.remove()


def check_sizes(samples: int, seq_len: int) -> None:
    """Called by the CLI before it loads the model, and by `calibrate`."""
    if samples < 1 or seq_len < 2:
        raise UserError("`samples` must be >= 1 and `seq_len` >= 2")


def calibrate(model, tokenizer, corpus: Corpus, domains: list[str], samples: int, seq_len: int, out: Path,
              batch_size: int = 4, progress: bool = True) -> Stats:
    check_sizes(samples, seq_len)
    max_pos = getattr(backbone.text_config(model), "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise UserError(f"`seq_len` {seq_len} exceeds the model's context window ({max_pos})")
    fp = backbone.fingerprint(model)
    params = {"samples": samples, "seq_len": seq_len, "corpus": corpus.spec, "sketch_dim": SKETCH_DIM}
    # recorded beside the fingerprint, so a bf16 load of the same parent is recognised (backbone.same_model)
    ident = {"fingerprint_bf16": backbone.fingerprint(model, as_bf16=True)}
    rec = ActivationRecorder(model)
    done: dict[str, tuple[torch.Tensor, int]] = {}
    if out.exists():  # resume: keep finished domains of a compatible partial run
        prev = load_stats(out)
        same = prev.fingerprint == fp and all(prev.meta.get(k) == v for k, v in params.items())
        if same and prev.complete and prev.domains == list(domains):
            rec.close()
            return prev
        if same and not prev.complete:
            for i, d in enumerate(prev.domains):
                done[d] = (prev.mean[i], prev.tokens[i])
            rec.add_sketch(prev.sketch.double())
            rec.sketch_sum += prev.sketch_sum.double()
    try:
        for di, d in enumerate(domains):
            if d in done:
                continue
            rec.gen.manual_seed(1000 + di)  # the same random sketch whether resumed or not
            seqs = corpus.sequences(tokenizer, d, "calib", samples, seq_len)
            with tqdm(total=seqs.numel(), desc=f"calibrate {d}", unit="tok", unit_scale=True, disable=not progress) as bar:
                for b in range(0, len(seqs), batch_size):  # the bar's rate is the calibration throughput, tokens/s
                    rec.run(model, seqs[b:b + batch_size])
                    bar.update(seqs[b:b + batch_size].numel())
            done[d] = rec.take_mean()
            save_stats(out, _stats(domains, done, rec, fp, params | ident, complete=len(done) == len(domains)))
    finally:
        rec.close()
    return _stats(domains, done, rec, fp, params | ident, complete=True)


def _stats(domains, done, rec, fp, params, complete) -> Stats:
    names = [d for d in domains if d in done]
    return Stats(names, torch.stack([done[d][0] for d in names]), [done[d][1] for d in names],
                 rec.sketch.float(), rec.sketch_sum.float(), fp, dict(params, complete=complete))
