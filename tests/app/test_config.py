from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import FEDWS, REPO

from app.config import ConfigError, apply_overrides, build, dump_config, load_config, yaml_load
from app.rundir import read_config
from app.tools.cli import main

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_quickstart_is_fashion_mnist_ws_gn_dirichlet():
    cfg = load_config(QUICKSTART)
    assert cfg.data.dataset == "fashion_mnist"
    assert cfg.data.partition.kind == "dirichlet"
    assert cfg.data.partition.alpha == 0.3
    assert cfg.data.partition.num_clients == 10
    assert (cfg.model.arch, cfg.model.norm) == ("cnn", "ws_gn")
    assert cfg.federation.strategy == "fedavg"


def test_configs_are_frozen():
    cfg = build({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.partition.alpha = 1.0


def test_overrides_parse_yaml_values_and_replace_whole_mappings():
    cfg = load_config(
        QUICKSTART,
        [
            "data.partition.alpha=0.1",
            "seed=7",
            "model.width=null",
            "federation.fraction_train=1",
            "data.partition={kind: pathological, classes_per_client: 3}",
        ],
    )
    assert cfg.seed == 7
    assert cfg.model.width is None
    assert cfg.federation.fraction_train == 1.0 and isinstance(cfg.federation.fraction_train, float)
    # the mapping replaced the quickstart's partition entirely: defaults elsewhere
    assert cfg.data.partition.kind == "pathological"
    assert cfg.data.partition.classes_per_client == 3
    assert cfg.data.partition.num_clients == 10 and cfg.data.partition.alpha is None
    assert cfg.data.partition.concentration == 0.5  # the default when dirichlet leaves it null


def test_overrides_do_not_mutate_their_input():
    raw = {"data": {"partition": {"alpha": 1.0}}}
    apply_overrides(raw, ["data.partition.alpha=2.0"])
    assert raw["data"]["partition"]["alpha"] == 1.0


def test_resolved_config_round_trips_through_yaml():
    cfg = load_config(QUICKSTART, ["data.partition={kind: feature}"])
    assert build(yaml.safe_load(dump_config(cfg))) == cfg


MALFORMED = [
    ("data.partition.alpha=0", "data.partition.alpha", "must be > 0"),
    ("data.partition.alpha=-1", "data.partition.alpha", "must be > 0"),
    ("data.partition.num_clients=0", "data.partition.num_clients", "must be >= 1"),
    ("data.partition.num_clients=2.5", "data.partition.num_clients", "expected integer"),
    ("federation.fraction_train=0", "federation.fraction_train", "(0, 1]"),
    ("federation.fraction_train=1.5", "federation.fraction_train", "(0, 1]"),
    ("federation.fraction_evaluate=-0.1", "federation.fraction_evaluate", "(0, 1]"),
    (
        "model.norm=batchnorm",
        "model.norm",
        "allowed: none, bn, fixbn, gn, ln, ws_gn, ws_bn, nf, nf_se",
    ),
    ("model.arch=vgg", "model.arch", "allowed: cnn, resnet20"),
    ("data.dataset=mnist", "data.dataset", "allowed: fashion_mnist"),
    ("data.partition.kind=label", "data.partition.kind", "allowed: iid, dirichlet"),
    ("federation.strategy=scaffold", "federation.strategy", "allowed: fedavg"),
    ("data.partiton.kind=iid", "data.partiton", "unknown key; allowed here: dataset, root"),
    ("model.depth=20", "model.depth", "unknown key"),
    ("seed=zero", "seed", "expected integer"),
    ("seed=true", "seed", "expected integer"),
    ("optim.nesterov=1", "optim.nesterov", "expected boolean"),
    ("optim.lr=fast", "optim.lr", "expected number"),
    ("data.partition=iid", "data.partition", "expected mapping"),
    ("train.precision=8-true", "train.precision", "allowed: 32-true"),
    ("federation.min_clients=11", "federation.min_clients", "must be <= data.partition"),
    ("server.calibration_samples=0", "server.calibration_samples", "must be >= 1"),
    ("server.bn_recalibration=maybe", "server.bn_recalibration", "expected boolean"),
]


@pytest.mark.parametrize(("override", "field", "message"), MALFORMED)
def test_malformed_value_is_one_line_and_exit_code_2(override, field, message, capsys, tmp_path):
    code = main(["partitions", str(QUICKSTART), "-o", str(tmp_path), "--set", override])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"fedws: config error: {field}: ")
    assert message in err
    assert not (tmp_path / "partitions.csv").exists()


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ("seed: [1, 2\n", "bad.yaml:", "invalid YAML"),
        ("- a\n- b\n", "bad.yaml", "must be a mapping"),
        ("data:\n  partition:\n    alpha: -0.5\n", "data.partition.alpha", "must be > 0"),
    ],
)
def test_malformed_file_is_one_line_and_exit_code_2(text, field, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["partitions", str(path), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and message in err


def test_missing_config_file_and_bad_set_syntax(tmp_path, capsys):
    assert main(["partitions", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["partitions", str(QUICKSTART), "--set", "seed"]) == 2
    assert "expected key.path=value" in capsys.readouterr().err


def test_config_error_names_field():
    with pytest.raises(ConfigError) as info:
        build({"optim": {"name": "sgd", "momentum": 1.0}})
    assert info.value.field == "optim.momentum"


def test_console_script_exits_with_code_2():
    proc = subprocess.run(
        [*FEDWS, "partitions", str(QUICKSTART), "--set", "seed=x"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fedws: config error: seed: expected integer, got 'x'"
    ]
    assert "Traceback" not in proc.stderr


def test_the_run_seed_draws_the_data_unless_the_partition_seed_pins_it():
    follows = [load_config(QUICKSTART, [f"seed={s}"]) for s in (0, 3)]
    assert [c.data.partition.seed for c in follows] == [0, 3]
    pinned = [load_config(QUICKSTART, [f"seed={s}", "data.partition.seed=7"]) for s in (0, 3)]
    assert [c.data.partition.seed for c in pinned] == [7, 7]
    # the resolved config is written with the number it used, and reloads to the same config
    assert build(yaml.safe_load(dump_config(follows[1]))) == follows[1]


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 0.001), ("1E-3", 0.001), ("5e+2", 500.0), ("-2.5e1", -25.0), ("1.0e-5", 1e-5)],
)
def test_numbers_are_read_as_yaml_1_2_reads_them(text, value):
    cfg = load_config(QUICKSTART, [f"optim.lr={text}".replace("=-", "=")] if value > 0 else [])
    if value > 0:
        assert cfg.optim.lr == value and isinstance(cfg.optim.lr, float)
    assert yaml_load(f"x: {text}") == {"x": value}
    assert yaml_load("x: 1e3x") == {"x": "1e3x"} and yaml_load("x: '1e-3'") == {"x": "1e-3"}


IGNORED = [
    ("data.partition={kind: iid, alpha: 0.5}", "data.partition.alpha", "kind iid"),
    ("data.partition={kind: iid, classes_per_client: 3}", "classes_per_client", "kind iid"),
    ("data.partition={kind: dirichlet, shards_per_client: 3}", "shards_per_client", "dirichlet"),
    ("data.partition={kind: pathological, balanced: false}", "balanced", "pathological"),
    ("data.partition={kind: iid, min_partition_size: 3}", "min_partition_size", "kind iid"),
    ("data.partition={kind: iid, feature: {noise_std: 0.1}}", "data.partition.feature", "iid"),
    ("federation.proximal_mu=0.1", "federation.proximal_mu", "strategy fedavg"),
    ("federation.server_learning_rate=0.5", "server_learning_rate", "strategy fedavg"),
    ("federation.server_momentum=0.5", "federation.server_momentum", "strategy fedavg"),
    ("federation.eta=0.5", "federation.eta", "strategy fedavg"),
    ("model.fixbn_round=3", "model.fixbn_round", "norm: fixbn"),
]


@pytest.mark.parametrize(("override", "field", "why"), IGNORED)
def test_a_setting_the_kind_or_strategy_ignores_is_refused(override, field, why):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, [override])
    assert field in str(err.value) and why in str(err.value)


