"""Backpack LMs: native loading (no remote code), sense finetuning, sense edits, and the ensemble."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from callbacks.degradation_budget import DegradationBudget
from editing.core.errors import ConfigError
from editing.data.datamodule import TaskDataModule
from editing.data.jsonl import read_jsonl
from editing.data.tokenize import ExampleTokenizer
from editing.evaluation import evaluate
from editing.evaluation.scorer import example_nll
from editing.methods import EditingModule, LoRAConfig, LoRAEditor, OptimizerConfig, SensesConfig, SensesEditor
from editing.methods.senses.selection import example_importance, select_senses
from editing.models.backpack import BackpackConfig, BackpackLMHeadModel
from editing.models.loading import ModelConfig, load_model
from editing.rules.losses import training_loss

LIMITS = {"eval_limit": 6, "general_limit": 8}

# SPEC section 7: every state-dict name (per layer N of the 12) and its shape for the full-size config
FULL_SIZE_KEYS = {
    "backpack.gpt2_model.wte.weight": (50264, 768),
    "backpack.gpt2_model.wpe.weight": (512, 768),
    "backpack.gpt2_model.ln_f.weight": (768,),
    "backpack.gpt2_model.ln_f.bias": (768,),
    "backpack.gpt2_model.h.N.ln_1.weight": (768,),
    "backpack.gpt2_model.h.N.ln_1.bias": (768,),
    "backpack.gpt2_model.h.N.attn.c_attn.weight": (768, 2304),
    "backpack.gpt2_model.h.N.attn.c_attn.bias": (2304,),
    "backpack.gpt2_model.h.N.attn.c_proj.weight": (768, 768),
    "backpack.gpt2_model.h.N.attn.c_proj.bias": (768,),
    "backpack.gpt2_model.h.N.ln_2.weight": (768,),
    "backpack.gpt2_model.h.N.ln_2.bias": (768,),
    "backpack.gpt2_model.h.N.mlp.c_fc.weight": (768, 3072),
    "backpack.gpt2_model.h.N.mlp.c_fc.bias": (3072,),
    "backpack.gpt2_model.h.N.mlp.c_proj.weight": (3072, 768),
    "backpack.gpt2_model.h.N.mlp.c_proj.bias": (768,),
    "backpack.word_embeddings.weight": (50264, 768),
    "backpack.position_embeddings.weight": (512, 768),
    "backpack.sense_network.ln.weight": (768,),
    "backpack.sense_network.ln.bias": (768,),
    "backpack.sense_network.block.ln_1.weight": (768,),
    "backpack.sense_network.block.ln_1.bias": (768,),
    "backpack.sense_network.block.mlp.c_fc.weight": (768, 3072),
    "backpack.sense_network.block.mlp.c_fc.bias": (3072,),
    "backpack.sense_network.block.mlp.c_proj.weight": (3072, 768),
    "backpack.sense_network.block.mlp.c_proj.bias": (768,),
    "backpack.sense_network.block.ln_2.weight": (768,),
    "backpack.sense_network.block.ln_2.bias": (768,),
    "backpack.sense_network.final_mlp.c_fc.weight": (768, 3072),
    "backpack.sense_network.final_mlp.c_fc.bias": (3072,),
    "backpack.sense_network.final_mlp.c_proj.weight": (3072, 16 * 768),
    "backpack.sense_network.final_mlp.c_proj.bias": (16 * 768,),
    "backpack.sense_weight_net.c_attn.weight": (1536, 768),
    "backpack.sense_weight_net.c_attn.bias": (1536,),
    "lm_head.weight": (50264, 768),
}


def tiny_config(**kw) -> BackpackConfig:
    return BackpackConfig(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_senses=4,
                          sense_intermediate_scale=2, bos_token_id=0, eos_token_id=0, **kw)


def hub_style_checkpoint(folder: Path, model: BackpackLMHeadModel, with_aliases: bool) -> Path:
    """A folder laid out like the hub's stanfordnlp/backpack-gpt2: model_type gpt2, remote-code auto_map."""
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.update({"model_type": "gpt2", "architectures": ["BackpackGPT2LMHeadModel"],
                   "auto_map": {"AutoConfig": "configuration_backpack_gpt2.BackpackGPT2Config",
                                "AutoModelForCausalLM": "modeling_backpack_gpt2.BackpackGPT2LMHeadModel"}})
    config.pop("contextualizer", None)
    config.pop("sense_attention_dim", None)
    (folder / "config.json").write_text(json.dumps(config))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if not with_aliases:
        for key in ("backpack.word_embeddings.weight", "backpack.position_embeddings.weight", "lm_head.weight"):
            state.pop(key)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("with_aliases", [True, False])
