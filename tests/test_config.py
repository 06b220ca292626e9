"""Typed config: files, dotted overrides, clear errors, and the record written beside outputs."""

import json
import subprocess

import pytest
import yaml

from robustmim.config import load_config
from robustmim.errors import ConfigError
from robustmim.provenance import write_provenance
from robustmim.shards.config import ShardsConfig, SourceKind

from conftest import REPO_ROOT


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source: imagenet\ninput: /data/in1k\nout_dir: /x\nseed: 3\nshard_max_samples: 10\n")
    cfg = load_config(ShardsConfig, path, ["seed=7", "splits=[val]"])
    assert cfg.source is SourceKind.imagenet
    assert (cfg.input, cfg.out_dir, cfg.seed, cfg.shard_max_samples, cfg.splits) == ("/data/in1k", "/x", 7, 10, ["val"])


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("out_dir: /x\nshard_max_sample: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'shard_max_sample'"):
        load_config(ShardsConfig, path)


def test_unknown_key_in_override_names_it():
    with pytest.raises(ConfigError, match=r"override 'wrokers=2': unknown key 'wrokers'"):
        load_config(ShardsConfig, None, ["out_dir=/x", "wrokers=2"])


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError, match=r"invalid value for 'workers'.*'many'"):
        load_config(ShardsConfig, None, ["out_dir=/x", "workers=many"])


def test_bad_enum_value_lists_the_choices():
    with pytest.raises(ConfigError, match=r"'source'.*imagenet"):
        load_config(ShardsConfig, None, ["out_dir=/x", "source=cifar"])


def test_missing_required_value():
    with pytest.raises(ConfigError, match="missing required value.*out"):
        load_config(ShardsConfig)


@pytest.mark.parametrize("override, message", [
    ("splits=[train,test]", "unknown split"),
    ("shard_max_bytes=0", "shard_max_bytes must be positive"),
    ("workers=-1", "workers must be >= 0"),
])
def test_values_checked_by_the_dataclass(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ShardsConfig, None, ["out_dir=/x", override])


@pytest.mark.parametrize("stage, override, message", [
    ("pretrain", "data=5", r"override 'data=5': 'data' is a section of settings, not a value; set its keys instead "
                           r"\(data.shards, "),
    ("pretrain", "model.img_size=35", "data.image_size 28 differs from model.img_size 35"),
    ("pretrain", "data.channels=3", "data.channels 3 differs from model.in_chans 1"),
    ("finetune", "data.image_size=32", "data.image_size 32 differs from model.img_size 28"),
])
def test_sections_and_keys_that_must_agree_are_checked_in_the_config(stage, override, message):
    """Found when the config loads, not minutes later inside the model."""
    from robustmim.stages import resolve, stage_named

    schema = resolve(stage_named(stage).config)
    path = {"pretrain": "configs/pretrain/mae_tiny_fmnist.yaml",
            "finetune": "configs/finetune/standard_tiny_fmnist.yaml",
            "tokenizer": "configs/tokenizer/tiny_fmnist.yaml"}[stage]
    with pytest.raises(ConfigError, match=message):
        load_config(schema, REPO_ROOT / path, ["out_dir=/x", override])


def test_bf16_weights_needs_zero_and_is_a_training_mode():
    from robustmim.eval.config import EvalConfig
    from robustmim.stages import resolve, stage_named

    schema = resolve(stage_named("pretrain").config)
    path = REPO_ROOT / "configs/pretrain/mae_tiny_fmnist.yaml"
    assert load_config(schema, path, ["out_dir=/x", "precision=bf16_weights", "zero_stage=1"]).zero_stage == 1
    with pytest.raises(ConfigError, match="precision=bf16_weights needs zero_stage >= 1"):
        load_config(schema, path, ["out_dir=/x", "precision=bf16_weights", "zero_stage=0"])
    with pytest.raises(ConfigError, match="bf16_weights is a training mode"):
        load_config(EvalConfig, None, ["model=m", "shards=s", "out_dir=o", "precision=bf16_weights"])


