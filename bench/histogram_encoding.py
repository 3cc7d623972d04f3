"""What the activation histograms would weigh at more tokens, stored as now and in two other encodings.

A precompute of a few thousand tokens has sparse histograms that compress to ~50 bytes; a 10M-token run's counts
are dense and noisy. This draws each histogram of an atlas again at larger token counts (multinomial on its shape,
with a pseudo-count of 0.01 in the empty bins) and measures the mean bytes of `encode_counts` (exact, zlib of the
narrowest width), of zig-zag differences between neighbouring bins (exact), and of counts rounded to 8 bits of
mantissa (lossy, within 0.2%):

    python bench/histogram_encoding.py ATLAS.db --tokens 1000000 10000000 --histograms 3000

Results: docs/performance.md, "A compact atlas".
"""

from __future__ import annotations

import argparse
import sqlite3
import zlib

import numpy as np

from precompute.store import decode_counts, encode_counts


def _width(largest: int) -> int:
    return next(w for w in (1, 2, 4, 8) if largest < 1 << (8 * w))


def differences(counts: np.ndarray) -> bytes:
    """Exact: the zig-zag differences between neighbouring bins, in the narrowest width, zlib-compressed."""
    step = np.diff(counts, prepend=0)
    zigzag = np.where(step >= 0, 2 * step, -2 * step - 1)
    width = _width(int(zigzag.max()))
    return bytes([width]) + zlib.compress(zigzag.astype(f"<u{width}").tobytes(), 9)


def short_mantissa(counts: np.ndarray, bits: int = 8) -> bytes:
    """Lossy: each count as a float32 rounded to ``bits`` bits of mantissa (exact below 2**(bits + 1))."""
    shift = 23 - bits
    raw = counts.astype(np.float32).view(np.uint32).astype(np.int64)
    codes = (raw + (1 << (shift - 1))) >> shift
    width = _width(int(codes.max()))
    return bytes([width]) + zlib.compress(codes.astype(f"<u{width}").tobytes(), 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("atlas")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--histograms", type=int, default=3000, help="how many of the atlas's histograms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with sqlite3.connect(f"file:{args.atlas}?mode=ro", uri=True) as conn:
        blobs = [r[0] for r in conn.execute("SELECT counts FROM histograms LIMIT ?", (args.histograms,))]
    shapes = [decode_counts(b).astype(np.float64) + 0.01 for b in blobs]
    rng = np.random.default_rng(args.seed)
    print(f"{len(shapes)} histograms of {args.atlas}, as stored: {np.mean([len(b) for b in blobs]):.1f} bytes")
    for tokens in args.tokens:
        sizes: dict[str, list[int]] = {"encode_counts": [], "differences": [], "8-bit mantissa": []}
        for shape in shapes:
            counts = rng.multinomial(tokens, shape / shape.sum())
            sizes["encode_counts"].append(len(encode_counts(counts)))
            sizes["differences"].append(len(differences(counts)))
            sizes["8-bit mantissa"].append(len(short_mantissa(counts)))
        means = ", ".join(f"{name} {np.mean(values):.1f}" for name, values in sizes.items())
        print(f"{tokens:,} tokens: mean bytes a histogram: {means}")


if __name__ == "__main__":
    main()
