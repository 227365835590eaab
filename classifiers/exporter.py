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

from .core import ExportArgumentError, ExportError, Head, writing
from .terms import param

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


def opset_range() -> tuple[int, int]:
    """The ONNX opsets the installed torch's exporter supports (the TorchScript-based one export uses)."""
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):  # pragma: no cover - a torch that moved them; these are torch 2.x's
        return 7, 20


# File name endings that say which format a file holds: a mismatch is refused rather than written.
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}


def _check_suffix(out: str, fmt: str) -> None:
    other = next(f for f in FORMATS if f != fmt)
    if out.lower().endswith(SUFFIXES[other]):
        title = {"onnx": "an ONNX", "torchscript": "a TorchScript"}[other]
        raise ExportArgumentError(f"{param('out')} {out}: {title} file name, but {param('fmt')} is {fmt}; pass "
                                  f"{param('fmt', other)}, "
                         f"or name the file {os.path.splitext(out)[0] + SUFFIXES[fmt][0]}")


def portable_weights(weights_id: str) -> str:
    """The weights as an exported file names them: a local file (path or file:// URL) by its base name,
    with its #RECIPE, so no path of the exporting machine travels in the file (weights_file_sha256
    identifies it); a remote URL without its query string and credentials; enum names, timm tags,
    named sources and none as they are."""
    from urllib.parse import unquote, urlsplit

    from featurestore.weights import is_file_spec, split_recipe

    if not is_file_spec(weights_id):
        return weights_id
    path, recipe = split_recipe(weights_id)
    if path.startswith("file://"):
        path = unquote(urlsplit(path).path)
    elif "://" in path:  # a URL without its query, fragment or credentials (a presigned URL's token)
        u = urlsplit(path)
        host = u.hostname or ""
        if u.port:
            host = f"{host}:{u.port}"
        return f"{u.scheme}://{host}{u.path}" + (f"#{recipe}" if recipe else "")
    return os.path.basename(os.path.expanduser(path).rstrip("/")) + (f"#{recipe}" if recipe else "")


def metadata(head: Head, backbone) -> dict:
    """What a consumer of the exported file needs besides the graph: class names in output order,
    the preprocessing the input must have had, and where the features come from."""
    from importlib.metadata import PackageNotFoundError, version

    pre = backbone.preprocessing.to_dict()
    try:
        fs_version = version("featurestore")
    except PackageNotFoundError:  # pragma: no cover - a source checkout not installed
        fs_version = "unknown"
    return {
        "format": "featurestore-export", "version": 2,  # 2: weights portable, weights_file_sha256
        "class_names": list(head.label_names),
        "input_name": "image", "output_name": "probabilities",
        "input": "float32 [N,3,H,W] RGB: resized (shorter side to resize_size), cropped to input_size as 'crop' "
                 "says, scaled to 0..1 and normalised with mean/std",
        "input_size": list(pre["input_size"]), "resize_size": pre["resize_size"], "crop": pre["crop"],
        "interpolation": pre["interpolation"], "mean": list(pre["mean"]), "std": list(pre["std"]),
        "backbone": backbone.model_name, "weights": portable_weights(str(backbone.weights_id)),
        "weights_sha256": backbone.weights_sha256,
        "weights_file_sha256": getattr(backbone, "weights_file_sha256", None),  # the file's bytes; None: no file
        "layer": head.layer, "pooling": backbone.pooling,
        "head_kind": head.kind, "head_params": dict(head.params),
        "calibrated_probabilities": head.calibrated_probabilities, "featurestore_version": fs_version,
    }


EXTRA_FILE = "featurestore.json"  # the TorchScript extra file holding metadata()


def _onnx_props(meta: dict) -> dict[str, str]:
    """metadata() as ONNX metadata_props: text as is, everything else as JSON."""
    import json

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _temp_beside(out: str) -> str:
    """A new empty file in out's folder, to write and verify before it replaces `out` (os.replace
    is atomic within one file system). Made here so an unwritable folder fails as an OSError."""
    import uuid

    folder, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for `out`
    except OSError as exc:  # name the folder, not the temporary file
        raise type(exc)(exc.errno, exc.strerror, folder) from None
    return tmp


