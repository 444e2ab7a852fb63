from pathlib import Path

import optuna
import pytest

from tune_cells.errors import UserInputError
from tune_cells.preflight import check_space
from tune_cells.search_spaces import builtin_space_path, load_space


def sample_many(space, n=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(space.sample(trial))
        study.tell(trial, 0.0)
    return configs


def test_nuclei_space_is_conditional_and_covers_the_brief():
    space = load_space(builtin_space_path("nuclei-scratch"))
    configs = sample_many(space)
    assert {c["model"] for c in configs} == {"small_convnet", "resnet18"}
    assert {c["optimizer"] for c in configs} == {"adamw", "sgd"}
    for config in configs:
        # depth and width exist exactly when the ConvNet is chosen (define-by-run conditionals)
        assert ("depth" in config) == (config["model"] == "small_convnet")
        assert ("width" in config) == (config["model"] == "small_convnet")
        low, high = (2e-4, 3e-3) if config["optimizer"] == "adamw" else (5e-3, 1e-1)  # one range per optimiser
        assert low <= config["lr"] <= high
        assert config["image_size"] in (64, 96) and config["flip"] is True
        for key in ("weight_decay", "batch_size", "affine", "color_jitter", "label_smoothing", "dropout"):
            assert key in config
    lrs = sorted(c["lr"] for c in configs if c["optimizer"] == "sgd")
    assert lrs[len(lrs) // 2] < 4e-2  # log scale: the median is near the geometric mean (2.2e-2)
    check_space(space, seed=0)


def test_fixed_space_is_a_pinned_configuration(tmp_path):
    path = tmp_path / "pinned.yaml"
    path.write_text("params:\n  model: small_convnet\n  lr: 0.001\n  depth: 3\n")
    configs = sample_many(load_space(path), n=3)
    assert configs == [{"model": "small_convnet", "lr": 0.001, "depth": 3}] * 3


@pytest.mark.parametrize(
    "text, message",
    [
        ("params:\n  lr: {float: [0.1, 0.01]}\n", "low 0.1 is above high 0.01"),
        ("params:\n  lr: {float: [0, 0.01], log: true}\n", "log scale needs low > 0"),
        ("params:\n  lr: {floaty: [0.1, 1]}\n", "unknown key 'floaty'"),
        ("params:\n  width: {choices: [1, 2], when: {model: x}}\n  model: x\n", "not an earlier parameter"),
        ("params:\n  model: {choices: []}\n", "non-empty list"),
        ("params:\n  lr: [0.1\n", "YAML syntax error at line"),
        ("just a string\n", "non-empty `params:`"),
        ("params:\n  lr: 0.1\nextra: 1\n", "unknown section 'extra'"),
        ("params:\n  lr: 0.1\ninitial_points:\n  - {nope: 1}\n", "unknown parameter 'nope'"),
        # what Optuna would refuse in every trial (ValueError, exit 1) is refused here, by name
        ("params:\n  lr: {float: [0.1, 1], step: 0}\n", "'lr': step must be a number above 0, not 0"),
        ("params:\n  depth: {int: [2, 8], step: -2}\n", "'depth': step must be a number above 0, not -2"),
        ("params:\n  depth: {int: [2, 8], step: 1.5}\n", "'depth': an int step must be a whole number"),
        ("params:\n  lr: {float: [0.1, 1], log: true, step: 0.1}\n", "'lr': give log or step, not both"),
        ("params:\n  lr: {float: [0.1, 1], log: 'yes'}\n", "'lr': log must be true or false"),
        ("params:\n  opt: {choices: [{name: sgd}]}\n", "'opt': choice {'name': 'sgd'} is a dict"),
        ("params:\n  width: {choices: [[16, 32]]}\n", "'width': choice [16, 32] is a list"),
        ("params:\n  width: {choices: [16, 32], step: 16}\n", "'width': `step` applies to float and int ranges"),
    ],
)
def test_space_file_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_space(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("  model: {choices: [small_convnet, vgg99]}\n", "unknown model 'vgg99'"),
        ("  model: small_convnet\n  optimizer: sgdd\n", "unknown optimizer 'sgdd'; known: adamw, sgd"),
        ("  model: small_convnet\n  lr_schedule: {choices: [cosine, cosign]}\n", "unknown lr_schedule 'cosign'"),
    ],
)
def test_space_with_unknown_names_fails_before_any_trial(tmp_path, extra, message):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n" + extra + "  lr: 0.01\n")
    with pytest.raises(UserInputError, match=message):
        check_space(load_space(path), seed=0)


def test_logged_uris_lose_their_passwords():
    from tune_cells.tracking import without_credentials as _without_credentials

    assert _without_credentials("https://bob:s3cr3t@mlflow.example.org/") == "https://bob:***@mlflow.example.org/"
    assert _without_credentials("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert _without_credentials(None) is None
    # an '@' or ':' typed into the password, a database URI, a URI inside a message
    assert _without_credentials("http://bob:p@ss:w@host:5000/x") == "http://bob:***@host:5000/x"
    assert (_without_credentials("failed: postgresql+psycopg://bob:s3cr3t@db/mlflow and http://h:1/a@b")
            == "failed: postgresql+psycopg://bob:***@db/mlflow and http://h:1/a@b")


def test_steps_and_every_kind_of_choice_sample(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  depth: {int: [2, 8], step: 2}\n  drop: {float: [0.0, 0.5], step: 0.25}\n"
                    "  pick: {choices: [null, true, 3, 0.5, text]}\n")
    configs = sample_many(load_space(path))
    assert {c["depth"] for c in configs} <= {2, 4, 6, 8} and {c["drop"] for c in configs} <= {0.0, 0.25, 0.5}
    assert {c["pick"] for c in configs} == {None, True, 3, 0.5, "text"}


def test_a_space_that_is_a_folder_or_not_text_is_named(tmp_path):
    with pytest.raises(UserInputError, match="a folder; give a space file"):
        load_space(tmp_path)
    (tmp_path / "space.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserInputError, match="not a text file"):
        load_space(tmp_path / "space.yaml")


def test_a_shipped_space_is_named_without_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_space("folder-pretrained").source == load_space(builtin_space_path("folder-pretrained")).source
    (tmp_path / "folder-pretrained").write_text("params: {model: small_convnet, lr: 0.01}\n")
    assert load_space("folder-pretrained").params == {"model": "small_convnet", "lr": 0.01}  # a file wins
    with pytest.raises(UserInputError, match="no-such-space: no such file"):
        load_space("no-such-space")


@pytest.mark.parametrize("name", ["nuclei", "nuclei-scratch", "nuclei-pretrained", "hep2", "hep2-scratch",
                                  "hep2-pretrained", "hep2-mobilenet-pretrained", "leukemia", "leukemia-scratch", "lung",
                                  "lung-scratch", "lung-pretrained", "folder", "folder-scratch", "folder-pretrained"])
def test_every_shipped_space_loads(name):
    space = load_space(name)
    assert space.params["model"] and "lr" in space.params
    # the task defaults start pretrained and name their from-scratch fallback
    defaults = ("nuclei", "hep2", "leukemia", "folder", "lung")
    assert space.may_use_pretrained == ("pretrained" in name or name in defaults)
    assert space.fallback == (f"{name}-scratch" if name in defaults else None)


def test_a_trial_configuration_replays_as_the_spaces_optuna_params(tmp_path):
    """--warm-start and the live view: a configuration, typed or as MLflow's text, becomes exactly the
    params and distributions that sampling the space makes; one outside the space is None."""
    path = tmp_path / "mine.yaml"
    path.write_text("params:\n  model: {choices: [small_convnet, resnet18]}\n"
                    "  depth: {int: [2, 8], step: 2, when: {model: small_convnet}}\n"
                    "  lr: {float: [1.0e-4, 1.0e-2], log: true}\n  drop: {float: [0.0, 0.5], step: 0.25}\n"
                    "  flip: {choices: [true, false]}\n  image_size: 40\n")
    space = load_space(path)
    assert space.name == "mine"
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        config = space.sample(trial)
        study.tell(trial, 0.0)
        for given in (config, {**{k: str(v) for k, v in config.items()}, "not_in_the_space": "7"}):
            params, distributions = space.as_optuna(given)
            assert params == trial.params and distributions == trial.distributions
    base = {"model": "small_convnet", "depth": "4", "lr": "0.001", "drop": "0.25", "flip": "False", "image_size": "40"}
    assert space.as_optuna(base)[0] == {"model": "small_convnet", "depth": 4, "lr": 0.001, "drop": 0.25, "flip": False}
    assert space.as_optuna({**base, "model": "resnet18"})[0] == {"model": "resnet18", "lr": 0.001, "drop": 0.25,
                                                               "flip": False}  # depth does not apply: left out
    for outside in ({"lr": "0.5"}, {"depth": "5"}, {"depth": "4.0"}, {"drop": "0.3"}, {"model": "vgg"},
                    {"image_size": "64"}, {"flip": "maybe"}):
        assert space.as_optuna({**base, **outside}) is None, outside
    assert space.as_optuna({k: v for k, v in base.items() if k != "lr"}) is None


def test_a_default_space_falls_back_to_scratch_offline_with_one_line(tmp_path, monkeypatch, caplog):
    import logging

    from tune_cells.space_weights import fit_space_to_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("TUNE_CELLS_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="tune_cells.space_weights"):
        space = fit_space_to_weights(load_space("nuclei"))
    assert Path(space.source).name == "nuclei-scratch.yaml"
    assert caplog.messages == ["no ImageNet weights for mobilenet_v2, resnet18, resnet50 offline: searching "
                               "from-scratch models (nuclei-scratch)"]


def test_a_default_space_keeps_the_backbones_whose_weights_are_cached(tmp_path, monkeypatch, caplog):
    import logging

    from tune_cells.models import expected_weights_file
    from tune_cells.space_weights import fit_space_to_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNE_CELLS_OFFLINE", "1")
    cached = expected_weights_file("mobilenet_v2")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # its presence is what the choice reads; nothing is loaded here
    with caplog.at_level(logging.INFO, logger="tune_cells.space_weights"):
        space = fit_space_to_weights(load_space("nuclei"))
    assert space.params["model"] == "mobilenet_v2" and space.fallback == "nuclei-scratch"
    assert [p["model"] for p in space.initial_points] == ["mobilenet_v2"]  # ResNet-50's recipe left out
    assert caplog.messages == ["no ImageNet weights for resnet18, resnet50 offline: searching mobilenet_v2"]
    check_space(space, seed=0)


PER_OPTIMISER = """params:
  model: {choices: [small_convnet, resnet18]}
  optimizer: {choices: [adamw, sgd]}
  lr:
    - {float: [2.0e-4, 3.0e-3], log: true, when: {optimizer: adamw}}
    - {float: [5.0e-3, 1.0e-1], log: true, when: {optimizer: sgd}}
  momentum: 0.9
initial_points:
  - {optimizer: sgd, lr: 0.01}
  - {model: resnet18, lr: 0.02}
"""


def per_optimiser_space(tmp_path):
    path = tmp_path / "per-optimiser.yaml"
    path.write_text(PER_OPTIMISER)
    return load_space(path)


def test_each_optimiser_samples_its_own_lr_range_under_the_plain_name(tmp_path):
    from optuna.distributions import FloatDistribution

    space = per_optimiser_space(tmp_path)
    ranges = {"adamw": (2e-4, 3e-3), "sgd": (5e-3, 1e-1)}
    # TPE past its random start: one Optuna name with two distributions would fail here
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=4))
    for _ in range(16):
        trial = study.ask()
        config = space.sample(trial)
        study.tell(trial, config["lr"])
        optimizer, name = config["optimizer"], f"lr({config['optimizer']})"
        assert set(config) == {"model", "optimizer", "lr", "momentum"}  # `lr`, never `lr(sgd)`
        assert ranges[optimizer][0] <= config["lr"] <= ranges[optimizer][1]
        assert trial.params[name] == config["lr"] and "lr" not in trial.params
        assert trial.distributions[name] == FloatDistribution(*ranges[optimizer], log=True)
    assert {t.params["optimizer"] for t in study.trials} == {"adamw", "sgd"}


@pytest.mark.filterwarnings("ignore:Fixed parameter lr")  # 0.02 enqueued for AdamW too: outside its range, kept
def test_initial_points_in_plain_names_reach_the_right_alternative(tmp_path):
    space = per_optimiser_space(tmp_path)
    first, second = space.initial_points
    assert space.optuna_point(first) == {"optimizer": "sgd", "lr(sgd)": 0.01}
    # the optimiser is left to the sampler: the value waits under both names, Optuna uses the one it suggests
    assert space.optuna_point(second) == {"model": "resnet18", "lr(adamw)": 0.02, "lr(sgd)": 0.02}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in (first, second, second, second):
        study.enqueue_trial(space.optuna_point(point), skip_if_exists=False)
    configs = []
    for _ in range(4):
        trial = study.ask()
        configs.append(space.sample(trial))
        study.tell(trial, 0.0)
    assert configs[0]["optimizer"] == "sgd" and configs[0]["lr"] == 0.01
    assert study.trials[0].params["lr(sgd)"] == 0.01
    assert all(c["lr"] == 0.02 and c["model"] == "resnet18" for c in configs[1:])


@pytest.mark.filterwarnings("ignore:Fixed parameter lr")
def test_ray_trial_configurations_carry_the_plain_name_only(tmp_path):
    """Ray's OptunaSearch adds every suggested name to a trial's config: the space's `lr(sgd)` is
    dropped there, so the typed configuration and MLflow's params see `lr` alone."""
    from tune_cells.ray_searcher import PlainNamesOptunaSearch

    space = per_optimiser_space(tmp_path)
    searcher = PlainNamesOptunaSearch(space=space, plain=space.plain, metric="val_accuracy", mode="max",
                                      points_to_evaluate=[space.optuna_point(p) for p in space.initial_points],
                                      sampler=optuna.samplers.RandomSampler(seed=0))
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert configs[0] == {"model": configs[0]["model"], "optimizer": "sgd", "lr": 0.01, "momentum": 0.9}
    assert configs[1]["lr"] == 0.02 and configs[1]["model"] == "resnet18"
    for config in configs:
        assert set(config) == {"model", "optimizer", "lr", "momentum"}, config


def test_a_finished_trial_replays_as_its_alternatives_optuna_name(tmp_path):
    """--warm-start and the live view: `lr` of an SGD trial becomes `lr(sgd)` with SGD's range."""
    import yaml

    from tune_cells.search_spaces import SearchSpace

    space = per_optimiser_space(tmp_path)
    # the space as the search logs it (search_space.yaml, which `report` replays): `when` keeps its earlier parameters
    logged = SearchSpace(yaml.safe_load(space.to_yaml())["params"], "logged space")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(10):
        trial = study.ask()
        config = space.sample(trial)
        study.tell(trial, 0.0)
        for given in (config, {k: str(v) for k, v in config.items()}):  # as MLflow logs it: text
            assert space.as_optuna(given) == logged.as_optuna(given) == (trial.params, trial.distributions)
    sgd = {"model": "resnet18", "optimizer": "sgd", "lr": "0.05", "momentum": "0.9"}
    assert space.as_optuna(sgd)[0] == {"model": "resnet18", "optimizer": "sgd", "lr(sgd)": 0.05}
    assert space.as_optuna({**sgd, "optimizer": "adamw"}) is None  # 0.05 is outside AdamW's range
    assert space.as_optuna({**sgd, "optimizer": "adamw"}, strict=False)[0]["lr(adamw)"] == 0.05  # an initial point
    assert space.as_optuna({k: v for k, v in sgd.items() if k != "lr"}) is None


def test_per_case_checks_follow_conditional_and_integer_parameters(tmp_path):
    path = tmp_path / "space.yaml"
    # momentum exists only for SGD; `depth` 3 and 4 are every value of its range: both are fully covered
    path.write_text("params:\n  optimizer: {choices: [adamw, sgd]}\n"
                    "  momentum: {float: [0.8, 0.95], when: {optimizer: sgd}}\n"
                    "  nesterov_lr:\n    - {float: [0.01, 0.1], when: {momentum: 0.9}}\n"
                    "    - {float: [0.001, 0.01], when: {momentum: [0.8, 0.95]}}\n"
                    "    - {float: [0.02, 0.2], when: {momentum: {not: 1}}}\n")
    with pytest.raises(UserInputError, match="'nesterov_lr', alternative 3: `when` gives 'momentum'"):
        load_space(path)
    path.write_text("params:\n  model: {choices: [a, b]}\n  optimizer: {choices: [adamw, sgd], when: {model: a}}\n"
                    "  depth: {int: [3, 4]}\n"
                    "  lr:\n    - {float: [0.001, 0.01], when: {optimizer: adamw}}\n"
                    "    - {float: [0.01, 0.1], when: {optimizer: sgd}}\n"
                    "  width:\n    - {choices: [8, 16], when: {depth: 3}}\n    - {choices: [16, 32], when: {depth: 4}}\n")
    space = load_space(path)  # model b: no optimizer, so no lr either
    configs = sample_many(space, n=30)
    assert all(("lr" in c) == (c["model"] == "a") and "width" in c for c in configs)
    merged = space.merged().params  # what the report's importance replays: one range per parameter
    assert merged["lr"] == {"float": [0.001, 0.1], "when": {"optimizer": ["adamw", "sgd"]}}
    assert merged["width"] == {"choices": [8, 16, 32], "when": {"depth": [3, 4]}}


@pytest.mark.parametrize(
    "lr, message",
    [
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimizer: adamw}}\n    - {float: [1.0e-3, 0.1]}\n",
         "'lr': alternative 2 has no `when`"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimizer: adamw}}\n    - {float: [1.0e-3, 0.1], when: {optimizer: adamw}}\n",
         "'lr': alternatives 1 and 2 have the same `when`"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimizer: [adamw, sgd]}}\n    - {float: [1.0e-3, 0.1], when: {optimizer: sgd}}\n",
         "'lr': alternatives 1 and 2 both apply when optimizer='sgd'"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimizer: adamw}}\n    - {float: [1.0e-3, 0.1], when: {optimizer: sdg}}\n",
         "'lr': no alternative applies when optimizer='sgd' (give one for every case)"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimizer: adamw}}\n    - 0.01\n",
         "'lr': alternative 2 must be a range or choices with `when`, not 0.01"),
        ("\n    - {float: [1.0e-2, 1.0e-4], when: {optimizer: adamw}}\n    - {float: [1.0e-3, 0.1], when: {optimizer: sgd}}\n",
         "'lr', alternative 1: low 0.01 is above high 0.0001"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: {optimiser: adamw}}\n    - {float: [1.0e-3, 0.1], when: {optimizer: sgd}}\n",
         "'lr', alternative 1: `when` refers to 'optimiser', which is not an earlier parameter"),
        ("\n    - {float: [1.0e-4, 1.0e-2], when: [optimizer, adamw]}\n    - {float: [1.0e-3, 0.1], when: {optimizer: sgd}}\n",
         "'lr', alternative 1: `when` maps earlier parameters to a value or a list of values"),
        (" []\n", "'lr': a list gives one range or choices per case; it is empty"),
    ],
)
def test_a_bad_per_case_parameter_is_one_line_naming_file_and_parameter(tmp_path, lr, message):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  optimizer: {choices: [adamw, sgd]}\n  lr:" + lr)
    with pytest.raises(UserInputError) as error:
        load_space(path)
    text = str(error.value)
    assert text.startswith(f"{path}: parameter ") and message in text and "\n" not in text, text


