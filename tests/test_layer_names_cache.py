"""The cache of each model's cut names (featurestore.layer_names): a trace records them, and extract's
driver then lets known names through without importing torch; typos, weights files and a broken cache
still go through the real check (engine.preflight's cut)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from featurestore import layer_names
from featurestore.backbones import UnknownLayerError, list_layers
from featurestore.config import BackboneConfig
from featurestore.engine import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(backbone: BackboneConfig) -> None:
    check = preflight(backbone)
    if check is not None:
        check()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "layer-cache"
    monkeypatch.setenv("FEATURESTORE_LAYER_CACHE", str(folder))
    return folder


def _driver(code: str, cache) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (torch not yet imported), as extract's driver starts."""
    env = {**os.environ, "FEATURESTORE_LAYER_CACHE": str(cache), "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _refusal(call: str, error: str) -> str:
    """Driver code that runs `call` and prints the message of the `error` it raises."""
    return f"try:\n    {call}\nexcept {error} as exc:\n    print(exc)\n"


def _twice(code: str, cache) -> list[list[str]]:
    """The stdout lines of `code` in two fresh drivers, one after the other (the first may record)."""
    runs = []
    for _ in range(2):
        out = _driver(code, cache)
        assert out.returncode == 0, out.stderr
        runs.append(out.stdout.splitlines())
    return runs


def test_known_layers_are_checked_without_importing_torch_and_typos_as_before(cache):
    list_layers("resnet18")  # `featurestore layers resnet18`: the trace records the names
    (entry,) = cache.glob("resnet18-*.json")
    assert "layer3.1.relu_1" in json.loads(entry.read_text())["names"]
    out = _driver(
        "import sys\n"
        "from featurestore.config import BackboneConfig\n"
        "from featurestore.engine import preflight\n"
        "for layers in (['flatten'], ['layer3', 'layer2.1.relu_1', 'logits']):\n"
        "    check = preflight(BackboneConfig(model='resnet18', weights='none', layers=layers))\n"
        "    check and check()\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "check = preflight(BackboneConfig(model='resnet18', weights='none', layers=['flatten', 'layr3']))\n"
        "try:\n"
        "    check()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n", cache)
    assert out.returncode == 0, out.stderr
    assert "torch imported: False" in out.stdout
    # a name the cache lacks goes through the trace: the same refusal and suggestions as without a cache
    assert ("UnknownLayerError resnet18 has no layer 'layr3'; closest: layer3, layer4, layer2, layer1, layer3.1; "
            "list them with `featurestore layers resnet18`") in out.stdout


def test_the_extract_check_records_names_for_the_next_run(cache):
    _check(BackboneConfig(model="resnet18", weights="none", layers=["layer3"]))
    assert layer_names.known("resnet18", "none", ["layer3", "avgpool"], None)
    assert not layer_names.known("resnet18", "none", ["layr3"], None)
    assert not layer_names.known("resnet18", "none", ["x"], None)  # the input image is no cut
    assert not layer_names.known("resnet18", "none", ["layer3"], 128)  # another input size: another entry
    assert not layer_names.known("resnet18", "IMAGENET1K_V1", ["layer3"], None)  # other weights: another entry
    with pytest.raises(UnknownLayerError, match=r"resnet18: 'x' is the input image itself"):
        _check(BackboneConfig(model="resnet18", weights="none", layers=["x"]))


def test_a_weights_file_is_always_checked(cache, tmp_path):
    from torchvision.models import resnet18

    list_layers("resnet18")  # 'fc' is a known name of the architecture
    headless = tmp_path / "r18_headless.pth"
    torch.save({k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}, headless)
    with pytest.raises(UnknownLayerError, match=r"layer 'fc' needs the classifier"):
        _check(BackboneConfig(model="resnet18", weights=str(headless), layers=["fc"]))
    assert [p.name for p in cache.iterdir()] == [next(cache.glob("resnet18-*.json")).name]  # no entry for a file


def test_a_corrupt_or_unwritable_cache_falls_back_to_the_trace(cache, tmp_path, monkeypatch):
    list_layers("resnet18")
    (entry,) = cache.glob("resnet18-*.json")
    entry.write_text("{not json")
    assert not layer_names.known("resnet18", "none", ["layer3"], None)
    _check(BackboneConfig(model="resnet18", weights="none", layers=["layer3"]))  # traced, and written again
    assert layer_names.known("resnet18", "none", ["layer3"], None)
    entry.write_text(json.dumps({"key": {"model": "resnet18"}, "names": ["layr3"]}))  # another key: ignored
    assert not layer_names.known("resnet18", "none", ["layr3"], None)
    with pytest.raises(UnknownLayerError, match=r"resnet18 has no layer 'layr3'; closest: layer3"):
        _check(BackboneConfig(model="resnet18", weights="none", layers=["layr3"]))

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FEATURESTORE_LAYER_CACHE", str(blocker / "layers"))  # cannot be a folder
    _check(BackboneConfig(model="resnet18", weights="none", layers=["layer3"]))
    with pytest.raises(UnknownLayerError, match=r"resnet18 has no layer 'layr3'; closest: layer3"):
        _check(BackboneConfig(model="resnet18", weights="none", layers=["layr3"]))


def test_the_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.delenv("FEATURESTORE_LAYER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert layer_names.cache_dir() == str(tmp_path / "xdg" / "featurestore" / "layers")
    list_layers("mobilenet_v3_small")
    assert list((tmp_path / "xdg" / "featurestore" / "layers").glob("mobilenet_v3_small-*.json"))


def test_a_job_spec_asking_for_recorded_names_is_checked_without_importing_torch(cache):
    code = (
        "import sys\n"
        "from jobs.specs import check_layers\n"
        "from featurestore.config import ConfigError\n"
        "check_layers([('resnet18', ['layer3', 'avgpool'])], None, 'job.yaml')\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
        "try:\n"
        "    check_layers([('resnet18', ['layer3', 'layr4'])], None, 'job.yaml')\n"
        "except ConfigError as exc:\n"
        "    print('refused:', exc)\n")
    first = _driver(code, cache)  # nothing recorded: torch traces the architecture, and the names are kept
    assert first.returncode == 0, first.stderr
    assert "torch imported: True" in first.stdout
    assert layer_names.known("resnet18", "none", ["layer3", "avgpool"], None)
    again = _driver(code, cache)
    assert again.returncode == 0, again.stderr
    assert "torch imported: False" in again.stdout
    # a name not recorded is traced: the same refusal as without a record
    for out in (first, again):
        assert "refused: job.yaml: field 'config.layers': resnet18 has no layer 'layr4'; closest: layer4" \
            in out.stdout, out.stdout


def test_timm_names_are_looked_up_without_importing_timm_once_recorded(cache):
    """timm's registry (a timm:NAME's lookup, a typo's suggestions) is recorded per timm version; a
    later driver (extract's, submit's) reads it instead of importing timm and torch. A broken record
    is listed again."""
    code = ("import sys\n"
            "from featurestore.zoo import UnknownModelError, canonical_name\n"
            "print(canonical_name(' timm:resnet18'))\n"
            + _refusal("canonical_name('timm:resnet_18')", "UnknownModelError")
            + "print('timm imported:', 'timm' in sys.modules, 'torch' in sys.modules)\n")
    runs = _twice(code, cache)
    assert runs[0][0] == runs[1][0] == "timm:resnet18"
    assert runs[0][1] == runs[1][1] and runs[1][1].startswith("unknown timm model 'resnet_18'; closest: timm:resnet18")
    assert runs[0][2] == "timm imported: True True" and runs[1][2] == "timm imported: False False"
    (entry,) = cache.glob("timm-models-*.json")
    entry.write_text("{not json")
    out = _driver(code, cache)
    assert out.returncode == 0 and out.stdout.splitlines()[:2] == runs[0][:2], out.stderr
    assert "timm imported: True" in out.stdout and json.loads(entry.read_text())["names"]  # listed and recorded again


def test_timm_pretrained_tags_are_checked_without_importing_timm_once_recorded(cache):
    """--weights TAG for a timm model (extract's check, submit's job-spec check): the architecture's tags are
    recorded per timm version, so a later driver checks a tag, and refuses a typo with its suggestions,
    without importing timm or torch. A broken record is listed again."""
    code = ("import sys\n"
            "from featurestore.config import ConfigError\n"
            "from featurestore.weights import WeightsError, check_timm_tag\n"
            "from jobs.specs import check_weights\n"
            "print(check_timm_tag('resnet18', 'A1_IN1K'))\n"
            + _refusal("check_timm_tag('resnet18', 'a1_in1kk')", "WeightsError")
            + "check_weights([('timm:resnet18', 'a1_in1k')], 'job.yaml')\n"
            + _refusal("check_weights([('timm:resnet18', 'a1_in1kk')], 'job.yaml')", "ConfigError")
            + "print('timm imported:', 'timm' in sys.modules, 'torch' in sys.modules)\n")
    runs = _twice(code, cache)
    assert runs[0][0] == runs[1][0] == "a1_in1k"
    assert runs[0][1] == runs[1][1] and runs[1][1].startswith("unknown weights 'a1_in1kk' for timm:resnet18: not a "
                                                               "pretrained tag; its tags are a1_in1k, "), runs[1][1]
    assert "(closest: a1_in1k" in runs[1][1]
    assert runs[1][2] == "job.yaml: field 'config.weights': " + runs[1][1]  # submit refuses it the same way
    assert runs[0][3] == "timm imported: True True" and runs[1][3] == "timm imported: False False"
    (entry,) = cache.glob("timm-tags-resnet18-*.json")
    entry.write_text("{not json")
    out = _driver(code, cache)
    assert out.returncode == 0 and out.stdout.splitlines()[:3] == runs[0][:3], out.stderr
    assert "timm imported: True" in out.stdout and "a1_in1k" in json.loads(entry.read_text())["names"]


def test_weights_missing_from_torchs_cache_resolve_the_enum_once(cache, tmp_path, monkeypatch):
    """A first run whose file is not in torch's cache resolves the member once, records its URL and fetches
    that member (it resolved it a second time to fetch)."""
    from featurestore import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    resolved, fetched = [], []
    real_enum = weights.torchvision_enum
    monkeypatch.setattr(weights, "torchvision_enum", lambda *a: resolved.append(real_enum(*a)) or resolved[-1])
    monkeypatch.setattr(weights, "fetch_torchvision", fetched.append)  # offline here: only what it is given
    _check(BackboneConfig(model="resnet18", weights="IMAGENET1K_V1"))
    assert len(resolved) == 1 and fetched == resolved
    assert layer_names.recorded_weights_url("resnet18", "IMAGENET1K_V1") == resolved[0].url


def test_torchvision_weights_in_the_cache_are_found_without_importing_torchvision(cache, tmp_path, monkeypatch):
    """--weights IMAGENET1K_V1: the member's URL is recorded once per torchvision version, so a later
    driver finds the file in torch's cache without importing torchvision (seconds beside Ray's start).
    A member that does not exist is still resolved, and refused naming the members."""
    from torchvision.models import get_model_weights

    from featurestore.weights import _hub_cache_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cached = _hub_cache_file(get_model_weights("resnet18").IMAGENET1K_V1.url)
    os.makedirs(os.path.dirname(cached))
    open(cached, "wb").close()  # only its presence is checked in the driver; the actors load it
    code = ("import sys\n"
            "from featurestore.config import BackboneConfig\n"
            "from featurestore.engine import preflight\n"
            "preflight(BackboneConfig(model='resnet18', weights='IMAGENET1K_V1'))()\n"
            "print('imported:', 'torchvision' in sys.modules, 'torch' in sys.modules)\n"
            "try:\n"
            "    preflight(BackboneConfig(model='resnet18', weights='IMAGENET1K_V9'))()\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    said = _twice(code, cache)
    assert said[0][0] == "imported: True True" and said[1][0] == "imported: False False", said
    assert said[0][1] == said[1][1], said
    assert said[1][1].startswith("WeightsError unknown weights 'IMAGENET1K_V9' for resnet18; its weights are "
                                 "IMAGENET1K_V1"), said
    (entry,) = cache.glob("resnet18_weights-*.json")
    assert json.loads(entry.read_text())["names"] == [get_model_weights("resnet18").IMAGENET1K_V1.url]
    # `featurestore submit` checks a spec's weights name: a recorded one without importing torchvision
    code = ("import sys\n"
            "from jobs.specs import check_weights\n"
            "from featurestore.config import ConfigError\n"
            "check_weights([('resnet18', 'IMAGENET1K_V1')], 'job.yaml')\n"
            "print('imported:', 'torchvision' in sys.modules)\n"
            "try:\n"
            "    check_weights([('resnet18', 'IMAGENET1K_V9')], 'job.yaml')\n"
            "except ConfigError as exc:\n"
            "    print(exc)\n")
    out = _driver(code, cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "imported: False", out.stdout
    assert "job.yaml: field 'config.weights': unknown weights 'IMAGENET1K_V9' for resnet18" in out.stdout, out.stdout
