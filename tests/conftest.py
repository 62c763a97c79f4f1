"""Shared test settings: a tiny run config (timm test_resnet, 32 px synthetic images, CPU)."""

import pytest


def tiny_settings(run_dir) -> list[str]:
    """Overrides that make any recipe a seconds-long CPU run writing into ``run_dir``."""
    return [
        f"run_dir={run_dir}",
        "model.backbone=test_resnet",
        "model.output_stride=8",
        "data.name=synthetic",
        "data.synthetic_size=40",
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "decoder.width=16",
        "trainer.max_epochs=1",
        "trainer.progress_bar=false",
        "trainer.log_every_n_steps=1",
    ]


@pytest.fixture
def tiny_overrides(tmp_path):
    """:func:`tiny_settings` writing into the test's tmp_path."""
    return tiny_settings(tmp_path / "run")
