#!/usr/bin/env python3
"""Train a toy Qwen3-MoE from scratch on byte-level Python source and save a log-spaced checkpoint trace.

The toy traces of examples/README.md are made with, on one H200 (about 3.5 minutes each):

    python3 tools/train_toy_moe.py --mode bos    --steps 2048 --out examples/toy_trace_bos
    python3 tools/train_toy_moe.py --mode random --steps 2048 --out examples/toy_trace_random

Data: the *.py files under the running interpreter's site-packages folders (or --corpus-dir), in a
seeded random file order, concatenated into one uint8 array of at most --corpus-mb MB, with every
byte equal to the BOS byte (0x02) removed so that BOS only ever appears where it is put. The last 1%
is held out. Training windows are sampled on the GPU at uniform random offsets:
  --mode bos     every window is BOS followed by seq_len - 1 bytes of text (a fixed first token);
  --mode random  every window is seq_len bytes of text (position 0 is an arbitrary byte).

Model: Qwen3MoeForCausalLM, vocab 256 (bytes), hidden 128, 4 query heads of dim 32, 2 KV heads,
QK-norm, RoPE theta 1e4, every layer MoE with 8 experts top-2 (moe_intermediate 128, normalised
top-k weights), untied lm_head, 8 layers; all configurable.
Optimisation: AdamW (0.9, 0.95), weight decay 0.1 on matrices and embeddings (not on norm gains),
lr 3e-3 with 100 linear warm-up steps then constant (--schedule cosine decays to 10% at --steps),
batch 128 x 512, bf16 autocast over float32 weights, gradient clipping at 1.0, router auxiliary loss
off (--aux-loss-coef enables transformers' load-balancing loss).

Outputs under --out:
  step<N>/            save_pretrained in bf16 (config.json, model.safetensors) at steps 0, 128, 256,
                      512, ... doubling up to --steps, and at --steps (or where --max-minutes stops it)
  train_settings.json every setting, versions, the data description, the checkpoints written
  train_log.csv       step,loss,lr,time: mean training loss (nats/byte) over the last --log-every steps
  probes.npy          int32 [16, 128] probe windows from the held-out text (BOS first in bos mode)
"""

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import sys
import sysconfig
import time

import numpy as np
import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

BOS_BYTE = 0x02
VOCAB_SIZE = 256
HELDOUT_FRACTION = 0.01
PROBE_COUNT = 16
PROBE_LEN = 128
FIRST_DOUBLING_CHECKPOINT = 128  # checkpoints: 0, then 128, 256, 512, ...
COSINE_FLOOR = 0.1  # --schedule cosine ends at this fraction of --lr


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("bos", "random"), required=True,
                        help="bos: every window starts with byte 0x02; random: windows start anywhere")
    parser.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--steps", type=int, default=2048, help="optimizer steps")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock limit: save a final checkpoint and stop when it is reached")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    model = parser.add_argument_group("model")
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--hidden", type=int, default=128)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--head-dim", type=int, default=32)
    model.add_argument("--kv-heads", type=int, default=2)
    model.add_argument("--experts", type=int, default=8)
    model.add_argument("--top-k", type=int, default=2)
    model.add_argument("--moe-intermediate", type=int, default=128)
    model.add_argument("--rope-theta", type=float, default=1e4)
    model.add_argument("--experts-impl", default="grouped_mm",
                       help="transformers experts backend for training; on an H200 grouped_mm ran 13 steps/s, "
                            "eager 3.9, batched_mm 1.0 (8 layers, batch 128 x 512)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch", type=int, default=128, help="windows per step")
    optim.add_argument("--seq-len", type=int, default=512, help="tokens per window, BOS included")
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    optim.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                       help="after warm-up: constant lr, or cosine decay to 10%% of lr at --steps")
    optim.add_argument("--weight-decay", type=float, default=0.1)
    optim.add_argument("--grad-clip", type=float, default=1.0)
    optim.add_argument("--aux-loss-coef", type=float, default=0.0,
                       help="router load-balancing loss weight; 0 turns it off")
    data = parser.add_argument_group("data")
    data.add_argument("--corpus-dir", action="append", default=None,
                      help="folder to take *.py files from (repeatable); default: this interpreter's "
                           "site-packages folders")
    data.add_argument("--corpus-mb", type=float, default=300.0, help="corpus size cap in MB (1e6 bytes)")
    data.add_argument("--log-every", type=int, default=10, help="steps per train_log.csv row")
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2 or args.log_every < 1:
        parser.error("--steps, --batch and --log-every must be >= 1 and --seq-len >= 2")
    if args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def default_corpus_dirs():
    """The running interpreter's package folders (purelib and platlib; often the same)."""
    paths = sysconfig.get_paths()
    dirs = []
    for key in ("purelib", "platlib"):
        path = os.path.realpath(paths[key])
        if os.path.isdir(path) and path not in dirs:
            dirs.append(path)
    return dirs


def list_python_files(dirs):
    """Every *.py file under dirs, as sorted unique real paths (the order is made random later, seeded)."""
    files = set()
    for root_dir in dirs:
        for folder, _, names in os.walk(root_dir):
            files.update(os.path.realpath(os.path.join(folder, name)) for name in names if name.endswith(".py"))
    return sorted(files)


