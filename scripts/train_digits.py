"""Train the two default digits CNNs with onnxruntime training artifacts and write them to models/.

The data are scikit-learn's real 8x8 handwritten digits (1797 images, 10 classes), scaled to
[0, 1]. A stratified split with a fixed seed gives 360 held-out test images; the calibration file
holds 512 images drawn from the training part.

Both networks are built twice from one description:

* a *training form*, where BatchNormalization is written as arithmetic on batch statistics,
  ``y = gamma * (x - mean_B) / sqrt(var_B + eps) + beta``. onnxruntime's artifact builder turns an
  inference-form BatchNormalization into training-mode BN with its own running-average updates,
  which we do not want to depend on, so the normalisation is spelled out and differentiated as
  ordinary ops;
* an *inference form* with real ``BatchNormalization`` nodes. Their running statistics are the
  population mean and (biased) variance of each BN input over the whole training set, computed
  with the trained weights in one full-batch pass of the training form. With those statistics the
  inference model reproduces the full-batch training-form output exactly, which the script checks.

Training uses ``onnxruntime.training.artifacts.generate_artifacts`` (cross-entropy, AdamW) and
``onnxruntime.training.api`` in onnxzip's training-engine worker (``onnxzip.engine``, its own
environment with onnxruntime-training 1.19.2): the same engine onnxzip uses for gradients. Everything is seeded;
running the script twice writes the same files.

Usage: python scripts/train_digits.py [--out models] [--epochs 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import onnx_ir as ir  # noqa: E402

from onnxzip import engine  # noqa: E402

OPSET = 17
IR_VERSION = 8
EPS = 1e-5
SEED = 20261126


class NetBuilder:
    """Emits ONNX nodes for a small CNN in training form or inference form.

    Parameters are created once (seeded He initialisation) and shared by name between both forms.
    """

    def __init__(self, params: dict[str, np.ndarray], rng: np.random.Generator, training: bool):
        self.params = params
        self.rng = rng
        self.training = training
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}
        self.bn_stats: dict[str, tuple[str, str]] = {}  # BN name -> (batch mean, batch var) tensors
        self.channels: dict[str, int] = {"input": 1}

    def _param(self, name: str, init) -> str:
        if name not in self.params:
            self.params[name] = init().astype(np.float32)
        return name

    def conv(
        self, x: str, cout: int, name: str, k: int = 3, stride: int = 1, group: int = 1
    ) -> str:
        cin = self.channels[x]
        std = np.sqrt(2.0 / (cin // group * k * k))
        w = self._param(
            f"{name}.weight", lambda: self.rng.normal(0, std, (cout, cin // group, k, k))
        )
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, w],
                [name],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
                group=group,
            )
        )
        self.channels[name] = cout
        return name

    def bn(self, x: str, name: str) -> str:
        c = self.channels[x]
        gamma = self._param(f"{name}.scale", lambda: np.ones(c))
        beta = self._param(f"{name}.bias", lambda: np.zeros(c))
        if self.training:
            self.constants["bn_shape"] = np.array([1, -1, 1, 1], dtype=np.int64)
            self.constants["bn_eps"] = np.array(EPS, dtype=np.float32)
            p = name
            self.nodes += [
                helper.make_node(
                    "ReduceMean", [x], [f"{p}.batch_mean"], axes=[0, 2, 3], keepdims=1
                ),
                helper.make_node("Sub", [x, f"{p}.batch_mean"], [f"{p}.centered"]),
                helper.make_node("Mul", [f"{p}.centered", f"{p}.centered"], [f"{p}.sq"]),
                helper.make_node(
                    "ReduceMean", [f"{p}.sq"], [f"{p}.batch_var"], axes=[0, 2, 3], keepdims=1
                ),
                helper.make_node("Add", [f"{p}.batch_var", "bn_eps"], [f"{p}.var_eps"]),
                helper.make_node("Sqrt", [f"{p}.var_eps"], [f"{p}.std"]),
                helper.make_node("Div", [f"{p}.centered", f"{p}.std"], [f"{p}.normed"]),
                helper.make_node("Reshape", [gamma, "bn_shape"], [f"{p}.gamma4"]),
                helper.make_node("Reshape", [beta, "bn_shape"], [f"{p}.beta4"]),
                helper.make_node("Mul", [f"{p}.normed", f"{p}.gamma4"], [f"{p}.scaled"]),
                helper.make_node("Add", [f"{p}.scaled", f"{p}.beta4"], [name]),
            ]
            self.bn_stats[name] = (f"{p}.batch_mean", f"{p}.batch_var")
        else:
            self.nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [x, gamma, beta, f"{name}.running_mean", f"{name}.running_var"],
                    [name],
                    name=name,
                    epsilon=EPS,
                )
            )
        self.channels[name] = c
        return name

    def relu(self, x: str, name: str) -> str:
        self.nodes.append(helper.make_node("Relu", [x], [name], name=name))
        self.channels[name] = self.channels[x]
        return name

    def relu6(self, x: str, name: str) -> str:
        self.constants["zero"] = np.array(0.0, dtype=np.float32)
        self.constants["six"] = np.array(6.0, dtype=np.float32)
        self.nodes.append(helper.make_node("Clip", [x, "zero", "six"], [name], name=name))
        self.channels[name] = self.channels[x]
        return name

    def add(self, a: str, b: str, name: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [name], name=name))
        self.channels[name] = self.channels[a]
        return name

    def head(self, x: str, classes: int = 10) -> str:
        c = self.channels[x]
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1))
        w = self._param("fc.weight", lambda: self.rng.normal(0, np.sqrt(1.0 / c), (classes, c)))
        b = self._param("fc.bias", lambda: np.zeros(classes))
        self.nodes.append(helper.make_node("Gemm", ["flat", w, b], ["logits"], name="fc", transB=1))
        return "logits"


def resnet_digits(nb: NetBuilder) -> str:
    """Stem, two residual stages (16 and 32 channels, the second strided with a 1x1 shortcut)."""
    x = nb.relu(nb.bn(nb.conv("input", 16, "stem.conv"), "stem.bn"), "stem.relu")
    # Stage 1: identity shortcut.
    h = nb.relu(nb.bn(nb.conv(x, 16, "s1.conv1"), "s1.bn1"), "s1.relu1")
    h = nb.bn(nb.conv(h, 16, "s1.conv2"), "s1.bn2")
    x = nb.relu(nb.add(h, x, "s1.add"), "s1.relu2")
    # Stage 2: 8x8 -> 4x4, projection shortcut.
    h = nb.relu(nb.bn(nb.conv(x, 32, "s2.conv1", stride=2), "s2.bn1"), "s2.relu1")
    h = nb.bn(nb.conv(h, 32, "s2.conv2"), "s2.bn2")
    sc = nb.bn(nb.conv(x, 32, "s2.down", k=1, stride=2), "s2.down_bn")
    x = nb.relu(nb.add(h, sc, "s2.add"), "s2.relu2")
    return nb.head(x)


def mobilenet_digits(nb: NetBuilder) -> str:
    """Stem, two inverted residual blocks (expand 1x1, depthwise 3x3, project 1x1), ReLU6 as Clip."""

    def inverted(x: str, cout: int, expand: int, stride: int, name: str) -> str:
        cin = nb.channels[x]
        hidden = cin * expand
        h = nb.relu6(
            nb.bn(nb.conv(x, hidden, f"{name}.expand", k=1), f"{name}.bn1"), f"{name}.act1"
        )
        h = nb.conv(h, hidden, f"{name}.dw", k=3, stride=stride, group=hidden)
        h = nb.relu6(nb.bn(h, f"{name}.bn2"), f"{name}.act2")
        h = nb.bn(nb.conv(h, cout, f"{name}.project", k=1), f"{name}.bn3")
        if stride == 1 and cin == cout:
            h = nb.add(h, x, f"{name}.add")
        return h

    x = nb.relu6(nb.bn(nb.conv("input", 16, "stem.conv"), "stem.bn"), "stem.act")
    x = inverted(x, 16, 3, 1, "b1")
    x = inverted(x, 24, 3, 2, "b2")
    x = inverted(x, 24, 4, 1, "b3")
    x = nb.relu6(nb.bn(nb.conv(x, 64, "last.conv", k=1), "last.bn"), "last.act")
    return nb.head(x)


ARCHITECTURES = {"digits_resnet": resnet_digits, "digits_mobilenet": mobilenet_digits}


def make_model(
    nb: NetBuilder, output: str, extra: dict[str, np.ndarray], name: str
) -> onnx.ModelProto:
    inits = {**{k: v for k, v in nb.params.items()}, **nb.constants, **extra}
    used = {i for n in nb.nodes for i in n.input}
    graph = helper.make_graph(
        nb.nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxzip-train-digits"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def load_digits_split(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=360, stratify=y, random_state=seed
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def train(
    arch: str, data: dict[str, np.ndarray], epochs: int, batch: int, lr: float
) -> tuple[onnx.ModelProto, dict]:
    rng = np.random.default_rng(SEED + sum(map(ord, arch)))
    params: dict[str, np.ndarray] = {}
    train_nb = NetBuilder(params, rng, training=True)
    out = ARCHITECTURES[arch](train_nb)
    train_form = make_model(train_nb, out, {}, arch + "_train")

    x, y = data["x_train"], data["y_train"]
    shuffle = np.random.default_rng(SEED)
    steps_per_epoch = int(np.ceil(len(x) / batch))
    total_steps = epochs * steps_per_epoch
    feeds, rates, epoch_of_step = [], [], []
    for epoch in range(epochs):
        order = shuffle.permutation(len(x))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            if len(idx) < 2:  # batch statistics need more than one sample
                continue
            # Cosine learning-rate decay, set per step.
            rates.append(lr * 0.5 * (1 + np.cos(np.pi * len(rates) / total_steps)))
            xb = x[idx]
            # Light augmentation: random shifts of one pixel keep the small nets from overfitting.
            shifts = shuffle.integers(-1, 2, size=(2,))
            xb = np.roll(xb, shift=tuple(int(s) for s in shifts), axis=(2, 3))
            feeds.append({"input": np.ascontiguousarray(xb), "labels": y[idx]})
            epoch_of_step.append(epoch)
    # onnxruntime training artifacts (cross-entropy, AdamW) in the training engine's worker.
    result = engine.run_job(
        ir.serde.deserialize_model(train_form),
        kind="train",
        requires_grad=list(params),
        frozen=[],
        batches=feeds,
        read=list(params),
        loss="cross-entropy",
        learning_rates=rates,
        what=f"train {arch}",
    )
    losses = np.array(result.losses)
    history = [float(losses[np.array(epoch_of_step) == e].mean()) for e in range(epochs)]
    for e, value in enumerate(history):
        logging.info("%s epoch %d/%d loss %.4f", arch, e + 1, epochs, value)

    trained = {name: result.arrays[name] for name in params}

    # Population statistics of every BN input: one full-batch pass of the training form.
    nb_train, out = _rebuild(arch, trained, training=True)
    stats_model = make_model(nb_train, out, {}, arch + "_stats")
    for mean_name, var_name in nb_train.bn_stats.values():
        for t in (mean_name, var_name):
            stats_model.graph.output.append(helper.make_empty_tensor_value_info(t))
    sess = ort.InferenceSession(stats_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    results = dict(zip(names, sess.run(None, {"input": x}), strict=True))
    full_batch_logits = results["logits"]
    extra = {}
    for bn_name, (mean_name, var_name) in nb_train.bn_stats.items():
        extra[f"{bn_name}.running_mean"] = results[mean_name].reshape(-1).astype(np.float32)
        extra[f"{bn_name}.running_var"] = results[var_name].reshape(-1).astype(np.float32)

    nb_infer, out = _rebuild(arch, trained, training=False)
    inference = make_model(nb_infer, out, extra, arch)
    sess = ort.InferenceSession(inference.SerializeToString(), providers=["CPUExecutionProvider"])
    infer_logits = sess.run(None, {"input": x})[0]
    gap = float(np.max(np.abs(infer_logits - full_batch_logits)))
    if gap > 1e-3:
        raise SystemExit(f"{arch}: inference form differs from the training form by {gap}")
    test_logits = sess.run(None, {"input": data["x_test"]})[0]
    train_acc = float(np.mean(infer_logits.argmax(1) == y))
    test_acc = float(np.mean(test_logits.argmax(1) == data["y_test"]))
    info = {
        "epochs": epochs,
        "batch_size": batch,
        "learning_rate": lr,
        "final_train_loss": history[-1],
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "inference_vs_training_form_max_abs": gap,
        "parameters": int(sum(v.size for v in trained.values())),
    }
    return inference, info


def _rebuild(arch: str, params: dict[str, np.ndarray], training: bool) -> tuple[NetBuilder, str]:
    nb = NetBuilder(dict(params), np.random.default_rng(0), training=training)
    out = ARCHITECTURES[arch](nb)
    return nb, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    ort.set_default_logger_severity(3)

    data = load_digits_split(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for arch in ARCHITECTURES:
        model, info = train(arch, data, args.epochs, args.batch_size, args.lr)
        onnx.save(model, args.out / f"{arch}.onnx")
        summary[arch] = info
        logging.info("%s: test accuracy %.2f%%", arch, 100 * info["test_accuracy"])

    calib_idx = np.random.default_rng(SEED).choice(len(data["x_train"]), 512, replace=False)
    calib_idx.sort()
    np.savez_compressed(
        args.out / "digits_calib.npz",
        input=data["x_train"][calib_idx],
        labels=data["y_train"][calib_idx],
    )
    np.savez_compressed(args.out / "digits_test.npz", input=data["x_test"], labels=data["y_test"])
    (args.out / "digits_models.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
