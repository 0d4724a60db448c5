"""Every command over many architectures, exported as users export them, to find what breaks.

``--export`` (needs torch and transformers: ``pip install torch==2.13.0 transformers
scikit-image``) builds each architecture below from a small ``transformers`` config with random
weights (drawn as ``export_transformers.py`` draws them; 1-D norm parameters keep their initial
values, so the dynamo exporter merges equal ones, as it does for models trained from a fresh
config) and exports it with the dynamo exporter (``--exporter dynamo``, the default, opset 18+,
dynamic batch) or the TorchScript one (``--exporter torchscript --opset 14``, LayerNorm spelled in
primitive ops below 17), with 16 samples each: crops of scikit-image's photos, token sequences
with padded tails (as ``export_transformers.py`` makes them), espeak-ng speech where the program is installed (else wav2vec2 is left out).

``--run`` (in onnxzip's environment) runs ``devset.py``'s commands over what was exported, one
line per run, and exits 1 when a run ends in exit 3, a signal or a traceback.

    python scripts/architecture_sweep.py --export [--exporter E] [--opset N] [--cache DIR]
    python scripts/architecture_sweep.py --run [--cache DIR] [NAME ...]

Random weights: the verdicts (PASS/FAIL) say little about a trained model; the point is that
every command finishes, refuses in one line, or says why it could not do more.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
SAMPLES, IMAGE = 16, 64
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}

# name: (config class, model class, config keywords, input kind, image size)
ARCHITECTURES = {
    "convnext": (
        "ConvNextConfig",
        "ConvNextForImageClassification",
        {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 2, 1], "num_labels": 10},
        "pixel_values",
        IMAGE,
    ),
    "segformer": (
        "SegformerConfig",
        "SegformerForSemanticSegmentation",
        {
            "num_encoder_blocks": 2,
            "depths": [1, 1],
            "sr_ratios": [4, 2],
            "hidden_sizes": [16, 32],
            "num_attention_heads": [1, 2],
            "decoder_hidden_size": 32,
            "num_labels": 5,
            "patch_sizes": [7, 3],
            "strides": [4, 2],
        },
        "pixel_values",
        IMAGE,
    ),
    "mobilevit": (
        "MobileViTConfig",
        "MobileViTForImageClassification",
        {
            "image_size": IMAGE,
            "hidden_sizes": [32, 40, 48],
            "neck_hidden_sizes": [8, 16, 24, 32, 40, 48, 64],
            "num_labels": 10,
        },
        "pixel_values",
        IMAGE,
    ),
    "deit": (
        "DeiTConfig",
        "DeiTForImageClassification",
        {"image_size": 32, "patch_size": 8, "num_labels": 10, "intermediate_size": 64, **SMALL},
        "pixel_values",
        32,
    ),
    "clip_vision": (
        "CLIPVisionConfig",
        "CLIPVisionModel",
        {"image_size": 32, "patch_size": 8, "intermediate_size": 64, **SMALL},
        "pixel_values",
        32,
    ),
    "levit": (
        "LevitConfig",
        "LevitForImageClassification",
        {
            "image_size": IMAGE,
            "hidden_sizes": [32, 48, 64],
            "num_attention_heads": [1, 2, 2],
            "depths": [1, 1, 1],
            "key_dim": [8, 8, 8],
            "num_labels": 10,
        },
        "pixel_values",
        IMAGE,
    ),
    "regnet": (
        "RegNetConfig",
        "RegNetForImageClassification",
        {
            "embedding_size": 16,
            "hidden_sizes": [16, 32, 48, 64],
            "depths": [1, 1, 1, 1],
            "groups_width": 8,
            "num_labels": 10,
        },
        "pixel_values",
        IMAGE,
    ),
    "mobilenetv2": (
        "MobileNetV2Config",
        "MobileNetV2ForImageClassification",
        {"image_size": IMAGE, "depth_multiplier": 0.35, "num_labels": 10},
        "pixel_values",
        IMAGE,
    ),
    "poolformer": (
        "PoolFormerConfig",
        "PoolFormerForImageClassification",
        {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "num_labels": 10},
        "pixel_values",
        IMAGE,
    ),
    "dpt": (
        "DPTConfig",
        "DPTForDepthEstimation",
        {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "backbone_out_indices": [0, 1, 2, 3],
            "neck_hidden_sizes": [8, 16, 32, 32],
            "fusion_hidden_size": 16,
        },
        "pixel_values",
        32,
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertModel",
        {"vocab_size": 100, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64},
        "input_ids",
        0,
    ),
    "t5_encoder": (
        "T5Config",
        "T5EncoderModel",
        {"vocab_size": 100, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4},
        "input_ids",
        0,
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"vocab_size": 100, "num_key_value_heads": 2, "intermediate_size": 64, **SMALL},
        "input_ids",
        0,
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {"vocab_size": 100, "ffn_dim": 64, "word_embed_proj_dim": 32, **SMALL},
        "input_ids",
        0,
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        {"vocab_size": 100, "hidden_size": 32, "n_layer": 2, "n_head": 4},
        "input_ids",
        0,
    ),
    "wav2vec2": (
        "Wav2Vec2Config",
        "Wav2Vec2Model",
        {
            "intermediate_size": 64,
            "conv_dim": (16, 16, 16),
            "conv_stride": (5, 2, 2),
            "conv_kernel": (10, 3, 3),
            "num_feat_extract_layers": 3,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 4,
            **SMALL,
        },
        "input_values",
        0,
    ),
}


def token_batches(count: int = SAMPLES, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (count, length)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(count - 4, count):  # padded tails, as a batch of sentences has
        mask[i, length - 1 - (i % 4) * 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def speech(count: int = SAMPLES, samples: int = 8000) -> np.ndarray | None:
    """``count`` espeak-ng sentences at 16 kHz, cut or padded to ``samples``."""
    import wave

    if shutil.which("espeak-ng") is None:
        return None
    words = "the model runs on the server and the data is fast".split()
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            path = Path(tmp) / f"{i}.wav"
            text = " ".join(words[i % 5 : i % 5 + 5])
            subprocess.run(
                ["espeak-ng", "-w", str(path), "-s", str(140 + 10 * i), text], check=True
            )
            with wave.open(str(path)) as w:
                rate = w.getframerate()
                audio = np.frombuffer(w.readframes(w.getnframes()), np.int16) / 32768.0
            audio = audio[(np.arange(0, len(audio), rate / 16000)).astype(int)]
            clips.append(np.pad(audio, (0, max(0, samples - len(audio))))[:samples])
    return np.stack(clips).astype(np.float32)


def export(name: str, cache: Path, exporter: str, opset: int | None) -> str:
    import torch
    import transformers
    from export_transformers import photo_crops

    config_name, model_name, keywords, kind, size = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**keywords))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() and p.ndim == 1:
                continue  # initial ones and zeros, merged by the dynamo exporter
            p.copy_(torch.randn_like(p) * (0.5 / max(1, p.shape[-1]) ** 0.5) + (p.ndim == 1) * 0.1)
    model.eval()
    if kind == "pixel_values":
        feeds = {kind: photo_crops(SAMPLES, size)}
    elif kind == "input_ids":
        feeds = token_batches()
    else:
        audio = speech()
        if audio is None:
            return "left out: espeak-ng is not installed"
        feeds = {kind: audio}

    class Output(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, mask=None):
            out = self.inner(**{kind: x, **({"attention_mask": mask} if mask is not None else {})})
            for field in ("logits", "predicted_depth", "last_hidden_state"):
                if getattr(out, field, None) is not None:
                    return getattr(out, field)
            return out[0]

    names = list(feeds)
    args = tuple(torch.from_numpy(feeds[n][:2]) for n in names)
    np.savez(cache / f"{name}.npz", **feeds)
    path = cache / f"{name}.onnx"
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        shapes = {"x": {0: batch}}
        if len(names) == 2:
            seq = torch.export.Dim("seq", min=2, max=64)
            shapes = {"x": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}}
        torch.onnx.export(
            Output(model).eval(),
            args,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamo=True,
            dynamic_shapes=shapes,
            **({"opset_version": opset} if opset else {}),
        )
    else:
        axes = {n: ({0: "batch", 1: "seq"} if len(names) == 2 else {0: "batch"}) for n in names}
        torch.onnx.export(
            Output(model).eval(),
            args,
            str(path),
            input_names=names,
            output_names=["out"],
            dynamo=False,
            opset_version=opset or 14,
            dynamic_axes=axes,
        )
    return "exported"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "architectures")
    parser.add_argument("--export", action="store_true", help="export the architectures")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--opset", type=int, help="opset to export at (exporter's default)")
    parser.add_argument("--run", action="store_true", help="run every command over them")
    parser.add_argument("names", nargs="*", help=f"some of: {', '.join(ARCHITECTURES)}")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architectures: {', '.join(unknown)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    names = args.names or list(ARCHITECTURES)
    if args.export:
        warnings.filterwarnings("ignore")
        for name in names:
            try:
                print(f"{name:14s} {export(name, args.cache, args.exporter, args.opset)}")
            except Exception as exc:  # an architecture the exporter cannot take: say so, go on
                print(f"{name:14s} not exported: {type(exc).__name__}: {str(exc)[:160]}")
    if args.run:
        from devset import run_all

        corpus = {
            n: (args.cache / f"{n}.onnx", args.cache / f"{n}.npz")
            for n in names
            if (args.cache / f"{n}.onnx").exists()
        }
        work = args.cache / "out"
        work.mkdir(exist_ok=True)
        return run_all(corpus, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
