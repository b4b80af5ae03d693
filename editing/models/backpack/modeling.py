"""A native Backpack language model (SPEC section 7): loads ``stanfordnlp/backpack-gpt2`` without remote code.

Each word type has ``k`` sense vectors that depend on the word alone (the sense network); a contextualization
network computes, per sense, causal attention weights alpha over the sequence; the output at position t is the
alpha-weighted sum of the sense vectors of the positions before it, scored by the tied word embeddings. Editing a
sense vector therefore changes the model's predictions in every context where that word is attended to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GPT2Model, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.pytorch_utils import Conv1D

from editing.models.backpack.configuration import BackpackConfig

# The reference adds this constant above the diagonal rather than -inf, so a row of all-masked sources stays finite.
CAUSAL_MASK_VALUE = -10000.0


@dataclass
class BackpackOutput(ModelOutput):
    """Output of a Backpack forward pass.

    Attributes:
        loss: next-token cross-entropy when labels are given.
        logits: (b, s, vocab) next-token logits.
        hidden_states: (b, s, d) the sense sums that the LM head scores.
        alpha: (b, k, s_target, s_source) contextualization weights, when requested.
        senses: (b, k, s, d) sense vectors of the input tokens, when requested.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    senses: torch.Tensor | None = None


class SenseMLP(nn.Module):
    """GPT-2 style MLP (Conv1D layers) with its own output width."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, config: BackpackConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(d_hidden, d_in)
        self.c_proj = Conv1D(d_out, d_hidden)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SenseBlock(nn.Module):
    """The sense network's residual block: ``ln_1``, an MLP, ``ln_2``."""

    def __init__(self, config: BackpackConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = SenseMLP(d, 4 * d, d, config)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)


