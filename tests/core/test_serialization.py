"""atofx.save / atofx.load: pruned models round-trip, in a new process too, and files with code are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torchvision
from atofx.passes.equivalence import relative_difference, run_eval
from torch import nn

import atofx
from atofx.core.serialization import FORMAT, read_payload

ROOT = Path(__file__).resolve().parents[2]


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():  # non-trivial BN statistics, so a wrong channel shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, pruned model, input, expected output) of a pruned resnet18 saved with atofx.save."""
    folder = tmp_path_factory.mktemp("saved")
    model = resnet18()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ato = atofx.compile(model, (x,))
    small = ato.prune(ato.random_mask(keep=0.5, seed=3))
    path = atofx.save(small, folder / "pruned.pt")
    return path, small, x, run_eval(small, (x,))


class Evil:
    """Unpickling this calls open(marker, 'w')."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def edited(saved, tmp_path: Path, edit) -> Path:
    """A copy of the saved file whose payload `edit(payload)` changed."""
    payload = read_payload(saved[0])
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def first(payload: dict, op: str) -> dict:
    return next(n for n in payload["graph"]["nodes"] if n["op"] == op)


# ---------------------------------------------------------------------- round trips


def test_saved_file_holds_plain_data_and_a_graph(saved):
    path, small, _, _ = saved
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT and payload["graph"] is not None and payload["graph_missing_because"] is None
    assert payload["class"] == "torchvision.models.resnet.ResNet" and payload["forward_is_graph"] is False
    assert payload["layers"]["layer1.0.conv1"]["out_channels"] == small.layer1[0].conv1.out_channels < 64
    assert not path.with_name(path.name + ".tmp").exists()


def test_load_rebuilds_the_graph(saved):
    path, small, x, expected = saved
    loaded = atofx.load(path)
    assert isinstance(loaded, fx.GraphModule) and not isinstance(loaded, torchvision.models.ResNet)
    # built from torch.nn layers only: no class of the user's source is needed
    assert all(type(m).__module__.startswith(("torch.nn", "torch.fx")) for m in loaded.modules())
    assert relative_difference(expected, run_eval(loaded, (x,))) <= 1e-6
    assert atofx.count_params(loaded) == atofx.count_params(small) < atofx.count_params(resnet18())
    assert loaded.get_submodule("layer2.0.conv1").in_channels == small.layer2[0].conv1.in_channels


def test_load_in_a_new_process(saved, tmp_path):
    path, _, x, expected = saved
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch, atofx\n"
        "torch.set_num_threads(1)\n"
        "model = atofx.load(sys.argv[1]).eval()\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "with torch.no_grad():\n"
        "    torch.save(model(x), sys.argv[3])\n"
        "print(type(model).__name__)\n"
    )
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "PrunedModel"
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert relative_difference(expected, got) <= 1e-6


def test_load_into_a_fresh_instance_of_the_users_model(saved):
    path, small, x, expected = saved
    loaded = atofx.load(path, model=torchvision.models.resnet18(num_classes=10))
    assert isinstance(loaded, torchvision.models.ResNet)
    widths = {name: (m.in_channels, m.out_channels) for name, m in loaded.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths == {name: (m.in_channels, m.out_channels) for name, m in small.named_modules()
                      if isinstance(m, nn.Conv2d)}
    assert loaded.fc.in_features == small.fc.in_features < 512
    assert loaded.bn1.num_features == small.bn1.num_features
    assert relative_difference(expected, run_eval(loaded, (x,))) <= 1e-6


def test_load_into_the_wrong_model_is_refused(saved):
    path = saved[0]
    with pytest.raises(atofx.AtofxError, match=r"does not fit the given model \(torchvision\.models\.resnet\.ResNet"):
        atofx.load(path, model=torchvision.models.resnet34(num_classes=10))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so no graph is stored."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x.relu()
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_loads_into_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    model = Branchy().eval()
    with torch.no_grad():
        model.conv.weight[:3].zero_()
    small = Branchy().eval()
    small.conv = nn.Conv2d(3, 5, 3, padding=1)
    small.fc = nn.Linear(5, 4)
    x = torch.randn(2, 3, 6, 6)
    path = atofx.save(small, tmp_path / "b.pt")
    assert torch.load(path, weights_only=True)["graph"] is None
    with pytest.raises(atofx.AtofxError, match=r"holds no graph.*atofx\.load\(path, model=Branchy\(\.\.\.\)\)"):
        atofx.load(path)
    loaded = atofx.load(path, model=Branchy())
    assert loaded.conv.out_channels == 5 and loaded.fc.in_features == 5
    assert torch.equal(run_eval(loaded, (x,)), run_eval(small, (x,)))


class OneChannel(nn.Module):
    """Reads channel 3 by a number in its forward: pruning must rewrite `y[:, 3:4]`, so ato.prune returns a graph."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(y) + y[:, 3:4]


