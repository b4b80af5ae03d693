"""Distillation from a teacher cache (tiny models, a small corpus): the cached step is the uncached one when top-k
covers the vocabulary, its KL over top-k plus "the rest" matches a reference written here, an interrupted fill or
distillation resumes exactly, and the cache refuses to be read under other settings."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from editing.core.errors import ConfigError
from editing.data.corpus import CorpusDataModule
from editing.models.backpack.distill import BackpackDistillation, BackpackShape, pick_slots
from editing.models.backpack.teacher_cache import TeacherCacheConfig, topk_kl
from editing.models.loading import ModelConfig


def distiller(tmp_path: Path, top_k: int | None = None, **cache) -> BackpackDistillation:
    """A tiny distillation; with ``top_k`` it reads a teacher cache under ``tmp_path`` (fp32, exact teacher)."""
    config = None
    if top_k is not None:
        config = TeacherCacheConfig(**{"enabled": True, "top_k": top_k, "hidden_precision": "fp32",
                                       "teacher_bf16": False, "shard_blocks": 4, "batch_size": 3,
                                       "folder": str(tmp_path / "teacher-cache"), **cache})
    return BackpackDistillation(teacher=ModelConfig(name="tiny-llama"), shape=BackpackShape(num_senses=4),
                                lr=3e-3, warmup_steps=2, teacher_cache=config)


def data(corpus: Path, module: BackpackDistillation) -> CorpusDataModule:
    dm = CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4)
    dm.attach(module.tokenizer)
    dm.setup()
    return dm


def trainer(root: Path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=str(root), **kw)


def vocabulary(module: BackpackDistillation) -> int:
    return module.teacher.get_output_embeddings().weight.shape[0]


def cached_batch(module: BackpackDistillation, dm: CorpusDataModule, indices: list[int]) -> dict:
    module.cache = module.fill_teacher_cache(dm, progress=False)
    return {"input_ids": dm.blocks[indices], "index": torch.tensor(indices)}


def gradients(module: BackpackDistillation, batch, fraction: float) -> tuple[float, dict[str, torch.Tensor]]:
    module.student.zero_grad()
    kl, _ = module.kl_loss(batch, fraction, step=3)
    kl.backward()
    return float(kl), {n: p.grad.clone() for n, p in module.student.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_a_cached_step_has_the_uncached_gradients_when_top_k_is_the_vocabulary(tmp_path, corpus, fraction) -> None:
    plain = distiller(tmp_path)
    cached = distiller(tmp_path, top_k=10**9)  # more than the vocabulary: all of it
    dm = data(corpus, plain)
    indices = [0, 5, 9]
    batch = cached_batch(cached, dm, indices)
    assert batch["input_ids"].shape == (3, 32)
    kl_plain, grads_plain = gradients(plain, dm.blocks[indices], fraction)
    kl_cached, grads_cached = gradients(cached, batch, fraction)
    assert kl_plain > 0.01
    assert math.isclose(kl_cached, kl_plain, rel_tol=1e-5)
    assert set(grads_plain) == set(grads_cached) and grads_plain
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_cached[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_cached_kl_is_the_kl_over_the_top_k_and_the_rest(tmp_path, corpus) -> None:
    """Reference: per position, the teacher's and the student's probabilities of the teacher's k most likely tokens
    and of all other tokens together, KL summed by plain loops."""
    k = 5
    module = distiller(tmp_path, top_k=k)
    with torch.no_grad():
        # a random tiny model predicts nearly uniformly; a larger final norm makes the teacher peaked (in the
        # teacher and in the student's copy of its body, which the cache reads)
        module.teacher.model.norm.weight.mul_(40.0)
        module.student.backpack.contextualizer.norm.weight.mul_(40.0)
    dm = data(corpus, module)
    indices = [2, 7]
    batch = cached_batch(module, dm, indices)
    kl, _ = module.kl_loss(batch)
    ids = dm.blocks[indices]
    with torch.no_grad():
        teacher = torch.softmax(module.teacher(input_ids=ids).logits.double(), dim=-1)
        student = torch.softmax(module.student(ids).logits.double(), dim=-1)
    total, positions = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            p, q = teacher[b, t].tolist(), student[b, t].tolist()
            top = sorted(range(len(p)), key=lambda v: -p[v])[:k]
            p_rest, q_rest = 1.0 - sum(p[v] for v in top), 1.0 - sum(q[v] for v in top)
            total += sum(p[v] * math.log(p[v] / q[v]) for v in top) + p_rest * math.log(p_rest / q_rest)
            positions += 1
    assert total / positions > 1e-3, total / positions
    assert math.isclose(float(kl), total / positions, rel_tol=1e-4)
    # fewer outcomes than the vocabulary: the KL over them is smaller than the full one
    plain = distiller(tmp_path)
    plain.student.load_state_dict(module.student.state_dict())
    full, _ = plain.kl_loss(ids)
    assert float(kl) < float(full)


@pytest.mark.parametrize("student_tail", [0.5, 3e-2, 5e-3, 1e-5])
def test_the_top_k_kl_takes_the_students_tail_from_its_top_k_without_losing_precision(student_tail) -> None:
    """The student's mass outside the top k comes from its top-k mass (one minus it) or, where that cancels, from
    the rest of the vocabulary. Reference: plain loops in float64 over every token, for a student whose tail is
    large, near the switch (1e-2) and tiny; the gradient is checked against float64 autograd of the sum over
    the rest of the vocabulary."""
    torch.manual_seed(0)
    n, vocab, k = 6, 40, 4
    teacher = torch.log_softmax(torch.randn(n, vocab, dtype=torch.float64) * 2, dim=-1)
    top_logp, top_ids = teacher.topk(k, dim=-1)
    tail = torch.logsumexp(teacher.scatter(-1, top_ids, float("-inf")), dim=-1)
    logits = torch.randn(n, vocab, dtype=torch.float64)
    # the student puts 1 - student_tail on the teacher's top k (spread at random) and student_tail on the rest
    on_top = torch.softmax(logits.gather(-1, top_ids), dim=-1) * (1 - student_tail)
    rest = torch.softmax(logits.scatter(-1, top_ids, float("-inf")), dim=-1) * student_tail
    probs = rest.scatter(-1, top_ids, on_top)
    expected = 0.0
    for row in range(n):
        p_top = [math.exp(v) for v in top_logp[row].tolist()]
        q_top = [float(probs[row, i]) for i in top_ids[row].tolist()]
        q_rest = sum(float(probs[row, i]) for i in range(vocab) if i not in top_ids[row].tolist())
        p_rest = math.exp(float(tail[row]))
        expected += sum(p * math.log(p / q) for p, q in zip(p_top, q_top, strict=True))
        expected += p_rest * math.log(p_rest / q_rest)
    student = probs.log().float().requires_grad_(True)
    kl = topk_kl(torch.log_softmax(student, dim=-1), top_ids.int(), top_logp.float(), tail.float())
    kl.backward()
    assert math.isclose(float(kl), expected, rel_tol=2e-5), (float(kl), expected)
    reference = probs.log().requires_grad_(True)
    s_logp = torch.log_softmax(reference, dim=-1)
    s_rest = torch.logsumexp(s_logp.scatter(-1, top_ids, float("-inf")), dim=-1)
    ref = (top_logp.exp() * (top_logp - s_logp.gather(-1, top_ids))).sum() + (tail.exp() * (tail - s_rest)).sum()
    ref.backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-3, atol=1e-6)


def test_an_interrupted_fill_resumes_at_the_missing_shards_and_gives_the_same_cache(tmp_path, corpus) -> None:
    module = distiller(tmp_path, top_k=7)
    dm = data(corpus, module)
    cache = module.fill_teacher_cache(dm, progress=False)
    assert cache.num_shards >= 3 and not cache.missing_shards()
    first = {s: load_file(cache.shard_path(s)) for s in range(cache.num_shards)}
    stamps = {s: cache.shard_path(s).stat().st_mtime_ns for s in range(cache.num_shards)}
    cache.shard_path(1).unlink()  # what a pass stopped during shard 1 leaves: no shard 1 (writes are atomic)
    again = distiller(tmp_path, top_k=7).fill_teacher_cache(dm, progress=False)
    assert again.folder == cache.folder
    for shard in range(cache.num_shards):
        now = load_file(cache.shard_path(shard))
        assert set(now) == {"hidden", "topk_logp", "topk_ids", "tail_logp"}
        for key, value in first[shard].items():
            assert torch.equal(now[key], value), (shard, key)
        if shard != 1:  # only the missing shard was computed again
            assert cache.shard_path(shard).stat().st_mtime_ns == stamps[shard]
    read = again.read(torch.tensor([1, 4, 11]))
    assert torch.equal(read["topk_ids"][1], first[1]["topk_ids"][0])  # block 4 is shard 1's first block
    assert read["hidden"].shape == (3, 32, module.teacher.config.hidden_size)


def test_other_settings_use_another_cache_and_a_wrong_manifest_is_refused(tmp_path, corpus) -> None:
    module = distiller(tmp_path, top_k=7)
    dm = data(corpus, module)
    cache = module.fill_teacher_cache(dm, progress=False)
    other = distiller(tmp_path, top_k=8).teacher_cache_of(dm)
    assert other.folder != cache.folder and other.missing_shards() == list(range(other.num_shards))
    shorter = CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4, max_tokens=200)
    shorter.attach(module.tokenizer)
    assert module.teacher_cache_of(shorter).folder != cache.folder
    manifest = cache.folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"top_k": 7', '"top_k": 9'))
    with pytest.raises(ConfigError, match="top_k"):
        module.teacher_cache_of(dm)
    with pytest.raises(ConfigError, match="top_k"):
        TeacherCacheConfig(top_k=0)
    with pytest.raises(ConfigError, match="hidden_precision"):
        TeacherCacheConfig(hidden_precision="fp8")


def test_distillation_from_the_cache_never_runs_the_teacher_and_resumes_exactly(tmp_path, corpus) -> None:
    L.seed_everything(0)
    straight = distiller(tmp_path, top_k=16)
    calls = []
    straight.student.backpack.contextualizer.register_forward_hook(lambda *a: calls.append(1))
    dm = CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4)
    trainer(tmp_path / "a", epochs=2, enable_checkpointing=False).fit(straight, dm)
    filled = len(calls)
    assert straight.trainer.global_step >= 10
    # the teacher ran only while the cache was filled: once per batch of cache blocks, none in training
    cache = straight.cache
    assert filled == sum(math.ceil(min(4, cache.num_blocks - 4 * s) / 3) for s in range(cache.num_shards))

    class Interrupt(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    L.seed_everything(0)
    first = distiller(tmp_path, top_k=16)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path / "b", epochs=2, callbacks=[checkpoint, Interrupt()]).fit(
        first, CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4))
    assert first.trainer.current_epoch == 1
    resumed = distiller(tmp_path, top_k=16)
    trainer(tmp_path / "b", epochs=2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True,
                                                                 save_top_k=0)]).fit(
        resumed, CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = straight.trainable_state(), resumed.trainable_state()
    assert set(a) == set(b) and a
    for name in a:
        if not name.endswith("sense_weight_net.c_attn.bias"):  # its key half has an exactly-zero gradient
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5, msg=name)
    x = dm.blocks[:2]
    with torch.no_grad():
        # thread-order rounding, amplified by Adam where a gradient is near zero, moves logits by ~1e-5
        torch.testing.assert_close(resumed.student.eval()(x).logits, straight.student.eval()(x).logits,
                                   rtol=1e-4, atol=1e-4)


def test_cache_teacher_command_fills_the_cache_distill_reads(tmp_path, corpus, capsys) -> None:
    from editing.cli import main

    folder = tmp_path / "teacher-cache"
    common = ["--config", str(Path(__file__).resolve().parents[2] / "lightning_configs" / "distill" / "tiny.yaml"),
              "--data.corpus", str(corpus), "--model.teacher_cache.top_k", "12",
              "--model.teacher_cache.folder", str(folder)]
    main(["backpack", "cache-teacher", *common])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("teacher cache ") and "top_k 12" in line
    (cache,) = [p for p in folder.iterdir() if p.is_dir()]
    shards = sorted(p.name for p in cache.glob("shard-*.safetensors"))
    assert shards and f"{len(shards)}/{len(shards)} shards" in line
    stamps = [p.stat().st_mtime_ns for p in sorted(cache.glob("shard-*.safetensors"))]
    main(["backpack", "distill", *common, "--model.teacher_cache.enabled", "true", "--model.output",
          str(tmp_path / "model"), "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert (tmp_path / "model" / "config.json").is_file()
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("shard-*.safetensors"))] == stamps  # read, not recomputed


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_cached_distillation_trains_in_bf16_with_and_without_gradient_clipping(tmp_path, corpus, clip) -> None:
    """The SmolLM2 config clips gradients under bf16-mixed; Lightning refuses to clip for a fused optimizer there,
    so the optimizer follows the trainer's setting; either way a bf16 step trains."""
    module = distiller(tmp_path, top_k=16)
    start = {n: t.detach().clone() for n, t in module.trainable_state().items()}
    dm = CorpusDataModule(corpus=str(corpus), block_size=32, batch_size=4, val_blocks=4)
    trainer(tmp_path / "run", epochs=1, precision="bf16-mixed", gradient_clip_val=clip, max_steps=1,
            enable_checkpointing=False).fit(module, dm)
    optimizer = module.trainer.optimizers[0]
    assert optimizer.defaults["fused"] is (None if clip else True)
    assert optimizer.defaults["foreach"] is (True if clip else None)
    moved = sum(float((t.detach() - start[n]).abs().sum()) for n, t in module.trainable_state().items())
    assert math.isfinite(moved) and moved > 0


