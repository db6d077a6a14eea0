"""YOLO-style semantic segmentation: ``geoseg-{n,s,m,l,x}-sem``.

backbone (Conv / C3k2 / SPPF / C2PSA, strides 2..32)
  -> top-down neck (P5 -> P4 -> P3, nearest upsampling + concat + C3k2)
  -> head at stride 8 (Conv3x3 -> Conv1x1 to K logits)
  (+ an auxiliary head on the stride-16 neck output, used only in training)

``forward(x)`` takes (B, C, H, W) float32 with H and W multiples of 32 and
returns logits (B, K, H/8, W/8); in training mode it returns
``(logits, aux_logits)`` with aux at H/16. Upsampling to the input size is
bilinear and happens outside the model (the predict engine does it before
blending; the training loss does it before the cross-entropy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def _autopad(k: int, d: int = 1) -> int:
    return d * (k - 1) // 2


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, _autopad(k), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act: nn.Module = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True, k: int = 3, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k)
        self.cv2 = Conv(c_, c2, k)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3k(nn.Module):
    """CSP block with two 1x1 branches and ``n`` bottlenecks on one of them."""

    def __init__(self, c1: int, c2: int, n: int = 2, shortcut: bool = True, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_)
        self.cv2 = Conv(c1, c_)
        self.cv3 = Conv(2 * c_, c2)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C3k2(nn.Module):
    """Split-transform-merge block: every inner stage's output is kept and concatenated."""

    def __init__(self, c1: int, c2: int, n: int = 1, c3k: bool = False, e: float = 0.5,
                 shortcut: bool = True):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(
            C3k(self.c, self.c, 2, shortcut) if c3k else Bottleneck(self.c, self.c, shortcut)
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_)
        self.cv2 = Conv(c_ * 4, c2)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Attention(nn.Module):
    """Multi-head self-attention over all positions, plus a depth-wise positional conv."""

    def __init__(self, dim: int, num_heads: int, attn_ratio: float = 0.5):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim**-0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, act=False)
        self.proj = Conv(dim, dim, act=False)
        self.pe = Conv(dim, dim, 3, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).view(b, self.num_heads, -1, n).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2
        )
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        y = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(y)


class PSABlock(nn.Module):
    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.attn = Attention(c, num_heads)
        self.ffn = nn.Sequential(Conv(c, 2 * c), Conv(2 * c, c, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2PSA(nn.Module):
    """CSP wrapper around ``n`` position-sensitive attention blocks (stride 32 only)."""

    def __init__(self, c1: int, n: int = 1, e: float = 0.5):
        super().__init__()
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c)
        self.cv2 = Conv(2 * self.c, c1)
        self.m = nn.Sequential(*(PSABlock(self.c, max(1, self.c // 64)) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


class SegHead(nn.Module):
    """``depth`` 3x3 convs to ``c_mid`` channels, then a 1x1 conv to the class logits."""

    def __init__(self, c1: int, c_mid: int, num_classes: int, depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*(Conv(c1 if i == 0 else c_mid, c_mid, 3) for i in range(depth)))
        self.out = nn.Conv2d(c_mid, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.conv(x))


@dataclass(frozen=True)
class Scale:
    depth: float
    width: float
    max_channels: int
    c3k: bool  # deeper C3k inner blocks (m, l, x)


SCALES: dict[str, Scale] = {
    "n": Scale(0.50, 0.25, 1024, False),
    "s": Scale(0.50, 0.50, 1024, False),
    "m": Scale(0.50, 1.00, 512, True),
    "l": Scale(1.00, 1.00, 512, True),
    "x": Scale(1.00, 1.50, 512, True),
}


class YoloSem(nn.Module):
    """A YOLO-style semantic segmentation network; see the module docstring."""

    stride = 8
    pad_multiple = 32

    def __init__(self, scale: str = "n", *, num_classes: int, in_channels: int = 3):
        super().__init__()
        sc = SCALES[scale]

        def ch(c: int) -> int:
            return int(math.ceil(min(c, sc.max_channels) * sc.width / 8) * 8)

        def rep(n: int) -> int:
            return max(round(n * sc.depth), 1)

        c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        self.scale = scale
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem = nn.Sequential(Conv(in_channels, c1, 3, 2), Conv(c1, c2, 3, 2))  # P2/4
        self.stage2 = C3k2(c2, c3, rep(2), sc.c3k, e=0.25)
        self.down3 = Conv(c3, c3, 3, 2)  # P3/8
        self.stage3 = C3k2(c3, c4, rep(2), sc.c3k, e=0.25)
        self.down4 = Conv(c4, c4, 3, 2)  # P4/16
        self.stage4 = C3k2(c4, c4, rep(2), True)
        self.down5 = Conv(c4, c5, 3, 2)  # P5/32
        self.stage5 = C3k2(c5, c5, rep(2), True)
        self.sppf = SPPF(c5, c5)
        self.psa = C2PSA(c5, rep(2))
        self.neck4 = C3k2(c5 + c4, c4, rep(2), sc.c3k)
        self.neck3 = C3k2(c4 + c4, c3, rep(2), sc.c3k)
        self.head = SegHead(c3, c4, num_classes, depth=2)
        self.aux_head = SegHead(c4, c4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        if not torch.jit.is_tracing() and (h % 32 or w % 32):
            raise ValueError(
                f"Wrong input shape height={h}, width={w}. Expected image height and width "
                f"divisible by 32. Consider pad your images to shape "
                f"({-(-h // 32) * 32}, {-(-w // 32) * 32})."
            )
        p3 = self.stage3(self.down3(self.stage2(self.stem(x))))
        p4 = self.stage4(self.down4(p3))
        p5 = self.psa(self.sppf(self.stage5(self.down5(p4))))
        n4 = self.neck4(torch.cat((F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4), 1))
        n3 = self.neck3(torch.cat((F.interpolate(n4, scale_factor=2.0, mode="nearest"), p3), 1))
        logits = self.head(n3)
        if self.training:
            return logits, self.aux_head(n4)
        return logits
