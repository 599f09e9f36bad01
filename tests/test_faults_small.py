"""Issue 15's small faults, each as a user meets it: passwords never shown, diverged learn runs,
choice parameters, YAML that refuses aliases and duplicated keys, report folders, a config
applied to another model class, the dashboard's host, ``sys.exit`` in user code, weight-norm
checkpoints, and the recalibration of fused slots. Real processes for the CLI cases."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import autonorm
from autonorm import AutoNormError, ConfigError, NormChoice, NormConfig
from autonorm._io import mask_password, safe_folder_name
from autonorm.callbacks import AutoNorm
from autonorm.cli._commands import is_loopback
from autonorm.norms._weight import weight_norm_of
from autonorm.search import _workers as workers
from autonorm.search._export import STORAGE_FILE, write_storage_file
from autonorm.search._pool import _without_storage
from autonorm.search._storage import make_storage
from autonorm.search_spaces import resolve_space
from tests.lightning_models import TinyConvNet, TinyDataModule, tiny_trainer

AUTONORM = str(Path(sys.executable).with_name("autonorm"))
REPO = Path(__file__).resolve().parents[1]
USER_MODULE = (REPO / "tests" / "user_project" / "usermodels.py").read_text()


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(REPO)  # the checkout under test, whatever install the venv has
    return env


def cli(args: list[str], cwd: Path, timeout: float = 120, **env: str):
    return subprocess.run(
        [AUTONORM, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env(**env)
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "usermodels.py").write_text(USER_MODULE)
    return folder


# -- 5. passwords ------------------------------------------------------------------------------

SECRET = "s3cr3t-Pw"

URL_SHAPES = [
    f"postgresql://user:{SECRET}@db.example.com:5432/studies",
    f"postgresql://:{SECRET}@db.example.com/studies",
    f"postgresql+psycopg://user:{SECRET}@[::1]:5432/studies?sslmode=require",
    f"postgresql://user:p@ss{SECRET}@host/studies",  # a raw '@' in the password: masked whole
    f"postgresql://user@host/studies?password={SECRET}",
    f"postgresql://user@host/studies?sslmode=require&password={SECRET}&application_name=x",
    f"postgresql://user@host/studies?PassWord={SECRET}",
    f"mysql+pymysql://user@host/studies?passwd={SECRET}",
    f"host=db.example.com password={SECRET} dbname=studies",
    f"cannot open storage 'postgresql://u:{SECRET}@h/db': refused; also \"mysql://:{SECRET}@h/x\"",
]


@pytest.mark.parametrize("text", URL_SHAPES)
def test_mask_password_hides_every_url_shape(text):
    masked = mask_password(text)
    assert SECRET not in masked and "***" in masked
    assert mask_password(masked) == masked  # idempotent: masking a masked text changes nothing
    assert masked == text.replace(f"p@ss{SECRET}", "***").replace(SECRET, "***")


@pytest.mark.parametrize(
    "text",
    ["sqlite:////tmp/a b/study.db", "/data/journal.log", "postgresql://user@host:5432/db", "x=1"],
)
def test_mask_password_leaves_text_without_password(text):
    assert mask_password(text) == text


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://:{SECRET}@127.0.0.1:9/db",
        f"postgresql://u@127.0.0.1:9/db?password={SECRET}",
        f"postgresql://u@127.0.0.1:9/db?connect_timeout=2&Password={SECRET}",
    ],
)
def test_opening_a_bad_postgres_url_never_shows_the_password(url, tmp_path, workdir):
    with pytest.raises(AutoNormError, match="cannot open storage") as err:
        make_storage(url, tmp_path)
    assert SECRET not in str(err.value)
    write_storage_file(tmp_path, url, "study")
    written = (tmp_path / STORAGE_FILE).read_text()
    assert SECRET not in written and "***" in written
    args = ["search", "--model", "usermodels.Net", "--data", "usermodels.Data"]
    result = cli([*args, "--search.storage", url, "--search.out_dir", str(tmp_path / "o")], workdir)
    assert result.returncode != 0 and "cannot open storage" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_the_pool_strips_the_storage_from_the_worker_command():
    argv = ["search", "--search.storage", "u", "--a", "1", f"--search.storage=x:{SECRET}", "--b"]
    assert _without_storage(argv) == ["search", "--a", "1", "--b"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Query string argument")
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_pool_workers_get_the_storage_off_their_command_line(workdir, tmp_path):
    # SQLite ignores the query's password (with a warning): a real storage whose URL has one
    storage = f"sqlite:///{tmp_path / 'study.db'}?password={SECRET}"
    out = tmp_path / "bundle"
    args = [
        "search", "--model", "usermodels.Net", "--model.sleep", "0.3",
        "--data", "usermodels.Data", "--trainer.max_epochs", "1", "--search.space", "minimal",
        "--search.n_trials", "2", "--search.n_workers", "2", "--search.out_dir", str(out),
        "--search.storage", storage, "--search.warm_start", "false",
    ]  # fmt: skip
    log = (tmp_path / "pool.log").open("wb")
    parent = subprocess.Popen(
        [AUTONORM, *args], cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
    seen: dict[int, tuple[bytes, bytes]] = {}
    deadline = time.time() + 150
    while parent.poll() is None and time.time() < deadline and len(seen) < 2:
        for pid in _children(parent.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if b"autonorm.cli" in cmdline:
                seen[pid] = (cmdline, environ)
        time.sleep(0.2)
    assert parent.wait(timeout=240) == 0, (tmp_path / "pool.log").read_text()[-3000:]
    assert len(seen) == 2, (tmp_path / "pool.log").read_text()[-3000:]
    for cmdline, environ in seen.values():
        assert SECRET.encode() not in cmdline and b"--search.storage" not in cmdline
        assert f"AUTONORM_STORAGE={storage}".encode() in environ.split(b"\0")
    study = optuna.load_study(study_name="autonorm-Net", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert SECRET not in (out / STORAGE_FILE).read_text()
    for path in [tmp_path / "pool.log", *(out / "workers").iterdir()]:
        assert SECRET not in path.read_text(), path


# -- 9. NaN mixing weights -----------------------------------------------------------------------


def test_derive_config_refuses_nan_mixing_weights_and_names_the_slots():
    model = autonorm.to_switchable(TinyConvNet())
    with torch.no_grad():
        model.bn2.mean_weight[0] = float("nan")
        model.head_norm.var_weight.fill_(float("inf"))
    with pytest.raises(AutoNormError, match=r"not finite.*'bn2', 'head_norm'") as err:
        autonorm.derive_config(model)
    assert "'bn1'" not in str(err.value)


def test_a_diverged_learn_run_fails_with_the_slots_named(tmp_path):
    callback = AutoNorm(mode="learn", config_path=tmp_path / "learned.yaml")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises(AutoNormError, match=r"learn run diverged.*'bn1'"):
        trainer.fit(TinyConvNet(fail_with="nan"), datamodule=TinyDataModule())
    assert not (tmp_path / "learned.yaml").exists()


def test_warm_start_learn_on_a_diverging_model_fails_with_that_error(tmp_path):
    with pytest.raises(AutoNormError, match="learn run diverged"):
        autonorm.search(
            lambda: TinyConvNet(fail_with="nan"),
            TinyDataModule(),
            n_trials=1,
            space="minimal",
            trainer_kwargs={"max_epochs": 1},
            out_dir=tmp_path / "out",
            warm_start="learn",
            seed=0,
        )


# -- 10. choice parameters and duplicated keys ----------------------------------------------------

BAD_PARAMS = {
    "batchnorm(eps=inf)": "`eps` must be a finite number > 0",
    "layernorm(eps=nan)": "`eps` must be a finite number > 0",
    "batchnorm(eps=0)": "`eps` must be a finite number > 0",
    "batchnorm(eps=true)": "`eps` must be a finite number > 0",
    "batchnorm(momentum=-0.1)": r"`momentum` must be a number in \[0, 1\] or None",
    "batchnorm(momentum=1.5)": r"`momentum` must be a number in \[0, 1\]",
    "instancenorm(momentum=fast)": r"`momentum` must be a number in \[0, 1\]",
    "batchnorm(track_running_stats=0)": "`track_running_stats` must be true or false",
    "groupnorm(groups=0)": "`groups` must be a positive int",
    "groupnorm(groups=2.0)": "`groups` must be a positive int",
    "dyt(alpha_init=inf)": "`alpha_init` must be a finite number",
}


@pytest.mark.parametrize("label", list(BAD_PARAMS))
def test_bad_choice_parameters_are_refused_everywhere(label, tmp_path):
    choice_error = BAD_PARAMS[label]
    with pytest.raises(ValueError, match=choice_error):
        NormChoice.parse(label)
    name, _, args = label.partition("(")
    key, _, raw = args.rstrip(")").partition("=")
    with pytest.raises(ValueError, match=choice_error):
        autonorm.create_norm(name, 8, **{key: _value(raw)})
    path = tmp_path / "cfg.yaml"
    path.write_text(f"slots:\n  bn1:\n    name: {name}\n    {key}: {raw}\n")
    with pytest.raises(ConfigError, match=rf"(?s)cfg.yaml.*slot 'bn1'.*{choice_error}"):
        NormConfig.load(path)


def _value(raw: str):
    return {"inf": float("inf"), "nan": float("nan"), "true": True, "fast": "fast"}.get(
        raw, float(raw) if "." in raw else int(raw) if raw.lstrip("-").isdigit() else raw
    )


def test_a_quoted_false_is_not_taken_as_true(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text('slots:\n  bn1:\n    name: layernorm\n    affine: "false"\n')
    with pytest.raises(ConfigError, match="`affine` must be true or false, got affine='false'"):
        NormConfig.load(path)
    path.write_text("slots:\n  bn1:\n    name: layernorm\n    affine: false\n")
    assert NormConfig.load(path)["bn1"].params == {"affine": False}
    with pytest.raises(ValueError, match="`affine` must be true or false"):
        autonorm.create_norm("layernorm", 8, affine="false")


def test_valid_parameters_still_load():
    choice = NormChoice.parse("batchnorm(eps=1e-05, momentum=None, track_running_stats=false)")
    assert choice.params == {"eps": 1e-05, "momentum": None, "track_running_stats": False}
    assert NormChoice.parse("batchnorm(momentum=0)").params == {"momentum": 0}
    layer = autonorm.create_norm("batchnorm", 8, momentum=1.0, eps=1e-3)
    assert (layer.momentum, layer.eps) == (1.0, 1e-3)


@pytest.mark.parametrize(
    "text",
    [
        "slots:\n  bn1: layernorm\n  bn2: batchnorm\n  bn1: groupnorm\n",
        "slots:\n  bn1:\n    name: groupnorm\n    groups: 2\n    groups: 4\n",
        "slots:\n  bn1: layernorm\nmetadata: {}\nslots:\n  bn1: batchnorm\n",
    ],
)
def test_a_duplicated_yaml_key_is_an_error(text, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"cfg.yaml' is not valid YAML: duplicated key '\w+'"):
        NormConfig.load(path)


def test_a_duplicated_json_key_is_an_error(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"slots": {"bn1": "layernorm", "bn1": "batchnorm"}}')
    with pytest.raises(ConfigError, match="cfg.json' is not valid JSON: duplicated key 'bn1'"):
        NormConfig.load(path)


def test_a_duplicated_key_in_a_search_space_file_is_an_error(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choices:\n  '*': [batchnorm]\n  '*': [layernorm]\n")
    with pytest.raises(ConfigError, match=r"space.yaml' is not valid YAML: duplicated key '\*'"):
        resolve_space(str(path))


# -- 11. YAML aliases ----------------------------------------------------------------------------


def alias_bomb(levels: int = 8) -> str:
    """A ~430-byte YAML whose aliases expand to 9**levels strings (PyYAML took 32 s and 1.3 GB
    on it in NormConfig.load)."""
    lines = ["a: &a [" + ",".join(['"layernorm"'] * 9) + "]"]
    for prev, cur in zip("abcdefgh"[: levels - 1], "bcdefghi"[: levels - 1], strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "schema_version: 1\nmetadata:\n  " + "\n  ".join(lines) + "\nslots:\n  bn1: layernorm\n"


def test_a_config_with_aliases_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 500
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml' is not valid YAML: aliases \(\*a\)"):
        NormConfig.load(path)
    assert time.perf_counter() - started < 0.5
    path.write_text("slots:\n  bn1: &x layernorm\n  bn2: *x\n")  # even a harmless one
    with pytest.raises(ConfigError, match="aliases"):
        NormConfig.load(path)


def test_a_search_space_with_aliases_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("choices:\n  'a.*': &c [batchnorm, layernorm]\n  'b.*': *c\n")
    with pytest.raises(ConfigError, match=r"space.yaml' is not valid YAML: aliases \(\*c\)"):
        resolve_space(str(path))


def test_show_on_an_alias_bomb_ends_at_once_with_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    started = time.perf_counter()
    result = cli(["show", str(path)], tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "aliases (*a) are not allowed" in lines[0], lines
    assert time.perf_counter() - started < 30  # the interpreter's start; the load is instant


# -- 12. study names as folders ------------------------------------------------------------------


def test_report_keeps_hostile_study_names_inside_the_default_folder(tmp_path):
    db = tmp_path / "shared" / "studies.db"
    db.parent.mkdir()
    storage = f"sqlite:///{db}"
    autonorm.search(
        TinyConvNet,
        TinyDataModule(),
        n_trials=1,
        space="minimal",
        trainer_kwargs={"max_epochs": 1},
        storage=storage,
        study_name="../evil",
        out_dir=tmp_path / "first",
        warm_start=False,
        seed=0,
    )
    outside = tmp_path / "outside"
    optuna.copy_study(
        from_study_name="../evil",
        from_storage=storage,
        to_storage=storage,
        to_study_name=str(outside),
    )
    work = tmp_path / "work"
    work.mkdir()
    for name in ("../evil", str(outside)):
        result = cli(["report", storage, "--study-name", name], work)
        assert result.returncode == 0, result.stderr[-2000:]
    assert not (work / "evil").exists() and not outside.exists()
    folders = sorted(p.name for p in (work / "autonorm-runs").iterdir())
    assert len(folders) == 2 and all("/" not in f and not f.startswith(".") for f in folders)
    for folder in folders:
        assert (work / "autonorm-runs" / folder / "report.html").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["autonorm-runs"]


@pytest.mark.parametrize(
    "name", ["../evil", "/tmp/x", "..", ".", "", "a/../../b", "a\\b", "x" * 300]
)
def test_safe_folder_name_stays_one_folder_inside(name, tmp_path):
    folder = safe_folder_name(name)
    assert (tmp_path / folder).resolve().parent == tmp_path.resolve()
    assert folder and not folder.startswith(".") and len(folder) < 120
    assert safe_folder_name(name.replace("/", "_")) != folder or "/" not in name


# -- 14. model class, dashboard host, sys.exit, ws/wn checkpoints, fused finalize ----------------


def test_a_config_for_another_model_class_is_refused_unless_told(tmp_path):
    config = NormConfig(
        {"bn1": "groupnorm", "bn2": "groupnorm", "head_norm": "layernorm"},
        metadata={"model_class": "tests.models.FusedNormNet"},
    )
    with pytest.raises(
        ConfigError, match=r"made for tests.models.FusedNormNet, not for .*TinyConv"
    ):
        autonorm.apply_config(TinyConvNet(), config)
    model = autonorm.apply_config(TinyConvNet(), config, check_model=False)
    assert isinstance(model.bn1, torch.nn.GroupNorm)
    own = NormConfig(config.choices, metadata={"model_class": "tests.lightning_models.TinyConvNet"})
    assert isinstance(
        autonorm.apply_config(NoExampleNet(), own).bn1, torch.nn.GroupNorm
    )  # subclass
    script = NormConfig(config.choices, metadata={"model_class": "__main__.TinyConvNet"})
    assert isinstance(autonorm.apply_config(TinyConvNet(), script).bn1, torch.nn.GroupNorm)
    path = config.save(tmp_path / "other.yaml")
    trainer = tiny_trainer(tmp_path, [AutoNorm(config=path)], max_epochs=1)
    with pytest.raises(ConfigError, match="check_model=False"):
        trainer.fit(TinyConvNet(), datamodule=TinyDataModule())
    model = TinyConvNet()
    tiny_trainer(tmp_path, [AutoNorm(config=path, check_model=False)], max_epochs=1).fit(
        model, datamodule=TinyDataModule()
    )
    assert isinstance(model.bn2, torch.nn.GroupNorm)


def _dashboard_output(target: str, host: str, tmp_path: Path) -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / f"dashboard-{host}.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [AUTONORM, "dashboard", target, "--host", host, "--port", str(port)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=tmp_path,
        )
    try:
        deadline = time.time() + 60
        while "optuna-dashboard on" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return log.read_text()


def test_dashboard_warns_on_a_host_others_can_reach(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=storage, study_name="s")
    printed = _dashboard_output(storage, "0.0.0.0", tmp_path)
    assert "warning: the dashboard has no authentication" in printed, printed
    assert "no authentication" not in _dashboard_output(storage, "127.0.0.1", tmp_path)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
     ("myhost.example", False)],
)  # fmt: skip
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


class ExitingNet(TinyConvNet):
    def training_step(self, batch, batch_idx):
        if self.hparams.fail_with == "exit":
            sys.exit(1)
        if self.hparams.fail_with == "ctrl-c":
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


def test_sys_exit_in_user_code_is_no_interrupt_but_lightnings_ctrl_c_is(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    caught = {}
    for kind in ("exit", "ctrl-c"):
        trainer = tiny_trainer(tmp_path, [], max_epochs=1)
        try:
            with pytest.raises(SystemExit) as err:
                trainer.fit(ExitingNet(fail_with=kind), datamodule=TinyDataModule())
        finally:
            signal.signal(signal.SIGINT, previous)  # Lightning ignores SIGINT after a Ctrl-C
        caught[kind] = workers.as_interrupt(err.value)
    assert caught["exit"] is None
    assert caught["ctrl-c"] is not None and caught["ctrl-c"].signum == signal.SIGINT


EXIT_MODULE = """
import sys
from usermodels import Data, Net


