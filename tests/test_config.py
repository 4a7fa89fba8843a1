"""Run configuration: recipes, overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest

from mimkd.config import RECIPES, load_config, parse_override
from mimkd.engine.recipe import lr_at
from mimkd.errors import ConfigError

BASE = {"student": {"arch": "resnet8x4"}, "data": {"name": "cifar100"}}


def test_cifar_recipe_fills_repdistiller_defaults():
    cfg = load_config(base=BASE).resolved()
    o = cfg.optim
    assert (o.recipe, o.optimizer, o.lr, o.momentum, o.weight_decay) == ("cifar", "sgd", 0.05, 0.9, 5e-4)
    assert (o.batch_size, o.epochs, o.milestones, o.gamma) == (64, 240, [150, 180, 210], 0.1)


@pytest.mark.parametrize("arch", ["MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_cifar_recipe_small_lr_for_mobile_students(arch):
    cfg = load_config(base={**BASE, "student": {"arch": arch}}).resolved()
    assert cfg.optim.lr == 0.01


def test_user_values_win_over_recipe_and_recipe_follows_dataset():
    cfg = load_config(base=BASE, overrides=["optim.lr=0.2", "optim.epochs=3"]).resolved()
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (0.2, 3, 64)
    fm = load_config(base={"student": {"arch": "conv4mp"}, "data": {"name": "fashion_mnist"}}).resolved()
    assert fm.optim.recipe == "fashion_mnist" and fm.optim.epochs == RECIPES["fashion_mnist"]["epochs"]
    inet = load_config(base={"student": {"arch": "resnet18"}, "data": {"name": "imagenet"}}).resolved()
    assert (inet.optim.epochs, inet.optim.lr, inet.optim.milestones, inet.optim.batch_size) == (
        90,
        0.1,
        [30, 60],
        256,
    )


def test_step_schedule_matches_repdistiller_epoch_rule():
    cfg = load_config(base=BASE).resolved().optim
    # RepDistiller: 1-based epoch e uses lr * 0.1^{#(e > m)}; our 0-based epoch 150 is its epoch 151.
    assert lr_at(cfg, 149, 0, 100) == pytest.approx(0.05)
    assert lr_at(cfg, 150, 0, 100) == pytest.approx(0.005)
    assert lr_at(cfg, 180, 5, 100) == pytest.approx(0.0005)
    assert lr_at(cfg, 239, 99, 100) == pytest.approx(0.00005)


def test_cosine_schedule_is_pure_function_of_position():
    cfg = (
        load_config(base={"student": {"arch": "conv4mp"}, "data": {"name": "fashion_mnist"}}).resolved().optim
    )
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(cfg.lr)
    assert lr_at(cfg, cfg.epochs // 2, 0, 10) == pytest.approx(cfg.lr / 2)
    assert lr_at(cfg, 3, 7, 10) == lr_at(cfg, 3, 7, 10)


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"optim\.lrr: unknown key\. Did you mean: lr"):
        load_config(base=BASE, overrides=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"epochz: unknown key"):
        load_config(base={**BASE, "epochz": 3})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"optim\.epochs: .*integer.*'many'"):
        load_config(base=BASE, overrides=["optim.epochs=many"])
    with pytest.raises(ConfigError, match=r"data\.train_fraction"):
        load_config(base=BASE, overrides=["data.train_fraction=1.5"])


def test_unknown_method_and_method_option_typos():
    with pytest.raises(ConfigError, match=r"method\.name: unknown method 'kdd'.*Did you mean: kd"):
        load_config(base={**BASE, "method": {"name": "kdd"}})
    with pytest.raises(ConfigError, match=r"method\.temprature: unknown option of 'kd'.*temperature"):
        load_config(base={**BASE, "method": {"name": "kd"}}, overrides=["method.temprature=2"])
    with pytest.raises(ConfigError, match=r"method\.temperature"):
        load_config(base={**BASE, "method": {"name": "kd", "temperature": -1}})


def test_unknown_recipe():
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifarr'.*cifar"):
        load_config(base=BASE, overrides=["optim.recipe=cifarr"])


def test_yaml_file_and_override_precedence(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("student: {arch: resnet20}\ndata: {name: cifar100}\noptim: {lr: 0.3, epochs: 7}\n")
    cfg = load_config(f, ["optim.epochs=9"], base={"seed": 4}).resolved()
    assert (cfg.student.arch, cfg.optim.lr, cfg.optim.epochs, cfg.seed) == ("resnet20", 0.3, 9, 4)
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("optim.lr")
