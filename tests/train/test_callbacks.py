"""Tests for heatssl.runs.callbacks: reconstruction pictures at the right epochs, from rank 0 only."""

from types import SimpleNamespace

import pytest
import torch

from heatssl.config import load_config
from heatssl.train.pictures import ReconstructionPictures
from heatssl.train.pretrain_module import HeatPretrainModule


@pytest.mark.parametrize(
    ("every", "max_epochs", "drawn"),
    [(2, 5, [2, 4, 5]), (1, 2, [1, 2]), (0, 3, [])],  # the last epoch always, 0 never
)
def test_pictures_follow_the_interval_and_the_last_epoch(
    tiny_overrides, tmp_path, every, max_epochs, drawn
):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))
    pictures = ReconstructionPictures(tmp_path / "pictures", every, images=3)
    batch = (torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), [])
    trainer = SimpleNamespace(max_epochs=max_epochs, is_global_zero=True)
    pictures.on_train_batch_start(trainer, module, batch, 0)
    for epoch in range(max_epochs):
        trainer.current_epoch = epoch
        pictures.on_train_epoch_end(trainer, module)
    found = sorted(int(p.stem[-3:]) for p in (tmp_path / "pictures").glob("*.png"))
    assert found == drawn
    if drawn:
        assert pictures._batch.shape == (3, 3, 32, 32)  # the first batch's first images


def test_only_rank_zero_draws(tiny_overrides, tmp_path):
    module = HeatPretrainModule(load_config("demo", tiny_overrides))
    pictures = ReconstructionPictures(tmp_path / "pictures", 1)
    trainer = SimpleNamespace(max_epochs=1, is_global_zero=False, current_epoch=0)
    pictures.on_train_batch_start(trainer, module, (torch.randn(2, 3, 32, 32),), 0)
    pictures.on_train_epoch_end(trainer, module)
    assert not (tmp_path / "pictures").exists()
