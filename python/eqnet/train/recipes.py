"""Training recipes: what one optimizer step computes.

Each recipe's `step(trainer, x, y)` runs the forward and backward passes of every subnet it
trains on the batch, accumulating gradients (the trainer zeroes them before and takes one
optimizer step after), and returns float metrics. Teachers' outputs are detached, so each
subnet's graph is freed by its own backward and memory stays that of one subnet. The space
each recipe trains is `eqnet.run.recipe_space`, so reading a run needs no training code.
"""

from __future__ import annotations

import torch

from eqnet.space import SubnetConfig

from .losses import cosine_distill, gpg_loss, min_norm_weights, wdr_loss


class Recipe:
    name = "base"
    quantized = True
    forms = False  # random granularity / symmetry per layer in random subnets
    recalibrate_bn = True  # BN recalibration before evaluating each subnet

    def eval_configs(self, trainer) -> dict[str, SubnetConfig]:
        return {
            "lowest": trainer.sampler.lowest(),
            "highest": trainer.sampler.highest(),
            "random": trainer.eval_random,
        }

    def step(self, trainer, x, y) -> dict:
        raise NotImplementedError


class FloatRecipe(Recipe):
    """The float baseline (no quantizers)."""

    name = "float"
    quantized = False
    recalibrate_bn = False

    def eval_configs(self, trainer):
        return {"float": None}

    def step(self, trainer, x, y):
        logits = trainer.forward(None, x)
        loss = trainer.ce(logits, y)
        trainer.backward(loss, "float")
        return {"loss": float(loss.detach())}


class QATRecipe(Recipe):
    """Dedicated QAT (LSQ/LSQ+ quantizers), the baseline of the supernets: one width
    throughout, or a searched mixed-precision policy (`policy`, LIMPQ's fine-tuning)."""

    name = "qat"
    recalibrate_bn = False  # the running statistics are those of the one trained config

    @staticmethod
    def target(trainer) -> SubnetConfig:
        policy = trainer.config.policy_config()
        return trainer.sampler.highest() if policy is None else policy

    def eval_configs(self, trainer):
        return {"qat": self.target(trainer)}

    def step(self, trainer, x, y):
        logits = trainer.forward(self.target(trainer), x)
        loss = trainer.ce(logits, y)
        trainer.backward(loss, "qat")
        return {"loss": float(loss.detach())}


class MultiQuantRecipe(Recipe):
    """Lowest-Random-Highest co-training (MultiQuant section 3.2): the lowest, the highest and
    K random subnets on every batch, gradients summed; online adaptive labels (eq. 3-4) when
    `oal` is on."""

    name = "multiquant"

    def step(self, trainer, x, y):
        metrics, probs = {}, []
        total = 0.0
        for role, cfg in trainer.sampler.lrh(trainer.config.num_random):
            logits = trainer.forward(cfg, x)
            loss = trainer.ce(logits, y)
            trainer.backward(loss, role)
            probs.append(torch.softmax(logits.detach().float(), dim=1))
            total += float(loss.detach())
            metrics.setdefault(f"loss_{role}", float(loss.detach()))
        trainer.update_labels(probs, y)
        metrics["loss"] = total
        return metrics


class EQNetRecipe(Recipe):
    """EQ-Net: LRH with random bit width, granularity and symmetry per layer; WDR on every
    elastic layer's float weight; GPG (highest -> CE; each lower subnet ->
    0.5 KL(next higher || it) + 0.5 CE)."""

    name = "eqnet"
    forms = True

    def step(self, trainer, x, y):
        c = trainer.config
        metrics, probs = {}, []
        total = 0.0
        teacher = None
        # lrh() orders highest, randoms by decreasing mean bits, lowest: each teaches the next.
        for role, cfg in trainer.sampler.lrh(c.num_random):
            logits = trainer.forward(cfg, x)
            if c.gpg:
                loss = gpg_loss(teacher, logits, lambda z: trainer.ce(z, y))
            else:
                loss = trainer.ce(logits, y)
            trainer.backward(loss, role)
            teacher = logits.detach()
            probs.append(torch.softmax(teacher.float(), dim=1))
            total += float(loss.detach())
            metrics.setdefault(f"loss_{role}", float(loss.detach()))
        if c.wdr:
            reg = wdr_loss(elastic_weights(trainer.model), c.wdr_kurt, c.wdr_skew)
            trainer.backward(reg, "wdr")
            metrics["loss_wdr"] = float(reg.detach())
            total += metrics["loss_wdr"]
        trainer.update_labels(probs, y)
        metrics["loss"] = total
        return metrics


