"""The Long Range Arena configurations and models that scripts/lra/run_lra.py trains and scripts/lra/step_times.py
times (imported by both, run by neither): the task settings of each `--config`, the run's arguments, and the
classifiers (Luna, the same-size Transformer, the retrieval pair classifier)."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoModel, RobertaConfig, RobertaForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.roberta.modeling_roberta import (
    RobertaClassificationHead,
    RobertaModel,
    RobertaPreTrainedModel,
)

from luna_hf import LunaConfig, LunaForSequenceClassification

CLS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # RoBERTa's special ids; task symbols start at 4
LISTOPS_SYMBOLS = ["[MIN", "[MAX", "[MED", "[SM", "]"] + [str(digit) for digit in range(10)]
LISTOPS_VOCAB = {symbol: i + 4 for i, symbol in enumerate(LISTOPS_SYMBOLS)}
TASK_COLUMNS = {"listops": ["Source", "Target"], "text": ["text", "label"], "retrieval": ["text1", "text2", "label"],
                "image": ["pixels", "label"], "pathfinder": ["pixels", "label"]}
PIXEL_TASKS = ("image", "pathfinder")  # one token per grey pixel, a fixed number of them
BUILD_COMMANDS = {"listops": "python scripts/lra/listops.py --output_dir DIR",
                  **{task: f"python scripts/lra/build_data.py --task {task} --output_dir DIR"
                     for task in ("text", "retrieval", "image")},
                  "pathfinder": "python scripts/lra/pathfinder.py --output_dir DIR"}


@dataclass(frozen=True)
class TaskConfig:
    """An LRA architecture (`luna_lra_*`) and its training recipe."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    max_length: int  # tokens per input, before the <CLS> token
    learning_rate: float
    dropout: float
    attention_dropout: float
    batch_size: int
    max_steps: int
    warmup_steps: int
    weight_decay: float
    eval_steps: int
    max_eval_samples: int | None = None  # validation rows used for model selection (all: None)
    max_test_samples: int | None = None  # test rows (all: None)
    lr_scheduler: str = "inverse_sqrt"  # the authors' (fairseq); "linear": warm-up, then linear decay to 0
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8


# Table 7 of the paper on the authors' release architectures (../shared/notes/authors-implementation.md, §9-10).
PAPER = {
    "listops": TaskConfig(1, 512, 2048, 8, 2000, 1e-4, 0.1, 0.1, 32, 5000, 1000, 1e-4, 500),
    "text": TaskConfig(4, 256, 1024, 4, 4000, 5e-5, 0.3, 0.3, 32, 20000, 8000, 1e-4, 1000),
    "retrieval": TaskConfig(4, 128, 512, 4, 4000, 5e-5, 0.1, 0.1, 32, 20000, 8000, 1e-4, 1000),
    "image": TaskConfig(1, 64, 128, 8, 1024, 5e-3, 0.1, 0.3, 256, 35000, 4000, 0.0, 1000),
    "pathfinder": TaskConfig(1, 128, 128, 4, 1024, 1e-3, 0.2, 0.1, 256, 62500, 4000, 0.0, 1000),
}
# Reduced for a 2-core CPU (one thread per run): smaller models, a few hundred steps, 1K-byte documents, 2,000 test
# rows, the same task structure. The Transformer takes 4-10 s per step here, Luna-16 0.2-0.5 s (README).
CPU_BUDGET = dict(learning_rate=1e-3, batch_size=16, dropout=0.1, attention_dropout=0.1, eval_steps=50,
                  max_eval_samples=300, max_test_samples=2000)
CPU = {
    "listops": replace(PAPER["listops"], **CPU_BUDGET, num_layers=2, hidden_size=128, intermediate_size=256,
                       num_heads=4, max_steps=250, warmup_steps=25),
    "text": replace(PAPER["text"], **CPU_BUDGET, num_layers=2, hidden_size=128, intermediate_size=256,
                    max_length=1024, max_steps=150, warmup_steps=15),
    "retrieval": replace(PAPER["retrieval"], **CPU_BUDGET, num_layers=2, intermediate_size=256, max_length=1024,
                         max_steps=150, warmup_steps=15),
    "image": replace(PAPER["image"], **CPU_BUDGET, max_steps=200, warmup_steps=20),
    "pathfinder": replace(PAPER["pathfinder"], **CPU_BUDGET, max_steps=200, warmup_steps=20),
}
# The Skyformer / Nystromformer LRA harness (pkuzengqi/Skyformer src/config.py, after Nystromformer's LRA code): 2
# layers, 2 heads x 32, FFN 128, dropout 0.1, AdamW (0.9, 0.999, eps 1e-6, no weight decay), warm-up then linear
# decay over 50,000 updates, its warm-up and evaluation interval per task; the Transformer mean-pools. Luna gets the
# same sizes and recipe. Where this differs from the harness: docs/lra.md ("--config small").
SMALL_MODEL = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=2, dropout=0.1, attention_dropout=0.1,
                   max_steps=50000, weight_decay=0.0, lr_scheduler="linear", adam_beta2=0.999, adam_epsilon=1e-6)
