"""Both Lightning namespaces: the callback, a search and the CLI with a module written on
``lightning.pytorch`` as well as on ``pytorch_lightning``; either package alone."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import autonorm
from autonorm._lightning import namespace_of
from autonorm.callbacks import AutoNorm, load_from_checkpoint
from tests.lightning_models import NAMESPACES, L, models_of, tiny_trainer

ROOT = Path(__file__).resolve().parents[1]
needs_lightning = pytest.mark.skipif(L is None, reason="lightning is not installed")


def test_namespace_of_reads_the_module_class():
    from tests.lightning_models import TinyConvNet, TinyDataModule

    assert namespace_of(TinyConvNet) is pl
    assert namespace_of(TinyConvNet()) is pl
    assert namespace_of(functools.partial(TinyConvNet, width=4)) is pl
    assert namespace_of(TinyDataModule) is pl
    assert namespace_of(lambda: TinyConvNet()) is pl  # a plain factory: the default namespace
    if L is not None:
        from tests.lightning_models import LTinyConvNet, LTinyDataModule

        assert namespace_of(LTinyConvNet) is L
        assert namespace_of(functools.partial(LTinyConvNet, lr=0.1)) is L
        assert namespace_of(LTinyDataModule()) is L


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_callback_rewrites_and_checkpoints_in_either_namespace(tmp_path, namespace):
    net_class, data_class = models_of(namespace)
    model = net_class()
    config = autonorm.NormConfig.uniform(autonorm.find_slots(model), "groupnorm", groups=2)
    trainer = tiny_trainer(tmp_path, [AutoNorm(config=config)], max_epochs=1, namespace=namespace)
    trainer.fit(model, datamodule=data_class())
    assert isinstance(model.bn1, torch.nn.GroupNorm) and model.bn1.num_groups == 2
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = load_from_checkpoint(net_class, tmp_path / "m.ckpt")
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    ("namespace", "monitor", "mode", "objectives", "names"),
    [
        pytest.param(pl, "val_acc", "max", None, ["val_acc"], id="pytorch_lightning"),
        pytest.param(
            L,
            "val_loss",
            "min",
            ["metric", "params"],
            ["val_loss", "params"],
            id="lightning",
            marks=needs_lightning,
        ),
    ],
)
def test_search_trains_in_the_module_namespace_and_names_the_metrics(
    tmp_path, namespace, monitor, mode, objectives, names
):
    net_class, data_class = models_of(namespace)
    result = autonorm.search(
        net_class,
        data_class(),
        n_trials=2,
        space="minimal",
        monitor=monitor,
        mode=mode,
        objectives=objectives,
        trainer_kwargs={"max_epochs": 1},
        out_dir=tmp_path / "out",
        seed=0,
    )
    finished = [t for t in result.study.trials if t.state.is_finished()]
    assert len(finished) == 2
    assert result.study.metric_names == names  # the dashboard's axis names


USER_MODULE = textwrap.dedent(
    """
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset


    class Net(L.LightningModule):
        def __init__(self, width: int = 8):
            super().__init__()
            self.conv = nn.Conv1d(2, width, 3, padding=1)
            self.bn = nn.BatchNorm1d(width)
            self.head = nn.Linear(width, 2)
            self.example_input_array = torch.zeros(4, 2, 16)

        def forward(self, x):
            return self.head(F.relu(self.bn(self.conv(x))).mean(-1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)


    class Data(L.LightningDataModule):
        def __init__(self, batch_size: int = 16):
            super().__init__()
            self.batch_size = batch_size

        def setup(self, stage=None):
            g = torch.Generator().manual_seed(0)
            y = torch.randint(0, 2, (64,), generator=g)
            x = torch.randn(64, 2, 16, generator=g) + y[:, None, None]
            self.ds = TensorDataset(x, y)

        def train_dataloader(self):
            return DataLoader(self.ds, batch_size=self.batch_size, shuffle=True, drop_last=True)

        def val_dataloader(self):
            return DataLoader(self.ds, batch_size=32)
    """
)


def _python_without(blocked: list[str], code: str, cwd: Path, *args: str):
    """Run ``code`` in a fresh interpreter where the ``blocked`` packages do not import."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", prelude + code, *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


@needs_lightning
def test_cli_search_with_lightning_alone(tmp_path):
    """``autonorm search`` on a ``lightning`` module where pytorch_lightning is not there."""
    (tmp_path / "lmodels.py").write_text(USER_MODULE)
    code = "from autonorm.cli import main; sys.exit(main())"
    args = ["search", "--model", "lmodels.Net", "--data", "lmodels.Data"]
    args += ["--trainer.max_epochs", "1", "--search.n_trials", "2", "--search.space", "minimal"]
    result = _python_without(["pytorch_lightning"], code, tmp_path, *args, "--search.out_dir", "o")
    assert result.returncode == 0, result.stderr[-3000:]
    config = autonorm.NormConfig.load(tmp_path / "o" / "best_config.yaml")
    assert set(config.choices) == {"bn"}
    assert "lightning" in config.metadata["versions"]
    assert "pytorch_lightning" not in config.metadata["versions"]


def test_search_with_pytorch_lightning_alone_and_neither(tmp_path):
    code = textwrap.dedent(
        """
        import autonorm
        from tests.lightning_models import TinyConvNet, TinyDataModule
        result = autonorm.search(TinyConvNet, TinyDataModule(), n_trials=1, space="minimal",
                                 trainer_kwargs={"max_epochs": 1}, out_dir=sys.argv[1])
        print("versions", sorted(result.best_config.metadata["versions"]))
        """
    )
    alone = _python_without(["lightning"], code, ROOT, str(tmp_path / "out"))
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "'pytorch_lightning'" in alone.stdout and "'lightning'" not in alone.stdout
    neither = _python_without(["lightning", "pytorch_lightning"], "import autonorm.callbacks", ROOT)
    assert neither.returncode == 1
    assert "ImportError: autonorm.callbacks needs PyTorch Lightning: pip install" in neither.stderr
