"""Config: the strict schema, key paths in errors, overrides, the CLI's validate command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raypipe.config import ConfigError, load_config, parse_config, to_yaml
from raypipe.errors import UserError
from raypipe.tracking import resolve_tracking_uri

PIPELINES = sorted(Path(__file__).parent.parent.joinpath("pipelines").glob("*.yaml"))
BASE = {
    "name": "t",
    "data": {
        "unlabeled": {"path": "u"},
        "labeled": {"train": {"path": "a"}, "validation": {"path": "b"}},
    },
    "pretrain": {"max_steps": 10},
    "finetune": {"sweep": {"space": {"lr": {"loguniform": [1e-5, 1e-3]}}}},
}


def _with(**changes) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        node = raw
        *parents, last = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def _problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.problems


def test_shipped_pipelines_exist():
    assert any(p.name == "quickstart.yaml" for p in PIPELINES)


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path):
    cfg = load_config(path)
    assert cfg.name
    # The resolved config round-trips through YAML to the same config.
    assert parse_config(yaml.safe_load(to_yaml(cfg))) == cfg


def test_defaults_are_resolved():
    cfg = parse_config(_with(model={"max_len": 64}))
    assert cfg.pretrain.seq_len == 64
    assert cfg.finetune.max_len == 64
    assert cfg.finetune.compare_scratch is True
    assert cfg.tracking.experiment == "t" and cfg.tracking.registered_model == "t"


def test_misspelt_key_names_path_and_suggests():
    problems = _problems(_with(pretrain={"max_steps": 5, "optimzer": {"lr": 1e-3}}))
    assert problems == ["pretrain.optimzer: unknown key; did you mean 'optimizer'?"]


def test_unknown_key_without_near_miss_lists_known_keys():
    (problem,) = _problems(_with(model={"zzz": 1}))
    assert problem.startswith("model.zzz: unknown key; known keys:") and "'dim'" in problem


def test_all_problems_reported_together():
    problems = _problems(
        _with(pretrain={"max_steps": -1, "batch_size": "big"}, model={"dropout": 1.5})
    )
    assert len(problems) == 3
    assert any(p.startswith("pretrain.max_steps: ") and "(got -1)" in p for p in problems)
    assert any(p.startswith("pretrain.batch_size: ") for p in problems)
    assert any(p.startswith("model.dropout: ") for p in problems)


def test_negative_learning_rate_is_rejected():
    (problem,) = _problems(_with(pretrain={"max_steps": 3, "optimizer": {"lr": -1}}))
    assert problem.startswith("pretrain.optimizer.lr: ") and "greater than 0" in problem


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"model": {"dim": 64, "heads": 3}}, "model.heads: must divide model.dim (64), got 3"),
        ({"pretrain": None}, "finetune.init: 'pretrain' needs a pretrain stage"),
        ({"pretrain": {"max_steps": 1, "objective": "causal_llm"}}, "did you mean 'causal_lm'?"),
        (
            {"pretrain": {"max_steps": 1, "seq_len": 999}},
            "pretrain.seq_len: must be <= model.max_len",
        ),
        (
            {"finetune": {"sweep": {"space": {"lrr": {"uniform": [0, 1]}}}}},
            "finetune.sweep.space.lrr: not a tunable setting; did you mean 'lr'?",
        ),
        (
            {"finetune": {"sweep": {"metric": "val/f1"}}},
            "finetune.sweep.metric: 'val/f1' is not reported",
        ),
        (
            {"finetune": {"init": "scratch", "compare_scratch": True}},
            "finetune.compare_scratch: has no effect",
        ),
        (
            {"finetune": {"init": "/no/such/checkpoint"}},
            "checkpoint directory '/no/such/checkpoint' does not exist",
        ),
        ({"finetune": {"init": "/"}}, "takes the place of this pipeline's pretrain stage"),
        (
            {"data": {"labeled": {"train": {"path": "a"}, "validation": {"path": "b"}}}},
            "data.unlabeled: required by the pretrain stage",
        ),
        ({"model": {"type": "transfomer"}}, "did you mean 'transformer'?"),
        (
            {"pretrain": {"max_steps": 1, "scaling": {"num_workers": 2, "in_process": True}}},
            "pretrain.scaling: in_process: true trains one CPU worker in this process",
        ),
        (
            {"data": {"unlabeled": {"path": []}, "labeled": BASE["data"]["labeled"]}},
            "data.unlabeled.path: must be a path or a non-empty list of paths (got [])",
        ),
        (
            {"pretrain": {"max_steps": 1, "strategy": "fsdp", "scaling": {"in_process": True}}},
            "pretrain: strategy: fsdp shards the model over worker processes",
        ),
    ],
)
def test_cross_field_rules(changes, expected):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.update(changes)
    if raw["pretrain"] is None:
        del raw["pretrain"]
    problems = _problems(raw)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("space", "fragment"),
    [
        ({"lr": {"loguniform": [1e-3, 1e-5]}}, "low < high"),
        ({"lr": {"loguniform": [1e-5, 1e-3], "choice": [1]}}, "give exactly one of"),
        ({"lr": {"normal": [0, 1]}}, "finetune.sweep.space.lr.normal: unknown key"),
        ({"batch_size": {"choice": []}}, "choice needs at least one value"),
        ({"lr": {"grid": [1e-3, "fast"]}}, "space.lr: 'fast' is not a valid lr"),
        ({"dropout": {"uniform": [0.1, 1.5]}}, "space.dropout: 1.5 is not a valid dropout"),
        ({"batch_size": {"choice": [16, 0]}}, "space.batch_size: 0 is not a valid batch_size"),
        ({"freeze_backbone": {"grid": ["maybe"]}}, "'maybe' is not a valid freeze_backbone"),
    ],
)
def test_bad_search_space(space, fragment):
    problems = _problems(_with(finetune={"sweep": {"space": space}}))
    assert any(fragment in p for p in problems), problems


def test_search_space_values_are_read_as_their_setting():
    # YAML reads 1e-3 (no dot) as a string; the sweep must still get a number.
    raw = _with(finetune={"sweep": {"space": {"lr": {"grid": ["1e-3", 3.0e-4]},
                                              "batch_size": {"choice": ["16", 32]}}}})  # fmt: skip
    space = parse_config(raw).finetune.sweep.space
    assert space["lr"].grid == [0.001, 0.0003]
    assert space["batch_size"].choice == [16, 32]


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE))
    cfg = load_config(
        path,
        [
            "pretrain.optimizer.lr=5e-4",
            "finetune.sweep.num_samples=7",
            "pretrain.scaling.use_gpu=true",
        ],
    )
    assert cfg.pretrain.optimizer.lr == 5e-4
    assert cfg.finetune.sweep.num_samples == 7
    assert cfg.pretrain.scaling.use_gpu is True


def test_exponent_numbers_without_a_dot_are_numbers_even_in_options(tmp_path):
    # PyYAML (YAML 1.1) would hand `1e-3` to an objective as the string "1e-3".
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE) + "\n")
    cfg = load_config(path, ["pretrain.options={subsample: 1e-3, power: -2E+1}"])
    assert cfg.pretrain.options == {"subsample": 0.001, "power": -20.0}
    assert load_config(path, ["name=1e"]).name == "1e"  # not a number: left a string


def test_override_of_unknown_key_is_caught(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(
        ConfigError, match=r"pretrain\.max_step: unknown key; did you mean 'max_steps'"
    ):
        load_config(path, ["pretrain.max_step=3"])
    with pytest.raises(ConfigError, match="use key.path=value"):
        load_config(path, ["pretrain.max_steps"])


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: {dim: 3\n")
    with pytest.raises(UserError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, str(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(None, str(tmp_path)) == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("http://explicit:5000", str(tmp_path)) == "http://explicit:5000"
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///rel.db", "x") == f"sqlite:///{tmp_path / 'rel.db'}"


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "raypipe", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_validate_rejects_misspelt_key_and_starts_nothing(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw["storage"] = str(tmp_path / "runs")
    raw["pretrain"]["batchsize"] = 4
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    proc = _cli("validate", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "raypipe: error: p.yaml: pretrain.batchsize: unknown key; did you mean 'batch_size'?"
    )
    assert not (tmp_path / "runs").exists()
    assert "Traceback" not in proc.stderr


def test_cli_validate_checks_data_paths(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    proc = _cli("validate", "p.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.unlabeled.path: data path 'u' does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_validate_quickstart_succeeds(tmp_path):
    root = Path(__file__).parent.parent
    proc = _cli("validate", str(root / "pipelines" / "quickstart.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["name"] == "quickstart"
    assert not (tmp_path / "data").exists()  # validate generates nothing


# --- plan: the build checks that need the registered classes --------------------------------


def _plan_error(raw) -> str:
    from raypipe.plan import make_plan

    with pytest.raises(UserError) as info:
        make_plan(parse_config(raw))
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"pretrain__objective": "masked_image"}, "needs a model with .*model.type: vit"),
        ({"pretrain__objective": "clip", "model__type": "vit"}, "model.type: clip"),
        ({"pretrain__options": {"mask_prob": 0.2}}, r"pretrain.options: unknown option\(s\) \['mask_prob'\]"),
        ({"pretrain__objective": "masked_lm", "pretrain__options": {"mask_prob": 1.5}}, "mask_prob must be in"),
        ({"finetune__task": "regression", "finetune__num_classes": 3, "finetune__sweep__metric": "val/mse"}, "finetune.num_classes: task 'regression' does not use it"),
        ({"finetune__input": "image"}, "finetune.input: model 'transformer' reads \\['text'\\]"),
        ({"finetune__options": {"beam": 4}}, r"finetune.options: unknown option\(s\) \['beam'\]"),
        ({"model__type": "vit", "model__patch_size": 5, "pretrain__objective": "masked_image"}, "patch_size \\(5\\) must divide"),
        ({"model__type": "cnn", "pretrain__objective": "gan", "model__image_size": 20, "finetune__input": "image"}, "divisible by 8"),
        ({"model": {"type": "cnn", "heads": 8}, "pretrain__objective": "simclr"}, "model.heads: model 'cnn' does not use heads"),
        ({"model": {"type": "vit", "max_len": 8, "patch_size": 8}, "pretrain__objective": "masked_image"}, "model.max_len: model 'vit' does not use max_len"),
    ],
)  # fmt: skip
def test_plan_rejects_what_cannot_be_built(changes, expected):
    import re

    message = _plan_error(_with(**changes))
    assert re.search(expected, message), message
    assert "\n" not in message


def test_sweep_metric_and_mode_default_from_the_task():
    cfg = parse_config(_with(finetune__task="regression"))
    assert (cfg.finetune.sweep.metric, cfg.finetune.sweep.mode) == ("val/mse", "min")
    cfg = parse_config(_with(finetune__task="translation"))
    assert (cfg.finetune.sweep.metric, cfg.finetune.sweep.mode) == ("val/bleu", "max")


def test_plan_picks_columns_and_tokenizer_need():
    from raypipe.plan import make_plan

    plan = make_plan(parse_config(_with(
        model={"type": "clip"}, pretrain__objective="clip", finetune__input="image",
        data__unlabeled__text_column="caption",
    )))  # fmt: skip
    cfg_src = parse_config(_with(data__unlabeled__text_column="caption")).data
    assert plan.pretrain_columns(cfg_src.unlabeled) == ["image", "caption"]
    assert plan.labeled_columns(cfg_src.labeled.train) == ["image", "label"]
    assert plan.needs_tokenizer()
    images_only = make_plan(parse_config(_with(
        model={"type": "cnn"}, pretrain__objective="simclr", finetune__input="image",
    )))  # fmt: skip
    assert not images_only.needs_tokenizer()


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"search": "optuna", "space": {"lr": {"grid": [1e-4, 1e-3]}}}, "optuna cannot search grid"),
        ({"scheduler": "pbt", "space": {}}, "pbt needs a search space"),
        ({"scheduler": "pbt", "search": "optuna"}, "use search: random with pbt"),
        ({"metric": "val/bleu"}, "not reported by task 'classification'"),
    ],
)  # fmt: skip
def test_sweep_rules(sweep, expected):
    raw = _with()
    raw["finetune"]["sweep"].update(sweep)
    assert any(expected in p for p in _problems(raw))


def test_own_objective_task_and_model_plug_in_by_reference():
    from raypipe.objectives.lm import MaskedLM
    from raypipe.plan import make_plan
    from raypipe.tasks.regression import Regression

    raw = _with(
        model={"type": "raypipe.models.transformer:Transformer"},
        pretrain__objective="raypipe.objectives.lm:MaskedLM",
        finetune__task="raypipe.tasks.regression:Regression",
    )
    raw["finetune"]["sweep"]["metric"] = "val/mse"
    plan = make_plan(parse_config(raw))
    assert plan.objective is MaskedLM and plan.task is Regression
    bad = _with(pretrain__objective="raypipe.objectives.lm:NoSuchThing")
    assert "cannot load objective" in _plan_error(bad)


def test_yaml_merge_keys_share_settings_and_own_keys_win():
    """`<<: *common` as in YAML (shipped several-task pipelines use it); a key given twice in
    the mapping itself is still refused."""
    from raypipe.config.yaml_file import parse_yaml

    text = "a: &c {x: 1, y: 2}\nb:\n  <<: *c\n  y: 3\n  z: 4\n"
    assert parse_yaml(text) == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3, "z": 4}}
    with pytest.raises(UserError, match="key 'y' is given twice"):
        parse_yaml("a: &c {x: 1}\nb:\n  <<: *c\n  y: 3\n  y: 4\n")
