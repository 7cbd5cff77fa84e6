"""PyTorch timing of the seed model: the baseline `glip bench` is held against, the same work.

    python bench_torch.py --preset seed-r18 --mode train --batch 8 --size 128 --iters 5 [--threads 2] [--device cuda]

Prints one JSON line: preset, mode, batch, size, median_s, min_s, times, torch, device, threads.
Presets (random weights; the architecture is what is timed):
  seed-r50: ResNet-50, BERT-base (12 layers, 768), d 256, 8 heads, 6 + 6 layers, ff 2048,
            100 queries, 91 classes
  seed-r18: ResNet-18, BERT 4 layers 256 wide, d 128, 4 heads, 3 + 3 layers, ff 512,
            50 queries, 10 classes
infer: eval mode, no gradient, softmax of the logits. train: forward, the DETR criterion
(glip_ref.class_losses), backward, gradient-norm clipping at 0.1, an AdamW step with the
backbone stem and layer1 frozen (backbone and text lr 1e-5, the rest 1e-4, weight decay 1e-4).
Inputs: 16 random token ids per image, three boxes per image. On a GPU (`--device cuda`) the
criterion runs on the CPU copies of the outputs (its Hungarian matching is scipy's), as
`glip bench` reads the matching costs to the host, and each step is timed between two
synchronisations of the device.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import glip_ref as R  # noqa: E402

PRESETS = {
    "seed-r50": dict(arch="resnet50", text=(768, 12, 12, 3072), d=256, heads=8, layers=6, ff=2048,
                     queries=100, classes=91),
    "seed-r18": dict(arch="resnet18", text=(256, 4, 4, 1024), d=128, heads=4, layers=3, ff=512,
                     queries=50, classes=10),
}

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="seed-r18", choices=PRESETS)
ap.add_argument("--mode", default="infer", choices=["infer", "train"])
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--size", type=int, default=384)
ap.add_argument("--iters", type=int, default=5)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
args = ap.parse_args()
dev = torch.device(args.device)
torch.set_num_threads(args.threads)
torch.manual_seed(0)
p = PRESETS[args.preset]
hidden, layers, heads, inter = p["text"]
bert = BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=inter), add_pooling_layer=True)
model = R.SeedGLIP(p["arch"], bert, p["d"], p["heads"], p["layers"], p["layers"], p["ff"], p["queries"],
                   p["classes"], head="class").to(dev)
images = torch.randn(args.batch, 3, args.size, args.size).to(dev)
ids = torch.randint(1000, 30000, (args.batch, 16))
ids[:, 0], ids[:, -1] = 101, 102
ids = ids.to(dev)
mask = torch.ones_like(ids)
boxes = torch.tensor([[0.3, 0.4, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1]])
targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 7])} for _ in range(args.batch)]

if args.mode == "train":
    model.train()
    for name, prm in model.backbone.named_parameters():
        if name.startswith(("conv1", "bn1", "layer1")):
            prm.requires_grad_(False)
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    opt = torch.optim.AdamW([
        {"params": [q for n, q in named if n.startswith("backbone")], "lr": 1e-5},
        {"params": [q for n, q in named if n.startswith("text")], "lr": 1e-5},
        {"params": [q for n, q in named if not n.startswith(("backbone", "text"))], "lr": 1e-4},
    ], weight_decay=1e-4)
else:
    model.eval()


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def step():
    if args.mode == "infer":
        with torch.no_grad():
            model(images, ids, mask)["pred_logits"].softmax(-1)
        return
    out = model(images, ids, mask)
    if dev.type != "cpu":
        out = {k: v.cpu() for k, v in out.items()}
    losses, _ = R.class_losses(out, targets, p["classes"])
    opt.zero_grad()
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()


step()  # warm-up
times = []
# The timed iterations, for a CUDA profiler attached (cuProfilerStart / Stop, as glip bench).
if dev.type == "cuda":
    torch.cuda.profiler.start()
for _ in range(args.iters):
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t0)
if dev.type == "cuda":
    torch.cuda.profiler.stop()
print(json.dumps({"preset": args.preset, "mode": args.mode, "batch": args.batch, "size": args.size,
                  "median_s": statistics.median(times), "min_s": min(times), "times": times,
                  "torch": torch.__version__, "device": args.device, "threads": args.threads}))
