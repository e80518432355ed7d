"""The pipeline as a library: carve a checkpoint, train the baselines, write the quality report.

The CLI parses flags and calls these; a notebook gets the same report with one import:
`pipeline.run_eval(moe, dense, tok, Corpus("embedded"), ...)`. Progress lines go to `echo`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import UserError

if TYPE_CHECKING:  # annotations only: importing these here would load transformers eagerly or cycle
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from .modeling import ReadMEForCausalLM



def carve_and_save(model_spec: str, st, keep: float, out: Path, experts: int | None = None,
                   router_dim: int | None = None, overwrite: bool = False, dtype=None, dense=None,
                   echo: Callable[[str], None] = print, progress: bool = True) -> None:
    """Carve the MoE from the parent and its calibration stats, and write the checkpoint (in `dtype`, default the
    parent's) with its carve report.

    A parent on disk whose tensors carry its model's names is carved streaming (`carve.carve_streaming`): neither
    model is ever in memory whole. Any other parent (a hub id, renamed tensors) is loaded, or `dense` used."""
    import torch
    from transformers import AutoTokenizer

    from . import backbone, report, rounding
    from .carve import (NotStreamable, ParentCheckpoint, build_model, carve_streaming, carve_table, check_stats_match,
                        cluster_sets, dense_params, domain_sets, identity, neuron_scores, param_summary)
    from .checkpoint import is_checkpoint
    from .outdir import claim, output_dir

    src = backbone.resolve(model_spec)
    parent = None
    if Path(src).is_dir() and is_checkpoint(src):
        try:
            parent = ParentCheckpoint(src)
        except NotStreamable as e:
            echo(f"carving in memory: {e}")
    try:
        if parent is not None:
            check_stats_match(st, parent.fingerprints(), (parent.layers, parent.intermediate))
            tok, dense_total = AutoTokenizer.from_pretrained(src), parent.params()
            dtype = dtype or parent.ckpt.dtype(parent.mlp_key(0, "down_proj"))
        else:
            if dense is None:
                dense, tok = backbone.load_dense(model_spec, dtype or torch.float32)
            else:
                tok = AutoTokenizer.from_pretrained(src)
            check_stats_match(st, *identity(dense))
            dense_total = dense_params(dense)
        claim(out, "carve", overwrite)  # refuse before the minutes of work, not after
        if experts is None:
            if len(st.domains) < 1:
                raise UserError("stats hold no domain")
            sets, names, mode = domain_sets(st.mean, keep), st.domains, "domain"
        else:
            sets, names, mode = cluster_sets(st, experts, keep), [f"cluster{i}" for i in range(experts)], "domain-free"
        spec = model_spec if model_spec.startswith("embedded") or not Path(model_spec).exists() else str(Path(model_spec).resolve())
        with output_dir(out, "carve", overwrite) as tmp:
            if parent is not None:
                moe = carve_streaming(parent, sets, names, keep, mode, spec, tmp, dtype, router_dim,
                                      scores=neuron_scores(st), progress=progress)
            else:
                moe = build_model(dense, sets, names, keep, mode, spec, router_dim, scores=neuron_scores(st))
                moe = rounding.cast_module(moe, dtype) if dtype is not None else moe
                moe.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            table, params = carve_table(moe), param_summary(moe)
            h, rows = report.carve_rows(table)
            sh, srows = report.carve_summary_rows(table, params, dense_total)
            report.write(tmp / "carve_report.json", {"mode": mode, "keep": keep, "experts": names, "layers": table,
                                                     "params": dict(params, dense=dense_total),
                                                     "streamed": parent is not None},
                         f"# Carve report\n\nmode {mode}, keep {keep}, experts {', '.join(names)}\n\n"
                         + report.markdown_table(sh, srows) + "\n![experts per layer](carve_report.png)\n\n"
                         + report.markdown_table(h, rows))
            report.plot_carve(table, tmp / "carve_report.png")
    finally:
        if parent is not None:
            parent.close()
    report.print_table(f"carved {len(names)} experts ({mode}, keep {keep})", sh, srows)
    echo(f"wrote {out}")


def ensure_baselines(model_dir: Path, moe: ReadMEForCausalLM, dense: PreTrainedModel, tok: PreTrainedTokenizerBase, wanted: list[str], progress: bool = True,
                     echo: Callable[[str], None] = print) -> dict:
    """Each baseline trained with the MoE's own budget, data and seed, into MODEL/baselines/NAME (resumable)."""
    from .baselines import build
    from .corpus import Corpus
    from .modeling import load_readme
    from .train import is_complete, saved_config, train as run_train

    if not wanted:
        return {}
    saved = saved_config(model_dir)
    if saved is None:
        raise UserError(f"{model_dir} has no training record, so baselines cannot match its budget; "
                        "run `readmoe train` first or drop --baselines")
    cfg, domains, corpus_spec = saved
    out = {}
    for name in wanted:
        d = model_dir / "baselines" / name
        if is_complete(d):
            out[name], _ = load_readme(str(d))
            continue
        echo(f"training baseline '{name}' with the budget of {model_dir} ({cfg.rounds} rounds, "
                   f"{cfg.expert_steps} expert steps of {cfg.batch_tokens} tokens)")
        m = build(name, moe, dense)
        run_train(m, dense, tok, Corpus(corpus_spec), domains, cfg, d, progress=progress,
                  targets_from=model_dir / "train" / "targets.safetensors")
        m.eval()
        out[name] = m
    return out


def run_eval(moe: ReadMEForCausalLM, dense: PreTrainedModel, tok: PreTrainedTokenizerBase, corpus, names: list[str], seqs: int, seq_len: int, out: Path, baselines: dict | None = None,
             mmlu_n: int | None = 0, model_dir: Path | None = None, echo: Callable[[str], None] = print) -> dict:
    """The quality report (perplexity per domain against the parent and baselines, MMLU, router accuracy and
    cost, routing statistics, parameters): written as JSON, Markdown and plots beside `out`, and returned."""
    from . import assets, mmlu, report
    from .carve import dense_params, param_summary
    from .evaluate import domain_perplexities, router_time_share

    t0 = time.time()
    baselines = baselines or {}
    out = Path(out)
    ppl, router, routing = domain_perplexities(moe, dense, tok, corpus, names, seqs, seq_len, baselines=baselines)
    params = param_summary(moe)
    router["params"] = params["router"]
    prompt = corpus.sequences(tok, names[0], "validation", 1, 64)
    router["time_share"] = router_time_share(moe, prompt)
    scores = {}
    if mmlu_n != 0:
        qs = mmlu.load(assets.mmlu_jsonl(), mmlu_n)
        models = {"dense": dense, "readme": moe, "pruned": baselines.get("pruned")}
        for v, m in models.items():
            if m is not None:
                scores[v] = mmlu.score(m, tok, qs, desc=f"mmlu {v}")["accuracy"]
    curves = {}
    if model_dir is not None:
        curves["readme"] = report.recovery_curve(model_dir / "train" / "log.jsonl")
        for name in baselines:
            curves[name] = report.recovery_curve(model_dir / "baselines" / name / "train" / "log.jsonl")
    curves = {k: v for k, v in curves.items() if v}
    data = {"perplexity": ppl, "mmlu": scores, "router": router,
            "params": {"total": params["total"], "active": params["active"], "router": params["router"],
                       "dense": dense_params(dense) if dense is not None else None},
            "routing": routing, "recovery": {k: [list(p) for p in v] for k, v in curves.items()},
            "settings": {"corpus": corpus.spec, "seqs": seqs, "seq_len": seq_len, "keep": moe.config.keep,
                         "experts": list(moe.config.expert_names), "mmlu_questions": len(qs) if mmlu_n != 0 else 0},
            "seconds": round(time.time() - t0, 1)}
    pngs = {k: out.with_name(f"{out.stem}_{k}.png") for k in ("routing", "recovery")}
    h, rows = report.perplexity_rows(ppl)
    md = (f"# Quality report\n\n## Validation perplexity\n\n{seqs} x {seq_len} tokens per domain. `readme` uses the "
          f"model's pre-gating router; `pruned` is a dense model of the same active MLP size and `layerwise` the same "
          f"experts behind a linear router per layer, both trained with the same budget; `domain_oracle` routes each "
          f"text to its own domain's expert, `oracle` gives each token the expert holding most of its top dense "
          f"neurons, `random` picks uniformly.\n\n" + report.markdown_table(h, rows)
          + f"\n![perplexity]({out.with_suffix('.png').name})\n")
    if scores:
        md += (f"\n## MMLU (cloze, {data['settings']['mmlu_questions']} questions, chance 25 %)\n\n"
               + report.markdown_table(["variant", "accuracy %"], [[k, 100 * v] for k, v in scores.items()]))
    share = router.get("time_share")
    md += ("\n## Router\n\n" + report.markdown_table(["", "value"], [
        ["top-1 accuracy vs oracle labels %", 100 * router["accuracy"] if router.get("accuracy") is not None else None],
        ["parameters", params["router"]],
        ["share of batch-1 decode time %", 100 * share if share is not None else None]]))
    kp = routing.get("keep_previous", {})
    md += ("\n## Routing statistics\n\nHow often a token keeps the previous token's expert (the paper: 71 % for Read-ME, "
           "21 % for Mixtral):\n\n" + report.markdown_table(["routing", "keep previous %"], [[k, 100 * v] for k, v in kp.items()]))
    mi = routing.get("adjacent_mi_bits", {})
    if mi:
        md += (f"\nMutual information between adjacent layers' expert choices (bits; {routing['max_mi_bits']:.2f} = "
               f"fully determined):\n\n" + report.markdown_table(
                   ["choices", "mean", "min", "max"], [[k, sum(v) / len(v), min(v), max(v)] for k, v in mi.items() if v]))
    md += f"\n![routing]({pngs['routing'].name})\n"
    if curves:
        md += f"\n## Recovery\n\n![recovery]({pngs['recovery'].name})\n"
    md += ("\n## Parameters\n\n" + report.markdown_table(["", "count"], [
        ["MoE total", params["total"]], ["MoE active per token", params["active"]], ["router", params["router"]],
        ["dense parent", data["params"]["dense"]]]))
    report.write(out, data, md)
    report.plot_perplexity(ppl, out.with_suffix(".png"))
    report.plot_routing(routing, list(moe.config.expert_names), pngs["routing"])
    if curves:
        report.plot_recovery(curves, pngs["recovery"])
    report.print_table("validation perplexity", h, rows)
    if scores:
        report.print_table("MMLU accuracy %", ["variant", "accuracy"], [[k, 100 * v] for k, v in scores.items()])
    if router.get("accuracy") is not None:
        echo(f"router top-1 accuracy against oracle labels: {100 * router['accuracy']:.1f} %")
    if share is not None:
        echo(f"router share of batch-1 decode time: {100 * share:.2f} %")
    echo(f"wrote {out}, {out.with_suffix('.md')} and the plots beside it")
    return data


def dense_on_engine(dense: PreTrainedModel, moe: ReadMEForCausalLM):
    """The dense parent as a one-path model (every neuron in the shared expert), to serve it on the same engine."""
    import torch

    from .baselines import one_path_model

    L, I = len(moe.moe_layers()), moe.config.text_config.intermediate_size
    return one_path_model(dense, [torch.arange(I)] * L, "dense", "dense", 1.0, moe.config.parent_model)
