"""radforge.config: recipes load, overrides apply, and every mistake fails early, on one line,
naming the dotted key."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from pathlib import Path

import pytest
import yaml

from radforge import config
from radforge.config import CTConfig, DeidConfig, IngestRecipe, ShardConfig, TableConfig, XrayConfig
from radforge.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[1] / "shards" / "recipes"


def _error(*sets: str, path: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(IngestRecipe, path, list(sets))
    message = str(info.value)
    assert "\n" not in message, f"ConfigError messages are one line: {message!r}"
    assert message.strip() == message and message
    return message


# ----------------------------------------------------------------------------- recipes on disk


def test_default_yaml_restates_the_dataclass_defaults_exactly():
    """shards/recipes/default.yaml is the documented default; it must not drift from the code."""
    from_yaml = config.load(IngestRecipe, str(RECIPES / "default.yaml"))
    assert from_yaml == IngestRecipe()
    # ...and it states every key (a key missing from the YAML would be an undocumented default).
    raw = yaml.safe_load((RECIPES / "default.yaml").read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and k != "splits":
                out |= keys(v, f"{prefix}{k}.")
            else:
                out.add(prefix + k)
        return out

    assert keys(raw) == keys(config.to_dict(IngestRecipe()))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_ingest_recipe_loads(path):
    recipe = config.load(IngestRecipe, str(path))
    assert recipe.name == path.stem
    # A recipe survives the round trip the manifest makes (to_dict -> JSON -> from_dict).
    assert config.from_dict(IngestRecipe, config.to_dict(recipe)) == recipe


def test_shipped_recipes_state_what_they_claim():
    ct = config.load(IngestRecipe, str(RECIPES / "ct_clip.yaml"))
    assert ct.modalities == ["CT"] and ct.ct.spacing_mm == (1.5, 0.75, 0.75) and ct.shards.target_mb == 512.0
    assert ct.xray == XrayConfig()  # everything not set keeps the default
    cxr = config.load(IngestRecipe, str(RECIPES / "cxr.yaml"))
    assert cxr.modalities == ["CR", "DX"] and cxr.xray.longest_side == 512


def test_to_dict_is_plain_yaml():
    d = config.to_dict(IngestRecipe())
    assert d["ct"]["spacing_mm"] == [3.0, 1.5, 1.5]  # a list, not a tuple
    assert yaml.safe_load(yaml.safe_dump(d)) == d


# ----------------------------------------------------------------------------- --set overrides


def test_overrides_parse_values_as_yaml():
    r = config.load(
        IngestRecipe,
        None,
        [
            "ct.spacing_mm=[2, 1, 1]",
            "ct.min_slices=4",
            "ct.max_tilt_deg=1",  # an int where a float is expected is fine
            "xray.voi=none",
            "deid.keep_age_sex=true",
            "deid.secret_file=null",
            "private_dir=/tmp/private",
            "modalities=[CT]",
            "labels.findings=[nodule, effusion]",
            "shards.target_mb=0.5",
            "name=my run",
        ],
    )
    assert r.ct.spacing_mm == (2.0, 1.0, 1.0) and all(isinstance(v, float) for v in r.ct.spacing_mm)
    assert r.ct.min_slices == 4 and isinstance(r.ct.min_slices, int)
    assert r.ct.max_tilt_deg == 1.0 and isinstance(r.ct.max_tilt_deg, float)
    assert r.xray.voi == "none" and r.deid.keep_age_sex is True and r.deid.secret_file is None
    assert r.private_dir == "/tmp/private" and r.modalities == ["CT"] and r.name == "my run"
    assert r.labels.findings == ["nodule", "effusion"] and r.reports.findings == []
    assert r.shards.target_mb == 0.5
    # Untouched values keep their defaults.
    assert r.ct.spacing_tolerance == CTConfig().spacing_tolerance and r.splits == IngestRecipe().splits


def test_overrides_apply_on_top_of_a_recipe_file_and_later_wins(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: mine\nct:\n  min_slices: 5\n  max_tilt_deg: 2.0\n")
    r = config.load(IngestRecipe, str(f), ["ct.min_slices=6", "ct.min_slices=7"])
    assert r.name == "mine" and r.ct.min_slices == 7 and r.ct.max_tilt_deg == 2.0


def test_a_section_left_empty_in_yaml_means_defaults(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("ct:\n  # everything commented out\nxray:\n")
    assert config.load(IngestRecipe, str(f)) == IngestRecipe()
    assert config.load(IngestRecipe, str(f), ["ct.min_slices=3"]).ct.min_slices == 3


def test_split_overrides_act_the_same_with_or_without_the_default_recipe():
    """`--set splits.x=...` changes one entry of the splits in effect; a whole mapping replaces."""
    sets = ["splits.train=0.7", "splits.val=0.2"]
    without = config.load(IngestRecipe, None, sets)
    with_default = config.load(IngestRecipe, str(RECIPES / "default.yaml"), sets)
    assert without == with_default
    assert without.splits == {"train": 0.7, "val": 0.2, "test": 0.1}
    whole = config.load(IngestRecipe, None, ["splits={train: 0.9, test: 0.1}"])
    assert whole.splits == {"train": 0.9, "test": 0.1}
    assert "splits" in _error("splits.train=0.5")  # 0.5 + 0.1 + 0.1 != 1


def test_an_empty_value_is_null():
    assert config.load(IngestRecipe, None, ["deid.secret_file="]).deid.secret_file is None
    assert "name" in _error("name=")


@pytest.mark.parametrize(
    "item, needle",
    [
        # keys: unknown, or not a section, or malformed
        ("nope=1", "unknown recipe key nope"),
        ("ct.nope=1", "unknown recipe key ct.nope"),
        ("ct.nope.deeper=1", "ct.nope"),
        ("deid.secrets_env=X", "unknown recipe key deid.secrets_env"),
        ("reports.text_col=x", "unknown recipe key reports.text_col"),
        ("ct.min_slices.x=1", "ct.min_slices"),
        ("splits.train.x=1", "splits.train"),
        ("ct..min_slices=1", "ct..min_slices"),
        ("justakey", "key=value"),
        ("=1", "key=value"),
        ("ct.min_slices=[", "ct.min_slices"),
        # values out of range (the sections' __post_init__ checks)
        ("splits={train: 0.5, val: 0.1, test: 0.1}", "summing to 1"),
        ("splits={train: 1.2, test: -0.2}", "non-negative"),
        ("splits={}", "splits"),
        ("splits={train-set: 1.0}", "identifier"),
        ("modalities=[CT, MR]", "modalities"),
        ("modalities=[]", "modalities"),
        ("ct.spacing_mm=[1, 0, 1]", "ct.spacing_mm"),
        ("ct.spacing_mm=[1, 1, -2]", "ct.spacing_mm"),
        ("ct.min_slices=1", "ct.min_slices"),
        ("ct.spacing_tolerance=1.5", "ct.spacing_tolerance"),
        ("ct.spacing_tolerance=0", "ct.spacing_tolerance"),
        ("ct.max_tilt_deg=-1", "ct.max_tilt_deg"),
        ("ct.max_voxels=0", "ct.max_voxels"),
        ("ct.duplicate_positions=keep", "ct.duplicate_positions"),
        ("xray.voi=auto", "xray.voi"),
        ("xray.longest_side=8", "xray.longest_side"),
        ("reports.join_on=PatientID", "reports.join_on"),
        ("labels.join_on=PatientID", "labels.join_on"),
        ("shards.target_mb=0", "shards.target_mb"),
        ("deid.secret_env=''", "deid.secret_env"),
        ("name=''", "name"),
    ],
)
def test_mistakes_fail_at_load_time_naming_the_setting(item, needle):
    assert needle in _error(item)


def test_unknown_keys_in_yaml_at_any_depth(tmp_path):
    for text, key in [
        ("nmae: x\n", "nmae"),
        ("ct:\n  spacing: [1, 1, 1]\n", "ct.spacing"),
        ("deid:\n  demo: true\n", "deid.demo"),
        ("labels:\n  findings: []\n  colour: red\n", "labels.colour"),
        ("1: x\nfoo: y\n", "1"),  # non-string keys do not crash the message
    ]:
        f = tmp_path / "r.yaml"
        f.write_text(text)
        msg = _error(path=str(f))
        assert f"unknown recipe key {key}" in msg
        assert "valid:" in msg  # and says what would have been accepted


@pytest.mark.parametrize(
    "item, key",
    [
        ("ct.min_slices=eight", "ct.min_slices"),
        ("ct.min_slices=8.5", "ct.min_slices"),
        ("ct.min_slices=true", "ct.min_slices"),  # a bool is not an int here
        ("ct.min_slices=.inf", "ct.min_slices"),
        ("shards.target_mb=.nan", "shards.target_mb"),
        ("shards.target_mb=[1]", "shards.target_mb"),
        ("ct.spacing_mm=3", "ct.spacing_mm"),
        ("ct.spacing_mm=[1, 2]", "ct.spacing_mm"),
        ("ct.spacing_mm=[1, x, 2]", "ct.spacing_mm"),
        ("deid.demo_key=maybe", "deid.demo_key"),
        ("deid.demo_key=1", "deid.demo_key"),
        ("modalities=CT", "modalities"),
        ("splits=[train]", "splits"),
        ("splits={train: .nan, val: 0.5, test: 0.5}", "splits.train"),
        ("ct=5", "ct"),
        ("name={a: 1}", "name"),
        ("xray.longest_side=null", "xray.longest_side"),
    ],
)
def test_wrong_types_fail_with_the_key(item, key):
    msg = _error(item)
    assert msg.startswith(key) and "got" in msg, msg


@pytest.mark.parametrize(
    "cls, item, message",
    [
        (config.TrainRecipe, "deepspeed.micro_batch=x", "deepspeed.micro_batch: expected integer, got 'x'"),
        (config.TrainRecipe, "deepspeed.micro_batch=4.0", "deepspeed.micro_batch: expected integer, got 4.0"),
        (config.TrainRecipe, "scale.resources_per_worker={gpu_a: y}", "scale.resources_per_worker.gpu_a: expected finite number, got 'y'"),
        (IngestRecipe, "ct.spacing_mm=[1, x, 2]", "ct.spacing_mm[1]: expected finite number, got 'x'"),
        (IngestRecipe, "ct.spacing_mm=[1, 2]", "ct.spacing_mm: expected a list of 3, got [1, 2]"),
        (IngestRecipe, "ct.spacing_mm=[1, 2, 3, 4]", "ct.spacing_mm: expected a list of 3, got [1, 2, 3, 4]"),
        (IngestRecipe, "deid.demo_key=1", "deid.demo_key: expected true/false, got 1"),
        (IngestRecipe, "labels.join_on=PatientID", "labels.join_on must be one of AccessionNumber, StudyInstanceUID; got 'PatientID'"),
    ],
)
def test_wrong_type_messages_say_what_was_expected(cls, item, message):
    with pytest.raises(ConfigError) as info:
        config.load(cls, None, [item])
    assert str(info.value) == message


def test_a_number_where_a_string_is_expected_is_that_string():
    assert config.load(IngestRecipe, None, ["name=2024", "modalities=[CT]"]).name == "2024"


def test_choice_errors_list_the_choices():
    msg = _error("ct.duplicate_positions=keep")
    assert "reject" in msg and "drop" in msg and "'keep'" in msg


def test_validation_also_guards_direct_construction():
    with pytest.raises(ConfigError, match="splits"):
        IngestRecipe(splits={"train": 0.5})
    with pytest.raises(ConfigError, match="ct.spacing_mm"):
        CTConfig(spacing_mm=(1.0, 1.0))
    with pytest.raises(ConfigError, match="shards.target_mb"):
        ShardConfig(target_mb=float("nan"))
    with pytest.raises(ConfigError, match="join_on"):
        TableConfig(join_on="PatientName")
    with pytest.raises(ConfigError, match="deid.secret_env"):
        DeidConfig(secret_env="")
    # Numbers are normalised, so 3 and 3.0 give equal recipes (and equal profile digests).
    assert IngestRecipe(ct=CTConfig(spacing_mm=[3, 1.5, 1.5]), splits={"train": 1}) == IngestRecipe(
        splits={"train": 1.0}
    )


# ----------------------------------------------------------------------------- recipe files


def test_recipe_file_errors_are_config_errors(tmp_path):
    assert "recipe not found" in _error(path=str(tmp_path / "missing.yaml"))
    assert "cannot be read" in _error(path=str(tmp_path))  # a directory
    bad = tmp_path / "bad.yaml"
    bad.write_text("ct: [unclosed\n  min_slices: 3\n")
    assert "not valid YAML" in _error(path=str(bad))
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    assert "mapping" in _error(path=str(top))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "cannot be read" in _error(path=str(binary))


def test_recipe_files_load_from_any_storage_url(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("name: via-url\n")
    assert config.load(IngestRecipe, f"file://{f}").name == "via-url"


def _sections(cls) -> list[type]:
    """`cls` and every dataclass reachable through its fields' types."""
    out, todo = [], [cls]
    while todo:
        c = todo.pop()
        if c not in out:
            out.append(c)
            todo += [t for t in typing.get_type_hints(c).values() if dataclasses.is_dataclass(t)]
    return out