class LayeredRecipe(Recipe):
    """Vertical layering: nested weights (top width = max w_bits), every width on every batch,
    joint loss by unitary scalarization (alpha = 1/n) or MGD (min-norm alpha over the shared
    parameters' gradients, eq. 10), cosine self-distillation from the next higher width
    (eq. 11), per-bit BN (set by the trainer's per_bit_bn default)."""

    name = "layered"

    def eval_configs(self, trainer):
        configs = {name: cfg for name, cfg in trainer.sampler.uniform_widths()}
        configs["random"] = trainer.eval_random
        return configs

    def width_losses(self, trainer, x, y):
        """Yields (name, loss) widest first; each loss's graph is only that width's."""
        teacher = None
        for name, cfg in trainer.sampler.uniform_widths():
            logits = trainer.forward(cfg, x)
            loss = trainer.ce(logits, y)
            if trainer.config.distill and teacher is not None:
                loss = loss + cosine_distill(teacher, logits)
            teacher = logits.detach()
            yield name, loss

    def step(self, trainer, x, y):
        n = len(trainer.config.w_bits)
        if trainer.config.joint == "mgd":
            return self._mgd_step(trainer, x, y, n)
        metrics, total = {}, 0.0
        for name, loss in self.width_losses(trainer, x, y):
            trainer.backward(loss / n, name)
            metrics[f"loss_{name}"] = float(loss.detach())
            total += float(loss.detach()) / n
        metrics["loss"] = total
        return metrics

    def _mgd_step(self, trainer, x, y, n):
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        shared_ids = shared_parameter_ids(trainer.model)
        shared = [i for i, p in enumerate(params) if id(p) in shared_ids]
        own = [i for i, p in enumerate(params) if id(p) not in shared_ids]
        per_width = []
        metrics, total = {}, 0.0
        for name, loss in self.width_losses(trainer, x, y):
            trainer.check_finite(loss, name)
            grads = torch.autograd.grad(trainer.scale_loss(loss), params, allow_unused=True)
            # Width-specific parameters (per-bit BN, activation steps) follow their own width's
            # loss, outside the MOO problem (vertical layering 4.2.2); 1/n as under US.
            for i in own:
                if grads[i] is not None:
                    p = params[i]
                    p.grad = grads[i] / n if p.grad is None else p.grad + grads[i] / n
            per_width.append(
                [torch.zeros_like(params[i]) if grads[i] is None else grads[i] for i in shared]
            )
            metrics[f"loss_{name}"] = float(loss.detach())
            total += float(loss.detach()) / n
        alpha = min_norm_weights([torch.cat([g.flatten() for g in gs]) for gs in per_width])
        for j, i in enumerate(shared):
            g = sum(float(alpha[w]) * per_width[w][j] for w in range(len(per_width)))
            params[i].grad = g if params[i].grad is None else params[i].grad + g
        for w, (name, _) in enumerate(trainer.sampler.uniform_widths()):
            metrics[f"mgd_alpha_{name}"] = float(alpha[w])
        metrics["loss"] = total
        return metrics


class LIMPQRecipe(Recipe):
    """LIMPQ one-time training (supplementary Alg. 1): every uniform width plus one random
    mixed policy per step, gradients summed. The learned step sizes are the layer-wise
    importance indicators (`importance_indicators`)."""

    name = "limpq"

    def step(self, trainer, x, y):
        metrics, total = {}, 0.0
        subnets = [*trainer.sampler.uniform_widths(), ("random", trainer.sampler.random())]
        for name, cfg in subnets:
            logits = trainer.forward(cfg, x)
            loss = trainer.ce(logits, y)
            trainer.backward(loss, name)
            metrics[f"loss_{name}"] = float(loss.detach())
            total += float(loss.detach())
        metrics["loss"] = total
        return metrics


RECIPE_CLASSES = {
    r.name: r
    for r in (FloatRecipe, QATRecipe, MultiQuantRecipe, EQNetRecipe, LayeredRecipe, LIMPQRecipe)
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPE_CLASSES:
        raise ValueError(f"recipe={name!r}: accepted values are {', '.join(RECIPE_CLASSES)}")
    return RECIPE_CLASSES[name]()


def elastic_weights(supernet) -> list[torch.Tensor]:
    """Float weights of the elastic layers (fixed-width first/last layers excluded)."""
    return [m.weight for m in supernet.quantized_layers().values() if m.fixed_choice is None]


def shared_parameter_ids(supernet) -> set[int]:
    """Parameters every width trains (the MOO problem's w and s_w): everything except the
    activation quantizers and per-bit BN."""
    own = set()
    for layer in supernet.quantized_layers().values():
        if layer.act_quantizer is not None:
            own.update(id(p) for p in layer.act_quantizer.parameters())
    for module in supernet.modules():
        if hasattr(module, "bns") and isinstance(module.bns, torch.nn.ModuleDict):
            own.update(id(p) for p in module.parameters())
    return {id(p) for p in supernet.parameters() if id(p) not in own}