SMALL = {task: TaskConfig(**SMALL_MODEL, max_length=length, learning_rate=lr, batch_size=batch, warmup_steps=warmup,
                          eval_steps=eval_steps)
         for task, length, lr, batch, warmup, eval_steps in (
             ("listops", 2000, 1e-4, 32, 1000, 500), ("text", 4000, 1e-4, 32, 80, 500),
             ("retrieval", 4000, 2e-4, 16, 800, 1000), ("pathfinder", 1024, 2e-4, 128, 312, 500),
             ("image", 1024, 1e-4, 256, 175, 50))}
CONFIGS = {"paper": PAPER, "cpu": CPU, "small": SMALL}


@dataclass
class LRAArguments:
    task: Literal["listops", "text", "retrieval", "image", "pathfinder"] = field(metadata={"help": "The LRA task."})
    data_dir: str = field(metadata={"help": "Folder written by scripts/lra/listops.py, build_data.py, pathfinder.py."})
    model: Literal["luna", "transformer", "learned-kernel"] = field(default="luna", metadata={
        "help": "Luna, RoBERTa (SDPA), or the learned-kernel linear attention (Luna's model, attention_type)."})
    config: Literal["paper", "cpu", "small"] = field(
        default="cpu", metadata={"help": "The paper's recipe, the CPU one, or the Skyformer harness's small one."})
    projected_length: int = field(default=16, metadata={"help": "Luna's l (paper: 16, 128, 256)."})
    classifier_pooling: Literal["cls", "packed_mean"] = field(
        default="cls", metadata={"help": "Luna: <CLS> token, or mean of the final P (paper Table 3, no <CLS>)."})
    output_dir: str | None = field(default=None, metadata={"help": "Default: outputs/lra/TASK-MODEL-CONFIG-sSEED."})
    results_file: str = field(default="outputs/lra/results.jsonl", metadata={"help": "Each run appends a line."})
    max_steps: int | None = field(default=None, metadata={"help": "Override the config's number of updates."})
    batch_size: int | None = field(default=None, metadata={"help": "Override the config's batch size."})
    learning_rate: float | None = field(default=None, metadata={"help": "Override the config's learning rate."})
    max_length: int | None = field(default=None, metadata={"help": "Override the config's tokens per input."})
    eval_steps: int | None = field(default=None, metadata={"help": "Override how often validation runs."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Override the config's warm-up updates."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Override the config's validation rows."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Override the config's test rows."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    seed: int = 0
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or latest."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an existing output_dir."})
    bf16: bool = field(default=False, metadata={"help": "bf16 mixed precision (GPU)."})
    disable_tqdm: bool = False
    report_to: str = field(default="none", metadata={"help": "tensorboard, wandb, ... or none."})

    def __post_init__(self):
        if self.projected_length < 1:
            raise ValueError(f"--projected_length must be positive, got {self.projected_length}.")
        if self.model != "luna" and self.classifier_pooling != "cls":
            raise ValueError("--classifier_pooling packed_mean needs Luna's packed sequence: use --model luna.")
        name = f"{self.task}-{self.run_name}-{self.config}-s{self.seed}"
        self.output_dir = self.output_dir or str(Path("outputs/lra") / name)

    @property
    def mean_pooled(self) -> bool:
        """--config small's Transformer and learned-kernel model (a Transformer with another attention): the mean of
        the final states over valid tokens, as in the harness."""
        return self.model in ("transformer", "learned-kernel") and self.config == "small"

    @property
    def prepends_cls(self) -> bool:
        """A <CLS> token goes first unless nothing reads it (P-mean, a mean-pooled model)."""
        return self.classifier_pooling == "cls" and not self.mean_pooled

    @property
    def run_name(self) -> str:
        if self.model in ("transformer", "learned-kernel"):
            return self.model
        return f"luna{self.projected_length}" + ("-pmean" if self.classifier_pooling == "packed_mean" else "")

    def task_config(self) -> TaskConfig:
        base = CONFIGS[self.config][self.task]
        overrides = {"max_steps": self.max_steps, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                     "max_length": self.max_length, "eval_steps": self.eval_steps, "warmup_steps": self.warmup_steps,
                     "max_eval_samples": self.max_eval_samples, "max_test_samples": self.max_test_samples}
        return replace(base, **{name: value for name, value in overrides.items() if value is not None})


