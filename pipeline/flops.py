"""Counting matmul FLOPs (for MFU): per-pass counts of the autoencoder, the classifier, the VQGAN
and LPIPS; each stage sums its own step from them (pipeline/pretrain/flops.py, the fine-tuning
and tokenizer tasks).

Counted as PyTorch's FlopCounterMode counts: 2 FLOPs per multiply-add of every matmul,
convolution and attention product, forward and backward; normalizations, activations, the
loss and MIMIR's linear solves are left out (a few percent of the total at most). Backward
costs twice the forward for weight layers (input and weight gradients), except where no input
gradient is needed (the patch embedding of a plain image). Attention's backward is 2.5 times
its forward with fused kernels (flash / memory-efficient attention recompute the scores: what
GPUs run) and 2 times with the unfused math path. MIMIR's attack needs input gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustmim.pipeline.models.config import EncoderConfig, ModelConfig, VQGANConfig

# The one MFU denominator of the trainer's log and every bench: an H100 / H200's dense bf16
# peak on paper, per device (a large bf16 matmul measures ~770-800 TFLOP/s on an H200).
PEAK_TFLOPS_DENSE_BF16 = 989.0

FUSED_ATTENTION_BACKWARD = 2.5  # flash and memory-efficient kernels
MATH_ATTENTION_BACKWARD = 2.0  # attention as two batched matmuls


@dataclass
class PassFlops:
    """Forward FLOPs of one autoencoder pass on one image, split by how backward scales."""

    patch_embed: float
    linear: float  # every Linear layer after the patch embedding
    attention: float  # q @ k^T and scores @ v

    @property
    def forward(self) -> float:
        return self.patch_embed + self.linear + self.attention

    def training(self, attention_backward: float) -> float:
        """Forward + backward with weight gradients (the input image needs none)."""
        return 2 * self.patch_embed + 3 * self.linear + (1 + attention_backward) * self.attention

    def input_gradient(self, attention_backward: float) -> float:
        """Forward + backward to the input pixels only (MIMIR's attack)."""
        return 2 * self.patch_embed + 2 * self.linear + (1 + attention_backward) * self.attention


def _blocks(tokens: int, dim: int, depth: int, mlp_ratio: float) -> tuple[float, float]:
    linear = 2 * tokens * dim * (4 * dim + 2 * mlp_ratio * dim)  # qkv, proj, fc1, fc2
    attention = 2 * 2 * tokens * tokens * dim
    return depth * linear, depth * attention


def autoencoder_pass(cfg: ModelConfig, mask_ratio: float) -> PassFlops:
    patches, patch_dim = cfg.num_patches, cfg.patch_size**2 * cfg.in_chans
    dec_dim, dec_depth, _ = cfg.decoder_dims
    enc_tokens = 1 + (int(patches * (1 - mask_ratio)) if mask_ratio > 0 else patches)
    dec_tokens = 1 + patches
    enc_linear, enc_attention = _blocks(enc_tokens, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    dec_linear, dec_attention = _blocks(dec_tokens, dec_dim, dec_depth, cfg.mlp_ratio)
    heads = 2 * enc_tokens * cfg.embed_dim * dec_dim + 2 * dec_tokens * dec_dim * patch_dim
    return PassFlops(patch_embed=2 * patches * patch_dim * cfg.embed_dim,
                     linear=enc_linear + dec_linear + heads, attention=enc_attention + dec_attention)


def classifier_pass(cfg: EncoderConfig, num_classes: int) -> PassFlops:
    """Forward FLOPs of the fine-tuning classifier on one image (every patch, plus the head)."""
    patches, patch_dim = cfg.num_patches, cfg.patch_size**2 * cfg.in_chans
    linear, attention = _blocks(1 + patches, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    return PassFlops(patch_embed=2 * patches * patch_dim * cfg.embed_dim,
                     linear=linear + 2 * cfg.embed_dim * num_classes, attention=attention)


def counted_flops(build, run, train: bool) -> float:
    """FLOPs of `run(*build())` as torch's FlopCounterMode counts them, with `build()` making its
    network and inputs on the meta device: shapes only, no memory and no arithmetic."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        built = build()
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        run(*built)
    return float(counter.get_total_flops())


def vqgan_flops(cfg: VQGANConfig, image_size: int, train: bool) -> float:
    """FLOPs of one VQGAN round trip on one image (with train: and its backward): convolutions
    dominate (a taming f8 model costs ~530 GFLOPs per 224-px image forward, nine times ViT-L's pass)."""
    import torch

    from robustmim.pipeline.models.vqgan import VQGAN

    def round_trip(model, images):
        decoded, quantized = model(images)
        if train:
            (decoded.abs().mean() + quantized.codebook_loss + quantized.commitment_loss).backward()

    return counted_flops(lambda: (VQGAN(cfg), torch.rand(1, cfg.in_channels, image_size, image_size)), round_trip,
                         train)


def lpips_flops(channels: int, image_size: int) -> float:
    """FLOPs of the tokenizer's perceptual term per image: LPIPS' VGG16 on the image and on its
    reconstruction, and the backward to the reconstruction (~93 GFLOPs for 224-px RGB images,
    three VGG16 passes)."""
    import torch

    from robustmim.pipeline.models.lpips import LPIPS

    def inputs():
        image = torch.rand(1, channels, image_size, image_size)
        return LPIPS(), image, torch.rand_like(image, requires_grad=True)

    return counted_flops(inputs, lambda network, image, recon: network(image, recon).sum().backward(), train=True)
