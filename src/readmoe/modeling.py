"""ReadMEForCausalLM: a dense HF backbone whose MLPs are carved into shared + routed experts,
driven by a pre-gating router that reads token ids only.

The backbone is the parent's own HF class (Llama, Qwen2, Gemma-3, ...) built
from `config.text_config`, so attention, RoPE variants, norms and KV caching
are exactly the parent's; only `layer.mlp` is swapped for `ReadMEMLP`. Every
(layer, expert, projection) is its own tensor in the safetensors file, named
`backbone.model.layers.{l}.mlp.experts.{e}.{proj}.weight`, so one expert can
be read from disk alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.utils import ModelOutput

from .moe import GatedMLP, ReadMEMLP, Routing
from .router import PreGatingRouter, RouterConfig, RouterCache


RoutingMode = Literal["pregate", "layerwise"]
CarveMode = Literal["domain", "domain-free"]


class ReadMEConfig(PreTrainedConfig):
    model_type = "readmoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    expert_names: list[str] | None = None
    shared_sizes: list[int] | None = None
    expert_sizes: list[list[int]] | None = None
    keep: float = 0.5
    carve_mode: CarveMode = "domain"
    routing: RoutingMode = "pregate"  # "pregate" (the router over token ids) or "layerwise" (a linear gate per layer: baseline)
    router_dim: int = 128
    router_heads: int = 4
    router_layers: int = 1
    router_ffn_dim: int = 352
    router_rope_theta: float = 10000.0
    parent_model: str | None = None
    parent_fingerprint: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n_layers = self.text_config.num_hidden_layers
        if self.expert_names is None:
            self.expert_names = ["expert0"]
        if self.shared_sizes is None:
            self.shared_sizes = [self.text_config.intermediate_size] * n_layers
        if self.expert_sizes is None:
            self.expert_sizes = [[0] * len(self.expert_names) for _ in range(n_layers)]
        if len(self.shared_sizes) != n_layers or len(self.expert_sizes) != n_layers:
            raise ValueError(f"shared_sizes/expert_sizes must have one entry per layer ({n_layers})")
        if any(len(s) != len(self.expert_names) for s in self.expert_sizes):
            raise ValueError("every layer needs one expert size per expert name")
        if self.routing not in get_args(RoutingMode):
            raise ValueError(f"routing must be 'pregate' or 'layerwise', not {self.routing!r}")
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    def router_config(self) -> RouterConfig:
        return RouterConfig(vocab_size=self.text_config.vocab_size, num_experts=self.num_experts, dim=self.router_dim,
                            n_heads=self.router_heads, n_layers=self.router_layers, ffn_dim=self.router_ffn_dim,
                            rope_theta=self.router_rope_theta)


@dataclass
class ReadMEOutput(ModelOutput):
    """`router_logits`: the pre-gating router's [B, T, E], or a layer-wise model's gates [B, T, L, E];
    `expert_ids`: the experts used, [B, T] (or [B, T, L] per layer)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: object | None = None
    router_logits: torch.Tensor | None = None
    router_cache: RouterCache | None = None
    expert_ids: torch.Tensor | None = None


def hidden_act(text_config) -> str:
    return getattr(text_config, "hidden_activation", None) or text_config.hidden_act


class ReadMEPreTrainedModel(PreTrainedModel):
    config_class = ReadMEConfig
    base_model_prefix = "readmoe"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, GatedMLP):
            module.neuron_idx.copy_(torch.arange(module.size))
        elif isinstance(module, ReadMEForCausalLM):
            module.neuron_scores.zero_()
        elif hasattr(self, "backbone") and module is not self and not isinstance(module, ReadMEPreTrainedModel):
            self.backbone._init_weights(module)


