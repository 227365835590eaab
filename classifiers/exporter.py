"""Export backbone + head as one model: preprocessed image batch in, class probabilities out.

The fitted scikit-learn pipeline is re-expressed as torch operations (L2 normaliser,
scaler, linear layer with softmax/sigmoid, or the RBF kernel expansion of an SVM with its
one-vs-one vote, followed by Platt calibration), appended to the backbone, then written
as ONNX or TorchScript. export() checks the written model against the Python path.
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch
from torch import nn

from .core import ExportError, Head

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


class HeadModule(nn.Module):
    """A fitted head as torch ops: features [N, ...] -> probabilities [N, num_label_names]."""

    def __init__(self, head: Head):
        super().__init__()
        from sklearn.calibration import CalibratedClassifierCV

        steps = dict(head.pipeline.named_steps)
        self.l2 = "l2" in steps
        scaler = steps["scale"]
        self.register_buffer("mean", _t(scaler.mean_ if scaler.mean_ is not None else np.zeros(scaler.n_features_in_)))
        self.register_buffer("scale", _t(scaler.scale_ if scaler.scale_ is not None else np.ones(scaler.n_features_in_)))
        clf = steps["clf"]
        classes = np.asarray(clf.classes_, dtype=np.int64)
        onehot = np.zeros((len(classes), len(head.label_names)), dtype=np.float32)
        onehot[np.arange(len(classes)), classes] = 1.0
        self.register_buffer("to_labels", torch.from_numpy(onehot))
        self.binary = len(classes) == 2
        self.calibrated = isinstance(clf, CalibratedClassifierCV)
        if self.calibrated:
            inner = clf.calibrated_classifiers_[0]
            est = inner.estimator
            self.register_buffer("cal_a", _t([c.a_ for c in inner.calibrators]))
            self.register_buffer("cal_b", _t([c.b_ for c in inner.calibrators]))
            self.proba_kind = "platt"
        else:
            est = clf
            self.proba_kind = "softmax" if (head.kind == "logreg" and not self.binary) else "ovr_sigmoid"
        self.kernel = getattr(est, "kernel", "linear") == "rbf"
        if self.kernel:
            self._init_svc(est, len(classes))
        else:
            self.register_buffer("weight", _t(est.coef_))
            self.register_buffer("bias", _t(np.atleast_1d(est.intercept_)))

    def _init_svc(self, svc, k: int) -> None:
        sv = np.asarray(svc.support_vectors_, dtype=np.float64)
        starts = np.concatenate([[0], np.cumsum(svc.n_support_)])
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        w = np.zeros((len(sv), len(pairs)))
        a = np.zeros((len(pairs), k), dtype=np.float32)
        b = np.zeros((len(pairs), k), dtype=np.float32)
        for p, (i, j) in enumerate(pairs):
            si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            w[si, p] = svc.dual_coef_[j - 1, si]
            w[sj, p] = svc.dual_coef_[i, sj]
            a[p, i] = 1.0
            b[p, j] = 1.0
        self.register_buffer("sv", _t(sv))
        self.register_buffer("sv_sq", _t((sv ** 2).sum(1)))
        self.register_buffer("dual", _t(w))
        self.register_buffer("svc_bias", _t(svc.intercept_))
        self.register_buffer("vote_i", torch.from_numpy(a))
        self.register_buffer("vote_j", torch.from_numpy(b))
        self.gamma = float(svc._gamma)
        self.ovr = k > 2

    def decision(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernel:
            return x @ self.weight.T + self.bias
        d2 = (x * x).sum(1, keepdim=True) + self.sv_sq[None, :] - 2.0 * (x @ self.sv.T)
        dec = torch.exp(-self.gamma * d2.clamp_min(0.0)) @ self.dual + self.svc_bias
        if not self.ovr:
            return dec
        # scikit-learn's ovo -> ovr: one vote per pair, ties broken by squashed summed confidences
        pos = (dec >= 0).to(dec.dtype)
        votes = pos @ self.vote_i + (1.0 - pos) @ self.vote_j
        conf = dec @ (self.vote_i - self.vote_j)
        return votes + conf / (3.0 * (conf.abs() + 1.0))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.flatten(1).to(torch.float32)
        if self.l2:
            # scikit-learn's Normalizer leaves rows shorter than 10 float eps as they are
            norm = x.norm(dim=1, keepdim=True)
            x = x / torch.where(norm < 10 * torch.finfo(x.dtype).eps, torch.ones_like(norm), norm)
        x = (x - self.mean) / self.scale
        d = self.decision(x)
        if self.proba_kind == "softmax":
            p = torch.softmax(d, dim=1)
        elif self.proba_kind == "platt":
            s = torch.sigmoid(-(d * self.cal_a + self.cal_b))
            if self.binary:
                p = torch.cat([1.0 - s, s], dim=1)
            else:
                p = s / s.sum(1, keepdim=True)
        else:  # logistic one-vs-rest, normalised (binary: sigmoid)
            s = torch.sigmoid(d)
            if self.binary:
                p = torch.cat([1.0 - s, s], dim=1)
            else:
                p = torch.softmax(nn.functional.logsigmoid(d), dim=1)
        return p @ self.to_labels


def head_module(head) -> HeadModule:
    from .apply import as_head

    return HeadModule(as_head(head)).eval()


class BackboneWithHead(nn.Module):
    """Preprocessed images [N,3,H,W] -> class probabilities [N, K]."""

    def __init__(self, backbone: nn.Module, head: HeadModule, layer: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = type(self.backbone).forward
        fwd = getattr(fwd, "__wrapped__", fwd)  # skip inference_mode: tracing must see the ops
        return self.head(fwd(self.backbone, x)[self.layer])


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module blocked in sys.modules
        return False


def export(head, fmt: str = "onnx", out: str | None = None, *, backbone=None, opset: int = 17,
           verify: bool = True, batch: int = 2, weights: str | None = None) -> str:
    """Write backbone + head as one ONNX or TorchScript file; returns its path.

    With verify (the default) the written file is run on a seeded random batch and compared
    with the Python path (backbone, then the scikit-learn head); a difference above 1e-4 raises.
    weights: the backbone's weights file when it is no longer where the head recorded it.
    """
    from .apply import as_head, check_backbone, load_head_backbone

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") + (("onnxruntime",) if verify else ()) if not _installed(m)]
        if missing:
            raise ValueError(f"--format onnx needs {', '.join(missing)}: pip install \"featurestore[export]\", "
                             "or export with --format torchscript")
    h = as_head(head)
    bb = backbone if backbone is not None else load_head_backbone(h, weights=weights)
    if backbone is not None:
        check_backbone(h, bb)
    bb = bb.to("cpu")
    bb.device = torch.device("cpu")
    model = BackboneWithHead(bb, HeadModule(h), h.layer).eval()
    name = "model.onnx" if fmt == "onnx" else "model.torchscript.pt"
    if out is None:
        if not h.path:
            raise ValueError("export: pass out= (the head has no directory)")
        out = os.path.join(h.path, name)
    elif os.path.isdir(out):
        raise ValueError(f"--out {out}: a folder; give the file to write, e.g. {os.path.join(out, name)}")
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    hh, ww = bb.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, hh, ww, generator=gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks jit/legacy ONNX export as deprecated
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":
            torch.onnx.export(model, (x,), out, input_names=["image"], output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                              opset_version=opset, dynamo=False)
        else:
            traced = torch.jit.trace(model, (x,), check_trace=False)
            traced.save(out)
    if verify:
        diff = max_difference(h, bb, out, fmt, x)
        if diff > TOLERANCE:  # a wrong model is worse than none: it does not stay on disk
            os.remove(out)
            raise ExportError(f"{out}: the exported model's probabilities differ from the Python head's by "
                              f"{diff:.2e} > {TOLERANCE} on a test batch, so it was not kept. Please report it with "
                              "head.json; the Python head (featurestore classify --head) is unaffected")
        log.info("%s: max |exported - python| = %.2e", out, diff)
    return out


def run_exported(path: str, fmt: str, x: torch.Tensor) -> np.ndarray:
    """Probabilities from a written ONNX (onnxruntime) or TorchScript file."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return sess.run(None, {"image": x.numpy().astype(np.float32)})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(path)
    with torch.no_grad():
        return m(x).numpy()


def python_path(head: Head, backbone, x: torch.Tensor) -> np.ndarray:
    """Backbone forward then the scikit-learn head: the reference the export must reproduce."""
    feats = backbone(x)[head.layer].cpu().numpy()
    return head.predict_proba(feats)


def max_difference(head: Head, backbone, path: str, fmt: str, x: torch.Tensor) -> float:
    return float(np.abs(run_exported(path, fmt, x) - python_path(head, backbone, x)).max())
