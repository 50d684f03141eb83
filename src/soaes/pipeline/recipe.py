"""`soaes pipeline` recipes: one YAML that names the stages to run and each stage's settings.

A stage's section is its package's own config dataclass (soaes-train's `TrainConfig`, soaes-distill's `KDConfig` and
`FeatureKDConfig`, soaes-specdec's `BenchConfig`, soaes-eval's `EvalRunConfig`), extended only by what the pipeline
itself needs (a placement, a held-out count), so a field a package adds is settable here with no change. Where the
pipeline's defaults differ from a package's, they are written once, in `SECTION_DEFAULTS`. Parsing is here;
the checks against the stage registry and the file system are in `checks.py` (`load_pipeline_recipe`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from soaes_core import DEFAULT_MODEL, from_dict, load_yaml
from soaes_core.config import OMIT_IF_DEFAULT, apply_overrides
from soaes_core.errors import ConfigError, SoaesError
from soaes_core.placement import Placement
from soaes_data.decontam import DecontamConfig
from soaes_distill.feature_kd import FeatureKDConfig
from soaes_distill.online import OnlineConfig
from soaes_distill.teacher_answers import MagpieSettings, VLLMSettings, check_engine
from soaes_distill.trainer import KDConfig
from soaes_eval.runner import EvalRunConfig
from soaes_specdec.bench import BenchConfig
from soaes_train.config import TrainConfig
from soaes_train.launch import LaunchConfig

from .scale_plan import ScaleSettings

T = TypeVar("T")

# The stages a recipe runs when it lists none (the registry, `stages.STAGES`, knows every stage and their order)
DEFAULT_STAGES = ["curate", "pack", "cpt", "sft_stage1", "sft_stage2", "teacher_data", "dump_logits",
                  "distill_draft", "specdec_bench", "export", "eval", "report"]
SAMPLE_PREFIX = "sample:"  # soaes-data's shipped samples
EVAL_SAMPLE_PREFIX = "eval-sample:"  # soaes-eval's shipped samples
DISTILL_DATA_PREFIX = "distill-data:"  # soaes-distill's shipped data (the committed held-out domain prompts)
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DTYPES = ("float32", "bfloat16", "float16")  # plus soaes_core's aliases (fp32, bf16, fp16, half, float)
# Stages that load a model: each takes the recipe's `placement`, or its own `<stage>.placement` when set
MODEL_STAGES = ("teacher_data", "dump_logits", "distill_draft", "specdec_bench", "eval")

# The pipeline's defaults where they differ from the package config a section embeds: the one place they are written.
# A recipe's section is read over these, then `quick:` and `--set` over that.
SECTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "decontaminate": {  # soaes_data.decontam.DecontamConfig
        "eval_dirs": ["eval-sample:cmmlu", "eval-sample:ceval"],  # soaes-eval's shipped samples
        "use_fetched": False,  # only the recipe's files: what the stage hashes is what it checks against
    },
    "specdec_bench": {  # soaes_specdec.bench.BenchConfig
        "reference_dtype": "bfloat16",  # plain decoding also timed in bf16: speedups are read against the faster
        "num_speculative_tokens": [3, 5],
        "modes": ["greedy", "top_p"],
        "methods": ["plain", "prompt_lookup", "speculative"],  # add speculative_lookup for Table 5
        "max_prompts": 4,
        "max_new_tokens": 48,
    },
    "eval": {  # soaes_eval.runner.EvalRunConfig
        "max_gen_toks": 64,
        "data_dir": "eval-sample:",  # soaes-eval's shipped samples (cmmlu/, ceval/, domain/)
    },
}


def _section_default(cls: type[T], section: str) -> Any:
    return lambda: from_dict(cls, SECTION_DEFAULTS.get(section, {}), source=f"SECTION_DEFAULTS[{section!r}]")


def package_config(section: Any, cls: type[T], **pipeline_values: Any) -> T:
    """The package config `cls` a stage hands its package: the section's fields of `cls`, with the values the
    pipeline sets itself (paths of upstream outputs, the seed) replacing them."""
    values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{**values, **pipeline_values})


def owned_by_pipeline(section: Any) -> list[str]:
    """Fields of a section's package config that the pipeline sets itself but the recipe also set (to refuse)."""
    owned = getattr(section, "PIPELINE_SETS", {})
    if not owned:
        return []
    defaults = next(c for c in type(section).__mro__[1:] if dataclasses.is_dataclass(c))()
    return [name for name in owned if getattr(section, name) != getattr(defaults, name)]


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
class DecontaminateSettings(DecontamConfig):
    """soaes-data's `DecontamConfig`: drop curated documents and SFT conversations that share `ngram`-character
    n-grams with benchmark items (`eval_dirs`, `eval_files`: recipe paths; `sample:`/`eval-sample:` allowed)."""


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
    # soaes-train's `LaunchConfig`: torchrun / deepspeed with N processes, ZeRO; left out of dumps while at default
    launch: LaunchConfig = field(default_factory=LaunchConfig, metadata={OMIT_IF_DEFAULT: True})

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
class JointSftDataSettings:
    """Table 2's joint-SFT ablation data: the stage-1 and stage-2 pools as one file, mixed (`shuffle`: in an order
    drawn from the recipe's seed; off: stage 1 then stage 2), packed with `pack.max_length`."""

    shuffle: bool = True


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
    # soaes-distill `TeacherAnswersConfig`: the data source (prompts, magpie, passages: `domain_queries`) and engine
    source: str = field(default="prompts", metadata={OMIT_IF_DEFAULT: True})
    magpie: MagpieSettings = field(default_factory=MagpieSettings, metadata={OMIT_IF_DEFAULT: True})
    engine: str = field(default="soaes", metadata={OMIT_IF_DEFAULT: True})
    vllm: VLLMSettings = field(default_factory=VLLMSettings, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        check_engine(self.engine)
        if self.source not in ("prompts", "magpie", "passages"):
            raise ValueError(f"source must be prompts, magpie or passages, got {self.source!r}")
        if self.source == "passages" and self.domain_queries.max_queries < 1:
            raise ValueError("source 'passages' needs domain_queries.max_queries >= 1")
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
    # set: also an `online` draft, updated from the undistilled one on teacher_data's train prompts (soaes-distill
    # online: the positions the verifier rejects); {} takes the domain-draft paper's online defaults
    online: OnlineConfig | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "feature"):
            raise ValueError(f"kind must be 'layer' or 'feature', got {self.kind!r}")
        _check_min(self, 1, "draft_layers")
        if self.kind == "feature" and (self.sweep or self.draft is not None or self.online is not None):
            raise ValueError("kind 'feature' trains a feature head from the target: `sweep`, `draft` and `online` "
                             "apply to layer drafts only")


