"""Vision: data2vec v1 / BEiT-style ViT with block-wise masking, and data2vec 2.0's ViT with inverse block masking.

v1 (``model.positions: relative``): patch 16 embedding, CLS token, learned mask token, pre-LN blocks with layer
scale and a relative position bias shared by all blocks (q and v biases, no k bias): the shapes of transformers'
``Data2VecVisionModel``.

2.0 (``model.positions: sincos``, ``model.masking: inverse_block``): patch embedding plus fixed 2-D sin-cos
positions (MAE), a CLS token, LayerNorm, post-LN blocks; the student sees only the patches its mask keeps
(``SinCosPatchEmbedder``), which are grown as 3 x 3 blocks of *kept* patches (``inverse_block_mask``), and a
2-D convolutional decoder predicts the rest.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from PIL import Image, ImageEnhance

from pipeline.config import EncoderConfig, doc, one_of, require
from pipeline.modalities.base import Modality, visible_rows
from pipeline.model.decoder import ConvDecoder
from pipeline.model.transformer import InitConv2d, InitLinear, weight_init

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclass
class VisionConfig:
    image_size: int = doc("square crop size fed to the model", 224)
    patch_size: int = doc("ViT patch size", 16)
    in_chans: int = doc("image channels", 3)
    mask_ratio: float = doc("fraction of patches masked (BEiT/data2vec: 0.6 = 120 of 196; data2vec 2.0: 0.8 B / "
                            "0.75 L)", 0.6)
    masking: str = doc("'block' (BEiT's block-wise masking, data2vec v1) or 'inverse_block' (data2vec 2.0: blocks of "
                       "model.keep_block x model.keep_block patches are kept, the rest masked)", "block")
    keep_block: int = doc("inverse_block: side of each square block of kept patches", 3)
    keep_adjust: float = doc("inverse_block: extra share of patches drawn as block centres before the count is "
                             "trimmed to exact (fairseq mask_prob_adjust: 0.07 B, 0.1 L)", 0.07)
    positions: str = doc("'relative' (BEiT's shared relative position bias and a mask token: data2vec v1) or "
                         "'sincos' (fixed 2-D sin-cos positions, the student sees only visible patches: data2vec 2.0)",
                         "relative")
    clone_batch: int = doc("masked clones of each image sharing one teacher pass (data2vec 2.0: 16)", 1)
    min_block_patches: int = doc("smallest block of the block-wise mask, in patches", 16)
    min_aspect: float = doc("smallest block aspect ratio (the largest is its inverse)", 0.3)
    crop_scale: list = doc("RandomResizedCrop area range", [0.08, 1.0])
    hflip: bool = doc("random horizontal flip", True)
    color_jitter: float = doc("ColorJitter strength for brightness, contrast and saturation (BEiT/data2vec: 0.4; "
                              "0 disables it)", 0.4)
    max_pixels: int = doc("a sample image of more pixels is skipped as bad before it is decoded (data_prep.images "
                          "--max-pixels: the same default)", 50_000_000)
    mean: list = doc("per-channel normalisation mean", [0.485, 0.456, 0.406])
    std: list = doc("per-channel normalisation std", [0.229, 0.224, 0.225])

    def __post_init__(self):
        require(0 < self.image_size <= 8192, f"model.image_size={self.image_size} must be in [1, 8192]")
        require(self.patch_size > 0 and self.image_size % self.patch_size == 0,
                f"model.image_size={self.image_size} must be a multiple of model.patch_size={self.patch_size}")
        require(0.0 < self.mask_ratio < 1.0, f"model.mask_ratio={self.mask_ratio} must be in (0, 1)")
        one_of("model.masking", self.masking, ("block", "inverse_block"))
        one_of("model.positions", self.positions, ("relative", "sincos"))
        require(1 <= self.clone_batch <= 256, f"model.clone_batch={self.clone_batch} must be in [1, 256]")
        require(0 < self.num_masked < self.grid ** 2,
                f"model.mask_ratio={self.mask_ratio} masks {self.num_masked} of {self.grid ** 2} patches; keep some")
        if self.masking == "block":
            require(1 <= self.min_block_patches <= self.num_masked,
                    f"model.min_block_patches={self.min_block_patches} must be in [1, {self.num_masked}]")
        else:
            require(1 <= self.keep_block <= self.grid, f"model.keep_block={self.keep_block} must be in [1, {self.grid}]")
            require(0 <= self.keep_adjust < 1, f"model.keep_adjust={self.keep_adjust} must be in [0, 1)")
        require(0 < self.min_aspect <= 1, "model.min_aspect must be in (0, 1]")
        require(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
                "model.crop_scale must be [min, max] with 0 < min <= max <= 1")
        require(0 <= self.color_jitter < 1, f"model.color_jitter={self.color_jitter} must be in [0, 1)")
        require(len(self.mean) == self.in_chans and len(self.std) == self.in_chans,
                "model.mean and model.std need one value per channel")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_masked(self) -> int:
        patches = self.grid * self.grid
        if self.masking == "inverse_block":  # fairseq compute_block_mask_2d keeps int(L x (1 - mask_prob))
            return patches - int(patches * (1 - self.mask_ratio))
        return int(round(self.mask_ratio * patches))


# ---------------------------------------------------------------------------------------------
# Block-wise masking (BEiT's MaskingGenerator), topped up to an exact count per image
# ---------------------------------------------------------------------------------------------

def add_block(mask: list[list[bool]], budget: int, min_patches: int, min_aspect: float,
              rng: random.Random) -> int:
    """Try (10 times) to mask one random rectangle adding 1..budget new patches; return how many. As BEiT's
    MaskingGenerator._mask: the area is drawn from U(min_patches, budget) even when budget < min_patches."""
    height, width = len(mask), len(mask[0])
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        area = rng.uniform(min_patches, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (0 < h < height and 0 < w < width):
            continue
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        new = [(i, j) for i in range(top, top + h) for j in range(left, left + w) if not mask[i][j]]
        if 0 < len(new) <= budget:
            for i, j in new:
                mask[i][j] = True
            return len(new)
    return 0


def block_mask(grid: int, num_masked: int, min_patches: int, min_aspect: float,
               rng: random.Random) -> torch.Tensor:
    """(grid*grid,) bool mask with exactly ``num_masked`` True, grown as rectangles of >= min_patches.

    BEiT stops when no block fits and can fall short (by about one patch on average at 120 of 196); we top
    up so every image masks the same count, which keeps the masked positions a fixed-shape index. The top-up
    grows the existing blocks by a patch at their edge: scattered single patches would change the block
    structure (tests/test_fidelity.py compares it with BEiT's).
    """
    mask = [[False] * grid for _ in range(grid)]
    count = 0
    while count < num_masked:
        added = add_block(mask, num_masked - count, min_patches, min_aspect, rng)
        if added == 0:
            break
        count += added
    for _ in range(num_masked - count):
        grow_edge(mask, rng)
    return torch.tensor(mask, dtype=torch.bool).flatten()


def grow_edge(mask: list[list[bool]], rng: random.Random) -> None:
    """Mask one random free patch next to a masked one (any free patch when none is masked)."""
    height, width = len(mask), len(mask[0])
    free = [(i, j) for i in range(height) for j in range(width) if not mask[i][j]]
    edge = [(i, j) for i, j in free
            if any(0 <= a < height and 0 <= b < width and mask[a][b]
                   for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)))]
    i, j = rng.choice(edge or free)
    mask[i][j] = True


def inverse_block_mask(grid: int, mask_ratio: float, block: int, adjust: float, rng: random.Random) -> torch.Tensor:
    """(grid*grid,) bool, True = masked: data2vec 2.0's inverse block masking (fairseq compute_block_mask_2d with
    inverse_mask). With keep = 1 - mask_ratio, int(L x (keep + adjust) / block^2) centres are drawn with
    replacement, each keeps the block x block square around it (clamped at the border), then random patches are
    dropped from or added to the kept set until exactly int(L x keep) are kept; everything else is masked."""
    patches = grid * grid
    keep_share = 1 - mask_ratio
    kept = [[False] * grid for _ in range(grid)]
    offset = block // 2
    for _ in range(int(patches * (keep_share + adjust) / block ** 2)):
        centre = rng.randrange(patches)
        row, col = divmod(centre, grid)
        for i in range(row - offset, row - offset + block):
            for j in range(col - offset, col - offset + block):
                kept[min(max(i, 0), grid - 1)][min(max(j, 0), grid - 1)] = True
    flat = [k for row in kept for k in row]
    on = [i for i, k in enumerate(flat) if k]
    off = [i for i, k in enumerate(flat) if not k]
    target = int(patches * keep_share)
    for i in (rng.sample(on, len(on) - target) if len(on) > target else []):
        flat[i] = False
    for i in (rng.sample(off, target - len(on)) if len(on) < target else []):
        flat[i] = True
    return ~torch.tensor(flat, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# Augmentation (PIL, driven by the per-sample rng so it replays exactly on resume)
# ---------------------------------------------------------------------------------------------

def color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """torchvision ColorJitter(strength, strength, strength) on a PIL image: brightness, contrast and saturation
    factors drawn from U[1 - s, 1 + s], applied in a random order (PIL ImageEnhance, as torchvision does)."""
    factors = [rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in range(3)]
    order = [0, 1, 2]
    rng.shuffle(order)
    for k in order:
        img = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[k](img).enhance(factors[k])
    return img


def crop_box(width: int, height: int, scale: list, rng: random.Random,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) of a crop of a random area share in
    ``scale`` and log-uniform aspect ratio; after 10 misses, the centre crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(img: Image.Image, size: int, scale: list, rng: random.Random) -> Image.Image:
    top, left, h, w = crop_box(img.width, img.height, scale, rng)
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def augment(img: Image.Image, cfg: VisionConfig, rng: random.Random) -> Image.Image:
    """BEiT's DataAugmentationForBEiT common transform, in its order: ColorJitter, horizontal flip,
    RandomResizedCrop (bicubic)."""
    if cfg.color_jitter > 0:
        img = color_jitter(img, cfg.color_jitter, rng)
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return random_resized_crop(img, cfg.image_size, cfg.crop_scale, rng)


def to_tensor(img: Image.Image, mean: list, std: list) -> torch.Tensor:
    """PIL RGB -> normalised float32 (C, H, W)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    x = data.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Model parts
