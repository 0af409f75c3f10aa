"""Parameter shapes of real models, written out from their architectures (no downloads)."""

from __future__ import annotations

from typing import List, Tuple

Shape = Tuple[int, ...]


def _bn(c: int) -> List[Shape]:
    return [(c,), (c,)]


def resnet(blocks, bottleneck: bool, classes: int = 1000) -> List[Shape]:
    """torchvision's ResNet-18 ([2,2,2,2], basic) / ResNet-50 ([3,4,6,3], bottleneck)."""
    shapes: List[Shape] = [(64, 3, 7, 7)] + _bn(64)
    expansion = 4 if bottleneck else 1
    in_c = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2**stage
        out_c = width * expansion
        for b in range(n):
            if bottleneck:
                shapes += [(width, in_c, 1, 1)] + _bn(width) + [(width, width, 3, 3)] + _bn(width)
                shapes += [(out_c, width, 1, 1)] + _bn(out_c)
            else:
                shapes += [(width, in_c, 3, 3)] + _bn(width) + [(width, width, 3, 3)] + _bn(width)
            if b == 0 and (stage > 0 or in_c != out_c):
                shapes += [(out_c, in_c, 1, 1)] + _bn(out_c)
            in_c = out_c
    return shapes + [(classes, in_c), (classes,)]


def bert_base(vocab: int = 30522, d: int = 768, layers: int = 12, ffn: int = 3072) -> List[Shape]:
    shapes: List[Shape] = [(vocab, d), (512, d), (2, d), (d,), (d,)]
    for _ in range(layers):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (ffn, d), (ffn,), (d, ffn), (d,), (d,), (d,)]
    return shapes + [(d, d), (d,)]


def gpt2(d: int, layers: int, vocab: int = 50257, ctx: int = 1024) -> List[Shape]:
    shapes: List[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def small_model() -> List[Shape]:
    """<= 1M parameters in >= 100 tensors: a 32-layer MLP-like stack of 128-wide layers."""
    shapes: List[Shape] = []
    for _ in range(32):
        shapes += [(128, 128), (128,), (128,), (128,)]
    return shapes + [(10, 128), (10,)]


CASES = {
    "small (0.5M params, 130 tensors)": small_model(),
    "tiny tensors (1000 x 64)": [(64,)] * 1000,
    "ResNet-18": resnet([2, 2, 2, 2], bottleneck=False),
    "ResNet-50": resnet([3, 4, 6, 3], bottleneck=True),
    "BERT-base": bert_base(),
    "GPT-2 small": gpt2(768, 12),
    "GPT-2 medium": gpt2(1024, 24),
}


def numel(shapes: List[Shape]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        total += n
    return total