def test_reference_key_names_round_trip(tmp_path, with_aliases: bool) -> None:
    torch.manual_seed(0)
    model = BackpackLMHeadModel(tiny_config()).eval()
    names = set(model.state_dict())
    assert {"backpack.word_embeddings.weight", "backpack.position_embeddings.weight", "lm_head.weight",
            "backpack.sense_weight_net.c_attn.weight", "backpack.sense_network.final_mlp.c_proj.weight"} <= names
    folder = hub_style_checkpoint(tmp_path / "hub", model, with_aliases)
    loaded = load_model(ModelConfig(name=str(folder), tokenizer="gpt2"))
    assert isinstance(loaded.model, BackpackLMHeadModel)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.backpack.gpt2_model.wte.weight.data_ptr()
    x = torch.randint(0, 300, (2, 9))
    assert torch.equal(loaded.model(x).logits, model(x).logits)
    # the class's own from_pretrained reads the hub layout too (auto_map ignored)
    direct = BackpackLMHeadModel.from_pretrained(folder, trust_remote_code=False).eval()
    assert torch.equal(direct(x).logits, model(x).logits)
    # and our own save/from_pretrained round trip
    model.save_pretrained(tmp_path / "ours")
    again = BackpackLMHeadModel.from_pretrained(tmp_path / "ours").eval()
    assert torch.equal(again(x).logits, model(x).logits)


def test_full_size_names_and_shapes_match_the_spec() -> None:
    config = BackpackConfig(n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new")
    assert (config.vocab_size, config.n_positions, config.num_senses) == (50264, 512, 16)
    with torch.device("meta"):
        model = BackpackLMHeadModel(config)
    shapes = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        generic = ".".join("N" if p.isdigit() and parts[i - 1] == "h" else p for i, p in enumerate(parts))
        shapes.setdefault(generic, tuple(tensor.shape))
    assert shapes == FULL_SIZE_KEYS


def test_loading_never_trusts_remote_code(tmp_path, monkeypatch) -> None:
    import transformers

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer,
                transformers.PreTrainedModel):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    torch.manual_seed(0)
    folder = hub_style_checkpoint(tmp_path / "hub", BackpackLMHeadModel(tiny_config()), with_aliases=True)
    loaded = load_model(ModelConfig(name=str(folder), tokenizer="gpt2"))
    assert isinstance(loaded.model, BackpackLMHeadModel)
    assert seen and not any(seen)


def make_senses(k: int = 5, lam: float = 100.0, lr: float = 1e-2, seed: int = 0) -> SensesEditor:
    return SensesEditor(ModelConfig(name="tiny-backpack", seed=seed),
                         senses=SensesConfig(senses_per_example=k, selection_lambda=lam),
                         optimizer=OptimizerConfig(lr=lr))


