"""Bad input exits with code 2 and one readable message naming the key and the file."""
from __future__ import annotations

import pytest

from seg_accel.cli import print_config_cli, train_cli
from tests.conftest import tiny_config, write_yaml


def run_train(capsys, argv):
    rc = train_cli(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_message(rc, err, *needles):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def test_unknown_top_level_key(tmp_path, capsys):
    cfg = tiny_config()
    cfg["optimzer"] = cfg.pop("optimizer")
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "optimzer", "Did you mean: optimizer")


def test_unknown_type_with_suggestions(tmp_path, capsys):
    cfg = tiny_config()
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLos"}}
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "model.decode_head.loss_decode.type", "CrossEntropyLos",
                       "Did you mean: CrossEntropyLoss")


def test_unknown_optimizer_type(tmp_path, capsys):
    cfg = tiny_config(optimizer={"type": "AdamWW", "lr": 0.1})
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "optimizer.type", "AdamW", "Choices:")


def test_kwarg_the_constructor_does_not_take(tmp_path, capsys):
    cfg = tiny_config(optimizer={"type": "SGD", "lr": 0.1, "momentun": 0.9})
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "optimizer.momentun", "Did you mean: momentum")


def test_wrong_value_type(tmp_path, capsys):
    cfg = tiny_config(optimizer={"type": "SGD", "lr": "fast"})
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "optimizer.lr", "'fast'", "number")


def test_wrong_value_type_in_a_base_names_the_base(tmp_path, capsys):
    cfg = tiny_config()
    base = {"runner": {"type": "IterBasedRunner", "max_iters": "many"}}
    cfg.pop("runner")
    write_yaml(tmp_path / "_base_/schedule.yaml", base)
    cfg["_base_"] = "_base_/schedule.yaml"
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "schedule.yaml", "runner.max_iters", "'many'")


def test_missing_base_file(tmp_path, capsys):
    cfg = tiny_config(_base_="../base/missing.yaml")
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "_base_", "missing.yaml", "not found")


def test_base_cycle(tmp_path, capsys):
    write_yaml(tmp_path / "a.yaml", {"_base_": "exp.yaml", "seed": 1})
    cfg = tiny_config(_base_="a.yaml")
    cfg.pop("seed")
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "_base_", "cycle", "a.yaml", "exp.yaml")


@pytest.mark.parametrize("option", ["optimizer.lr", "optimizer.lr=[0.1", "=3"])
def test_malformed_cfg_options(tmp_path, capsys, option):
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", tiny_config())), "--cfg-options", option])
    assert_one_message(rc, err, "--cfg-options", option)


def test_custom_import_that_does_not_exist(tmp_path, capsys):
    cfg = tiny_config(custom_imports={"imports": ["my_project.no_such_module"]})
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "custom_imports.imports.0", "my_project.no_such_module")


def test_yaml_syntax_error_line_number(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  type: SegformerForSemanticSegmentation\n  config: [1, 2\nrunner: {max_iters: 2}\n")
    rc, err = run_train(capsys, [str(path)])
    assert_one_message(rc, err, "exp.yaml", "line 4", "YAML syntax error")


def test_num_labels_disagrees_with_class_names(tmp_path, capsys):
    cfg = tiny_config()
    cfg["model"]["config"]["num_labels"] = 5
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "model.config.num_labels", "5", "4 classes", "circle")


def test_unknown_model_config_key(tmp_path, capsys):
    cfg = tiny_config()
    cfg["model"]["config"]["hidden_size"] = [8, 16, 32, 64]
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "model.config.hidden_size", "SegformerConfig", "hidden_sizes")


def test_value_range_checked_before_training(tmp_path, capsys):
    cfg = tiny_config()
    cfg["data"]["train"]["pipeline"][0]["prob"] = 1.5
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "data.train.pipeline.0.prob", "[0, 1]")
    cfg = tiny_config(optimizer={"type": "SGD", "lr": -1.0})
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp2.yaml", cfg))])
    assert_one_message(rc, err, "exp2.yaml", "optimizer", "learning rate")


def test_config_file_not_found(tmp_path, capsys):
    rc, err = run_train(capsys, [str(tmp_path / "nope.yaml")])
    assert_one_message(rc, err, "nope.yaml", "not found")


def test_debug_shows_the_traceback(tmp_path):
    from seg_accel.errors import ConfigError

    cfg = tiny_config(optimizer={"type": "SGD", "lr": "fast"})
    with pytest.raises(ConfigError):
        train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg)), "--debug"])


def test_print_config_validates_after_printing(tmp_path, capsys):
    cfg = tiny_config(optimizer={"type": "SGD", "lr": "fast"})
    rc = print_config_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))])
    out, err = capsys.readouterr()
    assert rc == 2 and "lr: fast" in out and "optimizer.lr" in err


def test_no_trainable_loss_is_an_error(tmp_path, capsys):
    cfg = tiny_config()
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "loss_name": "ce"}}
    rc, err = run_train(capsys, [str(write_yaml(tmp_path / "exp.yaml", cfg))])
    assert_one_message(rc, err, "exp.yaml", "model.decode_head.loss_decode", "loss_")


def test_a_launched_process_exits_with_its_code_and_its_work_flushed(tmp_path):
    """exit_process under a launcher (WORLD_SIZE > 1) skips the interpreter's teardown but first
    joins threads, runs exit handlers and flushes logs and streams."""
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(f'''
import atexit, logging, threading, time
from pathlib import Path
from seg_accel.cli.common import exit_process
out = Path({str(tmp_path)!r})
logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
logging.getLogger("x").info("logged before leaving")
atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread.txt").write_text("done"))).start()
print("printed before leaving", end="")
exit_process(3)
''')
    import os

    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "printed before leaving"
    assert (tmp_path / "thread.txt").read_text() == "done"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before leaving" in (tmp_path / "log.txt").read_text()
