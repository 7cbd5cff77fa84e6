"""The PyTorch specification of glip-rs: the seed model, its losses and GLIP's prompt rules.

Every fixture the Rust tests read is computed from these functions by make_fixtures.py; the
Rust crates reproduce them within the tolerances stated in fixtures/README.md (written by
make_fixtures.py beside the fixtures).

Conventions shared with the Rust side:
  * images are NCHW float32, normalised with ImageNet mean and std;
  * boxes inside the model and the losses are normalised (cx, cy, w, h);
  * parameter names are torchvision's (backbone), Hugging Face BertModel's (text) and
    torch.nn.Transformer's (transformer), so that real checkpoints load unchanged.
"""

import math

import torch
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "FrozenBatchNorm2d", "ResNetBody", "SeedQueries", "TokenHead", "SeedGLIP", "GroundingDecoderLayer",
    "DeformableAttention", "DeformableEncoderLayer", "token_centres", "BiAttentionBlock",
    "text_positions", "TextEnhancerLayer", "FeatureEnhancer",
    "cxcywh_to_xyxy",
    "giou", "focal", "hungarian", "class_losses", "token_losses", "detection_prompt", "positive_map",
]


# ----------------------------------------------------------------------------------- backbone

class ResNetBody(nn.Module):
    """A torchvision ResNet up to layer4 (no pooling, no classifier) with frozen batch norm
    (eps 1e-5, as DETR and GLIP); forward returns C2, C3, C4, C5. Names are torchvision's."""

    def __init__(self, arch):
        super().__init__()
        full = getattr(torchvision.models, arch)(weights=None, norm_layer=FrozenBatchNorm2d)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(full, name))
        self.out_channels = full.fc.in_features

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        levels = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            levels.append(x)
        return tuple(levels)


# ----------------------------------------------------------------------------------- seed model

class SeedQueries(nn.Module):
    """The seed tutorial's queries: the pooled sentence projected to d and L2-normalised, plus
    one learned embedding per query. Names: query_proj.{weight,bias}, query_embed."""

    def __init__(self, text_dim, d, num_queries):
        super().__init__()
        self.query_proj = nn.Linear(text_dim, d)
        self.query_embed = nn.Parameter(torch.randn(num_queries, d))

    def forward(self, pooled):
        sentence = F.normalize(self.query_proj(pooled), p=2.0, dim=-1, eps=0.0)
        return sentence[:, None, :] + self.query_embed[None, :, :]


class TokenHead(nn.Module):
    """GLIP's region-word alignment: a logit for every (query, text token) pair.

    tokens are L2-normalised (t), then
        logit[q, k] = (W_img hs[q]) . (W_txt (t[k] / 2)) / exp(log_scale) + t[k] . bias_lang + bias0
    clamped to [-50000, 50000]; bias0 starts at the focal-loss prior -log((1 - 0.01) / 0.01).
    """

    def __init__(self, text_dim, d, prior=0.01):
        super().__init__()
        self.dot_product_projection_text = nn.Linear(text_dim, d)
        self.dot_product_projection_image = nn.Linear(d, d)
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.bias_lang = nn.Parameter(torch.zeros(text_dim))
        self.bias0 = nn.Parameter(torch.tensor(math.log(prior / (1.0 - prior))))

    def forward(self, hs, tokens):
        t = F.normalize(tokens, p=2.0, dim=-1)
        image = self.dot_product_projection_image(hs)
        text = self.dot_product_projection_text(t / 2.0)
        scores = torch.einsum("bqd,btd->bqt", image, text) / torch.exp(self.log_scale)
        bias = (t * self.bias_lang).sum(dim=-1) + self.bias0
        return torch.clamp(scores + bias[:, None, :], -50000.0, 50000.0)