class SenseNetwork(nn.Module):
    """Maps each token's word embedding to its ``k`` sense vectors (no context)."""

    def __init__(self, config: BackpackConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.num_senses = config.num_senses
        self.dropout = nn.Dropout(config.embd_pdrop)
        self.ln = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.block = SenseBlock(config)
        self.final_mlp = SenseMLP(d, config.sense_intermediate_scale * d, config.num_senses * d, config)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Sense vectors (b, k, s, d) from word embeddings (b, s, d)."""
        r = self.dropout(embeddings)
        r2 = self.ln(r) + r
        r3 = self.block.mlp(self.block.ln_1(r2)) + r2
        senses = self.final_mlp(self.block.ln_2(r3))
        b, s, d = embeddings.shape
        return senses.view(b, s, self.num_senses, d).transpose(1, 2)


class SenseWeightNetwork(nn.Module):
    """Computes alpha: per-sense causal attention from the contextualizer's hidden states."""

    def __init__(self, config: BackpackConfig) -> None:
        super().__init__()
        self.num_senses = config.num_senses
        self.head_dim = config.attention_dim // config.num_senses
        self.c_attn = nn.Linear(config.n_embd, 2 * config.attention_dim)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Alpha (b, k, t, s): per sense, the weights of the s source positions at each target position.

        Args:
            hidden: (b, s, d) the contextualization network's output.
            attention_mask: (b, s) 1 for real tokens.
            positions: (b, m) the target positions to compute, per row (None: all s of them, so t = s).
        """
        b, s, _ = hidden.shape
        sources = torch.arange(s, device=hidden.device)
        targets = sources[None]
        if positions is None:
            q, k = self.c_attn(hidden).split(self.num_senses * self.head_dim, dim=-1)
        else:
            # queries only at the targets (every position is still a key): the projection's query half runs on
            # m of the s positions
            targets = positions
            width = self.num_senses * self.head_dim
            (w_q, w_k), (b_q, b_k) = self.c_attn.weight.split(width), self.c_attn.bias.split(width)
            q = nn.functional.linear(hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])), w_q, b_q)
            k = nn.functional.linear(hidden, w_k, b_k)
        q = q.view(b, q.shape[1], self.num_senses, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_senses, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        blocked = (sources[None, None, :] > targets[..., None])[:, None]  # a target sees itself and what precedes it
        if attention_mask is not None:  # padding never serves as a source (matters only for left padding)
            blocked = blocked | (attention_mask[:, None, None, :] == 0)
        scores = scores.masked_fill(blocked, CAUSAL_MASK_VALUE)
        return scores.softmax(dim=-1)


class BackpackPreTrainedModel(PreTrainedModel):
    """Shared weight initialisation and loading behaviour."""

    config_class = BackpackConfig
    base_model_prefix = "backpack"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2Block"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()


class BackpackModel(BackpackPreTrainedModel):
    """The Backpack body: sense network, contextualization network and alpha; returns the sense sums."""

    def __init__(self, config: BackpackConfig) -> None:
        super().__init__(config)
        inner = config.contextualizer_config()
        if config.contextualizer is None:
            self.gpt2_model = GPT2Model(inner)
            # aliases kept for the reference checkpoint's state-dict names
            self.word_embeddings = self.gpt2_model.wte
            self.position_embeddings = self.gpt2_model.wpe
        else:
            self.contextualizer = AutoModel.from_config(inner)
        self.sense_network = SenseNetwork(config)
        self.sense_weight_net = SenseWeightNetwork(config)
        # An optional callable (input_ids, senses) -> senses that sense finetuning installs; kept out of the module
        # tree so the model's own state dict never carries an edit.
        object.__setattr__(self, "sense_edit", None)
        self.post_init()

    def _apply(self, fn, recurse: bool = True):
        # an installed sense edit is outside the module tree: it follows the model's moves and casts all the same
        super()._apply(fn, recurse)
        if self.sense_edit is not None and isinstance(self.sense_edit, nn.Module):
            self.sense_edit._apply(fn, recurse)
        return self

    @property
    def context_network(self) -> nn.Module:
        """The contextualization transformer."""
        return self.gpt2_model if self.config.contextualizer is None else self.contextualizer

    def get_input_embeddings(self) -> nn.Embedding:
        return self.context_network.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.context_network.set_input_embeddings(value)
        if self.config.contextualizer is None:
            self.word_embeddings = value

    def senses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Sense vectors (b, k, s, d) of ``input_ids`` (b, s), with any installed sense edit applied.

        Senses depend on the word alone, so the sense network runs once per distinct token of the batch (a batch of
        thousands of tokens holds far fewer types); in training its dropout is therefore drawn per type.
        """
        unique, inverse = torch.unique(input_ids, return_inverse=True)
        per_type = self.sense_network(self.get_input_embeddings()(unique)[None])[0].transpose(0, 1)  # (u, k, d)
        # index_select, not advanced indexing: its backward is an index_add, several times faster on a CPU than the
        # sorting index_put that indexing's backward runs. The rows stay (b, s, k, d) in memory (the network's own
        # layout); the (b, k, s, d) result is a view of them, which forward's sum reads without a copy.
        senses = per_type.index_select(0, inverse.flatten()).unflatten(0, inverse.shape).transpose(1, 2)
        if self.sense_edit is not None:
            senses = self.sense_edit(input_ids, senses)
        return senses

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_alpha: bool = False, output_senses: bool = False,
                contextual_hidden: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                **_) -> BackpackOutput:
        """Sense sums for ``input_ids``.

        Args:
            input_ids: (b, s) token ids.
            attention_mask: (b, s) 1 for real tokens.
            output_alpha: also return alpha.
            output_senses: also return the sense vectors.
            contextual_hidden: the contextualization network's output for these ids, when the caller already has
                it (distillation shares it with the teacher); computed otherwise.
            positions: (b, m) compute the sums at these positions of each row only (they are the same as at those
                positions of a full pass: every position still serves as a source); ``hidden_states`` and ``alpha``
                are then (b, m, d) and (b, k, m, s). None: every position.
        """
        senses = self.senses(input_ids)
        if contextual_hidden is None:
            contextual_hidden = self.context_network(input_ids=input_ids, attention_mask=attention_mask,
                                                     use_cache=False).last_hidden_state
        alpha = self.sense_weight_net(contextual_hidden, attention_mask, positions)
        # one (t, s*k) x (s*k, d) product per sequence: the sum over sources j and senses l together
        hidden = torch.einsum("btjl,bjld->btd", alpha.permute(0, 2, 3, 1).to(senses.dtype), senses.transpose(1, 2))
        return BackpackOutput(hidden_states=hidden, alpha=alpha if output_alpha else None,
                              senses=senses if output_senses else None)


class BackpackLMHeadModel(BackpackPreTrainedModel):
    """A Backpack with its LM head tied to the word embeddings (no bias, no final layer norm)."""

    def __init__(self, config: BackpackConfig) -> None:
        super().__init__(config)
        self.backpack = BackpackModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        if self.config.contextualizer is None:
            return {"lm_head.weight": "backpack.gpt2_model.wte.weight",
                    "backpack.word_embeddings.weight": "backpack.gpt2_model.wte.weight",
                    "backpack.position_embeddings.weight": "backpack.gpt2_model.wpe.weight"}
        embeddings = next(n for n, m in self.backpack.named_modules() if m is self.backpack.get_input_embeddings())
        return {"lm_head.weight": f"backpack.{embeddings}.weight"}

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backpack.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backpack.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_alpha: bool = False, output_senses: bool = False,
                **kwargs) -> BackpackOutput:
        out = self.backpack(input_ids, attention_mask=attention_mask, output_alpha=output_alpha,
                            output_senses=output_senses)
        logits = self.lm_head(out.hidden_states)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            loss = nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return BackpackOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, alpha=out.alpha,
                              senses=out.senses)
