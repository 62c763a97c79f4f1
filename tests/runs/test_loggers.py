"""trainer.logger=wandb: an offline run holds the metrics, the config and the reconstruction picture."""

import importlib.util
import json
import math
import struct
import time
from pathlib import Path

import pytest

from heatssl.config import load_config
from heatssl.errors import ConfigError
from heatssl.runs.trainer import build_trainer
from heatssl.train import pretrain as run

WANDB_ENV = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_BASE_URL",
)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No W&B login nor mode; quiet; its caches and settings under tmp_path (nothing outside)."""
    pytest.importorskip("wandb")
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))  # no login: the offline fallback
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def _records(path: Path) -> list:
    """The records of a ``run-*.wandb`` file (W&B's LevelDB-style log of Record protos)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, part, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def _finished_records(path: Path, seconds: float = 60) -> list:
    """The records once the ``exit`` one is there: wandb's service may still be writing the
    file for a moment after ``finish()`` returned."""
    deadline = time.monotonic() + seconds
    while True:
        records = _records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        assert time.monotonic() < deadline, f"{path} was never closed with an exit record"
        time.sleep(0.05)


def _rows(records: list, kind: str) -> list[dict[str, object]]:
    """Key -> JSON value, one dict per ``history`` (a logged step) or ``config`` record."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == kind:
            items = record.history.item if kind == "history" else record.config.update
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def test_an_offline_wandb_run_holds_metrics_config_and_pictures(
    tiny_overrides, wandb_env, monkeypatch, capsys
):
    """WANDB_MODE=offline: the run is written into <run_dir>/wandb/offline-run-*."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*tiny_overrides, "trainer.logger=wandb", "trainer.wandb_project=heatssl-test"]
    result = run.pretrain(load_config("demo", overrides))
    assert "logging offline" not in capsys.readouterr().err  # the user chose it: no note
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")
    (log,) = offline.glob("run-*.wandb")
    records = _finished_records(log)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (started.project, started.display_name) == ("heatssl-test", "run")

    history = _rows(records, "history")
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    (config,) = _rows(records, "config")
    assert config["config"]["model"]["backbone"] == "test_resnet"  # save_hyperparameters

    (picture,) = [row for row in history if "reconstruction/_type" in row]  # one epoch, one sheet
    assert picture["reconstruction/_type"] == "images/separated"
    assert picture["trainer/global_step"] == result.global_step
    (name,) = picture["reconstruction/filenames"]
    png = offline / "files" / name  # media/images/reconstruction_<step>_<hash>.png
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    assert not (wandb_env / "wandb_home" / "wandb_dir").exists()  # all under the run folder

    import wandb

    assert wandb.run is None  # the fit ended its run: the next one in the process is its own


def _wandb_init(overrides: list[str]) -> dict:
    """What the run's WandbLogger will pass to ``wandb.init`` (no run is started)."""
    cfg = load_config("demo", [*overrides, "trainer.logger=wandb"])
    logger = build_trainer(cfg, Path(cfg.run_dir), "heatssl pretrain --resume").logger
    assert not Path(cfg.run_dir, "wandb").exists()  # nothing started before the fit
    return logger._wandb_init


def test_without_a_login_wandb_logs_offline_with_a_note(tiny_overrides, wandb_env, capsys):
    """No WANDB_MODE, no key, no .netrc entry: offline rather than wandb's login prompt."""
    init = _wandb_init(tiny_overrides)
    assert init["mode"] == "offline"
    assert "logging offline" in capsys.readouterr().err
    assert (init["project"], init["name"]) == ("heatssl", "run")


def test_a_login_or_a_wandb_mode_is_left_to_wandb(tiny_overrides, wandb_env, monkeypatch):
    netrc = wandb_env / "no.netrc"
    netrc.write_text("machine api.wandb.ai login user password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    assert "mode" not in _wandb_init(tiny_overrides)  # `wandb login` wrote a .netrc entry
    netrc.unlink()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    init = _wandb_init(tiny_overrides)
    assert "mode" not in init  # wandb reads WANDB_MODE itself
    assert init["project"] == "from-env"


def test_wandb_missing_says_how_to_install(tiny_overrides, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else find_spec(name, *a),
    )
    cfg = load_config("demo", [*tiny_overrides, "trainer.logger=wandb"])
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        build_trainer(cfg, Path(cfg.run_dir), "heatssl pretrain --resume")


@pytest.mark.parametrize("project", ["' '", "a/b", "x:y"])
def test_a_bad_wandb_project_is_refused(tiny_overrides, project):
    with pytest.raises(ConfigError, match=r"trainer\.wandb_project"):
        load_config("demo", [*tiny_overrides, f"trainer.wandb_project={project}"])
