"""Config loading: defaults, YAML, overrides, and clear errors for user mistakes."""
import pytest

from pyevo.config import ConfigError, RunConfig, load_config, save_config


def test_defaults_validate():
    assert load_config().to_dict() == RunConfig().validate().to_dict()


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ndistill:\n  steps: 7\nsearch:\n  rule: budget\n  budget: 0.4\n")
    config = load_config(path, {"distill.steps": "9", "latency.cuda_graph": "true"})
    assert (config.seed, config.distill.steps, config.search.rule, config.search.budget) == (3, 9, "budget", 0.4)
    assert config.latency.cuda_graph is True
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml").to_dict() == config.to_dict()


@pytest.mark.parametrize("overrides, message", [
    ({"distill.stepz": 3}, "unknown config key 'distill.stepz'"),
    ({"nope": 1}, "unknown config key 'nope'"),
    ({"search.budget": 1.5}, "search.budget must be in"),
    ({"search.budget": 0}, "search.budget must be in"),
    ({"search.rule": "fastest"}, "search.rule must be one of"),
    ({"distill.steps": "many"}, "distill.steps must be an integer"),
    ({"batch": 2.5}, "batch must be an integer"),
    ({"device": "tpu"}, "device must be"),
    ({"seed.x": 1}, "not a section"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_missing_or_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_yaml_errors_name_the_whole_key_and_bounds_reject_non_finite_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("distill:\n  steps: .inf\n")
    with pytest.raises(ConfigError, match=r"^distill.steps must be an integer, got inf$"):
        load_config(path)
    path.write_text("search:\n  populaton: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'search.populaton' \(no 'populaton' in search;"):
        load_config(path)
    for key, value, message in (("latency.threads", 0, "latency.threads must be >= 1"),
                                ("retrain.lr", -1, "retrain.lr must be > 0"),
                                ("distill.lr", "nan", "distill.lr must be > 0, got nan")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, {key: value})


def test_a_built_in_teacher_brings_its_preset_unless_one_is_named(tmp_path):
    from pyevo.config import PRESETS, TEACHER_PRESETS

    own = PRESETS[TEACHER_PRESETS["latent-digits"]]
    assert own  # the built-in latent teacher's default run has settings of its own

    def value(config, dotted):
        for part in dotted.split("."):
            config = getattr(config, part)
        return config

    config = load_config(None, {"teacher": "latent-digits"})
    assert {key: value(config, key) for key in own} == own
    assert any(value(RunConfig(), key) != setting for key, setting in own.items())
    # the same from a YAML file; --set still comes last; a named preset replaces the teacher's
    path = tmp_path / "c.yaml"
    path.write_text("teacher: latent-digits\n")
    assert load_config(path).to_dict() == config.to_dict()
    key = next(iter(own))
    other = value(RunConfig(), key) if value(RunConfig(), key) != own[key] else type(own[key])(own[key] * 2)
    assert value(load_config(path, {key: other}), key) == other
    quick = load_config(None, {"teacher": "latent-digits"}, preset="quick")
    assert quick.to_dict() == load_config(None, {"teacher": "digits"}, preset="quick").to_dict() | {"teacher": "latent-digits"}
    # the pixel teacher keeps the plain defaults
    assert load_config(None, {"teacher": "digits"}).to_dict() == RunConfig().to_dict()
