"""Subnet sampling for supernet training.

Every random configuration comes from one dedicated, seeded `torch.Generator` (never the
global RNG), so the sequence of sampled subnets is reproducible, is saved in checkpoints, and
is the same on every rank of a distributed run that seeds it alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from eqnet.space import ElasticSpace, SubnetConfig, layer_specs

# How the highest and lowest LRH subnets get their forms when forms are sampled:
# "drawn": per layer, uniformly, as every random subnet (the official EQ-Net code);
# "fixed": the default form (per-channel symmetric weights, asymmetric activations) throughout.
EXTREME_FORMS = ("drawn", "fixed")


class ConfigSampler:
    """Lowest-Random-Highest (MultiQuant) and uniform-width (LIMPQ, layered) config streams."""

    def __init__(
        self,
        space: ElasticSpace,
        model: torch.nn.Module,
        seed: int,
        forms: bool,
        uniform_prob: float = 0.0,
        extreme_forms: str = "drawn",
    ):
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob={uniform_prob!r}: must be in [0, 1]")
        if extreme_forms not in EXTREME_FORMS:
            raise ValueError(
                f"extreme_forms={extreme_forms!r}: accepted values are {', '.join(EXTREME_FORMS)}"
            )
        self.space = space
        self.model = model
        self.forms = bool(forms)
        self.extreme_forms = extreme_forms
        self.uniform_prob = float(uniform_prob)
        self.generator = torch.Generator().manual_seed(int(seed))

    def lowest(self) -> SubnetConfig:
        """The lowest widths in the default forms (deterministic: evaluation uses it)."""
        return SubnetConfig.lowest(self.space, self.model)

    def highest(self) -> SubnetConfig:
        """The highest widths in the default forms (deterministic: evaluation and qat use it)."""
        return SubnetConfig.highest(self.space, self.model)

    def _extreme(self, which: str) -> SubnetConfig:
        """The LRH highest or lowest subnet: with forms sampled and extreme_forms="drawn",
        every elastic layer draws its granularity and symmetries as a random subnet does."""
        if not (self.forms and self.extreme_forms == "drawn"):
            return self.highest() if which == "highest" else self.lowest()
        highest = which == "highest"
        return SubnetConfig.random(
            self.space,
            self.model,
            self.generator,
            forms=True,
            w_bits=max(self.space.w_bits) if highest else min(self.space.w_bits),
            a_bits=self.space.highest_a_bits if highest else self.space.lowest_a_bits,
        )

    def random(self) -> SubnetConfig:
        """Each elastic layer draws its widths (and, with forms, its granularity and
        symmetries). With probability uniform_prob, one width instead holds for every elastic
        layer: the per-layer draw reaches a uniform-width subnet, the one a single-target
        deployment runs, almost never (7 widths over 18 layers)."""
        # No extra draw at 0, so the papers' stream (and old checkpoints' resume) is unchanged.
        if self.uniform_prob > 0 and float(torch.rand((), generator=self.generator)) < (
            self.uniform_prob
        ):
            return self._uniform_width()
        return SubnetConfig.random(self.space, self.model, self.generator, forms=self.forms)

    def _uniform_width(self) -> SubnetConfig:
        w_bits = sorted(self.space.w_bits)
        wb = w_bits[int(torch.randint(len(w_bits), (1,), generator=self.generator))]
        ab = _activation_width(self.space, wb)
        drawn = SubnetConfig.random(self.space, self.model, self.generator, forms=self.forms)
        fixed = {n for n, spec in layer_specs(self.model).items() if spec is not None}
        return SubnetConfig(
            [(n, c if n in fixed else replace(c, w_bits=wb, a_bits=ab)) for n, c in drawn]
        )

    def lrh(self, num_random: int) -> list[tuple[str, SubnetConfig]]:
        """[("highest", H), ("random", R_1) ... ("random", R_K), ("lowest", L)]: the randoms
        are sorted by mean bits, highest first (the order in which GPG teaches)."""
        if not isinstance(num_random, int) or num_random < 0:
            raise ValueError(f"num_random={num_random!r}: must be an int >= 0")
        highest = self._extreme("highest")
        randoms = [self.random() for _ in range(num_random)]
        lowest = self._extreme("lowest")
        # sorted() is stable: equal mean bits keep their draw order.
        randoms = sorted(randoms, key=lambda c: -c.mean_bits())
        return [("highest", highest)] + [("random", c) for c in randoms] + [("lowest", lowest)]

    def uniform_widths(self) -> list[tuple[str, SubnetConfig]]:
        """One uniform config per weight width, widest first. The activation width is the same
        number when the space has it, else the largest activation width not above it (else the
        smallest)."""
        out = []
        for wb in sorted(self.space.w_bits, reverse=True):
            ab = _activation_width(self.space, wb)
            cfg = SubnetConfig.uniform(
                self.space,
                self.model,
                wb,
                ab,
                # the same default forms as SubnetConfig.lowest/highest
                *self.space.preferred_forms(),
            )
            # "float": a weight-only width's activations, as `eqnet train --a-bits` spells it
            out.append((f"w{wb}a{'float' if ab is None else ab}", cfg))
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _activation_width(space: ElasticSpace, wb: int) -> int | None:
    """The activation width paired with weight width wb in a uniform config: wb itself when
    the space has it, else the largest integer activation width below it, else the smallest
    (a float activation, None, counting as 16 bits)."""
    below = [a for a in space.int_a_bits if a <= wb]
    return wb if wb in space.a_bits else (max(below) if below else space.lowest_a_bits)
