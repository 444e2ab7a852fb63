"""The model registry half of the MLflow adapter (`tune_cells.tracking.Tracker` mixes it in):
registering checkpoints as models, versions, aliases, and loading them back."""

from __future__ import annotations

import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException

from tune_cells.errors import UserInputError
from tune_cells.logged_runs import LoggedVersion
from tune_cells.tasks import registered_names
from tune_cells.tracking_checks import local_artifact_path

MODEL_CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")  # the pyfunc's models-from-code file
CHAMPION, PREVIOUS_CHAMPION, CHALLENGER = "champion", "previous-champion", "challenger"


class RegistryMixin:
    """Needs `self.client` (an MlflowClient), `self.tracking_uri` and `self._fluent(run_id)`."""

    def log_model(self, run_id: str, checkpoint_dir: Path, registered_name: str, tags: dict, signature) -> str:
        """Log a checkpoint as a pyfunc model in `run_id` and register it as a new version that
        carries `tags` from its creation (one registry call: a crash leaves no untagged version).
        `signature`: the task kind's MLflow signature."""
        import mlflow.pyfunc

        with self._fluent(run_id), warnings.catch_warnings():
            # The signature is explicit; an input example would have to be an image file.
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE_FILE),
                artifacts={"checkpoint": str(checkpoint_dir)},
                pip_requirements=_pip_requirements(),
                signature=signature,
            )
        with self._fluent(None):
            version = mlflow.register_model(info.model_uri, registered_name,
                                            tags={key: str(value) for key, value in tags.items()})
        return str(version.version)

    def version_of_search(self, name: str, search_run_id: str):
        """The version registered by a search (tag `search_run_id`), if it got that far, else None."""
        try:
            versions = self.client.search_model_versions(f"name='{name}' and tags.search_run_id='{search_run_id}'")
        except MlflowException as exc:  # (an absent model gives no versions, not this)
            if is_absent(exc):
                return None
            raise  # a failing registry is no answer: registering again would make a second version
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def set_version_tags(self, name: str, version: str, tags: dict) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value))

    def move_champion(self, name: str, version: str, previous: str | None) -> None:
        """`champion` → `version`, and `previous-champion` → the version it left. Idempotent: a
        promotion that crashed between the two writes repeats both with the same values."""
        if previous and previous != version:
            self.client.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
            # Its card and the UI read this tag as its status: "champion: ..." no longer holds.
            self.client.set_model_version_tag(name, previous, "promotion_reason", f"champion until version {version} "
                                              f"replaced it ({time.strftime('%Y-%m-%d %H:%M')})")
        self.client.set_registered_model_alias(name, CHAMPION, version)

    def champion_uri(self, task: str) -> str:
        """The real-data champion of a task if there is one, else the demo champion. The store must
        exist (`tune_cells.commands.opening` checks it first, with the message for that)."""
        for name in registered_names(task):
            if self.version_for_alias(name, CHAMPION) is not None:
                return f"models:/{name}@{CHAMPION}"
        raise UserInputError(f"no champion for task {task} in {self.tracking_uri}: run `tune-cells search {task}` "
                             f"(or `tune-cells promote {task} VERSION`) first, or give --model-uri")

    def model_name_with_version(self, task: str, version: str) -> str:
        """The task's registered model (real data first, then demo) that has `version`."""
        for name in registered_names(task):
            if self.find_version(name, version) is not None:
                return name
        raise UserInputError(f"no version {version} of {' or '.join(registered_names(task))} in {self.tracking_uri}")

    def find_version(self, name: str, version: str):
        """The version, or None when the registry has no such model or version (any other failure of
        the store is raised: it is no answer). A `version` that is no version number is refused."""
        check_version(version)
        try:
            return self.client.get_model_version(name, version)
        except MlflowException as exc:
            if is_absent(exc):
                return None
            raise

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def delete_alias(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def version_for_alias(self, name: str, alias: str):
        """The version `alias` points at, or None when there is no such model or alias."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if is_absent(exc):
                return None
            raise

    def resolve_model(self, model_uri: str, task: str | None = None):
        """The registry version behind `models:/NAME@ALIAS` or `models:/NAME/VERSION`; with `task`,
        it must be a model of that task."""
        name, alias, number = parse_model_uri(model_uri)
        try:
            if alias:
                version = self.client.get_model_version_by_alias(name, alias)
            else:
                version = self.client.get_model_version(name, number)
        except MlflowException as exc:
            if not is_absent(exc):
                raise
            raise UserInputError(f"{model_uri}: not found in {self.tracking_uri} ({exc.error_code})") from None
        recorded = LoggedVersion.of(version).task
        if task is not None and recorded != task:
            raise UserInputError(f"{model_uri} is a {recorded or 'unknown'!r} model, not {task!r}")
        return version

    def load_classifier(self, model_uri: str):
        """A registered model's predictor (an ImageClassifier, or an ImageSegmenter for a
        segmentation model), rebuilt from its checkpoint (JSON spec and state_dict) by the project's
        own loader: nothing stored with the model is run."""
        with tempfile.TemporaryDirectory(prefix="tune-cells-model-") as folder:
            return load_registered_predictor(self.download_model(model_uri, Path(folder)), model_uri)

    def download_model(self, model_uri: str, into: Path) -> Path:
        """Copy a registered model's folder (MLmodel, code file, checkpoint) into the local folder `into`."""
        import mlflow.artifacts

        version = self.resolve_model(model_uri)
        # The storage location itself: a models:/ URI would be resolved through MLflow's global registry URI.
        location = self.client.get_model_version_download_uri(version.name, version.version)
        require_local_artifacts(location, model_uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(into),
                                                        tracking_uri=self.tracking_uri))