@functools.cache
def _class_source(cls) -> tuple[list[str], ast.ClassDef]:
    """A class's source lines and its parsed definition, once per class (inspect finds a class by
    parsing its whole module again on every call: ~4 CPU s for the three roots' ~60 lookups)."""
    lines, _ = inspect.getsourcelines(cls)
    return lines, ast.parse(textwrap.dedent("".join(lines))).body[0]


def _undocumented(cls) -> list[str]:
    """Fields with no comment on their line or the line above; a section field may instead be
    documented by its own class docstring."""
    lines, tree = _class_source(cls)
    hints = typing.get_type_hints(cls)
    missing = []
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            name = node.target.id
            here, above = lines[node.end_lineno - 1], lines[node.lineno - 2].strip()
            section_doc = dataclasses.is_dataclass(hints[name]) and ast.get_docstring(_class_source(hints[name])[1])
            if "#" not in here and not above.startswith("#") and not section_doc:
                missing.append(name)
    return missing


def _mentions_any(tp) -> bool:
    return tp is typing.Any or any(_mentions_any(a) for a in typing.get_args(tp))


@pytest.mark.parametrize("root", [IngestRecipe, config.TrainRecipe, config.ServeConfig], ids=lambda c: c.__name__)
def test_every_field_is_typed_and_documented(root):
    """pydantic validates by the type hints (an `Any` would accept anything), and the comment beside
    a field is its documentation (units, default's meaning)."""
    sections = _sections(root)
    assert len(sections) > 1 or root is config.ServeConfig
    for cls in sections:
        assert ast.get_docstring(_class_source(cls)[1]), f"{cls.__name__} has no docstring"
        assert not _undocumented(cls), f"{cls.__name__}: fields without a comment: {_undocumented(cls)}"
        for name, tp in typing.get_type_hints(cls).items():
            assert not _mentions_any(tp), f"{cls.__name__}.{name}: {tp} accepts anything"