def export(head, fmt: str = "onnx", out: str | None = None, *, backbone=None, opset: int = 17,
           verify: bool = True, batch: int = 2, weights: str | None = None) -> str:
    """Write backbone + head as one ONNX or TorchScript file; returns its path.

    The file carries metadata() (class names, preprocessing, backbone, layer): ONNX metadata_props,
    TorchScript extra file featurestore.json. It is written beside `out` under a temporary name and
    renamed over `out` only once complete and (with verify, the default) checked: run on a seeded
    random batch and compared with the Python path (backbone, then the scikit-learn head); a
    difference above 1e-4 raises. Whatever fails, an existing `out` is left as it was.
    weights: the backbone's weights file when it is no longer where the head recorded it.
    """
    import json

    from .apply import as_head, check_backbone, load_head_backbone

    if fmt not in FORMATS:
        raise ExportArgumentError(f"{param('fmt')} must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx":
        low, high = opset_range()
        if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
            raise ExportArgumentError(f"{param('opset')} {opset}: the installed torch {torch.__version__.split('+')[0]} exports ONNX "
                             f"opsets {low} to {high}; choose one in that range (default 17)")
        missing = [m for m in ("onnx", "onnxscript") + (("onnxruntime",) if verify else ()) if not _installed(m)]
        if missing:
            raise ExportArgumentError(f"{param('fmt', 'onnx')} needs {', '.join(missing)}: pip install "
                                      f"\"featurestore[export]\", or export with {param('fmt', 'torchscript')}")
    if out is not None:
        from .persist import check_local_out

        check_local_out(str(out), "an exported model", job=False)
        if os.path.isdir(out) or str(out).endswith(("/", os.sep)):
            name = "model.onnx" if fmt == "onnx" else "model.torchscript.pt"
            raise ExportArgumentError(f"{param('out')} {out}: a folder; give the file to write, e.g. {os.path.join(out, name)}")
        _check_suffix(str(out), fmt)
    h = as_head(head)
    name = "model.onnx" if fmt == "onnx" else "model.torchscript.pt"
    if out is None:
        if not h.path:
            raise ExportArgumentError(f"export: pass {param('out', 'FILE')} (the head has no directory)")
        out = os.path.join(h.path, name)
    bb = backbone if backbone is not None else load_head_backbone(h, weights=weights)
    if backbone is not None:
        check_backbone(h, bb)
    bb = bb.to("cpu")
    bb.device = torch.device("cpu")
    model = BackboneWithHead(bb, HeadModule(h), h.layer).eval()
    meta = metadata(h, bb)
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    hh, ww = bb.preprocessing.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, hh, ww, generator=gen)
    tmp = _temp_beside(out)
    try:
        with writing(out), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch marks jit/legacy ONNX export as deprecated
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            if fmt == "onnx":
                _write_onnx(model, x, tmp, opset, meta)
            else:
                traced = torch.jit.trace(model, (x,), check_trace=False)
                traced.save(tmp, _extra_files={EXTRA_FILE: json.dumps(meta)})
        if verify:
            diff = max_difference(h, bb, tmp, fmt, x)
            if diff > TOLERANCE:  # a wrong model is worse than none: it does not stay on disk
                raise ExportError(f"{out}: the exported model's probabilities differ from the Python head's by "
                                  f"{diff:.2e} > {TOLERANCE} on a test batch, so it was not kept. Please report it "
                                  "with head.json; the Python head (featurestore classify --head) is unaffected")
            log.info("%s: max |exported - python| = %.2e", out, diff)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _write_onnx(model: nn.Module, x: torch.Tensor, path: str, opset: int, meta: dict) -> None:
    import onnx

    try:
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as exc:  # an op without a form at this opset
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{param('opset')} {opset}: torch cannot export this model at that opset ({first[:200]}); "
                          "choose a newer one (the default, 17, works for the zoo's models)") from None
    proto = onnx.load(path)
    for key, value in _onnx_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


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