def selected_module(data_root, task: str = "country_capital", **kw) -> tuple[SensesEditor, TaskDataModule]:
    module = make_senses(**kw)
    dm = TaskDataModule(task=task, **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    module.select(dm)
    return module, dm


def test_deltas_off_reproduce_the_base_model_exactly(data_root, tiny_module) -> None:
    module, dm = selected_module(data_root)
    with torch.no_grad():
        module.sense_deltas.vectors.normal_()
    base = tiny_module("tiny-backpack").model
    x = torch.tensor([dm.load("canonical").examples[0].sequences[0].ids])
    with module.reference():
        off = module.model(x).logits
    assert torch.equal(off, base(x).logits)
    assert not torch.equal(module.model(x).logits, off)  # and on, they do change it


def test_gradients_reach_only_the_selected_deltas(data_root) -> None:
    module, dm = selected_module(data_root)
    batch = next(iter(dm.train_dataloader()))
    sums, counts = example_nll(module.model, batch)
    training_loss(sums / counts.clamp(min=1), dm.task.loss).mean().backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None}
    assert grads == {"sense_deltas.vectors"}
    grad = module.sense_deltas.vectors.grad
    present = torch.isin(module.sense_deltas.vocab_ids, batch["input_ids"][batch["attention_mask"].bool()])
    assert grad[~present].abs().sum() == 0
    assert (grad[present].abs().sum(-1) > 0).all()


def test_selection_prefers_prefix_words_over_frequent_background_words(tmp_path, tiny_module) -> None:
    module = tiny_module("tiny-backpack")
    tok = module.tokenizer
    background_text = "The capital of the city is the best of the world, and the rest of it is the same. " * 3
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps({"text": background_text}) for _ in range(4)) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"prefix": "The capital of Mauritius is", "suffix": " Port Louis"})
                                      + "\n")
    tokenizer = ExampleTokenizer(tok, module.max_length)
    texts, _ = tokenizer.examples(read_jsonl(tmp_path / "r.jsonl", "text"), "r.jsonl")
    examples, _ = tokenizer.examples(read_jsonl(tmp_path / "c.jsonl", "single"), "c.jsonl")
    from editing.methods.senses.selection import background_usage

    config = module.model.config
    background = background_usage(module.model, texts, config.vocab_size, config.num_senses, tok.eos_token_id,
                                  progress=False)
    frequent = set(tok(background_text)["input_ids"])
    rare = set(tok("The capital of Mauritius is Port Louis")["input_ids"]) - frequent
    assert rare  # " Mauritius" (its pieces), " Port", " Louis"
    without = select_senses(example_importance(module.model, examples, "good", background, 0.0, 0), 4, 6)
    chosen = select_senses(example_importance(module.model, examples, "good", background, 1000.0, 0), 4, 6)
    assert set(chosen.vocab_ids.tolist()) <= rare
    assert set(without.vocab_ids.tolist()) & frequent  # without the background term, frequent words compete


def test_k_larger_than_the_candidates_is_capped_and_reported(data_root) -> None:
    module, _ = selected_module(data_root, k=10_000)
    assert module.selection.capped_examples > 0
    assert module.hparams["selection"]["capped_examples"] == module.selection.capped_examples


def test_sense_finetuning_needs_a_backpack() -> None:
    with pytest.raises(ConfigError, match="needs a Backpack"):
        SensesEditor(ModelConfig(name="tiny-gpt2"))


def canonical_loss(module: EditingModule, dm: TaskDataModule) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in dm.train_dataloader():
            sums, counts = example_nll(module.model, batch)
            total += float(training_loss(sums / counts.clamp(min=1), dm.task.loss).sum())
    return total


