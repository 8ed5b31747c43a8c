"""User bugs in a study never silently drop a contestant (issue 24): a failing plugin mixer, a typo in
`mixer_kwargs` and duplicate keys reject the study with a message naming the problem, before anything is stored."""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest
import yaml

from spach.battle import db, load_study
from spach.battle.runner import run_dir
from spach.cli.main import main as cli
from spach.models import registry

NANO = {"ms": {"hidden_dim": 8, "num_heads": 1, "depths": [1, 1, 1, 1], "patch_size": 2}}


def study(**changes) -> dict:
    d = {"name": "tiny", "data": "mnist5k", "img_size": 16,
         "recipe": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0, "cooldown_epochs": 0, "workers": 0,
                    "tensorboard": False},
         "measure": {"batch_size": 4, "warmup": 0, "repeats": 1},
         "grid": {"family": ["conv"], "layout": ["ms"], "size": ["nano"], "seed": [0]},
         "sizes": {"nano": NANO}}
    d.update(changes)
    return d


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stored(tmp_path):
    """An output directory holding an earlier, valid study's database: (out, its snapshot)."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = load_study(study())
    conn = db.connect(out, create=True)
    db.register_study(conn, earlier, lambda r: run_dir(out, r))
    conn.close()
    return out, snapshot(out)


def battle(path: Path, out: Path, capsys) -> tuple[int, str]:
    """`spach battle PATH --out OUT`: (exit status, its one-line error)."""
    code = cli(["battle", str(path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return code, err


def write_study(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# ---- defect 2: a plugin mixer that raises is a bug, not a skipped combination ---------------------------

BROKEN_FORWARD = textwrap.dedent('''
    """A mixer whose forward fails on every call, on every device (the meta device included)."""
    import torch.nn as nn
    import spach


    @spach.register_mixer("brokenfwd")
    class BrokenForward(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            raise RuntimeError("forgot to implement the mixing")
''')

BROKEN_INIT = textwrap.dedent('''
    """A mixer whose constructor has a bug."""
    import torch.nn as nn
    import spach


    @spach.register_mixer("brokeninit")
    class BrokenInit(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.groups = dim // 0

        def forward(self, x):
            return x
''')

REFUSING = textwrap.dedent('''
    """A mixer that refuses widths above 64, with the typed refusal."""
    import torch.nn as nn
    import spach


    @spach.register_mixer("narrowonly")
    class NarrowOnly(nn.Module):
        def __init__(self, dim):
            super().__init__()
            if dim > 64:
                raise spach.ArchitectureRefusal(f"narrowonly mixes at most 64 channels, got {dim}")
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            return self.proj(x)
''')


@pytest.fixture
def plugin(tmp_path):
    """Write a plugin file into tmp_path; unregister its mixer afterwards."""
    names = []

    def write(source: str, mixer: str) -> str:
        (tmp_path / f"{mixer}.py").write_text(source)
        names.append(mixer)
        return f"{mixer}.py"

    yield write
    for name in names:
        if name in registry.mixer_names():
            registry.unregister_mixer(name)


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_plugin_whose_forward_raises_rejects_the_study_naming_mixer_exception_and_line(
        tmp_path, plugin, stored, capsys):
    out, before = stored
    spec = study(plugins=[plugin(BROKEN_FORWARD, "brokenfwd")],
                 grid={"family": ["conv", "brokenfwd"], "layout": ["ms"], "size": ["nano"], "seed": [0]})
    code, err = battle(write_study(tmp_path, spec), out, capsys)
    where = f"{tmp_path / 'brokenfwd.py'}:{line_of(tmp_path / 'brokenfwd.py', 'raise RuntimeError')}"
    assert code == 2
    assert (f"brokenfwd-ms-nano: mixer 'brokenfwd' raised RuntimeError at {where}: forgot to implement the "
            "mixing — a bug in the mixer, not a refusal") in err
    assert snapshot(out) == before


def test_a_plugin_whose_constructor_raises_rejects_the_study(tmp_path, plugin, stored, capsys):
    out, before = stored
    spec = study(plugins=[plugin(BROKEN_INIT, "brokeninit")],
                 grid={"family": ["brokeninit"], "layout": ["ms"], "size": ["nano"], "seed": [0]})
    code, err = battle(write_study(tmp_path, spec), out, capsys)
    where = f"{tmp_path / 'brokeninit.py'}:{line_of(tmp_path / 'brokeninit.py', 'dim // 0')}"
    assert code == 2
    assert f"mixer 'brokeninit' raised ZeroDivisionError at {where}: integer division or modulo by zero" in err
    assert snapshot(out) == before


def test_a_plugin_refusing_with_the_typed_refusal_is_skipped_with_its_reason(tmp_path, plugin):
    wide = {"ms": dict(NANO["ms"], hidden_dim=16)}
    spec = study(plugins=[plugin(REFUSING, "narrowonly")], sizes={"nano": NANO, "wide": wide},
                 grid={"family": ["narrowonly"], "layout": ["ms"], "size": ["nano", "wide"], "seed": [0]})
    loaded = load_study(write_study(tmp_path, spec))
    assert [r.group for r in loaded.runs] == ["narrowonly-ms-nano"]
    assert dict(loaded.skipped) == {"narrowonly-ms-wide": "narrowonly mixes at most 64 channels, got 128"}


def test_the_models_own_refusals_are_still_skips():
    loaded = load_study(study(grid={"family": ["conv", "pool"], "layout": ["ms"], "size": ["nano"],
                                    "cpe": [True, False], "shared": [False, True]}))
    skipped = dict(loaded.skipped)
    assert "CPE cannot be removed" in skipped["conv-ms-nano-nocpe"]
    assert "has no weights, so there is nothing to share" in skipped["pool-ms-nano-shared"]


# ---- defect 3: an unknown mixer option is a user error ------------------------------------------------

def test_a_typo_in_mixer_kwargs_rejects_the_study_with_the_registry_message(tmp_path, stored, capsys):
    out, before = stored
    nano = {"ms": dict(NANO["ms"], mixer_kwargs={"pool": {"pool_sise": 3}})}
    spec = study(sizes={"nano": nano}, grid={"family": ["conv", "pool"], "layout": ["ms"], "size": ["nano"]})
    code, err = battle(write_study(tmp_path, spec), out, capsys)
    assert code == 2
    assert err.endswith("pool-ms-nano: mixer 'pool' does not take option(s) ['pool_sise']; its constructor "
                        "takes ['pool_size']")
    assert snapshot(out) == before


# ---- defect 4: a key written twice is refused, with both lines ----------------------------------------

DUPLICATE_INSIDE = """\
name: tiny
data: mnist5k
img_size: 16
recipe:
  epochs: 1
  batch_size: 32
  epochs: 5
