"""The lm-eval harness adapter: ``lm_eval`` evaluates a Shardforge checkpoint with its own tasks.

Importing this module registers the model ``shardforge`` with lm-eval::

    import lm_eval, training.inference.harness
    lm_eval.simple_evaluate(model="shardforge", model_args={"checkpoint": "runs/x/checkpoints"}, tasks=[...])

or, from the shell, ``shardforge harness --checkpoint DIR --tasks NAME [--include DIR]``. The model runs in one
process from the checkpoint's full weights (any training layout, a consolidated, pruned or int8 folder) through
:mod:`training.inference.decode`; the log-likelihoods are the ones ``shardforge eval`` computes
(:mod:`training.inference.evaluate`), so a multiple-choice task scores the same in both. Needs ``lm-eval`` (``pip
install -c constraints.txt lm-eval``).
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from core.errors import ConfigError
from training.inference.decode import Sampling, generate
from training.inference.evaluate import EOS_ID, continuation_log_prob, encode_pair, load_model, rolling_log_prob


@register_model("shardforge")
class ShardforgeLM(LM):
    """lm-eval's three request types over a Shardforge checkpoint. ``model_args``: ``checkpoint`` (required),
    ``data`` (the dataset folder holding the tokenizer; default: the checkpoint's config), ``max_length`` (the
    context window; default: the training ``data.seq_length``)."""

    def __init__(self, checkpoint: str, data: str | None = None, max_length: int | None = None, **_ignored) -> None:
        super().__init__()
        self.model = load_model(checkpoint, data)
        seq = self.model.cfg.data.seq_length
        self.max_length = int(max_length or seq)
        if self.model.cfg.model.position_embedding == "learned" and self.max_length > seq:
            raise ConfigError(f"max_length={self.max_length}: this model learned positions up to {seq}",
                              fix=f"use max_length <= {seq}")  # fmt: skip

    @property
    def tokenizer_name(self) -> str:
        return f"shardforge-sentencepiece-{self.model.vocab}"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = encode_pair(self.model.sp, context, continuation)
            out.append(continuation_log_prob(self.model, ctx, cont))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [rolling_log_prob(self.model, req.args[0], self.max_length) for req in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate(*req.args) for req in requests]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        """Greedy (or sampled with ``do_sample``) until a stop string, end-of-document or ``max_gen_toks``."""
        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sampling = Sampling(
            max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            seed=int(kwargs.get("seed") or 0),
        )
        sp = self.model.sp
        room = max(self.max_length - sampling.max_new_tokens, 1)  # the prompt's end and the answer fit the window
        prompt = [EOS_ID, *sp.encode(context)][-room:]
        done: list[int] = []
        for token in generate(self.model.decoder, prompt, self.model.vocab, sampling, stop=sp.eos_id()):
            if token == sp.eos_id():
                break
            done.append(token)
            text = sp.decode(done)
            if any(u in text for u in until):
                break
        return cut_at_stop(sp.decode(done), until)


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cuts = [text.index(u) for u in until if u in text]
    return text[: min(cuts)] if cuts else text


def run_harness(
    checkpoint: str, tasks: list[str], include: str | None = None, limit: int | None = None, data: str | None = None,
    bootstrap_iters: int = 1000,
) -> dict:  # fmt: skip
    """``lm_eval.simple_evaluate`` on the ``shardforge`` model; ``include`` adds a folder of task YAMLs (with it,
    only those tasks are indexed: the built-in ones would need downloads, and nothing is downloaded here)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"--include '{include}' is not a folder", fix="give a folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=include, include_defaults=include is None)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        where = f"the task YAMLs in '{include}'" if include else "lm-eval's built-in tasks"
        raise ConfigError(f"lm-eval task '{unknown[0]}' is not among {where}",
                          fix="check the name (the YAML's `task:` key) or pass --include DIR")  # fmt: skip
    args = {"checkpoint": str(checkpoint), **({"data": str(data)} if data else {})}
    return lm_eval.simple_evaluate(
        model="shardforge", model_args=args, tasks=tasks, task_manager=manager, limit=limit,
        bootstrap_iters=bootstrap_iters, log_samples=False,
    )  # fmt: skip
