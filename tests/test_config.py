"""Typed settings: conversion, validation messages, overrides, the registry and the shipped recipes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

import openalign
from openalign.config import Variants, apply_overrides, from_dict, to_dict
from openalign.errors import ConfigError
from openalign.recipe import load_recipe


@dataclass
class Shape(Variants):
    pass


@dataclass
class Circle(Shape, tag="circle"):
    radius: float = 1.0


@dataclass
class Settings:
    steps: int
    rate: float = 0.1
    name: str = "x"
    flags: tuple[int, ...] = (1,)
    maybe: int | None = None
    shapes: list[Shape] = field(default_factory=list)


def test_values_are_converted_and_checked():
    settings = from_dict(Settings, {"steps": "1e4", "rate": "5e-3", "flags": [2, 3], "maybe": None,
                                    "shapes": [{"type": "circle", "radius": 2}]})
    assert settings == Settings(steps=10000, rate=0.005, flags=(2, 3), shapes=[Circle(radius=2.0)])
    assert to_dict(settings)["shapes"] == [{"type": "circle", "radius": 2.0}]
    assert from_dict(Settings, to_dict(settings)) == settings


@pytest.mark.parametrize("data, message", [
    ({"steps": 1, "rat": 1}, "config key 'rat' is unknown; did you mean 'rate'?"),
    ({}, "config key 'steps' is required but missing"),
    ({"steps": 1.5}, "config key 'steps' must be a whole number, got 1.5"),
    ({"steps": True}, "config key 'steps' must be a number"),
    ({"steps": float("inf")}, "config key 'steps' must be a finite number, got inf"),
    ({"steps": 1, "rate": "nan"}, "config key 'rate' must be a finite number, got 'nan'"),
    ({"steps": 1, "name": 3}, "config key 'name' must be a string"),
    ({"steps": 1, "shapes": [{"type": "circel"}]}, "config key 'shapes[0].type' is 'circel', which is unknown; did you mean 'circle'?"),
    ({"steps": 1, "shapes": [{"radius": 1}]}, "config key 'shapes[0].type' is required; choose one of: circle"),
])
def test_errors_name_the_key_and_the_fix(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Settings, data)
    assert message in str(error.value)


def test_errors_say_whether_the_key_is_unknown_through_nesting():
    """``unknown`` marks a key the settings do not have (what a recipe's hint about another model's
    settings keys on), not a wrong value, nor an unknown variant name, whose message also says 'unknown'."""
    for data, unknown in (({"steps": 1, "shapes": [{"type": "circle", "radus": 1}]}, True),
                          ({"steps": 1, "shapes": [{"type": "circel"}]}, False),
                          ({"steps": 1, "shapes": [{"type": "circle", "radius": "x"}]}, False)):
        with pytest.raises(ConfigError) as error:
            from_dict(Settings, data)
        assert error.value.key.startswith("shapes[0].") and error.value.unknown is unknown


def test_overrides_set_nested_keys_list_items_and_parse_values():
    data = {"train": {"lr": 1.0}, "eval": {"tasks": [{"root": "a"}]}}
    result = apply_overrides(data, ["train.lr=1e-3", "train.clip=null", "eval.tasks.0.root=b", "new.key=[1, 2]"])
    assert result == {"train": {"lr": "1e-3", "clip": None}, "eval": {"tasks": [{"root": "b"}]}, "new": {"key": [1, 2]}}
    assert data["train"]["lr"] == 1.0  # the input is not modified
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_overrides(data, ["train.lr"])
    for key in ("eval.tasks.3.root", "eval.tasks[3].root"):
        with pytest.raises(ConfigError, match=r"'eval.tasks\[3\]' does not exist: the list has 1 item\(s\)"):
            apply_overrides(data, [f"{key}=x"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides(data, ["train.lr.x=1"])
    # ': ' inside text (a pipe: command's header) keeps it text; a mapping is written in braces
    command = 'pipe:curl -s -H "X-Token: abc" https://host/{00000..00009}.tar'
    assert apply_overrides({}, [f"data.urls={command}", "data.x={a: 1}"]) == {"data": {"urls": command, "x": {"a": 1}}}
    with pytest.raises(ConfigError, match=r"must be a mapping, got 'caption: caption.txt' \(text: on the command line "
                                          r"a mapping is written in braces, \{caption: caption.txt\}\)"):
        load_recipe("align-b3-mini-cc3m", ["data.train.extra_keys=caption: caption.txt"])


@pytest.mark.parametrize("name", openalign.list_recipes())
def test_every_shipped_recipe_is_valid(name):
    recipe = load_recipe(name)
    assert recipe.train.steps > 0 and recipe.model.embed_dim > 0


def test_the_fine_tuning_recipes_carry_the_papers_settings_and_name_their_two_retrieval_tasks():
    """ALIGN §5.1: batch 2,048, lr 1e-5, 3k steps on Flickr30K and 6k on COCO (Karpathy's train+restval)."""
    flickr, coco = load_recipe("align-b7-base-finetune-flickr30k"), load_recipe("align-b7-base-finetune-coco")
    for recipe, steps in ((flickr, 3000), (coco, 6000)):
        assert (recipe.train.batch_size, recipe.train.lr, recipe.train.steps) == (2048, 1e-5, steps)
        assert recipe.train.init_from == "kakaobrain/align-base"
        assert [(task.split, task.contrastive_batch) for task in recipe.eval.tasks] == [("test", None), ("val", 256)]
        assert recipe.eval.prefixes() == ["retrieval_test", "retrieval_val"]
    assert coco.data.train.split == "train+restval"


def test_evaluation_tasks_of_one_type_need_names_for_their_metrics():
    """Two retrieval tasks (a test and a val split) wrote the same retrieval/... metrics: the second's
    replaced the first's in the history, W&B and the result."""
    two = ["eval.tasks=[{task: retrieval, json: a.json}, {task: retrieval, json: a.json, split: val}]"]
    with pytest.raises(ConfigError, match=r"'eval.tasks' has several tasks named 'retrieval', whose metrics would "
                                          r"replace each other's: name .* eval.names "
                                          r"\(e.g. \[retrieval_1, retrieval_2\]\)"):
        load_recipe("demo", two)
    assert load_recipe("demo", two + ["eval.names=[test, val]"]).eval.prefixes() == ["test", "val"]
    for names, message in (("[test]", "gives 1 names for 2 tasks"), ("[a/b, c]", "has 'a/b'"),
                           ("[x, x]", "has several tasks named 'x'")):
        with pytest.raises(ConfigError, match=rf"'eval.names' {re.escape(message)}"):
            load_recipe("demo", two + [f"eval.names={names}"])


def test_coyo_align_recipes_carry_the_published_settings():
    """Spec §3.1: conf/cc3m.flags and conf/coyo700m.flags, and the paper's L2 run."""
    cc3m, coyo = load_recipe("align-b3-mini-cc3m"), load_recipe("align-b7-base-coyo700m")
    paper = load_recipe("align-l2-large-coyo700m")
    assert (cc3m.train.batch_size, cc3m.train.lr, cc3m.train.warmup_steps, cc3m.train.steps) == (16384, 5e-3, 10_000, 100_000)
    assert (coyo.train.batch_size, coyo.train.lr, coyo.train.warmup_steps, coyo.train.steps) == (65536, 2e-3, 40_000, 300_000)
    assert (paper.train.batch_size, paper.train.lr, paper.train.warmup_steps, paper.train.steps) == \
        (16384, 1e-3, 10_000, 1_200_000)
    assert paper.model.embed_dim == 1376 and paper.model.text.num_hidden_layers == 24  # L2 + BERT-large
    for recipe in (cc3m, coyo, paper):
        assert (recipe.train.optimizer, recipe.train.weight_decay, recipe.train.eps, recipe.train.schedule) == ("lamb", 1e-5, 1e-6, "linear")
        assert recipe.loss.label_smoothing == 0.1 and recipe.model.image.virtual_batch_size == 16


def test_recipe_overrides_reach_the_model_and_are_validated():
    recipe = load_recipe("demo", ["train.lr=1e-3", "model.image.virtual_batch_size=null"])
    assert recipe.train.lr == 1e-3 and recipe.model.image.virtual_batch_size is None
    with pytest.raises(ConfigError, match="'train.batch_sze' is unknown; did you mean 'train.batch_size'"):
        load_recipe("demo", ["train.batch_sze=3"])
    with pytest.raises(ConfigError, match="unknown recipe 'dem'; did you mean 'demo'"):
        load_recipe("dem")


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "'train.lr' must be a finite number, got 'nan'"),
    ("train.grad_clip=.nan", "'train.grad_clip' must be a finite number, got nan"),
    ("model.temperature_init=.inf", "'model.temperature_init' must be a finite number, got inf"),
    ("train.lr=0", "'train.lr' must be a positive number"),
    ("train.weight_decay=-1", "'train.weight_decay' must be a number >= 0"),
    ("train.betas=[0.9, 1.0]", "'train.betas' must be two numbers in \\[0, 1\\)"),
    ("train.eps=-1e-6", "'train.eps' must be a number >= 0"),
    ("train.warmup_steps=5000",
     "'train.warmup_steps' is 5000, which must be between 0 and train.steps .*: lower train.warmup_steps"),
    ("train.cooldown_steps=5000",
     "'train.cooldown_steps' is 5000, which must be between 0 and train.steps .*: lower train.cooldown_steps"),
    # model settings that would fail deep in torch or transformers, or train at chance
    ("model.temperature_init=1e-40", "'model.temperature_init' must be at least 0.0001, got 1e-40"),
    ("model.temperature_init=0", "'model.temperature_init' must be at least 0.0001, got 0"),
    ("model.temperature_init=1e30", "'model.temperature_init' must be at most 100, got 1e\\+30"),
    ("model.embed_dim=0", "'model.embed_dim' must be at least 1, got 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be at least 1, got 0"),
    ("model.text.max_length=0", "'model.text.max_length' must be at least 1, got 0"),
    ("model.text.max_length=100000", "'model.text.max_length' is 100000, more than the 512 positions BERT has"),
    ("model.text.num_attention_heads=3", "'model.text.hidden_size' is 128, which num_attention_heads 3 does not"),
    ("model.text.pad_token_id=999999", "'model.text.pad_token_id' is 999999, outside the vocabulary"),
    ("model.preprocess.std=[0, 0, 0]", "'model.preprocess.std' must be positive"),
    ("train.lr=[1", "override 'train.lr=\\[1': the value is not valid YAML"),
    ("train.betas.0=0.95", "'train.betas' is not set in this recipe, so it has no item 0: give the whole list"),
    # an extra sample field that would replace the caption, or be written as another tar member
    ("data.train={type: webdataset, urls: a.tar, extra_keys: {text: caption.txt}}",
     "'data.train.extra_keys' names the sample's own field 'text'"),
    ("data.train={type: table, path: a.csv, extra_columns: {a/b: synthetic}}",
     "'data.train.extra_columns' has field name 'a/b'"),
    ("run.output_dir=''", "'run.output_dir' is empty: name the run's folder"),
    ("data.train.image_size=100000", "'data.train.image_size' must be at most 1024, got 100000"),
])
def test_bad_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("demo", [override])


