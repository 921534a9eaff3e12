"""`build --config FILE` and `--print-config`: every build option can live in the file, options on
the command line override it, bad files are one-line errors naming the file and key, and the
manifest records the resolved settings of a real build."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from resrank_export.cli import main
from resrank_export.config_file import CONFIG_OPTIONS, option_key, tomllib
from resrank_export.manifest import MANIFEST_FILE


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="resrank-export")


def _printed(*args: str) -> dict:
    result = _invoke("build", *args, "--print-config")
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


def _build_keys() -> set[str]:
    return {option_key(p) for p in main.commands["build"].params
            if isinstance(p, click.Option) and p.name not in CONFIG_OPTIONS}


def test_every_build_option_has_a_key_in_the_printed_config():
    text = _invoke("build", "--print-config").stdout
    lines = {line.lstrip("# ").split(" =")[0] for line in text.splitlines()[1:]}
    assert lines == _build_keys()
    assert "precision" in tomllib.loads(text)


def test_printed_config_loads_back_and_the_command_line_overrides_it(tmp_path):
    given = ["--precision", "int8", "--int8-exclude-op", "Gather", "--int8-exclude-op", "Softmax",
             "--parity-queries", "5", "--no-external-data", "--corpus", str(tmp_path / "c.jsonl"),
             "--int8-smoothquant-alpha", "0.25", "--triton-backend", "none"]
    printed = _invoke("build", *given, "--print-config").stdout
    config = tmp_path / "build.toml"
    config.write_text(printed)
    assert _invoke("build", "--config", str(config), "--print-config").stdout == printed
    values = tomllib.loads(printed)
    assert values["int8-exclude-op"] == ["Gather", "Softmax"] and values["external-data"] is False
    assert values["corpus"] == str(tmp_path / "c.jsonl") and values["parity-queries"] == 5

    overridden = _printed("--config", str(config), "--precision", "fp16", "--parity-queries", "2")
    assert overridden["precision"] == "fp16" and overridden["parity-queries"] == 2
    assert {k: v for k, v in overridden.items() if k not in ("precision", "parity-queries")} == \
        {k: v for k, v in values.items() if k not in ("precision", "parity-queries")}


def test_relative_paths_in_the_file_are_relative_to_the_file(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "build.toml").write_text('corpus = "data/corpus.jsonl"\nout = "/abs/out"\n')
    monkeypatch.chdir(tmp_path)
    values = _printed("--config", str(folder / "build.toml"))
    assert values["corpus"] == str(folder / "data" / "corpus.jsonl")
    assert values["out"] == "/abs/out"


BAD = {
    "unknown-key": ('precison = "fp16"\n', "unknown key 'precison'"),
    "bad-choice": ('precision = "fp64"\n', "key 'precision'"),
    "out-of-range": ("parity-queries = 0\n", "key 'parity-queries'"),
    "wrong-type": ('parity-queries = "many"\n', "key 'parity-queries'"),
    "scalar-for-list": ('int8-exclude-op = "Gather"\n', "key 'int8-exclude-op' takes a list"),
    "list-for-scalar": ('precision = ["fp16"]\n', "key 'precision' takes one value"),
    "flag-not-bool": ('force = "yes"\n', "key 'force' is a flag"),
    # The command line refuses 2.7 and true for an integer; int() would have made them 2 and 1.
    "float-for-int": ("max-batch = 2.7\n", "key 'max-batch' takes an integer, got 2.7"),
    "bool-for-int": ("parity-queries = true\n", "key 'parity-queries' takes an integer, got True"),
    "number-for-path": ("out = 5\n", "key 'out' takes a string, got 5"),
    "number-in-list": ("int8-exclude-op = [5]\n", "key 'int8-exclude-op' takes a string in each item, got 5"),
    "date-for-choice": ("precision = 1979-05-27\n", "key 'precision' takes a string"),
    "bool-for-float": ("int8-smoothquant-alpha = true\n", "key 'int8-smoothquant-alpha' takes a number"),
    "opset-past-range": ("opset = 99999\n", "key 'opset'"),
    "table": ("[parity]\nqueries = 3\n", "table 'parity' is not one this command takes; expected one of [int8_wo], [int4_awq]"),
    "malformed": ('precision = "fp16\n', "not valid TOML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_file_is_one_line_naming_file_and_key(tmp_path, case):
    text, expected = BAD[case]
    config = tmp_path / "build.toml"
    config.write_text(text)
    result = _invoke("build", "--config", str(config), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {config}: ")
    assert expected in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_config_file_is_named(tmp_path):
    result = _invoke("build", "--config", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1 and f"{tmp_path / 'nope.toml'}: config file not found" in result.stderr


def test_build_from_a_config_file_records_the_resolved_settings(tiny_checkpoint, tmp_path):
    config = tmp_path / "build.toml"
    config.write_text(f'checkpoint = "{tiny_checkpoint().root}"\nparity-queries = 2\ntriton-backend = "none"\n'
                      'max-batch = 4\n')
    out = tmp_path / "builds" / "b"
    result = _invoke("build", "--config", str(config), "--out", str(out), "--max-batch", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    recorded = manifest["config"]
    assert recorded["checkpoint"] == str(tiny_checkpoint().root)
    assert recorded["parity"]["queries"] == 2 and recorded["triton_backend"] is None
    assert recorded["engine"]["max_batch"] == 2  # the command line won over the file's 4
    assert recorded["out"] == str(out) and recorded["precision"] == "fp32"
    assert manifest["stages"]["parity"]["inputs"]["queries"] == 2  # the stage ran with it
    assert manifest["stages"]["parity"]["report"]["passed"] is True
    assert "triton" not in manifest["stages"]


def _toml_values():
    from hypothesis import strategies as st

    scalars = (st.text(max_size=12) | st.integers(min_value=-2**63, max_value=2**63 - 1) | st.booleans()
               | st.floats(allow_nan=True, allow_infinity=True) | st.dates() | st.datetimes())
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(min_size=1, max_size=6), inner, max_size=2), max_leaves=4)


def test_no_config_file_ends_in_a_traceback_or_leaves_output(tmp_path):
    """Property: any TOML file of build keys (and some unknown ones) with any TOML value either
    loads (and its printed config loads back to the same text) or is a one-line error naming the
    file, exit 1; nothing is written beside it."""
    import tomli_w
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    keys = st.sampled_from(sorted(_build_keys())) | st.text(min_size=1, max_size=8)
    config = tmp_path / "build.toml"

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(values=st.dictionaries(keys, _toml_values(), max_size=4))
    def check(values):
        config.write_text(tomli_w.dumps(values))
        result = _invoke("build", "--config", str(config), "--out", str(tmp_path / "out"), "--print-config")
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
        assert result.exit_code in (0, 1), result.output
        if result.exit_code == 1:
            assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {config}: ")
        else:
            printed = tmp_path / "printed.toml"
            printed.write_text(result.stdout)
            again = _invoke("build", "--config", str(printed), "--print-config")
            printed.unlink()
            assert again.exit_code == 0 and again.stdout == result.stdout
        assert sorted(p.name for p in tmp_path.iterdir()) == ["build.toml"]

    check()
