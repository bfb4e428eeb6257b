"""Bad input through `raypipe run`: one line naming the cause and the fix, exit code 2, and no
Ray started when the problem can be seen up front (every case here but the image ones).

Each case writes a pipeline (and whatever broken file it needs) into its own directory, runs
the CLI in this process with Ray's start replaced by a failure, and reads stderr.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_pipeline_e2e import tiny_config

from raypipe import cli, localray, pipeline
from raypipe.config import parse_config
from raypipe.data.text import train_tokenizer
from raypipe.engine.checkpoint import save_checkpoint
from raypipe.errors import UserError
from raypipe.models import build_model
from raypipe.stages import connect

TEXTS = ["a fine film .", "a dull film .", "what a great cast", "not worth it"] * 8


def _shard(path: Path, **columns) -> str:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path / "part-0.parquet")
    return str(path)


def _checkpoint(root: Path, *, dim: int = 32, vocab: int = 300) -> str:
    """A pretrained-style checkpoint: a tiny transformer and its tokenizer."""
    tok = train_tokenizer(TEXTS, kind="bpe", vocab_size=vocab, lowercase=False)
    spec = {
        "type": "transformer",
        "config": {
            "vocab_size": tok.get_vocab_size(), "dim": dim, "num_layers": 1, "num_heads": 2,
            "max_len": 32, "pad_id": 0,
        },
    }  # fmt: skip
    save_checkpoint(
        root, module=build_model(spec), spec=spec, meta={"step": 1}, tokenizer_json=tok.to_str()
    )
    return str(root)


def _finetune_only(raw: dict, **finetune) -> dict:
    del raw["pretrain"]
    del raw["data"]["unlabeled"]
    raw["finetune"].update(finetune)
    return raw


class _Exploit:
    def __reduce__(self):
        return (print, ("code ran while loading",))


# Each case: (how to break a working tiny pipeline, what stderr must say).
def _malformed_yaml(d, raw):
    (d / "p.yaml").write_text("name: tiny\npretrain: {max_steps: 5\n")


def _unknown_key(d, raw):
    raw["pretrain"]["max_stesp"] = 5


def _wrong_type(d, raw):
    raw["pretrain"]["max_steps"] = "lots"


def _out_of_range(d, raw):
    raw["pretrain"]["optimizer"]["lr"] = -1


def _missing_data_path(d, raw):
    raw["data"]["unlabeled"]["path"] = str(d / "nowhere")


def _empty_directory(d, raw):
    (d / "empty").mkdir()
    raw["data"]["unlabeled"]["path"] = str(d / "empty")


def _corrupt_parquet(d, raw):
    (d / "bad").mkdir()
    (d / "bad" / "part-0.parquet").write_bytes(b"PAR1 this is not parquet")
    raw["data"]["unlabeled"]["path"] = str(d / "bad")


def _missing_column(d, raw):
    raw["data"]["unlabeled"]["path"] = _shard(d / "u", body=TEXTS)


def _test_split_missing_column(d, raw):
    raw["data"]["labeled"]["test"] = {"path": _shard(d / "t", body=TEXTS[:4], label=[0, 1, 0, 1])}


def _label_maps_differ(d, raw):
    """Train and test prepared apart from string labels: 'neg'/'pos' vs 'neg'/'neutral'."""
    from raypipe.data.prepare import prepare

    for split, names in (("train", ["neg", "pos"]), ("test", ["neg", "neutral"])):
        f = d / f"{split}.tsv"
        f.write_text("sentence\tlabel\n" + "".join(f"{t}\t{names[i % 2]}\n"
                                                   for i, t in enumerate(TEXTS)))  # fmt: skip
        prepare("table", [str(f)], out=str(d / split), options={})
        raw["data"]["labeled"][split] = {"path": str(d / split)}


def _test_labels_out_of_range(d, raw):
    path = _shard(d / "t", text=TEXTS[:4], label=[0, 1, 7, 1])
    raw["data"]["labeled"]["test"] = {"path": path}


def _baseline_for_a_task_without_one(d, raw):
    raw["finetune"].update(task="translation", baseline="linear")


def _eval_every_without_held_out_data(d, raw):
    raw["pretrain"]["eval_every"] = 10


def _eval_every_beyond_max_steps(d, raw):
    raw["data"]["unlabeled_validation"] = dict(raw["data"]["unlabeled"])
    raw["pretrain"]["eval_every"] = 10_000


def _resample_without_repeats(d, raw):
    raw["finetune"].update(resample_labels=True, label_fractions=[0.5])


def _labels_out_of_range(d, raw):
    path = _shard(d / "l", text=TEXTS[:8], label=[0, 1, 2, 5, 0, 1, 0, 1])
    raw["data"]["labeled"] = {"train": {"path": path}, "validation": {"path": path}}


def _labels_not_integers(d, raw):
    path = _shard(d / "l", text=TEXTS[:4], label=[0.0, 1.0, 0.5, 1.0])
    raw["data"]["labeled"]["train"]["path"] = path


def _nulls_in_text(d, raw):
    raw["data"]["unlabeled"]["path"] = _shard(d / "u", text=[*TEXTS[:7], None])


def _missing_checkpoint(d, raw):
    _finetune_only(raw, init=str(d / "no-such-checkpoint"))


def _incompatible_checkpoint(d, raw):
    _finetune_only(raw, init=_checkpoint(d / "ckpt", dim=16))  # the model section says 32


def _tokenizer_mismatch(d, raw):
    _finetune_only(raw, init=_checkpoint(d / "ckpt"))
    del raw["model"]
    other = train_tokenizer(["entirely other words here"] * 20, kind="byte", vocab_size=300)
    (d / "tok.json").write_text(other.to_str())
    raw["tokenizer"] = {"path": str(d / "tok.json")}


def _pickled_weights(d, raw):
    ckpt = _checkpoint(d / "ckpt")
    del raw["model"]
    # A payload that would run code if unpickled, planted as the weights file.
    torch.save({"w": _Exploit()}, Path(ckpt) / "model.safetensors", pickle_module=pickle)
    _finetune_only(raw, init=ckpt)


def _init_pretrain_without_stage(d, raw):
    del raw["pretrain"]


def _unknown_distribution(d, raw):
    raw["finetune"]["sweep"]["space"] = {"lr": {"normal": [0.001, 0.1]}}


def _more_gpus_than_exist(d, raw):
    raw["pretrain"]["scaling"] = {"num_workers": 2, "use_gpu": True}


def _more_cpus_than_exist(d, raw):
    raw["finetune"]["scaling"] = {"num_workers": 4, "cpus_per_worker": 64}


def _storage_not_writable(d, raw):
    (d / "a-file").write_text("")
    raw["storage"] = str(d / "a-file" / "runs")


def _unreachable_tracking(d, raw):
    from servers import free_port

    raw["tracking"] = {"uri": f"http://127.0.0.1:{free_port()}"}


def _spec_edit(d, raw, edit):
    ckpt = Path(_checkpoint(d / "ckpt"))
    spec = yaml.safe_load((ckpt / "model.json").read_text())
    (ckpt / "model.json").write_text(edit(spec))
    del raw["model"]
    _finetune_only(raw, init=str(ckpt))


def _checkpoint_names_a_module(d, raw):
    _spec_edit(d, raw, lambda spec: json.dumps({**spec, "type": "this:Model"}))


def _checkpoint_spec_not_json(d, raw):
    _spec_edit(d, raw, lambda spec: '{"type": "transformer", "config": {')


def _checkpoint_spec_without_config(d, raw):
    _spec_edit(d, raw, lambda spec: json.dumps({"type": "transformer"}))


def _plugin_not_a_class(d, raw):
    raw["model"]["type"] = "os:getcwd"


def _file_not_utf8(d, raw):
    (d / "p.yaml").write_bytes(yaml.safe_dump(raw).encode() + b"# caf\xe9\n")


def _file_utf16(d, raw):
    (d / "p.yaml").write_text(yaml.safe_dump(raw), encoding="utf-16")


def _deep_nesting(d, raw):
    (d / "p.yaml").write_text(yaml.safe_dump(raw) + "x: " + "[" * 20000 + "]" * 20000 + "\n")


def _alias_bomb(d, raw):
    levels = ["b0: &b0 [" + ", ".join(["lol"] * 100) + "]"]
    levels += [f"b{i}: &b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (d / "p.yaml").write_text(yaml.safe_dump(raw) + "\n".join(levels) + "\n")


def _duplicate_section(d, raw):
    (d / "p.yaml").write_text(yaml.safe_dump(raw) + "pretrain: {max_steps: 3}\n")


def _infinite_lr(d, raw):
    raw["pretrain"]["optimizer"]["lr"] = float("inf")


def _huge_max_steps(d, raw):
    raw["pretrain"]["max_steps"] = 10**29


def _huge_seed(d, raw):
    raw["seed"] = 10**30


def _absurd_model(d, raw):
    raw["model"]["dim"] = 10**7  # under 2**53, and no machine holds it


def _garbage_tokenizer(d, raw):
    (d / "tok.json").write_text('{"this is": "not a tokenizer"}')
    raw["tokenizer"] = {"path": str(d / "tok.json")}


def _text_column_not_text(d, raw):
    raw["data"]["unlabeled"]["path"] = _shard(d / "u", text=list(range(32)))


def _image_column_is_text(d, raw):
    path = _shard(d / "l", text=TEXTS[:4], image=TEXTS[:4], label=[0, 1, 0, 1])
    raw["data"]["labeled"] = {"train": {"path": path, "image_column": "image"},
                              "validation": {"path": path, "image_column": "image"}}  # fmt: skip
    raw["model"] = {"type": "cnn"}
    del raw["pretrain"], raw["data"]["unlabeled"], raw["tokenizer"]
    raw["finetune"]["init"] = "scratch"


def _zero_row_validation(d, raw):
    path = _shard(d / "v", text=pa.array([], pa.string()), label=pa.array([], pa.int64()))
    raw["data"]["labeled"]["validation"]["path"] = path


def _batch_larger_than_rows(d, raw):
    raw["finetune"].update(batch_size=64, label_fractions=[0.1])  # a few rows at 10 %


def _truncated_weights(d, raw):
    ckpt = Path(_checkpoint(d / "ckpt"))
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a half copy
    del raw["model"]
    _finetune_only(raw, init=str(ckpt))


def _tracking_uri_with_a_typo(d, raw):
    raw["tracking"] = {"uri": "htp://mlflow.example:5000"}


def _malformed_tracking_uri(d, raw):
    raw["tracking"] = {"uri": "sqlite:/relative/mlflow.db"}


CASES = {
    "garbage_tokenizer": (_garbage_tokenizer, ["tokenizer.path", "not a tokenizer.json"]),
    "text_column_not_text": (_text_column_not_text, ["column 'text'", "int64, not text"]),
    "image_column_is_text": (_image_column_is_text, ["image_column", "string, not encoded"]),
    "zero_row_validation": (_zero_row_validation, ["data.labeled.validation", "hold no rows"]),
    "batch_larger_than_rows": (_batch_larger_than_rows, ["batch_size: 64", "fraction 0.1"]),
    "truncated_weights": (_truncated_weights, ["model.safetensors", "truncated?"]),
    "malformed_tracking_uri": (_malformed_tracking_uri, ["tracking.uri", "three slashes"]),
    "checkpoint_names_a_module": (_checkpoint_names_a_module, ["'this:Model'", "not importing"]),
    "checkpoint_spec_not_json": (_checkpoint_spec_not_json, ["model.json is not JSON"]),
    "checkpoint_spec_without_config": (_checkpoint_spec_without_config, ["lacks the model's"]),
    "plugin_not_a_class": (_plugin_not_a_class, ["model.type", "getcwd", "not a subclass"]),
    "file_not_utf8": (_file_not_utf8, ["p.yaml", "not UTF-8", "save it as UTF-8"]),
    "file_utf16": (_file_utf16, ["p.yaml", "UTF-16"]),
    "deep_nesting": (_deep_nesting, ["nested more than 40 levels"]),
    "alias_bomb": (_alias_bomb, ["alias bomb"]),
    "duplicate_section": (_duplicate_section, ["key 'pretrain' is given twice"]),
    "infinite_lr": (_infinite_lr, ["pretrain.optimizer.lr", "not a finite number"]),
    "huge_max_steps": (_huge_max_steps, ["pretrain.max_steps", "far larger"]),
    "huge_seed": (_huge_seed, ["seed", "far larger"]),
    "absurd_model": (_absurd_model, ["model.dim", "less than or equal to 65536"]),
    "malformed_yaml": (_malformed_yaml, ["p.yaml", "invalid YAML at line 3"]),
    "unknown_key": (_unknown_key, ["pretrain.max_stesp", "max_steps"]),
    "wrong_type": (_wrong_type, ["pretrain.max_steps", "integer"]),
    "out_of_range": (_out_of_range, ["pretrain.optimizer.lr", "greater than 0", "-1"]),
    "missing_data_path": (_missing_data_path, ["data.unlabeled.path", "does not exist"]),
    "empty_directory": (_empty_directory, ["data.unlabeled.path", "holds no .parquet files"]),
    "corrupt_parquet": (_corrupt_parquet, ["bad/part-0.parquet", "not a readable Parquet"]),
    "missing_column": (_missing_column, ["['text'] not in", "columns present: ['body']"]),
    "labels_out_of_range": (_labels_out_of_range, ["labels range over [0, 5]", "num_classes"]),
    "test_split_missing_column": (_test_split_missing_column, ["data.labeled.test", "['text']"]),
    "label_maps_differ": (_label_maps_differ, ["data.labeled.test", "another label map"]),
    "test_labels_out_of_range": (_test_labels_out_of_range, ["data.labeled.test", "[0, 7]"]),
    "baseline_without_one": (
        _baseline_for_a_task_without_one,
        ["finetune.baseline", "translation"],
    ),
    "eval_without_held_out": (_eval_every_without_held_out_data, ["pretrain.eval_every", "needs"]),
    "resample_without_repeats": (
        _resample_without_repeats,
        ["finetune.resample_labels", "repeats"],
    ),
    "eval_beyond_max_steps": (_eval_every_beyond_max_steps, ["pretrain.eval_every", "beyond"]),
    "labels_not_integers": (_labels_not_integers, ["label_column", "double", "integer"]),
    "nulls_in_text": (_nulls_in_text, ["column 'text' has 1 null value", "drop or fill"]),
    "missing_checkpoint": (_missing_checkpoint, ["no-such-checkpoint", "does not exist; point"]),
    "incompatible_checkpoint": (_incompatible_checkpoint, ["dim 32 vs 16", "remove those"]),
    "tokenizer_mismatch": (_tokenizer_mismatch, ["tokenizer.path", "remove tokenizer.path"]),
    "pickled_weights": (_pickled_weights, ["not a safetensors file", "never unpickles"]),
    "init_pretrain_without_stage": (_init_pretrain_without_stage, ["finetune.init", "pretrain"]),
    "unknown_distribution": (_unknown_distribution, ["finetune.sweep.space.lr", "normal"]),
    "more_gpus_than_exist": (_more_gpus_than_exist, ["need 2 GPU", "use_gpu: false"]),
    "more_cpus_than_exist": (_more_cpus_than_exist, ["need 256 CPU", "num_workers"]),
    "storage_not_writable": (_storage_not_writable, ["storage:", "not writable"]),
    "unreachable_tracking": (_unreachable_tracking, ["is unreachable", "tracking.uri"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_one_line_and_no_ray(case, tmp_path, quickstart_data, monkeypatch, capsys):
    breaker, expected = CASES[case]
    raw = tiny_config(quickstart_data, tmp_path / "runs")
    path = tmp_path / "p.yaml"
    breaker(tmp_path, raw)
    if not path.exists():
        path.write_text(yaml.safe_dump(raw))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a problem visible up front")

    monkeypatch.setattr(connect, "_init_ray", no_ray)  # no stage asked for Ray
    # Not the embedded Ray that `raypipe run` starts on a thread meanwhile (it is stopped
    # after the error: tests/test_pipeline_e2e.py runs the command as a process).
    monkeypatch.setattr(localray, "start_in_background", lambda **kwargs: None)
    code = cli.main(["run", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR, err
    assert len(err.splitlines()) == 1 and err.startswith("raypipe: error: "), err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert "Traceback" not in err
    assert "this" not in sys.modules  # a checkpoint's module name is never imported


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20


@pytest.fixture(scope="module")
def broken_images(media_data, tmp_path_factory) -> dict[str, str]:
    """The shapes data with 5 of its training images replaced by bytes that do not decode."""
    root = tmp_path_factory.mktemp("broken")
    table = pq.read_table(media_data["shapes_train"])
    images = table.column("image").to_pylist()
    for i in (3, 17, 40, 41, 99):
        images[i] = b"\x89PNG but cut short"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images))
    pq.write_table(table, root / "part-0.parquet")
    return {"train": str(root), "validation": media_data["shapes_val"], "rows": table.num_rows}


def _image_pipeline(broken, storage: Path, **data) -> dict:
    return {
        "name": "img",
        "storage": str(storage),
        "data": {
            "labeled": {"train": {"path": broken["train"]}, "validation": {"path": broken["validation"]}},
            **data,
        },
        "model": {"type": "cnn", "dim": 16, "layers": 1, "image_size": 16},
        "finetune": {
            "init": "scratch", "num_classes": 4, "epochs": 1, "batch_size": 16,
            "input": "image", "sweep": {"num_samples": 1},
        },
    }  # fmt: skip


def test_undecodable_images_fail_naming_the_column(ray_session, broken_images, tmp_path):
    with pytest.raises(
        UserError, match="image column 'image' holds bytes Pillow cannot decode"
    ) as e:
        pipeline.run_pipeline(parse_config(_image_pipeline(broken_images, tmp_path)))
    assert "\n" not in str(e.value) and "data.bad_images: skip" in str(e.value)


def test_undecodable_images_are_skipped_and_counted(ray_session, broken_images, tmp_path):
    from mlflow.tracking import MlflowClient

    raw = _image_pipeline(broken_images, tmp_path, bad_images="skip")
    summary = pipeline.run_pipeline(parse_config(raw))
    client = MlflowClient(summary.tracking_uri)
    (stage,) = client.search_runs(
        [client.get_run(summary.run_id).info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{summary.run_id}'",
    )
    assert stage.data.metrics["data/skipped_images"] == 5
    assert summary.arms["scratch"]["best_checkpoint"]


@pytest.mark.parametrize("case", ["missing_data_path", "storage_not_writable", "bad_tracking_uri"])
def test_data_storage_and_tracking_mistakes_never_start_ray(case, tmp_path, quickstart_data):
    """As a process: `raypipe run` checks the data, storage and tracking store before it
    starts the embedded Ray, so Ray's temp dir (RAY_TMPDIR) stays empty."""
    import subprocess
    import tempfile

    raw = tiny_config(quickstart_data, tmp_path / "runs")
    breakers = {"missing_data_path": _missing_data_path,
                "storage_not_writable": _storage_not_writable,
                "bad_tracking_uri": _tracking_uri_with_a_typo}  # fmt: skip
    breakers[case](tmp_path, raw)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "raypipe", "run", "p.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not any(ray_tmp.iterdir()), "Ray was started for a mistake visible up front"
    ray_tmp.rmdir()


