"""`soaes pipeline` recipes: one YAML that names the stages to run and each stage's settings.

Settings reuse the packages' own dataclasses (soaes-train's `TrainConfig`, soaes-distill's `KDConfig`), so a
field a package adds is settable here with no change. `load_pipeline_recipe` checks what can be checked before
any work starts and reports it as one line naming the recipe file and the field.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soaes_core import DEFAULT_MODEL, from_dict, load_yaml
from soaes_core.config import OMIT_IF_DEFAULT, apply_overrides
from soaes_core.errors import ConfigError, SoaesError
from soaes_core.placement import Placement
from soaes_distill.feature_kd import FeatureKDConfig
from soaes_distill.trainer import KDConfig
from soaes_train.config import TrainConfig

from .scale_plan import ScaleSettings

# Every stage the pipeline knows, in the order they run. `decontaminate` and `sft_stage2_only` are optional.
STAGE_ORDER = ("curate", "decontaminate", "pack", "cpt", "sft_stage1", "sft_stage2", "sft_stage2_only",
               "teacher_data", "dump_logits", "distill_draft", "specdec_bench", "export", "eval", "report")
DEFAULT_STAGES = ["curate", "pack", "cpt", "sft_stage1", "sft_stage2", "teacher_data", "dump_logits",
                  "distill_draft", "specdec_bench", "export", "eval", "report"]
SAMPLE_PREFIX = "sample:"  # soaes-data's shipped samples
EVAL_SAMPLE_PREFIX = "eval-sample:"  # soaes-eval's shipped samples
DISTILL_DATA_PREFIX = "distill-data:"  # soaes-distill's shipped data (the committed held-out domain prompts)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DTYPES = ("float32", "bfloat16", "float16")  # plus soaes_core's aliases (fp32, bf16, fp16, half, float)
# Stages that load a model: each takes the recipe's `placement`, or its own `<stage>.placement` when set
MODEL_STAGES = ("teacher_data", "dump_logits", "distill_draft", "specdec_bench", "eval")


def _check_min(obj: Any, minimum: int, *names: str, optional: bool = False) -> None:
    """ValueError naming the first field of `names` below `minimum` (None allowed when `optional`)."""
    for name in names:
        value = getattr(obj, name)
        if value is None and optional:
            continue
        if value is None or value < minimum:
            unset = " (or unset)" if optional else ""
            raise ValueError(f"{name} must be >= {minimum}{unset}, got {value}")


def _check_dtype(name: str, value: str | None, optional: bool = False) -> None:
    from soaes_core.models import resolve_dtype

    if value is None and optional:
        return
    try:
        dtype = resolve_dtype(value) if isinstance(value, str) else None
    except SoaesError:
        dtype = None
    if dtype is None or str(dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")


@dataclass
class CurateSettings:
    """Curation of the raw corpus by soaes-data (`recipe`: its curation config; `overrides`: dotted keys)."""

    recipe: str = "sample:recipe.yaml"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecontaminateSettings:
    """Drop curated documents and SFT conversations that share `ngram`-character n-grams with benchmark items."""

    eval_dirs: list[str] = field(default_factory=lambda: ["eval-sample:cmmlu", "eval-sample:ceval"])
    ngram: int = 13
    min_overlaps: int = 1

    def __post_init__(self) -> None:
        _check_min(self, 1, "ngram", "min_overlaps")


@dataclass
class PackSettings:
    """Tokenize and pack the CPT corpus and the two SFT pools with the target's tokenizer."""

    max_length: int = 256
    cpt_data: str | None = None  # an explicit corpus JSONL instead of the curated output
    sft_stage1: str = "sample:sft/dialog_pool.jsonl"
    sft_stage2: str = "sample:sft/expert_pool.jsonl"

    def __post_init__(self) -> None:
        _check_min(self, 2, "max_length")


@dataclass
class TrainStageSettings:
    """One CPT/SFT stage: soaes-train `TrainConfig` fields; `model`/`data` replace the upstream stage's output."""

    train: TrainConfig = field(default_factory=TrainConfig)
    model: str | None = None
    data: str | None = None
    max_length: int = 256

    def __post_init__(self) -> None:
        _check_min(self, 2, "max_length")