# ---------------------------------------------------------------------------------------------------- data


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of the final states of the valid tokens (attention mask 1); padding is left out."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def classification_output(logits: torch.Tensor, labels: torch.Tensor | None) -> SequenceClassifierOutput:
    loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
    return SequenceClassifierOutput(loss=loss, logits=logits)


class MeanPooledRobertaClassifier(RobertaPreTrainedModel):
    """`--config small`'s Transformer, pooled as in the Skyformer / Nystromformer harness: RoBERTa's encoder, the
    mean of its final states over the valid tokens, then RoBERTa's classification head (dense, tanh, projection)."""

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(config)
        self.post_init()

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return classification_output(self.classifier(masked_mean(hidden, attention_mask)[:, None]), labels)


class PairClassifier(nn.Module):
    """LRA Retrieval: one encoder reads both documents, rep is its pooled state (Luna), its first token (RoBERTa) or,
    with `mean_pool`, the mean of RoBERTa's states over valid tokens (`--config small`). The classifier (Linear, ReLU,
    Linear) reads the authors' [rep(doc2), rep(doc1)] or, with `harness_features` (`--config small`), the Skyformer /
    Nystromformer harness's [u, v, u * v, u - v] (u = rep(doc1), v = rep(doc2)), whose product term exposes how
    alike the two documents are to the first layer."""

    def __init__(self, encoder: nn.Module, num_labels: int, mean_pool: bool = False, harness_features: bool = False):
        super().__init__()
        self.encoder, self.mean_pool, self.harness_features = encoder, mean_pool, harness_features
        hidden_size = encoder.config.hidden_size
        # the harness's hidden layer has the encoder's FFN width; the authors' has its hidden size
        classifier_size = encoder.config.intermediate_size if harness_features else hidden_size
        self.classifier = nn.Sequential(nn.Linear((4 if harness_features else 2) * hidden_size, classifier_size),
                                        nn.ReLU(), nn.Linear(classifier_size, num_labels, bias=harness_features))

    def represent(self, input_ids, attention_mask):
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        if isinstance(self.encoder.config, LunaConfig):
            return outputs.pooler_output
        if self.mean_pool:
            return masked_mean(outputs.last_hidden_state, attention_mask)
        return outputs.last_hidden_state[:, 0]

    def forward(self, input_ids, attention_mask, input_ids2, attention_mask2, labels=None):
        second = self.represent(input_ids2, attention_mask2)  # doc 2 first: the order runs have always drawn dropout in
        first = self.represent(input_ids, attention_mask)
        pair = [first, second, first * second, first - second] if self.harness_features else [second, first]
        return classification_output(self.classifier(torch.cat(pair, -1)), labels)


def build_model(args: LRAArguments, task: TaskConfig, vocab_size: int, num_labels: int) -> nn.Module:
    common = dict(
        vocab_size=vocab_size, hidden_size=task.hidden_size, num_hidden_layers=task.num_layers,
        num_attention_heads=task.num_heads, intermediate_size=task.intermediate_size,
        hidden_dropout_prob=task.dropout, attention_probs_dropout_prob=task.attention_dropout,
        max_position_embeddings=task.max_length + 1 + PAD_ID + 1, pad_token_id=PAD_ID, bos_token_id=CLS_ID,
        eos_token_id=EOS_ID, layer_norm_eps=1e-5, num_labels=num_labels,
    )
    if args.model != "transformer":
        # LRA Luna is untied (the authors' LRA encoder has no tied option).
        config = LunaConfig(**common, projected_length=args.projected_length, tie_key_value=False,
                            classifier_pooling="mean" if args.mean_pooled else args.classifier_pooling,
                            attention_type="learned_kernel" if args.model == "learned-kernel" else "nested")
        single = LunaForSequenceClassification
    else:
        config = RobertaConfig(**common, attn_implementation="sdpa")
        single = MeanPooledRobertaClassifier if args.mean_pooled else RobertaForSequenceClassification
    if args.task != "retrieval":
        return single(config)
    encoder = AutoModel.from_config(config, **({} if args.model != "transformer" else {"add_pooling_layer": False}))
    return PairClassifier(encoder, num_labels, mean_pool=args.mean_pooled and args.model == "transformer",
                          harness_features=args.config == "small")


# ---------------------------------------------------------------------------------------------------- training