@pytest.mark.parametrize("key", ["lr", "grad_clip", "eps"])
def test_train_settings_built_in_python_refuse_nan_too(key):
    from openalign.recipe import TrainConfig

    with pytest.raises(ConfigError, match=f"'{key}' must be a finite number"):
        TrainConfig(steps=10, batch_size=8, **{key: float("nan")})


def test_registry_lists_the_align_family():
    assert {"align-b3-mini", "align-b7-base", "align-l2-large", "align-tiny", "align-test"} <= set(openalign.list_models())
    with pytest.raises(ConfigError, match="did you mean 'align-b7-base'"):
        openalign.create_model("align-b7")


def test_model_overrides_are_validated_against_the_architecture():
    with pytest.raises(ConfigError, match="config key 'model.embed_dim' is 512, but image_projection is false"):
        openalign.create_model("align-b7-base", embed_dim=512)
    model = openalign.create_model("align-test", embed_dim=24, image={"virtual_batch_size": None})
    assert model.text_projection.out_features == 24 and model.config.image.virtual_batch_size is None


def test_model_config_records_its_architecture():
    config = openalign.model_config("align-l2-large")  # config only: the L2 model itself is 800M parameters
    assert config.image.output_dim == config.embed_dim == 1376
    assert to_dict(config)["architecture"] == "dual_encoder"