def test_sense_finetuning_lowers_the_canonical_loss_and_saves_a_reloadable_edit(tmp_path, data_root) -> None:
    from editing.edits.load import load_edited

    L.seed_everything(0)
    module = make_senses(lr=0.05)
    dm = TaskDataModule(task="country_capital", **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    budget = DegradationBudget(output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(max_epochs=2, limit_train_batches=15, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[budget],
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, dm)
    with module.reference():
        before = canonical_loss(module, dm)
    after = canonical_loss(module, dm)
    assert after < before
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "senses" and [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    # the edit alone: ids, senses, vectors; reloaded onto the base it scores exactly as the trained module
    module.export_edit(tmp_path / "edit")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "edit" / "senses.safetensors"))
    assert {"vocab_ids", "sense_ids", "vectors"} <= set(saved)
    assert saved["vectors"].shape == (len(module.selection), module.model.config.n_embd)
    reloaded = load_edited(tmp_path / "edit")
    assert evaluate(reloaded, dm)["per_example"] == evaluate(module, dm)["per_example"]
    # its p0 is the base model again (the ensemble subtracts it: an edit that stayed on would cancel out)
    assert canonical_loss(reloaded, dm) == pytest.approx(after, rel=1e-6)
    with reloaded.reference():
        assert canonical_loss(reloaded, dm) == pytest.approx(before, rel=1e-6)
    assert canonical_loss(reloaded, dm) == pytest.approx(after, rel=1e-6)


def test_a_sense_edit_from_another_base_is_refused(tmp_path, data_root) -> None:
    from editing.edits.load import load_edited

    module, _ = selected_module(data_root)
    module.export_edit(tmp_path / "edit")
    identity = json.loads((tmp_path / "edit" / "base_model.json").read_text())
    with pytest.raises(ConfigError, match="fingerprint"):
        load_edited(tmp_path / "edit", base=ModelConfig(name=identity["name"], seed=1))


def test_senses_inspect_lists_each_sense(tmp_path, data_root, capsys) -> None:
    from editing.cli import main

    module, _ = selected_module(data_root)
    with torch.no_grad():
        module.sense_deltas.vectors.normal_(std=5.0)
    module.export_edit(tmp_path / "edit")
    main(["senses", "inspect", "--edit", str(tmp_path / "edit"), "--top", "3", "--limit", "4"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| token |") and len(out) == 2 + 4
    # a large random change moves the vector's top words
    assert any(row.split("|")[6] != row.split("|")[7] for row in out[2:])


def test_senses_inspect_lists_every_sense_of_a_models_words(capsys) -> None:
    """Reference: each sense vector from the model's own forward pass (output_senses), scored against every row of
    the LM head by a plain loop, top 3 by score."""
    from editing.cli import main
    from editing.commands.senses import inspect_senses

    loaded = load_model(ModelConfig(name="tiny-backpack"))
    main(["senses", "inspect", "--model", "tiny-backpack", "--words", "the,Paris", "--top", "3", "--limit", "null"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = inspect_senses(model="tiny-backpack", words="the,Paris", top=3, limit=None)
    k = loaded.model.config.num_senses
    tok = loaded.tokenizer
    ids = tok(" the", add_special_tokens=False)["input_ids"] + tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(rows) == k * len(ids) and len(out) == 2 + len(rows)
    with torch.no_grad():
        senses = loaded.model(torch.tensor([ids]), output_senses=True).senses[0]  # (k, s, d)
    head = loaded.model.get_output_embeddings().weight.tolist()
    for row in rows:
        j = ids.index(row["vocab_id"])
        vector = senses[row["sense"], j].tolist()
        scores = [sum(a * b for a, b in zip(vector, h, strict=True)) for h in head]
        best = sorted(range(len(scores)), key=lambda v: -scores[v])[:3]
        assert row["top"] == [tok.decode([v]) for v in best], row
    with pytest.raises(ConfigError, match="one of the two"):
        inspect_senses(edit="x", model="tiny-backpack")
    with pytest.raises(ConfigError, match="--words"):
        inspect_senses(model="tiny-backpack")


def test_lora_and_full_run_on_a_backpack(tmp_path, data_root) -> None:
    from editing.methods import FullEditor

    lora = LoRAEditor(ModelConfig(name="tiny-backpack"), lora=LoRAConfig(rank=2, layer_fraction=1.0))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.model.named_parameters() if ".lora_A" in n}
    assert adapted and all(".gpt2_model.h." in n for n in adapted)  # the contextualizer's MLPs, not the senses
    for module in (lora, FullEditor(ModelConfig(name="tiny-backpack"), optimizer=OptimizerConfig(lr=1e-3))):
        budget = DegradationBudget(output_dir=str(tmp_path / module.method))
        L.Trainer(max_epochs=1, limit_train_batches=3, logger=False, enable_progress_bar=False,
                  use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[budget],
                  enable_checkpointing=False).fit(module, TaskDataModule(task="country_capital", **LIMITS))
        results = json.loads((tmp_path / module.method / "results.json").read_text())
        assert results["epochs"][1]["general_nll"] != results["epochs"][0]["general_nll"]


def test_ensemble_with_beta_zero_is_the_large_model(data_root, tiny_module) -> None:
    from editing.models.ensemble import beta_set_to, shared_vocabulary
    from editing.protocol.ensemble_search import ensemble_module, general_nll_by_beta

    large = tiny_module("tiny-gpt2")
    backpack, dm = selected_module(data_root)
    vocab = shared_vocabulary(large.tokenizer, backpack.tokenizer)
    module, ensemble = ensemble_module(large.loaded, backpack, vocab)
    alone = evaluate(large, dm)
    with beta_set_to(ensemble, 0.0):
        zero = evaluate(module, dm)
    assert zero["per_example"] == alone["per_example"] and zero["general_nll"] == alone["general_nll"]
    # an edit that changes nothing changes nothing at any beta
    with beta_set_to(ensemble, 1.0):
        assert evaluate(module, dm)["per_example"] == alone["per_example"]
    with torch.no_grad():
        backpack.sense_deltas.vectors.normal_(std=3.0)
    with beta_set_to(ensemble, 1.0):
        edited = evaluate(module, dm)
    assert edited["general_nll"] != alone["general_nll"]
    # the one-pass NLL of every beta agrees with evaluating at that beta
    by_beta = general_nll_by_beta(ensemble, dm, betas=(1.0, 0.0))
    assert by_beta[0.0] == pytest.approx(alone["general_nll"], rel=1e-9)
    assert by_beta[1.0] == pytest.approx(edited["general_nll"], rel=1e-6)


def test_ensemble_refuses_different_tokenizers(tiny_module) -> None:
    from editing.models.ensemble import shared_vocabulary

    with pytest.raises(ConfigError, match="one tokenizer"):
        shared_vocabulary(tiny_module("tiny-llama").tokenizer, tiny_module("tiny-backpack").tokenizer)


def test_choose_beta_takes_the_largest_beta_inside_the_ball() -> None:
    from editing.protocol.ensemble_search import choose_beta

    nll = {1.0: 3.1, 0.9: 3.004, 0.8: 3.0029, 0.5: 3.0001, 0.0: 3.0}
    assert choose_beta(nll, 1e-3) == 0.8
    assert choose_beta(nll, 1e-4) == 0.5
    assert choose_beta(nll, 1e-5) == 0.0
    assert choose_beta({1.0: 3.5, 0.0: 3.0}, 1e-3) == 0.0


def test_ensemble_command_writes_results_per_ball(tmp_path, data_root) -> None:
    from editing.cli import main

    L.seed_everything(0)
    module = make_senses(lr=0.05)
    budget = DegradationBudget(output_dir=str(tmp_path / "run"))
    L.Trainer(max_epochs=1, limit_train_batches=5, logger=False, enable_progress_bar=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[budget],
              enable_checkpointing=False).fit(module, TaskDataModule(task="country_capital", **LIMITS))
    main(["ensemble", "--large", "tiny-gpt2", "--backpack_edits", str(tmp_path / "run"), "--eval_limit", "6",
          "--general_limit", "8", "--output_dir", str(tmp_path / "ens")])
    results = json.loads((tmp_path / "ens" / "results.json").read_text())
    assert set(results["balls"]) == {"1e-03", "1e-04", "1e-05"}
    for ball in results["balls"].values():
        assert ball["beta"] in [round(0.1 * i, 1) for i in range(11)]
        assert ball["degradation"] < 1e-3 or ball["beta"] == 0.0
    with pytest.raises(SystemExit):  # never overwritten silently
        main(["ensemble", "--large", "tiny-gpt2", "--backpack_edits", str(tmp_path / "run"), "--eval_limit", "6",
              "--general_limit", "8", "--output_dir", str(tmp_path / "ens")])


@pytest.mark.parametrize("task", ["country_capital", "company_ceo", "temporal", "stereoset", "pronoun_gender_bias",
                                  "verb_conjugation"])
def test_senses_fit_through_the_cli_on_every_task(tmp_path, data_root, monkeypatch, task: str) -> None:
    from safetensors.torch import load_file

    from editing.cli import main

    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).resolve().parents[2] / "lightning_configs"
    main(["fit", "--config", str(configs / "tiny" / "fit_senses_tiny_backpack.yaml"), "--config",
          str(configs / "tasks" / f"{task}.yaml"), "--budget.output_dir", str(tmp_path / "run"),
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == "senses" and results["task"]["name"] == task
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]
    edit = load_file(str(tmp_path / "run" / "edits" / "ball_1e-03" / "senses.safetensors"))
    if results["balls"]["1e-03"]["epoch"] == 1:
        assert edit["vectors"].abs().sum() > 0  # the trained deltas, not the initial zeros


def test_sums_at_chosen_positions_are_the_full_passes_sums_there() -> None:
    """``positions`` computes alpha and the sense sums at some target positions only (distillation's sampled KL);
    they must be a full pass's, with left padding too (padding is never a source)."""
    torch.manual_seed(0)
    backpack = BackpackLMHeadModel(tiny_config()).eval().backpack
    ids = torch.randint(0, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in one row
    positions = torch.tensor([[11, 0, 5], [4, 9, 4], [7, 0, 0]])  # repeated and unused slots, in any order
    with torch.no_grad():
        full = backpack(ids, attention_mask=mask, output_alpha=True)
        part = backpack(ids, attention_mask=mask, output_alpha=True, positions=positions)
    assert part.hidden_states.shape == (3, 3, 32) and part.alpha.shape == (3, 4, 3, 12)
    for b in range(3):
        for j in range(3):
            t = int(positions[b, j])
            torch.testing.assert_close(part.hidden_states[b, j], full.hidden_states[b, t], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(part.alpha[b, :, j], full.alpha[b, :, t], rtol=1e-5, atol=1e-7)
            assert float(part.alpha[b, :, j, t + 1:].abs().sum()) == 0.0  # nothing after the target

    # and against SPEC section 7, steps 2-3, by plain loops: q, k from c_attn, scores / sqrt(d/k) with -10000 added
    # above the diagonal (and, as the module does, at padding), softmax over sources, h_t = sum alpha * senses
    with torch.no_grad():
        hidden = backpack.context_network(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        qk = (hidden.double() @ backpack.sense_weight_net.c_attn.weight.double().T
              + backpack.sense_weight_net.c_attn.bias.double())
        senses = backpack.senses(ids)  # step 1 (unchanged by positions), (b, k, s, d)
    k_senses, d = 4, 32
    width = qk.shape[-1] // 2
    head = width // k_senses
    for b in range(3):
        for j in range(3):
            t = int(positions[b, j])
            h = [0.0] * d
            for sense in range(k_senses):
                q = qk[b, t, sense * head:(sense + 1) * head].tolist()
                logits = []
                for src in range(12):
                    key = qk[b, src, width + sense * head: width + (sense + 1) * head].tolist()
                    score = sum(a * c for a, c in zip(q, key, strict=True)) / math.sqrt(head)
                    logits.append(score - 10000.0 if src > t or int(mask[b, src]) == 0 else score)
                top = max(logits)
                weights = [math.exp(v - top) for v in logits]
                total = sum(weights)
                for src in range(12):
                    a = weights[src] / total
                    assert math.isclose(float(part.alpha[b, sense, j, src]), a, rel_tol=1e-4, abs_tol=1e-6)
                    vector = senses[b, sense, src].tolist()
                    h = [x + a * v for x, v in zip(h, vector, strict=True)]
            torch.testing.assert_close(part.hidden_states[b, j].double(), torch.tensor(h, dtype=torch.float64),
                                       rtol=1e-4, atol=1e-5)
