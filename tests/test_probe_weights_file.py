"""A probe with a local weights file reads the file's names and shapes, and traces the model with them,
once: resolve_layers lists the file's layers, _check_weights checks its fit and the named cuts, and
extract's driver checks them again, all from one read (backbones._describe keeps a local file's result
while the file is unchanged). Also the probe's images/s: measured once the actors are up."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import signal_images
from featurestore import backbones
from featurestore.probing import ProbeError, probe


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return signal_images(tmp_path_factory.mktemp("probe-file") / "images", ["cat", "dog"], 6, 36)


@pytest.fixture
def counted(monkeypatch):
    """Count the real reads of a file's names and shapes, and the real traces (nothing replaced)."""
    calls = {"read": 0, "trace": 0}
    read, trace = backbones.read_state_dict_shapes, backbones._trace

    def counting_read(*args, **kwargs):
        calls["read"] += 1
        return read(*args, **kwargs)

    def counting_trace(*args, **kwargs):
        calls["trace"] += 1
        return trace(*args, **kwargs)

    monkeypatch.setattr(backbones, "read_state_dict_shapes", counting_read)
    monkeypatch.setattr(backbones, "_trace", counting_trace)
    return calls


def test_a_probe_reads_and_traces_a_weights_file_once(images, tmp_path, counted):
    import ray
    from torchvision.models import resnet18

    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    running = ray.is_initialized()
    try:
        result = probe(str(images), [f"resnet18@{weights}"], out=str(tmp_path / "out"), layers="layer3,flatten",
                       input_size=32, batch_size=8, shard_size=8, cv=2, grid={"C": [1.0]}, quiet=True,
                       save_heads=False)
    finally:
        if not running:
            ray.shutdown()
    assert [r.layer for r in result.rows] == ["layer3", "flatten"]
    assert counted == {"read": 1, "trace": 1}
    # images/s are the backbone's once its actors were up: not charged with Ray's worker start-up, which only
    # the first backbone of a probe pays
    (record,) = json.loads((tmp_path / "out" / "probe.json").read_text())["stores"].values()
    assert 0 < record["startup_seconds"] < record["seconds"]
    steady = record["rows"] / (record["seconds"] - record["startup_seconds"])
    assert record["images_per_second"] == pytest.approx(steady)
    assert [r.images_per_second for r in result.rows] == pytest.approx([steady, steady])


def test_a_changed_file_is_read_again(images, tmp_path, counted):
    """The kept result is the file's as it was: a file replaced since is read and checked anew."""
    from torchvision.models import resnet18

    from featurestore.backbones import list_layers

    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    assert list_layers("resnet18", str(weights), 32)[-1].note.startswith("ImageNet classifier output")
    assert list_layers("resnet18", str(weights), 32)[-1].note.startswith("ImageNet classifier output")
    assert counted["read"] == 1
    torch.save({k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}, weights)
    assert not list_layers("resnet18", str(weights), 32)[-1].usable  # headless now: its logits cannot be cut
    assert counted["read"] == 2
    with pytest.raises(ProbeError, match=r"--layers for resnet18: .*logits needs the classifier"):
        probe(str(images), [f"resnet18@{weights}"], out=str(tmp_path / "out"), layers="logits", input_size=32,
              quiet=True)


@pytest.mark.parametrize("layer, needle", [
    ("Layer3", r"resnet18 has no layer 'Layer3'; did you mean 'layer3'; list them with `featurestore layers "
               r"resnet18 --weights .*r18.pth`"),
    ("layr3", r"resnet18 has no layer 'layr3'; closest: layer3, layer4, layer2, layer1, layer3.1; "),
])
def test_a_misspelt_layer_gets_extracts_suggestions(images, tmp_path, layer, needle):
    """The probe's typo message suggested by plain string distance (deep nodes such as 'layer3.0.bn1' before
    stage names, no case-slip match) and listed the layers without the weights file that decides them."""
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    with pytest.raises(ProbeError, match=rf"--layers: {needle}"):
        probe(str(images), [f"resnet18@{weights}"], out=str(tmp_path / "out"), layers=layer, quiet=True)