def test_the_settings_a_strategy_or_kind_uses_are_accepted_with_defaults_when_null():
    prox = load_config(QUICKSTART, ["federation.strategy=fedprox", "federation.proximal_mu=0.1"])
    assert prox.federation.strategy_options() == {"proximal_mu": 0.1}
    assert load_config(QUICKSTART, ["federation.strategy=fedprox"]).federation.mu == 0.01
    avgm = load_config(QUICKSTART, ["federation.strategy=fedavgm"]).federation
    assert (avgm.server_lr, avgm.momentum) == (1.0, 0.9)
    fix = load_config(QUICKSTART, ["model.norm=fixbn", "federation.rounds=9"])
    assert fix.bn_statistics_frozen_after == 4
    fix3 = load_config(QUICKSTART, ["model.norm=fixbn", "model.fixbn_round=3"])
    assert fix3.bn_statistics_frozen_after == 3
    with pytest.raises(ConfigError, match=r"fixbn_round: must be <= federation\.rounds"):
        load_config(QUICKSTART, ["model.norm=fixbn", "model.fixbn_round=30"])


def test_a_config_written_by_an_earlier_fedws_with_every_setting_still_reads(tmp_path):
    old = load_config(QUICKSTART).to_dict()
    old["federation"].update(proximal_mu=0.01, server_learning_rate=1.0, server_momentum=0.9)
    old["data"]["partition"].update(classes_per_client=2, shards_per_client=2)
    old["data"]["partition"]["feature"] = {"noise_std": 0.3, "contrast": 0.5, "rotation": 30.0}
    old["faults"] = old.pop("fault_injection")  # the names before 0.2
    old["server"]["tensorboard"] = True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    now = load_config(QUICKSTART, ["logging.loggers=[csv, tensorboard]"])
    assert read_config(path) == now
    with pytest.raises(ConfigError):
        load_config(path)  # as a user's config, the unused settings are refused