def test_a_bad_per_case_name_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  optimizer: {choices: [adamw, a/b]}\n  lr:\n    - {float: [0.001, 0.01], when: "
                    "{optimizer: adamw}}\n    - {float: [0.01, 0.1], when: {optimizer: a/b}}\n")
    with pytest.raises(UserInputError, match="'lr': alternative 2's `when` values may not contain '/'"):
        load_space(path)


def test_lungs_default_keeps_its_encoders_whose_weights_are_cached(tmp_path, monkeypatch, caplog):
    """A U-Net's pretrained weights are its encoder's: `model: unet` alone must not send lung to its
    from-scratch fallback (it did, found on the real data: "no ImageNet weights for resnet18")."""
    import logging

    from tune_cells.models import expected_weights_file
    from tune_cells.space_weights import fit_space_to_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TUNE_CELLS_OFFLINE", "1")
    cached = expected_weights_file("mobilenet_v2")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="tune_cells.space_weights"):
        space = fit_space_to_weights(load_space("lung"))
    assert space.params["encoder"] == "mobilenet_v2" and space.params["pretrained"] is True
    assert [p["encoder"] for p in space.initial_points] == ["mobilenet_v2"]
    assert caplog.messages == ["no ImageNet weights for resnet18, resnet34 offline: searching mobilenet_v2"]
    caplog.clear()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with caplog.at_level(logging.INFO, logger="tune_cells.space_weights"):
        assert Path(fit_space_to_weights(load_space("lung")).source).name == "lung-scratch.yaml"
    assert caplog.messages == ["no ImageNet weights for mobilenet_v2, resnet18, resnet34 offline: searching "
                               "from-scratch models (lung-scratch)"]


def test_the_largest_value_a_space_can_give_a_parameter(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  model: {choices: [small_convnet, resnet18]}\n"
                    "  image_size:\n    - {choices: [64, 96], when: {model: small_convnet}}\n"
                    "    - {int: [96, 160], when: {model: resnet18}}\n  lr: 0.01\n"
                    "initial_points:\n  - {model: small_convnet, image_size: 64}\n")
    space = load_space(path)
    assert space.largest("image_size") == 160 and space.largest("lr") == 0.01 and space.largest("depth") is None
    assert load_space("folder").largest("image_size") == 128  # blood is decoded at 128 px, not its native 363


def test_ensemble_is_one_value_per_space_not_a_searched_range(tmp_path):
    """Only promotion reads `ensemble`: sampling it would spend trials on identical training."""
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  model: small_convnet\n  lr: 0.001\n  ensemble: {choices: [1, 2]}\n")
    with pytest.raises(UserInputError, match="`ensemble` is read at promotion, after the trials: give it one value"):
        check_space(load_space(path), seed=0)
    path.write_text("params:\n  model: small_convnet\n  lr: 0.001\n  ensemble: 3\n")
    check_space(load_space(path), seed=0)
