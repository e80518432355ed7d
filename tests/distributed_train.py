"""One process of a data-parallel training run of the tiny MoE, for test_train's multi-process checks:

    torchrun --nproc_per_node 2 tests/distributed_train.py CORPUS_DIR OUT ddp|fsdp

accelerate shards models only on accelerators: on a CPU it runs DDP whatever its config says. For `fsdp` this
switches its state to FSDP2 by hand, so accelerate's own FSDP2 preparation (torch's `fully_shard` over gloo)
and readmoe's FSDP path in `train.py` run here as they would on GPUs.
"""

import sys

import torch

from readmoe import train as T
from readmoe.carve import build_model, domain_sets
from readmoe.corpus import Corpus

from helpers import byte_tokenizer, tiny_llama

CFG = dict(rounds=2, router_steps=15, expert_steps=3, seq_len=32, batch_tokens=128, pool_seqs=12, router_lr=1e-2,
           expert_lr=1e-3)


def tiny_setup(corpus_dir: str):
    """The tiny dense parent, its tokenizer and corpus, and a freshly carved MoE: the same in every process."""
    dense, tok, corpus = tiny_llama(), byte_tokenizer(), Corpus(corpus_dir)
    L, I = len(dense.model.layers), dense.config.intermediate_size
    sets = domain_sets(torch.rand(3, L, I, generator=torch.Generator().manual_seed(0)), 0.5)
    return dense, tok, corpus, build_model(dense, sets, corpus.domains, 0.5, "domain", "test")


def main() -> None:
    corpus_dir, out, mode = sys.argv[1:4]
    dense, tok, corpus, moe = tiny_setup(corpus_dir)
    acc = T.make_accelerator()
    if mode == "fsdp":
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                               reshard_after_forward=True,
                                                               state_dict_type="FULL_STATE_DICT")
        # both shared states: every AcceleratorState() copies the process state's type over its own
        PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP
    T.train(moe, dense, tok, corpus, corpus.domains, T.make_config("demo", **CFG), out, progress=False, accelerator=acc)


if __name__ == "__main__":
    main()
