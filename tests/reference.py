"""An independent, dense, plain-PyTorch data2vec (vision) computation used as the test oracle.

Written from the method description (data2vec paper, BEiT) without importing the pipeline's model
code: explicit matmuls, explicit softmax, explicit layer norms and a relative position index built
by loops. It reads weights from a plain state dict.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def instance_norm_time(x, eps=1e-5):  # (B, T, D): normalise each channel over time
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def relative_bias(table, grid):
    """(heads, 1+N, 1+N) from BEiT's table, with the index built pair by pair."""
    n = grid * grid
    size = table.shape[0]
    t = n + 1
    idx = torch.empty(t, t, dtype=torch.long)
    for a in range(t):
        for b in range(t):
            if a == 0 and b == 0:
                idx[a, b] = size - 1
            elif a == 0:
                idx[a, b] = size - 3  # cls -> patch
            elif b == 0:
                idx[a, b] = size - 2  # patch -> cls
            else:
                ra, ca = divmod(a - 1, grid)
                rb, cb = divmod(b - 1, grid)
                idx[a, b] = (ra - rb + grid - 1) * (2 * grid - 1) + (ca - cb + grid - 1)
    return table[idx].permute(2, 0, 1)


def encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first, tap, bias=None):
    """Transformer blocks on (B, T, D); returns (x after the blocks and final norm, taps per block)."""
    b_, _, d = x.shape
    hd = d // heads
    taps = []
    for i in range(depth):
        p = f"{prefix}encoder.blocks.{i}."

        def lin(name, v):
            y = v @ sd[p + name + ".weight"].T
            return y + sd[p + name + ".bias"] if p + name + ".bias" in sd else y

        def attention(v):
            q, k, val = (lin(n, v).reshape(b_, -1, heads, hd).transpose(1, 2) for n in ("attn.query", "attn.key", "attn.value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
            if bias is not None:
                scores = scores + bias
            probs = torch.exp(scores - scores.amax(-1, keepdim=True))
            probs = probs / probs.sum(-1, keepdim=True)
            return lin("attn.out", (probs @ val).transpose(1, 2).reshape(b_, -1, d))

        def ffn(v):
            return lin("ffn.fc2", gelu(lin("ffn.fc1", v)))

        g1, g2 = sd.get(p + "gamma_1", 1.0), sd.get(p + "gamma_2", 1.0)
        ln = lambda v, n: layer_norm(v, sd[p + n + ".weight"], sd[p + n + ".bias"], eps)  # noqa: E731
        if norm_first:
            x = x + g1 * attention(ln(x, "attn_norm"))
            f = g2 * ffn(ln(x, "ffn_norm"))
            x = x + f
        else:
            x = ln(x + g1 * attention(x), "attn_norm")
            f = g2 * ffn(x)
            x = ln(x + f, "ffn_norm")
        taps.append(x if tap == "block" else f)
    if norm_first:
        x = layer_norm(x, sd[f"{prefix}encoder.final_norm.weight"], sd[f"{prefix}encoder.final_norm.bias"], eps)
    return x, taps


def vit_forward(sd, prefix, images, mask, grid, patch, heads, depth, eps, norm_first=True, tap="block"):
    """Returns (final (B, N, D) without CLS, taps list of (B, N, D) without CLS)."""
    w = sd[f"{prefix}embed.patch.weight"]  # (D, C, p, p)
    b_, c, h, wd = images.shape
    patches = images.reshape(b_, c, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(b_, grid * grid, -1)
    x = patches @ w.reshape(w.shape[0], -1).T + sd[f"{prefix}embed.patch.bias"]  # (B, N, D)
    if mask is not None:
        x = torch.where(mask[..., None], sd[f"{prefix}embed.mask_token"].reshape(1, 1, -1).expand_as(x), x)
    x = torch.cat([sd[f"{prefix}embed.cls_token"].reshape(1, 1, -1).expand(b_, 1, -1), x], 1)
    bias = relative_bias(sd[f"{prefix}embed.rel_pos_bias.table"], grid)
    x, taps = encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first, tap, bias)
    return x[:, 1:], [t[:, 1:] for t in taps]


def conv1d(x, weight, bias=None, stride=1, padding=0, groups=1):
    """Plain conv1d by unfolding: x (B, Cin, L), weight (Cout, Cin/groups, K)."""
    if padding:
        x = torch.cat([x.new_zeros(*x.shape[:2], padding), x, x.new_zeros(*x.shape[:2], padding)], -1)
    cout, cin_g, k = weight.shape
    cols = x.unfold(-1, k, stride)  # (B, Cin, T, K)
    b_, cin, t, _ = cols.shape
    cols = cols.reshape(b_, groups, cin_g, t, k)
    w = weight.reshape(groups, cout // groups, cin_g, k)
    y = torch.einsum("bgctk,gock->bgot", cols, w).reshape(b_, cout, t)
    return y if bias is None else y + bias[:, None]


def speech_features(sd, prefix, wav, conv_layers):
    """The conv feature encoder (conv, LayerNorm over channels, GELU per layer), LayerNorm, projection: (B, T, D)."""
    x = wav[:, None, :]
    for i, (_, _, stride) in enumerate(conv_layers):
        p = f"{prefix}embed.feature_extractor.conv_layers.{i}."
        x = conv1d(x, sd[p + "conv.weight"], stride=stride)
        x = gelu(layer_norm(x.transpose(1, 2), sd[p + "layer_norm.weight"], sd[p + "layer_norm.bias"]).transpose(1, 2))
    feats = layer_norm(x.transpose(1, 2), sd[f"{prefix}embed.feature_norm.weight"], sd[f"{prefix}embed.feature_norm.bias"])
    return feats @ sd[f"{prefix}embed.projection.weight"].T + sd[f"{prefix}embed.projection.bias"]


def speech_forward(sd, prefix, wav, mask, conv_layers, pos_layers, pos_kernel, pos_groups, heads, depth, eps):
    """data2vec v1 audio backbone; returns (final (B, T, D), FFN taps)."""
    x = speech_features(sd, prefix, wav, conv_layers)
    if mask is not None:
        x = torch.where(mask[..., None], sd[f"{prefix}embed.mask_emb"].expand_as(x), x)
    y = x.transpose(1, 2)
    for i in range(pos_layers):
        p = f"{prefix}embed.pos_conv.convs.{i}."
        y = conv1d(y, sd[p + "weight"], sd[p + "bias"], padding=pos_kernel // 2, groups=pos_groups)
        if pos_kernel % 2 == 0:
            y = y[..., :-1]
        y = gelu(layer_norm(y.transpose(1, 2)).transpose(1, 2))
    x = layer_norm(x + y.transpose(1, 2), sd[f"{prefix}embed.encoder_norm.weight"], sd[f"{prefix}embed.encoder_norm.bias"], eps)
    return encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first=False, tap="ffn")


def targets(taps, k, per_layer, final):
    norm = {"layer": layer_norm, "instance": instance_norm_time, "none": lambda v: v}
    top = [norm[per_layer](t) for t in taps[-k:]]
    return norm[final](sum(top) / k)


def loss(pred, target, kind, beta, reduce_dim, scale):
    diff = pred - target
    if kind == "l2":
        per = diff ** 2
    else:
        a = diff.abs()
        per = torch.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)
    per = per.sum(-1) if reduce_dim == "sum" else per.mean(-1)
    if scale == "inv_sqrt_dim":
        per = per / math.sqrt(pred.shape[-1])
    return per.sum() / pred.shape[0]


def text_positions(tokens, pad_id):
    """RoBERTa position numbers: pad_id + 1 + i over the non-pad tokens, pad_id at pads (counted by loops)."""
    out = torch.full_like(tokens, pad_id)
    for b in range(tokens.shape[0]):
        count = 0
        for t in range(tokens.shape[1]):
            if tokens[b, t] != pad_id:
                count += 1
                out[b, t] = pad_id + count
    return out


def text_forward(sd, prefix, tokens, pad_id, heads, depth, eps):
    """RoBERTa-style embeddings (positions numbered pad_id + 1 + i over non-pad tokens) + post-LN blocks."""
    positions = text_positions(tokens, pad_id)
    x = sd[f"{prefix}embed.tokens.weight"][tokens] + sd[f"{prefix}embed.positions.weight"][positions]
    x = layer_norm(x, sd[f"{prefix}embed.norm.weight"], sd[f"{prefix}embed.norm.bias"], eps)
    bias = None
    if (tokens == pad_id).any():
        bias = torch.zeros(tokens.shape, dtype=x.dtype).masked_fill(tokens == pad_id, float("-inf"))[:, None, None, :]
    return encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first=False, tap="ffn", bias=bias)


# ---------------------------------------------------------------------------------------------
# data2vec 2.0 (written from fairseq examples/data2vec/models/data2vec2.py and modalities/*.py, the MAE code and
# the paper; none of the pipeline's modules): the student sees only the positions each clone keeps
# ---------------------------------------------------------------------------------------------

def fairseq_inverse_block_mask(batch, patches, mask_prob, block, adjust, gen):
    """fairseq data_utils.compute_block_mask_2d(inverse_mask=True, require_same_masks=True) on torch RNG:
    (batch, patches) float, 1 = masked."""
    d = int(patches ** 0.5)
    keep_prob = 1 - mask_prob
    mask = torch.zeros(batch, d, d)
    centres = torch.randint(0, patches, (batch, int(patches * ((keep_prob + adjust) / block ** 2))), generator=gen)
    mask.view(batch, -1).scatter_(1, centres, 1)
    b_idx, rows, cols = mask.nonzero(as_tuple=True)
    offset = block // 2
    for i in range(block):
        for j in range(block):
            mask[b_idx, (rows + i - offset).clamp(0, d - 1), (cols + j - offset).clamp(0, d - 1)] = 1
    mask = mask.reshape(batch, -1)
    target = int(patches * keep_prob)
    for m in mask:
        n = int(m.sum())
        if n > target:
            m[torch.multinomial(m, n - target, replacement=False, generator=gen)] = 0
        elif n < target:
            m[torch.multinomial(1 - m, target - n, replacement=False, generator=gen)] = 1
    return 1 - mask


def fairseq_block_mask_1d(shape, mask_prob, mask_length, mask_prob_adjust, gen):
    """fairseq data_utils.compute_block_mask_1d(require_same_masks=True, inverse_mask=False, expand_adjcent=False,
    mask_dropout=0, non_overlapping=False), as the audio dataset calls it, on torch RNG: (B, L) float, 1 = masked."""
    B, L = shape
    mask = torch.zeros((B, L))
    mask_inds = torch.randint(0, L, size=(B, int(L * ((mask_prob + mask_prob_adjust) / mask_length))), generator=gen)
    mask.view(B, -1).scatter_(1, mask_inds, 1)
    centers = mask.nonzero(as_tuple=True)
    inds = ([], [])
    offset = mask_length // 2
    for i in range(mask_length):
        k1 = i - offset
        inds[0].append(centers[0])
        inds[1].append(centers[1] + k1)
    i0 = torch.cat(inds[0])
    i1 = torch.cat(inds[1]).clamp_(min=0, max=L - 1)
    mask[(i0, i1)] = 1
    mask = mask.view(B, -1)
    n_masks = mask.sum(dim=-1)
    final_target_len = int(L * mask_prob)
    for i in range(len(mask)):
        n = n_masks[i]
        m = mask[i]
        if n > final_target_len:
            to_unmask = torch.multinomial(m, int(n - final_target_len), replacement=False, generator=gen)
            m[to_unmask] = 0
        elif n < final_target_len:
            to_mask = torch.multinomial((1 - m), int(final_target_len - n), replacement=False, generator=gen)
            m[to_mask] = 1
    return mask


def keep_rows(x, visible):
    """(B, T, ...) -> (R, K, ...): row r is clone r % M of sample r // M, keeping positions visible[r] (loops)."""
    clones = visible.shape[0] // x.shape[0]
    return torch.stack([x[r // clones][visible[r]] for r in range(visible.shape[0])])


def vit2_forward(sd, prefix, images, visible, positions, grid, patch, heads, depth, eps):
    """data2vec 2.0 ViT: patches + fixed positions, (student) each clone's kept patches, CLS, LayerNorm, post-LN
    blocks. Returns (final (R, 1 + K, D) with CLS, FFN taps without CLS)."""
    w = sd[f"{prefix}embed.patch.weight"]
    b_, c = images.shape[:2]
    cols = images.reshape(b_, c, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5).reshape(b_, grid * grid, -1)
    x = cols @ w.reshape(w.shape[0], -1).T + sd[f"{prefix}embed.patch.bias"] + positions
    if visible is not None:
        x = keep_rows(x, visible)
    x = torch.cat([sd[f"{prefix}embed.cls_token"].reshape(1, 1, -1).expand(x.shape[0], 1, -1), x], 1)
    x = layer_norm(x, sd[f"{prefix}embed.norm.weight"], sd[f"{prefix}embed.norm.bias"], eps)
    x, taps = encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first=False, tap="ffn")
    return x, [t[:, 1:] for t in taps]


def speech2_student(sd, prefix, wav, mask, visible, conv_layers, pos_layers, pos_kernel, pos_groups, heads, depth,
                    eps):
    """data2vec 2.0 audio student: conv features once per clip; per clone the positional convs run on the
    sequence with its masked frames zeroed, the kept frames (features + positions) go on. -> (final, taps)."""
    feats = speech_features(sd, prefix, wav, conv_layers)
    clones = mask.shape[0] // wav.shape[0]
    rows = []
    for r in range(mask.shape[0]):
        f = feats[r // clones]
        y = torch.where(mask[r][:, None], torch.zeros_like(f), f).T[None]
        for i in range(pos_layers):
            p = f"{prefix}embed.pos_conv.convs.{i}."
            y = conv1d(y, sd[p + "weight"], sd[p + "bias"], padding=pos_kernel // 2, groups=pos_groups)
            y = y[..., :-1] if pos_kernel % 2 == 0 else y
            y = gelu(layer_norm(y.transpose(1, 2)).transpose(1, 2))
        rows.append((f + y[0].T)[visible[r]])
    x = layer_norm(torch.stack(rows), sd[f"{prefix}embed.encoder_norm.weight"], sd[f"{prefix}embed.encoder_norm.bias"],
                   eps)
    return encoder_blocks(sd, prefix, x, heads, depth, eps, norm_first=False, tap="ffn")


def conv2d(x, weight, bias, groups):
    """Plain 'same' grouped conv2d for odd kernels by unfolding: x (R, Cin, H, W), weight (Cout, Cin/g, k, k)."""
    cout, cin_g, k, _ = weight.shape
    r, cin, h, w = x.shape
    cols = torch.nn.functional.unfold(x, k, padding=k // 2).reshape(r, groups, cin_g * k * k, h * w)
    y = torch.einsum("rgcp,goc->rgop", cols, weight.reshape(groups, cout // groups, cin_g * k * k))
    return y.reshape(r, cout, h, w) + bias[:, None, None]


def conv_decoder(sd, prefix, full, layers, groups, residual, grid=None):
    """data2vec 2.0 decoder on (R, T, D): per layer grouped conv -> LayerNorm over channels, no affine -> GELU, plus
    the input where the widths agree; then the projection Linear(s) with GELU between."""
    y = full.transpose(1, 2)
    if grid is not None:
        y = y.reshape(y.shape[0], y.shape[1], grid, grid)
    for i in range(layers):
        p = f"{prefix}decoder.blocks.{i}.conv."
        w, b = sd[p + "weight"], sd[p + "bias"]
        if grid is None:
            out = conv1d(y, w, b, padding=w.shape[-1] // 2, groups=groups)
            out = out[..., :y.shape[-1]]
        else:
            out = conv2d(y, w, b, groups)
        out = gelu(layer_norm(out.movedim(1, -1)).movedim(-1, 1))
        y = out + y if residual and out.shape == y.shape else out
    y = y.flatten(2).transpose(1, 2)
    linears = sorted({k.split(".")[2] for k in sd if k.startswith(f"{prefix}decoder.proj.")}, key=int)
    for n, idx in enumerate(linears):
        y = gelu(y) if n else y
        y = y @ sd[f"{prefix}decoder.proj.{idx}.weight"].T + sd[f"{prefix}decoder.proj.{idx}.bias"]
    return y


def place_visible(out, visible, length):
    """(R, K, D) encoder outputs back at their positions of (R, length, D) rows; zeros elsewhere (noise std 0)."""
    full = out.new_zeros(out.shape[0], length, out.shape[-1])
    for r in range(out.shape[0]):
        full[r, visible[r]] = out[r]
    return full


def mae_sincos_positions(dim, grid):
    """MAE's / fairseq's get_2d_sincos_pos_embed in numpy: meshgrid(w, h) ('xy'), the first half of the channels
    from grid[0], the second from grid[1], each [sin | cos] of pos x 10000^(-k / (D/4))."""
    import numpy as np
    mesh = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), axis=0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)
    return torch.from_numpy(emb).float()