# ---------------------------------------------------------------------------------------------

class RelativePositionBias(nn.Module):
    """BEiT's relative position bias shared by all blocks: table ((2H-1)(2W-1)+3, heads) -> (1, heads, T, T)
    for T = 1 + H*W (the 3 extra entries are cls->token, token->cls and cls->cls). Under tensor
    parallelism the table is split by heads like the attention (this rank's heads only)."""

    def __init__(self, grid: int, heads: int, tp: int = 1):
        super().__init__()
        size = (2 * grid - 1) ** 2 + 3
        self.table = nn.Parameter(torch.zeros(size, heads // tp))
        set_tensor_model_parallel_attributes(self.table, True, 1, 1)
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)  # (N, N, 2)
        index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
        index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
        index[0, :], index[:, 0], index[0, 0] = size - 3, size - 2, size - 1
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        t = self.index.shape[0]
        # (1, heads, T, T): 4-D, so that scaled_dot_product_attention can take a fused kernel (a 3-D mask sends
        # it to the unfused math path on the CPU)
        return self.table[self.index.reshape(-1)].view(t, t, -1).permute(2, 0, 1).unsqueeze(0).contiguous()


class PatchEmbedder(nn.Module):
    def __init__(self, cfg: VisionConfig, enc: EncoderConfig, tp: int = 1):
        super().__init__()
        init = weight_init(enc.init)
        self.patch = InitConv2d(cfg.in_chans, enc.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, init=init)
        self.cls_token = nn.Parameter(torch.empty(1, 1, enc.dim))
        self.mask_token = nn.Parameter(torch.empty(1, 1, enc.dim))
        for p in (self.cls_token, self.mask_token):
            init(p)
        self.rel_pos_bias = RelativePositionBias(cfg.grid, enc.heads, tp)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                visible: torch.Tensor | None = None):
        if visible is not None:
            raise ValueError("model.positions=relative embeds every patch; method: data2vec2 needs "
                             "model.positions=sincos")
        x = self.patch(batch["image"]).flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return x, self.rel_pos_bias()


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) float64 2-D sin-cos table (MAE's get_2d_sincos_pos_embed, no CLS row): the first half encodes
    a patch's column, the second its row, each as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k/(dim/4)).

    numpy, not torch: under ``deepspeed.zero.Init`` torch.arange/tensor/zeros/... return every floating tensor in the
    config's dtype (bf16 on a GPU), whatever dtype was asked for, so a torch-built table came out of bf16 arithmetic
    (errors of 1e-2 to 5e-2 at 768 x 14 x 14, where rounding the exact table to bf16 costs 2e-3). numpy is out of
    DeepSpeed's reach (tests/test_zero_init_tables.py)."""
    freqs = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    halves = []
    for coord in (cols.ravel(), rows.ravel()):
        angles = coord[:, None] * freqs[None, :]
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    return np.concatenate(halves, axis=1)


def exact_buffer(table: np.ndarray) -> torch.Tensor:
    """A float64 numpy table as an fp32 tensor (rounded once), on the device modules are being built on: under
    zero.Init ``torch.empty`` follows DeepSpeed's device override (the rank's accelerator), as the module's other
    buffers do, while ``torch.from_numpy`` and ``Tensor.to`` escape its dtype override. The engine keeps fp32 buffers
    (no ``buffer_dtype`` in our configs); ``forward`` rounds the table once more, to the compute dtype."""
    return torch.from_numpy(table).float().to(torch.empty(0).device)


def sincos_positions(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fp32 fixed 2-D sin-cos positions (``sincos_table``), exact whether or not the model is
    being built under zero.Init, so training, export and evaluation add the same table."""
    require(dim % 4 == 0, f"encoder.dim={dim} must be divisible by 4 for 2-D sin-cos positions")
    return exact_buffer(sincos_table(dim, grid))


def xavier_flat(weight: torch.Tensor) -> None:
    """fairseq data2vec 2.0 / MAE: xavier_uniform over the patch projection seen as a (D, C x p x p) matrix."""
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


class SinCosPatchEmbedder(nn.Module):
    """data2vec 2.0's image local encoder: patch embedding + fixed sin-cos positions; the student keeps only its
    visible patches; CLS prepended (N(0, 1) init, as fairseq's extra token); then LayerNorm (post-LN stacks: fairseq's
    context-encoder norm) and dropout."""

    def __init__(self, cfg: VisionConfig, enc: EncoderConfig):
        super().__init__()
        self.patch = InitConv2d(cfg.in_chans, enc.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                init=xavier_flat)
        self.register_buffer("positions", sincos_positions(enc.dim, cfg.grid), persistent=False)
        self.cls_token = nn.Parameter(torch.empty(1, 1, enc.dim).normal_())
        self.norm = nn.Identity() if enc.norm_first else nn.LayerNorm(enc.dim, eps=enc.layer_norm_eps)
        self.dropout = nn.Dropout(enc.dropout)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                visible: torch.Tensor | None = None):
        x = self.patch(batch["image"]).flatten(2).transpose(1, 2) + self.positions.to(batch["image"].dtype)
        if visible is not None:
            x = visible_rows(x, visible)  # (B x M, K, D)
        elif mask is not None:
            raise ValueError("model.positions=sincos embeds only the visible patches (method: data2vec2); "
                             "method: data2vec needs model.positions=relative")
        x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(self.norm(x)), None


class Vision(Modality):
    name = "vision"
    data_kind = "image"
    Config = VisionConfig
    fixed_shape_keys = ("image", "mask")
    prefix_tokens = 1  # CLS
    decoder_dims = 2
    decay_exempt = "beit"  # data2vec_vision beit/optim_factory.py: 1-D, .bias and no_weight_decay() = cls_token
    teacher_precision = "fp32"  # beit/engine_for_cyclical.py:66-67: the teacher runs outside autocast

    def example(self, sample, rng):
        cfg = self.cfg
        img = augment(self.decode(sample), cfg, rng)
        masks = [self.mask(rng) for _ in range(cfg.clone_batch)]
        return {"image": to_tensor(img, cfg.mean, cfg.std), "mask": masks[0] if len(masks) == 1 else torch.stack(masks)}

    def mask(self, rng: random.Random) -> torch.Tensor:
        """One (grid*grid,) mask, True = masked, by ``model.masking``."""
        cfg = self.cfg
        if cfg.masking == "inverse_block":
            return inverse_block_mask(cfg.grid, cfg.mask_ratio, cfg.keep_block, cfg.keep_adjust, rng)
        return block_mask(cfg.grid, cfg.num_masked, cfg.min_block_patches, cfg.min_aspect, rng)

    def eval_inputs(self, sample):
        """The whole image resized to image_size x image_size (bicubic), normalised: HF's BeitImageProcessor
        with do_center_crop=False computes the same."""
        cfg = self.cfg
        img = self.decode(sample).resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
        return {"image": to_tensor(img, cfg.mean, cfg.std).unsqueeze(0)}

    def decode(self, sample) -> Image.Image:
        """The sample's image as RGB; one over model.max_pixels is refused from its header, before decoding."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise ValueError(f"sample {sample.get('__key__')} has no image (expected one of {IMAGE_KEYS})")
        with Image.open(io.BytesIO(sample[key])) as img:
            if img.width * img.height > self.cfg.max_pixels:
                raise ValueError(f"{img.width}x{img.height} image is over model.max_pixels={self.cfg.max_pixels:,}")
            return img.convert("RGB")

    def build_embedder(self, enc, mp):
        if self.cfg.positions == "sincos":
            return SinCosPatchEmbedder(self.cfg, enc)
        return PatchEmbedder(self.cfg, enc, mp.tensor_model_parallel_size)

    def build_decoder(self, enc, dec):
        return ConvDecoder(dec, enc.dim, grid=self.cfg.grid)

    def build_head(self, enc, mp):
        # BEiT _init_weights: trunc_normal(0.02), bias 0
        return InitLinear(enc.dim, enc.dim, init=weight_init(enc.init))

    def tokens_per_sample(self):
        return self.cfg.grid ** 2

    def masked_share(self):
        return self.cfg.num_masked / self.cfg.grid ** 2

    def sample_bytes(self):
        # fp32 image + a bool mask per clone
        return 4 * self.cfg.in_chans * self.cfg.image_size ** 2 + self.cfg.grid ** 2 * self.cfg.clone_batch

    def embed_flops_per_sample(self, enc, tokens=None):
        return 2.0 * (tokens or self.tokens_per_sample()) * self.cfg.in_chans * self.cfg.patch_size ** 2 * enc.dim
