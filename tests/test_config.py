"""Config, presets and validation (SPEC section 6)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from metarelabel.config import FIELDS, Config, build_config, field_docs, load_config_json, parse_value
from metarelabel.errors import ConfigError
from metarelabel.presets import PRESETS, make_config, preset_names, preset_values
from conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ["paper", "quick"])
def test_presets_build_and_validate(family, preset):
    cfg = make_config(family, preset)
    assert isinstance(cfg, Config)
    assert cfg.family == family and cfg.preset == preset
    assert cfg.validate() is cfg
    # common values (SPEC section 6)
    assert cfg.latent_dim == 5 and cfg.hidden_layers == 3 and cfg.encoder_layers == 3
    assert cfg.lr == 3e-4 and cfg.soft_target_tau == 0.005 and cfg.use_information_bottleneck
    assert cfg.keep_original_prob == 0.5 and cfg.max_path_length == 20 and cfg.discount == 0.9
    if preset == "paper":
        assert cfg.hidden_dim == 300 and cfg.encoder_hidden_dim == 200 and cfg.batch_size == 256
        assert cfg.num_train_steps_per_itr == 1000 and cfg.num_initial_steps == 200
        assert cfg.reward_scale == 100.0
    else:  # quick is really smaller
        paper = make_config(family, "paper")
        assert cfg.num_iterations < paper.num_iterations
        assert cfg.num_train_steps_per_itr < paper.num_train_steps_per_itr
        assert cfg.hidden_dim < paper.hidden_dim
    # round trip through JSON
    assert build_config({}, json.loads(cfg.to_json())) == cfg


def test_paper_four_corners_matches_spec():
    c = make_config("four-corners", "paper")
    assert (c.num_iterations, c.meta_batch, c.embedding_batch_size, c.utility_batch_size) == (300, 8, 1024, 1024)
    assert c.reward_scale == 100.0 and c.kl_lambda == 1.0
    assert (c.num_steps_prior, c.num_steps_posterior, c.num_extra_rl_steps_posterior) == (100, 900, 0)
    assert (c.eval_runs, c.eval_steps, c.exploration_trajectories) == (2, 400, 5)
    assert c.num_tasks_sample == 10 and c.num_initial_steps == 200
    assert c.max_path_length == 20 and c.discount == 0.9


def test_paper_point_robots_match_spec():
    p = make_config("point-robot", "paper")
    assert (p.num_steps_prior, p.num_steps_posterior, p.num_extra_rl_steps_posterior) == (200, 0, 200)
    assert p.kl_lambda == 0.1 and p.eval_steps == 60 and p.reward_scale == 100.0
    s = make_config("sparse-point-robot", "paper")
    assert (s.num_steps_prior, s.num_steps_posterior, s.num_extra_rl_steps_posterior) == (100, 900, 0)
    assert s.num_tasks_sample == 10 and s.embedding_batch_size == 1024 and s.kl_lambda == 1.0
    assert (s.eval_steps, s.exploration_trajectories) == (400, 5)


def test_preset_names_and_unknown():
    assert {"paper", "quick"} <= set(preset_names())
    with pytest.raises(ConfigError, match="nope"):
        make_config("four-corners", "nope")
    with pytest.raises(ConfigError, match="nope"):
        make_config("nope", "paper")
    with pytest.raises(ConfigError, match="family"):
        make_config("four-corners", "paper", {"family": "point-robot"})
    assert set(PRESETS["paper"]) >= set(FAMILIES)
    assert preset_values("four-corners", "quick")["preset"] == "quick"


def test_kl_target_needs_the_bottleneck_and_a_starting_weight():
    assert make_config("four-corners", "quick", {"kl_target": 2.0}).kl_target == 2.0
    for bad in ({"use_information_bottleneck": False}, {"kl_lambda": 0.0}):
        with pytest.raises(ConfigError, match="kl_target"):
            make_config("four-corners", "quick", {"kl_target": 2.0, **bad})


def test_cpu_preset():
    """``cpu`` keeps the paper's reward scale and evaluation episodes and shrinks the networks;
    four-corners keeps the paper's collection rate and departs in discount and KL weight,
    sparse-point-robot shrinks the collection; it exists only for the two families it was
    sized on."""
    for fam in ("four-corners", "sparse-point-robot"):
        paper, cpu = make_config(fam, "paper"), make_config(fam, "cpu")
        assert cpu.preset == "cpu"
        for f in ("reward_scale", "max_path_length", "eval_steps", "exploration_trajectories", "context_reward",
                  "latent_dim", "num_steps_prior"):
            assert getattr(cpu, f) == getattr(paper, f), f
        assert (cpu.hidden_dim, cpu.encoder_hidden_dim, cpu.num_iterations) == (64, 64, 150)
    fc, fc_paper = make_config("four-corners", "cpu"), make_config("four-corners", "paper")
    assert (fc.discount, fc.kl_lambda) == (0.99, 25.0) and (fc_paper.discount, fc_paper.kl_lambda) == (0.9, 1.0)
    for f in ("num_tasks_sample", "num_steps_posterior", "num_train_steps_per_itr"):
        assert getattr(fc, f) == getattr(fc_paper, f), f
    spr, spr_paper = make_config("sparse-point-robot", "cpu"), make_config("sparse-point-robot", "paper")
    assert (spr.discount, spr.kl_lambda) == (spr_paper.discount, spr_paper.kl_lambda)
    assert spr.num_train_steps_per_itr < spr_paper.num_train_steps_per_itr
    assert spr.rl_reward == "dense"  # PEARL's recipe
    with pytest.raises(ConfigError, match="covers: four-corners, sparse-point-robot"):
        make_config("point-robot", "cpu")


def test_overrides_apply():
    c = make_config("four-corners", "quick", {"seed": 3, "lr": 1e-3, "relabel": "hfr", "hardmax": True})
    assert (c.seed, c.lr, c.relabel, c.hardmax) == (3, 1e-3, "hfr", True)
    assert c.replace(seed=9).seed == 9 and c.seed == 3  # frozen; replace builds a new one
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 4  # type: ignore[misc]


def _err(overrides):
    with pytest.raises(ConfigError) as info:
        make_config("four-corners", "quick", overrides)
    return str(info.value)


def test_unknown_field():
    msg = _err({"no_such_field": 1})
    assert "no_such_field" in msg
    with pytest.raises(ConfigError, match="bogus"):
        build_config(make_config("four-corners", "quick").to_dict(), {"bogus": 2})
    with pytest.raises(ConfigError, match="bogus"):
        build_config({**make_config("four-corners", "quick").to_dict(), "bogus": 2}, {})


@pytest.mark.parametrize("field,value", [
    ("seed", "abc"), ("seed", 1.5), ("seed", True), ("num_iterations", None), ("lr", "fast"),
    ("use_information_bottleneck", 1), ("relabel", 3), ("discount", [0.9]), ("hardmax", "yes"),
])
def test_bad_type_names_field(field, value):
    msg = _err({field: value})
    assert msg.startswith(field + ":"), msg


@pytest.mark.parametrize("field,value", [
    ("seed", -1), ("task_seed", -5), ("num_iterations", 0), ("num_iterations", -3), ("lr", 0.0), ("lr", -1e-4),
    ("lr", 2.0), ("soft_target_tau", 0.0), ("reward_scale", 0.0), ("reward_scale", -1.0), ("kl_lambda", -0.1),
    ("discount", 1.5), ("discount", -0.1), ("keep_original_prob", 1.01), ("batch_size", 0), ("meta_batch", 0),
    ("embedding_batch_size", 0), ("latent_dim", 0), ("eval_runs", 0), ("keep_checkpoints", 0),
    ("torch_threads", 0), ("hipi_temperature", 0.0), ("lr", float("nan")), ("reward_scale", float("inf")),
    ("relabel", "hfr2"), ("device", "tpu"), ("context_reward", "sparse"), ("rl_reward", ""),
])
def test_out_of_range_names_field(field, value):
    msg = _err({field: value})
    assert msg.startswith(field + ":"), msg


@pytest.mark.parametrize("field,value", [
    ("seed", 0), ("kl_lambda", 0.0), ("num_train_steps_per_itr", 0), ("discount", 1.0), ("discount", 0.0),
    ("keep_original_prob", 0.0), ("keep_original_prob", 1.0), ("checkpoint_every", 0), ("lr", 1),
    ("exploration_trajectories", 0), ("num_eval_train_tasks", 0),
])
def test_boundary_values_accepted(field, value):
    assert getattr(make_config("four-corners", "quick", {field: value}), field) == value


def test_consistency_checks():
    assert _err({"num_steps_prior": 0, "num_steps_posterior": 0, "num_extra_rl_steps_posterior": 0}) \
        .startswith("num_steps_prior")
    assert _err({"eval_steps": 10, "max_path_length": 20}).startswith("eval_steps")
    assert _err({"learned_reward": True, "relabel": "hipi"}).startswith("learned_reward")
    with pytest.raises(ConfigError, match="family"):
        Config(family="nope").validate()


def test_field_docs_cover_every_field():
    docs = field_docs()
    assert set(docs) == set(FIELDS)
    for name, doc in docs.items():
        assert isinstance(doc, str) and len(doc) >= 10, name
        assert "\n" not in doc
    assert "alpha" in docs["reward_scale"]


@pytest.mark.parametrize("text,value", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("No", False), ("off", False), (" TRUE ", True),
])
def test_parse_bool(text, value):
    assert parse_value("hardmax", text) is value


@pytest.mark.parametrize("text,value", [("3", 3), ("-2", -2), ("1e3", 1000), ("2.0", 2), ("  7 ", 7)])
def test_parse_int(text, value):
    out = parse_value("num_iterations", text)
    assert out == value and type(out) is int


@pytest.mark.parametrize("text,value", [("3e-4", 3e-4), ("1", 1.0), ("-0.5", -0.5), ("inf", float("inf"))])
def test_parse_float(text, value):
    out = parse_value("lr", text)
    assert out == value and type(out) is float


@pytest.mark.parametrize("name,text", [
    ("hardmax", "maybe"), ("hardmax", ""), ("num_iterations", "abc"), ("num_iterations", "1.5"),
    ("num_iterations", ""), ("lr", "fast"), ("seed", "1e400"),
])
def test_parse_errors_name_field(name, text):
    with pytest.raises(ConfigError) as info:
        parse_value(name, text)
    assert str(info.value).startswith(name + ":")


def test_parse_unknown_field_and_str():
    with pytest.raises(ConfigError, match="nope"):
        parse_value("nope", "1")
    assert parse_value("relabel", " hfr ") == "hfr"


def test_load_config_json(tmp_path):
    cfg = make_config("sparse-point-robot", "quick", {"seed": 4})
    p = tmp_path / "config.json"
    p.write_text(cfg.to_json())
    assert load_config_json(p) == cfg
    p.write_text("{not json")
    with pytest.raises(ConfigError):
        load_config_json(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError):
        load_config_json(p)
    p.write_text(json.dumps({**cfg.to_dict(), "lr": -1}))
    with pytest.raises(ConfigError, match="^lr:"):
        load_config_json(p)
    with pytest.raises(ConfigError):
        load_config_json(tmp_path / "missing.json")


def test_new_fields_legacy_defaults_and_lean_on_images(tmp_path):
    """A config.json written before ``rollouts`` / ``grad_step`` existed loads with the
    one-at-a-time rollouts and the autograd step (the run continues as it was made); new
    configs default to the fast paths; the lean step is refused for image families."""
    import json

    from metarelabel.config import load_config_json

    cfg = make_config("four-corners", "quick")
    assert (cfg.rollouts, cfg.grad_step, cfg.init, cfg.relabel_truncate) == ("vector", "fast", "pearl", True)
    old = cfg.to_dict()
    del old["rollouts"], old["grad_step"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = load_config_json(tmp_path / "config.json")
    assert (loaded.rollouts, loaded.grad_step) == ("sequential", "reference")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert load_config_json(tmp_path / "config.json") == cfg
    pytest.importorskip("mujoco")
    with pytest.raises(ConfigError, match="grad_step: lean supports vector observations only"):
        make_config("visual-reacher", "quick", {"grad_step": "lean"})
