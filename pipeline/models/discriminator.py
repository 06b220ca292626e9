"""taming-transformers' PatchGAN discriminator (NLayerDiscriminator): a real/fake logit per
image patch, for the tokenizer's optional adversarial term."""

from __future__ import annotations

import torch.nn as nn


class PatchDiscriminator(nn.Sequential):
    def __init__(self, in_channels: int, width: int = 64, layers: int = 3):
        modules: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for index in range(1, layers + 1):
            out = width * min(2 ** index, 8)
            stride = 2 if index < layers else 1
            modules += [nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                        nn.LeakyReLU(0.2)]
            channels = out
        modules.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        super().__init__(*modules)
        for module in self.modules():  # taming's weights_init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)