class CatSlice(nn.Module):
    """Splits a concat by a number in its forward (`y[:, :8]`)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.c1(y[:, :8]) + self.c2(y[:, 8:])


def save_rewritten(cls: type[nn.Module], folder: Path) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ato = atofx.compile(cls().eval(), x[:1])
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))
    assert isinstance(small, fx.GraphModule), "the forward's numbers had to change"
    return atofx.save(small, folder / "rewritten.pt"), small, x


REWRITTEN = r"forward is a rewritten torch\.fx graph.*OneChannel's own forward.*without model=: atofx\.load\(path\)"


@pytest.mark.parametrize("cls", [OneChannel, CatSlice])
def test_a_rewritten_graph_is_refused_into_the_users_class_and_loads_without_it(tmp_path, cls):
    path, small, x = save_rewritten(cls, tmp_path)
    given = cls()
    widths = [p.shape for p in given.parameters()]
    with pytest.raises(atofx.AtofxError, match=REWRITTEN.replace("OneChannel", cls.__name__)):
        atofx.load(path, model=given)
    assert [p.shape for p in given.parameters()] == widths, "a refused model is left as it was given"
    assert torch.equal(run_eval(atofx.load(path), (x,)), run_eval(small, (x,)))


def test_a_rewritten_graph_saved_before_files_said_so_is_refused_too(tmp_path):
    path, small, x = save_rewritten(OneChannel, tmp_path)
    payload = read_payload(path)
    del payload["forward_is_graph"]  # as atofx.save wrote it before; its class is GraphModule's
    torch.save(payload, path)
    with pytest.raises(atofx.AtofxError, match=REWRITTEN):
        atofx.load(path, model=OneChannel())
    assert torch.equal(run_eval(atofx.load(path), (x,)), run_eval(small, (x,)))


def test_a_rewritten_graph_without_its_graph_cannot_be_loaded(tmp_path):
    path, _, _ = save_rewritten(OneChannel, tmp_path)
    payload = read_payload(path)
    payload["graph"], payload["graph_missing_because"] = None, "a leaf module"
    torch.save(payload, path)
    with pytest.raises(atofx.AtofxError, match=r"rewritten.*holds no graph \(a leaf module\), so it cannot be loaded"):
        atofx.load(path, model=OneChannel())


def test_the_users_own_graph_module_loads_into_a_fresh_trace_of_it(tmp_path):
    """A GraphModule whose numbers pruning left alone runs the saved graph: model= takes it."""
    def traced() -> fx.GraphModule:
        return fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    ato = atofx.compile(traced().eval(), x[:1])
    small = ato.prune(ato.random_mask(keep=0.5, seed=0))
    assert isinstance(small, fx.GraphModule) and small.get_submodule("0").out_channels < 8
    path = atofx.save(small, tmp_path / "gm.pt")
    assert torch.load(path, weights_only=True)["forward_is_graph"]
    mine = traced()
    assert atofx.load(path, model=mine) is mine
    assert torch.equal(run_eval(mine, (x,)), run_eval(small, (x,)))


# ---------------------------------------------------------------------- refusals


def test_a_file_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "state_dict": {}, "layers": {}, "graph": None, "hook": Evil(marker)},
               path)
    with pytest.raises(atofx.UnsafeCheckpointError, match=r"refused without running it") as err:
        atofx.load(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)  # not torch's advice to unsafe-load
    with pytest.raises(atofx.UnsafeCheckpointError):
        atofx.load(path, model=torchvision.models.resnet18())
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.exec", "subprocess.run",
                                    "torch.load", "builtins.__import__"])
def test_a_graph_calling_a_function_off_the_allow_list_is_refused(saved, tmp_path, target):
    def edit(payload):
        first(payload, "call_function")["target"] = target

    path = edited(saved, tmp_path, edit)
    with pytest.raises(atofx.UnsafeCheckpointError, match=rf"calls {target}, which is not on the allow-list"):
        atofx.load(path)


@pytest.mark.parametrize("method", ["__reduce__", "_fix_weakref", "no_such_method"])
def test_a_graph_calling_a_private_or_unknown_method_is_refused(saved, tmp_path, method):
    def edit(payload):
        node = first(payload, "call_function")
        node["op"], node["target"] = "call_method", method

    with pytest.raises(atofx.UnsafeCheckpointError, match=r"calls method"):
        atofx.load(edited(saved, tmp_path, edit))


@pytest.mark.parametrize("spec", ["subprocess:Popen", "builtins:eval", "torch.nn.functional:__builtins__",
                                  "torch.nn.modules.conv:Conv2d.__init__", "os:system"])
def test_a_layer_class_off_the_allow_list_is_refused(saved, tmp_path, spec):
    def edit(payload):
        payload["graph"]["modules"]["conv1"]["class"] = spec

    with pytest.raises(atofx.UnsafeCheckpointError, match=r"refusing to load it"):
        atofx.load(edited(saved, tmp_path, edit))


@pytest.mark.parametrize("arg, message", [
    ({"code": "print('hi')"}, r"unknown tag 'code'"),
    ({"dtype": "load"}, r"unknown dtype 'load'"),
    ({"memory_format": "save"}, r"unknown memory_format 'save'"),
])
def test_unknown_graph_argument_tags_are_refused(saved, tmp_path, arg, message):
    def edit(payload):
        node = first(payload, "call_function")
        node["args"] = {"tuple": [node["args"]["tuple"][0], arg]}

    with pytest.raises(atofx.UnsafeCheckpointError, match=message):
        atofx.load(edited(saved, tmp_path, edit))


def test_files_not_written_by_atofx_give_an_atofx_error(saved, tmp_path):
    plain = tmp_path / "state_dict.pt"
    torch.save(resnet18().state_dict(), plain)
    with pytest.raises(atofx.AtofxError, match=r"not an atofx pruned-model file; save one with atofx\.save"):
        atofx.load(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(atofx.AtofxError, match=r"not an atofx pruned-model file"):
        atofx.load(tensor)
    data = saved[0].read_bytes()
    damaged = {"text.pt": b"hello, not a model\n", "empty.pt": b"", "noise.pt": bytes(range(33, 53))}
    # cut short anywhere: at some lengths torch's zip reader fails with a bare OSError (EINVAL), not a RuntimeError
    damaged |= {f"cut{n}.pt": data[:n] for n in (100, 5_000, 50_000, len(data) // 2, len(data) - 100)}
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(atofx.AtofxError, match=r"damaged or not a file written by atofx\.save") as err:
            atofx.load(tmp_path / name)
        assert type(err.value) is atofx.AtofxError, f"{name}: damage is not code"
        # one line, and not torch's advice to load with weights_only=False
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value), name
    with pytest.raises(FileNotFoundError):  # a path that is not there is not a damaged file
        atofx.load(tmp_path / "missing.pt")


def test_save_of_what_is_not_a_model_says_what_to_pass(saved, tmp_path):
    with pytest.raises(atofx.AtofxError, match=r"takes the model \(an nn.Module\), got OrderedDict: save ato.prune"):
        atofx.save(saved[1].state_dict(), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_save_into_a_missing_folder_is_an_atofx_error(saved, tmp_path):
    with pytest.raises(atofx.AtofxError, match=r"the folder .*no/such does not exist; create it first"):
        atofx.save(saved[1], tmp_path / "no" / "such" / "m.pt")


def test_save_replaces_a_file_atomically(saved, tmp_path):
    path, small, x, expected = saved
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    atofx.save(small, target, (x,))
    assert relative_difference(expected, run_eval(atofx.load(target), (x,))) <= 1e-6
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def _largest_tensor_offset(path: Path) -> tuple[int, int]:
    """(offset, size) of the bytes of the largest tensor stored in a torch.save zip file."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + k: info.header_offset + k + 2], "little")
                           for k in (26, 28))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_a_file_with_flipped_tensor_bytes_is_refused_as_damaged(saved, tmp_path):
    start, size = _largest_tensor_offset(saved[0])
    data = bytearray(saved[0].read_bytes())
    middle = start + size // 2
    data[middle: middle + 400] = bytes(255 - b for b in data[middle: middle + 400])  # 400 inverted bytes
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["format"] == FORMAT  # torch itself reads it without complaint
    for kwargs in ({}, {"model": torchvision.models.resnet18(num_classes=10)}):
        with pytest.raises(atofx.AtofxError, match=r"is damaged: its tensors do not match the checksum"):
            atofx.load(path, **kwargs)


def test_the_checksum_covers_every_tensor(saved, tmp_path):
    def edit(payload):
        payload["state_dict"]["fc.bias"] = payload["state_dict"]["fc.bias"] + 1e-3

    with pytest.raises(atofx.AtofxError, match=r"damaged"):
        atofx.load(edited(saved, tmp_path, edit))


def test_a_model_mismatch_names_the_first_layers_in_one_short_line(saved):
    with pytest.raises(atofx.AtofxError) as err:
        atofx.load(saved[0], model=torchvision.models.resnet50(num_classes=10))
    message = str(err.value)
    assert len(message) < 800, message
    assert "the model has" in message and "layer1.0.conv3.weight (256, 64, 1, 1)" in message
    assert "and " in message and "more" in message


def test_load_returns_a_graph_module_or_the_given_instance(saved):
    assert isinstance(atofx.load(saved[0]), fx.GraphModule)
    mine = torchvision.models.resnet18(num_classes=10)
    assert atofx.load(saved[0], model=mine) is mine