class SeedGLIP(nn.Module):
    """The seed tutorial's model made runnable: C5 -> 1x1 input_proj -> torch.nn.Transformer
    (post-norm, relu, dropout 0.1, no positional encoding) whose decoder reads the seed queries;
    boxes from a linear layer and a sigmoid (cxcywh); logits from class_pred (num_classes + 1,
    the last "no object") or the token head. No auxiliary outputs."""

    def __init__(self, arch, text_model, d, heads, enc_layers, dec_layers, ff, num_queries,
                 num_classes, head):
        super().__init__()
        text_dim = text_model.config.hidden_size
        self.backbone = ResNetBody(arch)
        self.text = text_model
        self.input_proj = nn.Conv2d(self.backbone.out_channels, d, 1)
        self.query_generator = SeedQueries(text_dim, d, num_queries)
        self.transformer = nn.Transformer(d, heads, enc_layers, dec_layers, ff, dropout=0.1)
        self.bbox_pred = nn.Linear(d, 4)
        self.head = head
        if head == "class":
            self.class_pred = nn.Linear(d, num_classes + 1)
        elif head == "token":
            self.token_head = TokenHead(text_dim, d)
        else:
            raise ValueError(f"head {head!r}: class or token")

    def forward(self, images, input_ids, attention_mask):
        c5 = self.backbone(images)[3]
        src = self.input_proj(c5).flatten(2).permute(2, 0, 1)  # (S, B, d): sequence first
        text = self.text(input_ids=input_ids, attention_mask=attention_mask)
        queries = self.query_generator(text.pooler_output).transpose(0, 1)  # (Q, B, d)
        memory = self.transformer.encoder(src)
        hs = self.transformer.decoder(queries, memory).transpose(0, 1)  # (B, Q, d)
        if self.head == "class":
            logits = self.class_pred(hs)
        else:
            logits = self.token_head(hs, text.last_hidden_state)
        return {"pred_logits": logits, "pred_boxes": torch.sigmoid(self.bbox_pred(hs)), "hs": hs,
                "memory": memory.transpose(0, 1)}


# ----------------------------------------------------------------------------------- query selection