@dataclass
class DomainQuerySettings:
    """Extra training prompts made from domain text (soaes-distill `build_domain_queries`: keyword templates and
    passages), decontaminated against the held-out prompts. `texts`: JSONL files with `text` or chat `messages`."""

    max_queries: int = 0  # 0 = none
    num_terms: int = 200
    texts: list[str] = field(default_factory=lambda: ["sample:corpus/articles.jsonl"])

    def __post_init__(self) -> None:
        _check_min(self, 0, "max_queries")
        _check_min(self, 1, "num_terms")


@dataclass
class TeacherDataSettings:
    """The trained target's answers to domain prompts (KD training text) and the held-out prompts/answers: either
    the committed `heldout_prompts` file (training prompts sharing a `decontam_ngram`-character span with one are
    dropped) or every `holdout_every`-th prompt. `samples_per_prompt` adds answers sampled at the serving setting
    (`sample_temperature`, `sample_top_p`) to the greedy ones, so a draft also learns the distribution it serves."""

    prompts: list[str] = field(default_factory=lambda: ["sample:sft/expert_pool.jsonl", "sample:sft/dialog_pool.jsonl"])
    holdout_every: int = 4
    heldout_prompts: str | None = None
    max_heldout: int | None = None
    decontam_ngram: int = 8
    domain_queries: DomainQuerySettings = field(default_factory=DomainQuerySettings)
    max_prompts: int | None = None
    max_new_tokens: int = 48
    max_length: int = 192
    batch_size: int = 8
    samples_per_prompt: int = 0
    sample_temperature: float = 1.0
    sample_top_p: float = 0.7
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {self.holdout_every}")
        if self.samples_per_prompt < 0 or self.decontam_ngram < 1:
            raise ValueError("samples_per_prompt must be >= 0 and decontam_ngram >= 1")
        _check_min(self, 1, "max_new_tokens", "batch_size")
        _check_min(self, 2, "max_length")
        _check_min(self, 1, "max_prompts", "max_heldout", optional=True)
        if self.sample_temperature <= 0 or not 0.0 < self.sample_top_p <= 1.0:
            raise ValueError(f"need sample_temperature > 0 and 0 < sample_top_p <= 1, got {self.sample_temperature} "
                             f"and {self.sample_top_p}")


@dataclass
class DumpSettings:
    """Offline teacher logits (top-k) of the trained target on the teacher data (soaes-distill dump)."""

    top_k: int = 64
    batch_size: int = 8
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        _check_min(self, 1, "top_k", "batch_size")


@dataclass
class SweepPoint:
    alpha: float
    temperature: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"need 0 <= alpha <= 1 and temperature > 0, got {self.alpha} and {self.temperature}")


@dataclass
class DistillSettings:
    """The draft, distilled from the trained target. `kind: layer`: KD (α·KL + (1-α)·CE on the dumped logits) of a
    layer-truncated draft (or of `draft`, an explicit draft model), settings `kd` + `train`, optional α/τ `sweep`.
    `kind: feature`: an EAGLE-style head on the target's last hidden states (soaes-distill `train_feature_draft`,
    settings `feature`), which needs no logit dump."""

    kind: str = "layer"
    draft_layers: int = 4
    draft: str | None = None
    train_embeddings: bool = False
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: list[SweepPoint] = field(default_factory=list)  # extra (α, τ) drafts for Tables 3-4
    feature: FeatureKDConfig = field(default_factory=FeatureKDConfig)
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "feature"):
            raise ValueError(f"kind must be 'layer' or 'feature', got {self.kind!r}")
        _check_min(self, 1, "draft_layers")
        if self.kind == "feature" and (self.sweep or self.draft is not None):
            raise ValueError("kind 'feature' trains a feature head from the target: `sweep` and `draft` apply to "
                             "layer drafts only")