def test_a_recipe_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / "recipe.yaml").write_bytes(b"\xff\xfemodel: align-tiny\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_recipe(str(tmp_path / "recipe.yaml"))


def test_a_shapes_evaluation_without_a_root_evaluates_the_training_data():
    recipe = load_recipe("demo", ["data.train.root=elsewhere"])  # not runs/demo/data, another dataset
    assert recipe.eval.tasks[0].root == "elsewhere"
    assert load_recipe("demo", ["eval.tasks.0.root=other"]).eval.tasks[0].root == "other"
    assert load_recipe("demo", ["eval.tasks[0].root=other"]).eval.tasks[0].root == "other"  # as errors name it
    with pytest.raises(ConfigError, match=r"'eval.tasks\[0\].root' is not set, and data.train is no shapes dataset to "
                                          r"evaluate: name one, with 'eval.tasks=\[\{task: shapes, root: DIR\}\]'"):
        load_recipe("demo", ["data.train={type: webdataset, urls: a.tar}"])
    assert load_recipe("demo", ["data.train={type: webdataset, urls: a.tar}", "eval.tasks=[]"]).eval.tasks == []


def test_an_override_of_a_sections_type_starts_it_afresh_keeping_the_other_overrides():
    """`data convert` suggests data.train.type=webdataset data.train.urls=...: the demo's shapes keys (root,
    num_train, ...) would otherwise be unknown keys of a webdataset source."""
    for overrides in (["data.train.type=webdataset", "data.train.urls=a.tar"],
                      ["data.train.urls=a.tar", "data.train.type=webdataset"]):
        recipe = load_recipe("demo", [*overrides, "eval.tasks.0.root=shapes"])
        assert type(recipe.data.train).__name__ == "WebDatasetSourceConfig" and recipe.data.train.urls == "a.tar"
    task = load_recipe("demo", ["eval.tasks.0.task=knn", "eval.tasks.0.train_root=a", "eval.tasks.0.val_root=b"])
    assert (task.eval.tasks[0].train_root, task.eval.tasks[0].k) == ("a", 1)  # no knn_memory_size left over
    same = load_recipe("demo", ["data.train.num_train=7", "data.train.type=shapes"]).data.train  # no change
    assert (same.num_train, same.root) == (7, "runs/demo/data")


def test_a_key_given_twice_is_a_config_error_not_the_last_one_silently(tmp_path):
    recipe = (openalign.registry.find_config("recipes", "demo")).read_text()
    assert "\ntrain:\n" in recipe
    (tmp_path / "recipe.yaml").write_text(recipe.replace("\ntrain:\n", "\ntrain:\n  lr: 0.5\n  lr: 0.1\n", 1))
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice \(lines \d+ and \d+\); keep one"):
        load_recipe(str(tmp_path / "recipe.yaml"))
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_recipe("demo", ["train={lr: 0.5, lr: 0.1}"])
    anchors = "base: &defaults {lr: 0.5, steps: 2}\ntrain:\n  <<: *defaults\n  lr: 0.1\n"  # a merge key's may be set
    assert openalign.config.parse_yaml(anchors)["train"] == {"lr": 0.1, "steps": 2}
    itself = openalign.config.parse_yaml("a: &a {x: *a}")["a"]  # an anchor inside its own mapping, as safe_load
    assert itself["x"] is itself
    with pytest.raises(Exception, match="the key 'key' is given twice"):  # one alias as the key twice
        openalign.config.parse_yaml("k: &k key\n? *k\n: 1\n? *k\n: 2\n")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e-30, 0.0, -1.0, 1e5])