def load_corpus(dirs, cap_bytes, seed):
    """Concatenate *.py files (seeded random order, newline-separated) into one uint8 array of <= cap_bytes.

    Bytes equal to BOS_BYTE are removed so that the BOS token is unique to position 0 in bos mode;
    the same corpus is used in both modes. Returns (array, description dict).
    """
    files = list_python_files(dirs)
    if not files:
        raise SystemExit(f"no *.py files under {dirs}")
    order = np.random.default_rng(seed).permutation(len(files))
    chunks, total, used, unreadable = [], 0, 0, 0
    for index in order:
        try:
            with open(files[index], "rb") as f:
                content = f.read()
        except OSError:
            unreadable += 1
            continue
        chunks.append(content)
        chunks.append(b"\n")
        total += len(content) + 1
        used += 1
        if total >= cap_bytes:
            break
    raw = np.frombuffer(b"".join(chunks), dtype=np.uint8)[:cap_bytes]
    corpus = raw[raw != BOS_BYTE]
    description = {
        "source": "*.py files under corpus_dirs, seeded random file order, joined with '\\n'",
        "corpus_dirs": dirs,
        "files_found": len(files),
        "files_used": used,
        "files_unreadable": unreadable,
        "bytes": int(corpus.size),
        "bos_bytes_removed": int(raw.size - corpus.size),
        "sha256": hashlib.sha256(corpus.tobytes()).hexdigest(),
    }
    return corpus, description


class WindowSampler:
    """Samples training windows from the corpus held on the device (one gather per batch)."""

    def __init__(self, text, mode, batch, seq_len, seed, device):
        self.text = torch.from_numpy(text).to(device)
        self.mode = mode
        self.batch = batch
        self.text_len = seq_len - 1 if mode == "bos" else seq_len
        if text.size < self.text_len:
            raise SystemExit(f"the training text ({text.size} bytes) is shorter than one window")
        self.offsets = torch.arange(self.text_len, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.bos = torch.full((batch, 1), BOS_BYTE, dtype=torch.long, device=device)

    def next(self):
        """int64 [batch, seq_len] token ids."""
        starts = torch.randint(0, self.text.numel() - self.text_len + 1, (self.batch, 1),
                               device=self.text.device, generator=self.generator)
        window = self.text[starts + self.offsets].long()
        return torch.cat([self.bos, window], dim=1) if self.mode == "bos" else window


def make_probes(heldout, mode, seed):
    """int32 [PROBE_COUNT, PROBE_LEN] windows from the held-out text at seeded random offsets."""
    text_len = PROBE_LEN - 1 if mode == "bos" else PROBE_LEN
    starts = np.random.default_rng(seed + 1).integers(0, heldout.size - text_len + 1, size=PROBE_COUNT)
    windows = np.stack([heldout[s:s + text_len] for s in starts]).astype(np.int32)
    if mode == "bos":
        windows = np.concatenate([np.full((PROBE_COUNT, 1), BOS_BYTE, dtype=np.int32), windows], axis=1)
    return windows


# ----------------------------------------------------------------------------------------------
# Model, schedule, checkpoints
# ----------------------------------------------------------------------------------------------


def build_config(args):
    """Qwen3-MoE config of the toy model: every layer MoE, untied, QK-norm (always on in Qwen3)."""
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,  # dense-MLP size; unused, since every layer is MoE
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        rms_norm_eps=1e-6,
        max_position_embeddings=max(args.seq_len, 4096),
        tie_word_embeddings=False,
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=BOS_BYTE if args.mode == "bos" else None,
        use_cache=False,
    )


