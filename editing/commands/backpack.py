"""``editing backpack distill`` (a Lightning fit of a Backpack on a corpus, through LightningCLI), ``editing backpack
cache-teacher`` (the teacher's outputs on the corpus, computed once for distillation) and ``editing backpack export``
(a distillation checkpoint written as a model folder)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from editing.commands import DEFAULT_ROOT, parses_own_arguments
from editing.commands.lightning import (
    HELP_ALL,
    EditingArgumentParser,
    FitConfigSaver,
    ProjectCLI,
    SaveLastOnStop,
    SaveOnInterrupt,
    field_docstrings,
    model_help_parser,
    wants_help,
)
from editing.core.errors import ConfigError


class DistillCLI(ProjectCLI):
    """LightningCLI of ``editing backpack distill``: ``BackpackDistillation`` on a ``CorpusDataModule``, with a
    checkpoint every 25 steps and on interruption."""

    command = "backpack distill"
    main_options = {"fit": ("model.teacher.name", "model.shape.num_senses", "model.lr", "model.output",
                            "model.overwrite", "data.corpus", "data.files", "data.max_tokens", "data.sample",
                            "data.block_size", "data.batch_size",
                            "trainer.max_time", "trainer.max_epochs", "trainer.precision",
                            "trainer.default_root_dir", "ckpt_path")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                             "checkpoint.every_n_train_steps": 25})

    def help_parts(self, parser, subcommand: str, args: list[str]) -> tuple[str, object]:
        intro = ("Distil a Backpack from a causal LM on a text corpus: the LM is the frozen contextualizer; the sense\n"
                 "network and the alpha head train (KL to the LM). The model folder is written to --model.output.\n"
                 "  editing backpack distill --config lightning_configs/distill/smollm2_backpack.yaml")
        from editing.models.backpack.distill import BackpackDistillation

        return intro, model_help_parser(parser, BackpackDistillation)


_VAL_CHECK = re.compile(r"`val_check_interval` \((\d+)\) must be less than or equal to the number of the "
                        r"training batches \((\d+)\)")


@contextmanager
def _clear_trainer_errors() -> Iterator[None]:
    """Lightning's refusal of a ``val_check_interval`` longer than the epoch (a traceback from its data setup) as a
    ``ConfigError`` naming the option and the fix: the presets validate every 400 steps, which a corpus cut with
    ``--data.max_tokens`` may not reach."""
    try:
        yield
    except ValueError as err:
        found = _VAL_CHECK.search(str(err))
        if found is None:
            raise
        given, batches = found.groups()
        raise ConfigError(f"--trainer.val_check_interval {given} is more than the {batches} training batches an "
                          f"epoch has here: give at most {batches} (--trainer.val_check_interval {batches}), or more "
                          "text (--data.max_tokens)") from None


@parses_own_arguments
def distill(args: list[str]) -> None:
    """``editing backpack distill``: a Lightning fit of ``BackpackDistillation`` on a ``CorpusDataModule``."""
    from editing.data.corpus import CorpusDataModule
    from editing.models.backpack.distill import BackpackDistillation

    # an interrupted run (Ctrl-C, a crash) still leaves its latest state: `editing backpack export` turns it into
    # a model folder, `--ckpt_path` resumes it
    with field_docstrings(args), _clear_trainer_errors():
        DistillCLI(BackpackDistillation, CorpusDataModule,
                   args=["fit", *["--help" if a == HELP_ALL else a for a in args]],
                   save_config_callback=FitConfigSaver, parser_class=EditingArgumentParser,
                   parser_kwargs={"prog": "editing backpack distill"}, short_help=wants_help(args) == "short",
                   trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0,
                                     # the corpus sampler shards by rank itself and restores its place in the epoch
                                     "use_distributed_sampler": False,
                                     "callbacks": [SaveOnInterrupt(), SaveLastOnStop()],
                                     "logger": lazy_instance(CSVLogger, save_dir=DEFAULT_ROOT, name="distill")})


@parses_own_arguments
def cache_teacher(args: list[str]) -> None:
    """``editing backpack cache-teacher``: fill the teacher cache that ``editing backpack distill
    --model.teacher_cache.enabled true`` reads. It takes distill's options (the same ``--config``), so the cache
    it fills is the one that run will look for; it writes no model. Interrupted, it resumes at the first missing
    shard."""
    from editing.data.corpus import CorpusDataModule
    from editing.models.backpack.distill import BackpackDistillation
    from editing.models.backpack.teacher_cache import describe

    if wants_help(args):
        print("usage: editing backpack cache-teacher [distill's options]\n\n"
              "Compute the teacher's hidden states and top-k next-token log-probabilities on every block of the\n"
              "corpus once, for `editing backpack distill --model.teacher_cache.enabled true`. It reads the same\n"
              "options as distill (--config FILE, --model.teacher_cache.top_k, --data.max_tokens, ...); see\n"
              "`editing backpack distill --help`.\n"
              "  editing backpack cache-teacher --config lightning_configs/distill/smollm2_backpack_cached.yaml")
        raise SystemExit(0)
    with field_docstrings(args):
        # the model folder is distill's business: never refuse (or touch) it here
        cli = DistillCLI(BackpackDistillation, CorpusDataModule, args=[*args, "--model.output=null"], run=False,
                         parser_class=EditingArgumentParser, parser_kwargs={"prog": "editing backpack cache-teacher"},
                         trainer_defaults={"logger": False})
    datamodule = cli.datamodule
    datamodule.attach(cli.model.tokenizer)
    cache = cli.model.fill_teacher_cache(datamodule)
    print(describe(cache))


def export(checkpoint: str, output_dir: str, overwrite: bool = False) -> Path:
    """Write the Backpack of a distillation checkpoint (e.g. an interrupted run's ``last.ckpt``) as a model folder.

    Args:
        checkpoint: a checkpoint written by ``editing backpack distill``.
        output_dir: the model folder to write.
        overwrite: replace an existing folder.

    Returns:
        The model folder (also printed).
    """
    from editing.models.backpack.distill import export_checkpoint

    folder = export_checkpoint(checkpoint, output_dir, overwrite)
    print(folder)
    return folder
