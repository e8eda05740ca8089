"""YAML config: default file builds every guard; invalid files raise ONE error listing every problem."""

import os
import textwrap

import pytest

import trainer_guard
from trainer_guard import GUARDS, ConfigError, TiedWeightsGuard, callbacks_from_dict, callbacks_from_yaml

DEFAULT = "configs/default.yaml"


def _yaml(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_default_config_builds_every_guard_it_names():
    cbs = callbacks_from_yaml(DEFAULT)
    assert isinstance(cbs[0], TiedWeightsGuard)
    names = [type(c).name for c in cbs]
    assert names == [n for n in GUARDS if n in names], "callbacks come in registry order"
    assert len(set(names)) == len(names)


def test_default_config_mentions_every_guard():
    cfg = trainer_guard.config.load_config(DEFAULT)
    assert set(cfg) == set(GUARDS), "configs/default.yaml must toggle every guard"


def test_toggle_off_and_override(tmp_path):
    path = _yaml(tmp_path, """
        tied_weights:
          enabled: false
    """)
    assert callbacks_from_yaml(path) == []
    assert callbacks_from_yaml(path, tied_weights={"enabled": True, "fix_config": False})[0].options["fix_config"] is False
    assert callbacks_from_dict({"tied_weights": True})[0].options == {"fix_config": True, "restore": True,
                                                                      "write_record": True}
    assert callbacks_from_dict({"tied_weights": False}) == []


def test_invalid_file_lists_every_problem(tmp_path):
    path = _yaml(tmp_path, """
        tied_weights:
          enabled: "yes"
          fix_config: 1
          colour: blue
        not_a_guard: {}
    """)
    valid = ", ".join(GUARDS)
    with pytest.raises(ConfigError) as e:
        callbacks_from_yaml(path)
    assert str(e.value) == (
        f"Invalid trainer_guard config {path!r}:\n"
        "  - tied_weights.enabled: got 'yes' (str); expected true or false\n"
        "  - tied_weights: unknown option 'colour'; valid options: fix_config, restore, write_record\n"
        "  - tied_weights.fix_config: got 1 (int); expected true or false\n"
        f"  - unknown guard 'not_a_guard'; valid guards: {valid}"
    )


def test_literal_and_range_problems_are_reported_with_choices():
    from typing import Literal

    class Demo(trainer_guard.Guard):
        name = "demo_guard"

        def __init__(self, mode: Literal["raise", "warn"] = "raise", every: int = 1) -> None:
            super().__init__(mode=mode, every=every)

        @classmethod
        def _check_options(cls, options):
            return [] if options["every"] >= 0 else [f"every: got {options['every']}; use 0 (off) or a positive step count"]

    with pytest.raises(ConfigError) as e:
        Demo(mode="fix")
    assert str(e.value) == "Invalid options:\n  - Demo.mode: got 'fix'; expected one of 'raise', 'warn'"
    with pytest.raises(ConfigError) as e:
        Demo(every=-2)
    assert str(e.value) == "Invalid options:\n  - Demo.every: got -2; use 0 (off) or a positive step count"


def test_top_level_and_guard_shape_errors(tmp_path):
    with pytest.raises(ConfigError) as e:
        callbacks_from_yaml(_yaml(tmp_path, "- tied_weights\n"))
    assert str(e.value).endswith("the top level must be a mapping of guard names to options, got list")
    with pytest.raises(ConfigError) as e:
        callbacks_from_dict({"tied_weights": "on"})
    assert str(e.value) == ("Invalid trainer_guard config:\n"
                            "  - tied_weights: expected a mapping of options or true/false, got 'on'")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        callbacks_from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        callbacks_from_yaml(_yaml(tmp_path, "tied_weights: [\n"))


def test_yaml_is_read_safely(tmp_path):
    """A config can never make the library build arbitrary Python objects."""
    path = _yaml(tmp_path, "tied_weights: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        callbacks_from_yaml(path)


def test_direct_construction_validates():
    with pytest.raises(ConfigError) as e:
        TiedWeightsGuard(fix_config="yes")
    assert str(e.value) == ("Invalid options:\n"
                            "  - TiedWeightsGuard.fix_config: got 'yes' (str); expected true or false")


def test_real_guards_bad_values_all_reported_at_once(tmp_path):
    path = _yaml(tmp_path, """
        dtype:
          mode: explode
        update_audit:
          every: 0
          ignore: norm
        embedding_lr:
          enabled: true
          ratio: -1
          lr: 0.1
        integrity:
          verify: true
    """)
    with pytest.raises(ConfigError) as e:
        callbacks_from_yaml(path)
    assert str(e.value) == (
        f"Invalid trainer_guard config {path!r}:\n"
        "  - dtype.mode: got 'explode'; expected one of 'fix', 'raise', 'warn'\n"
        "  - update_audit.ignore: got 'norm' (str); expected a list of strings\n"
        "  - update_audit.every: must be >= 1, got 0; pass a positive number of optimizer steps\n"
        "  - embedding_lr.ratio: got -1; must be a finite number > 0 (ratios are fractions of the Trainer's LR, e.g. "
        "0.1)\n"
        "  - embedding_lr.ratio/lr: both given (-1, 0.1); give one of them\n"
        "  - integrity.verify: got True; expected one of 'off', 'manifest', 'readback'"
    )


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; a float option takes it as the number everyone means."""
    path = _yaml(tmp_path, """
        untrained_tokens:
          rtol: 1e-3
        embedding_lr:
          enabled: true
          ratio: 1e-1
    """)
    ut, lr = callbacks_from_yaml(path)
    assert ut.options["rtol"] == 0.001 and lr.options["ratio"] == 0.1
    with pytest.raises(ConfigError, match=r"tied_weights.fix_config: got '1e-3' \(str\); expected true or false"):
        callbacks_from_dict({"tied_weights": {"fix_config": "1e-3"}})


def test_unquoted_off_is_the_word_off(tmp_path):
    """YAML 1.1 reads an unquoted `off` as false; where a choice is the word "off", that is what it means."""
    path = _yaml(tmp_path, """
        integrity:
          verify: off
    """)
    (guard,) = callbacks_from_yaml(path)
    assert guard.options["verify"] == "off"
    with pytest.raises(ConfigError, match=r"integrity.verify: got True; expected one of 'off', 'manifest'"):
        callbacks_from_dict({"integrity": {"verify": True}})  # no "on" among its choices
    with pytest.raises(ConfigError, match=r"dtype.mode: got False; expected one of"):
        callbacks_from_dict({"dtype": {"mode": False}})  # no "off" among its choices


def test_undecodable_file_is_a_config_error(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        callbacks_from_yaml(p)
    with pytest.raises(ConfigError, match="is a directory"):
        callbacks_from_yaml(tmp_path)


def test_a_key_given_twice_is_an_error_not_silently_the_last(tmp_path):
    """YAML keeps the last of two equal keys: a second `integrity:` block would silently drop the first one."""
    path = _yaml(tmp_path, """
        integrity:
          verify: readback
        dtype:
          mode: raise
          mode: warn
        integrity:
          enabled: true
    """)
    with pytest.raises(ConfigError) as e:
        callbacks_from_yaml(path)
    assert str(e.value) == (f"config file {path!r}: key 'integrity' is given twice (lines 2 and 7); YAML would keep "
                            f"only the last one: merge them into one entry")
    with pytest.raises(ConfigError, match=r"key 'mode' is given twice \(lines 3 and 4\)"):
        callbacks_from_yaml(_yaml(tmp_path, """
            dtype:
              mode: raise
              mode: warn
        """))
    # anchors and merge keys that override on purpose are not duplicates
    ok = _yaml(tmp_path, """
        base: &b {mode: warn}
    """)
    with pytest.raises(ConfigError, match="unknown guard 'base'"):
        callbacks_from_yaml(ok)
    assert trainer_guard.config.load_config(_yaml(tmp_path, """
        dtype: &d
          mode: warn
        head:
          <<: *d
          mode: raise
    """)) == {"dtype": {"mode": "warn"}, "head": {"mode": "raise"}}


def test_typos_get_a_suggestion(tmp_path):
    path = _yaml(tmp_path, """
        tied_weight:
          fix_config: true
        integrity:
          verfy: readback
          enable: false
    """)
    with pytest.raises(ConfigError) as e:
        callbacks_from_yaml(path)
    assert str(e.value) == (
        f"Invalid trainer_guard config {path!r}:\n"
        f"  - unknown guard 'tied_weight' (did you mean 'tied_weights'?); valid guards: {', '.join(GUARDS)}\n"
        "  - integrity: unknown option 'verfy' (did you mean 'verify'?); valid options: backend, check_resume, "
        "fallback, repair_load, verify\n"
        "  - integrity: unknown option 'enable' (did you mean 'enabled'?); valid options: backend, check_resume, "
        "fallback, repair_load, verify"
    )
    with pytest.raises(ConfigError, match=r"unknown option 'fix_confg' \(did you mean 'fix_config'\?\)"):
        callbacks_from_dict({"tied_weights": True}, tied_weights={"fix_confg": False})


def test_unreadable_and_pathological_files_are_config_errors(tmp_path):
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    with pytest.raises(ConfigError, match=r"config file '.*loop.yaml' cannot be read: Too many levels of symbolic"):
        callbacks_from_yaml(loop)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot be read: Not a directory"):
        callbacks_from_yaml(tmp_path / "afile" / "x.yaml")
    deep = _yaml(tmp_path, "tied_weights: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError, match="its YAML is nested too deeply"):
        callbacks_from_yaml(deep)