def learning_rate(step, args):
    """lr for optimizer step `step` (0-based): linear warm-up, then constant or cosine to COSINE_FLOOR."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.schedule == "constant":
        return args.lr
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def checkpoint_steps(total_steps):
    """0, then 128, 256, 512, ... doubling while <= total_steps, and total_steps itself."""
    steps = {0, total_steps}
    step = FIRST_DOUBLING_CHECKPOINT
    while step <= total_steps:
        steps.add(step)
        step *= 2
    return sorted(steps)


def save_checkpoint(model, out_dir, step):
    """save_pretrained of a bf16 copy (the training weights stay float32) into out_dir/step<N>."""
    path = os.path.join(out_dir, f"step{step}")
    export = copy.deepcopy(model).to(torch.bfloat16)
    export.save_pretrained(path, safe_serialization=True)
    del export
    return path


@torch.no_grad()
def heldout_loss(model, probes, device):
    """Mean next-byte cross-entropy (nats) of the model on the probe windows."""
    model.eval()
    ids = torch.from_numpy(probes.astype(np.int64)).to(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return loss


def versions(device):
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path, content):
    """Write through a temporary name so a killed run never leaves a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    started = time.time()
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"{args.out} is not empty: remove it or choose another --out")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")

    corpus_dirs = args.corpus_dir or default_corpus_dirs()
    corpus, data_description = load_corpus(corpus_dirs, int(args.corpus_mb * 1e6), args.seed)
    heldout_len = max(int(corpus.size * HELDOUT_FRACTION), PROBE_LEN)
    train_text, heldout = corpus[:-heldout_len], corpus[-heldout_len:]
    probes = make_probes(heldout, args.mode, args.seed)
    np.save(os.path.join(args.out, "probes.npy"), probes)
    print(f"corpus: {data_description['files_used']} of {data_description['files_found']} files, "
          f"{corpus.size / 1e6:.1f} MB ({time.time() - started:.0f} s); held out {heldout_len} bytes", flush=True)

    torch.manual_seed(args.seed)
    config = build_config(args)
    model = Qwen3MoeForCausalLM(config)
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation(args.experts_impl)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    sampler = WindowSampler(train_text, args.mode, args.batch, args.seq_len, args.seed, device)
    schedule = checkpoint_steps(args.steps)

    settings = {
        "command": " ".join(["python3"] + sys.argv),
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "running",
        "args": vars(args),
        "model": {"class": "Qwen3MoeForCausalLM", "parameters": n_params, "config": config.to_dict(),
                  "attn_implementation": "sdpa", "experts_implementation": args.experts_impl},
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "weight_decay_applies_to": "tensors with >= 2 dims (matrices, embeddings); not norm gains",
                      "grad_clip": args.grad_clip, "precision": "bf16 autocast, float32 weights and optimizer state",
                      "lr": args.lr, "warmup_steps": args.warmup,
                      "schedule": "linear warm-up, then " + ("constant" if args.schedule == "constant" else
                                                            f"cosine to {COSINE_FLOOR} x lr at --steps"),
                      "router_aux_loss": "off" if args.aux_loss_coef == 0 else
                      f"transformers load-balancing loss x {args.aux_loss_coef}"},
        "data": dict(data_description, heldout_bytes=heldout_len,
                     windows=("BOS byte 0x02 + seq_len-1 bytes from a uniform random offset" if args.mode == "bos"
                              else "seq_len bytes from a uniform random offset"),
                     probes=f"probes.npy int32 [{PROBE_COUNT}, {PROBE_LEN}] from the held-out text"),
        "seed": args.seed,
        "versions": versions(device),
        "checkpoint_schedule": schedule,
        "checkpoints": [],
    }
    settings_path = os.path.join(args.out, "train_settings.json")
    write_json(settings_path, settings)

    def checkpoint(step):
        path = save_checkpoint(model, args.out, step)
        loss = heldout_loss(model, probes, device)
        settings["checkpoints"].append({"step": step, "path": os.path.basename(path), "heldout_loss": loss,
                                        "seconds": round(time.time() - started, 1)})
        write_json(settings_path, settings)
        print(f"checkpoint step {step}: held-out loss {loss:.4f}", flush=True)

    print(f"model: {n_params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch} x {args.seq_len} "
          f"({args.mode} mode); checkpoints at {schedule}", flush=True)
    log = open(os.path.join(args.out, "train_log.csv"), "w")
    log.write("step,loss,lr,time\n")
    checkpoint(0)
    use_aux = args.aux_loss_coef > 0
    running_loss = torch.zeros((), device=device)
    interval_start, interval_steps = time.time(), 0
    stop_reason = "completed"
    step = 0
    while step < args.steps:
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = sampler.next()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            output = model(input_ids=ids, labels=ids, output_router_logits=use_aux)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        # transformers adds coef * aux_loss to .loss; the log keeps the language-model loss alone.
        lm_loss = output.loss - args.aux_loss_coef * output.aux_loss if use_aux else output.loss
        running_loss += lm_loss.detach()
        step += 1
        interval_steps += 1

        out_of_time = args.max_minutes is not None and time.time() - started > 60 * args.max_minutes
        if step % args.log_every == 0 or step == args.steps or out_of_time:
            mean_loss = running_loss.item() / interval_steps
            now = time.time()
            log.write(f"{step},{mean_loss:.6f},{lr:.6e},{now - started:.2f}\n")
            log.flush()
            if step % (10 * args.log_every) == 0 or step == args.steps or out_of_time:
                rate = interval_steps / (now - interval_start)
                print(f"step {step:6d}  loss {mean_loss:.4f}  lr {lr:.2e}  {rate:.1f} steps/s  "
                      f"{rate * args.batch * args.seq_len / 1e6:.2f} M tok/s  {now - started:.0f} s", flush=True)
            running_loss.zero_()
            interval_start, interval_steps = now, 0
        if step in schedule or out_of_time:
            saving_started = time.time()
            checkpoint(step)
            interval_start += time.time() - saving_started  # keep saving time out of steps/s
        if out_of_time and step < args.steps:
            stop_reason = f"--max-minutes {args.max_minutes} reached at step {step}"
            print(stop_reason, flush=True)
            break
    log.close()
    settings.update(status=stop_reason, final_step=step, seconds=round(time.time() - started, 1))
    write_json(settings_path, settings)
    print(f"done: {stop_reason}; {step} steps in {time.time() - started:.0f} s; outputs in {args.out}", flush=True)


if __name__ == "__main__":
    main()