def test_report_refuses_a_bad_tracking_uri_and_creates_nothing(tmp_path):
    import subprocess

    for uri, words in (("ftp://host/x", "scheme 'ftp'"),
                       (f"sqlite:///{tmp_path}/mistyped.db", "no MLflow store")):  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "raypipe", "report", "abc", "--tracking-uri",
                               uri], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "mistyped.db").exists()


def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path, quickstart_data, capsys):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(tiny_config(quickstart_data, tmp_path)))
    code = cli.main(["validate", str(tmp_path / "p.yaml"), "--set", "pretrain.max_steps=[1,"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR and len(err.splitlines()) == 1, err
    assert "--set pretrain.max_steps: the value is invalid YAML at line 1" in err


def test_relative_storage_in_a_ray_jobs_working_dir_copy_is_refused(
    tmp_path, quickstart_data, monkeypatch, capsys
):
    """Under `ray job submit --working-dir`, the driver runs in Ray's temporary copy of that
    directory: a relative storage would put checkpoints and the MLflow store there. One line,
    before anything is written; outside a job (or with an absolute path) it is fine."""
    raw = tiny_config(quickstart_data, "runs")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setattr(localray, "start_in_background", lambda **kwargs: None)
    code = cli.main(["run", "p.yaml"])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_USER_ERROR, err
    assert err == (
        f"raypipe: error: storage: 'runs' is relative, and this Ray job runs in Ray's temporary "
        f"copy of its working_dir ({tmp_path}), which is deleted with the job's files; give an "
        "absolute path every node shares, or a URI (s3://…)"
    )
    assert not (tmp_path / "runs").exists()
    # A job without a working_dir runs where it was started: no objection there.
    from raypipe.preflight import _in_job_copy

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    assert not _in_job_copy()


def test_relative_data_in_a_ray_jobs_working_dir_copy_is_named(monkeypatch, capsys):
    """Relative data paths under `ray job submit --working-dir` read Ray's temporary copy of
    the working_dir: one warning line names them (absolute paths and URIs are not named)."""
    from raypipe.config import parse_config
    from raypipe.preflight import _warn_relative_data_in_job_copy

    data = {"unlabeled": "data/u", "train": "/abs/train", "validation": "s3://bucket/val"}
    cfg = parse_config(tiny_config(data, "/abs/runs"))
    _warn_relative_data_in_job_copy(cfg)  # not in a job: nothing said
    assert capsys.readouterr().out == ""
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    _warn_relative_data_in_job_copy(cfg)
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "[data] warning: data.unlabeled.path 'data/u'" in out
    assert "/abs/train" not in out and "s3://" not in out
