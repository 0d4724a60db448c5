"""Exports small transformers with today's ``torch.onnx``, both exporters, as users get them.

The committed fixtures under ``tests/data/exported/`` are this script's output; the tests read
them without torch. Each architecture is built from a ``transformers`` config with random
weights (seeded; every parameter drawn, so no two biases are equal and the exporter does not
merge them), then exported twice:

* ``<arch>_dynamo.onnx`` (+ ``.onnx.data``): ``torch.onnx.export(..., dynamo=True)`` at its
  defaults (opset 18+, weights in external data), dynamic batch and sequence axes;
* ``<arch>_ts.onnx``: the TorchScript exporter (``dynamo=False``, opset 17), dynamic axes.

Architectures: ``bert`` (BertModel: 2 layers, hidden 32, 4 heads, GELU FFN 64) and ``llama``
(LlamaForCausalLM: 2 layers, hidden 64, 8 query heads sharing 2 key/value heads, RMSNorm,
rotary, SiLU-gated FFN 128, untied head) and ``gpt2`` (GPT2LMHeadModel: 2 layers, hidden 32, 4
heads, its Conv1D projections as Gemm between run-time reshapes, output weight tied to the token
embedding) and ``vit`` (ViTForImageClassification: 32 x 32 images, 8 x 8 patches, 2 layers,
hidden 32, 4 heads, 10 classes; its LayerNorms keep their initial ones and zeros, so the dynamo
exporter merges them into one scale and one bias read by every norm, as it does for any
model trained from a fresh config; dynamo only; ``vit_pixels.npz`` holds 16 crops of
scikit-image's photos). The graphs hold what exported transformers hold: head
reshapes whose targets are computed at run time (``Concat(Shape gathers, [-1], [head size])``),
the dynamo exporter's K-transpose spelled Reshape-Transpose-Reshape, NaN guards after Softmax,
rotary Slice/Neg/Concat, GQA's Unsqueeze-Expand-Reshape. ``<arch>_ids.npz`` holds 16 token
sequences of length 12 with their attention masks (the last four padded).

Requires torch (``pip install torch==2.13.0``, the CPU build) and transformers; onnxzip itself
never imports either. Usage: ``python scripts/export_transformers.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "exported"
VOCAB, SEQUENCES, LENGTH = 100, 16, 12
ARCHITECTURES = ("bert", "llama", "gpt2", "vit")


BENCH = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1536,
    "vocab_size": 8192,
}


def build(arch: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if arch == "bert":
        config = transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = transformers.BertModel(config, add_pooling_layer=False)
    elif arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            use_cache=False,
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch == "llama_bench":  # the int4 benchmark's decoder (scripts/bench_int4.py)
        config = transformers.LlamaConfig(
            **BENCH, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False
        )
        model = transformers.LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            use_cache=False,
        )
        model = transformers.GPT2LMHeadModel(config)  # output weight tied to the embedding
    elif arch == "vit":
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=10,
        )
        model = transformers.ViTForImageClassification(config)
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():  # trained-looking values: no two equal tensors
            if arch == "vit" and ("layernorm" in name.lower() or "norm." in name):
                continue  # initial ones and zeros: merged by the exporter
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5) + (p.ndim == 1) * 0.1)
    model.eval()
    if arch == "vit":
        return model

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return out.last_hidden_state if arch == "bert" else out.logits

    return Wrapper(model).eval()


def photo_crops(count: int = SEQUENCES, size: int = 32) -> np.ndarray:
    """``count`` crops of scikit-image's bundled photos, RGB in CHW, normalised as ViT's
    image processor does ((x / 255 - 0.5) / 0.5)."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(96, min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size))
        crops.append(np.asarray(crop, np.float32).transpose(2, 0, 1))
    return ((np.stack(crops) / 255.0 - 0.5) / 0.5).astype(np.float32)


def export_vit(out: Path) -> None:
    import torch

    model = build("vit")
    pixels = photo_crops()
    np.savez(out / "vit_pixels.npz", pixel_values=pixels)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    torch.onnx.export(
        Logits(model).eval(),
        (torch.from_numpy(pixels[:2]),),
        str(out / "vit_dynamo.onnx"),
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
    )


def export(arch: str, out: Path, sequences: int = SEQUENCES, length: int = LENGTH) -> None:
    import torch

    if arch == "vit":
        export_vit(out)
        return
    model = build(arch)
    rng = np.random.default_rng(0)
    vocab = BENCH["vocab_size"] if arch == "llama_bench" else VOCAB
    ids = rng.integers(1, vocab, (sequences, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(sequences - 4, sequences):
        mask[i, length - 1 - (i % 4) * 2 :] = 0
        ids[i, length - 1 - (i % 4) * 2 :] = 0
    np.savez(out / f"{arch}_ids.npz", input_ids=ids, attention_mask=mask)
    args = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    names = ["input_ids", "attention_mask"]
    output = ["last_hidden_state" if arch == "bert" else "logits"]
    if arch == "llama_bench":  # dynamo only, as a decoder is exported today
        torch.onnx.export(
            model,
            args,
            str(out / f"{arch}.onnx"),
            input_names=names,
            output_names=output,
            dynamo=True,
            dynamic_shapes={
                "input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq", max=256)},
                "attention_mask": {
                    0: torch.export.Dim("batch"),
                    1: torch.export.Dim("seq", max=256),
                },
            },
        )
        return
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", min=2, max=64)
    torch.onnx.export(
        model,
        args,
        str(out / f"{arch}_dynamo.onnx"),
        input_names=names,
        output_names=output,
        dynamo=True,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )
    torch.onnx.export(
        model,
        args,
        str(out / f"{arch}_ts.onnx"),
        input_names=names,
        output_names=output,
        dynamo=False,
        opset_version=17,
        dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names + output},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--bench",
        action="store_true",
        help="instead, the int4 benchmark's decoder (27M parameters, not committed): "
        "llama_bench.onnx and 64 sequences of 32 tokens",
    )
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, action="append", help="only these (default: all)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    if args.bench:
        export("llama_bench", args.out, sequences=64, length=32)
        print(f"wrote the benchmark decoder to {args.out}")
        return
    for arch in args.arch or ARCHITECTURES:
        export(arch, args.out)
        print(f"wrote {arch} exports to {args.out}")


if __name__ == "__main__":
    main()