@dataclass
class BenchSettings:
    """Speculative decoding vs plain and prompt lookup (soaes-specdec bench), undistilled and distilled draft."""

    dtype: str = "float32"
    reference_dtype: str | None = "bfloat16"  # plain decoding also timed in this dtype; speedups use the faster
    num_speculative_tokens: list[int] = field(default_factory=lambda: [3, 5])
    modes: list[str] = field(default_factory=lambda: ["greedy", "top_p"])
    max_prompts: int = 4
    max_new_tokens: int = 48
    repeats: int = 3
    warmup: int = 1
    exactness_prompts: int = 4
    # > 0: also bench the distilled draft with prompt lookup beside it (soaes-specdec method speculative_lookup):
    # rows whose last lookup_min_ngram+ tokens occurred before propose the lookup_tokens that followed
    lookup_tokens: int = 0
    lookup_min_ngram: int = 2
    lookup_extend: list[str] = field(default_factory=list)  # modes with lookup tokens after the draft's too
    lookup_mix: float = 0.0  # sampling: a lookup row's first proposal from this lookup/draft mixture
    sampling_seeds: int = 1  # sampling mode: every prompt decoded under this many seeds per timed pass
    prepack: bool | None = None  # MKL-packed verification (unset = on where supported)
    # its own device (and sharding); `dtype` above sets the precision. Unset: the recipe's. (Same in every section.)
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        from soaes_specdec.bench import MODES

        _check_dtype("dtype", self.dtype)
        _check_dtype("reference_dtype", self.reference_dtype, optional=True)
        if not self.num_speculative_tokens or min(self.num_speculative_tokens) < 1:
            raise ValueError(f"num_speculative_tokens: give one or more ints >= 1, got {self.num_speculative_tokens}")
        for name, modes in (("modes", self.modes), ("lookup_extend", self.lookup_extend)):
            unknown = [m for m in modes if m not in MODES]
            if unknown or (name == "modes" and not modes):
                raise ValueError(f"{name}: choose from {', '.join(MODES)}, got {modes}")
        _check_min(self, 1, "max_prompts", "max_new_tokens", "repeats", "exactness_prompts")
        _check_min(self, 0, "warmup")
        if self.lookup_tokens < 0 or self.lookup_min_ngram < 1:
            raise ValueError(f"lookup_tokens must be >= 0 and lookup_min_ngram >= 1, got {self.lookup_tokens} and "
                             f"{self.lookup_min_ngram}")
        if self.lookup_extend and self.lookup_tokens <= max(self.num_speculative_tokens, default=0):
            raise ValueError(f"lookup_extend: lookup_tokens ({self.lookup_tokens}) must exceed every "
                             f"num_speculative_tokens ({self.num_speculative_tokens})")
        if not 0.0 <= self.lookup_mix < 1.0 or self.sampling_seeds < 1:
            raise ValueError(f"need 0 <= lookup_mix < 1 and sampling_seeds >= 1, got {self.lookup_mix} and "
                             f"{self.sampling_seeds}")


@dataclass
class ExportSettings:
    """The serving hand-off (soaes-specdec `export_for_vllm`): `draft` (a key of distill_draft's drafts.json) as a
    full-head HF directory vLLM loads, and the `vllm serve` command; n unset = the bench's fastest greedy n."""

    draft: str = "distilled"
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1 (or unset), got {self.num_speculative_tokens}")


@dataclass
class EvalSettings:
    """CMMLU / C-Eval before and after CPT and domain QA ROUGE/BLEU per stage (soaes-eval on lm-eval)."""

    general_tasks: list[str] = field(default_factory=lambda: ["soaes_cmmlu", "soaes_ceval"])
    domain_task: str = "soaes_domain_qa"
    limit: int | None = None
    max_gen_toks: int = 64
    batch_size: int = 8
    data_dir: str = "eval-sample:"  # folder with cmmlu/, ceval/, domain/ (default: soaes-eval's shipped samples)
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        _check_min(self, 1, "limit", optional=True)
        _check_min(self, 1, "max_gen_toks", "batch_size")
        if not self.general_tasks:
            raise ValueError("general_tasks: give at least one task")