def require_local_artifacts(artifact_uri: str, what: str) -> None:
    """Artifacts in a local folder must still be there: the store keeps their absolute path, so a
    working folder that was moved or copied points at the old place (MLflow fails over several lines)."""
    folder = local_artifact_path(artifact_uri)
    if folder is None or folder.exists():
        return
    missing = folder
    while not missing.parent.exists():  # the highest folder that is gone: the old working folder, if it moved
        missing = missing.parent
    raise UserInputError(f"{what}: the store's artifacts are at {folder}, and {missing} no longer exists "
                         "(the working folder moved? the store keeps absolute paths: move it back)")


def is_absent(exc: MlflowException) -> bool:
    """The registry answered that the model, version or alias does not exist. MLflow says so with
    RESOURCE_DOES_NOT_EXIST, except for an absent alias or a version that is no number (also a
    version that does not exist): INVALID_PARAMETER_VALUE. Anything else (a server that fails, a
    refused permission) is not an answer and must not read as "no champion"; nor is MLflow's own
    INVALID_PARAMETER_VALUE for a client setting (two TLS options, a retry count out of range)."""
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
        return True
    message = str(exc)
    return exc.error_code == "INVALID_PARAMETER_VALUE" and ("not found" in message or "must be an integer" in message)


def model_checkpoint(model_dir: Path, model_uri: str) -> Path:
    """The checkpoint folder (spec and weights) inside a downloaded model folder, where its MLmodel
    file says (`artifacts/<name of the folder logged>`), read as data."""
    import yaml

    try:
        meta = yaml.safe_load((model_dir / "MLmodel").read_text())
        folder = (model_dir / meta["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]).resolve()
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        folder = None
    if folder is None or not folder.is_relative_to(model_dir.resolve()) or not folder.is_dir():
        raise UserInputError(f"{model_uri}: not a tune-cells model (its MLmodel file names no checkpoint folder)")
    return folder


def load_registered_predictor(model_dir: Path, model_uri: str):
    """The predictor of a downloaded model folder. A damaged checkpoint is named by the model's URI
    and the file's path inside the checkpoint: the download folder is gone when the user reads it."""
    from tune_cells.kinds import load_predictor

    checkpoint = model_checkpoint(model_dir, model_uri)
    try:
        return load_predictor(checkpoint)
    except UserInputError as exc:
        message = str(exc)
        for folder in (checkpoint, model_dir.resolve(), model_dir):  # the checkpoint first: it lies inside
            message = message.replace(f"{folder}{os.sep}", "")
        raise UserInputError(f"{model_uri}: {message}") from None


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model (m-...) a registry version was made from, if any."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = str(getattr(version, "source", ""))
    return source[len("models:/"):].split("/")[0] if source.startswith("models:/m-") else None


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    names = ["torch", "torchvision", "mlflow", "numpy", "pandas", "pillow", "scikit-learn",
             "segmentation-models-pytorch"]
    return [f"{name}=={version(name)}" for name in names] + ["tune-cells"]


def parse_model_uri(model_uri: str) -> tuple[str, str, str]:
    """(name, alias, "") of models:/NAME@ALIAS, or (name, "", version) of models:/NAME/VERSION;
    anything else is the user's --model-uri to fix (checked before any store is opened), as is a
    name, alias or version the registry would refuse (MLflow says so in its own words, exit 1)."""
    parsed = urlparse(model_uri)
    path = (parsed.netloc + parsed.path).strip("/")
    if "@" in path:
        name, _, alias = path.partition("@")
        number = ""
    else:
        name, _, number = path.rpartition("/")
        alias = ""
    if parsed.scheme != "models" or not name or not (alias or number):
        raise UserInputError(f"--model-uri {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "/" in name or ":" in name:  # MLflow's rule for registered model names
        raise UserInputError(f"--model-uri {model_uri}: model name {name!r} cannot hold '/' or ':' (expected "
                             "models:/NAME@ALIAS or models:/NAME/VERSION)")
    if alias and not (ALIAS.fullmatch(alias) and len(alias) <= MAX_ALIAS_LENGTH):
        raise UserInputError(f"--model-uri {model_uri}: alias {alias!r} is no alias name (letters, digits, '_' and "
                             f"'-', at most {MAX_ALIAS_LENGTH})")
    if number:
        check_version(number, f"--model-uri {model_uri}: ")
    return name, alias, number


ALIAS = re.compile(r"[\w\-]+")  # MLflow's rule for alias names
MAX_ALIAS_LENGTH = 255
MAX_VERSION = 2**63 - 1  # the registry stores a version as a 64-bit integer


def check_version(version: str, where: str = "") -> None:
    """`version` is a registry version number: digits only ("01" is version 1), within its integer."""
    if not re.fullmatch(r"[0-9]+", version) or int(version) > MAX_VERSION:
        raise UserInputError(f"{where}version {version!r} is no version number (a whole number, at most "
                             f"{MAX_VERSION})")
