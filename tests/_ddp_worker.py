"""A tiny DPO run, the same in one process and under torchrun (used by test_distributed.py).

    python tests/_ddp_worker.py OUT.json [OUTPUT_DIR]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT.json [OUTPUT_DIR]

train_dpo is called exactly as in a one-process script: under torchrun it starts the process group itself
(gloo on the CPU), wraps the model in DDP and gives each process half of every batch. The first process
writes the history to OUT.json.
"""

import json
import sys


def run(output_dir=None, steps=6):
    from minidpo.tokenizer import train_tokenizer
    from minidpo.train import DPOConfig, train_dpo

    from _fixtures import fresh_model, make_pairs

    pairs, corpus = make_pairs(n=64)
    tokenizer = train_tokenizer(corpus, model_max_length=64)
    model = fresh_model(tokenizer)
    cfg = DPOConfig(batch_size=8, lr=5e-3, max_steps=steps, warmup_steps=2, cache_dir=None, show_progress=False,
                    device="cpu")
    return train_dpo(model, tokenizer, pairs, cfg, output_dir=output_dir, log=lambda *_: None)


if __name__ == "__main__":
    import torch.distributed as dist

    result = run(sys.argv[2] if len(sys.argv) > 2 else None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, "history": result.history}, f)