@dataclass
class PipelineRecipe:
    """A whole pipeline: the base `target`, the stages to run and the settings of each."""

    name: str
    target: str = DEFAULT_MODEL
    output_dir: str = "runs/pipeline-${name}"
    seed: int = 0
    description: str = ""
    trained_target: str | None = None  # the trained target when the recipe has no sft_stage2
    threads: int | None = None  # torch CPU threads for the run; unset = torch's choice (not part of any hash)
    # where the model-running stages load models (auto: a GPU in bf16 when present, else the CPU in float32); a stage's
    # own `placement` replaces it. Hashed as what it resolves to (device type and dtype), and only when that is not
    # the CPU in float32, so runs made before placements existed stay up to date.
    placement: Placement = field(default_factory=Placement)
    scale: ScaleSettings | None = None  # how the recipe runs at cluster scale (`soaes pipeline plan`; not hashed)
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    curate: CurateSettings = field(default_factory=CurateSettings)
    decontaminate: DecontaminateSettings = field(default_factory=DecontaminateSettings)
    pack: PackSettings = field(default_factory=PackSettings)
    cpt: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage1: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage2: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage2_only: TrainStageSettings = field(default_factory=TrainStageSettings)
    teacher_data: TeacherDataSettings = field(default_factory=TeacherDataSettings)
    dump_logits: DumpSettings = field(default_factory=DumpSettings)
    distill_draft: DistillSettings = field(default_factory=DistillSettings)
    specdec_bench: BenchSettings = field(default_factory=BenchSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    quick: dict[str, Any] = field(default_factory=dict)  # dotted overrides that `--quick` applies
    source: str = "<recipe>"  # the file it came from (set by the loader)
    base_dir: str = "."  # relative paths are resolved against this (the recipe's folder)

    def __post_init__(self) -> None:
        self.output_dir = self.output_dir.replace("${name}", self.name)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1 (or unset: torch's choice), got {self.threads}")


def resolve_recipe_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A recipe file, or the name of a shipped recipe (`demo` → src/soaes/recipes/demo.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file() and os.sep not in str(name_or_path):
        return shipped
    names = ", ".join(sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"{name_or_path}: no such recipe file or shipped recipe (shipped: {names})")


def resolve_path(recipe: PipelineRecipe, value: str) -> Path:
    """`sample:NAME` (soaes-data samples), `eval-sample:NAME` (soaes-eval samples), `distill-data:NAME`
    (soaes-distill data), else relative to the recipe."""
    if value.startswith(SAMPLE_PREFIX):
        from soaes_data.samples import sample_dir

        return sample_dir() / value[len(SAMPLE_PREFIX):]
    if value.startswith(EVAL_SAMPLE_PREFIX):
        from soaes_eval.tasks.loaders import SAMPLES_DIR

        return SAMPLES_DIR / value[len(EVAL_SAMPLE_PREFIX):]
    if value.startswith(DISTILL_DATA_PREFIX):
        from importlib import resources

        return Path(str(resources.files("soaes_distill") / "data")) / value[len(DISTILL_DATA_PREFIX):]
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(recipe.base_dir) / p


def is_model_spec(value: str) -> bool:
    """Model specs that are not local paths (`embedded:…`, `hf:…`); `gguf:PATH` is checked as a path."""
    return value.startswith(("embedded:", "hf:"))


def model_spec(recipe: PipelineRecipe, value: str) -> str:
    """A model value of the recipe as `load_model` takes it: specs as they are, paths (also after `gguf:`)
    resolved against the recipe's folder, never the working directory."""
    if is_model_spec(value):
        return value
    if value.startswith("gguf:"):
        return "gguf:" + str(resolve_path(recipe, value.removeprefix("gguf:")))
    return str(resolve_path(recipe, value))


def target_spec(recipe: PipelineRecipe) -> str:
    """The recipe's base `target`, resolved (see `model_spec`)."""
    return model_spec(recipe, recipe.target)


def read_pipeline_recipe(name_or_path: str | os.PathLike[str], *, quick: bool = False,
                         overrides: dict[str, Any] | None = None) -> PipelineRecipe:
    """Parse a recipe (a path or a shipped recipe name) field by field, with its `quick:` overrides when `quick` and
    then `overrides`; no check against the file system (`load_pipeline_recipe` adds those)."""
    path = resolve_recipe_path(name_or_path)
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping (name, stages, ...)")
    data = copy.deepcopy(data)
    if quick:
        quick_over = data.get("quick") or {}
        if not isinstance(quick_over, dict):
            raise ConfigError(f"{path}: quick: expected a mapping of dotted keys")
        data = apply_overrides(data, quick_over)
    if overrides:
        data = apply_overrides(data, overrides)
    data.update(source=str(path), base_dir=str(path.resolve().parent))
    return from_dict(PipelineRecipe, data, source=str(path))


def load_pipeline_recipe(name_or_path: str | os.PathLike[str], *, quick: bool = False,
                         overrides: dict[str, Any] | None = None) -> PipelineRecipe:
    """Load and validate a recipe (a path or a shipped recipe name); `quick` applies its `quick:` overrides."""
    recipe = read_pipeline_recipe(name_or_path, quick=quick, overrides=overrides)
    validate_recipe(recipe)
    return recipe


def _fail(recipe: PipelineRecipe, where: str, message: str) -> ConfigError:
    return ConfigError(f"{recipe.source}: {where}: {message}")


def trained_target_source(recipe: PipelineRecipe) -> str | None:
    """The stage whose model is the trained target ('sft_stage2'), or None when `trained_target` names it."""
    if recipe.trained_target is not None:
        return None
    return "sft_stage2"


def validate_recipe(recipe: PipelineRecipe) -> None:
    """Unknown, duplicated or misordered stages, missing paths and models, stages whose input stage is absent (and
    not given as a path), unknown eval tasks or export draft, and a draft whose tokenizer differs from the target's:
    each is one `ConfigError` naming file and field. Section values are checked by the settings classes."""
    if not recipe.stages:
        raise _fail(recipe, "stages", f"no stages; list some of: {', '.join(STAGE_ORDER)}")
    for i, name in enumerate(recipe.stages):
        if name not in STAGE_ORDER:
            import difflib

            near = difflib.get_close_matches(name, STAGE_ORDER, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(recipe, f"stages[{i}]", f"unknown stage {name!r}{hint}; known: {', '.join(STAGE_ORDER)}")
        if recipe.stages.index(name) != i:
            raise _fail(recipe, f"stages[{i}]", f"stage {name!r} is listed twice")
    from .stages import STAGES

    for key in ("target", "trained_target"):
        value = getattr(recipe, key)
        if value is not None and not is_model_spec(value):
            p = resolve_path(recipe, value.removeprefix("gguf:"))
            if not p.exists():
                raise _fail(recipe, key, f"no such model file or directory: {p}")
    for i, name in enumerate(recipe.stages):
        stage = STAGES[name]
        for inp in stage.inputs(recipe):
            if inp.explicit is None and inp.stage in recipe.stages and recipe.stages.index(inp.stage) > i:
                raise _fail(recipe, f"stages[{i}]", f"stage {name!r} reads the output of stage {inp.stage!r}, "
                            f"which is listed after it (stages[{recipe.stages.index(inp.stage)}]); list "
                            f"{inp.stage!r} first")
        for path_field, value in stage.data_paths(recipe).items():
            if value is None or is_model_spec(value):
                continue
            p = resolve_path(recipe, value.removeprefix("gguf:"))
            if not p.exists():
                raise _fail(recipe, path_field, f"no such file or directory: {p}")
        for inp in stage.inputs(recipe):
            if inp.explicit is None and inp.stage is not None and inp.stage not in recipe.stages and inp.required:
                raise _fail(recipe, "stages", f"stage {name!r} needs the output of stage {inp.stage!r}, which is not "
                            f"in stages (add it, or set {inp.field} to a path)")
    _check_export_draft(recipe)
    _check_eval_tasks(recipe)
    _check_placements(recipe)
    _check_draft_tokenizer(recipe)


def stage_placement(recipe: PipelineRecipe, stage: str) -> Placement:
    """The placement stage `stage` loads its models with: its own `placement`, else the recipe's."""
    own = getattr(getattr(recipe, stage, None), "placement", None)
    return own if own is not None else recipe.placement


def _check_placements(recipe: PipelineRecipe) -> None:
    """Each model-running stage's placement resolves on this machine (e.g. `cuda` without a GPU is refused here)."""
    for name in MODEL_STAGES:
        if name not in recipe.stages:
            continue
        own = getattr(recipe, name).placement is not None
        try:
            stage_placement(recipe, name).resolve()
        except ConfigError as err:
            raise _fail(recipe, f"{name}.placement" if own else "placement", str(err)) from None


def draft_names(recipe: PipelineRecipe) -> list[str]:
    """The keys of the `drafts.json` that distill_draft writes for this recipe."""
    from .stages import sweep_slug

    return ["undistilled", "distilled"] + [f"sweep/{sweep_slug(p.alpha, p.temperature)}"
                                           for p in recipe.distill_draft.sweep]


def _check_export_draft(recipe: PipelineRecipe) -> None:
    names = draft_names(recipe)
    if recipe.export.draft not in names:
        raise _fail(recipe, "export.draft", f"no draft {recipe.export.draft!r}; distill_draft makes: "
                    f"{', '.join(names)}")


def shipped_eval_tasks() -> set[str]:
    """Task and group names of soaes-eval's shipped lm-eval YAMLs (read as text: no lm-eval import)."""
    import re

    from soaes_eval.tasks import TASKS_DIR

    pattern = re.compile(r"^(?:task|group):\s*[\"']?([A-Za-z0-9_.\-]+)[\"']?\s*$", re.M)
    return {m for p in TASKS_DIR.rglob("*.yaml") for m in pattern.findall(p.read_text(encoding="utf-8"))}


def _check_eval_tasks(recipe: PipelineRecipe) -> None:
    """soaes tasks against the shipped YAMLs; any other name against lm-eval's index (slow, so only when asked)."""
    s = recipe.eval
    named = [(f"eval.general_tasks[{i}]", t) for i, t in enumerate(s.general_tasks)] + [("eval.domain_task",
                                                                                         s.domain_task)]
    shipped = shipped_eval_tasks()
    for where, task in named:
        if task.startswith("soaes_") and task not in shipped:
            import difflib

            near = difflib.get_close_matches(task, sorted(shipped), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise _fail(recipe, where, f"unknown task {task!r}{hint}; soaes tasks: soaes_cmmlu, soaes_ceval, "
                        "soaes_domain_qa, their subtasks, or any lm-eval task")
    others = [(w, t) for w, t in named if not t.startswith("soaes_")]
    if others and "eval" in recipe.stages:
        from soaes_eval.tasks import task_manager

        known = task_manager(include_defaults=True).all_tasks
        for where, task in others:
            if task not in known:
                raise _fail(recipe, where, f"unknown task {task!r}: neither a soaes task (soaes_cmmlu, soaes_ceval, "
                            "soaes_domain_qa, their subtasks) nor an lm-eval task")


def _check_draft_tokenizer(recipe: PipelineRecipe) -> None:
    draft = recipe.distill_draft.draft
    if draft is None or "distill_draft" not in recipe.stages:
        return
    from soaes_core import load_tokenizer, tokenizer_fingerprint

    spec, target = model_spec(recipe, draft), target_spec(recipe)
    try:
        a = tokenizer_fingerprint(load_tokenizer(spec), ids_only=True)
    except SoaesError as err:
        raise _fail(recipe, "distill_draft.draft", f"cannot load the draft's tokenizer: {err}") from None
    b = tokenizer_fingerprint(load_tokenizer(target), ids_only=True)
    if a != b:
        raise _fail(recipe, "distill_draft.draft", f"the draft's tokenizer ({draft}) differs from the target's "
                    f"({recipe.target}); speculative decoding needs identical token ids")