class ExitNet(Net):
    def training_step(self, batch, batch_idx):
        sys.exit(1)
"""


def test_a_trial_calling_sys_exit_fails_with_its_reason_and_is_not_retried(workdir, tmp_path):
    (workdir / "exitmodels.py").write_text(EXIT_MODULE)
    out = tmp_path / "out"
    args = [
        "search", "--model", "exitmodels.ExitNet", "--data", "exitmodels.Data",
        "--trainer.max_epochs", "1", "--search.space", "minimal", "--search.n_trials", "2",
        "--search.warm_start", "false", "--search.out_dir", str(out),
    ]  # fmt: skip
    result = cli(args, workdir)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "sys.exit(1)" in result.stderr and "interrupted" not in result.stderr
    study = optuna.load_study(
        study_name="autonorm-ExitNet", storage=f"sqlite:///{out / 'study.db'}"
    )
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "called sys.exit(1)" in trial.user_attrs["fail_reason"]
    assert "retry_of" not in trial.user_attrs


class NoExampleNet(TinyConvNet):
    """A model without ``example_input_array``: no probe finds the layers feeding its slots."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.example_input_array = None


def test_load_from_checkpoint_restores_ws_wn_without_example_input(tmp_path):
    config = NormConfig({"bn1": "groupnorm+ws", "bn2": "batchnorm+wn", "head_norm": "layernorm"})
    callback = AutoNorm(config=config, example_input=torch.zeros(4, 2, 16))
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    trained = NoExampleNet()
    trainer.fit(trained, datamodule=TinyDataModule())
    trainer.save_checkpoint(tmp_path / "ws.ckpt")
    loaded = autonorm.load_from_checkpoint(NoExampleNet, tmp_path / "ws.ckpt")
    assert weight_norm_of(loaded.conv1) == "ws"
    assert weight_norm_of(loaded.conv2) == "wn"
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))


class BatchNormAct1d(torch.nn.BatchNorm1d):
    """A fused norm+activation layer (timm style): batch norm, then its ``act`` child."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class FusedActNet(TinyConvNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bn1 = BatchNormAct1d(self.hparams.width)

    def forward(self, x):
        x = self.bn1(self.conv1(x))  # the fused layer applies the ReLU itself
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(self.head_norm(x.mean(-1)))


def test_finalize_recalibrates_fused_norm_activation_slots(tmp_path):
    callback = AutoNorm(mode="learn", finalize=True, candidates=("batch",), include="bn1")
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=1)
    model = FusedActNet()
    trainer.fit(model, datamodule=TinyDataModule())
    assert callback.config["bn1"].name == "batchnorm"
    bn = model.bn1.norm  # the new BatchNorm inside the fused slot, its ReLU kept after it
    assert type(bn) is torch.nn.BatchNorm1d and isinstance(model.bn1.act, torch.nn.ReLU)
    data = TinyDataModule()
    data.setup()
    with torch.no_grad():  # the 6 training batches, all used (finalize_batches=20)
        inputs = model.conv1(data.train_set.tensors[0])
    assert int(bn.num_batches_tracked) == 6
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2)), atol=1e-5, rtol=1e-4)
