"""``LessSFTConfig``: trl's ``SFTConfig`` plus every LESS setting, as ``less_*`` fields.

``HfArgumentParser(LessSFTConfig)`` reads it from the command line like any Trainer argument::

    accelerate launch examples/sft_with_less.py --output_dir out --less_budget 0.05 --less_strategy topk
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from ..gradients.featurizer import POOL_DIRECTIONS, check_compile_projection, check_proj_dim
from ..gradients.projection import DEFAULT_KIND, KIND_HELP
from ..gradients.quantize import check_format
from ..scoring.hubness import HUB_CORRECTIONS, HubCorrection
from ..selection import strategies as selectors


@dataclass
class LessSFTConfig(SFTConfig):
    """Training arguments for :class:`~hf_less.LessSFTTrainer`: SFT plus LESS data selection.

    Every field of ``SFTConfig`` applies to the final training on the selected subset. The
    ``less_*`` fields configure the selection (warmup, features, selector); their defaults are
    the LESS paper's settings (Xia et al. 2024) where it gives one.
    """

    # Budget, not float: a float option would read "1" as 1.0 (the whole pool) instead of one example.
    less_budget: selectors.Budget = field(default=0.05, metadata={
        "help": "How much of the pool to keep: an int count of examples (1 = one example), or a fraction of "
                "the pool in (0, 1] written with a decimal point (0.05 = 5%%, 1.0 = the whole pool)."})
    less_strategy: str = field(default="topk", metadata={
        "help": f"Selector: one of {', '.join(selectors.STRATEGIES)}. 'topk' is LESS's own; 'random' the baseline."})
    less_proj_dim: int = field(default=8192, metadata={
        "help": "Dimension d of the random projection of gradients; 0 keeps exact, unprojected gradients."})
    less_proj_kind: str = field(default=DEFAULT_KIND, metadata={
        "help": f"Projection kind (default {DEFAULT_KIND}): {KIND_HELP}."})
    less_proj_seed: int = field(default=0, metadata={"help": "Seed of the random projection."})
    less_warmup_fraction: float = field(default=0.05, metadata={
        "help": "Fraction of the pool, drawn at random with less_seed, that the warmup LoRA trains on."})
    less_warmup_epochs: int = field(default=4, metadata={
        "help": "Warmup epochs; one checkpoint per epoch, each one feature set weighted by its mean LR."})
    less_warmup_dir: str | None = field(default=None, metadata={
        "help": "Reuse this warmup (a directory of checkpoint-N/ written with LessCallback) instead of training one."})
    less_warmup_learning_rate: float = field(default=2e-5, metadata={"help": "Peak LR of the warmup (linear decay)."})
    less_warmup_batch_size: int | None = field(default=None, metadata={
        "help": "Per-device batch size of the warmup (default: per_device_train_batch_size)."})
    less_lora_r: int = field(default=128, metadata={"help": "LoRA rank of the warmup adapter."})
    less_lora_alpha: int = field(default=512, metadata={"help": "LoRA alpha of the warmup adapter."})
    less_lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout of the warmup adapter."})
    less_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "Modules the warmup LoRA adapts."})
    less_selection_model: str | None = field(default=None, metadata={
        "help": "Select with this model (a name or path; usually smaller: LESS-T) instead of the trained one."})
    less_seed: int = field(default=0, metadata={"help": "Seed of the warmup subset and of seeded strategies."})
    less_max_length: int | None = field(default=None, metadata={
        "help": "Truncation length for features (default: max_length)."})
    less_batch_size: int = field(default=8, metadata={"help": "Examples per forward/backward while featurizing."})
    less_auto_batch_size: bool = field(default=False, metadata={
        "help": "On CUDA, featurize with the largest batch that fits (found once, halving from 128 on out-of-memory "
                "errors), like auto_find_batch_size; ignored on a CPU (less_batch_size)."})
    less_pool_direction: str = field(default="adam", metadata={
        "help": "Pool examples' features: 'adam' (LESS's Adam direction, the reference's) or 'sgd' (the plain "
                "gradient, as for targets)."})
    less_hub_correction: str | None = field(default=None, metadata={
        "help": f"A correction of hubness in LESS's similarities (a few pool rows near every target): none (default, "
                f"LESS as published) or one of {', '.join(HUB_CORRECTIONS)}: 'center' subtracts each checkpoint's mean "
                "pool feature, 'pca' also removes the top less_hub_pca_components principal components, 'csls' "
                "subtracts each pool row's mean similarity to its less_hub_csls_k nearest targets. Not measured to "
                "help yet: see docs/selection_quality.md."})
    less_hub_pca_components: int = field(default=1, metadata={
        "help": "less_hub_correction='pca': how many top principal components of the pool features to remove."})
    less_hub_csls_k: int = field(default=10, metadata={
        "help": "less_hub_correction='csls': the nearest targets a pool row's penalty is the mean similarity to "
                "(at most the number of target examples)."})
    less_autocast: bool = field(default=False, metadata={
        "help": "Featurize under bfloat16 autocast (faster on a GPU). Off by default: features are computed at the "
                "precision of the model's weights, even when training uses bf16."})
    less_compile_projection: bool = field(default=False, metadata={
        "help": "Featurize with the row-shift projection and the Adam direction before it as one torch.compile'd "
                "pass (less_proj_kind='rowshift'): the same features to float32 rounding; compiling costs "
                "seconds to a minute once."})
    less_subtask_column: str | None = field(default=None, metadata={
        "help": "Column of the targets naming subtasks: the score is the max over subtasks of the mean similarity."})
    less_store_dtype: str = field(default="float16", metadata={
        "help": "Format of the feature stores: float16, float32, int8, int4 (per-row absmax scale) or 1bit (signs); "
                "int8/int4/1bit take 2x/4x/16x less disk than float16."})
    less_on_empty_completion: str = field(default="error", metadata={
        "help": "An example with no completion token left after truncation: 'error' (stop and name it) or "
                "'skip' (a pool example scores -inf and is never selected; a target example is dropped)."})
    less_plan: bool = field(default=True, metadata={
        "help": "Before the warmup, time a few real training and featurization batches (on a copy of the selection "
                "model) and log the projected wall time of each stage and the feature store's disk (hf_less.training.planning). "
                "Skipped under several processes."})
    less_reuse_selection: bool = field(default=True, metadata={
        "help": "Reuse output_dir/less_selection.json when it was made with the same settings and pool."})

    def __post_init__(self):
        super().__post_init__()
        try:  # the convention of selectors.parse_budget, the one every entry point uses
            self.less_budget = selectors.parse_budget(self.less_budget)
        except (TypeError, ValueError) as e:
            raise type(e)(f"less_{e}") from None
        if self.less_strategy not in selectors.STRATEGIES:
            raise ValueError(f"less_strategy={self.less_strategy!r} is not one of {selectors.STRATEGIES}.")
        if not 0 < self.less_warmup_fraction <= 1:
            raise ValueError(f"less_warmup_fraction={self.less_warmup_fraction} must be in (0, 1].")
        if self.less_warmup_epochs < 1:
            raise ValueError(f"less_warmup_epochs={self.less_warmup_epochs} must be >= 1.")
        if self.less_pool_direction not in POOL_DIRECTIONS:
            raise ValueError(f"less_pool_direction={self.less_pool_direction!r} must be one of {POOL_DIRECTIONS}.")
        try:  # the rule of LessSelector's own check
            HubCorrection(self.less_hub_correction, self.less_hub_pca_components, csls_k=self.less_hub_csls_k)
        except ValueError as e:
            raise ValueError(f"less_{e}") from None
        if self.less_on_empty_completion not in ("error", "skip"):
            raise ValueError(f"less_on_empty_completion={self.less_on_empty_completion!r} must be 'error' or 'skip'.")
        try:
            check_format(self.less_store_dtype)
        except ValueError as e:
            raise ValueError(f"less_store_dtype: {e}") from None
        if self.less_proj_dim < 0:
            raise ValueError(f"less_proj_dim={self.less_proj_dim} must be > 0, or 0 for exact gradients.")
        check_proj_dim(self.less_projection_dim, self.less_proj_kind, "less_proj_dim")
        check_compile_projection(self.less_compile_projection, self.less_projection_dim, self.less_proj_kind, "less_")

    @property
    def less_budget_value(self) -> int | float:
        """``less_budget`` as ``select`` takes it: an int count or a float fraction (parsed in ``__post_init__``)."""
        return self.less_budget

    @property
    def less_featurize_batch_size(self) -> int | str:
        """``less_batch_size``, or ``"auto"`` under ``less_auto_batch_size`` (see :class:`hf_less.gradients.featurizer.Featurizer`)."""
        return "auto" if self.less_auto_batch_size else self.less_batch_size

    @property
    def less_projection_dim(self) -> int | None:
        return self.less_proj_dim or None
