"""The TRL side of bench_dpo.py: the job `minidpo train` does, done with TRL's DPOTrainer.

Load the model and tokenizer (save_pretrained folder) and the pairs (jsonl), train DPO, save the model.
Run as a subprocess so that its whole wall time (imports included) is measured. Prints one JSON line:
{"train_seconds": ..., "steps": ...}. Needs the bench extra: pip install -e ".[bench]".
"""

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--precompute-ref", action="store_true", help="TRL's precompute_ref_log_probs=True")
    args = p.parse_args()

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pairs = load_dataset("json", data_files=args.data, split="train")
    config = DPOConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
        max_length=args.max_length, learning_rate=args.lr, beta=args.beta, warmup_steps=10,
        lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, seed=0, use_cpu=True,
        precompute_ref_log_probs=args.precompute_ref, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.save_model(args.output_dir)
    print(json.dumps({"train_seconds": seconds, "steps": trainer.state.global_step}))


if __name__ == "__main__":
    main()
