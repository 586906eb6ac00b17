"""Checks a recipe's models and endpoints before any Beam work, so that a wrong folder or model
name stops the run at once with the recipe field and the fix, not after every item has failed."""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from groundforge.recipe import Recipe

log = logging.getLogger(__name__)

# Status codes of a server that does not list its models: nothing to check against.
_NO_LISTING = {404, 405, 501}


class PreflightError(ValueError):
    """A model or endpoint of the recipe cannot be used; the message names each field."""


def preflight(recipe: Recipe) -> None:
    """Raise :class:`PreflightError` listing every model folder that does not load and every chat
    endpoint that is down or does not serve its model."""
    problems = [p for field, model in _models(recipe) if (p := check_model(field, model))]
    for role in ("grounder", "teacher", "student"):
        cfg = getattr(recipe, role)
        if cfg is not None and cfg.base_url:
            problem = check_endpoint(role, cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout)
            if problem:
                problems.append(problem)
    if problems:
        raise PreflightError("the recipe cannot run:\n" + "\n".join(f"- {p}" for p in problems))


def _models(recipe: Recipe) -> list[tuple[str, str]]:
    """``(recipe field, model)`` of every model this process or its workers load."""
    models = []
    if recipe.boxes.detector is not None:
        models.append(("boxes.detector.model", recipe.boxes.detector.model))
    for role in ("grounder", "teacher", "student"):
        cfg = getattr(recipe, role)
        if cfg is not None and not cfg.base_url:
            models.append((f"{role}.model", cfg.model))
    if recipe.embed.image != "color_histogram":
        models.append(("embed.image", recipe.embed.image))
    if recipe.scenes is not None and recipe.scenes.text_model:
        models.append(("scenes.text_model", recipe.scenes.text_model))
    return models


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model(field: str, model: str) -> str | None:
    """What is wrong with ``model`` (a local folder or a hub id), or None.

    A folder must hold a ``config.json`` that loads. A hub id is never downloaded here: with
    ``HF_HUB_OFFLINE`` set it must be in the local cache, otherwise it is left to the loader.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{field}: {model} is a file; give the folder the model was saved to"
        if not (path / "config.json").is_file():
            return (
                f"{field}: {model} has no config.json, so it is not a saved model folder; give "
                "the folder `save_pretrained` wrote (or a hub id)"
            )
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # any failure to load is the answer
            return f"{field}: {path / 'config.json'} does not load: {err}"
        return None
    if not _is_hub_id(model):
        return (
            f"{field}: the folder {model} does not exist; fix the path (a relative path is read "
            "from the recipe's folder) or give a hub id"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            return (
                f"{field}: {model} is not a folder (relative paths are read from the recipe's "
                "folder) and not in the local Hugging Face cache, which is all HF_HUB_OFFLINE "
                "allows; fix the path, or download the model first"
            )
    return None


def check_endpoint(
    role: str, base_url: str, model: str, api_key_env: str | None, timeout: float
) -> str | None:
    """What is wrong with ``base_url`` serving ``model`` (asked through ``GET /models``), or
    None. An endpoint that does not list its models is not checked."""
    url = base_url.rstrip("/") + "/models"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key_env and os.environ.get(api_key_env):
        request.add_header("Authorization", f"Bearer {os.environ[api_key_env]}")
    try:
        with urllib.request.urlopen(request, timeout=min(timeout, 30)) as response:
            listing = json.load(response)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return (
                f"{role}.api_key_env: {url} refused the request ({err.code}); set "
                f"{role}.api_key_env to the variable that holds this endpoint's key"
            )
        # Some servers answer chat requests but do not list models (or fail to): nothing to
        # compare the name with.
        note = "does not list" if err.code in _NO_LISTING else f"failed to list ({err.code})"
        log.warning("%s.base_url: %s %s its models; %s.model is not checked", role, url, note, role)
        return None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return (
            f"{role}.base_url: {base_url} does not answer ({reason}); start the server (e.g. "
            f"`groundforge serve-teacher MODEL`, `vllm serve MODEL`) or fix {role}.base_url"
        )
    except ValueError:
        return f"{role}.base_url: {url} did not answer JSON; is {base_url} an OpenAI-style API?"
    entries = listing.get("data") if isinstance(listing, dict) else None
    served = [m.get("id") for m in entries or [] if isinstance(m, dict)]
    if model in served:
        return None
    offer = f"it serves {', '.join(map(str, served))}" if served else "it lists no model"
    return f"{role}.model: {base_url} does not serve {model!r} ({offer}); set {role}.model to it"
