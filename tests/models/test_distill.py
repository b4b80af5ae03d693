"""Distilling a Backpack from a causal LM (tiny models, a small corpus): the KL falls, the saved model reloads and
scores identically, and a resumed run reaches the same state as an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from editing.commands.lightning import SaveLastOnStop
from editing.core.errors import DataFormatError
from editing.data.corpus import CorpusDataModule
from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.models.backpack import BackpackLMHeadModel
from editing.models.backpack.distill import BackpackDistillation, BackpackShape, build_backpack_from
from editing.models.loading import LoadedModel, ModelConfig, load_model
from editing.runs.checkpoints import load_checkpoint_file


def distiller(tmp_path: Path, **kw) -> BackpackDistillation:
    return BackpackDistillation(teacher=ModelConfig(name="tiny-llama"), shape=BackpackShape(num_senses=4),
                                lr=3e-3, warmup_steps=2, **kw)


def data(corpus: Path) -> CorpusDataModule:
    return CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4)


def trainer(tmp_path: Path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=str(tmp_path), **kw)


def val_kl(module: BackpackDistillation, dm: CorpusDataModule) -> float:
    with torch.no_grad():
        return float(torch.stack([module.kl_loss(b)[0] for b in dm.val_dataloader()]).mean())


def test_the_student_shares_the_teachers_body_and_embeddings() -> None:
    teacher = load_model(ModelConfig(name="tiny-llama")).model
    student = build_backpack_from(teacher, BackpackShape(num_senses=4, layers=2))
    assert len(student.backpack.contextualizer.layers) == 2
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    assert student.lm_head.weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()
    x = torch.randint(0, 1000, (1, 6))
    ours = student.backpack.contextualizer(input_ids=x).last_hidden_state
    assert ours.shape == (1, 6, teacher.config.hidden_size)


def test_distillation_lowers_the_kl(tmp_path, corpus) -> None:
    L.seed_everything(0)
    module = distiller(tmp_path)
    dm = data(corpus)
    dm.attach(module.tokenizer)
    dm.setup()
    before = val_kl(module, dm)
    trainer(tmp_path, epochs=3, enable_checkpointing=False).fit(module, dm)
    after = val_kl(module, dm)
    assert after < 0.9 * before


def test_the_distilled_model_reloads_and_scores_identically(tmp_path, corpus, data_root) -> None:
    L.seed_everything(0)
    module = distiller(tmp_path, output=str(tmp_path / "model"))
    trainer(tmp_path, epochs=1, enable_checkpointing=False).fit(module, data(corpus))
    loaded = load_model(ModelConfig(name=str(tmp_path / "model")))
    assert isinstance(loaded.model, BackpackLMHeadModel)
    assert loaded.model.config.contextualizer["model_type"] == "llama"
    tasks = TaskDataModule(task="country_capital", eval_limit=5, general_limit=5)
    trained = LoadedModel(module.student.eval(), module.tokenizer, loaded.max_length, {"name": "student"})
    assert evaluate(loaded, tasks) == evaluate(trained, tasks)
    with pytest.raises(Exception, match="already exists"):  # a finished model is never overwritten silently
        distiller(tmp_path, output=str(tmp_path / "model"))


def assert_same_student(a: BackpackDistillation, b: BackpackDistillation, corpus: Path) -> None:
    dm = data(corpus)
    dm.attach(a.tokenizer)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(b.student.eval()(batch).logits, a.student.eval()(batch).logits,
                                   rtol=1e-4, atol=1e-5)


def test_resume_reaches_the_same_state(tmp_path, corpus) -> None:
    L.seed_everything(0)
    straight = distiller(tmp_path)
    trainer(tmp_path / "a", epochs=2, enable_checkpointing=False).fit(straight, data(corpus))

    class Interrupt(L.Callback):  # the same run (same schedule), stopped after its first epoch
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    L.seed_everything(0)
    first = distiller(tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path / "b", epochs=2, callbacks=[checkpoint, Interrupt()]).fit(first, data(corpus))
    assert first.trainer.current_epoch == 1
    resumed = distiller(tmp_path)
    trainer(tmp_path / "b", epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                                 save_top_k=0)]).fit(
        resumed, data(corpus), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert set(a) == set(b) and a
    # Compared through outputs: the key half of alpha's bias has an exactly-zero gradient (softmax is invariant to
    # it), so Adam turns thread-order rounding noise there into arbitrary steps that change no output.
    assert_same_student(straight, resumed, corpus)
    for name in a:
        if not name.endswith("sense_weight_net.c_attn.bias"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)


def test_a_run_stopped_mid_epoch_resumes_where_it_stopped(tmp_path, corpus) -> None:
    """A time limit stops a run between periodic checkpoints; resuming must neither lose the steps since the last one
    nor start the epoch's data over (the loader restores its place in the epoch)."""
    L.seed_everything(0)
    straight = distiller(tmp_path)
    trainer(tmp_path / "a", epochs=1, enable_checkpointing=False).fit(straight, data(corpus))
    batches = straight.trainer.global_step
    assert batches >= 10

    class StopAt(L.Callback):  # what max_time does: should_stop in the middle of the epoch
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                trainer.should_stop = True

    def checkpoints() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=5)

    L.seed_everything(0)
    first = distiller(tmp_path)
    trainer(tmp_path / "b", epochs=1, callbacks=[checkpoints(), StopAt(), SaveLastOnStop()]).fit(first, data(corpus))
    assert load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 7

    resumed = distiller(tmp_path)
    seen: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch)

    trainer(tmp_path / "b", epochs=1, callbacks=[checkpoints(), Record()]).fit(
        resumed, data(corpus), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.trainer.global_step == batches and len(seen) == batches - 7
    dm = data(corpus)
    dm.attach(resumed.tokenizer)
    dm.setup()
    expected = list(dm.train_dataloader())[7:]
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))
    assert_same_student(straight, resumed, corpus)


def test_a_corpus_folder_without_text_files_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    dm = CorpusDataModule(corpus=str(tmp_path / "empty"))
    dm.attach(load_model(ModelConfig(name="tiny-llama")).tokenizer)
    with pytest.raises(DataFormatError, match="no .jsonl"):
        dm.setup()


def test_an_interrupted_run_exports_from_its_checkpoint(tmp_path, corpus) -> None:
    from editing.cli import main

    L.seed_everything(0)
    module = distiller(tmp_path)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, epochs=1, callbacks=[checkpoint]).fit(module, data(corpus))
    main(["backpack", "export", "--checkpoint", str(tmp_path / "ckpt" / "last.ckpt"), "--output_dir",
          str(tmp_path / "model")])
    loaded = load_model(ModelConfig(name=str(tmp_path / "model"))).model
    x = torch.randint(0, 1000, (1, 8))
    assert torch.equal(loaded(x).logits, module.student.eval()(x).logits)
