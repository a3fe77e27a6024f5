"""Parameter decomposition (SPD / VPD style) of chosen weight matrices into rank-1 subcomponents.

Each chosen weight matrix `W` `[d_out, d_in]` (always in `nn.Linear` orientation,
also for GPT-2's `Conv1D`, which stores `[d_in, d_out]`) is written as a sum of `C`
rank-1 subcomponents `U[:, c] V[c, :]`. A small MLP per component reads the
component's inner activation `V[c] · a` and outputs its *causal importance*
`g_c` in [0, 1]: how much the output on this token needs that component. Training
(Braun et al. 2025, "Stochastic Parameter Decomposition") minimises

- faithfulness `‖W − U V‖²` (mean over the matrix entries),
- stochastic reconstruction: the model output with every chosen module's
  components masked by `m = g + (1 − g) r`, `r ~ U(0, 1)`, must match the
  original output (KL for language models, MSE otherwise),
- layerwise stochastic reconstruction: the same with one module masked at a time,
- importance minimality `Σ_c |g_c|^p`, so few components are needed per token
  (optionally weighted up for components that fire often, `beta > 0`, which
  splits components that merged several features; see `minimality_loss`),
- the adversarial (PGD) reconstruction, where the free part `r` of the masks is
  chosen by sign-gradient ascent to hurt reconstruction most (always logged;
  trained on when its coefficient `pgd > 0`).

The model is never edited: its parameters enter `torch.func.functional_call`
detached (so no gradient reaches them), and the masked components replace the
chosen modules' outputs through forward hooks that exist only during one call.

(a) Toy model of superposition, 5 features in 2 dimensions::

    import interplab as il
    from interplab.toy_models import sparse_features, train_tms
    tms = train_tms(n_features=5, n_hidden=2, steps=1000, seed=0)
    data = lambda n, gen: sparse_features(n, 5, 0.05, gen)    # batch sampler
    dec = il.decompose.decompose(tms, ["linear1"], data, C=20, gate_hidden=4, steps=1000,
                                 batch_size=512, lr=1e-2, minimality=1e-2, seed=0)
    dec.component_weights("linear1")                          # [C, 2, 5] rank-1 pieces
    dec.importances(data(8, None))["linear1"]                 # [8, C] causal importances
    dec.plot().show()                                         # L0 and losses over training

    # 40 features in 10 dimensions needs more: C=100, gate_hidden=16, steps=3000, batch_size=1024,
    # faithfulness=10.0, minimality=1.5e-4, beta=1.0, pgd=1.0, pgd_steps=2 (tests/test_decompose.py)

(b) One MLP module of an organism (tokens: any LongTensor `[n, seq]`)::

    m = il.load("interplab/tiny-sft")
    tokens = il.tasks.make("register", m, n=256, seed=0).clean
    dec = il.decompose.decompose(m, ["transformer.h.1.mlp.c_proj"], tokens, C=64, steps=1000)
    dec.l0()                                                  # final L0 per module
    dec.importances(tokens[:4])["transformer.h.1.mlp.c_proj"] # [4, seq, C]

(c) A weight diff: components reconstruct `W_sft − W_base` on top of frozen `W_base`::

    base = il.load("interplab/tiny-base")
    dec = il.decompose.decompose(m, ["transformer.h.1.mlp.c_proj"], tokens, base=base, C=32)
    dec.component_weights("transformer.h.1.mlp.c_proj").norm(dim=(1, 2))  # size of each piece of ΔW

`Decomposition(model, modules, C, base=None, seed=0)` builds an untrained
decomposition (its `.components[name].U / .V` can be set by hand) and
`.fit(data, ...)` trains it; `decompose(...)` does both. A `Decomposition` is an
`nn.Module` whose parameters are the components' (the model is not a submodule), so
`torch.save(dec.state_dict(), path)` saves a trained one, history included, and
`Decomposition(model, modules, C, ...).load_state_dict(torch.load(path))` restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import bars, checks, figures
from .model import linear_weight
from .subcomponents import Components, lower_leaky_hard_sigmoid, minimality_loss, upper_leaky_hard_sigmoid

Data = torch.Tensor | Callable[[int, torch.Generator | None], torch.Tensor]
Masks = dict[str, torch.Tensor]
L0_THRESHOLD = 0.1


def _submodule(root: nn.Module, name: str) -> nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        linear = [n for n, mod in root.named_modules() if isinstance(mod, (nn.Linear, Conv1D))]
        raise ValueError(
            f"the model has no module {name!r}. Decomposable modules include: {linear[:12]}"
            f"{' ...' if len(linear) > 12 else ''} (print(model) shows every name)."
        ) from None


def _unwrap(model) -> nn.Module:
    """An `il.Model` gives its Hugging Face model; a plain module is itself."""
    return model.hf if hasattr(model, "hf") and isinstance(model.hf, nn.Module) else model




def _key(name: str) -> str:
    """A module name as an `nn.ModuleDict` key, which may not contain dots."""
    return name.replace(".", "/")


class Decomposition(nn.Module):
    """Rank-1 decompositions of `modules` of `model` (optionally of their diff against `base`).

    `components[name]` holds `U` `[d_out, C]`, `V` `[C, d_in]` and the
    importance MLPs. `history` maps metric names (`"loss"`, `"stochastic"`,
    `"pgd"`, and per module `"L0/<name>"`, `"faithfulness/<name>"`,
    `"layerwise/<name>"`, `"minimality/<name>"`) to values logged at `history["step"]`.
    `state_dict()` holds the components and the history; the decomposed model and
    `base` are not part of it (pass them again when loading).
    """

    def __init__(
        self,
        model,
        modules: list[str] | str,
        C: int,
        base=None,
        gate_hidden: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        for value, what in ((C, "C (components per module)"), (gate_hidden, "gate_hidden")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive int, got {value!r}")
        self._model = (_unwrap(model),)  # in a tuple, so that it is not a submodule (nor in the state_dict)
        self.names = [modules] if isinstance(modules, str) else list(modules)
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"modules must be a non-empty list of distinct names, got {self.names}")
        seed = checks.seed(seed)
        self.device = next(self.model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.targets = {name: _submodule(self.model, name) for name in self.names}
        self.base_weight = self._base_weights(_unwrap(base)) if base is not None else None
        init_generator = torch.Generator().manual_seed(seed)
        self.parts = nn.ModuleDict()
        for name, module in self.targets.items():
            d_out, d_in = linear_weight(module).shape
            self.parts[_key(name)] = Components(d_in, d_out, C, gate_hidden, init_generator).to(self.device)
        self.history: dict[str, list[float]] = {"step": []}
        self._verified: set[str] = set()
        self._returns_logits = False

    def _base_weights(self, base: nn.Module) -> dict[str, torch.Tensor]:
        weights = {}
        for name, module in self.targets.items():
            w_base = linear_weight(_submodule(base, name)).detach()
            if w_base.shape != linear_weight(module).shape:
                raise ValueError(
                    f"{name}: base weight {tuple(w_base.shape)} differs from the model's "
                    f"{tuple(linear_weight(module).shape)}; base must have the same architecture."
                )
            weights[name] = w_base.to(self.device)
        return weights

    def target_weight(self, name: str) -> torch.Tensor:
        """What the components of `name` reconstruct: `W`, or `W − W_base` for a diff. `[d_out, d_in]`."""
        weight = linear_weight(self.targets[name]).detach()
        return weight - self.base_weight[name] if self.base_weight is not None else weight

    def component_weights(self, name: str) -> torch.Tensor:
        """The rank-1 pieces `U[:, c] V[c, :]`: `[C, d_out, d_in]` (nn.Linear orientation)."""
        comp = self.components[name]
        return torch.einsum("oc,ci->coi", comp.U, comp.V).detach()

    @property
    def model(self) -> nn.Module:
        """The decomposed model (never edited)."""
        return self._model[0]

    @property
    def components(self) -> dict[str, Components]:
        """`Components` per module name."""
        return {name: self.parts[_key(name)] for name in self.names}

    def get_extra_state(self) -> dict:
        return {"history": self.history, "modules": self.names}

    def set_extra_state(self, state: dict) -> None:
        if state["modules"] != self.names:
            raise ValueError(f"this state decomposes {state['modules']} but this Decomposition has {self.names}; "
                             "build it with the same modules before load_state_dict")
        self.history = {k: list(v) for k, v in state["history"].items()}

    def forward(self, inputs: torch.Tensor, masks: Masks | str = "ones") -> torch.Tensor:
        """`run(inputs, masks)`: the model's output with the components in place of the chosen modules."""
        return self.run(inputs, masks)

    # --- running the model -------------------------------------------------

    @contextmanager
    def _hooks(self, masks: Masks, captured: dict[str, torch.Tensor] | None):
        handles = []
        for name, module in self.targets.items():
            if captured is not None:
                handles.append(module.register_forward_hook(self._capture_hook(name, captured)))
            if name in masks:
                handles.append(module.register_forward_hook(self._replace_hook(name, masks[name])))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _capture_hook(self, name: str, captured: dict[str, torch.Tensor]):
        def hook(module, args, output):
            captured[name] = args[0].detach()
            if name not in self._verified:
                self._verify_linear(name, module, args[0], output)
        return hook

    def _verify_linear(self, name: str, module: nn.Module, a: torch.Tensor, output) -> None:
        weight, bias = linear_weight(module), getattr(module, "bias", None)
        linear = a.is_floating_point() and a.shape[-1] == weight.shape[1] and isinstance(output, torch.Tensor)
        expected = a @ weight.T + (bias if bias is not None else 0) if linear else None
        if not linear or not torch.allclose(output, expected, atol=1e-4, rtol=1e-3):
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) does not compute `x @ W.T + bias` with "
                "W = its weight in nn.Linear orientation; only linear layers can be decomposed."
            )
        self._verified.add(name)

    def _replace_hook(self, name: str, mask: torch.Tensor):
        def hook(module, args, output):
            a = args[0]  # (..., d_in)
            out = self.components[name].output(a, mask)  # (..., d_out)
            if self.base_weight is not None:
                out = out + a @ self.base_weight[name].T
            bias = getattr(module, "bias", None)
            return out + bias.detach() if bias is not None else out
        return hook

    def _call(self, inputs: torch.Tensor, masks: Masks, captured=None) -> torch.Tensor:
        frozen = {k: v.detach() for k, v in self.model.named_parameters()}
        with self._hooks(masks, captured):
            output = torch.func.functional_call(self.model, frozen, (inputs,))
        self._returns_logits = hasattr(output, "logits")
        return output.logits if self._returns_logits else output

    def run(self, inputs: torch.Tensor, masks: Masks | str = "ones") -> torch.Tensor:
        """Model output with the chosen modules replaced by their (masked) components.

        `masks` maps module names to `[..., C]` masks; `"ones"` uses every component
        fully. Modules not in `masks` keep their original weights. Returns logits
        for a language model, the plain output otherwise.
        """
        with torch.no_grad():
            if masks == "ones":
                captured: dict[str, torch.Tensor] = {}
                self._call(inputs, {}, captured)
                masks = {n: torch.ones(*a.shape[:-1], self.components[n].C, device=a.device)
                         for n, a in captured.items()}
            return self._call(inputs, masks)

    def importances(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Causal importances `g` in [0, 1] per module, `[..., C]` (one row per token)."""
        with torch.no_grad():
            _, _, gates = self._gates(inputs)
        return {name: g.clamp(0, 1) for name, g in gates.items()}

    def _gates(self, inputs):
        """Clean output, pre-sigmoid importance logits, and lower-leaky importances per module."""
        captured: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            target = self._call(inputs, {}, captured)
        logits = {n: self.components[n].importance_logits(self.components[n].inner(a)) for n, a in captured.items()}
        return target, logits, {n: lower_leaky_hard_sigmoid(x) for n, x in logits.items()}

    # --- losses ------------------------------------------------------------

    def _reconstruction(self, output: torch.Tensor, target: torch.Tensor, loss_name: str) -> torch.Tensor:
        if loss_name == "kl":
            return F.kl_div(output.log_softmax(-1), target.log_softmax(-1), log_target=True,
                            reduction="none").sum(-1).mean()
        return F.mse_loss(output, target)

    def faithfulness(self) -> dict[str, torch.Tensor]:
        """Mean squared entry of `W_target − U V` per module."""
        return {n: (self.target_weight(n) - c.weight()).pow(2).mean() for n, c in self.components.items()}

    def pgd_loss(self, inputs, gates: Masks, target, loss_name: str, steps: int, step_size: float) -> torch.Tensor:
        """Reconstruction loss with masks `g + (1 − g) s`, `s` chosen by `steps` of sign-gradient ascent.

        `s` starts uniform at random; gradients reach the components through `g`
        only at the final evaluation.
        """
        free = {n: torch.rand(g.shape, generator=self.generator, device=g.device) for n, g in gates.items()}
        fixed = {n: g.detach() for n, g in gates.items()}
        for _ in range(steps):
            free = {n: s.requires_grad_() for n, s in free.items()}
            with torch.enable_grad():  # the ascent needs gradients even when the caller evaluates without
                masks = {n: fixed[n] + (1 - fixed[n]) * free[n] for n in free}
                loss = self._reconstruction(self._call(inputs, masks), target, loss_name)
                grads = torch.autograd.grad(loss, list(free.values()))
            free = {n: (s + step_size * grad.sign()).clamp(0, 1).detach()
                    for (n, s), grad in zip(free.items(), grads)}
        masks = {n: g + (1 - g) * free[n] for n, g in gates.items()}
        return self._reconstruction(self._call(inputs, masks), target, loss_name)

    def losses(
        self, inputs: torch.Tensor, output_loss: str = "auto", pnorm: float = 1.0, beta: float = 0.0,
        pgd_steps: int = 0, pgd_step_size: float = 0.1,
    ) -> dict[str, torch.Tensor]:
        """Every loss term on one batch (differentiable). Keys as in `history`; `"pgd"` if `pgd_steps > 0`."""
        target, logits, gates = self._gates(inputs)
        loss_name = self._output_loss(output_loss)
        masks = {n: g + (1 - g) * torch.rand(g.shape, generator=self.generator, device=g.device)
                 for n, g in gates.items()}
        out = {"stochastic": self._reconstruction(self._call(inputs, masks), target, loss_name)}
        for name in self.names:
            out[f"layerwise/{name}"] = (
                out["stochastic"] if len(self.names) == 1
                else self._reconstruction(self._call(inputs, {name: masks[name]}), target, loss_name)
            )
        for name, value in self.faithfulness().items():
            out[f"faithfulness/{name}"] = value
        for name, x in logits.items():
            g_upper = upper_leaky_hard_sigmoid(x)
            out[f"minimality/{name}"] = minimality_loss(g_upper, pnorm, beta)
            out[f"L0/{name}"] = (gates[name] > L0_THRESHOLD).sum(-1).float().mean()
        if pgd_steps > 0:
            out["pgd"] = self.pgd_loss(inputs, gates, target, loss_name, pgd_steps, pgd_step_size)
        return out

    def _output_loss(self, output_loss: str) -> str:
        """KL over the vocabulary for models that return `.logits`, MSE otherwise (or as asked)."""
        if output_loss not in ("auto", "kl", "mse"):
            raise ValueError(f"output_loss must be 'auto', 'kl' or 'mse', got {output_loss!r}")
        if output_loss != "auto":
            return output_loss
        return "kl" if self._returns_logits else "mse"

    # --- training ----------------------------------------------------------

    def _sample(self, data: Data, batch_size: int) -> torch.Tensor:
        if isinstance(data, torch.Tensor) and len(data) == 0:
            raise ValueError("data is an empty tensor; give inputs [n, ...] with n >= 1")
        if isinstance(data, torch.Tensor):
            rows = torch.randint(len(data), (batch_size,), generator=self.generator, device=self.device)
            return data.to(self.device)[rows]
        if callable(data):
            return data(batch_size, self.generator).to(self.device)
        raise TypeError("data must be a tensor of inputs [n, ...] or a callable (batch_size, generator) -> inputs")

    def fit(
        self,
        data: Data,
        steps: int = 2000,
        batch_size: int = 64,
        lr: float = 3e-3,
        faithfulness: float = 1.0,
        stochastic: float = 1.0,
        layerwise: float = 1.0,
        minimality: float = 1e-3,
        pnorm: float = 1.0,
        beta: float = 0.0,
        pgd: float = 0.0,
        pgd_steps: int = 5,
        pgd_step_size: float = 0.1,
        output_loss: str = "auto",
        warmup_steps: int = 200,
        log_every: int | None = None,
        progress: bool | None = None,
    ) -> Decomposition:
        """Train on batches from `data`; the weighted loss is

        `faithfulness·F + stochastic·S + layerwise·mean(L) + minimality·M + pgd·PGD`,

        with `M = minimality_loss(g, pnorm, beta)` (`Σ_c mean |g_c|^pnorm` when `beta = 0`).

        `data` is a tensor of model inputs `[n, ...]` (`batch_size` rows sampled
        with replacement each step; for a language model a row is a sequence) or
        a callable `(batch_size, generator) -> inputs`.
        `warmup_steps` first fit `U V` to the target weight alone (lr 1e-2).
        Every `log_every` steps all terms, L0 and the PGD loss are logged to
        `history`. Uses the seeded generator of this decomposition.
        """
        steps, pgd_steps = checks.count(steps, "steps"), checks.count(pgd_steps, "pgd_steps", low=0)
        checks.batch_size(batch_size)
        warmup_steps = checks.count(warmup_steps, "warmup_steps", low=0)
        lr, pnorm = checks.number(lr, "lr", low=0), checks.number(pnorm, "pnorm", above=0)
        for value, name in ((faithfulness, "faithfulness"), (stochastic, "stochastic"), (layerwise, "layerwise"),
                            (minimality, "minimality"), (beta, "beta"), (pgd, "pgd"), (pgd_step_size, "pgd_step_size")):
            checks.number(value, name, low=0)
        if log_every is not None:
            checks.count(log_every, "log_every")
        checks.deterministic(self.model, "decompose")
        self._check_data(data)
        self._faithfulness_warmup(warmup_steps)
        log_every = log_every or max(1, steps // 50)
        coefficients = {"stochastic": stochastic, "faithfulness": faithfulness, "layerwise": layerwise,
                        "minimality": minimality, "pgd": pgd}
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        bar = bars.bar(range(steps), progress, "decompose")
        for step in bar:
            inputs = self._sample(data, batch_size)
            log = step % log_every == 0 or step == steps - 1
            terms = self.losses(inputs, output_loss, pnorm, beta, pgd_steps if (pgd > 0 or log) else 0, pgd_step_size)
            loss = self._weighted(terms, coefficients)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            checks.training_step(step, loss, self.parameters())
            if log:
                self._log(step, loss, terms)
                bar.set_postfix(loss=f"{loss.item():.3g}", L0=f"{self.l0()[self.names[0]]:.2f}")
        return self

    def _check_data(self, data: Data) -> None:
        """Token ids in range for a language model, before the first step (not 25 frames into it)."""
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if isinstance(data, torch.Tensor):
            checks.nonempty(data, "data")
            if vocab is not None and not data.is_floating_point() and (data.min() < 0 or data.max() >= vocab):
                raise ValueError(f"data holds token ids in [{data.min().item()}, {data.max().item()}] but the "
                                 f"model's vocabulary has {vocab}; tokenize with this model's tokenizer")
            checks.finite(data, "data")

    def _weighted(self, terms: dict[str, torch.Tensor], coefficients: dict[str, float]) -> torch.Tensor:
        loss = coefficients["stochastic"] * terms["stochastic"]
        if coefficients["pgd"] > 0:
            loss = loss + coefficients["pgd"] * terms["pgd"]
        for name in self.names:
            loss = loss + coefficients["faithfulness"] * terms[f"faithfulness/{name}"]
            loss = loss + coefficients["layerwise"] * terms[f"layerwise/{name}"] / len(self.names)
            loss = loss + coefficients["minimality"] * terms[f"minimality/{name}"]
        return loss

    def _faithfulness_warmup(self, steps: int) -> None:
        weights = [p for c in self.components.values() for p in (c.U, c.V)]
        optimizer = torch.optim.AdamW(weights, lr=1e-2, weight_decay=0.1)
        for _ in range(steps):
            loss = sum(self.faithfulness().values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def _log(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        self.history["step"].append(step)
        for key, value in {"loss": loss, **terms}.items():
            self.history.setdefault(key, []).append(value.item())

    def l0(self) -> dict[str, float]:
        """Last logged L0 per module: mean number of components with importance > 0.1 per token."""
        if not self.history["step"]:
            raise RuntimeError("nothing logged yet: call fit(...) first")
        return {name: self.history[f"L0/{name}"][-1] for name in self.names}

    def plot(self, title: str = "Parameter decomposition"):
        """L0 per module and every loss term over training (`viz.decomposition_figure`)."""
        return figures.draw("decomposition", self, title)


def decompose(
    model,
    modules: list[str] | str,
    data: Data,
    C: int = 40,
    base=None,
    gate_hidden: int = 16,
    seed: int = 0,
    **fit_options,
) -> Decomposition:
    """Decompose `modules` of `model` into `C` rank-1 subcomponents each, trained on `data`.

    `model`: an `il.Model` or any torch module; `modules`: dotted names of linear /
    Conv1D modules; `base`: a model of the same architecture to decompose the diff
    `W − W_base` instead of `W`; `fit_options`: see `Decomposition.fit`.
    """
    return Decomposition(model, modules, C, base=base, gate_hidden=gate_hidden, seed=seed).fit(data, **fit_options)