def test_a_sampled_step_is_the_kl_of_a_full_pass_at_the_drawn_positions(tmp_path, corpus, monkeypatch) -> None:
    """With a KL fraction below one the Backpack computes its sums at the drawn positions only; the loss and the
    gradients must be those of a full forward pass read at those positions (reference: dense log-softmaxes of the
    whole student and teacher, the drawn positions recorded as the step draws them)."""
    module = distiller(tmp_path)
    with torch.no_grad():
        module.teacher.model.norm.weight.mul_(20.0)  # a peaked teacher, so the KL is far from zero
        module.student.backpack.contextualizer.norm.weight.mul_(20.0)
    dm = data(corpus, module)
    ids = dm.blocks[[1, 4, 6, 8]]
    drawn = []
    randperm = torch.randperm

    def recording(*args, **kw):
        drawn.append(randperm(*args, **kw))
        return drawn[-1]

    monkeypatch.setattr(torch, "randperm", recording)
    kl, grads = gradients(module, ids, 0.3)
    monkeypatch.setattr(torch, "randperm", randperm)
    picks = drawn[0][: round(0.3 * ids.numel())].tolist()
    rows = {p // ids.shape[1] for p in picks}
    assert rows == {0, 1, 2, 3} and len(picks) == 38  # every row drawn from, unevenly

    module.student.zero_grad()
    s_logp = torch.log_softmax(module.student(ids).logits.float(), dim=-1).flatten(0, 1)
    with torch.no_grad():
        t_logp = torch.log_softmax(module.teacher(input_ids=ids).logits.float(), dim=-1).flatten(0, 1)
    total = s_logp.new_zeros(())
    for p in picks:
        total = total + (t_logp[p].exp() * (t_logp[p] - s_logp[p])).sum()
    reference = total / len(picks)
    reference.backward()
    assert float(reference) > 0.01
    assert math.isclose(kl, float(reference), rel_tol=1e-5)
    for name, p in module.student.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_pick_slots_lays_out_each_rows_positions() -> None:
    # rows of 8: row 0 {2, 3, 7}, row 1 {13}, row 2 {17}, row 3 {30, 31}
    picks = torch.tensor([13, 2, 7, 30, 3, 17, 31])
    rows, slots, targets = pick_slots(picks, (5, 8))  # row 4: no picks
    assert targets.shape == (5, 3)
    for i, p in enumerate(picks.tolist()):
        assert rows[i] == p // 8 and targets[rows[i], slots[i]] == p % 8
    for r in range(5):
        used = sorted(int(slots[i]) for i in range(len(picks)) if rows[i] == r)
        assert used == list(range(len(used)))  # each row fills its first slots, once each


def test_the_frozen_heads_bf16_copy_is_reused_and_made_again_after_an_in_place_change(tmp_path) -> None:
    """The cached step keeps the frozen head's bf16 copy across steps; loading a checkpoint (an in-place copy) or any
    other in-place change must give a new one, equal to the weight's cast."""
    module = distiller(tmp_path)
    weight = module.student.get_output_embeddings().weight
    assert not weight.requires_grad
    first = module._head_weight(weight, torch.bfloat16)
    assert torch.equal(first, weight.to(torch.bfloat16))
    assert module._head_weight(weight, torch.bfloat16) is first
    with torch.no_grad():
        weight.mul_(2.0)
    again = module._head_weight(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.to(torch.bfloat16))
    assert module._head_weight(weight, torch.float32) is weight  # no copy in the weight's own dtype