def test_compile_is_on_for_gpus_unless_set_and_never_with_zero3():
    from robustmim.stages import resolve, stage_named

    schema = resolve(stage_named("pretrain").config)
    path = REPO_ROOT / "configs/pretrain/mae_tiny_fmnist.yaml"

    def compiles(on_gpu, *overrides):
        return load_config(schema, path, ["out_dir=/x", *overrides]).compiles(on_gpu)

    assert load_config(schema, path, ["out_dir=/x"]).compile is None  # auto
    assert compiles(True) and not compiles(False)
    assert not compiles(True, "zero_stage=3")  # auto stays off where ZeRO-3's hooks would break the graphs
    assert compiles(False, "compile=true") and not compiles(True, "compile=false")
    with pytest.raises(ConfigError, match="compile=true needs zero_stage <= 2"):
        load_config(schema, path, ["out_dir=/x", "compile=true", "zero_stage=3"])


def test_resume_choices_and_which_settings_make_a_checkpoint_another_run():
    from robustmim.stages import resolve, stage_named
    from robustmim.pipeline.engine.trainer import CONFIG_HASHES_VERSION, changed_sections, config_hashes

    schema = resolve(stage_named("pretrain").config)
    path = REPO_ROOT / "configs/pretrain/mae_tiny_fmnist.yaml"

    def hashes(*overrides):
        return config_hashes(load_config(schema, path, ["out_dir=/x", *overrides]))

    assert load_config(schema, path, ["out_dir=/x"]).checkpoint.resume == "latest"
    for word in ("true", "false", ""):
        with pytest.raises(ConfigError, match="checkpoint.resume must be latest, none or a step_"):
            load_config(schema, path, ["out_dir=/x", f"checkpoint.resume={word}"])
    base = hashes()
    # where the shards live, how fast they are read: the same run
    assert hashes("data.shards=/elsewhere", "data.num_threads=7", "data.verify_hashes=true") == base
    for override, section in (("data.crop_scale=[0.5,1.0]", "data"), ("optim.base_lr=0.1", "optim"),
                              ("seed=3", "seed"), ("objective.dmae.sigma=0.5", "objective")):
        assert changed_sections(base, CONFIG_HASHES_VERSION, hashes(override)) == [section], override
    # checkpoints of version 1 hashed every data setting: their `data` digest is not compared
    assert changed_sections({**base, "data": "old"}, None, base) == []
    assert changed_sections({**base, "optim": "old"}, None, base) == ["optim"]


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(ShardsConfig, None, ["out"])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(ShardsConfig, tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from robustmim.pipeline.pretrain.config import PretrainConfig

    shards = sorted((REPO_ROOT / "configs" / "shards").glob("*.yaml"))
    pretrain = sorted((REPO_ROOT / "configs" / "pretrain").glob("*.yaml"))
    assert len(shards) == 2 and len(pretrain) == 11  # 4 tiny, 4 ViT-L, NIM ViT-B, MIMIR ViT-B and ViT-S
    for path in shards:
        load_config(ShardsConfig, path, ["out_dir=/x"])
    for path in pretrain:
        cfg = load_config(PretrainConfig, path)
        assert cfg.objective.name.value == path.name.split("_")[0]


def _leaves(tree, prefix=""):
    """(dotted key, value) of every scalar or list a YAML mapping sets."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _restated_defaults(schema, tree: dict) -> list[str]:
    from omegaconf import OmegaConf

    defaults = OmegaConf.structured(schema)
    same = []
    for key, value in _leaves(tree):
        default = OmegaConf.select(defaults, key, throw_on_missing=False)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default, enum_to_str=True)
        default = getattr(default, "value", default)  # enums compare by their YAML spelling
        if default == value and type(default) is not bool or default is value:
            same.append(key)
    return same


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").rglob("*.yaml")),
                         ids=lambda p: str(p.relative_to(REPO_ROOT / "configs")))
def test_every_shipped_config_loads_and_states_only_what_differs(path):
    """configs/<stage>/*.yaml: loads with its stage's config (the folder names the stage), sets
    no key to its default (`--print-config` shows those), and its header comment says how to run
    it and how long it takes."""
    from robustmim.stages import resolve, stage_named

    schema = resolve(stage_named(path.parent.name).config)
    load_config(schema, path, ["out_dir=/x"] if path.parent.name == "shards" else [])
    assert _restated_defaults(schema, yaml.safe_load(path.read_text())) == []
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"robustmim {path.parent.name}" in line or "robustmim submit" in line for line in header), header
    assert any(line.startswith("# Wall time: ") for line in header), header


def test_a_restated_default_is_found():
    from robustmim.pipeline.pretrain.config import PretrainConfig

    tree = {"zero_stage": 2, "micro_batch": 32, "data": {"split": "train", "shards": "x"}, "objective": {"name": "mae"}}
    assert _restated_defaults(PretrainConfig, tree) == ["zero_stage", "data.split", "objective.name"]


def test_shipped_finetune_configs_load_with_their_recipe():
    from robustmim.pipeline.finetune.config import FinetuneConfig

    finetune = sorted((REPO_ROOT / "configs" / "finetune").glob("*.yaml"))
    assert len(finetune) == 13  # five recipes, each tiny and ImageNet ViT-L; De3 ViT-B, MIMIR ViT-B and ViT-S
    for path in finetune:
        cfg = load_config(FinetuneConfig, path)
        assert cfg.recipe.name.value == path.name.split("_")[0]
        assert cfg.init, path  # every shipped recipe starts from a pretrained encoder


def test_paper_scale_configs_are_the_papers_main_table_settings():
    """NIM's main table is ViT-B; MIMIR's ImageNet table ViT-S and ViT-B (raw [0, 1] pixels, 512
    images per GPU for its nHSIC term). Each header names what it reproduces."""
    from robustmim.pipeline.pretrain.config import PretrainConfig
    from robustmim.pipeline.finetune.config import FinetuneConfig

    nim = load_config(PretrainConfig, REPO_ROOT / "configs" / "pretrain" / "nim_vitb_in1k.yaml")
    assert (nim.model.encoder, nim.model.decoder, nim.global_batch, nim.length.epochs) == (
        "vit_base_patch16", "mae", 4096, 800)
    assert (nim.objective.nim.gamma_shape, nim.objective.nim.gamma_scale, nim.objective.nim.mask_ratio) == (25, 3, 0)
    de3 = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "de3_vitb_in1k.yaml")
    assert (de3.model.encoder, de3.length.epochs, de3.optim.layer_decay, de3.recipe.de3.deploy_sigma) == (
        "vit_base_patch16", 100, 0.75, 70.0)
    for size, encoder, published in (("s", "vit_small_patch16", "71.29 / 40.98"), ("b", "vit_base_patch16",
                                                                                    "73.22 / 41.26")):
        path = REPO_ROOT / "configs" / "pretrain" / f"mimir_vit{size}_in1k.yaml"
        mimir = load_config(PretrainConfig, path)
        assert (mimir.model.encoder, mimir.model.decoder, mimir.global_batch, mimir.micro_batch) == (
            encoder, "mimir", 2048, 512)
        assert (mimir.model.pixel_mean, mimir.model.pixel_std) == ([0.0] * 3, [1.0] * 3)
        tuned_path = REPO_ROOT / "configs" / "finetune" / f"mimir_vit{size}_in1k.yaml"
        tuned = load_config(FinetuneConfig, tuned_path)
        assert (tuned.model.encoder, tuned.optim.layer_decay, tuned.recipe.mimir.steps) == (encoder, 0.65, 1)
        assert published in path.read_text() and published in tuned_path.read_text()


def test_shipped_eval_configs_load():
    from robustmim.eval.config import EvalConfig

    evals = sorted((REPO_ROOT / "configs" / "eval").glob("*.yaml"))
    assert len(evals) >= 3
    for path in evals:
        load_config(EvalConfig, path)
    mimir = load_config(EvalConfig, REPO_ROOT / "configs" / "eval" / "mimir_imagenet.yaml")
    assert mimir.attacks[0].steps == 20 and mimir.autoattack.version.value == "standard"


def test_shipped_tokenizer_config_and_presets_load():
    from robustmim.pipeline.finetune.config import FinetuneConfig
    from robustmim.pipeline.models.config import PRESETS
    from robustmim.pipeline.tokenizer.config import TokenizerConfig

    cfg = load_config(TokenizerConfig, REPO_ROOT / "configs" / "tokenizer" / "tiny_fmnist.yaml")
    assert cfg.model.resolution == cfg.data.image_size == 28 and cfg.model.downsampling == 4
    dat = load_config(FinetuneConfig, REPO_ROOT / "configs" / "finetune" / "dat_vitl_in1k.yaml").recipe.dat
    assert dat.tokenizer_preset in PRESETS and dat.epsilon == 0.1 and dat.random_start_prob == 0.8
    with pytest.raises(ConfigError, match="recipe dat needs recipe.dat.tokenizer"):
        load_config(FinetuneConfig, None, ["out_dir=x", "data.shards=x", "recipe.name=dat"])


def test_resolved_config_and_git_sha_written_beside_output(tmp_path):
    cfg = load_config(ShardsConfig, None, ["out_dir=/x", "seed=5"])
    write_provenance(tmp_path, cfg, "shards build")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["seed"] == 5 and written["source"] == "fashion_mnist" and written["out_dir"] == "/x"
    record = json.loads((tmp_path / "provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert record["git_sha"] == head.stdout.strip() and len(record["git_sha"]) == 40
    assert record["stage"] == "shards build"
    assert load_config(ShardsConfig, tmp_path / "config.yaml") == cfg  # the record reloads as the same config


def test_times_are_not_read_as_base_60_numbers(tmp_path):
    """YAML 1.1 reads 72:00:00 as 259200; a Slurm time limit must stay what was written."""
    from robustmim.slurm.config import SlurmConfig, time_minutes

    path = tmp_path / "slurm.yaml"
    path.write_text("time: 72:00:00\nnodes: 2\n")
    cfg = load_config(SlurmConfig, path, ["signal_delay_s=90"])
    assert cfg.time == "72:00:00" and time_minutes(cfg.time) == 4320 and cfg.nodes == 2
    assert load_config(SlurmConfig, None, ["time=1:30"]).time == "1:30"
    with pytest.raises(ConfigError, match=r"time '1:2:3:4' is not a Slurm time"):
        load_config(SlurmConfig, None, ["time=1:2:3:4"])
    assert load_config(ShardsConfig, None, ["out_dir=/x", "seed=019"]).seed == 19  # strings convert as before


def test_old_output_directory_names_still_read_under_the_one_name(tmp_path):
    """`out_dir` for every stage: shards' former `out` and training's former `run_dir` still load
    (older commands, and older run directories' config.yaml, which `robustmim export` reads)."""
    from robustmim.pipeline.pretrain.config import PretrainConfig

    assert load_config(ShardsConfig, None, ["out=/x"]).out_dir == "/x"
    old = tmp_path / "config.yaml"
    old.write_text("run_dir: /runs/a\ndata:\n  shards: /s\n")
    assert load_config(PretrainConfig, old).out_dir == "/runs/a"
    assert load_config(PretrainConfig, old, ["run_dir=/runs/b"]).out_dir == "/runs/b"
    old.write_text("run_dir: /runs/a\nout_dir: /runs/b\n")
    with pytest.raises(ConfigError, match="sets both 'run_dir' and 'out_dir'"):
        load_config(PretrainConfig, old)