def test_resuming_a_run_folder_written_before_0_2_reads_its_own_config(tmp_path, capsys):
    import argparse

    from app.tools.cli import _run_config

    old = load_config(QUICKSTART).to_dict()
    old["federation"].update(proximal_mu=0.01, server_learning_rate=1.0)  # unused, as written
    old["faults"] = old.pop("fault_injection")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))

    def args(resume: bool, out: Path | None = tmp_path) -> argparse.Namespace:
        return argparse.Namespace(
            config=str(tmp_path / "config.yaml"), overrides=[], out=out and str(out), resume=resume
        )

    assert _run_config(args(resume=True)) == read_config(tmp_path / "config.yaml")
    assert "faults: read as fault_injection" in capsys.readouterr().err
    for refused in (args(resume=False), args(resume=True, out=tmp_path / "elsewhere")):
        with pytest.raises(ConfigError, match="is not used by strategy fedavg"):
            _run_config(refused)  # as a user's config: the unused settings are refused


def test_server_tensorboard_with_a_null_logging_section_reads(tmp_path):
    raw = {"server": {"tensorboard": True}, "logging": None}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(tmp_path / "c.yaml").logging.loggers == ("csv", "tensorboard")


def test_a_user_config_under_the_names_before_0_2_reads_with_a_line_per_rename(tmp_path, capsys):
    old = load_config(QUICKSTART).to_dict()
    old["faults"] = old.pop("fault_injection")
    old["faults"]["fail_clients"] = [1]
    old["faults"]["rounds"] = [2]
    old["server"]["tensorboard"] = True
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    cfg = load_config(path)
    assert cfg.fault_injection.fail_clients == (1,) and cfg.fault_injection.rounds == (2,)
    assert cfg.logging.loggers == ("csv", "tensorboard")
    err = capsys.readouterr().err
    assert "faults: read as fault_injection" in err and "server.tensorboard" in err
    old["server"]["tensorboard"] = False
    path.write_text(yaml.safe_dump(old))
    assert load_config(path).logging.loggers == ("csv",)
    path.write_text(yaml.safe_dump({**old, "fault_injection": old["faults"]}))
    with pytest.raises(ConfigError, match="faults: unknown key"):
        load_config(path)  # both names: the old one is not read over the new


def test_a_string_that_looks_like_a_number_survives_a_save_and_a_reload():
    cfg = load_config(QUICKSTART, ["logging.experiment='1e5'"])
    assert cfg.logging.experiment == "1e5"
    assert build(yaml_load(dump_config(cfg))) == cfg