class GroundingDecoderLayer(nn.Module):
    """Grounding DINO's cross-modality decoder layer (groundingdino's
    DeformableTransformerDecoderLayer with use_text_cross_attention) with ordinary multi-head
    attention over the image tokens where Grounding DINO's is deformable: self-attention, text
    cross-attention, image cross-attention, feed-forward (relu), each followed by its residual
    and LayerNorm (post-norm; dropout off). The queries' positions are added to their queries
    in all three attentions, the image positions to the image keys; the text keys carry none.
    Names: torch.nn.TransformerDecoderLayer's (self_attn, multihead_attn, linear1/2, norm1..3)
    plus Grounding DINO's ca_text and catext_norm."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ca_text = nn.MultiheadAttention(d, heads, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.catext_norm = nn.LayerNorm(d), nn.LayerNorm(d)
        self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, qpos, memory, memory_mask, pos, text, text_mask):
        """x, qpos (B, Q, d); memory, pos (B, S, d); text (B, T, d); masks (B, S) / (B, T),
        1 for real tokens."""
        q = x + qpos
        x = self.norm1(x + self.self_attn(q, q, x, need_weights=False)[0])
        x = self.catext_norm(x + self.ca_text(x + qpos, text, text, key_padding_mask=text_mask == 0,
                                              need_weights=False)[0])
        x = self.norm2(x + self.multihead_attn(x + qpos, memory + pos, memory,
                                               key_padding_mask=memory_mask == 0, need_weights=False)[0])
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


class DeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention (MSDeformAttn; its names:
    sampling_offsets, attention_weights, value_proj, output_proj, and its initialisation) with box
    references, as in Deformable DETR's two-stage decoder and Grounding DINO's: each of `heads`
    heads samples `points` locations on every level around its query's box, at
    xy + offset / points * wh / 2, bilinearly with zeros outside the level, and sums them with
    weights softmaxed over levels x points.

    Boxes are (cx, cy, w, h) normalised by each image's real size. A normalised x lies at column
    x * width / stride - 0.5 of a level of that stride (column j's centre is (j + 0.5) * stride
    pixels, as glip-rs lays its tokens out); Deformable DETR reaches nearly the same place through
    its valid ratios. Values at padded tokens are zero, as Deformable DETR's."""

    def __init__(self, d, heads, levels, points):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(d, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d, heads * levels * points)
        self.value_proj = nn.Linear(d, d)
        self.output_proj = nn.Linear(d, d)
        # Deformable DETR's _reset_parameters: offsets start on rays, one direction per head
        # (scaled so the larger coordinate is 1), the i-th point i + 1 away; uniform weights.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2).repeat(1, levels, points, 1)
        for i in range(points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query, reference, value, value_mask, shapes, image_sizes):
        """query (B, Q, d) (positions added); reference (B, Q, 4) boxes or (B, Q, 2) points;
        value (B, S, d), the levels' tokens `shapes` [(h, w, stride)] finest first, each
        row-major; value_mask (B, S), 1 for real tokens; image_sizes (B, 2) (width, height) in
        pixels -> (B, Q, d). Around a box a sample is at xy + offset / points * wh / 2; from a
        point (an encoder's token, Deformable DETR's encoder) `offset` tokens of its level away."""
        B, Q, d = query.shape
        H, L, P = self.heads, self.levels, self.points
        dh = d // H
        v = self.value_proj(value).masked_fill(value_mask[..., None] == 0, 0.0)
        off = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        aw = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        loc = self.locations(off, reference, shapes, image_sizes)  # (B, Q, H, L, P, 2)
        out, start = 0.0, 0
        for lvl, (h, w, stride) in enumerate(shapes):
            vl = v[:, start:start + h * w].reshape(B, h, w, H, dh).permute(0, 3, 4, 1, 2)
            start += h * w
            units = loc[:, :, :, lvl] * image_sizes[:, None, None, None, :] / stride - 0.5
            g = (units + 0.5) / torch.tensor([float(w), float(h)]) * 2.0 - 1.0  # grid_sample's
            g = g.permute(0, 2, 1, 3, 4).reshape(B * H, Q, P, 2)
            s = F.grid_sample(vl.reshape(B * H, dh, h, w), g, mode="bilinear", padding_mode="zeros",
                              align_corners=False)  # (B * H, dh, Q, P)
            a = aw[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * H, 1, Q, P)
            out = out + (s * a).sum(-1)
        out = out.view(B, H, dh, Q).permute(0, 3, 1, 2).reshape(B, Q, d)
        return self.output_proj(out)

    def locations(self, off, reference, shapes, image_sizes):
        """The samples' normalised locations (B, Q, H, L, P, 2)."""
        r = reference[:, :, None, None, None, :]
        if reference.shape[-1] == 4:
            return r[..., :2] + off / self.points * r[..., 2:] * 0.5
        strides = torch.tensor([float(s) for _, _, s in shapes]).view(1, 1, 1, -1, 1, 1)
        return r + off * strides / image_sizes[:, None, None, None, None, :]

    def sampling_units(self, query, reference, shapes, image_sizes):
        """Every sampling location in its level's columns and rows (B, Q, H, L, P, 2)."""
        B, Q, _ = query.shape
        off = self.sampling_offsets(query).view(B, Q, self.heads, self.levels, self.points, 2)
        loc = self.locations(off, reference, shapes, image_sizes)
        strides = torch.tensor([float(s) for _, _, s in shapes]).view(1, 1, 1, -1, 1, 1)
        return loc * image_sizes[:, None, None, None, None, :] / strides - 0.5


