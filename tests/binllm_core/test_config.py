"""Every preset loads; unknown keys, wrong types and values that break a rule are one clear line
at load, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from binllm_core.config import RunConfig, build, config_hash, load_config
from binllm_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"ml100k", "ml100k_global", "ml100k_gpu", "ml1m", "amazon_book", "tiny"} <= names


def test_the_gpu_preset_has_the_papers_budget_on_gpus():
    cfg = load_config("configs/ml100k_gpu.yaml")
    ft = cfg.finetune
    assert ft.strategy == "two_step" and ft.use_gpu and ft.num_workers == 2
    assert (ft.step1.lr, ft.step1.batch_size, ft.step2.lr, ft.step2.batch_size) == (
        1e-3,
        16,
        1e-4,
        4,
    )
    assert ft.step1.warmup_steps == ft.step2.warmup_steps == 200 and ft.patience == 20
    assert cfg.score.num_gpus == 1 and cfg.score.max_rows == 0
    default = load_config("configs/ml100k.yaml")
    assert default.protocol == cfg.protocol and default.encoder == cfg.encoder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.run_name and cfg.output_root and cfg.data.uri
    assert sum(cfg.protocol.fractions) == pytest.approx(1.0)


def test_override_sets_nested_keys_with_yaml_types(tmp_path: Path):
    cfg = load_config(
        "configs/ml100k.yaml",
        ["data.uri=/data/ml", "encoder.lr=1e-3", "protocol.fractions=[0.7, 0.2, 0.1]"],
    )
    assert cfg.data.uri == "/data/ml"
    assert cfg.encoder.lr == pytest.approx(1e-3)
    assert cfg.protocol.fractions == [0.7, 0.2, 0.1]


def test_unknown_key_is_one_line_naming_key_and_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  uri: x\n  formatt: auto\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    message = str(err.value)
    assert "data.formatt" in message and str(bad) in message and "\n" not in message


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("encoder.dim=abc", "encoder.dim"),
        ("data.format=parquet", "not one of"),
        ("protocol.fractions=0.8", "must be a list"),
        ("encoder.binary=3", "encoder.binary"),
        ("nonsense", "key=value"),
    ],
)
def test_wrong_types_are_rejected(override: str, needle: str):
    with pytest.raises(ConfigError, match=needle):
        load_config("configs/ml100k.yaml", [override])


def test_config_hash_is_stable_and_sensitive():
    a = load_config("configs/ml100k.yaml")
    b = load_config("configs/ml100k.yaml")
    c = load_config("configs/ml100k.yaml", ["data.uri=elsewhere"])
    assert config_hash(a.data) == config_hash(b.data)
    assert config_hash(a.data) != config_hash(c.data)


def test_default_sections_keep_their_rules():
    assert build(RunConfig, {}, "defaults") == RunConfig()


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["protocol.train_months=[2001-06,2002-13]"], "protocol.train_months holds '2002-13'"),
        (["protocol.train_months=[2002-03,2001-06]"], "ends before it starts"),
        (["protocol.train_months=[2001-06]"], "must be two months"),
        (["protocol.test_months=[]"], "protocol.split = months needs protocol.test_months"),
        (["finetune.code_mode=text"], "finetune.code_mode = 'text' is not a code format"),
        (["protocol.valid_months=[2002-03,2002-08]"], "train_months and protocol.valid_months"),
        (["protocol.fractions=[0.5,0.1]"], "protocol.fractions = [0.5, 0.1] must be three"),
        (["protocol.fractions=[0.8,0.3,-0.1]"], "protocol.fractions"),
        (["protocol.valid_small_fraction=1.5"], "protocol.valid_small_fraction = 1.5"),
        (["protocol.history_len=-1"], "protocol.history_len = -1 must be >= 0"),
        (["model.backbone="], "model.backbone is empty"),
        (["encoder.dim=12"], "encoder.dim = 12 is not a positive multiple of 8"),
        (["encoder.dim=0"], "encoder.dim = 0"),
        (["encoder.bits=36"], "encoder.bits = 36 is not a positive multiple of 8"),
        (["encoder.bits=64", "encoder.binary=false"], "encoder.bits = 64: this run trains no"),
        (["encoder.bits=64", "encoder.prior_bits=64"], "not between 0 and encoder.bits - 1 (63)"),
        (["encoder.bits=2048"], "encoder.bits = 2048 is more than 1024 bits"),
        (["encoder.checkpoint_every=0"], "encoder.checkpoint_every = 0 must be > 0"),
        (["encoder.lr=-1e-3"], "encoder.lr = -0.001 must be > 0"),
        (["encoder.beta_step=-0.1"], "encoder.beta_step = -0.1 must be >= 0"),
        (["prompts.modes=[text,bogus]"], "prompts.modes has bogus"),
        (["prompts.modes=[]"], "prompts.modes has no modes"),
        (["prompts.modes=[text,text]"], "prompts.modes has text twice"),
        (["prompts.code_template=<UserID> only"], "lacks the placeholder <TargetItemID>"),
        (["prompts.text_template=<TargetItemTitle> <Foo>"], "unknown placeholder <Foo>"),
        (["prompts.text_template=<TargetItemTitle> <UserID>"], "text prompts have no code"),
        (["prompts.history_len=-1"], "prompts.history_len = -1 must be >= 0"),
        (["finetune.step1.max_steps=0"], "finetune.step1 has no budget"),
        (["finetune.step2.batch_size=0"], "finetune.step2.batch_size = 0 must be > 0"),
        (["finetune.step2.epochs=-1"], "finetune.step2.epochs = -1.0 must be >= 0"),
        (["finetune.eval_every=0"], "finetune.eval_every = 0 must be > 0"),
        (["finetune.lora_dropout=1.0"], "finetune.lora_dropout = 1.0 is not in [0, 1)"),
        (["finetune.lora_target_modules=[]"], "finetune.lora_target_modules is empty"),
        (["score.modes=[bogus]"], "score.modes has bogus"),
        (["score.candidate_mode=bogus"], "score.candidate_mode = 'bogus' is not one of"),
        (["score.adapters={binry: none}"], "score.adapters has binry, not a prompt mode"),
        (["score.splits=[tst]"], "score.splits[0] = 'tst' is not one of: train, valid, test"),
        (["score.splits=[]"], "score.splits is empty"),
        (["score.batch_size=0"], "score.batch_size = 0 must be > 0"),
        (["keep_versions=0"], "keep_versions = 0 must be > 0"),
        (["run_name=../x"], "run_name '../x' is not a plain name"),
        (["run_name=a/b"], "run_name 'a/b' is not a plain name"),
        (["run_name=.."], "run_name '..' is not a plain name"),
        (["prompts.aux.tasks=[mim,cloze]"], "prompts.aux.tasks has cloze"),
        (["prompts.aux.mask_fraction=1.0"], "prompts.aux.mask_fraction = 1.0 is not in [0, 1)"),
        (["prompts.aux.min_positives=1"], "prompts.aux.min_positives = 1 must be >= 2"),
        (["prompts.aux.mim_template=<UserID> <ItemTitleList>"], "which text prompts have no"),
        (["finetune.aux={cloze: 0.1}"], "finetune.aux has cloze"),
        (["finetune.aux={mim: 0}"], "finetune.aux.mim = 0 must be > 0"),
        (["finetune.aux_steps=[step3]"], "finetune.aux_steps has step3"),
        (["finetune.ranking.loss=listnet"], "finetune.ranking.loss = 'listnet' is not known"),
        (["finetune.ranking.size=1"], "finetune.ranking.size = 1 must be >= 2"),
        (["finetune.ranking.pool=3"], "finetune.ranking.pool = 3 holds fewer than the 19"),
        (["finetune.ranking.uniform_share=1.5"], "finetune.ranking.uniform_share = 1.5 is not"),
        (
            ["finetune.strategy=ranking", "retrieve.top_n=0"],
            "finetune.strategy ranking trains on the retriever's candidates",
        ),
        (
            ["finetune.strategy=one_step_ranking", "finetune.ranking.pool=200"],
            "finetune.ranking.pool = 200 is more than the retrieve.top_n",
        ),
        (
            ["finetune.strategy=ranking", "prompts.aux.tasks=[mim]", "finetune.aux={mim: 0.2}"],
            "finetune.aux mixes aux tasks into step1, a listwise step of ranking",
        ),
        (["rerank.max_users=-1"], "rerank.max_users = -1 must be >= 0"),
        (["rerank.alpha=1.5"], "rerank.alpha = 1.5 is not in [0, 1]"),
        (["rerank.alpha=nan"], "rerank.alpha = nan is not in [0, 1]"),
        (["rerank.alpha_grid=[0.5,1]"], "rerank.alpha_grid = [0.5, 1.0] must be"),
        (["rerank.alpha_grid=[0,-0.5]"], "must be distinct weights in [0, 1] holding 0"),
        (["rerank.alpha_grid=[0,0.5,0.5]"], "must be distinct weights in [0, 1] holding 0"),
        (["rerank.popular_places=[1,2]"], "rerank.popular_places = [1, 2] must be distinct"),
        (["rerank.popular_places=[0,-1]"], "must be distinct places holding 0"),
        (
            ["rerank.top_n=4", "rerank.popular_places=[0,5]"],
            "gives popular items more places than the rerank.top_n = 4 candidates",
        ),
        (
            [
                "finetune.strategy=ranking",
                "finetune.code_mode=soft",
                "prompts.modes=[text,soft]",
                "finetune.soft.curriculum=true",
            ],
            "listwise step trains on groups without text versions",
        ),
        (["encoder.distill_weight=1"], "encoder.distill_weight = 1.0 distills the float"),
        (
            ["encoder.float_first=true", "encoder.binary=false"],
            "encoder.float_first starts the codes from the float model",
        ),
        (["evaluate.popularity_windows=[]"], "evaluate.popularity_windows = [] must be"),
        (["evaluate.popularity_windows=[7,7]"], "must be distinct positive days"),
        (["evaluate.popularity_windows=[0,30]"], "must be distinct positive days"),
        (["evaluate.bootstrap=-1"], "evaluate.bootstrap = -1 must be >= 0"),
        (
            ["prompts.modes=[text,binary]", "score.modes=[dotdec]"],
            "score.modes has dotdec, which prompts.modes does not render",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_values_fail_at_load_in_one_line(overrides: list[str], needle: str):
    with pytest.raises(ConfigError) as err:
        load_config("configs/ml1m.yaml", overrides)
    message = str(err.value)
    assert needle in message and "configs/ml1m.yaml" in message
    assert "\n" not in message


def test_popular_places_are_free_where_the_llm_reranks_nothing():
    cfg = load_config("configs/ml100k.yaml", ["rerank.top_n=0"])
    assert cfg.rerank.popular_places == [0, 1, 2, 3, 5] and cfg.rerank.top_n == 0


def test_status_with_a_bad_value_exits_2_before_ray(monkeypatch, capsys):
    import ray

    from jobs import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("binllm status started Ray")

    def no_status(cfg):
        raise AssertionError("binllm status went past loading the config")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(cli, "print_status", no_status)
    assert cli.main(["status", "configs/ml1m.yaml", "--set", "encoder.dim=12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binllm: error: encoder.dim = 12 is not a positive multiple of 8")
    assert err.count("\n") == 1


def test_local_paths_are_made_absolute_where_they_are_given(tmp_path, monkeypatch):
    """A Ray worker runs in another working directory (often on another node): every local
    path is absolute before anything is shipped, and is recorded so in the run."""
    config = Path("configs/tiny.yaml").resolve()
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        config,
        [
            "data.uri=../data/ml-100k",
            "model.backbone=models/x.gguf",
            "finetune.init_adapter=./a/step1",
            "score.adapters={text: step1, binary: ../b, dotdec: none, hex: s3://k/a}",
            "data.cache_dir=cache",
        ],
    )
    assert cfg.output_root == str(tmp_path / "runs")
    assert cfg.data.uri == str(tmp_path.parent / "data" / "ml-100k")
    assert cfg.model.backbone == str(tmp_path / "models" / "x.gguf")
    assert cfg.finetune.init_adapter == str(tmp_path / "a" / "step1")
    assert cfg.score.adapters == {
        "text": "step1",
        "binary": str(tmp_path.parent / "b"),
        "dotdec": "none",
        "hex": "s3://k/a",
    }
    assert cfg.data.cache_dir == str(tmp_path / "cache")


def test_uris_hub_ids_tiny_and_home_caches_stay_as_given(tmp_path, monkeypatch):
    config = Path("configs/tiny.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, ["data.uri=s3://bucket/ml", "output_root=s3://bucket/runs"])
    assert (cfg.data.uri, cfg.output_root) == ("s3://bucket/ml", "s3://bucket/runs")
    assert cfg.model.backbone == "tiny"
    assert cfg.data.cache_dir.startswith("~/")  # each node's own home
    hub = load_config(config, ["model.backbone=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert hub.model.backbone == "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = load_config(config, ["model.backbone=file://m/x.gguf"])
    assert local.model.backbone == str(tmp_path / "m" / "x.gguf")


def test_an_error_an_override_brings_in_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["encoder.lr=0.1", "encoder.patience=-1"])
    assert str(err.value) == (
        "encoder.patience = -1 must be > 0 at --set encoder.patience=-1 over configs/tiny.yaml"
    )


def test_a_code_longer_than_any_prompt_can_hold_is_refused_at_load():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["encoder.dim=65536"])
    assert "encoder.dim = 65536 is more than 1024 bits at --set encoder.dim=65536 over" in str(
        err.value
    )