@dataclass
class BenchSettings(BenchConfig):
    """soaes-specdec's `BenchConfig` of the distilled draft's benchmark (the undistilled and sweep drafts get greedy,
    n=3, plain and speculative), plus a greedy token-exactness check on `exactness_prompts` prompts in float32 and
    in `dtype`. The pipeline sets the fields in `PIPELINE_SETS`."""

    PIPELINE_SETS: ClassVar[dict[str, str]] = {
        "target": "the trained target", "draft": "distill_draft's drafts", "prompts": "teacher_data's held-out "
        "prompts", "seed": "the recipe's seed", "threads": "the recipe's threads",
        "draft_layers": "unused: the pipeline always benchmarks distill_draft's drafts",
        "device": "the stage's placement"}

    exactness_prompts: int = field(default=4, metadata={"help": "Prompts of the greedy token-exactness check."})
    # its own device (and sharding); `dtype` sets the precision. Unset: the recipe's. (Same in every section.)
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_dtype("dtype", self.dtype)
        _check_dtype("reference_dtype", self.reference_dtype, optional=True)
        _check_min(self, 1, "max_prompts", optional=True)
        _check_min(self, 1, "exactness_prompts")


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
class EvalSettings(EvalRunConfig):
    """soaes-eval's `EvalRunConfig`, run per model: `general_tasks` (CMMLU / C-Eval) for the base and CPT models and
    `domain_task` (QA ROUGE/BLEU) for every trained stage present. The pipeline sets the fields in `PIPELINE_SETS`."""

    PIPELINE_SETS: ClassVar[dict[str, str]] = {
        "tasks": "general_tasks and domain_task", "model": "each stage's model", "output_dir": "the stage folder",
        "name": "the model's label", "stage": "the model's stage", "cache": "the stage folder", "device":
        "the placement", "dtype": "the placement", "apply_chat_template": "on for the domain task", "seed":
        "the recipe's seed"}

    general_tasks: list[str] = field(default_factory=lambda: ["soaes_cmmlu", "soaes_ceval"], metadata={
        "help": "Tasks of the base and CPT models."})
    domain_task: str = field(default="soaes_domain_qa", metadata={"help": "Task of every trained model."})
    placement: Placement | None = field(default=None, metadata={OMIT_IF_DEFAULT: True})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_min(self, 1, "max_gen_toks", "batch_size", optional=True)
        if not self.general_tasks:
            raise ValueError("general_tasks: give at least one task")
        if not self.data_dir:
            raise ValueError("data_dir: give the folder with cmmlu/, ceval/, domain/ (eval-sample: = soaes-eval's)")


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
    decontaminate: DecontaminateSettings = field(default_factory=_section_default(DecontaminateSettings,
                                                                                  "decontaminate"))
    pack: PackSettings = field(default_factory=PackSettings)
    cpt: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage1: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage2: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_stage2_only: TrainStageSettings = field(default_factory=TrainStageSettings)
    # Table 2's other training variants (stages/variants.py): stage-1 / stage-2 SFT straight from the base, and
    # CPT + the two SFT pools mixed into one joint SFT stage
    base_sft_stage1: TrainStageSettings = field(default_factory=TrainStageSettings)
    base_sft_stage2: TrainStageSettings = field(default_factory=TrainStageSettings)
    sft_joint_data: JointSftDataSettings = field(default_factory=JointSftDataSettings)
    sft_joint: TrainStageSettings = field(default_factory=TrainStageSettings)
    teacher_data: TeacherDataSettings = field(default_factory=TeacherDataSettings)
    dump_logits: DumpSettings = field(default_factory=DumpSettings)
    distill_draft: DistillSettings = field(default_factory=DistillSettings)
    specdec_bench: BenchSettings = field(default_factory=_section_default(BenchSettings, "specdec_bench"))
    export: ExportSettings = field(default_factory=ExportSettings)
    eval: EvalSettings = field(default_factory=_section_default(EvalSettings, "eval"))
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
    then `overrides`; no check against the file system (`checks.load_pipeline_recipe` adds those)."""
    path = resolve_recipe_path(name_or_path)
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping (name, stages, ...)")
    data = with_section_defaults(copy.deepcopy(data))
    if quick:
        quick_over = data.get("quick") or {}
        if not isinstance(quick_over, dict):
            raise ConfigError(f"{path}: quick: expected a mapping of dotted keys")
        data = apply_overrides(data, quick_over)
    if overrides:
        data = apply_overrides(data, overrides)
    data.update(source=str(path), base_dir=str(path.resolve().parent))
    return from_dict(PipelineRecipe, data, source=str(path))


def with_section_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Recipe data with `SECTION_DEFAULTS` under each section's own keys (a non-mapping section is left for the
    loader to report)."""
    for section, defaults in SECTION_DEFAULTS.items():
        given = data.get(section)
        if given is None:
            data[section] = dict(defaults)
        elif isinstance(given, dict):
            data[section] = {**defaults, **given}
    return data


def stage_placement(recipe: PipelineRecipe, stage: str) -> Placement:
    """The placement stage `stage` loads its models with: its own `placement`, else the recipe's."""
    own = getattr(getattr(recipe, stage, None), "placement", None)
    return own if own is not None else recipe.placement


def has_scale_section(name_or_path: str) -> bool:
    """True when the recipe (a file or a shipped name) has a `scale:` section."""
    data = load_yaml(resolve_recipe_path(name_or_path))
    return isinstance(data, dict) and data.get("scale") is not None


def load_scale_recipe(name_or_path: str, overrides: dict[str, Any] | None = None,
                      quick: bool = False) -> tuple[PipelineRecipe, ScaleSettings]:
    """A recipe and its `scale:` section, checked field by field but not against the file system or the hub: a plan
    needs no data, tokenizer or weights present (`overrides`: dotted keys, also `scale.…`; `quick`: the recipe's
    `quick:` budgets first)."""
    recipe = read_pipeline_recipe(name_or_path, quick=quick, overrides=overrides)
    return recipe, recipe.scale or ScaleSettings()