def token_centres(shapes, image_sizes):
    """Every token's centre (B, S, 2), normalised by its image's size: column j of a level of
    stride t at (j + 0.5) * t / width (Deformable DETR's encoder reference points, placed by
    each image's own size)."""
    rows = []
    for h, w, stride in shapes:
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        rows.append(torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], -1))
    return torch.cat(rows, 0)[None] / image_sizes[:, None, :]


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR's encoder layer (DeformableTransformerEncoderLayer; Grounding DINO's image
    encoder layer): deformable self-attention of every token from its own centre (query = token
    + position, value = token, padded tokens zero values), then feed-forward (relu), each
    followed by its residual and LayerNorm (post-norm; dropout off). Names: self_attn
    (MSDeformAttn's), linear1/2, norm1/2."""

    def __init__(self, d, heads, levels, points, ff):
        super().__init__()
        self.self_attn = DeformableAttention(d, heads, levels, points)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, pos, mask, shapes, image_sizes):
        centres = token_centres(shapes, image_sizes)
        x = self.norm1(x + self.self_attn(x + pos, centres, x, mask, shapes, image_sizes))
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


# ----------------------------------------------------------------------------------- fusion

class BiAttentionBlock(nn.Module):
    """GLIP's and Grounding DINO's bidirectional image-text attention (their BiAttentionBlock
    around BiMultiHeadAttention, with their names): image and text are layer-normed; image tokens
    attend to the text tokens and text tokens to the image tokens through one score matrix
    (v_proj(v) . l_proj(l) / sqrt(dh) per head), padded text masked for the image and padded
    image tokens for the text (Grounding DINO's attention_mask_v; GLIP masks none); each side
    adds gamma * out_proj(...) (layer scale, 1e-4 at the start).

    residual="normed" is theirs: the residual adds to the layer-normed features. residual="input"
    is glip-rs's `bi-attention` default: it adds to the block's input, so the block starts as the
    identity. Their max-shifts and +-50000 clamps before the softmaxes change nothing in f32 and
    are left out; dropout off."""

    def __init__(self, d_v, d_l, embed, heads, residual="normed", init_values=1e-4):
        super().__init__()
        assert residual in ("normed", "input")
        self.heads, self.embed, self.residual = heads, embed, residual
        self.layer_norm_v, self.layer_norm_l = nn.LayerNorm(d_v), nn.LayerNorm(d_l)
        self.attn = nn.Module()
        self.attn.v_proj, self.attn.l_proj = nn.Linear(d_v, embed), nn.Linear(d_l, embed)
        self.attn.values_v_proj, self.attn.values_l_proj = nn.Linear(d_v, embed), nn.Linear(d_l, embed)
        self.attn.out_v_proj, self.attn.out_l_proj = nn.Linear(embed, d_v), nn.Linear(embed, d_l)
        self.gamma_v = nn.Parameter(init_values * torch.ones(d_v))
        self.gamma_l = nn.Parameter(init_values * torch.ones(d_l))

    def forward(self, v, l, v_mask, l_mask):
        """v (B, S, d_v), l (B, T, d_l); masks (B, S) / (B, T), 1 for real tokens."""
        a = self.attn
        nv, nl = self.layer_norm_v(v), self.layer_norm_l(l)
        B, S, _ = v.shape
        T, H, dh = l.shape[1], self.heads, self.embed // self.heads

        def split(x):
            return x.view(B, -1, H, dh).transpose(1, 2)

        scores = (split(a.v_proj(nv)) * dh ** -0.5) @ split(a.l_proj(nl)).transpose(-1, -2)  # B H S T
        p_v = scores.masked_fill(l_mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
        p_l = scores.transpose(-1, -2).masked_fill(v_mask[:, None, None, :] == 0, float("-inf")).softmax(-1)
        out_v = a.out_v_proj((p_v @ split(a.values_l_proj(nl))).transpose(1, 2).reshape(B, S, self.embed))
        out_l = a.out_l_proj((p_l @ split(a.values_v_proj(nv))).transpose(1, 2).reshape(B, T, self.embed))
        base_v, base_l = (nv, nl) if self.residual == "normed" else (v, l)
        return base_v + self.gamma_v * out_v, base_l + self.gamma_l * out_l


def text_positions(t, width, temperature=10000.0):
    """Grounding DINO's sine positions of the text tokens (get_sine_pos_embed of positions
    0..t-1, as its encoder makes pos_text without sub-sentence position ids): feature 2i of
    position n is sin(2 pi n / temperature^(2i / width)), feature 2i + 1 the cosine of the same
    angle. (t, width)."""
    n = torch.arange(t, dtype=torch.float32)[:, None] * (2 * math.pi)
    dim_t = temperature ** (2 * (torch.arange(width) // 2).float() / width)
    x = n / dim_t
    return torch.stack((x[:, 0::2].sin(), x[:, 1::2].cos()), -1).flatten(1)


def sub_sentences(offsets, caption):
    """Grounding DINO's sub-sentences of one tokenised caption (glip-rs's rule; see
    `sub_sentence_mask` for Grounding DINO's). `offsets`: per token, its (start, end) character
    span in `caption`, (0, 0) for special and padding tokens. A sub-sentence runs up to and
    including a token that is "." or "?", or up to the token before a special one; special and
    padding tokens are sub-sentences of one. Returns per token (start, position): the index of
    its sub-sentence's first token and its place in it."""
    out, start = [], None
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            out.append((i, 0))
            start = None
            continue
        if start is None:
            start = i
        out.append((start, i - start))
        if caption[s:e] in (".", "?"):
            start = None
    return out


def sub_sentence_mask(starts):
    """(b, t) starts -> (b, t, t) bool, True where token i may attend to token j: the same
    sub-sentence (Grounding DINO's `text_self_attention_masks`, which Hugging Face's BERT takes
    as a 3-D attention_mask)."""
    return starts[:, :, None] == starts[:, None, :]


class TextEnhancerLayer(nn.Module):
    """Grounding DINO's text layer (transformer_vanilla's TransformerEncoderLayer as its encoder
    uses it): self-attention with the positions added to queries and keys, padded keys masked,
    then feed-forward (relu), each followed by its residual and LayerNorm (post-norm; dropout
    off). Grounding DINO masks with its sub-sentence attention mask, which for a prompt without
    sub-sentences leaves every real token attending to every real one, as here. Names:
    self_attn (torch's), linear1/2, norm1/2."""

    def __init__(self, d, heads, ff):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, pos, mask, allowed=None):
        """`allowed` (b, t, t) bool: sub-sentences; then it alone masks (Grounding DINO's text
        layer passes only its attn_mask to the attention), repeated per head batch-major, the
        order torch's (b * heads, t, t) attn_mask has (Grounding DINO's `repeat(nhead, 1, 1)`
        is head-major, which differs for a batch of captions with different sub-sentences)."""
        q = x + pos
        if allowed is None:
            a = self.self_attn(q, q, x, key_padding_mask=mask == 0, need_weights=False)[0]
        else:
            blocked = ~allowed.repeat_interleave(self.self_attn.num_heads, 0)
            a = self.self_attn(q, q, x, attn_mask=blocked, need_weights=False)[0]
        x = self.norm1(x + a)
        return self.norm2(x + self.linear2(F.relu(self.linear1(x))))


class FeatureEnhancer(nn.Module):
    """Grounding DINO's feature enhancer (its transformer encoder with fusion and text layers):
    each layer fuses image and text (BiAttentionBlock, residual "normed"), runs the text's
    self-attention layer with the text positions, then the image tokens' deformable encoder
    layer. Names: fusion_layers.N, text_layers.N, layers.N (Grounding DINO's). `record`, if a
    list, receives every image layer's sampling locations in level units (to check that none is
    on a grid line)."""

    def __init__(self, n, d, d_l, heads, text_heads, text_ff, levels, points, ff):
        super().__init__()
        self.fusion_layers = nn.ModuleList(BiAttentionBlock(d, d_l, d, heads) for _ in range(n))
        self.text_layers = nn.ModuleList(TextEnhancerLayer(d_l, text_heads, text_ff) for _ in range(n))
        self.layers = nn.ModuleList(DeformableEncoderLayer(d, heads, levels, points, ff) for _ in range(n))

    def forward(self, x, pos, mask, text, text_mask, shapes, image_sizes, record=None, starts=None,
                positions=None):
        """`starts`, `positions` (b, t) long: the text's sub-sentences (`sub_sentences`); the
        text layers then attend within each and the text positions are the tokens' places in
        theirs (Grounding DINO's `text_self_attention_masks` and `position_ids`)."""
        tpos = text_positions(text.shape[1], text.shape[2])
        tpos = tpos[None] if positions is None else tpos[positions]
        allowed = None if starts is None else sub_sentence_mask(starts)
        centres = token_centres(shapes, image_sizes)
        for fusion, text_layer, layer in zip(self.fusion_layers, self.text_layers, self.layers):
            x, text = fusion(x, text, mask, text_mask)
            text = text_layer(text, tpos, text_mask, allowed)
            if record is not None:
                record.append(layer.self_attn.sampling_units(x + pos, centres, shapes, image_sizes))
            x = layer(x, pos, mask, shapes, image_sizes)
        return x, text


# ----------------------------------------------------------------------------------- boxes

def cxcywh_to_xyxy(b):
    half = b[..., 2:] / 2
    return torch.cat([b[..., :2] - half, b[..., :2] + half], dim=-1)


def giou(a, b):
    """Pairwise generalised IoU of xyxy boxes (torchvision's definition)."""
    return torchvision.ops.generalized_box_iou(a, b)


# ----------------------------------------------------------------------------------- losses

def focal(logits, targets, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss per element (torchvision.ops.sigmoid_focal_loss, no reduction)."""
    return torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")


@torch.no_grad()
def hungarian(cost):
    """An optimal assignment of a (Q, N) cost matrix, scipy's, as (queries, targets) int64
    tensors sorted by query; empty when N = 0."""
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.from_numpy(rows).to(torch.int64), torch.from_numpy(cols).to(torch.int64)


def _box_costs(pred, tgt):
    l1 = torch.cdist(pred, tgt, p=1)
    g = giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(tgt))
    return l1, g


def _box_losses(out, targets, matches, num_boxes):
    pred = torch.cat([out["pred_boxes"][b, q] for b, (q, _) in enumerate(matches)])
    tgt = torch.cat([targets[b]["boxes"][t] for b, (_, t) in enumerate(matches)])
    l1 = (pred - tgt).abs().sum() / num_boxes
    g = (1.0 - torch.diagonal(giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(tgt)))).sum() / num_boxes
    return l1, g


def class_losses(out, targets, num_classes, cost_class=1.0, cost_bbox=5.0, cost_giou=2.0,
                 eos_coef=0.1, w_ce=1.0, w_bbox=5.0, w_giou=2.0):
    """DETR's set criterion for the fixed-class head, without auxiliary losses.

    Matching cost of (query, box): -cost_class * softmax(logits)[label] + cost_bbox * L1
    - cost_giou * GIoU. Loss: cross-entropy over num_classes + 1 with the "no object" class
    weighted eos_coef (unmatched queries target it), L1 and 1 - GIoU over the matched pairs
    summed and divided by the number of boxes in the batch (at least 1).
    targets: per image {"boxes": (N, 4) cxcywh, "labels": (N,) int64}.
    """
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    matches = []
    for b, t in enumerate(targets):
        prob = logits[b].softmax(dim=-1)
        l1, g = _box_costs(boxes[b], t["boxes"])
        cost = cost_bbox * l1 - cost_giou * g - cost_class * prob[:, t["labels"]]
        matches.append(hungarian(cost.detach()))
    num_boxes = max(sum(int(t["labels"].numel()) for t in targets), 1)
    target = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    for b, (q, t) in enumerate(matches):
        target[b, q] = targets[b]["labels"][t]
    weight = torch.cat([torch.ones(num_classes), torch.tensor([eos_coef])])
    ce = F.cross_entropy(logits.permute(0, 2, 1), target, weight=weight)
    l1, g = _box_losses(out, targets, matches, num_boxes)
    total = w_ce * ce + w_bbox * l1 + w_giou * g
    return {"loss_ce": ce, "loss_bbox": l1, "loss_giou": g, "loss": total}, matches


def token_losses(out, targets, text_mask, alpha=0.25, gamma=2.0, cost_class=2.0, cost_bbox=5.0,
                 cost_giou=2.0, w_cls=1.0, w_bbox=5.0, w_giou=2.0):
    """The grounding criterion of the token head (GLIP, Grounding DINO).

    Matching cost of (query q, box j): cost_class times the mean, over the tokens positive for
    j, of focal_pos - focal_neg with p = sigmoid(logit[q, t]):
        focal_pos = alpha (1 - p)^gamma (-log(p + 1e-8)),
        focal_neg = (1 - alpha) p^gamma (-log(1 - p + 1e-8)),
    plus cost_bbox * L1 - cost_giou * GIoU. Loss: sigmoid focal over every (query, real token)
    pair, a matched query's target being its box's positive map and an unmatched query's all
    zeros, summed and divided by the boxes in the batch (at least 1); L1 and 1 - GIoU as DETR.
    targets: per image {"boxes": (N, 4) cxcywh, "positive_map": (N, T) 0/1}; text_mask (B, T),
    1 for real tokens: padding is in no cost and no loss.
    """
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    matches = []
    for b, t in enumerate(targets):
        if t["boxes"].shape[0] == 0:
            matches.append(hungarian(logits.new_zeros(logits.shape[1], 0)))
            continue
        p = logits[b].sigmoid()
        pos = alpha * (1 - p).pow(gamma) * -(p + 1e-8).log()
        neg = (1 - alpha) * p.pow(gamma) * -(1 - p + 1e-8).log()
        pm = t["positive_map"]
        cls = (pos - neg) @ pm.t() / pm.sum(dim=-1).clamp(min=1.0)
        l1, g = _box_costs(boxes[b], t["boxes"])
        matches.append(hungarian((cost_class * cls + cost_bbox * l1 - cost_giou * g).detach()))
    num_boxes = max(sum(int(t["boxes"].shape[0]) for t in targets), 1)
    target = torch.zeros_like(logits)
    for b, (q, t) in enumerate(matches):
        if q.numel():
            target[b, q] = targets[b]["positive_map"][t]
    cls_loss = (focal(logits, target, alpha, gamma) * text_mask[:, None, :]).sum() / num_boxes
    l1, g = _box_losses(out, targets, matches, num_boxes)
    total = w_cls * cls_loss + w_bbox * l1 + w_giou * g
    return {"loss_cls": cls_loss, "loss_bbox": l1, "loss_giou": g, "loss": total}, matches


# ----------------------------------------------------------------------------------- prompts

def detection_prompt(names, separator=". "):
    """GLIP's detection prompt "person. bicycle. car." and each name's (start, end) characters."""
    parts, spans, at = [], [], 0
    for i, name in enumerate(names):
        if i:
            parts.append(separator)
            at += len(separator)
        parts.append(name)
        spans.append((at, at + len(name)))
        at += len(name)
    return "".join(parts) + ".", spans


def positive_map(offsets, spans, num_tokens):
    """(len(spans), num_tokens) 0/1: token k is positive for span j when their character ranges
    overlap; special tokens (empty offsets) never are."""
    pm = torch.zeros(len(spans), num_tokens)
    for j, (s, e) in enumerate(spans):
        for k, (ts, te) in enumerate(offsets[:num_tokens]):
            if ts < te and ts < e and s < te:
                pm[j, k] = 1.0
    return pm