class ReadMEForCausalLM(ReadMEPreTrainedModel, GenerationMixin):
    def __init__(self, config: ReadMEConfig):
        super().__init__(config)
        tc = config.text_config
        self.backbone = AutoModelForCausalLM.from_config(tc)
        self.routing = Routing()
        act = ACT2FN[hidden_act(tc)]
        bias = bool(getattr(tc, "mlp_bias", False))
        layerwise = config.routing == "layerwise"
        for i, layer in enumerate(self.backbone.model.layers):
            layer.mlp = ReadMEMLP(tc.hidden_size, config.shared_sizes[i], config.expert_sizes[i], act, self.routing,
                                  bias=bias, down_bias=bias, layer_idx=i, layerwise=layerwise)
        self.router = None if layerwise else PreGatingRouter(config.router_config())
        # Calibrated importance of every dense neuron (mean |activation| over domains): the pruned baseline's ranking.
        self.register_buffer("neuron_scores", torch.zeros(tc.num_hidden_layers, tc.intermediate_size))
        self.experts_offloaded = False  # True when loaded with routed=False: the engine's store holds them
        self.post_init()

    # ------------------------------------------------------------ HF plumbing
    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.backbone.get_output_embeddings()

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def layerwise(self) -> bool:
        return self.config.routing == "layerwise"

    def router_modules(self) -> list[nn.Module]:
        """What picks the experts: the pre-gating router, or a layer-wise model's gates."""
        return [m.gate for m in self.moe_layers()] if self.layerwise else [self.router]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.router_modules() for p in m.parameters()]

    def moe_layers(self) -> list[ReadMEMLP]:
        return [layer.mlp for layer in self.backbone.model.layers]

    def neuron_sets(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Per layer: dense neuron indices of the shared expert, and of each routed expert."""
        return [(m.shared.neuron_idx.clone(), [e.neuron_idx.clone() for e in m.experts]) for m in self.moe_layers()]

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Expert id of every token [B, T], from the router alone: the backbone does not run."""
        if self.layerwise:
            raise ValueError("a layer-wise routed model picks experts inside the backbone; it cannot route ahead")
        dev = self.router.embed.weight.device
        logits, _ = self.router(input_ids.to(dev), None if attention_mask is None else attention_mask.to(dev))
        return logits.argmax(-1).to(input_ids.device)

    def _expert_ids(self, expert_ids, input_ids) -> torch.Tensor:
        if isinstance(expert_ids, int) or (torch.is_tensor(expert_ids) and expert_ids.dim() == 0):
            expert_ids = torch.full_like(input_ids, int(expert_ids))
        if expert_ids.shape != input_ids.shape and expert_ids.shape != (*input_ids.shape, self.config.text_config.num_hidden_layers):
            raise ValueError(f"expert_ids shape {tuple(expert_ids.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= self.num_experts):
            raise ValueError(f"expert ids must lie in [0, {self.num_experts})")
        return expert_ids.to(input_ids.device, torch.long)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache: bool | None = None,
                expert_ids: torch.LongTensor | int | None = None, router_cache: RouterCache | None = None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> ReadMEOutput:
        """`expert_ids` (LongTensor [B, T], or one int for all tokens) fixes the routed expert of each
        token in every layer ([B, T, L]: per layer); otherwise the router decides from the token ids
        (or, in a layer-wise model, each layer's gate from its hidden state)."""
        if input_ids is None:
            raise ValueError("ReadMEForCausalLM needs input_ids: the pre-gating router reads token ids")
        if self.experts_offloaded:
            raise ValueError("this model was loaded without its routed experts (load_readme(routed=False)): "
                             "serve it with the engine, or load it whole to call it")
        router_logits, new_router_cache = None, None
        if expert_ids is None and self.layerwise:
            pass  # the gates decide inside every layer
        elif expert_ids is None:
            keep_cache = bool(use_cache) or past_key_values is not None
            router_logits, new_router_cache = self.router(input_ids, attention_mask, router_cache if keep_cache else None)
            if not keep_cache:
                new_router_cache = None
            expert_ids = router_logits.argmax(-1)
        else:
            expert_ids = self._expert_ids(expert_ids, input_ids)
        with self.routing.use(expert_ids) as gate_logits:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if gate_logits:  # layer-wise gates chose: their logits [B, T, L, E] and choices [B, T, L], as Mixtral returns
            router_logits = torch.stack(gate_logits, -2)
            expert_ids = router_logits.argmax(-1)
        return ReadMEOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values,
                            router_logits=router_logits, router_cache=new_router_cache, expert_ids=expert_ids)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder, num_new_tokens)
        model_kwargs["router_cache"] = outputs.router_cache  # the router, too, only sees new tokens next step
        return model_kwargs


