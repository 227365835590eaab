"""extract's driver refuses a layer the model lacks, or one that needs the classifier a headless weights
file lacks, before any actor starts (engine.preflight's check, on the meta device: no weights read or
allocated, run in a thread while Ray starts), with the same message the actors would give ~30 s later."""
from __future__ import annotations

import time

import pytest
import torch

from featurestore.backbones import UnknownLayerError, WeightsError
from featurestore.config import BackboneConfig, ExtractConfig
from featurestore.engine import ExtractError, extract, preflight
from featurestore.zoo import UnknownModelError


@pytest.fixture(scope="module")
def r18_files(tmp_path_factory):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    sd = resnet18().state_dict()
    tmp = tmp_path_factory.mktemp("w")
    full, headless = tmp / "r18.pth", tmp / "r18_headless.pth"
    torch.save(sd, full)
    torch.save({k: v for k, v in sd.items() if not k.startswith("fc.")}, headless)
    return str(full), str(headless)


def _check(backbone: BackboneConfig) -> None:
    """preflight and the check it leaves for the time Ray starts, as extract runs them."""
    check = preflight(backbone)
    if check is not None:
        check()


def _images(root, n=2):
    from PIL import Image

    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(root / cls / f"{i}.png")
    return str(root)


def test_a_typo_is_refused_by_the_driver_before_any_actor(tmp_path):
    import ray

    running = ray.is_initialized()
    src = _images(tmp_path / "src")
    cfg = ExtractConfig(source=src, output=str(tmp_path / "out"), model="resnet18", weights="none",
                        layers=["layr3"], quiet=True)
    t0 = time.perf_counter()
    try:
        with pytest.raises((UnknownLayerError, ExtractError), match=r"resnet18 has no layer 'layr3'; closest: layer3"):
            extract(cfg)
    finally:
        if not running:  # the embedded instance extract started: the modules after this one start their own
            ray.shutdown()
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t0 < 60


def test_logits_of_a_headless_file_is_refused_naming_the_file(r18_files):
    full, headless = r18_files
    with pytest.raises(UnknownLayerError, match=rf"resnet18: logits needs the classifier, and weights {headless} "
                                                r"have none .*deepest layer they give is 'flatten'.*"
                                                rf"`featurestore layers resnet18 --weights {headless}` lists the "
                                                r"layers and marks those they cannot give"):
        _check(BackboneConfig(model="resnet18", weights=headless, layers=["layer3", "logits"]))
    with pytest.raises(UnknownLayerError, match=r"layer 'fc' needs the classifier"):
        _check(BackboneConfig(model="resnet18", weights=headless, layers=["fc"]))
    with pytest.raises(UnknownLayerError, match=r"resnet18: 'x' is the input image itself, not a feature"):
        _check(BackboneConfig(model="resnet18", weights=headless, layers=["x"]))
    # what the file gives is let through, as is the full file
    _check(BackboneConfig(model="resnet18", weights=headless, layers=["layer3", "flatten"]))
    _check(BackboneConfig(model="resnet18", weights=full, layers=["logits", "layer4"]))


def test_a_timm_typo_and_a_timm_headless_logits(tmp_path):
    import timm

    with pytest.raises(UnknownLayerError, match=r"timm:resnet18 has no layer 'layer9'"):
        _check(BackboneConfig(model="timm:resnet18", weights="none", layers=["layer9"]))
    path = tmp_path / "t18_headless.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    with pytest.raises(UnknownLayerError, match=rf"timm:resnet18: logits needs the classifier, and weights {path}"):
        _check(BackboneConfig(model="timm:resnet18", weights=str(path), layers=["logits"]))


def test_checks_that_need_torch_are_left_for_the_time_ray_starts(r18_files, tmp_path):
    """What needs torch (seconds to import) is left to the returned check, which extract runs while Ray
    starts, so a correct run does not wait for it: a file that does not fit the model, or a layer typo,
    is refused there rather than by every actor."""
    full, headless = r18_files
    check = preflight(BackboneConfig(model="resnet18", weights=headless))
    assert callable(check)
    check()  # a headless file's default cut is fine
    wrong = preflight(BackboneConfig(model="resnet34", weights=full))
    with pytest.raises(WeightsError, match=rf"weights {full} do not fit resnet34"):
        wrong()
    missing = preflight(BackboneConfig(model="resnet18", weights=str(tmp_path / "nope.pth")))
    with pytest.raises(WeightsError, match="weights file not found"):
        missing()
    typo = preflight(BackboneConfig(model="resnet18", weights="none", layers=["layr3"]))
    with pytest.raises(UnknownLayerError, match="resnet18 has no layer 'layr3'"):
        typo()
    assert preflight(BackboneConfig(model="resnet18", weights="none", layers=["logits"])) is None  # every model has it


def test_a_timm_name_is_looked_up_while_ray_starts_and_a_typo_is_still_refused(tmp_path):
    """timm's registry needs `import timm` (and torch): seconds that used to pass before Ray started."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from featurestore.config import BackboneConfig\n"
        "from featurestore.engine import preflight\n"
        "from featurestore.zoo import UnknownModelError\n"
        "ok = preflight(BackboneConfig(model='timm:resnet18', weights='none'))\n"
        "typo = preflight(BackboneConfig(model=' timm:resnet_18', weights='none', layers=['layer3']))\n"
        "print('timm' in sys.modules, 'torch' in sys.modules)\n"
        "ok()\n"
        "try:\n"
        "    typo()\n"
        "except UnknownModelError as exc:\n"
        "    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    first, said = res.stdout.splitlines()[:2]
    assert first == "False False", res.stdout  # nothing imported before the returned check runs
    assert said.startswith("unknown timm model 'resnet_18'; closest: timm:resnet18"), res.stdout
    import ray

    running = ray.is_initialized()
    cfg = ExtractConfig(source=_images(tmp_path / "src"), output=str(tmp_path / "out"), model="timm:resnet_18",
                        weights="none", quiet=True)
    try:
        with pytest.raises(UnknownModelError, match="unknown timm model 'resnet_18'"):
            extract(cfg)
    finally:
        if not running:
            ray.shutdown()
    assert not (tmp_path / "out" / "shards").exists()


def test_a_wrong_enum_member_with_named_layers_is_refused_up_front():
    with pytest.raises(WeightsError, match=r"unknown weights 'IMAGENET1K_V9' for resnet18; its weights are "):
        _check(BackboneConfig(model="resnet18", weights="IMAGENET1K_V9", layers=["layer3"]))


def test_a_model_the_meta_device_cannot_build_is_traced_for_real():
    """regnet's constructor copies data, which the meta device refuses: a small one is traced with
    random weights instead, so its typos are refused up front too."""
    with pytest.raises(UnknownLayerError, match=r"regnet_y_400mf has no layer 'trunk_outptu'; closest: trunk_output"):
        _check(BackboneConfig(model="regnet_y_400mf", weights="none", layers=["trunk_outptu"]))
    _check(BackboneConfig(model="regnet_y_400mf", weights="none", layers=["trunk_output"]))