grid: {family: [conv], layout: [ms], size: [xxs]}
"""

DUPLICATE_TOP = """\
name: tiny
data: mnist5k
recipe: {epochs: 1, warmup_epochs: 0, cooldown_epochs: 0}
grid: {family: [conv], layout: [ms], size: [xxs]}
recipe: {lr: 1.0e-3}
"""


@pytest.mark.parametrize("text, key, lines", [(DUPLICATE_INSIDE, "epochs", (5, 7)),
                                              (DUPLICATE_TOP, "recipe", (3, 5))], ids=["in-a-mapping", "top-level"])
def test_a_key_written_twice_rejects_the_study_with_both_line_numbers(tmp_path, stored, capsys, text, key, lines):
    out, before = stored
    path = tmp_path / "study.yaml"
    path.write_text(text)
    code, err = battle(path, out, capsys)
    assert code == 2
    assert err == (f"spach battle: error: {path}: duplicate key {key!r} (lines {lines[0]} and {lines[1]}): YAML "
                   "would keep the second silently; write each key once")
    assert snapshot(out) == before


def test_merge_keys_may_still_be_overridden_by_the_mappings_own():
    from spach.yaml_file import load

    assert load("a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  x: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_a_training_config_file_refuses_duplicate_keys_too(tmp_path):
    from spach.engine.config import load_yaml

    path = tmp_path / "recipe.yaml"
    path.write_text("lr: 1.0e-3\nepochs: 2\nlr: 5.0e-4\n")
    with pytest.raises(ValueError, match=r"recipe.yaml: duplicate key 'lr' \(lines 1 and 3\)"):
        load_yaml(path)