def register() -> None:
    AutoConfig.register("readmoe", ReadMEConfig, exist_ok=True)
    AutoModelForCausalLM.register(ReadMEConfig, ReadMEForCausalLM, exist_ok=True)


def is_routed_key(key: str) -> bool:
    """A routed expert's weight or bias (not its neuron indices): what an expert store serves from disk."""
    return ".mlp.experts." in key and not key.endswith("neuron_idx")


def load_readme(path: str, dtype: torch.dtype = torch.float32,
                routed: bool = True) -> tuple[ReadMEForCausalLM, object]:
    """Load a carved checkpoint and its tokenizer; a bad directory gets one clear line.

    `routed=False` leaves the routed experts' weights on the meta device (shapes without memory): for an engine
    whose expert store reads them from the checkpoint, so a parent-size MoE never sits in memory whole."""
    from transformers import AutoTokenizer

    from .errors import UserError

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UserError(f"checkpoint directory '{path}' not found; create one with `readmoe carve`")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"'{path}' has no config.json; is it a readmoe checkpoint?")
    try:
        import json

        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except ValueError:
        raise UserError(f"'{cfg_file}' is not valid JSON; the checkpoint is corrupt") from None
    if model_type != "readmoe":
        raise UserError(f"'{path}' holds a '{model_type}' model, not a readmoe MoE; carve one with `readmoe carve`")
    from .backbone import quiet

    try:
        with quiet():
            model = _load_streamed(p, dtype, routed)
            tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors/json/shape errors all mean a corrupt checkpoint
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"checkpoint '{path}' is corrupt or incomplete: {first}") from None
    model.eval()
    return model, tok


def _load_streamed(path: Path, dtype: torch.dtype, routed: bool = True) -> ReadMEForCausalLM:
    """The model skeleton on the meta device (accelerate's big-model recipe), then every tensor read from the
    checkpoint one at a time, cast by `rounding.cast` (the cast every reader of a checkpoint makes: the engine's
    expert store too), and assigned in place. `routed=False` leaves the routed experts on the meta device."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    from .checkpoint import Checkpoint
    from .rounding import cast

    config = ReadMEConfig.from_pretrained(str(path))
    config.name_or_path = str(path)  # as from_pretrained records it
    with init_empty_weights():  # parameters on meta; buffers (rotary tables, neuron indices) real
        model = ReadMEForCausalLM(config)
    skip = (lambda k: False) if routed else is_routed_key
    ckpt = Checkpoint(path)
    try:
        sd = {}
        for k in ckpt.keys():
            if not skip(k):
                t = ckpt.read(k)
                sd[k] = cast(t, dtype, k) if t.is_floating_point() else t
    finally:
        ckpt.close()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not skip(k) and k not in model.all_tied_weights_keys]
    if missing or unexpected:
        raise ValueError(f"weights do not line up with the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    if not routed:
        for m in model.moe_layers():  # still meta, in the serving dtype, so dtype queries agree with the real weights
            for mod in m.experts.modules():
                for name, w in mod._parameters.items():
                    if w is not None:
                        mod._parameters[name] = nn.Parameter(w.to(dtype), requires_grad=False)
        model.experts_offloaded = True
    for c in (model.config, model.config.text_config):
        c.dtype = dtype  # as from_pretrained(dtype=...) records it
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def load_router(path: str | Path) -> tuple[PreGatingRouter, object]:
    """Only the pre-gating router (fp32) and the tokenizer of a carved checkpoint: what a front end needs to know a
    request's experts before any replica sees it, at a few MB instead of the whole model."""
    from transformers import AutoTokenizer

    from .checkpoint import Checkpoint
    from .errors import UserError

    p = Path(path).expanduser()
    config = ReadMEConfig.from_pretrained(str(p))
    if config.routing != "pregate":
        raise UserError(f"'{path}' is routed layer by layer and has no pre-gating router to route requests with")
    router = PreGatingRouter(config.router_config())
    ckpt = Checkpoint(p)
    try:
        sd = {k.removeprefix("router."): ckpt.read(k).float() for k in ckpt.keys() if k.startswith("router.")}
    finally:
        ckpt.close()
    router.load_state_dict(sd)
    return router.eval(), AutoTokenizer.from_pretrained(str(p))