def test_clippo_logit_scale_init_is_bounded_like_the_dual_encoders_temperature(value):
    from openalign.models.clippo import ClippoConfig

    with pytest.raises(ConfigError, match="'logit_scale_init' must be within 0.01 and 10000"):
        ClippoConfig(encoder=openalign.model_config("clippo-b16").encoder, logit_scale_init=value)


def test_every_clippo_model_resizes_as_big_vision_does():
    """Bilinear, without antialiasing (shared spec clippo.md §4), in every registered CLIPPO model
    and in one configured in code without a ``preprocess`` (clippo-test and the code default
    antialiased)."""
    from openalign.models.clippo import ClippoConfig

    clippo_models = [name for name in openalign.list_models() if name.startswith("clippo")]
    assert len(clippo_models) >= 3
    for name in clippo_models:
        preprocess = openalign.model_config(name).preprocess
        assert (preprocess.antialias, preprocess.interpolation) == ("never", "bilinear"), name
    preprocess = ClippoConfig(encoder=openalign.model_config("clippo-b16").encoder).preprocess
    assert (preprocess.antialias, preprocess.interpolation) == ("never", "bilinear")


def test_rsqrt_without_warm_up_needs_its_time_scale(caplog):
    """The time scale defaults to the warm-up length: with no warm-up it was 1 (lr / √(step + 1))."""
    with pytest.raises(ConfigError, match="'train.rsqrt_timescale' is null, which means the warm-up length, but "
                                          "train.warmup_steps is 0"):
        load_recipe("demo", ["train.schedule=rsqrt", "train.warmup_steps=0"])
    assert load_recipe("demo", ["train.schedule=rsqrt", "train.warmup_steps=0",
                                "train.rsqrt_timescale=10000"]).train.rsqrt_timescale == 10000
    with caplog.at_level("WARNING"):  # a recipe's time scale, its schedule overridden: said to do nothing
        load_recipe("clippo-b16-coco", ["train.schedule=cosine"])
    assert "train.rsqrt_timescale=100 has no effect: it is the time scale of schedule rsqrt" in caplog.text
