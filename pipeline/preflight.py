"""Checks run before any stage starts, so bad input fails in one line before anything is written."""

from __future__ import annotations

from pathlib import Path

from pipeline.benchmarks import task_manager
from pipeline.config import ConfigError, RunConfig
from pipeline.core import looks_local
from pipeline.dataset.schema import MANIFEST, read_manifest
from pipeline.models import (
    TokenizerMismatchError,
    check_student_vocab,
    configured_vocab_size,
    context_length,
    from_teacher_plan,
    load_tokenizer,
    tokenizer_fingerprint,
)
from pipeline.prompts import read_prompts
from pipeline.trackers import check_trackers


def _local_missing(name: str) -> bool:
    return looks_local(name) and not Path(name).expanduser().exists()


def check_max_model_len(cfg: RunConfig) -> None:
    """`teacher.max_model_len` past the model's own context: vLLM refuses to start (and learned positions have no
    row past it), so say so before a server is launched."""
    t = cfg.teacher
    limit = getattr(t, "max_model_len", None)
    own = context_length(t.model, revision=t.revision, trust_remote_code=t.trust_remote_code) if limit else None
    if limit and own and limit > own:
        raise ConfigError(
            f"teacher.max_model_len={limit} is longer than {t.model!r}'s context of {own} tokens; set it to at most "
            f"{own} or leave it unset"
        )


def preflight(cfg: RunConfig, stages: list[str] | tuple[str, ...]) -> None:
    """Raise a one-line error for missing paths, unreadable prompts or a tokenizer mismatch."""
    if _local_missing(cfg.teacher.model):
        raise ConfigError(
            f"teacher.model path {cfg.teacher.model!r} does not exist (run `make demo` to build the demo teacher, or "
            "fix the path)"
        )
    for path in (Path(cfg.output_dir), *Path(cfg.output_dir).parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"output_dir {cfg.output_dir!r} cannot be a directory: {str(path)!r} is a file; "
                "set output_dir to a directory path"
            )
    if "eval" in stages and "generate" in stages and cfg.prompts.heldout_fraction <= 0:
        raise ConfigError(
            "the eval stage needs held-out prompts: set prompts.heldout_fraction > 0 (e.g. 0.05) "
            "or run --stages generate,train"
        )
    t = cfg.teacher
    managed = t.backend == "vllm_engine" or (t.backend == "vllm_server" and not t.endpoints())
    if "generate" in stages and managed and not Path(t.python).exists():
        raise ConfigError(
            f"teacher.python {t.python!r} not found: create the vLLM teacher environment with "
            "`make teacher-env`, point teacher.python at a Python that has vllm, or attach to servers (teacher.url(s))"
        )
    if cfg.student.model and _local_missing(cfg.student.model):
        raise ConfigError(f"student.model path {cfg.student.model!r} does not exist")
    if "generate" in stages:
        read_prompts(cfg.prompts)  # empty / malformed / non-UTF-8 prompts fail here, not mid-flow
        check_max_model_len(cfg)
    elif not (cfg.dataset_dir / MANIFEST).is_file():
        raise ConfigError(
            f"no dataset at {cfg.dataset_dir}; run the generate stage first (distill run CONFIG --stages generate)"
        )
    if "train" in stages:
        check_trackers(cfg)
    if "eval" in stages and cfg.eval.lm_eval is not None:
        task_manager(cfg.eval.lm_eval)  # a misspelt task stops the run before training, not after it
    if "train" in stages and cfg.student.from_teacher:
        from_teacher_plan(cfg.student, cfg.teacher.model)  # layers and sizes against the teacher's config
    if "train" in stages and cfg.student.model:
        teacher_fp = (
            read_manifest(cfg.dataset_dir).tokenizer_fingerprint
            if (cfg.dataset_dir / MANIFEST).is_file()
            else tokenizer_fingerprint(load_tokenizer(cfg.teacher.model, revision=cfg.teacher.revision))
        )
        student_tok = load_tokenizer(cfg.student.model, revision=cfg.student.revision)
        if tokenizer_fingerprint(student_tok) != teacher_fp:
            raise TokenizerMismatchError(
                f"student {cfg.student.model!r} has a different tokenizer than the teacher {cfg.teacher.model!r}; "
                "distillation on top-k ids needs the same tokenizer: pick a student of the teacher's family"
            )
        rows = configured_vocab_size(
            cfg.student.model, revision=cfg.student.revision, trust_remote_code=cfg.student.trust_remote_code
        )
        if rows is not None:  # the loaded student's LM head is checked again before training
            check_student_vocab(rows, len(student_tok), cfg.student.model)
