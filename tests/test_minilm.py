"""The MiniLM export pieces (``scripts/export_minilm.py``) and the committed sentence set.

The real checkpoint is a 90 MB download, so these tests check the parts on their own: the graph
``zoo.bert_encoder`` builds from Hugging Face-named weights (positions, token types, mean pooling,
L2 normalisation) against an independent numpy forward pass of the same weights, the WordPiece
tokenizer on hand-worked cases, and that the committed tokens are the committed sentences.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import ROOT, load_script

from onnxzip import io
from testmodels import zoo


def _random_checkpoint(layers: int, hidden: int, ffn: int, vocab: int, positions: int, seed=0):
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.1):
        return rng.normal(0, scale, shape).astype(np.float32)

    hf = {
        "embeddings.word_embeddings.weight": r(vocab, hidden, scale=0.5),
        "embeddings.position_embeddings.weight": r(positions, hidden),
        "embeddings.token_type_embeddings.weight": r(2, hidden),
        "embeddings.LayerNorm.weight": 1 + r(hidden),
        "embeddings.LayerNorm.bias": r(hidden),
    }
    for i in range(layers):
        h = f"encoder.layer.{i}."
        for name, (dout, din) in {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (ffn, hidden),
            "output.dense": (hidden, ffn),
        }.items():
            hf[h + name + ".weight"] = r(dout, din, scale=din**-0.5)
            hf[h + name + ".bias"] = r(dout)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            hf[h + name + ".weight"] = 1 + r(hidden)
            hf[h + name + ".bias"] = r(hidden)
    return hf


def test_encoder_graph_matches_a_numpy_forward_pass_of_the_same_weights(tmp_path):
    export = load_script("export_minilm")
    layers, hidden, heads, ffn, vocab, positions = 2, 32, 4, 64, 50, 16
    hf = _random_checkpoint(layers, hidden, ffn, vocab, positions)
    model = zoo.bert_encoder(
        layers,
        hidden,
        heads,
        ffn,
        vocab,
        weights=export.builder_weights(hf, layers),
        positions=positions,
        pooling=True,
    )
    path = tmp_path / "enc.onnx"
    io.save_model(model, path)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, vocab, (3, 9)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a shorter, padded sentence
    mask[2, 3:] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    want = export.numpy_embeddings(hf, ids, mask, layers, heads)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Padding does not change a sentence's embedding.
    n = 3
    alone = session.run(None, {"input_ids": ids[2:, :n], "attention_mask": mask[2:, :n]})[0]
    np.testing.assert_allclose(alone[0], got[2], atol=2e-5)


def test_wordpiece_tokenizer_on_hand_worked_cases():
    export = load_script("export_minilm")
    assert export.basic_tokens("Héllo, World!  It's naïve.") == [
        "hello",
        ",",
        "world",
        "!",
        "it",
        "'",
        "s",
        "naive",
        ".",
    ]
    vocab = {
        t: i
        for i, t in enumerate(
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##aff", "##able", "aff", "the", "."]
        )
    }
    assert export.wordpiece("unaffable", vocab) == [4, 5, 6]
    assert export.wordpiece("affable", vocab) == [7, 6]
    assert export.wordpiece("xyz", vocab) == [1]
    ids, mask = export.tokenize(["The unaffable.", "the"], vocab)
    assert ids.tolist() == [[2, 8, 4, 5, 6, 9, 3], [2, 8, 3, 0, 0, 0, 0]]
    assert mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]


def test_committed_tokens_are_the_committed_sentences():
    sentences = [s for s in (ROOT / "data" / "sentences.txt").read_text().splitlines() if s.strip()]
    assert len(sentences) >= 200 and len(set(sentences)) == len(sentences)
    with np.load(ROOT / "models" / "minilm_sentences.npz") as archive:
        ids, mask = archive["input_ids"], archive["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == len(sentences)
    assert (ids[:, 0] == 101).all()  # [CLS]
    lengths = mask.sum(axis=1)
    assert (ids[np.arange(len(ids)), lengths - 1] == 102).all()  # [SEP] ends every sentence
    assert (ids[mask == 0] == 0).all()  # [PAD] after it