def test_the_documentation_check_can_fail():
    @dataclasses.dataclass
    class Bare:
        """A class with one commented field."""

        loose: typing.Any = None  # documented, but Any
        plain: int = 0

    assert _undocumented(Bare) == ["plain"]
    assert _mentions_any(typing.get_type_hints(Bare)["loose"]) and _mentions_any(dict[str, typing.Any])


# ----------------------------------------------------------------------------- serve arguments


def test_serve_config_parses_cli_strings_and_splits_url_lists():
    """`serve run radforge.serve:build_app model=a,b max_batch_size=8` passes strings."""
    a = config.from_dict(config.ServeConfig, {"model": "a, b", "index": ["c,d", "e"], "max_batch_size": "8", "num_cpus": "0.5"})
    assert a.model == ["a", "b"] and a.index == ["c", "d", "e"] and a.max_batch_size == 8 and a.num_cpus == 0.5
    assert config.from_dict(config.ServeConfig, config.to_dict(a)) == a


@pytest.mark.parametrize(
    "args, needle",
    [
        ({}, "model: required"),
        ({"model": ""}, "model: at least one"),
        ({"model": "a", "bogus": 1}, "unknown recipe key bogus"),
        ({"model": "a", "max_batch_size": "x"}, "max_batch_size: expected integer"),
        ({"model": "a", "max_batch_size": 2000}, "max_batch_size must be in [1, 1024]"),
        ({"model": "a", "num_replicas": 0}, "num_replicas must be >= 1"),
        ({"model": "a", "min_replicas": 3, "max_replicas": 2}, "max_replicas must be >= min_replicas"),
        ({"model": "a", "max_upload_mb": "nan"}, "max_upload_mb"),
    ],
)
def test_serve_config_errors_are_one_line_config_errors(args, needle):
    with pytest.raises(ConfigError) as info:
        config.from_dict(config.ServeConfig, args)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_whole_section_override_merges_into_the_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("ct:\n  spacing_mm: [1, 1, 1]\n")
    r = config.load(IngestRecipe, str(f), ["ct={min_slices: 3, max_tilt_deg: 1}"])
    assert r.ct.spacing_mm == (1.0, 1.0, 1.0) and r.ct.min_slices == 3 and r.ct.max_tilt_deg == 1.0
    assert "unknown recipe key ct.bogus" in _error("ct={bogus: 1}")
