"""mergekit-evolve configs as evomerge searches: `evomerge search --mergekit-evolve evol.yml`.

The genome and tasks of a mergekit-evolve config (mergekit 0.1.5, `mergekit/evo/`) become an evomerge search
space, base, sources and lm-eval task specs. The mapping:

- `models` → the sources (local directories; a model that is also `base_model` is left out: its task vector
  is zero), `base_model` → the base (required: evomerge merges against a base);
- `merge_method` linear, task_arithmetic, ties, dare_ties → the same method; slerp is refused (its genome picks
  two models per slice by a softmax of weights — write a space with a `t` gene instead);
- `layer_granularity` k → `granularity: block, block_size: k` (0: one group, `global`); `filters` → `filters`
  (genes per filter and layer group, the rest in a default set); `smooth` → `smooth` (the groups' genes as a
  gradient list interpolated over depth); embeddings and head take what mergekit gives them: with slices the
  first and the last layer group's values, with `smooth` the first group's (mergekit reads a gradient list at
  t = 0 outside the layers);
- the weight gene → `weight` in [0, 1] (mergekit takes |x| of an unbounded value), or [-1, 1] with
  `allow_negative_weights`, starting at 1/len(models); the density gene → `density` in [0.01, 1] (mergekit
  clamps |x| to [0, 1]), starting at 1; `normalize` (default on for linear, ties, dare_ties) and `int8_mask`
  as mergekit-evolve sets them;
- `tasks` (name, weight, metric) → lm-eval task specs, documents split into a search part and a held-out test
  part (see `evaluate/lm_eval_adapter.py`); `num_fewshot` → every task's `num_fewshot`; `limit` →
  `--subsample` (a seeded subset per trial, like mergekit-evolve's `shuffle: true`); `apply_chat_template` and
  `fewshot_as_multiturn` (on unless the config turns them off) → the same options of every task.

Not carried over: mergekit-evolve merges in bfloat16 (evomerge: `--dtype`, default float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError

METHOD_GENES = {  # mergekit-evolve's METHOD_PARAM_MAPS, minus slerp
    "linear": ["weight"],
    "task_arithmetic": ["weight"],
    "ties": ["weight", "density"],
    "dare_ties": ["weight", "density"],
}
GENOME_KEYS = {
    "models",
    "merge_method",
    "base_model",
    "tokenizer_source",
    "layer_granularity",
    "normalize",
    "allow_negative_weights",
    "filters",
    "smooth",
}
CONFIG_KEYS = {
    "genome",
    "tasks",
    "limit",
    "num_fewshot",
    "shuffle",
    "random_init",
    "apply_chat_template",
    "fewshot_as_multiturn",
}


@dataclass
class EvolveSearch:
    space: dict[str, Any]
    base: str
    sources: list[str]
    tasks: list[dict[str, Any]]  # lm-eval task specs
    subsample: int | None


def _model_path(ref: Any, where: str) -> str:
    path = ref.get("model") if isinstance(ref, dict) else ref
    if not isinstance(path, str) or not path:
        raise RecipeError(f"{where}: a model is a path (or {{model: path}}), got {ref!r}")
    if "+" in path:
        raise RecipeError(f"{where}: {path}: LoRA adapters (model+lora) are not supported; merge the adapter first")
    return path


def load_evolve_config(path: str | Path) -> EvolveSearch:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read the mergekit-evolve config ({e})") from None
    if not isinstance(data, dict) or "genome" not in data or "tasks" not in data:
        raise RecipeError(f"{path}: a mergekit-evolve config has genome: and tasks:")
    unknown = sorted(set(data) - CONFIG_KEYS) + [f"genome.{k}" for k in sorted(set(data["genome"]) - GENOME_KEYS)]
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}")
    genome = data["genome"]
    method = genome.get("merge_method")
    if method == "slerp":
        raise RecipeError(
            f"{path}: slerp genomes (two models chosen per slice by softmax) are not supported; write a search space "
            "with a t gene (search_spaces/) instead"
        )
    if method not in METHOD_GENES:
        raise RecipeError(f"{path}: merge_method must be one of {', '.join(METHOD_GENES)}, got {method!r}")
    root = path.parent
    resolve = lambda p: str((root / p) if not Path(p).is_absolute() else Path(p))  # noqa: E731
    models = [resolve(_model_path(m, f"{path}: genome.models")) for m in genome.get("models") or []]
    if genome.get("base_model") is None:
        raise RecipeError(f"{path}: genome.base_model is required (evomerge merges against a base model)")
    base = resolve(_model_path(genome["base_model"], f"{path}: genome.base_model"))
    sources = [m for m in models if Path(m).resolve() != Path(base).resolve()]
    if not sources:
        raise RecipeError(f"{path}: genome.models lists no model besides the base")
    granularity = int(genome.get("layer_granularity", 0) or 0)
    low = -1.0 if genome.get("allow_negative_weights") else 0.0
    genes: dict[str, Any] = {"weight": {"low": low, "high": 1.0, "init": round(1 / len(models), 6)}}
    if "density" in METHOD_GENES[method]:
        genes["density"] = {"low": 0.01, "high": 1.0, "init": 1.0}
    normalize = genome.get("normalize")
    if normalize is None:
        normalize = method in ("ties", "dare_ties", "linear")
    parameters: dict[str, Any] = {"normalize": bool(normalize)}
    if method in ("ties", "dare_ties"):
        parameters["int8_mask"] = True
    space = {
        "name": path.stem,
        "description": f"imported from the mergekit-evolve config {path.name}",
        "method": method,
        "granularity": "block" if granularity > 0 else "global",
        "block_size": max(granularity, 1),
        "filters": list(genome.get("filters") or []),
        "smooth": bool(genome.get("smooth", False)),
        "embed_head_genes": False,
        "genes": genes,
        "parameters": parameters,
    }
    if space["smooth"] and granularity == 0:
        space["smooth"] = False  # one group: nothing to interpolate (mergekit-evolve gives a scalar)
    tasks = []
    for t in data["tasks"] or []:
        t = {"name": t} if isinstance(t, str) else t
        if not isinstance(t, dict) or "name" not in t or set(t) - {"name", "weight", "metric"}:
            raise RecipeError(f"{path}: a task is a name or {{name, weight, metric}}, got {t!r}")
        spec = {"lm_eval": t["name"], "weight": t.get("weight", 1.0), "metric": t.get("metric", "acc,none")}
        if data.get("num_fewshot") is not None:
            spec["num_fewshot"] = data["num_fewshot"]
        for key in ("apply_chat_template", "fewshot_as_multiturn"):  # mergekit-evolve's defaults: both on
            spec[key] = bool(data.get(key, True))
        tasks.append(spec)
    if not tasks:
        raise RecipeError(f"{path}: tasks is empty")
    return EvolveSearch(space, base, sources, tasks, data.get("limit"))


def check_granularity(search: EvolveSearch, num_layers: int) -> None:
    """mergekit-evolve's own rule: the layer count is a multiple of layer_granularity."""
    k = search.space["block_size"]
    if search.space["granularity"] == "block" and num_layers % k:
        raise RecipeError(f"the models have {num_layers} layers, not a multiple of layer_granularity {k}")
