"""The train and on-policy sections: optimisation, the loss mix, the live-teacher losses, later rounds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import _Strict


class MixConfig(_Strict):
    """Another dataset trained on beside the run's own (`train.mix`)."""

    path: str
    """A dataset directory (a run's `<output_dir>/dataset`) made with the same teacher tokenizer and k."""
    repeat: int = Field(1, ge=1)
    """Times each of its training samples is seen per epoch (the run's own dataset: once)."""


class FeatureLossConfig(_Strict):
    """FitNets-style hidden-state matching against the live teacher (`train.live_teacher`)."""

    weight: float = Field(0.0, ge=0.0)
    """w_feat in the total loss; 0: off."""
    kind: Literal["mse", "cosine"] = "cosine"
    """Per token: 1 - cosine similarity (scale-free: real LLMs' residual streams carry a few huge outlier dimensions
    that would dominate a squared difference), or `mse`, the mean squared difference (FitNets)."""
    layer_map: dict[int, int] | None = None
    """Student decoder layer -> teacher decoder layer (a layer's output; 0-based, negative counts from the end).
    Default: every student layer, each to the teacher layer at the same relative depth (last to last). Where the
    hidden sizes differ, a learned linear projection maps the student's states to the teacher's width."""


class AttentionLossConfig(_Strict):
    """MiniLMv2-style self-attention relation distillation against the live teacher."""

    weight: float = Field(0.0, ge=0.0)
    """w_attn in the total loss; 0: off."""
    layer_map: dict[int, int] | None = None
    """Student layer -> teacher layer whose relations are matched. Default: the last to the last (MiniLMv2)."""
    relations: list[Literal["query", "key", "value"]] = Field(["query", "key", "value"], min_length=1)
    """Vector types whose scaled dot-product relations are matched (query-query, key-key, value-value)."""
    relation_heads: int | None = Field(None, ge=1)
    """Relation heads each vector type is split into (on both models, so head counts and sizes may differ).
    Default: the largest number up to the student's attention heads that divides every width."""


class RelationLossConfig(_Strict):
    """RKD distance and angle losses between the sequences of each micro-batch, on pooled representations."""

    weight: float = Field(0.0, ge=0.0)
    """w_rel in the total loss; 0: off."""
    student_layer: int = -1
    """The decoder layer whose output, averaged over the completion tokens, represents a sequence."""
    teacher_layer: int = -1
    distance: float = Field(1.0, ge=0.0)
    """Weight of the distance loss inside the relation loss (RKD: 1)."""
    angle: float = Field(2.0, ge=0.0)
    """Weight of the angle loss inside the relation loss (RKD: 2)."""

    @model_validator(mode="after")
    def _some_part(self) -> RelationLossConfig:
        if self.weight > 0 and self.distance == 0 and self.angle == 0:
            raise ValueError("train.relation.weight > 0 with distance and angle both 0 adds nothing; weight one")
        return self


LIVE_FIELDS = ("live_teacher", "feature", "attention", "relation")
"""Train settings that only act with a live teacher (left out of the train key while it is off)."""


class TrainConfig(_Strict):
    """Student training: loss = alpha*CE + (1-alpha)*T^2*D(teacher top-k || student)."""

    alpha: float = Field(0.0, ge=0.0, le=1.0)
    """Weight of the cross-entropy on sampled tokens; 1 - alpha goes to the divergence."""
    temperature: float = Field(1.0, gt=0.0)
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0.0, le=1.0)
    """JSD mixture weight (0: forward KL, 1: reverse KL)."""
    tail_bucket: bool = False
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(32, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    loss_chunk_size: int = Field(1024, ge=1)
    """Positions per chunk through the LM head, bounding loss memory."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in backward: less memory, about a third more compute."""
    checkpoint_every: int = Field(500, ge=0)
    """Save a resumable checkpoint every N optimizer steps (0: never); `--resume` continues from the newest."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (the older ones are deleted); more than one survives a damaged newest."""
    seed: int = 0
    device: str = "auto"
    log_every: int = Field(25, ge=1)
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers that get every logged step's loss parts, lr, grad_norm and tokens/s, written under
    `<output_dir>/trackers/` (MLflow: a local file store; W&B: offline); the run is named after `name`."""
    mix: list[MixConfig] = []
    """More datasets to train on with the run's own, e.g. a re-scored SFT set beside teacher samples (their
    held-out prompts stay out of training too; evaluation uses the run's own dataset)."""
    live_teacher: bool = False
    """Load the teacher with transformers in the training process and run it on every micro-batch (no grad), for
    the feature, attention and relation losses; the top-k loss still comes from the dataset."""
    feature: FeatureLossConfig = FeatureLossConfig()
    attention: AttentionLossConfig = AttentionLossConfig()
    relation: RelationLossConfig = RelationLossConfig()

    @model_validator(mode="after")
    def _live_families(self) -> TrainConfig:
        on = [name for name in ("feature", "attention", "relation") if getattr(self, name).weight > 0]
        if on and not self.live_teacher:
            raise ValueError(
                f"train.{on[0]}.weight > 0 needs train.live_teacher: true (hidden states and attention are not in "
                "the dataset; the teacher runs beside the student in training)"
            )
        return self

    @property
    def live_families(self) -> list[str]:
        """The live-teacher loss families with a weight, in the order feature, attention, relation."""
        return [name for name in ("feature", "attention", "relation") if getattr(self, name).weight > 0]


class OnPolicyConfig(_Strict):
    """Rounds after the first (`rounds` > 1): the student samples, the teacher scores, the student trains on."""

    share: float = Field(0.25, gt=0.0, le=1.0)
    """Share of the training prompts the student samples each round (drawn per round, the same on a rerun)."""
    n: int = Field(1, ge=1)
    """Completions the student samples per prompt."""
    temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: int | None = Field(None, ge=1)
    """Default: generate.max_new_tokens."""
    steps: int = Field(200, ge=1)
    """Student optimizer steps per round (from the previous round's student; the optimizer starts afresh)."""
    repeat: int = Field(1, ge=1)
    """Times the round's own samples are seen per epoch; each earlier dataset's once."""
    earlier: Literal["all", "teacher", "none"] = "all"
    """Earlier data trained on beside the round's: every earlier round's and the teacher's samples, only the
    teacher's samples (round 0), or none."""
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "reverse_kl"
    """The divergence in rounds: reverse KL on the student's own samples is the classic on-policy objective."""
    tail_bucket: bool = True
    """Needed by reverse_kl and jsd: without it they only see the student renormalised over the teacher's top-k,
    and moving the student's mass off the top-k costs nothing (docs/design.md)."""
    alpha: float = Field(0.0, ge=0.0, le=1.0)
    """CE weight in rounds: 0, as CE on the student's own samples would reinforce its own mistakes."""
    lr: float | None = Field(None, gt=0)
    """Peak lr of a round's warmup + cosine. Default: the lr round 0's schedule ended at (10% of train.lr): a warm
    student warmed up again to the full peak is knocked back (docs/design.md, "On-policy rounds")."""
